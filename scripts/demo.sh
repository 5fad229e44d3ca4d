#!/usr/bin/env bash
# The main job on a machine without hvisor: the simulated hypervisor runs guest zone 1 of
# examples/zone1.json (the seed config: net, console, blk), the broker serves it with one
# sandboxed worker per device, and the guest writes, reads back and verifies its disk, pings
# the host through its tap, and greets on its console, whose pty the script reads.
# The tap lives in a network namespace of its own (root and iproute2 needed; without them the
# demo leaves the net device out).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
bin="$PWD/target/release"
config="$PWD/examples/zone1.json"
ns=""
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && [ -e /dev/net/tun ]; then
  ns="hvisor-demo-$$"
  ip netns add "$ns"
else
  echo "(no root, iproute2 or /dev/net/tun: the demo leaves the net device out)"
  config="$PWD/examples/zone1-no-net.json"
fi
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# nsenter execs in place, so $! below is the broker itself
in_ns=()
[ -n "$ns" ] && in_ns=(nsenter --net="/run/netns/$ns" --)
wait_for() { for _ in $(seq 200); do grep -q "$1" run.out 2>/dev/null && return 0; sleep 0.05; done; return 1; }

cp "$config" "$work/zone1.json"
cd "$work"
truncate -s 64M rootfs2.ext4
echo "== hvisor-broker check zone1.json"
"$bin/hvisor-broker" check zone1.json
echo
echo "== hvisor-sim: a simulated hvisor with zone 1 (guest drivers: virtio-drivers)"
"$bin/hvisor-sim" --config zone1.json --socket hvisor.sock --guest demo --wait-for go \
  --report report.json --stay >> run.out 2>&1 &
pids+=($!); sim_pid=$!
wait_for "listening on"
echo "== hvisor-broker start zone1.json --driver hvisor.sock"
"${in_ns[@]}" "$bin/hvisor-broker" start zone1.json --driver hvisor.sock >> run.out 2>&1 &
pids+=($!); broker_pid=$!
wait_for "console: /dev/pts/"
pty=$(grep -o "console: /dev/pts/[0-9]*" run.out | head -1 | cut -d' ' -f2)
if [ -n "$ns" ]; then
  wait_for "net@0xa003600: irq"
  ip -n "$ns" addr add 192.0.2.1/24 dev tap0
  ip -n "$ns" link set tap0 up
fi
# the console's output, as a user attached to its pty would see it
(cat "$pty" 2>/dev/null | sed -u "s#^#  pty $pty | #" >> run.out) &
pids+=($!)
touch go
tail -n +1 -f run.out &
tail_pid=$!
pids+=($tail_pid)
for _ in $(seq 1200); do grep -q "hvisor-sim: result:" run.out && break; sleep 0.05; done
sleep 0.3
kill "$tail_pid" 2>/dev/null || true
echo
echo "== hvisor-broker audit: what the kernel says about each worker's sandbox (excerpt)"
"${in_ns[@]}" "$bin/hvisor-broker" audit --driver hvisor.sock 2>&1 \
  | grep -E "^zone|uid/gid|namespaces|seccomp|root  " || true
echo
echo "== SIGTERM to the broker"
kill "$broker_pid" 2>/dev/null || true
wait "$broker_pid" 2>/dev/null || true
status=0
wait "$sim_pid" || status=$?
tail -n 4 run.out
echo
echo "== the image on the host now holds what the guest wrote:"
od -A d -t x1 -N 32 rootfs2.ext4 | head -2

# A real Linux kernel as the guest: User-Mode Linux, whose virtio-blk driver reaches the same
# broker and blk workers through the simulator (Debian's user-mode-linux and busybox-static).
if [ -x /usr/bin/linux ] && [ -x /bin/busybox ]; then
  echo
  echo "== a real Linux guest (User-Mode Linux): ext2 on vda, a 64 MiB dd round trip on vdb"
  truncate -s 32M fs.img
  truncate -s 80M raw.img
  cat > linux.json <<'JSON'
{ "zones": [ { "id": 1,
  "memory_region": [ { "zone0_ipa": "0x100000", "zonex_ipa": "0x100000", "size": "0xff00000" } ],
  "devices": [
    { "type": "blk", "addr": "0x20000000", "len": "0x200", "irq": 78, "img": "fs.img", "status": "enable" },
    { "type": "blk", "addr": "0x20000200", "len": "0x200", "irq": 79, "img": "raw.img", "status": "enable" } ] } ] }
JSON
  : > linux.out
  "$bin/hvisor-sim" --config linux.json --socket linux.sock --guest linux-blk --timeout 120 \
    >> linux.out 2>&1 &
  pids+=($!); sim_pid=$!
  for _ in $(seq 200); do grep -q "listening on" linux.out && break; sleep 0.05; done
  "$bin/hvisor-broker" start linux.json --driver linux.sock >> linux.out 2>&1 &
  pids+=($!)
  timeout 150 tail -n +1 -f linux.out --pid "$sim_pid" | grep -E "linux\||result:|worker .*ready" || true
  wait "$sim_pid" || status=$?
fi
exit "$status"
