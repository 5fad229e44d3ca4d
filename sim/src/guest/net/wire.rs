//! What the guest puts on the wire and reads from it: Ethernet II, ARP, IPv4, ICMP echo and
//! UDP, and the datagrams of the peer protocol (described in the parent module).

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
const IP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_UDP: u8 = 17;
/// Ethernet, IPv4 and UDP headers: a UDP payload of `n` bytes makes a frame of `n + 42`.
pub const UDP_OVERHEAD: usize = ETH_HLEN + IP_HLEN + UDP_HLEN;
/// IPv4 and ICMP headers: an echo payload of `n` bytes makes an IP packet of `n + 28`.
pub const ICMP_OVERHEAD: usize = IP_HLEN + ICMP_HLEN;
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// The Internet checksum (RFC 1071) of `data`, continuing from the partial sum `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The partial sum of the IPv4 pseudo-header of a UDP datagram.
fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut sum = 0u32;
    for c in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    sum + u32::from(proto) + len as u32
}

pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP packet for IPv4 over Ethernet.
pub fn arp(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::with_capacity(28);
    p.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha);
    p.extend_from_slice(&spa.octets());
    p.extend_from_slice(&tha);
    p.extend_from_slice(&tpa.octets());
    p
}

/// An IPv4 packet (no options, don't fragment).
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    let total = (IP_HLEN + payload.len()) as u16;
    let mut p = Vec::with_capacity(total as usize);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p, 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// A UDP datagram; with `sum` false its checksum is 0 (none, which IPv4 allows).
pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8], sum: bool) -> Vec<u8> {
    let len = UDP_HLEN + payload.len();
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&src.1.to_be_bytes());
    d.extend_from_slice(&dst.1.to_be_bytes());
    d.extend_from_slice(&(len as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    if sum {
        let c = match checksum(&d, pseudo_sum(src.0, dst.0, PROTO_UDP, len)) {
            0 => 0xffff,
            c => c,
        };
        d[6..8].copy_from_slice(&c.to_be_bytes());
    }
    d
}

pub fn icmp_echo(typ: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(ICMP_HLEN + payload.len());
    m.extend_from_slice(&[typ, 0, 0, 0]);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = checksum(&m, 0);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A received frame, taken apart.
#[derive(Debug)]
pub enum Packet<'a> {
    Arp {
        op: u16,
        sha: Mac,
        spa: Ipv4Addr,
        tpa: Ipv4Addr,
    },
    Icmp {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        typ: u8,
        id: u16,
        seq: u16,
        payload: &'a [u8],
        /// Both the IP header and the ICMP checksums hold.
        sums_ok: bool,
    },
    Udp {
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        payload: &'a [u8],
        /// The IP header checksum holds, and so does the UDP one if the sender gave one.
        sums_ok: bool,
    },
    /// Anything else: IPv6, other protocols, fragments, malformed frames.
    Other,
}

fn ip4(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Destination MAC and the packet of an Ethernet frame.
pub fn parse(frame: &[u8]) -> (Mac, Packet<'_>) {
    if frame.len() < ETH_HLEN {
        return ([0; 6], Packet::Other);
    }
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&frame[..6]);
    let body = &frame[ETH_HLEN..];
    let packet = match be16(&frame[12..14]) {
        ETHERTYPE_ARP => parse_arp(body),
        ETHERTYPE_IPV4 => parse_ipv4(body),
        _ => Packet::Other,
    };
    (dst, packet)
}

fn parse_arp(p: &[u8]) -> Packet<'_> {
    if p.len() < 28 || p[..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return Packet::Other;
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&p[8..14]);
    Packet::Arp {
        op: be16(&p[6..8]),
        sha,
        spa: ip4(&p[14..18]),
        tpa: ip4(&p[24..28]),
    }
}

fn parse_ipv4(p: &[u8]) -> Packet<'_> {
    if p.len() < IP_HLEN || p[0] >> 4 != 4 {
        return Packet::Other;
    }
    let hlen = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(be16(&p[2..4]));
    if hlen < IP_HLEN || total < hlen || total > p.len() {
        return Packet::Other;
    }
    if be16(&p[6..8]) & 0x3fff != 0 {
        return Packet::Other;
    }
    let header_ok = checksum(&p[..hlen], 0) == 0;
    let (src, dst) = (ip4(&p[12..16]), ip4(&p[16..20]));
    let body = &p[hlen..total];
    match p[9] {
        PROTO_ICMP if body.len() >= ICMP_HLEN => Packet::Icmp {
            src,
            dst,
            typ: body[0],
            id: be16(&body[4..6]),
            seq: be16(&body[6..8]),
            payload: &body[ICMP_HLEN..],
            sums_ok: header_ok && checksum(body, 0) == 0,
        },
        PROTO_UDP if body.len() >= UDP_HLEN => {
            let len = usize::from(be16(&body[4..6]));
            if len < UDP_HLEN || len > body.len() {
                return Packet::Other;
            }
            let d = &body[..len];
            let udp_ok =
                be16(&d[6..8]) == 0 || checksum(d, pseudo_sum(src, dst, PROTO_UDP, len)) == 0;
            Packet::Udp {
                src: (src, be16(&d[0..2])),
                dst: (dst, be16(&d[2..4])),
                payload: &d[UDP_HLEN..],
                sums_ok: header_ok && udp_ok,
            }
        }
        _ => Packet::Other,
    }
}

/// The peer protocol: every datagram starts with this 16-byte header (little-endian).
pub const MSG_HDR: usize = 16;

