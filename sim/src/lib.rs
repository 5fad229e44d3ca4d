//! hvisor-sim: a simulated hvisor and its guest zones, for end-to-end tests, benchmarks and
//! the demo. It talks to the real `hvisor-broker` only through the simulator socket
//! (sim-protocol v1) and the shared pages that socket hands over, exactly as hvisor and
//! `hvisor.ko` would.
//!
//! # Command line
//!
//! ```text
//! hvisor-sim --config zone.json --socket PATH --guest WORKLOAD
//!            [--legacy-driver] [--seed N] [--report FILE] [--shadow-dir DIR]
//!            [--timeout SECS] [--stay] [--wait-for FILE]
//!            [--linux-kernel PATH] [--linux-modules DIR] [--busybox PATH] [--linux-trace]
//! ```
//!
//! - `--config`: the backend JSON (the same file the broker reads); the simulator takes each
//!   zone's RAM regions and virtio regions from it.
//! - `--socket`: where to listen (`SOCK_SEQPACKET`); a stale socket file is replaced.
//! - `--legacy-driver`: play the driver before February 2026: an eventfd INIT is answered with
//!   ERROR (errno 22); a SIGNAL_WAKEUP INIT is accepted and the broker is woken with
//!   `tgkill(peer pid, tid, SIGUSR1)`. Without it, both kinds of INIT are accepted.
//! - `--guest`: `blk-demo`, `blk-verify`, `hostile`, `bench`, `linux-boot` or `linux-blk`
//!   (below).
//! - `--seed` (default 1): seeds every random choice of the workloads.
//! - `--report FILE`: the run report as JSON (below).
//! - `--shadow-dir DIR`: `blk-verify` and `hostile` write, per blk device, the disk content
//!   the guest expects to `DIR/zone<id>-0x<addr in lowercase hex>.img`
//!   (e.g. `zone1-0xa003c00.img`), to compare byte for byte with the image file.
//! - `--timeout SECS` (default 60): counted from the moment the socket listens; if the
//!   workload has not finished by then, `hvisor-sim: guest workload did not finish within N s`
//!   goes to stderr and the exit status is 3.
//! - `--wait-for FILE`: after the broker connected, start the guests only once FILE exists
//!   (lets a test act on the broker first); the wait counts against `--timeout`.
//! - `--stay`: after the workload, keep serving (interrupts, vCPU state) until the broker
//!   disconnects, then exit with the workload's status.
//!
//! - `--linux-kernel` (default `/usr/bin/linux`), `--linux-modules` (default
//!   `/usr/lib/uml/modules/<release>`), `--busybox` (default `/bin/busybox`, a static one):
//!   what a `linux-*` guest is built from (Debian: `user-mode-linux`, `busybox-static`).
//!   `--linux-trace` prints every vhost-user message the adapter receives.
//!
//! Stdout carries, in this order: `hvisor-sim: listening on PATH` once the socket listens,
//! `hvisor-sim: broker connected (eventfd wakeup)` or `(SIGUSR1 wakeup)`, the workload's
//! progress, a summary, and `hvisor-sim: result: PASS` or `FAIL`. A connection whose INIT is
//! malformed is refused with a reason on stderr (`hvisor-sim: refused a connection: ...`) and
//! the simulator keeps listening.
//!
//! Exit status: 0 every check passed; 1 a check failed or a guest failed (for example a vCPU
//! not answered within 10 s, or the broker went away); 2 bad arguments, configuration or
//! setup; 3 the `--timeout` watchdog fired.
//!
//! # The machine
//!
//! - Physical memory: one sparse memfd of max(zone0_ipa + size) bytes, sealed against
//!   shrinking and growing; each zone's RAM regions are mapped at their zone0_ipa offsets and
//!   seen by guests at zonex_ipa.
//! - The bridge page: a 4096-byte memfd holding `struct virtio_bridge`.
//! - vCPUs: each zone runs one guest thread with one vCPU. Zones are numbered in the order of
//!   the configuration: zone index i (0-based) gets physical CPU i + 1, so `src_cpu` of its
//!   requests and its `cfg_flags` / `cfg_values` slot are i + 1 (CPU 0 stands for the root
//!   zone, which never traps). At most 4 zones.
//! - Every register access is one trapped access, as hvisor handles it: publish a
//!   `device_req` under the request lock (backing off while the ring is full), wake the broker
//!   if `need_wakeup` is set, and, unless the offset inside the virtio region is 0x50
//!   (QueueNotify), spin until `cfg_flags[cpu]` moves. Unlike hvisor, a vCPU gives up after
//!   10 s or as soon as the broker's socket closes, with an error naming the access.
//! - A hypervisor thread drains `res_list` whenever the finish eventfd fires and delivers each
//!   entry as an interrupt of (zone, irq); guests wait for it, read InterruptStatus and write
//!   InterruptACK before looking at the used ring, as Linux does.
//!
//! # Workloads
//!
//! Each zone's guest handles every blk device of its zone; net and console devices are left
//! alone.
//! - `blk-demo`: prints the device (capacity, read-only or not, ID), writes three
//!   multi-sector patterns, reads them back and prints `verified N bytes`.
//! - `blk-verify`: with the stock `VirtIOBlk` (which negotiates INDIRECT_DESC and EVENT_IDX
//!   when offered): capacity, GET_ID, a read of the whole disk into a shadow, at least 200
//!   random writes of 1..=16 sectors interleaved with random reads verified against the shadow
//!   (up to 4 requests in flight, never overlapping a write), flushes, and a full read-back.
//!   Then the device is reset and re-initialised by a minimal driver of our own that
//!   negotiates VERSION_1, FLUSH, DISCARD, WRITE_ZEROES, RO, BLK_SIZE, SEG_MAX and SIZE_MAX
//!   and reads the config space; it checks GET_ID, an OUT/IN round trip, DISCARD and
//!   WRITE_ZEROES (both must read back as zeros) or, on a read-only device, that OUT, DISCARD
//!   and WRITE_ZEROES fail with IOERR and the disk is unchanged; then a final full read-back
//!   and FLUSH. Where the image file is readable it is also compared directly.
//! - `hostile`: per blk device, out-of-range QueueSel, oversized and non-power-of-two
//!   QueueNum, writes to read-only registers, 1/2/8-byte register accesses, unknown offsets,
//!   config reads of every width, QueueNotify for a missing queue and before DRIVER_OK, a read
//!   of QueueNotify; every access must be answered. Then a shorter `blk-verify` (40 writes).
//! - `bench`: on the first blk device only: 200000 MagicValue reads (mean, p50, p99 in us),
//!   4 KiB random reads at queue depth 1 for about 2 s, 128 KiB sequential reads for about
//!   2 s, each beside `pread`s of the same offsets on the image file (page cache warmed by an
//!   untimed pass), printed as a table with ratios.
//!
//! - `linux-boot` and `linux-blk`: a real Linux kernel, User-Mode Linux, is the zone (see
//!   [`linux`]): the configuration must have one zone whose RAM regions are identity-mapped
//!   and start at or below UML's kernel image end (about 10 MiB; 0x100000 is safe); UML gets
//!   `mem=` up to the end of the highest region and one `virtio_uml.device` per device. An
//!   initramfs built at run time (busybox, the virtio driver modules in dependency order, an
//!   `/init` script) runs the workload and reports on the console with `HVSIM ` lines, which
//!   the simulator prints (prefixed `linux| `) and parses into the report's `linux` section.
//!   `linux-boot` loads the drivers, checks every disk appeared, and powers off. `linux-blk`
//!   also makes an ext2 file system on the first disk (`mke2fs`), writes five files, syncs,
//!   unmounts, drops caches, remounts read-only and checks every SHA-256; on the second disk
//!   (if any) it writes up to 64 MiB of random data with `dd oflag=direct`, reads it back with
//!   `iflag=direct` and compares checksums, then writes the next 8 MiB, discards them
//!   (`blkdiscard`) and checks they read back as zeros. The report lists every file and checksum, so the
//!   host can read the images back (`debugfs`, `e2fsck`) after the run.
//!
//! # Report (`--report FILE`)
//!
//! ```json
//! {
//!   "workload": "blk-verify", "seed": 1, "wakeup": "eventfd" | "SIGUSR1",
//!   "ok": true, "elapsed_s": 4.2, "broker_gone": false,
//!   "hypervisor": { "requests": 0, "wakeups": 0, "finish_signals": 0,
//!                   "interrupts": 0, "stray_interrupts": 0 },
//!   "checks_passed": 40, "checks_failed": 0,
//!   "zones": [ { "zone": 1, "cpu": 1, "ok": true, "error": null, "devices": [ {
//!       "zone": 1, "addr": 167787520, "addr_hex": "0xa003c00", "irq": 78, "kind": "blk",
//!       "capacity_sectors": 2048, "device_id": "...", "readonly": false,
//!       "features": { "device": 0, "stock": 0, "own": 0 },
//!       "config": { "capacity": 2048, "size_max": 0, "seg_max": 0, "blk_size": 512,
//!                   "max_discard_sectors": 0, "max_discard_seg": 0,
//!                   "discard_sector_alignment": 0, "max_write_zeroes_sectors": 0,
//!                   "max_write_zeroes_seg": 0, "write_zeroes_may_unmap": 0 } | null,
//!       "writes": 0, "reads": 0, "flushes": 0, "discards": 0, "write_zeroes": 0,
//!       "verified_bytes": 0, "interrupts": 0, "missed_interrupts": 0,
//!       "shadow_file": "DIR/zone1-0xa003c00.img" | null,
//!       "checks": [ { "name": "stock_readback", "pass": true, "detail": "..." } ],
//!       "ok": true, "error": null } ] } ],
//!   "bench": null | {
//!     "zone": 1, "addr": 167787520, "image": "...", "capacity_sectors": 2048,
//!     "sync_read": { "count": 200000, "mean_us": 0.0, "p50_us": 0.0, "p99_us": 0.0,
//!                    "max_us": 0.0 },
//!     "randread_4k_qd1": { "block_bytes": 4096, "ops": 0, "seconds": 2.0, "iops": 0.0,
//!                          "mb_per_s": 0.0, "baseline_ops": 0, "baseline_seconds": 2.0,
//!                          "baseline_iops": 0.0, "baseline_mb_per_s": 0.0, "ratio": 0.0 },
//!     "seqread_128k": { ...same fields... } },
//!   "linux": null | {
//!     "kernel": "/usr/bin/linux", "release": "6.1.176", "mem_bytes": 268435456,
//!     "boot_s": 1.3, "run_s": 3.5, "exit": "exit status: 0", "done": true,
//!     "checks": [ { "name": "vda-mke2fs", "pass": true, "detail": "" } ],
//!     "disks": [ { "dev": "vda", "sectors": 65536, "readonly": false } ],
//!     "files": [ { "dev": "vda", "path": "/dir/a.bin", "bytes": 1024, "sha256": "..." } ],
//!     "raw": [ { "dev": "vdb", "bytes": 67108864, "sha256": "..." } ],
//!     "rates": [ { "dev": "vdb", "op": "write", "bytes": 67108864, "seconds": 0.3,
//!                  "mb_per_s": 220.0 } ],
//!     "links": [ { "connected": true, "probed": true, "device_features": 0,
//!                  "driver_features": 0, "protocol_features": 0, "features_ok": true,
//!                  "driver_ok_reached": true, "queues_enabled": 1, "messages": 0,
//!                  "kicks": 0, "interrupts": 0, "spurious_interrupts": 0, "calls": 0,
//!                  "config_changes": 0, "config_reads": 0, "errors": [],
//!                  "message_order": [ "SET_OWNER", "GET_FEATURES", "..." ] } ] }
//! }
//! ```
//! A guest that fails adds a failed check named `workload` (and `error`) to its device, or
//! sets `error` of its zone. Feature values are the 64-bit feature words; `stock` is what the
//! stock driver accepted, `own` what our driver accepted (for a linux guest: what Linux
//! accepted). A linux guest's devices carry the adapter's checks (`adapter_connected`,
//! `adapter_probe`, `adapter_features_ok`, `adapter_driver_ok`, `adapter_errors`); the guest's
//! own checks and `linux_done` are in `linux.checks`.

pub mod guest;
pub mod hal;
pub mod hv;
pub mod layout;
pub mod linux;
pub mod mem;
pub mod report;
pub mod run;
pub mod server;
pub mod transport;

#[cfg(test)]
mod tests;
