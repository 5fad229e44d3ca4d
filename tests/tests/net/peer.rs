//! The host end of the net workloads, shared by the net tests and `hvisor-net-bench`: a
//! network namespace of their own, and the peer that answers the simulator's net guests there
//! (the protocol is described in `sim/src/guest/net.rs`; its wire format is the guest's own,
//! `hvisor_sim::guest::net::wire`).

#![allow(dead_code)] // each user takes what it needs

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{setsockopt, sockopt};

/// Why the net tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the `ip` command (iproute2) is missing".into()),
    }
}

/// A network namespace of our own, deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(what: &str) -> Result<Netns> {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "hvb-{what}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Moves the calling thread into the namespace; processes and threads it starts from
    /// now on live there too.
    pub fn enter(&self) -> Result<()> {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns into the test namespace")?;
        Ok(())
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Waits until interface `dev` exists.
    pub fn wait_for_link(&self, dev: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.ip(&["link", "show", dev]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "{dev} did not appear in namespace {} within {timeout:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Gives `dev` its host address and brings it up; IPv6 is turned off on it so that no
    /// router solicitations or DAD probes mix into the guest's traffic, and the queue of
    /// frames waiting for the guest is made longer than the tap's default of 500.
    pub fn host_side(&self, dev: &str, cidr: &str) -> Result<()> {
        // Written from a thread inside the namespace: /proc/sys/net is per namespace.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
        self.ip(&["addr", "add", cidr, "dev", dev])?;
        self.ip(&["link", "set", dev, "txqueuelen", "1000", "up"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("removing network namespace {}: {e:#}", self.name);
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// User plus system CPU time of a process, from /proc.
pub fn cpu_seconds(pid: nix::unistd::Pid) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: utime and stime are fields 14 and 15 of the line (man 5 proc).
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / hz.max(1) as f64)
}

// ---- the wire format: the guest's own (sim/src/guest/net/wire.rs) ----

#[allow(unused_imports)] // the benchmark builds frames itself
pub use hvisor_sim::guest::net::wire::UDP_OVERHEAD;
pub use hvisor_sim::guest::net::wire::{data_len, fill_body, now_ns, op, Fields, MSG_HDR};

/// Header fields of a message.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hdr {
    pub op: u8,
    pub stream: u16,
    pub seq: u32,
    pub stamp: u64,
}

impl Hdr {
    pub fn new(op: u8, stream: u16, seq: u32) -> Hdr {
        Hdr {
            op,
            stream,
            seq,
            stamp: 0,
        }
    }

    pub fn parse(d: &[u8]) -> Option<Hdr> {
        (d.len() >= MSG_HDR).then(|| Hdr {
            op: d[0],
            stream: u16::from_le_bytes([d[2], d[3]]),
            seq: u32::from_le_bytes([d[4], d[5], d[6], d[7]]),
            stamp: u64::from_le_bytes(d[8..16].try_into().unwrap()),
        })
    }

    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut d = Vec::with_capacity(MSG_HDR + body.len());
        self.write(&mut d);
        d.extend_from_slice(body);
        d
    }

    fn write(&self, d: &mut Vec<u8>) {
        d.extend_from_slice(&[self.op, 0]);
        d.extend_from_slice(&self.stream.to_le_bytes());
        d.extend_from_slice(&self.seq.to_le_bytes());
        d.extend_from_slice(&self.stamp.to_le_bytes());
    }
}

/// The shape of a DATA stream.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    pub id: u16,
    pub seed: u64,
    pub min: u16,
    pub max: u16,
}

impl Stream {
    /// DATA datagram `seq`, with its pattern when `fill`.
    pub fn datagram(&self, seq: u32, fill: bool) -> Vec<u8> {
        let len = data_len(self.seed, self.id, seq, self.min, self.max);
        let mut d = Hdr::new(op::DATA, self.id, seq).encode(&[]);
        d.resize(len, 0);
        if fill {
            fill_body(self.seed, self.id, seq, &mut d[MSG_HDR..]);
        }
        d
    }
}

// ---- the measuring loops, also used on a bare tap for the benchmark's baseline ----

/// How long a loop waits for the other side before it gives up.
const IDLE: Duration = Duration::from_secs(10);

/// What a sink saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct SinkStats {
    pub received: u32,
    pub bad: u32,
    pub gaps: u32,
    pub bytes: u64,
    pub span_ns: u64,
}

