//! The guest's end of the network: one IPv4 address on one device. It answers ARP requests
//! for its address and ICMP echo requests by itself, and hands the rest to the workload.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::nic::Nic;
use super::wire::{self, Mac, Msg, Packet, BROADCAST};
use crate::guest::IrqWaiter;

/// Addresses of a run: the guest's, and the host side of the tap where the peer listens on
/// `port` (the guest uses the same port number).
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub ip: Ipv4Addr,
    pub host: Ipv4Addr,
    pub port: u16,
}

/// What the workload gets to see.
#[derive(Debug)]
pub enum Event {
    ArpReply {
        sha: Mac,
        spa: Ipv4Addr,
    },
    EchoReply {
        src: Ipv4Addr,
        id: u16,
        seq: u16,
        payload: Vec<u8>,
        sums_ok: bool,
    },
    /// A peer-protocol datagram from the host's port to ours.
    Msg {
        msg: Msg,
        sums_ok: bool,
    },
}

enum Polled {
    Empty,
    Handled,
    Event(Event),
}

pub struct Stack<'i, N: Nic> {
    pub nic: N,
    irq: &'i mut IrqWaiter,
    pub mac: Mac,
    pub a: Addrs,
    pub host_mac: Option<Mac>,
    ip_id: u16,
    /// ARP requests for our address that we answered.
    pub arp_answered: u64,
    pub echo_answered: u64,
    /// Frames for someone else, of other protocols, or to other ports.
    pub other_frames: u64,
    /// Frames whose IP, ICMP or UDP checksum failed.
    pub bad_sums: u64,
}

impl<'i, N: Nic> Stack<'i, N> {
    pub fn new(nic: N, irq: &'i mut IrqWaiter, a: Addrs) -> Self {
        Stack {
            mac: nic.mac(),
            nic,
            irq,
            a,
            host_mac: None,
            ip_id: 0,
            arp_answered: 0,
            echo_answered: 0,
            other_frames: 0,
            bad_sums: 0,
        }
    }

    pub fn send_frame(&mut self, frame: &[u8]) -> Result<()> {
        self.nic.send(self.irq, frame)
    }

    fn ip_frame(&mut self, dst_mac: Mac, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        self.ip_id = self.ip_id.wrapping_add(1);
        let ip = wire::ipv4(self.a.ip, dst, proto, self.ip_id, payload);
        wire::eth(dst_mac, self.mac, wire::ETHERTYPE_IPV4, &ip)
    }

    /// A whole frame carrying `payload` to the peer; without `sum`, with no UDP checksum.
    pub fn udp_frame(&mut self, payload: &[u8], sum: bool) -> Result<Vec<u8>> {
        let mac = self
            .host_mac
            .context("the host's MAC address is not known yet")?;
        let udp = wire::udp(
            (self.a.ip, self.a.port),
            (self.a.host, self.a.port),
            payload,
            sum,
        );
        Ok(self.ip_frame(mac, self.a.host, wire::PROTO_UDP, &udp))
    }

    pub fn send_msg(&mut self, msg: &Msg) -> Result<()> {
        self.send_udp(&msg.encode())
    }

    pub fn send_udp(&mut self, payload: &[u8]) -> Result<()> {
        let frame = self.udp_frame(payload, true)?;
        self.send_frame(&frame)
    }

    pub fn send_echo(&mut self, id: u16, seq: u16, payload: &[u8]) -> Result<()> {
        let mac = self
            .host_mac
            .context("the host's MAC address is not known yet")?;
        let icmp = wire::icmp_echo(wire::ICMP_ECHO_REQUEST, id, seq, payload);
        let frame = self.ip_frame(mac, self.a.host, wire::PROTO_ICMP, &icmp);
        self.send_frame(&frame)
    }

