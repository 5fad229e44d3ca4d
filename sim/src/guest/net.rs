//! virtio-net guests: `net-verify` and `net-bench`.
//!
//! The guest has one IPv4 address (`--net-guest`) and talks to the host kernel on the other
//! side of the tap (`--net-host`): ARP and ICMP echo with the kernel itself, and UDP with a
//! peer program that the test or benchmark runs there on `--net-port` (the guest uses the same
//! port number). The guest's stack is our own ([`stack`]), small enough to check every byte.
//!
//! # The peer protocol
//! One datagram per message; a 16-byte header, little-endian: `op` u8, 0 u8, `stream` u16,
//! `seq` u32, `stamp` u64 (wall-clock ns when the peer sent it, else 0), then the body. The
//! guest starts every exchange; answers carry the stream of the request. DATA datagram `seq`
//! of a stream has a length from `min` to `max` bytes and a body of splitmix64 words, both
//! derived from (seed, stream, seq) as [`wire::data_len`] and [`wire::fill_body`] say, so
//! either side can check every byte.
//!
//! | op | from | body | meaning |
//! |---|---|---|---|
//! | 1 HELLO | guest | | answered with HELLO |
//! | 2 SINK | guest | count u32, min u16, max u16, seed u64, verify u16, ack_every u16 | count (0: until SINK_END) DATA follow; answered with SINK, then ACK (seq = DATA received) every `ack_every` |
//! | 3 DATA | both | pattern | |
//! | 4 ACK | both | | seq = DATA received so far |
//! | 5 SINK_END | guest | | answered with RESULT |
//! | 6 RESULT | peer | received u32, bad u32, gaps u32, bytes u64, span_ns u64 | bad: wrong length or bytes; gaps: seq not the one expected; span: first to last DATA |
//! | 7 SOURCE | guest | count u32, ms u32, seed u64, min u16, max u16, window u16, ack_every u16 | the peer sends count DATA (0: for `ms`), at most `window` beyond the guest's last ACK, then END |
//! | 8 END | peer | | seq = DATA sent |
//! | 9 BURST | guest | count u32, min u16, max u16, seed u64 | count DATA at once, stamped, then END |
//! | 10 PING_ME | guest | count u32, len u16 | the peer sends ICMP echo requests of `len` bytes to the guest; answered with PING_RESULT |
//! | 11 PING_RESULT | peer | replies u32, matched u32 | |
//! | 12 BASELINE | both | 4 x f64 bits | frames/s of the same traffic on a bare tap: guest->host and host->guest 1514-byte, then 60-byte frames; 0 when not measured |

mod nic;
mod stack;
/// The wire formats and the peer protocol, shared with the host-side test peer.
pub mod wire;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

use self::nic::{feat, Nic, OwnNic, StockNic, OWN_FEATURES};
use self::stack::{Addrs, Event, Stack};
use self::wire::{op, Body, Fields, Msg, MSG_HDR, UDP_OVERHEAD};
use super::{GuestDev, Rng};
use crate::layout::DevKind;
use crate::report::DeviceReport;
use crate::transport::SimTransport;

/// The simulator's options for the net workloads.
#[derive(Debug, Clone, clap::Args)]
pub struct NetArgs {
    /// IPv4 address of the guest on its net device.
    #[arg(long, default_value = "192.0.2.2")]
    pub net_guest: Ipv4Addr,
    /// IPv4 address of the host side of the tap, where the peer listens.
    #[arg(long, default_value = "192.0.2.1")]
    pub net_host: Ipv4Addr,
    /// UDP port of the peer; the guest uses the same number.
    #[arg(long, default_value_t = 7777)]
    pub net_port: u16,
    /// Seconds each net-bench figure is measured for.
    #[arg(long, default_value_t = 2.0)]
    pub net_bench_secs: f64,
}

impl Default for NetArgs {
    fn default() -> Self {
        NetArgs {
            net_guest: Ipv4Addr::new(192, 0, 2, 2),
            net_host: Ipv4Addr::new(192, 0, 2, 1),
            net_port: 7777,
            net_bench_secs: 2.0,
        }
    }
}

static OPTIONS: OnceLock<NetArgs> = OnceLock::new();