impl SinkStats {
    pub fn frames_per_s(&self) -> f64 {
        if self.span_ns == 0 {
            return 0.0;
        }
        f64::from(self.received.saturating_sub(1)) / (self.span_ns as f64 / 1e9)
    }

    fn body(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.received.to_le_bytes());
        b.extend_from_slice(&self.bad.to_le_bytes());
        b.extend_from_slice(&self.gaps.to_le_bytes());
        b.extend_from_slice(&self.bytes.to_le_bytes());
        b.extend_from_slice(&self.span_ns.to_le_bytes());
        b
    }
}

/// Receives DATA of `s` on `sock` until SINK_END (or `count` of them and SINK_END), checking
/// every byte when `verify`; `ack(received)` is called every `ack_every`.
pub fn sink_loop(
    sock: &UdpSocket,
    s: Stream,
    verify: bool,
    ack_every: u16,
    mut ack: impl FnMut(u32) -> io::Result<()>,
) -> Result<SinkStats> {
    let mut st = SinkStats::default();
    let mut buf = vec![0u8; 65536];
    let mut want = Vec::new();
    let mut expected = 0u32;
    let mut first = None;
    let mut last = Instant::now();
    sock.set_read_timeout(Some(IDLE))?;
    loop {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "sink {}: nothing for {IDLE:?} after {} datagrams",
                    s.id,
                    st.received
                )
            }
            Err(e) => return Err(e.into()),
        };
        let d = &buf[..n];
        let Some(h) = Hdr::parse(d) else { continue };
        if h.stream != s.id {
            continue;
        }
        match h.op {
            op::DATA => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                st.received += 1;
                st.bytes += n as u64;
                if h.seq != expected {
                    st.gaps += 1;
                }
                expected = h.seq.wrapping_add(1);
                if verify {
                    let len = data_len(s.seed, s.id, h.seq, s.min, s.max);
                    want.resize(len - MSG_HDR, 0);
                    fill_body(s.seed, s.id, h.seq, &mut want);
                    if n != len || d[MSG_HDR..] != want[..] {
                        st.bad += 1;
                    }
                }
                if ack_every > 0 && st.received % u32::from(ack_every) == 0 {
                    ack(st.received)?;
                }
            }
            op::SINK_END => {
                st.span_ns = first.map_or(0, |f| last.duration_since(f).as_nanos() as u64);
                return Ok(st);
            }
            _ => {}
        }
    }
}

/// What a source is asked for.
#[derive(Debug, Clone, Copy)]
pub struct SourceSpec {
    pub stream: Stream,
    /// 0: send for `duration`.
    pub count: u32,
    pub duration: Duration,
    pub window: u32,
    pub fill: bool,
}

/// Sends DATA of `spec` to `dst`, never more than `window` beyond what `acked(wait)` reports
/// (with `wait`, it blocks until the count moves or it gives up). Returns how many were sent.
pub fn source_loop(
    sock: &UdpSocket,
    dst: SocketAddr,
    spec: SourceSpec,
    mut acked: impl FnMut(bool) -> Result<u32>,
) -> Result<u32> {
    let s = spec.stream;
    let start = Instant::now();
    let mut sent = 0u32;
    let mut got = 0u32;
    // Unfilled datagrams are all alike but for their seq: one buffer, patched.
    let mut template = s.datagram(0, false);
    loop {
        let more = if spec.count > 0 {
            sent < spec.count
        } else {
            sent % 64 != 0 || start.elapsed() < spec.duration
        };
        if !more {
            return Ok(sent);
        }
        if sent - got >= spec.window {
            got = got.max(acked(true)?);
            continue;
        }
        if spec.fill {
            sock.send_to(&s.datagram(sent, true), dst)?;
        } else {
            template[4..8].copy_from_slice(&sent.to_le_bytes());
            template.resize(data_len(s.seed, s.id, sent, s.min, s.max), 0);
            sock.send_to(&template, dst)?;
        }
        sent += 1;
        if sent % 16 == 0 {
            got = got.max(acked(false)?);
        }
    }
}

