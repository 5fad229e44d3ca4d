#!/usr/bin/env bash
# Builds every binary (the end-to-end tests run them as separate processes), then runs all
# tests; the sandbox tests run again against a release build, whose code the filters must fit
# as well.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test --workspace "$@"
cargo build --release --workspace --bins
HVISOR_BIN_DIR="$PWD/target/release" cargo test --release -p hvisor-tests --test sandbox "$@"
