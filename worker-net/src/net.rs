//! The virtio-net device (virtio 1.2, 5.1): receive queue 0, transmit queue 1, frames on the
//! tap. Each frame is preceded by a `virtio_net_hdr` whose length the broker gave the tap
//! (TUNSETVNETHDRSZ) by the same rule as [`header_len`], so the header passes through as is.
//!
//! Transmit: one `writev` per chain, the frame straight from guest memory behind a checked
//! copy of its header (the kernel acts on the header's offload requests, so it only ever sees
//! one that asks for nothing the guest did not negotiate). Receive: one `readv` per frame
//! straight into the guest's buffer, with a local tail for a frame that does not fit; such a
//! frame is spread over several buffers with MRG_RXBUF, or dropped (a guest error) without.
//! Nothing is dropped for want of buffers: the tap is not read while the guest has none, and
//! frames wait in the kernel's tap queue.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use log::{error, warn};
use protocol::{DeviceSetup, Flow, Limit};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use worker::rate_limit::Limiter;
use worker::{counters, Device, Interest, TrackedQueue};

use worker::guest_io::{self as iov, IOV_MAX};

pub const RX: usize = 0;
pub const TX: usize = 1;
/// The tap is host fd 0.
const TAP: usize = 0;

/// `virtio_net_hdr` without and with `num_buffers`.
pub const LEGACY_HDR_LEN: usize = 10;
pub const HDR_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest frame behind the header. With GUEST_TSO4/6 the tap hands over unsegmented TCP
/// packets, but never more than one 64 KiB IP packet plus Ethernet and VLAN headers (tun's
/// GSO limit), so that is still the bound.
pub const MAX_FRAME: usize = 65535 + 18;

/// The header length for negotiated `features`; the broker sets the tap's by the same rule.
pub fn header_len(features: u64) -> usize {
    let has = |bit: u32| features & (1 << bit) != 0;
    if has(VIRTIO_F_VERSION_1) || has(VIRTIO_NET_F_MRG_RXBUF) {
        HDR_LEN
    } else {
        LEGACY_HDR_LEN
    }
}

/// Counts one kind of event and says when to log it: the first time, then every 1000th.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counter(pub u64);

impl Counter {
    fn bump(&mut self) -> bool {
        self.0 += 1;
        self.0 == 1 || self.0 % 1000 == 0
    }
}

/// What the device counted; logged as it happens (rate-limited), kept for tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// The tap refused a frame (EAGAIN, EIO, EINVAL, ...).
    pub tx_errors: Counter,
    /// A transmit chain that is no frame: writable or unmapped buffers, shorter than the
    /// header, longer than any frame.
    pub tx_malformed: Counter,
    /// A receive chain that cannot hold anything: writable side too short, readable or
    /// unmapped buffers.
    pub rx_bad_buffers: Counter,
    /// A frame read from the tap and dropped: larger than the guest's buffer without
    /// MRG_RXBUF, or than its whole ring; or not a frame at all.
    pub rx_dropped: Counter,
}

pub struct Net {
    tap: File,
    mtu: u16,
    /// Negotiated.
    features: u64,
    hdr_len: usize,
    mergeable: bool,
    guest_csum: bool,
    active: bool,
    /// The guest has no receive buffer: the tap is not read until it posts one.
    starved: bool,
    /// Reading the tap failed for good (it was detached or deleted).
    tap_failed: bool,
    /// A frame read from the tap that waits for enough receive buffers (MRG_RXBUF only).
    pending: Option<Vec<u8>>,
    /// Where a frame lands past the end of the guest's buffer.
    tail: Box<[u8]>,
    /// The rate limits of the frames to the guest and from it. A received frame's size is
    /// known once it is read: it is charged then, and the next read waits out any debt.
    rx_limit: Limiter,
    tx_limit: Limiter,
    pub stats: Stats,
}

/// A chain's buffers, all on the side the queue calls for, checked against guest memory.
struct Buffers<'m> {
    head: u16,
    slices: Vec<VolatileSlice<'m>>,
    len: usize,
}