/// Sets the options of the net workloads, once, before the guests start.
pub fn configure(args: NetArgs) {
    let _ = OPTIONS.set(args);
}

fn options() -> NetArgs {
    OPTIONS.get().cloned().unwrap_or_default()
}

/// How long the guest waits for the peer's answer to anything.
const ANSWER: Duration = Duration::from_secs(10);
/// DATA the guest has sent beyond the peer's last ACK, and the peer beyond the guest's: well
/// under the tap's queue (500 frames) and the peer's socket buffer.
const WINDOW: u32 = 192;
const ACK_EVERY: u16 = 32;
/// Receive buffers of the stock phase: one holds a frame at the MTU with its header.
const STOCK_MIN_BUF: usize = 1526;
/// Receive buffers of our own driver: small, so a frame at the MTU spans several.
const OWN_BUF: usize = 512;
/// Frames the host sends while the guest has no receive buffer; more than a ring's worth.
const BURST_FRAMES: u32 = 300;

/// The configured MAC and MTU of the device.
fn configured(g: &GuestDev<'_>) -> Result<([u8; 6], u16)> {
    match g.spec.kind {
        DevKind::Net { mac, mtu, .. } => Ok((mac, mtu)),
        _ => bail!("not a net device"),
    }
}

fn addrs() -> Addrs {
    let o = options();
    Addrs {
        ip: o.net_guest,
        host: o.net_host,
        port: o.net_port,
    }
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A DATA stream's shape.
#[derive(Debug, Clone, Copy)]
struct Stream {
    id: u16,
    seed: u64,
    min: u16,
    max: u16,
}

/// Hands out stream ids, so DATA of an earlier exchange is never taken for a later one.
struct Streams {
    next: u16,
    rng: Rng,
}

impl Streams {
    fn new(seed: u64) -> Self {
        Streams {
            next: 1,
            rng: Rng::new(seed),
        }
    }

    fn next(&mut self, min: usize, max: usize) -> Stream {
        self.next = self.next.wrapping_add(1);
        Stream {
            id: self.next,
            seed: self.rng.next_u64(),
            min: min.max(MSG_HDR) as u16,
            max: max.max(MSG_HDR) as u16,
        }
    }
}

/// What the peer reports of a guest-to-host stream.
#[derive(Debug, Default)]
struct SinkResult {
    /// Sent by the guest.
    sent: u32,
    received: u32,
    bad: u32,
    gaps: u32,
    bytes: u64,
    span_ns: u64,
}

/// What the guest saw of a host-to-guest stream.
#[derive(Debug, Default)]
struct SourceResult {
    sent: u32,
    received: u32,
    bad: u32,
    gaps: u32,
    bytes: u64,
    /// First to last DATA.
    span: Duration,
    /// The latest peer stamp seen, wall-clock ns.
    last_stamp: u64,
    problems: Vec<String>,
}

impl SourceResult {
    fn problem(&mut self, what: String) {
        if self.problems.len() < 4 {
            self.problems.push(what);
        }
    }

    fn clean(&self) -> bool {
        self.received == self.sent && self.bad == 0 && self.gaps == 0
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{} of {} datagrams ({} bytes) in {:.3} s; {} bad, {} out of sequence",
            self.received,
            self.sent,
            self.bytes,
            self.span.as_secs_f64(),
            self.bad,
            self.gaps
        );
        if !self.problems.is_empty() {
            let _ = write!(s, ": {}", self.problems.join("; "));
        }
        s
    }
}

