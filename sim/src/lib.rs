//! hvisor-sim: a simulated hvisor and its guest zones, for end-to-end tests, benchmarks and
//! the demo. It talks to the real `hvisor-broker` only through the simulator socket
//! (sim-protocol v1) and the shared pages that socket hands over, exactly as hvisor and
//! `hvisor.ko` would.
//!
//! # Command line
//!
//! ```text
//! hvisor-sim --config zone.json --socket PATH --guest WORKLOAD
//!            [--legacy-driver] [--gic hvisor|ideal] [--lose-wakeups N]
//!            [--rounds-dir DIR] [--repeat-until FILE] [--bench-reads N]
//!            [--seed N] [--report FILE] [--shadow-dir DIR]
//!            [--timeout SECS] [--stay] [--wait-for FILE] [--resume-when FILE]
//!            [--zone-guest ZONE=WORKLOAD]... [--depths N,..] [--depth-secs S] [--depth-block B]
//!            [--depth-verify]
//!            [--net-guest IP] [--net-host IP] [--net-port PORT] [--net-bench-secs SECS]
//!            [--linux-kernel PATH] [--linux-modules DIR] [--busybox PATH] [--linux-trace]
//! ```
//!
//! - `--config`: the backend JSON (the same file the broker reads); the simulator takes each
//!   zone's RAM regions and virtio regions from it.
//! - `--socket`: where to listen (`SOCK_SEQPACKET`); a stale socket file is replaced.
//! - `--legacy-driver`: play the driver before February 2026: an eventfd INIT is answered with
//!   ERROR (errno 22); a SIGNAL_WAKEUP INIT is accepted and the broker is woken with
//!   `tgkill(peer pid, tid, SIGUSR1)`. Without it, both kinds of INIT are accepted.
//! - `--gic` (default `hvisor`): `hvisor` drops an injection that meets the interrupt active in
//!   the guest (taken, not yet EOIed) as hvisor's GICv3 does, and merges one that meets it
//!   pending; `ideal` keeps an injection made while active until the EOI.
//! - `--lose-wakeups N` (default 0, none): every N-th wakeup of the broker is not sent, as
//!   hvisor's unfenced read of `need_wakeup` can lose one (hvisor-abi 2.5).
//! - `--guest`: `demo`, `blk-demo`, `blk-verify`, `hostile`, `irq-window`, `reset-storm`,
//!   `reset-storm-io`, `rounds`,
//!   `dead-device`, `queue-stop`, `bench`, `net-verify`,
//!   `net-bench`, `console-verify`, `console-bench`, `linux-boot`, `linux-blk`, `linux-net`,
//!   `linux-console` or `linux-bench`
//!   (below).
//! - `--zone-guest ZONE=WORKLOAD` (repeatable): that zone runs WORKLOAD instead of `--guest`
//!   (not a linux one), at the same time as the others: a busy neighbour beside a benchmark.
//! - `--depths`, `--depth-secs`, `--depth-block` (default 1,4,16; 2 s; 4096 bytes): what
//!   `depth-bench` measures: random reads of that size at each depth (1 to 64), reported per
//!   depth in the device's `depths` (`depth`, `block_bytes`, `ops`, `seconds`, `iops`). Depths
//!   up to 16 use the stock driver (its queue holds 16), as they always have, so their figures
//!   stay comparable; deeper ones our own driver with a queue of 256 (VERSION_1, RO and
//!   EVENT_IDX when offered, no indirect descriptors). Before the depths, 200000 MagicValue
//!   reads are timed into its `sync_read` (as `bench`'s). Each read must end with status OK;
//!   `--depth-verify` also compares every read with the image file (adding to the device's
//!   `verified_bytes`), which costs time beside each read.
//! - `--rounds-dir DIR`: where `rounds` finds its go and end files and writes its done files.
//! - `--repeat-until FILE`: `blk-verify` runs again and again (each run reading the disk into
//!   a fresh shadow) until FILE exists.
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
//! - `--resume-when FILE`: `queue-stop` pauses with its queue stopped until FILE exists.
//! - `--stay`: after the workload, keep serving (interrupts, vCPU state) until the broker
//!   disconnects, then exit with the workload's status.
//! - `--net-guest IP` (default 192.0.2.2), `--net-host IP` (default 192.0.2.1),
//!   `--net-port PORT` (default 7777): the net workloads' IPv4 address of the guest, the host
//!   side of the tap, and the UDP port of the peer there (the guest uses the same number).
//!   Every net device of a run gets the same address, so give a run one net device.
//! - `--net-bench-secs SECS` (default 2): how long `net-bench` measures each figure.
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
//! Each zone's guest handles the devices of its zone that the workload drives: the `blk-*`,
//! `hostile` and `bench` workloads its blk devices, `net-*` its net devices, `console-*` its
//! consoles (sections below); `demo` all of them, visibly: the blk demo below, an ARP and three
//! pings of the host on a net device, a greeting on a console. `linux-*` guests are User-Mode
//! Linux (see `linux`).
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
//! - `reset-storm`: per blk device, 3000 initialisations from reset to DRIVER_OK, each with
//!   8 config-space writes; `hvisor-sim: zone Z blk@0xADDR: 3000 reset cycles done`; then a
//!   shorter `blk-verify`. `reset-storm-io`: the same, every other initialisation with a
//!   sector read and then the queue taken out of use (QueueReady 0) before the reset.
//! - `rounds`: per blk device, a zone as `hvisor zone start` and `shutdown` make it: round N
//!   starts once `DIR/zone<Z>-go<N>` exists (`DIR/zone<Z>-end` ends the workload). The
//!   device is reset and initialised from scratch, the last passed round's sector must still
//!   hold its pattern, round N's is written and read back; the device is left running (a shutdown
//!   resets nothing), and `DIR/zone<Z>-done<N>` says `ok` or `error: WHY`. Check `rounds`
//!   fails if any round did. Accesses while the zone is not served read 0, so a round then
//!   fails rather than hangs.
//! - `queue-stop`: per blk device, one initialisation, a sector read, queue 0 taken out of
//!   use (QueueReady 0); `hvisor-sim: zone Z blk@0xADDR: queue 0 stopped`; then, once the
//!   file `--resume-when FILE` names exists, the stopped queue's last chain offered again
//!   and notified, a reset and a shorter `blk-verify`; check `stopped_queue_left_alone`
//!   fails if anything moved that queue's used index.
//! - `dead-device`: per blk device, one initialisation (for a test whose worker dies at
//!   DRIVER_OK), a wait of up to 30 s for DEVICE_NEEDS_RESET, a reset and a second
//!   initialisation: NEEDS_RESET must stay set and DRIVER_OK be refused.
//! - `bench`: on the first blk device only: 200000 (`--bench-reads N`) MagicValue reads
//!   (mean, p50, p99 in us),
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
//!   also uses the first disk's ext4 file system (made on the host) or else makes ext2 there
//!   (`mke2fs`), writes six files (one of 8 MiB), syncs, unmounts, drops caches, remounts
//!   read-only and checks every SHA-256 (likewise on any disk after the second); on the second disk
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
//!   "hypervisor": { "requests": 0, "wakeups": 0, "lost_wakeups": 0, "finish_signals": 0,
//!                   "interrupts": 0, "merged_interrupts": 0, "dropped_interrupts": 0,
//!                   "stray_interrupts": 0, "gic": "hvisor" | "ideal" },
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
//!                          "baseline_iops": 0.0, "baseline_mb_per_s": 0.0, "ratio": 0.0,
//!                          "depth": 1, "interrupts_per_op": 1.0, "injections_per_op": 1.0 },
//!     "randread_4k_qd16": { ...same fields... }, "seqread_128k": { ...same fields... } },
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
//!
//! # Console workloads
//!
//! `console-verify` and `console-bench` drive every console device of each zone and need a
//! host program on the pty (the broker logs `zone <id> console: /dev/pts/N`, plus
//! ` (linked at PATH)` with `pty_link`). Guest and host take turns on the console itself; all
//! lines end in `\n`, and a transfer `HVC <VERB> <len> <seed>` is followed by, or answered
//! with, `len` bytes of the pattern of `seed`: the little-endian bytes of the splitmix64
//! stream started at `seed` (state += 0x9e3779b97f4a7c15; z = state;
//! z = (z ^ z >> 30) * 0xbf58476d1ce4e5b9; z = (z ^ z >> 27) * 0x94d049bb133111eb;
//! output z ^ z >> 31; arithmetic mod 2^64), 8 bytes per step. The host answers a guest transfer with
//! `HVC GOT <len> ok`, or `HVC GOT <len> bad@<offset of the first wrong byte>`.
//!
//! `console-verify`, in order:
//! 1. The stock `VirtIOConsole` (it negotiates SIZE, INDIRECT_DESC, EVENT_IDX and VERSION_1
//!    when offered) reads the size (check `size_stock`: cols x rows of the JSON, 80x25 by
//!    default) and writes `hvisor-console-verify hello <cols>x<rows>`.
//! 2. Our own driver resets and re-initialises the device (checks `features`: VERSION_1 and
//!    SIZE offered, MULTIPORT and EMERG_WRITE not; `config_space`: cols, rows,
//!    max_nr_ports = 1), then, with up to 256 chains of 1 byte to 16 KiB in one to three
//!    parts in flight:
//! 3. `HVC TX 1048576 <seed>` + the bytes; the host reads them as fast as it can and answers
//!    (check `tx_1mib`).
//! 4. `HVC SLOWTX 1048576 <seed>` + the bytes; the host reads them slowly (the test: 1 KiB
//!    reads 1 ms apart, and no read for 0.5 s half-way) and answers (`tx_1mib_slow_reader`).
//! 5. `HVC RX 1048576 <seed>`: the host writes the bytes at once; the guest offers no receive
//!    buffer for 300 ms first, then reads them and compares them itself (`rx_1mib`).
//! 6. `HVC DETACH`: the host writes `HVC DETACHING` and closes the pty; the guest then sends
//!    `HVC AFTER 262144 <seed>` + the bytes, which wait while nobody reads. The host reopens
//!    the pty (the test: after 0.7 s, through `pty_link` when there is one), reads the line
//!    and the bytes, and answers (`detach_reattach`).
//! 7. `HVC IDLE`: the guest waits for input with a receive buffer offered; the host waits as
//!    long as it likes (the test measures the worker's CPU time meanwhile), then writes
//!    `HVC BYE` (`idle_wakeup`). Check `interrupts`: no completion was found without its
//!    interrupt. Last, the guest writes `HVC DONE`.
//!
//! `console-bench` (our driver only): `HVC BENCH-TX <len> <seed>` + 64 MiB in 16 KiB chains,
//! a full queue in flight, timed until the device has completed them; the host answers as
//! above. Then `HVC BENCH-RX <len> <seed>`: the host writes the bytes, received into 4 KiB
//! buffers (a full queue offered) and compared; timed from the request to the last byte.
//! Last `HVC DONE`. The same bytes are then copied through a pty pair of the simulator's own
//! (a writer thread and a reader, 64 KiB at a time, raw mode) each way, and a table of MB/s
//! (through the stack, pty copy, ratio) is printed. The figures are in the details of checks
//! `bench_guest_to_host` and `bench_host_to_guest`:
//! `mb_per_s=<x> baseline_mb_per_s=<y> ratio=<x/y>`.
//!
//! # Net workloads
//!
//! `net-verify` and `net-bench` drive every net device of each zone and need the tap's host
//! side to have `--net-host` and a peer program listening there on `--net-port` (UDP). The
//! guest runs an IPv4 stack of our own on top of the driver, which answers ARP requests for
//! its address and ICMP echo requests by itself; the peer protocol (one message per datagram,
//! DATA whose length and bytes both sides derive from a seed) is described in
//! `src/guest/net.rs`.
//!
//! `net-verify`, first with the stock `VirtIONetRaw` (it negotiates VERSION_1, MAC, STATUS,
//! EVENT_IDX and INDIRECT_DESC; receive buffers of MTU + 26 bytes, at least 1526):
//! 1. `mac`: the driver's MAC is the configured one. `arp_resolves_host`: an ARP probe
//!    (sender address 0.0.0.0, so the host learns nothing) is answered with the tap's MAC.
//!    `arp_answers_host`: to answer the guest's HELLO, the host had to ask for the guest's
//!    address, and the guest's answer got the HELLO answer through.
//! 2. `icmp_echo_to_host`: echo requests of 0, 56, 1000 and MTU - 28 bytes (an IP packet at
//!    the MTU) are answered by the host kernel byte for byte. `icmp_echo_from_host`: the peer
//!    pings the guest three times with 56 and with MTU - 28 bytes; every reply matches.
//! 3. `no_rx_buffers`: the guest stops offering receive buffers and has a burst of datagrams
//!    fill the ones offered; then, with none offered at all, it asks for a burst of 300
//!    datagrams of up to 400 bytes and waits 0.5 s. All 300 must then arrive in order and
//!    intact, every one stamped by the peer before the guest offered buffers again.
//! 4. `bulk_guest_to_host`, `bulk_host_to_guest`: 3000 datagrams of 16 to MTU - 28 bytes each
//!    way, at most 192 beyond the receiver's acknowledgements; the receiver checks every byte,
//!    the order and the UDP checksum. `mtu_guest_to_host`, `mtu_host_to_guest`: 300 each way
//!    at exactly MTU - 28 bytes.
//! 5. `rx_headers`: every received 12-byte header had num_buffers 1 and no flags.
//!
//! Then the device is reset and our own driver takes it: VERSION_1, MAC, STATUS, MTU and
//! MRG_RXBUF, no EVENT_IDX (so the ring flags suppress notifications), transmit chains of two
//! descriptors (header, frame) and receive buffers of 512 bytes, so a frame at the MTU spans
//! several. Checks `own_features`, `own_config_space` (mac, status LINK_UP,
//! max_virtqueue_pairs 1, mtu as configured), the steps above as `own_arp_resolves_host`,
//! `own_icmp_echo_*`, `own_bulk_*` (1000 datagrams each way), `own_mtu_*` (200) and
//! `own_no_rx_buffers` (up to MTU - 28 bytes), and `own_mergeable_rx`: frames took up to
//! ceil((MTU + 26) / 512) buffers, with num_buffers right in every first header.
//!
//! Last, our driver again with MAC and STATUS only, as a guest without VERSION_1 (RuxOS):
//! the 10-byte legacy header on both sides, `legacy_guest_to_host` and
//! `legacy_host_to_guest` (300 datagrams each way) and `legacy_header`.
//!
//! `net-bench` (the stock driver): for `--net-bench-secs` each, the guest sends DATA of
//! 1472 bytes (1514-byte frames; less with a smaller MTU) to the peer as fast as the ring
//! takes them, then has the peer send it the same with at most 192 beyond its
//! acknowledgements; then both again with 18-byte datagrams (60-byte frames). Each figure is
//! frames per second between the first and last frame the receiver saw. The peer's baseline
//! (BASELINE: the same frames on a bare tap, measured by the harness) is printed beside it
//! as a table, and each figure is the detail of a check `bench_guest_to_host_big`,
//! `bench_host_to_guest_big`, `bench_guest_to_host_small`, `bench_host_to_guest_small`:
//! `frame_bytes=<n> frames_per_s=<x> mb_per_s=<x> baseline_frames_per_s=<y>
//! baseline_mb_per_s=<y> ratio=<x/y> lost=<n>`.

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
