#!/usr/bin/env bash
# Builds every binary (the end-to-end tests run them as separate processes), then runs all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace "$@"