    /// Takes one received frame, if there is one.
    fn poll(&mut self) -> Result<Polled> {
        let Some(frame) = self.nic.recv()? else {
            return Ok(Polled::Empty);
        };
        let (dst, packet) = wire::parse(&frame);
        if dst != self.mac && dst != BROADCAST {
            self.other_frames += 1;
            return Ok(Polled::Handled);
        }
        let mut src_mac = [0u8; 6];
        src_mac.copy_from_slice(&frame[6..12]);
        Ok(match packet {
            Packet::Arp {
                op: wire::ARP_REQUEST,
                sha,
                spa,
                tpa,
            } if tpa == self.a.ip => {
                let reply = wire::arp(wire::ARP_REPLY, self.mac, self.a.ip, sha, spa);
                let frame = wire::eth(sha, self.mac, wire::ETHERTYPE_ARP, &reply);
                self.send_frame(&frame)?;
                self.arp_answered += 1;
                Polled::Handled
            }
            Packet::Arp {
                op: wire::ARP_REPLY,
                sha,
                spa,
                ..
            } => Polled::Event(Event::ArpReply { sha, spa }),
            Packet::Icmp { sums_ok: false, .. } | Packet::Udp { sums_ok: false, .. } => {
                self.bad_sums += 1;
                Polled::Handled
            }
            Packet::Icmp {
                src,
                dst,
                typ: wire::ICMP_ECHO_REQUEST,
                id,
                seq,
                payload,
                ..
            } if dst == self.a.ip => {
                let icmp = wire::icmp_echo(wire::ICMP_ECHO_REPLY, id, seq, payload);
                let frame = self.ip_frame(src_mac, src, wire::PROTO_ICMP, &icmp);
                self.send_frame(&frame)?;
                self.echo_answered += 1;
                Polled::Handled
            }
            Packet::Icmp {
                src,
                dst,
                typ: wire::ICMP_ECHO_REPLY,
                id,
                seq,
                payload,
                sums_ok,
            } if dst == self.a.ip => Polled::Event(Event::EchoReply {
                src,
                id,
                seq,
                payload: payload.to_vec(),
                sums_ok,
            }),
            Packet::Udp {
                src,
                dst,
                payload,
                sums_ok,
            } if src == (self.a.host, self.a.port) && dst == (self.a.ip, self.a.port) => {
                match Msg::decode(payload) {
                    Some(msg) => Polled::Event(Event::Msg { msg, sums_ok }),
                    None => {
                        self.other_frames += 1;
                        Polled::Handled
                    }
                }
            }
            _ => {
                self.other_frames += 1;
                Polled::Handled
            }
        })
    }

    /// The next event, waiting for the device's interrupt until `deadline` (an instant in
    /// the past only looks at what is there).
    pub fn next(&mut self, deadline: Instant) -> Result<Option<Event>> {
        loop {
            match self.poll()? {
                Polled::Event(e) => return Ok(Some(e)),
                Polled::Handled => continue,
                Polled::Empty => {}
            }
            self.nic.reap_tx()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if self.irq.wait_for(left) {
                // Linux's handler only schedules NAPI; the rings are read after the EOI.
                self.nic.ack();
                self.irq.eoi();
            } else if self.irq.broker_gone() {
                bail!("the broker went away");
            }
        }
    }

    /// Sends `msg` to the peer and waits for its answer `reply` of the same stream; other
    /// datagrams meanwhile are ignored.
    pub fn call(&mut self, msg: &Msg, reply: u8, timeout: Duration) -> Result<Msg> {
        self.send_msg(msg)?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.next(deadline)? {
                Some(Event::Msg { msg: m, .. }) if m.op == reply && m.stream == msg.stream => {
                    return Ok(m)
                }
                Some(_) => {}
                None => bail!(
                    "no answer (op {reply}) from the peer at {}:{} to op {} within {timeout:?}",
                    self.a.host,
                    self.a.port,
                    msg.op
                ),
            }
        }
    }

    /// Finds the host's MAC with an ARP probe (sender address 0.0.0.0, RFC 5227), which the
    /// host answers without learning ours: so it must ask for ours later itself.
    pub fn resolve_host(&mut self, timeout: Duration) -> Result<Mac> {
        let deadline = Instant::now() + timeout;
        let probe = wire::arp(
            wire::ARP_REQUEST,
            self.mac,
            Ipv4Addr::UNSPECIFIED,
            [0; 6],
            self.a.host,
        );
        let frame = wire::eth(BROADCAST, self.mac, wire::ETHERTYPE_ARP, &probe);
        while Instant::now() < deadline {
            self.send_frame(&frame)?;
            let retry = (Instant::now() + Duration::from_secs(1)).min(deadline);
            while let Some(e) = self.next(retry)? {
                if let Event::ArpReply { sha, spa, .. } = e {
                    if spa == self.a.host {
                        self.host_mac = Some(sha);
                        return Ok(sha);
                    }
                }
            }
        }
        bail!("no ARP reply for {} within {timeout:?}", self.a.host)
    }
}
