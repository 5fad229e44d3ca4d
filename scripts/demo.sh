#!/usr/bin/env bash
# The main job on a machine without hvisor: the simulated hypervisor runs a guest zone, the
# broker serves examples/zone1.json to it, and the guest writes, reads back and verifies its
# disk through the sandboxed blk worker.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
bin="$PWD/target/release"
work=$(mktemp -d)
sim_pid=""; broker_pid=""
cleanup() {
  [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null || true
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cp examples/zone1.json "$work/"
cd "$work"
truncate -s 64M rootfs2.ext4
echo "== hvisor-broker check zone1.json"
"$bin/hvisor-broker" check zone1.json
echo
echo "== hvisor-sim: a simulated hvisor with zone 1 (guest driver: virtio-drivers)"
"$bin/hvisor-sim" --config zone1.json --socket hvisor.sock --guest blk-demo \
  --report report.json >> run.out 2>&1 &
sim_pid=$!
for _ in $(seq 100); do grep -q "listening on" run.out 2>/dev/null && break; sleep 0.1; done
echo "== hvisor-broker start zone1.json --driver hvisor.sock"
"$bin/hvisor-broker" start zone1.json --driver hvisor.sock >> run.out 2>&1 &
broker_pid=$!
# the broker stops by itself when the simulated hypervisor goes away
tail -n +1 -f run.out --pid "$broker_pid" || true
status=0
wait "$sim_pid" || status=$?
wait "$broker_pid" || true
broker_pid=""; sim_pid=""
echo
echo "== the image on the host now holds what the guest wrote:"
od -A d -t x1 -N 32 rootfs2.ext4 | head -2
exit "$status"
