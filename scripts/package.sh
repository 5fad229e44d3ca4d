#!/usr/bin/env bash
# Debian packages for hvisor root zones, arm64 and riscv64 (or the architectures named):
# the static broker and workers, the systemd unit, the init script for busybox root zones, an
# example config under /etc/hvisor-broker/, man pages and shell completions made from the
# command line itself. Built with dpkg-deb; written to target/deb/.
#
#   scripts/package.sh [arm64] [riscv64]
set -euo pipefail
cd "$(dirname "$0")/.."
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(arm64 riscv64)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
out=target/deb
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Man pages and completions come from the command-line definitions, by a native build.
cargo build --release --workspace --bins
target/release/hvisor-broker generate man "$work/man"
target/release/hvisor-broker generate completions "$work/completions"

for arch in "${archs[@]}"; do
  case "$arch" in
    arm64) target=aarch64-unknown-linux-musl ;;
    riscv64) target=riscv64gc-unknown-linux-gnu ;;
    *) echo "unknown architecture $arch (arm64 or riscv64)" >&2; exit 2 ;;
  esac
  cargo build --release --target "$target" --workspace --bins
  root="$work/$arch"
  lib="$root/usr/lib/hvisor-broker"
  install -d "$lib" "$root/usr/sbin" "$root/DEBIAN"
  # The broker starts the workers found beside its own binary (symlinks resolved).
  for b in hvisor-broker hvisor-worker-blk hvisor-worker-net hvisor-worker-console; do
    install -m 0755 "target/$target/release/$b" "$lib/$b"
  done
  ln -s ../lib/hvisor-broker/hvisor-broker "$root/usr/sbin/hvisor-broker"
  install -D -m 0644 packaging/hvisor-broker.service \
    "$root/usr/lib/systemd/system/hvisor-broker.service"
  install -D -m 0755 packaging/init.d/hvisor-broker "$root/etc/init.d/hvisor-broker"
  install -D -m 0644 examples/zone1.json "$root/etc/hvisor-broker/virtio_cfg.json"
  install -d "$root/usr/share/man/man8"
  for page in "$work"/man/*.8; do
    gzip -9n <"$page" >"$root/usr/share/man/man8/$(basename "$page").gz"
  done
  install -D -m 0644 "$work/completions/hvisor-broker.bash" \
    "$root/usr/share/bash-completion/completions/hvisor-broker"
  install -D -m 0644 "$work/completions/_hvisor-broker" \
    "$root/usr/share/zsh/vendor-completions/_hvisor-broker"
  install -D -m 0644 "$work/completions/hvisor-broker.fish" \
    "$root/usr/share/fish/vendor_completions.d/hvisor-broker.fish"
  doc="$root/usr/share/doc/hvisor-broker"
  install -D -m 0644 README.md "$doc/README.md"
  install -m 0644 docs/*.md "$doc/"
  cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: hvisor-broker

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
  printf '%s\n' /etc/hvisor-broker/virtio_cfg.json /etc/init.d/hvisor-broker \
    >"$root/DEBIAN/conffiles"
  cat >"$root/DEBIAN/control" <<EOF
Package: hvisor-broker
Version: $version
Architecture: $arch
Maintainer: hvisor-broker developers <hvisor-broker@invalid>
Section: admin
Priority: optional
Installed-Size: $(du -ks --exclude=DEBIAN "$root" | cut -f1)
Description: privilege-separated virtio backend for the hvisor hypervisor
 A drop-in for hvisor-tool's "hvisor virtio start virtio_cfg.json": a small
 privileged broker answers the zones' virtio-mmio register accesses and starts
 one sandboxed worker process per device (blk, net, console). Static binaries,
 a systemd unit (Type=notify) and an init script for busybox root zones.
EOF
  deb="$out/hvisor-broker_${version}_${arch}.deb"
  dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
  echo "$deb"
done