/// Sends `count` DATA (0: for `duration`) to the peer's sink and returns its RESULT. With
/// `verify`, every datagram is distinct and checksummed and the guest keeps at most
/// [`WINDOW`] beyond the peer's ACKs; without, one checksum-less frame is sent over and over
/// with only its seq changed, as fast as the ring takes it (the benchmark).
fn sink<N: Nic>(
    st: &mut Stack<'_, N>,
    s: Stream,
    count: u32,
    duration: Duration,
    verify: bool,
) -> Result<SinkResult> {
    let ack_every = if verify { ACK_EVERY } else { 0 };
    let body = Body::default()
        .u32(count)
        .u16(s.min)
        .u16(s.max)
        .u64(s.seed)
        .u16(verify as u16)
        .u16(ack_every);
    st.call(&Msg::new(op::SINK, s.id, 0).with(body.0), op::SINK, ANSWER)?;
    let start = Instant::now();
    let mut sent = 0u32;
    let mut acked = 0u32;
    // The benchmark's frame, its seq patched in place.
    let mut template = if verify {
        Vec::new()
    } else {
        st.udp_frame(&wire::data_msg(s.seed, s.id, 0, s.min, s.max), false)?
    };
    loop {
        let more = if count > 0 {
            sent < count
        } else {
            sent % 64 != 0 || start.elapsed() < duration
        };
        if !more {
            break;
        }
        if verify {
            if sent - acked >= WINDOW {
                let deadline = Instant::now() + ANSWER;
                match st.next(deadline)? {
                    Some(Event::Msg { msg, .. }) if msg.op == op::ACK && msg.stream == s.id => {
                        acked = acked.max(msg.seq)
                    }
                    Some(_) => {}
                    None => {
                        bail!("the peer acknowledged {acked} of {sent} datagrams, then nothing")
                    }
                }
                continue;
            }
            st.send_udp(&wire::data_msg(s.seed, s.id, sent, s.min, s.max))?;
            // Take acknowledgements that are already there, without waiting.
            while let Some(e) = st.next(Instant::now())? {
                if let Event::Msg { msg, .. } = e {
                    if msg.op == op::ACK && msg.stream == s.id {
                        acked = acked.max(msg.seq);
                    }
                }
            }
        } else {
            let at = UDP_OVERHEAD + 4;
            template[at..at + 4].copy_from_slice(&sent.to_le_bytes());
            st.send_frame(&template)?;
        }
        sent += 1;
    }
    let r = st.call(&Msg::new(op::SINK_END, s.id, sent), op::RESULT, ANSWER)?;
    let mut f = Fields(&r.body);
    Ok(SinkResult {
        sent,
        received: f.u32(),
        bad: f.u32(),
        gaps: f.u32(),
        bytes: f.u64(),
        span_ns: f.u64(),
    })
}

/// Asks the peer for `count` DATA (0: for `duration`) and receives them, acknowledging every
/// [`ACK_EVERY`]; with `verify`, every byte is checked.
fn source<N: Nic>(
    st: &mut Stack<'_, N>,
    s: Stream,
    count: u32,
    duration: Duration,
    verify: bool,
) -> Result<SourceResult> {
    let body = Body::default()
        .u32(count)
        .u32(duration.as_millis() as u32)
        .u64(s.seed)
        .u16(s.min)
        .u16(s.max)
        .u16(WINDOW as u16)
        .u16(ACK_EVERY);
    st.send_msg(&Msg::new(op::SOURCE, s.id, 0).with(body.0))?;
    receive_stream(st, s, verify, true)
}

/// Receives the DATA of stream `s` up to its END.
fn receive_stream<N: Nic>(
    st: &mut Stack<'_, N>,
    s: Stream,
    verify: bool,
    ack: bool,
) -> Result<SourceResult> {
    let mut r = SourceResult::default();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut expected = 0u32;
    let mut want = Vec::new();
    loop {
        let Some(e) = st.next(Instant::now() + ANSWER)? else {
            bail!(
                "stream {}: nothing from the peer for {ANSWER:?} after {} datagrams",
                s.id,
                r.received
            );
        };
        let Event::Msg { msg, sums_ok } = e else {
            continue;
        };
        if msg.stream != s.id {
            continue;
        }
        r.last_stamp = r.last_stamp.max(msg.stamp);
        match msg.op {
            op::DATA => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                r.received += 1;
                r.bytes += (MSG_HDR + msg.body.len()) as u64;
                if msg.seq != expected {
                    r.gaps += 1;
                    r.problem(format!("datagram {} where {expected} was due", msg.seq));
                }
                expected = msg.seq.wrapping_add(1);
                if verify {
                    let len = wire::data_len(s.seed, s.id, msg.seq, s.min, s.max);
                    want.resize(len.saturating_sub(MSG_HDR), 0);
                    wire::fill_body(s.seed, s.id, msg.seq, &mut want);
                    if !sums_ok || msg.body != want {
                        r.bad += 1;
                        r.problem(format!(
                            "datagram {}: {} bytes{}, {} expected{}",
                            msg.seq,
                            MSG_HDR + msg.body.len(),
                            if sums_ok { "" } else { " with a bad checksum" },
                            len,
                            if msg.body.len() + MSG_HDR == len {
                                " (contents differ)"
                            } else {
                                ""
                            }
                        ));
                    }
                }
                if ack && r.received % u32::from(ACK_EVERY) == 0 {
                    st.send_msg(&Msg::new(op::ACK, s.id, r.received))?;
                }
            }
            op::END => {
                r.sent = msg.seq;
                r.span = last.duration_since(first.unwrap_or(last));
                return Ok(r);
            }
            _ => {}
        }
    }
}