impl Net {
    pub fn new(setup: &DeviceSetup, fds: Vec<OwnedFd>) -> Result<Self, String> {
        let DeviceSetup::Net { mtu } = setup else {
            return Err("not a net setup".into());
        };
        let [tap] = <[OwnedFd; 1]>::try_from(fds)
            .map_err(|fds| format!("expected one tap fd, got {}", fds.len()))?;
        Ok(Net {
            tap: File::from(tap),
            mtu: *mtu,
            features: 0,
            hdr_len: HDR_LEN,
            mergeable: false,
            guest_csum: false,
            active: false,
            starved: true,
            tap_failed: false,
            pending: None,
            tail: vec![0u8; HDR_LEN + MAX_FRAME].into_boxed_slice(),
            rx_limit: Limiter::default(),
            tx_limit: Limiter::default(),
            stats: Stats::default(),
        })
    }

    fn tap(&self) -> BorrowedFd<'_> {
        self.tap.as_fd()
    }

    /// Writes every available transmit chain to the tap. A frame the tap refuses is counted
    /// and dropped; every chain is completed either way, so the ring keeps moving. A chain
    /// taken before a restart is sent again (a frame sent twice is harmless; one lost is not).
    /// A frame the rate limit holds back goes back to the ring, and the queue waits.
    fn transmit<'m>(&mut self, queue: &mut TrackedQueue<'m>, mem: &'m GuestMemoryMmap) -> bool {
        let mut added = false;
        let now = Instant::now();
        while let Some(chain) = pop_or_arm(queue, mem, &mut added) {
            let head = chain.head_index();
            match gather(chain, mem, false) {
                Ok(b) if b.len < self.hdr_len => {
                    self.tx_malformed(head, &format!("{} bytes, shorter than the header", b.len))
                }
                Ok(b) if b.len > self.hdr_len + MAX_FRAME => {
                    self.tx_malformed(head, &format!("{} bytes, longer than any frame", b.len))
                }
                Ok(b) => {
                    // The kernel acts on the header (checksum, segmentation): it gets a copy
                    // that was checked, which the guest cannot change behind the check.
                    let mut hdr = [0u8; HDR_LEN];
                    let hdr = &mut hdr[..self.hdr_len];
                    iov::copy_out(&b.slices, hdr);
                    if let Err(why) = self.tx_header_ok(hdr) {
                        self.tx_malformed(head, why);
                    } else if !self.tx_limit.admit(1, (b.len - self.hdr_len) as u64, now) {
                        queue.put_back(head);
                        return added;
                    } else {
                        self.send(hdr, &iov::skip(&b.slices, self.hdr_len), b.len);
                    }
                }
                Err(why) => self.tx_malformed(head, why),
            }
            complete(queue, mem, head, 0, &mut added);
        }
        added
    }

    fn send(&mut self, hdr: &[u8], frame: &[VolatileSlice<'_>], len: usize) {
        match iov::writev(self.tap.as_fd(), hdr, frame, 0) {
            Ok(n) => {
                self.stats.tx_frames += 1;
                counters::add(counters::BYTES_WRITTEN, n as u64);
            }
            Err(e) => {
                counters::add(counters::ERRORS, 1);
                if self.stats.tx_errors.bump() {
                    warn!(
                        "transmit: the tap refused a {}-byte frame ({e}); dropped ({} so far)",
                        len - self.hdr_len,
                        self.stats.tx_errors.0
                    );
                }
            }
        }
    }

    /// A transmit header asks only for what was negotiated: checksum completion with
    /// VIRTIO_NET_F_CSUM, each segmentation type with its HOST_ feature.
    fn tx_header_ok(&self, hdr: &[u8]) -> Result<(), &'static str> {
        let has = |bit: u32| self.features & (1 << bit) != 0;
        let (flags, gso) = (u32::from(hdr[0]), u32::from(hdr[1]));
        if flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return Err("a header with flags a driver may not send");
        }
        if flags != 0 && !has(VIRTIO_NET_F_CSUM) {
            return Err("a checksum request, and VIRTIO_NET_F_CSUM was not negotiated");
        }
        if gso & VIRTIO_NET_HDR_GSO_ECN != 0 && !has(VIRTIO_NET_F_HOST_ECN) {
            return Err("segmentation with ECN, and VIRTIO_NET_F_HOST_ECN was not negotiated");
        }
        let needs = match gso & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            _ => return Err("an unknown segmentation type"),
        };
        if !has(needs) {
            return Err("a segmentation type that was not negotiated");
        }
        Ok(())
    }

    fn tx_malformed(&mut self, head: u16, why: &str) {
        if self.stats.tx_malformed.bump() {
            warn!(
                "transmit: chain {head} is no frame: {why}; skipped ({} so far)",
                self.stats.tx_malformed.0
            );
        }
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive<'m>(&mut self, queue: &mut TrackedQueue<'m>, mem: &'m GuestMemoryMmap) -> bool {
        let mut added = false;
        let now = Instant::now();
        loop {
            if let Some(frame) = self.pending.take() {
                if !self.deliver_copy(&frame, queue, mem, &mut added) {
                    self.pending = Some(frame);
                    self.starved = true;
                    return added;
                }
            }
            // The tap is not read (or watched) while the limit is in debt.
            if !self.rx_limit.admit(0, 0, now) {
                return added;
            }
            let Some(bufs) = self.next_rx_buffers(queue, mem, &mut added) else {
                self.starved = true;
                return added;
            };
            self.starved = false;
            let n = match iov::readv(self.tap.as_fd(), &bufs.slices, &mut self.tail) {
                Ok(n) => {
                    counters::add(counters::BYTES_READ, n as u64);
                    self.rx_limit
                        .charge(1, n.saturating_sub(self.hdr_len) as u64);
                    n
                }
                Err(e) => {
                    // The buffer stays the guest's: the next read takes it again.
                    queue.put_back(bufs.head);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        error!("receive: reading the tap: {e}; no longer receiving");
                        self.tap_failed = true;
                    }
                    return added;
                }
            };
            // A tap cuts a frame longer than the space it is given without saying so: a read
            // that fills every byte may have been cut. (The tail holds any frame a tap
            // without segmentation offloads sends, so neither case should happen.)
            if n < self.hdr_len || n >= bufs.len + self.tail.len() {
                queue.put_back(bufs.head);
                self.dropped(n, "is no whole frame");
                continue;
            }
            if n <= bufs.len {
                self.finish_header(&bufs.slices, 1);
                queue.set_progress(bufs.head, n as u32);
                complete(queue, mem, bufs.head, n as u32, &mut added);
                self.stats.rx_frames += 1;
                continue;
            }
            // The frame runs past this buffer; the buffer goes back to the ring either way.
            queue.put_back(bufs.head);
            if !self.mergeable {
                self.too_large(n, bufs.len, "the guest's receive buffer");
                continue;
            }
            let mut frame = vec![0u8; n];
            let first = iov::copy_out(&bufs.slices, &mut frame[..bufs.len]);
            frame[first..].copy_from_slice(&self.tail[..n - first]);
            self.pending = Some(frame);
        }
    }

    /// Pops receive chains until one can hold at least a header; those that cannot are
    /// completed empty, so the guest gets them back.
    fn next_rx_buffers<'m>(
        &mut self,
        queue: &mut TrackedQueue<'m>,
        mem: &'m GuestMemoryMmap,
        added: &mut bool,
    ) -> Option<Buffers<'m>> {
        loop {
            let chain = pop_or_arm(queue, mem, added)?;
            let head = chain.head_index();
            match gather(chain, mem, true) {
                Ok(b) if b.len >= self.hdr_len => return Some(b),
                Ok(b) => self.bad_rx_buffer(head, &format!("{} bytes", b.len)),
                Err(why) => self.bad_rx_buffer(head, why),
            }
            complete(queue, mem, head, 0, added);
        }
    }

    /// Copies `frame` (header included) into as many receive buffers as it needs, all
    /// completed together with `num_buffers` set. False, with nothing taken from the ring,
    /// when there are not enough buffers yet.
    fn deliver_copy<'m>(
        &mut self,
        frame: &[u8],
        queue: &mut TrackedQueue<'m>,
        mem: &'m GuestMemoryMmap,
        added: &mut bool,
    ) -> bool {
        let mut parts: Vec<Buffers> = Vec::new();
        let mut at = 0;
        while at < frame.len() {
            let Some(chain) = pop_or_arm(queue, mem, added) else {
                if parts.len() >= usize::from(queue.size()) {
                    // Even a full ring of these buffers cannot take it.
                    self.too_large(frame.len(), at, "the guest's whole receive ring");
                    unpop(queue, &parts);
                    return true;
                }
                unpop(queue, &parts);
                return false;
            };
            let head = chain.head_index();
            let bufs = match gather(chain, mem, true) {
                Ok(b) if b.len >= self.hdr_len => b,
                bad => {
                    let why = match bad {
                        Err(why) => why.to_string(),
                        Ok(b) => format!("{} bytes", b.len),
                    };
                    // Mid-frame, the buffers taken before it cannot go back to the ring
                    // without it: they all return empty and the frame is lost.
                    for p in &parts {
                        complete(queue, mem, p.head, 0, added);
                    }
                    complete(queue, mem, head, 0, added);
                    if parts.is_empty() {
                        self.bad_rx_buffer(head, &why);
                        continue;
                    }
                    self.bad_rx_buffer(head, &format!("{why}, after {at} bytes of a frame"));
                    self.dropped(frame.len(), "lost to a bad receive buffer");
                    return true;
                }
            };
            if !self.mergeable && bufs.len < frame.len() {
                queue.put_back(bufs.head);
                self.too_large(frame.len(), bufs.len, "the guest's receive buffer");
                return true;
            }
            at += iov::copy_in(&bufs.slices, &frame[at..]);
            parts.push(bufs);
        }
        let Some(first) = parts.first() else {
            return true;
        };
        let count = u16::try_from(parts.len()).unwrap_or(u16::MAX);
        self.finish_header(&first.slices, count);
        // Every part's length is recorded before any is completed: after a restart the
        // whole frame is completed from the record.
        let mut left = frame.len();
        let lens: Vec<u32> = (parts.iter())
            .map(|p| {
                let n = p.len.min(left);
                left -= n;
                n as u32
            })
            .collect();
        for (p, &n) in parts.iter().zip(&lens) {
            queue.set_progress(p.head, n);
        }
        for (p, &n) in parts.iter().zip(&lens) {
            complete(queue, mem, p.head, n, added);
        }
        self.stats.rx_frames += 1;
        true
    }

    /// What the device must write into a received header itself: `num_buffers` (in every
    /// 12-byte header: 1 unless a frame spans buffers), and zero flags unless the guest
    /// accepted checksum hints (the tap may mark a frame's checksum as verified).
    fn finish_header(&self, bufs: &[VolatileSlice<'_>], num_buffers: u16) {
        if !self.guest_csum {
            iov::write_at(bufs, 0, &[0]);
        }
        if self.hdr_len == HDR_LEN {
            iov::write_at(bufs, NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
        }
    }

    fn bad_rx_buffer(&mut self, head: u16, why: &str) {
        if self.stats.rx_bad_buffers.bump() {
            warn!(
                "receive: chain {head} cannot hold a frame ({why}); returned empty ({} so far)",
                self.stats.rx_bad_buffers.0
            );
        }
    }

    fn too_large(&mut self, len: usize, room: usize, what: &str) {
        let why = format!("does not fit {what} ({room} bytes; mtu {})", self.mtu);
        self.dropped(len, &why);
    }

    fn dropped(&mut self, len: usize, why: &str) {
        if self.stats.rx_dropped.bump() {
            warn!(
                "receive: a {len}-byte frame (header included) {why}; dropped ({} so far)",
                self.stats.rx_dropped.0
            );
        }
    }
}

impl Device for Net {
    fn process_queue<'m>(
        &mut self,
        index: usize,
        queue: &mut TrackedQueue<'m>,
        mem: &'m GuestMemoryMmap,
    ) -> bool {
        match index {
            RX if !self.tap_failed => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            _ => false,
        }
    }

    fn activate(&mut self, features: u64) {
        self.features = features;
        self.hdr_len = header_len(features);
        self.mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.guest_csum = features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        self.pending = None;
        // The loop looks at every queue right after this and finds out.
        self.starved = true;
        self.active = true;
    }

    fn reset(&mut self) {
        self.active = false;
        self.pending = None;
        self.starved = true;
        self.rx_limit.stop_waiting();
        self.tx_limit.stop_waiting();
    }

    fn stop_queue(&mut self, index: usize) {
        // Without a receive queue the tap must not be read (or watched: it would spin).
        if index == RX {
            self.pending = None;
            self.starved = true;
            self.rx_limit.stop_waiting();
        }
        if index == TX {
            self.tx_limit.stop_waiting();
        }
    }

    fn set_rate_limit(&mut self, flow: Flow, limit: Limit, now: Instant) {
        match flow {
            Flow::Rx => self.rx_limit.set(limit, now),
            Flow::Tx => self.tx_limit.set(limit, now),
            Flow::Io => {}
        }
    }

    fn throttled_until(&self, index: usize) -> Option<Instant> {
        match index {
            RX if !self.tap_failed => self.rx_limit.until(),
            TX => self.tx_limit.until(),
            _ => None,
        }
    }

    fn host_fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.tap()]
    }

    fn host_interest(&self, index: usize) -> Interest {
        let waiting = self.rx_limit.until().is_some();
        if index == TAP && self.active && !self.starved && !self.tap_failed && !waiting {
            Interest::READ
        } else {
            Interest::NONE
        }
    }

    fn host_ready(&mut self, index: usize, readable: bool, _writable: bool) -> u64 {
        if index == TAP && readable {
            1 << RX
        } else {
            0
        }
    }
}