pub mod op {
    pub const HELLO: u8 = 1;
    pub const SINK: u8 = 2;
    pub const DATA: u8 = 3;
    pub const ACK: u8 = 4;
    pub const SINK_END: u8 = 5;
    pub const RESULT: u8 = 6;
    pub const SOURCE: u8 = 7;
    pub const END: u8 = 8;
    pub const BURST: u8 = 9;
    pub const PING_ME: u8 = 10;
    pub const PING_RESULT: u8 = 11;
    pub const BASELINE: u8 = 12;
}

/// One peer-protocol datagram.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Msg {
    pub op: u8,
    pub stream: u16,
    pub seq: u32,
    /// Wall-clock nanoseconds when the peer sent it (0 from the guest).
    pub stamp: u64,
    pub body: Vec<u8>,
}

impl Msg {
    pub fn new(op: u8, stream: u16, seq: u32) -> Msg {
        Msg {
            op,
            stream,
            seq,
            ..Default::default()
        }
    }

    pub fn with(mut self, body: Vec<u8>) -> Msg {
        self.body = body;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(MSG_HDR + self.body.len());
        d.extend_from_slice(&[self.op, 0]);
        d.extend_from_slice(&self.stream.to_le_bytes());
        d.extend_from_slice(&self.seq.to_le_bytes());
        d.extend_from_slice(&self.stamp.to_le_bytes());
        d.extend_from_slice(&self.body);
        d
    }

    pub fn decode(d: &[u8]) -> Option<Msg> {
        if d.len() < MSG_HDR {
            return None;
        }
        Some(Msg {
            op: d[0],
            stream: u16::from_le_bytes([d[2], d[3]]),
            seq: u32::from_le_bytes(d[4..8].try_into().ok()?),
            stamp: u64::from_le_bytes(d[8..16].try_into().ok()?),
            body: d[MSG_HDR..].to_vec(),
        })
    }
}

/// Little-endian fields of a message body, in order.
#[derive(Default)]
pub struct Body(pub Vec<u8>);

impl Body {
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// Reads little-endian fields of a message body, in order; 0 past its end.
pub struct Fields<'a>(pub &'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn datagram_seed(seed: u64, stream: u16, seq: u32) -> u64 {
    mix(seed ^ (u64::from(stream) << 48) ^ (u64::from(seq) << 8))
}

/// The UDP payload length of DATA datagram `seq` of a stream: from `min` to `max` bytes.
pub fn data_len(seed: u64, stream: u16, seq: u32, min: u16, max: u16) -> usize {
    let (min, max) = (usize::from(min.max(MSG_HDR as u16)), usize::from(max));
    if max <= min {
        return min;
    }
    min + (mix(datagram_seed(seed, stream, seq)) % (max - min + 1) as u64) as usize
}

/// The body of DATA datagram `seq`: little-endian words of a splitmix64 stream.
pub fn fill_body(seed: u64, stream: u16, seq: u32, body: &mut [u8]) {
    let mut state = datagram_seed(seed, stream, seq);
    for chunk in body.chunks_mut(8) {
        state = mix(state);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// A DATA datagram of a stream, as both sides make it.
pub fn data_msg(seed: u64, stream: u16, seq: u32, min: u16, max: u16) -> Vec<u8> {
    let len = data_len(seed, stream, seq, min, max);
    let mut d = Msg::new(op::DATA, stream, seq).encode();
    d.resize(len, 0);
    fill_body(seed, stream, seq, &mut d[MSG_HDR..]);
    d
}

/// Nanoseconds of the wall clock, which the guest and the peer (another process) share.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_round_trips() {
        // RFC 1071 example
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data, 0), !0xddf2);
        let (a, b) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 1));
        let d = udp((a, 7), (b, 9), b"hello!!", true);
        let frame = eth(
            [1; 6],
            [2; 6],
            ETHERTYPE_IPV4,
            &ipv4(a, b, PROTO_UDP, 5, &d),
        );
        match parse(&frame) {
            (
                [1, 1, 1, 1, 1, 1],
                Packet::Udp {
                    src,
                    dst,
                    payload,
                    sums_ok: true,
                },
            ) => {
                assert_eq!((src, dst, payload), ((a, 7), (b, 9), &b"hello!!"[..]));
            }
            other => panic!("{other:?}"),
        }
        let mut bad = frame.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(parse(&bad).1, Packet::Udp { sums_ok: false, .. }));
        let ping = icmp_echo(ICMP_ECHO_REQUEST, 3, 4, b"xyz");
        let frame = eth(
            [1; 6],
            [2; 6],
            ETHERTYPE_IPV4,
            &ipv4(a, b, PROTO_ICMP, 6, &ping),
        );
        assert!(matches!(
            parse(&frame).1,
            Packet::Icmp {
                typ: ICMP_ECHO_REQUEST,
                id: 3,
                seq: 4,
                sums_ok: true,
                ..
            }
        ));
        let m = Msg::new(op::SINK, 3, 9).with(Body::default().u32(5).u64(6).0);
        let back = Msg::decode(&m.encode()).unwrap();
        assert_eq!(back, m);
        let mut f = Fields(&back.body);
        assert_eq!((f.u32(), f.u64(), f.u32()), (5, 6, 0));
    }

    #[test]
    fn data_lengths_stay_in_range() {
        for seq in 0..1000 {
            let n = data_len(7, 1, seq, 17, 1472);
            assert!((17..=1472).contains(&n));
            assert_eq!(data_msg(7, 1, seq, 17, 1472).len(), n);
        }
        assert_eq!(data_len(7, 1, 3, 0, 0), MSG_HDR);
        assert_eq!(data_len(7, 1, 3, 1472, 1472), 1472);
    }
}