/// Shared by both drivers: ARP, HELLO, ICMP both ways.
fn greet<N: Nic>(
    st: &mut Stack<'_, N>,
    rep: &mut DeviceReport,
    prefix: &str,
    mtu: u16,
) -> Result<()> {
    let a = st.a;
    let start = Instant::now();
    let mac = st.resolve_host(ANSWER)?;
    rep.check(
        &format!("{prefix}arp_resolves_host"),
        true,
        format!(
            "{} is at {} (ARP probe answered in {:.1} ms)",
            a.host,
            mac_str(&mac),
            start.elapsed().as_secs_f64() * 1e3
        ),
    );
    let asked = st.arp_answered;
    let start = Instant::now();
    st.call(&Msg::new(op::HELLO, 1, 0), op::HELLO, ANSWER)?;
    let answered = st.arp_answered - asked;
    // Only the first time: afterwards the host knows our address already.
    if prefix.is_empty() {
        rep.check(
            "arp_answers_host",
            answered > 0,
            format!(
                "the peer answered HELLO in {:.1} ms; to send it, the host asked for {} \
                 {answered} time(s) and got {}",
                start.elapsed().as_secs_f64() * 1e3,
                a.ip,
                mac_str(&st.mac)
            ),
        );
    }

    let sizes = [0usize, 56, 1000, usize::from(mtu) - wire::ICMP_OVERHEAD];
    ping_host(st, rep, prefix, &sizes, mtu)?;

    // Echo from the host kernel, answered by our stack.
    let mut details = Vec::new();
    let mut all = true;
    for (i, len) in [56u16, mtu - wire::ICMP_OVERHEAD as u16]
        .into_iter()
        .enumerate()
    {
        let count = 3;
        let before = st.echo_answered;
        let r = st.call(
            &Msg::new(op::PING_ME, 2 + i as u16, 0).with(Body::default().u32(count).u16(len).0),
            op::PING_RESULT,
            ANSWER,
        )?;
        let mut f = Fields(&r.body);
        let (replies, matched) = (f.u32(), f.u32());
        all &= replies == count && matched == count;
        details.push(format!(
            "{len}-byte: {matched} of {count} matched ({} answered by the guest)",
            st.echo_answered - before
        ));
    }
    rep.check(
        &format!("{prefix}icmp_echo_from_host"),
        all,
        format!("the host pinged {}: {}", a.ip, details.join(", ")),
    );
    Ok(())
}

/// ICMP echo to the host kernel with payloads of `sizes`; one check with the round trips.
fn ping_host<N: Nic>(
    st: &mut Stack<'_, N>,
    rep: &mut DeviceReport,
    prefix: &str,
    sizes: &[usize],
    mtu: u16,
) -> Result<Vec<f64>> {
    let a = st.a;
    let mut ok = 0;
    let mut problems = Vec::new();
    let id = 0x4856;
    let mut rtts = Vec::new();
    for (seq, &len) in sizes.iter().enumerate() {
        let mut payload = vec![0u8; len];
        Rng::new(seq as u64 + 11).fill(&mut payload);
        let start = Instant::now();
        st.send_echo(id, seq as u16, &payload)?;
        let deadline = start + ANSWER;
        loop {
            match st.next(deadline)? {
                Some(Event::EchoReply {
                    src,
                    id: rid,
                    seq: rseq,
                    payload: got,
                    sums_ok,
                }) if src == a.host && rid == id && rseq == seq as u16 => {
                    if got == payload && sums_ok {
                        ok += 1;
                        rtts.push(start.elapsed().as_secs_f64() * 1e3);
                    } else {
                        problems.push(format!("reply {seq} differs"));
                    }
                    break;
                }
                Some(_) => {}
                None => {
                    problems.push(format!("no reply to the {len}-byte echo"));
                    break;
                }
            }
        }
    }
    rep.check(
        &format!("{prefix}icmp_echo_to_host"),
        ok == sizes.len(),
        format!(
            "{ok} of {} echo requests ({sizes:?} bytes; the last makes a {mtu}-byte IP packet) \
             answered byte-exact, round trips {:.2?} ms{}",
            sizes.len(),
            rtts,
            if problems.is_empty() {
                String::new()
            } else {
                format!("; {}", problems.join("; "))
            }
        ),
    );
    Ok(rtts)
}

