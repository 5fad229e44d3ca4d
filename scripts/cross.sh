#!/usr/bin/env bash
# Static aarch64 builds, as hvisor root zones run them, and the architecture-sensitive unit
# tests (bridge page layout, ioctl numbers, transport, config) run under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-musl
cargo build --release --target "$target" --workspace --bins
for b in hvisor-broker hvisor-worker-blk hvisor-worker-net hvisor-worker-console hvisor-sim; do
  f="target/$target/release/$b"
  info=$(file -b "$f" 2>/dev/null || true)
  echo "$b: $info"
  case "$info" in
    *aarch64*static*|*ARM\ aarch64*static*) ;;
    "") ;;  # no `file` here: the build itself proved the target
    *) echo "$b is not a static aarch64 executable" >&2; exit 1 ;;
  esac
done
if command -v qemu-aarch64-static >/dev/null; then
  # seccomp cannot be installed under qemu-user (it refuses PR_SET_SECCOMP), so the policy
  # and process tests stay native; these cover what differs between architectures.
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64-static \
    cargo test --release --target "$target" -p hvisor-protocol -p hvisor-config -p hvisor-broker -p hvisor-worker-console
  scratch=$(mktemp -d)
  cp examples/zone1.json "$scratch/" && truncate -s 16M "$scratch/rootfs2.ext4"
  (cd "$scratch" && qemu-aarch64-static "$OLDPWD/target/$target/release/hvisor-broker" check zone1.json)
  rm -rf "$scratch"
  echo "aarch64: unit tests and \`check\` pass under qemu-aarch64-static"
fi
