#!/usr/bin/env bash
# Runs each TEST (the arguments of one `cargo test`, quoted as one word) N times in a row and
# stops at the first failure, whose output it prints. A run that ran no test counts as failed,
# so a misspelt filter cannot pass.
#
#   scripts/soak.sh 20 "-p hvisor-tests --test linux_net" "-p hvisor-tests --test blk"
set -euo pipefail
if [ $# -lt 2 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 N TEST... (TEST: cargo test arguments as one word, e.g. \"-p hvisor-tests --test net\")" >&2
    exit 2
fi
n=$1
shift
cd "$(dirname "$0")/.."
# The end-to-end tests run the binaries as separate processes.
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for t in "$@"; do
    read -ra args <<<"$t"
    # Compiled before the first run, so every run's time is the test's own.
    cargo test --no-run "${args[@]}" >"$log" 2>&1 || { cat "$log"; exit 1; }
    for i in $(seq "$n"); do
        start=$SECONDS
        if cargo test "${args[@]}" >"$log" 2>&1 && grep -Eq 'test result: ok\. [1-9]' "$log"; then
            echo "soak: $t run $i/$n passed ($((SECONDS - start)) s)"
        else
            cat "$log"
            echo "soak: $t FAILED on run $i/$n"
            exit 1
        fi
    done
    echo "soak: $t passed $n/$n"
done