/// The host sends [`BURST_FRAMES`] while the guest has no receive buffer at all; once the
/// guest posts buffers again, every one of them must arrive, in order and intact.
fn no_buffers<N: Nic>(
    st: &mut Stack<'_, N>,
    rep: &mut DeviceReport,
    name: &str,
    streams: &mut Streams,
    max: usize,
) -> Result<()> {
    // Use up the posted buffers: the host sends as many small datagrams as are posted.
    st.nic.set_refill(false)?;
    let fill = streams.next(MSG_HDR, MSG_HDR);
    let posted = st.nic.rx_posted() as u32;
    let body = Body::default()
        .u32(posted)
        .u16(fill.min)
        .u16(fill.max)
        .u64(fill.seed);
    st.send_msg(&Msg::new(op::BURST, fill.id, 0).with(body.0))?;
    let deadline = Instant::now() + ANSWER;
    while st.nic.rx_posted() > 0 {
        if st.next(deadline)?.is_none() {
            bail!(
                "{} receive buffers still posted after a burst of {posted}",
                st.nic.rx_posted()
            );
        }
    }

    // None posted now. The burst goes out; the frames must wait in the tap.
    let s = streams.next(MSG_HDR, max);
    let body = Body::default()
        .u32(BURST_FRAMES)
        .u16(s.min)
        .u16(s.max)
        .u64(s.seed);
    st.send_msg(&Msg::new(op::BURST, s.id, 0).with(body.0))?;
    std::thread::sleep(Duration::from_millis(500));
    let posted_at = wire::now_ns();
    st.nic.set_refill(true)?;
    let r = receive_stream(st, s, true, false)?;
    let waited_ms = posted_at.saturating_sub(r.last_stamp) as f64 / 1e6;
    let before = r.last_stamp != 0 && r.last_stamp < posted_at;
    rep.check(
        name,
        r.clean() && r.sent == BURST_FRAMES && before,
        format!(
            "the host sent {} frames while the guest had no receive buffer{}; {}",
            r.sent,
            if before {
                format!(" (the last {waited_ms:.0} ms before buffers were posted)")
            } else {
                " (but not all before buffers were posted: the peer was late)".into()
            },
            r.describe()
        ),
    );
    Ok(())
}

/// Guest-to-host and host-to-guest streams, every byte checked; `name` and the byte range.
fn bulk<N: Nic>(
    st: &mut Stack<'_, N>,
    rep: &mut DeviceReport,
    streams: &mut Streams,
    name: &str,
    count: u32,
    (min, max): (usize, usize),
) -> Result<()> {
    let s = streams.next(min, max);
    let start = Instant::now();
    let r = sink(st, s, count, Duration::ZERO, true)?;
    let want: u64 = (0..count)
        .map(|seq| wire::data_len(s.seed, s.id, seq, s.min, s.max) as u64)
        .sum();
    rep.writes += u64::from(r.received);
    let ok = r.received == count && r.bad == 0 && r.gaps == 0 && r.bytes == want;
    if ok {
        rep.verified_bytes += r.bytes;
    }
    rep.check(
        &format!("{name}_guest_to_host"),
        ok,
        format!(
            "the peer received {} of {count} datagrams of {}..{} bytes ({} of {want} bytes) \
             in {:.3} s, {} bad, {} out of sequence",
            r.received,
            s.min,
            s.max,
            r.bytes,
            start.elapsed().as_secs_f64(),
            r.bad,
            r.gaps
        ),
    );

    let s = streams.next(min, max);
    let r = source(st, s, count, Duration::ZERO, true)?;
    rep.reads += u64::from(r.received);
    if r.clean() {
        rep.verified_bytes += r.bytes;
    }
    rep.check(
        &format!("{name}_host_to_guest"),
        r.clean() && r.sent == count,
        r.describe(),
    );
    Ok(())
}

