#!/usr/bin/env bash
# Benchmarks (figures beside same-run baselines; not a pass/fail test).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
target/release/hvisor-bench "$@"
target/release/hvisor-flood-bench
# A slow disk (200 us per request, through a FUSE file system of the benchmark's own): queue
# depth 1, 4 and 16 beside the ideal and the worker held to one request at a time; PSS of each
# process.
target/release/hvisor-slowdisk-bench 200 2 3
# CPU time, read/write-family system calls and context switches per request of the broker and
# the blk worker at queue depth 1, 4 and 16, IOPS and the register-read latency, in turn: the
# broker and blk worker of the last commit before the cost work (the baseline, built from git
# history when there is one), this build's defaults, and this build with a 10% polling budget.
before_commit=c1705f4
if git cat-file -e "$before_commit^{commit}" 2>/dev/null; then
  before=$(mktemp -d)
  trap 'rm -rf "$before"' EXIT
  git archive "$before_commit" | tar -x -C "$before"
  (cd "$before" && cargo build --release -q -p hvisor-broker -p hvisor-worker-blk)
  export HVISOR_BEFORE_DIR="$before/target/release"
else
  echo "(no git history: the cost benchmark runs without the baseline build)"
fi
target/release/hvisor-cost-bench 3 3
unset HVISOR_BEFORE_DIR
# How long a device waits for a new worker when its worker is killed: median and max.
target/release/hvisor-restart-bench 20
# Rate limits: a disk limited to 20 MB/s at queue depth 1 and 16, delivered figure and ratio,
# beside an unlimited neighbour's IOPS and the same neighbour alone.
target/release/hvisor-ratelimit-bench 5
# A zone added and removed again and again: another zone's register read latency (p50, p99)
# beside the same run's figure without.
target/release/hvisor-zones-bench