// ---- the peer ----

/// Frames per second on a bare tap: guest->host and host->guest, 1514-byte then 60-byte.
pub type Baseline = [f64; 4];

/// The peer: one thread serving the guest's requests on a UDP socket.
pub struct Peer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    pub baseline: Arc<Mutex<Baseline>>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    /// Binds `addr` (in the calling thread's namespace) and serves until stopped.
    pub fn start(addr: SocketAddrV4) -> Result<Peer> {
        let sock = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        big_buffers(&sock);
        let stop = Arc::new(AtomicBool::new(false));
        let baseline = Arc::new(Mutex::new([0.0; 4]));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, b, l) = (stop.clone(), baseline.clone(), log.clone());
        let thread = std::thread::Builder::new()
            .name("net-peer".into())
            .spawn(move || serve(sock, s, b, l))?;
        Ok(Peer {
            stop,
            thread: Some(thread),
            baseline,
            log,
        })
    }

    /// Stops the peer; an error is what ended it early.
    pub fn stop(mut self) -> Result<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        let r = self.thread.take().map(|t| t.join());
        let log = self.log.lock().unwrap().clone();
        match r {
            Some(Ok(Err(e))) => Err(e.context(log.join("\n"))),
            Some(Err(_)) => bail!("the peer thread panicked"),
            _ => Ok(log),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Socket buffers large enough for a window of datagrams at the MTU (root may exceed
/// `rmem_max`; if not, the default has to do).
pub fn big_buffers(sock: &UdpSocket) {
    let _ = setsockopt(sock, sockopt::RcvBufForce, &(8 << 20));
    let _ = setsockopt(sock, sockopt::SndBufForce, &(8 << 20));
}

fn serve(
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
    baseline: Arc<Mutex<Baseline>>,
    log: Arc<Mutex<Vec<String>>>,
) -> Result<()> {
    let say = |m: String| log.lock().unwrap().push(m);
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        let Some(h) = Hdr::parse(&buf[..n]) else {
            continue;
        };
        let body = buf[MSG_HDR..n].to_vec();
        let mut f = Fields(&body);
        let reply = |h: Hdr, body: &[u8]| sock.send_to(&h.encode(body), from).map(drop);
        match h.op {
            op::HELLO => reply(Hdr::new(op::HELLO, h.stream, h.seq), &[])?,
            op::SINK => {
                let (count, min, max, seed) = (f.u32(), f.u16(), f.u16(), f.u64());
                let (verify, ack_every) = (f.u16() != 0, f.u16());
                let s = Stream {
                    id: h.stream,
                    seed,
                    min,
                    max,
                };
                reply(Hdr::new(op::SINK, h.stream, 0), &[])?;
                let st = sink_loop(&sock, s, verify, ack_every, |n| {
                    reply(Hdr::new(op::ACK, s.id, n), &[])
                })?;
                say(format!(
                    "sink {}: {st:?} (count {count}, {min}..{max} bytes)",
                    s.id
                ));
                reply(Hdr::new(op::RESULT, s.id, 0), &st.body())?;
            }
            op::SOURCE => {
                let (count, ms, seed, min, max) = (f.u32(), f.u32(), f.u64(), f.u16(), f.u16());
                let (window, _ack_every) = (f.u16(), f.u16());
                let s = Stream {
                    id: h.stream,
                    seed,
                    min,
                    max,
                };
                let spec = SourceSpec {
                    stream: s,
                    count,
                    duration: Duration::from_millis(ms.into()),
                    window: window.max(1).into(),
                    // The benchmark (count 0) measures transport, not pattern making.
                    fill: count > 0,
                };
                let sent = source_loop(&sock, from, spec, |wait| guest_acks(&sock, s.id, wait))?;
                let mut end = Hdr::new(op::END, s.id, sent);
                end.stamp = now_ns();
                reply(end, &[])?;
                say(format!("source {}: {sent} sent", s.id));
            }
            op::BURST => {
                let (count, min, max, seed) = (f.u32(), f.u16(), f.u16(), f.u64());
                let s = Stream {
                    id: h.stream,
                    seed,
                    min,
                    max,
                };
                for seq in 0..count {
                    let mut d = s.datagram(seq, true);
                    d[8..16].copy_from_slice(&now_ns().to_le_bytes());
                    sock.send_to(&d, from)?;
                }
                let mut end = Hdr::new(op::END, s.id, count);
                end.stamp = now_ns();
                reply(end, &[])?;
                say(format!("burst {}: {count} sent", s.id));
            }
            op::PING_ME => {
                let (count, len) = (f.u32(), f.u16());
                let SocketAddr::V4(guest) = from else {
                    continue;
                };
                let (replies, matched) = ping(*guest.ip(), count, len.into())?;
                let mut b = replies.to_le_bytes().to_vec();
                b.extend_from_slice(&matched.to_le_bytes());
                reply(Hdr::new(op::PING_RESULT, h.stream, 0), &b)?;
                say(format!(
                    "ping {}: {replies} replies, {matched} matched",
                    guest.ip()
                ));
            }
            op::BASELINE => {
                let b: Vec<u8> = baseline
                    .lock()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_bits().to_le_bytes())
                    .collect();
                reply(Hdr::new(op::BASELINE, h.stream, 0), &b)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The guest's latest ACK count of stream `id` (0 if none came); with `wait`, waits for one.
fn guest_acks(sock: &UdpSocket, id: u16, wait: bool) -> Result<u32> {
    let mut buf = [0u8; 64];
    let mut best = 0;
    let deadline = Instant::now() + IDLE;
    loop {
        let timeout = if wait && best == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("stream {id}: no acknowledgement from the guest for {IDLE:?}");
            }
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::ZERO
        };
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, timeout)? == 0 {
            return Ok(best);
        }
        sock.set_read_timeout(Some(Duration::from_millis(1)))?;
        let Ok(n) = sock.recv(&mut buf) else {
            continue;
        };
        if let Some(h) = Hdr::parse(&buf[..n]) {
            if h.op == op::ACK && h.stream == id {
                best = best.max(h.seq);
            }
        }
    }
}

/// Pings `dst` `count` times with `len`-byte payloads through a raw ICMP socket; returns
/// (replies, replies whose payload matched).
fn ping(dst: Ipv4Addr, count: u32, len: usize) -> Result<(u32, u32)> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    )
    .context("raw ICMP socket")?;
    // std's datagram calls are sendto/recvfrom on any socket: on a raw one the port is
    // ignored and what arrives is the whole IP packet.
    let sock = UdpSocket::from(fd);
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let id = (std::process::id() & 0xffff) as u16;
    let (mut replies, mut matched) = (0, 0);
    let mut buf = vec![0u8; 65536];
    for seq in 0..count as u16 {
        let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ (seq as u8) ^ 0x5a).collect();
        let mut m = vec![8, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(&payload);
        let c = icmp_checksum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        sock.send_to(&m, SocketAddrV4::new(dst, 0))?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let p = &buf[..n];
            let hl = usize::from(p.first().copied().unwrap_or(0) & 0xf) * 4;
            if n < hl + 8 || p[12..16] != dst.octets() {
                continue;
            }
            let icmp = &p[hl..];
            if icmp[0] == 0 && icmp[4..6] == id.to_be_bytes() && icmp[6..8] == seq.to_be_bytes() {
                replies += 1;
                if icmp[8..] == payload[..] && icmp_checksum(icmp) == 0 {
                    matched += 1;
                }
                break;
            }
        }
    }
    Ok((replies, matched))
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A count shared between a reader and a source, with a wakeup when it moves.
#[derive(Default)]
pub struct SharedCount {
    n: Mutex<u32>,
    moved: Condvar,
}

impl SharedCount {
    pub fn set(&self, v: u32) {
        *self.n.lock().unwrap() = v;
        self.moved.notify_all();
    }

    /// The count; with `wait`, once it is above `seen` (or after [`IDLE`]).
    pub fn get(&self, seen: u32, wait: bool) -> u32 {
        let g = self.n.lock().unwrap();
        if !wait {
            return *g;
        }
        *self
            .moved
            .wait_timeout_while(g, IDLE, |n| *n <= seen)
            .unwrap()
            .0
    }
}