fn stock_phase<H: Hal>(
    g: &mut GuestDev<'_>,
    rep: &mut DeviceReport,
    streams: &mut Streams,
    mtu: u16,
) -> Result<()> {
    let spec = g.spec;
    let (mac, _) = configured(g)?;
    let mut t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    rep.features.device = t.read_device_features();
    let buf = STOCK_MIN_BUF.max(usize::from(mtu) + wire::ETH_HLEN + 12);
    let nic = StockNic::<H>::open(t, buf).context("stock driver initialisation")?;
    rep.features.stock = nic.features;
    let mut st = Stack::new(nic, &mut g.irq, addrs());
    rep.check(
        "mac",
        st.mac == mac,
        format!("VirtIONetRaw::mac_address() = {}", mac_str(&st.mac)),
    );
    greet(&mut st, rep, "", mtu)?;
    no_buffers(&mut st, rep, "no_rx_buffers", streams, 400)?;
    let big = usize::from(mtu) - 28;
    bulk(&mut st, rep, streams, "bulk", 3000, (MSG_HDR, big))?;
    bulk(&mut st, rep, streams, "mtu", 300, (big, big))?;
    let s = st.nic.stats().clone();
    rep.check(
        "rx_headers",
        s.bad_header_count == 0 && st.bad_sums == 0 && st.nic.header_len() == 12,
        format!(
            "{} frames received, {}-byte headers, num_buffers 1 and no flags in every one{}; \
             {} frames with a bad checksum, {} frames not for this guest",
            s.rx_frames,
            st.nic.header_len(),
            if s.bad_headers.is_empty() {
                String::new()
            } else {
                format!(
                    " EXCEPT {}: {}",
                    s.bad_header_count,
                    s.bad_headers.join("; ")
                )
            },
            st.bad_sums,
            st.other_frames
        ),
    );
    Ok(())
}

fn own_phase<H: Hal>(
    g: &mut GuestDev<'_>,
    rep: &mut DeviceReport,
    streams: &mut Streams,
    mac: [u8; 6],
    mtu: u16,
) -> Result<()> {
    let spec = g.spec;
    let t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    let nic = OwnNic::<H>::init(t, OWN_FEATURES, OWN_BUF).context("own driver initialisation")?;
    rep.features.own = nic.negotiated;
    let required = feat::VERSION_1 | feat::MAC | feat::STATUS | feat::MTU | feat::MRG_RXBUF;
    rep.check(
        "own_features",
        nic.negotiated & required == required && nic.negotiated & feat::GUEST_CSUM == 0,
        format!(
            "device offers 0x{:x}, our driver accepted 0x{:x} (no EVENT_IDX: ring flags)",
            nic.device_features, nic.negotiated
        ),
    );
    let c = nic.config;
    rep.check(
        "own_config_space",
        c.mac == mac && c.status & 1 == 1 && c.max_virtqueue_pairs == 1 && c.mtu == mtu,
        format!(
            "mac {}, status {:#x}, max_virtqueue_pairs {}, mtu {}; configured mac {}, mtu {mtu}",
            mac_str(&c.mac),
            c.status,
            c.max_virtqueue_pairs,
            c.mtu,
            mac_str(&mac)
        ),
    );
    let mut st = Stack::new(nic, &mut g.irq, addrs());
    greet(&mut st, rep, "own_", c.mtu)?;
    let big = usize::from(c.mtu) - 28;
    bulk(&mut st, rep, streams, "own_bulk", 1000, (MSG_HDR, big))?;
    bulk(&mut st, rep, streams, "own_mtu", 200, (big, big))?;
    no_buffers(&mut st, rep, "own_no_rx_buffers", streams, big)?;
    let s = st.nic.stats().clone();
    let want = (usize::from(c.mtu) + wire::ETH_HLEN + 12).div_ceil(OWN_BUF) as u16;
    rep.check(
        "own_mergeable_rx",
        s.bad_header_count == 0 && s.max_buffers == want && s.merged_frames > 0,
        format!(
            "{} frames in {} receive buffers of {OWN_BUF} bytes; {} frames took more than one, \
             up to {} (a frame at the MTU needs {want}){}",
            s.rx_frames,
            s.rx_buffers,
            s.merged_frames,
            s.max_buffers,
            if s.bad_headers.is_empty() {
                String::new()
            } else {
                format!("; bad headers: {}", s.bad_headers.join("; "))
            }
        ),
    );
    Ok(())
}

