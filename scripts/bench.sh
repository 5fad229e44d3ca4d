#!/usr/bin/env bash
# Benchmarks (figures beside same-run baselines; not a pass/fail test).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
target/release/hvisor-bench "$@"
target/release/hvisor-flood-bench
