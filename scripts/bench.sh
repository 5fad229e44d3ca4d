#!/usr/bin/env bash
# Benchmarks (figures beside same-run baselines; not a pass/fail test).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
target/release/hvisor-bench "$@"
target/release/hvisor-flood-bench
# How long a device waits for a new worker when its worker is killed: median and max.
target/release/hvisor-restart-bench 20