/// A driver without VERSION_1 or MRG_RXBUF (as RuxOS's): the 10-byte legacy header, which
/// the broker gives the tap too.
fn legacy_phase<H: Hal>(
    g: &mut GuestDev<'_>,
    rep: &mut DeviceReport,
    streams: &mut Streams,
    mtu: u16,
) -> Result<()> {
    let spec = g.spec;
    let t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    let buf = usize::from(mtu) + wire::ETH_HLEN + 10;
    let nic = OwnNic::<H>::init(t, feat::MAC | feat::STATUS, buf)
        .context("legacy driver initialisation")?;
    let negotiated = nic.negotiated;
    let mut st = Stack::new(nic, &mut g.irq, addrs());
    st.resolve_host(ANSWER)?;
    let big = usize::from(mtu) - 28;
    bulk(&mut st, rep, streams, "legacy", 300, (MSG_HDR, big))?;
    let s = st.nic.stats().clone();
    rep.check(
        "legacy_header",
        negotiated & (feat::VERSION_1 | feat::MRG_RXBUF) == 0 && s.bad_header_count == 0,
        format!(
            "features 0x{negotiated:x}: {} frames sent and {} received behind a 10-byte \
             header{}",
            s.tx_frames,
            s.rx_frames,
            if s.bad_headers.is_empty() {
                String::new()
            } else {
                format!("; bad headers: {}", s.bad_headers.join("; "))
            }
        ),
    );
    Ok(())
}

