#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), one after the other, with the
# nightly toolchain; installs cargo-fuzz first if it is missing. Crashes land in
# fuzz/artifacts/<target>/; the corpora grow in fuzz/corpus/<target>/ (neither is committed).
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/.."
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz
fi
cargo +nightly fuzz build
for target in $(cargo +nightly fuzz list); do
    echo "== $target: $seconds s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds"
done
