//! Benchmark of virtio-net through the whole stack (not a timed test), in a network namespace
//! of its own: the simulator's `net-bench` guest against the broker and the net worker, with
//! the peer on the tap's host side, then the resident memory of both processes.
//!
//! The baseline is measured first, in the same run and namespace, on a second tap that this
//! program opens itself (same flags and 12-byte header as the broker's): the same frames
//! written into it and read out of it directly, against the same peer loops. So the ratio is
//! what the virtio path (guest driver, rings, kicks, worker, interrupts) costs over the tap
//! itself. Build with `--release` first:
//! `cargo build --release --workspace --bins && target/release/hvisor-net-bench [SECS]`.

#[path = "../../tests/net/peer.rs"]
mod peer;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hvisor_tests::*;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::json;

use peer::*;

const TAP: &str = "hvtap0";
const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const GUEST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PORT: u16 = 7777;
/// The baseline's tap, its host address and the made-up guest behind it.
const BASE_TAP: &str = "hvbase0";
const BASE_TAP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const BASE_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const BASE_GUEST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const BASE_GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
/// As the guest: DATA beyond the last ACK, and an ACK every so many.
const WINDOW: u32 = 192;
const ACK_EVERY: u32 = 32;
const VNET_HDR: usize = 12;

nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_ptr_bad!(
    tunsetvnethdrsz,
    nix::request_code_write!(b'T', 216, std::mem::size_of::<libc::c_int>()),
    libc::c_int
);

/// Opens (creating) tap `name` as the broker does: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, with
/// the 12-byte header a VERSION_1 guest gets.
fn open_tap(name: &str) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .context("open /dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid empty request.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads one ifreq, which lives on our stack for the call.
    unsafe { tunsetiff(file.as_raw_fd(), &req) }.context("TUNSETIFF")?;
    let len: libc::c_int = VNET_HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
    unsafe { tunsetvnethdrsz(file.as_raw_fd(), &len) }.context("TUNSETVNETHDRSZ")?;
    Ok(file)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Header and frame as the guest's benchmark sends them: the datagram from the made-up guest
/// to the peer, no UDP checksum.
fn base_frame(datagram: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR];
    f.extend_from_slice(&BASE_TAP_MAC);
    f.extend_from_slice(&BASE_GUEST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + datagram.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&BASE_GUEST.octets());
    ip.extend_from_slice(&BASE_HOST.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&PORT.to_be_bytes());
    f.extend_from_slice(&((8 + datagram.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(datagram);
    f
}

/// Guest to host on the bare tap: frames written for `secs`, counted by the peer's sink.
fn base_tx(tap: &File, sock: &UdpSocket, s: Stream, secs: f64) -> Result<f64> {
    let stats = std::thread::scope(|scope| {
        let writer = scope.spawn(|| -> Result<()> {
            let mut tap = tap.try_clone()?;
            let mut frame = base_frame(&s.datagram(0, false));
            let at = VNET_HDR + UDP_OVERHEAD + 4;
            let start = Instant::now();
            let mut seq = 0u32;
            while seq % 64 != 0 || start.elapsed().as_secs_f64() < secs {
                frame[at..at + 4].copy_from_slice(&seq.to_le_bytes());
                // The tap takes a frame or refuses it; a refusal is a loss, like the guest's.
                let _ = tap.write(&frame);
                seq += 1;
            }
            let end = Hdr::new(op::SINK_END, s.id, seq).encode(&[]);
            tap.write_all(&base_frame(&end))?;
            Ok(())
        });
        let stats = sink_loop(sock, s, false, 0, |_| Ok(()));
        writer.join().expect("writer thread")?;
        stats
    })?;
    Ok(stats.frames_per_s())
}

/// Host to guest on the bare tap: the peer's source sends to the made-up guest, a reader
/// takes the frames out of the tap and acknowledges as the guest would.
fn base_rx(tap: &File, sock: &UdpSocket, s: Stream, secs: f64) -> Result<f64> {
    let acks = Arc::new(SharedCount::default());
    let dst = SocketAddr::V4(SocketAddrV4::new(BASE_GUEST, PORT));
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| -> Result<f64> {
            let mut tap = tap.try_clone()?;
            let mut buf = vec![0u8; 65536];
            let (mut n, mut first, mut last) = (0u32, None, Instant::now());
            loop {
                let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(10_000u16))? == 0 {
                    bail!("no frame from the source for 10 s after {n}");
                }
                let len = tap.read(&mut buf)?;
                let Some(h) = buf
                    .get(VNET_HDR + UDP_OVERHEAD..len)
                    .and_then(Hdr::parse)
                    .filter(|h| h.stream == s.id)
                else {
                    continue;
                };
                match h.op {
                    op::DATA => {
                        let now = Instant::now();
                        first.get_or_insert(now);
                        last = now;
                        n += 1;
                        if n % ACK_EVERY == 0 {
                            acks.set(n);
                        }
                    }
                    op::END => {
                        let span = last.duration_since(first.unwrap_or(last)).as_secs_f64();
                        return Ok(if span > 0.0 {
                            f64::from(n - 1) / span
                        } else {
                            0.0
                        });
                    }
                    _ => {}
                }
            }
        });
        let spec = SourceSpec {
            stream: s,
            count: 0,
            duration: Duration::from_secs_f64(secs),
            window: WINDOW,
            fill: false,
        };
        let mut seen = 0;
        let sent = source_loop(sock, dst, spec, |wait| {
            seen = acks.get(seen, wait);
            Ok(seen)
        })?;
        sock.send_to(&Hdr::new(op::END, s.id, sent).encode(&[]), dst)?;
        reader.join().expect("reader thread")
    })
}