pub fn verify<H: Hal>(g: &mut GuestDev, rep: &mut DeviceReport) -> Result<()> {
    let (mac, mtu) = configured(g)?;
    ensure!(
        usize::from(mtu) >= 576,
        "net-verify needs an MTU of at least 576 (configured {mtu})"
    );
    let mut streams = Streams::new(g.opts.seed ^ g.spec.addr);
    let start = Instant::now();
    stock_phase::<H>(g, rep, &mut streams, mtu)?;
    own_phase::<H>(g, rep, &mut streams, mac, mtu)?;
    legacy_phase::<H>(g, rep, &mut streams, mtu)?;
    println!(
        "hvisor-sim: zone {} net@0x{:x}: {} datagrams sent, {} received, {} bytes verified in \
         {:.1} s",
        g.zone(),
        g.spec.addr,
        rep.writes,
        rep.reads,
        rep.verified_bytes,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One benchmark figure, in frames per second, with the peer's count of what was lost.
struct Figure {
    name: &'static str,
    frame: usize,
    fps: f64,
    lost: u64,
}

/// The demo: find the host (ARP) and ping it, printing what happens.
pub fn demo<H: Hal>(g: &mut GuestDev, rep: &mut DeviceReport) -> Result<()> {
    let spec = g.spec;
    let (_, mtu) = configured(g)?;
    let label = format!("[zone {} net@{:#x}]", g.zone(), spec.addr);
    let t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    let buf = STOCK_MIN_BUF.max(usize::from(mtu) + wire::ETH_HLEN + 12);
    let nic = StockNic::<H>::open(t, buf).context("virtio-net driver initialisation")?;
    let mut st = Stack::new(nic, &mut g.irq, addrs());
    println!(
        "{label} found virtio-net: mac {}, mtu {mtu}",
        mac_str(&st.mac)
    );
    let a = st.a;
    let host_mac = st.resolve_host(ANSWER)?;
    println!("{label} {} is at {} (ARP)", a.host, mac_str(&host_mac));
    let rtts = ping_host(&mut st, rep, "", &[56, 56, 56], mtu)?;
    for (i, rtt) in rtts.iter().enumerate() {
        println!(
            "{label} 64 bytes from {}: icmp_seq={i} time={rtt:.2} ms",
            a.host
        );
    }
    Ok(())
}

pub fn bench<H: Hal>(g: &mut GuestDev, rep: &mut DeviceReport) -> Result<()> {
    let (_, mtu) = configured(g)?;
    let secs = options().net_bench_secs.max(0.1);
    let dur = Duration::from_secs_f64(secs);
    let spec = g.spec;
    let mut t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    rep.features.device = t.read_device_features();
    let buf = STOCK_MIN_BUF.max(usize::from(mtu) + wire::ETH_HLEN + 12);
    let nic = StockNic::<H>::open(t, buf).context("driver initialisation")?;
    rep.features.stock = nic.features;
    let mut st = Stack::new(nic, &mut g.irq, addrs());
    st.resolve_host(ANSWER)?;
    st.call(&Msg::new(op::HELLO, 1, 0), op::HELLO, ANSWER)?;
    let mut streams = Streams::new(g.opts.seed);
    let big = 1500usize.min(usize::from(mtu)) - 28;
    let small = 60 - UDP_OVERHEAD;
    let mut figures = Vec::new();
    for (payload, name_tx, name_rx) in [
        (big, "bench_guest_to_host_big", "bench_host_to_guest_big"),
        (
            small,
            "bench_guest_to_host_small",
            "bench_host_to_guest_small",
        ),
    ] {
        let s = streams.next(payload, payload);
        let r = sink(&mut st, s, 0, dur, false)?;
        rep.writes += u64::from(r.received);
        let span = r.span_ns as f64 / 1e9;
        figures.push(Figure {
            name: name_tx,
            frame: payload + UDP_OVERHEAD,
            fps: if span > 0.0 {
                f64::from(r.received.saturating_sub(1)) / span
            } else {
                0.0
            },
            lost: u64::from(r.sent.saturating_sub(r.received)),
        });
        let s = streams.next(payload, payload);
        let r = source(&mut st, s, 0, dur, false)?;
        rep.reads += u64::from(r.received);
        let span = r.span.as_secs_f64();
        figures.push(Figure {
            name: name_rx,
            frame: payload + UDP_OVERHEAD,
            fps: if span > 0.0 {
                f64::from(r.received.saturating_sub(1)) / span
            } else {
                0.0
            },
            lost: u64::from(r.sent.saturating_sub(r.received)),
        });
    }
    let b = st.call(&Msg::new(op::BASELINE, 99, 0), op::BASELINE, ANSWER)?;
    let mut f = Fields(&b.body);
    let baseline: Vec<f64> = (0..4).map(|_| f64::from_bits(f.u64())).collect();
    drop(st);

    println!(
        "hvisor-sim net-bench: zone {} net@0x{:x}, {secs:.1} s per figure, stock driver \
         (one receive buffer per frame)",
        g.zone(),
        spec.addr
    );
    println!(
        "  {:<42} {:>14} {:>14} {:>7} {:>9}",
        "measure", "through stack", "bare tap", "ratio", "lost"
    );
    for (fig, base) in figures.iter().zip(&baseline) {
        let big = fig.frame > 100;
        let (unit, scale) = if big {
            ("MB/s", fig.frame as f64 / 1e6)
        } else {
            ("kframes/s", 1e-3)
        };
        let dir = if fig.name.contains("guest_to_host") {
            "guest -> host"
        } else {
            "host -> guest"
        };
        let label = format!("{dir}, {}-byte frames ({unit})", fig.frame);
        let ratio = if *base > 0.0 { fig.fps / base } else { 0.0 };
        println!(
            "  {label:<42} {:>14.1} {:>14.1} {:>7.3} {:>9}",
            fig.fps * scale,
            base * scale,
            ratio,
            fig.lost
        );
        rep.check(
            fig.name,
            fig.fps > 0.0,
            format!(
                "frame_bytes={} frames_per_s={:.0} mb_per_s={:.1} baseline_frames_per_s={:.0} \
                 baseline_mb_per_s={:.1} ratio={ratio:.4} lost={}",
                fig.frame,
                fig.fps,
                fig.fps * fig.frame as f64 / 1e6,
                base,
                base * fig.frame as f64 / 1e6,
                fig.lost
            ),
        );
    }
    Ok(())
}