/// The next available chain. Before saying there is none, it asks the driver for a kick and
/// looks once more: a buffer added meanwhile, while kicks were suppressed, would otherwise wait
/// for a kick that never comes. A receive chain a dead worker had filled (its progress is the
/// frame's length) is completed on the way.
fn pop_or_arm<'m>(
    queue: &mut TrackedQueue<'m>,
    mem: &'m GuestMemoryMmap,
    added: &mut bool,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    loop {
        let chain = match queue.pop(mem) {
            Some(chain) => chain,
            None => match queue.enable_notification(mem) {
                Ok(true) => queue.pop(mem)?,
                _ => return None,
            },
        };
        let head = chain.head_index();
        match queue.progress(head) {
            0 => return Some(chain),
            len => complete(queue, mem, head, len, added),
        }
    }
}

/// Gives back the chains of `parts`, last taken first.
fn unpop(queue: &mut TrackedQueue<'_>, parts: &[Buffers<'_>]) {
    for p in parts.iter().rev() {
        queue.put_back(p.head);
    }
}

fn complete(
    queue: &mut TrackedQueue<'_>,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    added: &mut bool,
) {
    *added |= queue.publish(mem, head, len);
}

/// The buffers of `chain`, which must all be device-writable (receive) or all readable
/// (transmit), inside guest memory, and few enough for one system call.
fn gather<'m>(
    chain: DescriptorChain<&'m GuestMemoryMmap>,
    mem: &'m GuestMemoryMmap,
    writable: bool,
) -> Result<Buffers<'m>, &'static str> {
    let head = chain.head_index();
    let mut bufs = Buffers {
        head,
        slices: Vec::new(),
        len: 0,
    };
    for d in chain {
        if d.is_write_only() != writable {
            return Err(if writable {
                "a device-readable buffer"
            } else {
                "a device-writable buffer"
            });
        }
        let len = d.len() as usize;
        for slice in mem.get_slices(d.addr(), len) {
            bufs.slices
                .push(slice.map_err(|_| "a buffer outside guest memory")?);
        }
        // Room for the tail iovec of a read.
        if bufs.slices.len() >= IOV_MAX {
            return Err("too many buffers");
        }
        bufs.len += len;
    }
    Ok(bufs)
}