/// The four baseline figures, in frames per second.
fn baseline(ns: &Netns, secs: f64) -> Result<Baseline> {
    let tap = open_tap(BASE_TAP)?;
    let mac = BASE_TAP_MAC.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&["link", "set", BASE_TAP, "address", &mac])?;
    ns.host_side(BASE_TAP, &format!("{BASE_HOST}/24"))?;
    let guest_mac = BASE_GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&[
        "neigh",
        "replace",
        &BASE_GUEST.to_string(),
        "lladdr",
        &guest_mac,
        "dev",
        BASE_TAP,
        "nud",
        "permanent",
    ])?;
    let sock = UdpSocket::bind(SocketAddrV4::new(BASE_HOST, PORT))?;
    big_buffers(&sock);
    let mut out = [0.0; 4];
    for (i, payload) in [1472u16, 60 - UDP_OVERHEAD as u16].into_iter().enumerate() {
        let s = |id| Stream {
            id,
            seed: 0,
            min: payload,
            max: payload,
        };
        out[2 * i] = base_tx(&tap, &sock, s(100 + 2 * i as u16), secs)?;
        out[2 * i + 1] = base_rx(&tap, &sock, s(101 + 2 * i as u16), secs)?;
    }
    Ok(out)
}

fn main() -> Result<()> {
    if let Some(why) = skip_reason() {
        bail!("cannot run: {why}");
    }
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2.0);
    let ns = Netns::create("bench")?;
    ns.enter()?;

    println!("baseline: a bare tap, {secs:.1} s per figure");
    let base = baseline(&ns, secs)?;
    for (name, fps) in [
        "guest -> host, 1514-byte frames",
        "host -> guest, 1514-byte frames",
        "guest -> host, 60-byte frames",
        "host -> guest, 60-byte frames",
    ]
    .iter()
    .zip(base)
    {
        println!("  {name:<34} {fps:>12.0} frames/s");
    }
    println!();

    let s = Scratch::new();
    let cfg = s.write_json(
        "net.json",
        &json!({ "zones": [{
            "id": 1,
            "memory_region": [{ "zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000", "size": "0x10000000" }],
            "devices": [{ "type": "net", "addr": "0xa003600", "len": "0x200", "irq": 75, "tap": TAP,
                          "mac": ["0x02", "0x00", "0x00", "0x00", "0x01", "0x01"], "status": "enable" }]
        }]}),
    );
    let go = s.path("go");
    let run = SimRun::new(&cfg, "net-bench")
        .staying()
        .wait_for(&go)
        .timeout(300)
        .net(HOST, GUEST, PORT)
        .args(["--net-bench-secs", &secs.to_string()]);
    let mut stack = Stack::start(&s, run, &[])?;
    ns.wait_for_link(TAP, Duration::from_secs(10))?;
    ns.host_side(TAP, &format!("{HOST}/24"))?;
    let peer = Peer::start(SocketAddrV4::new(HOST, PORT))?;
    *peer.baseline.lock().unwrap() = base;
    std::fs::write(&go, b"")?;
    let report = stack.wait_report(Duration::from_secs(300))?;
    let broker = stack.broker.pid();
    let workers = children(broker);
    println!("{}", stack.sim.text());
    println!();
    print_memory(broker);
    // The worker's own cost, whatever the machine's noise does to the rates above.
    let frames = ["writes", "reads"]
        .iter()
        .filter_map(|k| report["zones"][0]["devices"][0][k].as_u64())
        .sum::<u64>();
    for w in &workers {
        let secs = cpu_seconds(*w).unwrap_or(0.0);
        println!(
            "worker CPU time: {secs:.2} s for {frames} frames moved, {:.2} us per frame",
            secs * 1e6 / frames.max(1) as f64
        );
    }
    let st = stack.stop_broker()?;
    peer.stop()?;
    if !st.success() {
        bail!("broker exited with {st}:\n{}", stack.diagnostics());
    }
    let failed = failed_checks(&report);
    if !failed.is_empty() {
        bail!("bench checks failed: {failed:?}");
    }
    Ok(())
}
