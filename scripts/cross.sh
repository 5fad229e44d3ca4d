#!/usr/bin/env bash
# Static builds for hvisor root zones, arm64 and riscv64 (or the targets named), and the
# architecture-sensitive unit tests (bridge page layout, ioctl numbers, transport, config, the
# seccomp allowlists compiled for the target) run under qemu-user.
#
#   scripts/cross.sh [aarch64-unknown-linux-musl] [riscv64gc-unknown-linux-gnu]
#
# riscv64 links glibc statically with Debian's gcc-riscv64-linux-gnu (.cargo/config.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-musl riscv64gc-unknown-linux-gnu)

for target in "${targets[@]}"; do
  case "$target" in
    aarch64-*) elf="ARM aarch64"; qemu=qemu-aarch64-static ;;
    riscv64*) elf="RISC-V"; qemu=qemu-riscv64-static ;;
    *) echo "unknown target $target" >&2; exit 2 ;;
  esac
  cargo build --release --target "$target" --workspace --bins
  for b in hvisor-broker hvisor-worker-blk hvisor-worker-net hvisor-worker-console hvisor-sim; do
    f="target/$target/release/$b"
    info=$(file -b "$f" 2>/dev/null || true)
    echo "$b: $info"
    case "$info" in
      *"$elf"*static*) ;;
      "") ;;  # no `file` here: the build itself proved the target
      *) echo "$b is not a static $elf executable" >&2; exit 1 ;;
    esac
  done
  if ! command -v "$qemu" >/dev/null; then
    echo "$target: no $qemu, unit tests not run"
    continue
  fi
  runner="CARGO_TARGET_$(echo "$target" | tr 'a-z-' 'A-Z_')_RUNNER"
  # seccomp cannot be installed under qemu-user (it refuses PR_SET_SECCOMP), so the sandbox
  # and process tests stay native; these cover what differs between architectures.
  env "$runner=$qemu" cargo test --release --target "$target" \
    -p hvisor-protocol -p hvisor-config -p hvisor-broker -p hvisor-worker-console
  env "$runner=$qemu" cargo test --release --target "$target" -p hvisor-policy -- \
    compile printable names mode_parses
  scratch=$(mktemp -d)
  cp examples/zone1.json "$scratch/" && truncate -s 16M "$scratch/rootfs2.ext4"
  (cd "$scratch" && "$qemu" "$OLDPWD/target/$target/release/hvisor-broker" check zone1.json)
  listing=$("$qemu" "target/$target/release/hvisor-broker" policy blk)
  echo "${listing%%$'\n'*}"
  rm -rf "$scratch"
  echo "$target: unit tests, \`check\` and \`policy\` pass under $qemu"
done
