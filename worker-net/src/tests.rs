//! The device driven through real split rings in guest memory, as a driver would, with a
//! non-blocking SEQPACKET socket pair standing in for the tap (it keeps frame boundaries).

use std::os::fd::{AsRawFd, OwnedFd};
use worker::testing::{Part, Records, Ring};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use protocol::DeviceSetup;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use worker::{Device, Interest};

use crate::net::{header_len, Net, HDR_LEN, LEGACY_HDR_LEN, RX, TX};

const MEM_SIZE: u64 = 4 << 20;
const QSIZE: u16 = 64;
const DATA: u64 = 0x10_0000;
/// Receive buffers are laid out from here, each in its own 4 KiB.
const RX_DATA: u64 = 0x20_0000;
const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

struct Rig {
    mem: GuestMemoryMmap,
    net: Net,
    /// The host side of the stand-in tap.
    host: OwnedFd,
    rx: Ring,
    rxq: Queue,
    tx: Ring,
    txq: Queue,
    records: Records,
    next_rx_buf: u64,
}

impl Rig {
    fn new(features: u64) -> Rig {
        let (dev, host) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut net = Net::new(&DeviceSetup::Net { mtu: 1500 }, vec![dev]).unwrap();
        net.activate(features);
        let rx = Ring::new(0, QSIZE);
        let tx = Ring::new(0x4000, QSIZE);
        Rig {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
            net,
            host,
            rxq: rx.queue(),
            rx,
            txq: tx.queue(),
            records: Records::new(2),
            tx,
            next_rx_buf: RX_DATA,
        }
    }

    fn process_rx(&mut self) -> bool {
        let mut q = self.records.tracked(RX, &mut self.rxq);
        self.net.process_queue(RX, &mut q, &self.mem)
    }

    fn process_tx(&mut self) -> bool {
        let mut q = self.records.tracked(TX, &mut self.txq);
        self.net.process_queue(TX, &mut q, &self.mem)
    }

    fn reading(&self) -> bool {
        self.net.host_interest(0) == Interest::READ
    }

    /// The host sends a frame (header included) into the tap.
    fn host_send(&self, bytes: &[u8]) {
        assert_eq!(
            send(self.host.as_raw_fd(), bytes, MsgFlags::empty()).unwrap(),
            bytes.len()
        );
    }

    /// The next frame the device wrote to the tap, if any.
    fn host_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        match recv(self.host.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(Errno::EAGAIN) => None,
            Err(e) => panic!("recv: {e}"),
        }
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Posts `count` receive buffers of `len` bytes each (at most 4 KiB), one chain each;
    /// returns their addresses. Each is filled with 0xee first.
    fn post_rx(&mut self, count: usize, len: u32) -> Vec<u64> {
        (0..count)
            .map(|_| {
                let addr = self.next_rx_buf;
                self.next_rx_buf += 0x1000;
                self.mem
                    .write_slice(&vec![0xee; len as usize], GuestAddress(addr))
                    .unwrap();
                self.rx.add(&self.mem, &[(addr, len, true)]);
                addr
            })
            .collect()
    }

    /// A new receive ring, as a driver sets up after a reset.
    fn new_rx_ring(&mut self) {
        self.rx = Ring::new(0, QSIZE);
        self.mem
            .write_obj(0u16, GuestAddress(self.rx.avail() + 2))
            .unwrap();
        self.mem
            .write_obj(0u16, GuestAddress(self.rx.used() + 2))
            .unwrap();
        self.rxq = self.rx.queue();
    }
}

/// A frame of `len` bytes after a header of `hdr` bytes whose flags byte is `flags`.
fn frame(hdr: usize, len: usize, seed: u8, flags: u8) -> Vec<u8> {
    let mut v = vec![0u8; hdr];
    v[0] = flags;
    v.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

#[test]
fn header_length_follows_the_features() {
    assert_eq!(header_len(0), LEGACY_HDR_LEN);
    assert_eq!(header_len(V1), HDR_LEN);
    assert_eq!(header_len(MRG), HDR_LEN);
    assert_eq!(header_len(V1 | MRG), HDR_LEN);
}

#[test]
fn transmit_writes_each_chain_as_one_frame_untouched() {
    let mut r = Rig::new(V1);
    // header and frame split unevenly over three descriptors
    let f = frame(HDR_LEN, 1514, 7, 0);
    r.mem.write_slice(&f[..5], GuestAddress(DATA)).unwrap();
    r.mem
        .write_slice(&f[5..700], GuestAddress(DATA + 0x1000))
        .unwrap();
    r.mem
        .write_slice(&f[700..], GuestAddress(DATA + 0x3000))
        .unwrap();
    let head = r.tx.add(
        &r.mem,
        &[
            (DATA, 5, false),
            (DATA + 0x1000, 695, false),
            (DATA + 0x3000, (f.len() - 700) as u32, false),
        ],
    );
    // a short frame is not padded
    let small = frame(HDR_LEN, 20, 1, 0);
    r.mem
        .write_slice(&small, GuestAddress(DATA + 0x8000))
        .unwrap();
    let head2 =
        r.tx.add(&r.mem, &[(DATA + 0x8000, small.len() as u32, false)]);
    assert!(r.process_tx());
    assert_eq!(r.host_recv().unwrap(), f);
    assert_eq!(r.host_recv().unwrap(), small);
    assert_eq!(r.host_recv(), None);
    assert_eq!(
        r.tx.take_used(&r.mem),
        [(head as u32, 0), (head2 as u32, 0)]
    );
    assert_eq!(r.net.stats.tx_frames, 2);
}

#[test]
fn malformed_transmit_chains_are_completed_and_not_sent() {
    let mut r = Rig::new(0);
    let outside = MEM_SIZE + 0x1000;
    let cases: &[&[Part]] = &[
        // a writable buffer in a transmit chain
        &[(DATA, 64, false), (DATA + 0x100, 64, true)],
        // outside guest memory, or running off its end
        &[(outside, 64, false)],
        &[(MEM_SIZE - 32, 64, false)],
        // shorter than the legacy header
        &[(DATA, 9, false)],
    ];
    for parts in cases {
        r.tx.add(&r.mem, parts);
    }
    assert!(r.process_tx());
    assert_eq!(r.tx.take_used(&r.mem).len(), cases.len());
    assert_eq!(r.host_recv(), None);
    assert_eq!(r.net.stats.tx_malformed.0, cases.len() as u64);
    // a legacy 10-byte header is a valid frame start
    let f = frame(LEGACY_HDR_LEN, 60, 3, 0);
    r.mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    r.tx.add(&r.mem, &[(DATA, f.len() as u32, false)]);
    assert!(r.process_tx());
    assert_eq!(r.host_recv().unwrap(), f);
}

#[test]
fn a_refused_frame_is_counted_and_its_chain_completed() {
    let mut r = Rig::new(V1);
    // the host end is gone: every write fails
    let Rig { host, .. } = &mut r;
    let (a, _) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_NONBLOCK,
    )
    .unwrap();
    *host = a;
    let f = frame(HDR_LEN, 100, 0, 0);
    r.mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    for _ in 0..3 {
        r.tx.add(&r.mem, &[(DATA, f.len() as u32, false)]);
    }
    assert!(r.process_tx());
    assert_eq!(r.tx.take_used(&r.mem).len(), 3);
    assert_eq!(r.net.stats.tx_errors.0, 3);
}

#[test]
fn receive_fills_one_buffer_per_frame_and_sets_num_buffers() {
    let mut r = Rig::new(V1);
    let bufs = r.post_rx(1, 2048);
    // flags from the tap (DATA_VALID) are cleared: the guest did not accept checksum hints
    let f = frame(HDR_LEN, 1514, 9, 2);
    r.host_send(&f);
    assert!(r.process_rx());
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used, [(0, f.len() as u32)]);
    let got = r.guest(bufs[0], f.len());
    assert_eq!(got[0], 0, "flags");
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
    assert_eq!(
        r.guest(bufs[0] + f.len() as u64, 1),
        [0xee],
        "wrote past the frame"
    );
}

#[test]
fn checksum_flags_pass_when_the_guest_accepts_them() {
    let mut r = Rig::new(V1 | (1 << VIRTIO_NET_F_GUEST_CSUM));
    let bufs = r.post_rx(1, 2048);
    r.host_send(&frame(HDR_LEN, 60, 0, 2));
    assert!(r.process_rx());
    assert_eq!(r.guest(bufs[0], 1), [2]);
}

#[test]
fn legacy_header_is_left_as_the_tap_wrote_it_apart_from_flags() {
    let mut r = Rig::new(0);
    let bufs = r.post_rx(1, 1600);
    let f = frame(LEGACY_HDR_LEN, 100, 4, 0);
    r.host_send(&f);
    assert!(r.process_rx());
    assert_eq!(r.rx.take_used(&r.mem), [(0, f.len() as u32)]);
    assert_eq!(r.guest(bufs[0], f.len()), f);
    assert_eq!(r.guest(bufs[0] + f.len() as u64, 2), [0xee, 0xee]);
}

#[test]
fn without_buffers_the_tap_is_not_read_and_nothing_is_lost() {
    let mut r = Rig::new(V1);
    // no buffers yet: the device stops watching the tap
    assert!(!r.process_rx());
    assert!(!r.reading());
    let frames: Vec<Vec<u8>> = (0..40)
        .map(|i| frame(HDR_LEN, 60 + i, i as u8, 0))
        .collect();
    for f in &frames {
        r.host_send(f);
    }
    // fewer buffers than frames: the rest wait in the tap
    let bufs = r.post_rx(25, 2048);
    assert!(r.process_rx());
    assert!(!r.reading(), "the ring is empty again");
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used.len(), 25);
    for (i, (&(_, len), addr)) in used.iter().zip(&bufs).enumerate() {
        assert_eq!(len as usize, frames[i].len());
        assert_eq!(r.guest(*addr + 12, len as usize - 12), frames[i][12..]);
    }
    let bufs = r.post_rx(20, 2048);
    assert!(r.process_rx());
    assert!(
        r.reading(),
        "buffers left, the tap is empty: wait for frames"
    );
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used.len(), 15);
    for (i, (&(_, len), addr)) in used.iter().zip(&bufs).enumerate() {
        assert_eq!(r.guest(*addr + 12, len as usize - 12), frames[25 + i][12..]);
    }
    // an empty tap takes no buffer
    assert!(!r.process_rx());
    assert_eq!(r.rxq.next_avail(), 40);
    assert_eq!(r.net.stats.rx_dropped.0, 0);
}

#[test]
fn without_mergeable_buffers_a_frame_too_large_is_dropped_and_the_buffer_reused() {
    let mut r = Rig::new(V1);
    let bufs = r.post_rx(1, 200);
    r.host_send(&frame(HDR_LEN, 500, 1, 0));
    let small = frame(HDR_LEN, 100, 2, 0);
    r.host_send(&small);
    assert!(r.process_rx());
    assert_eq!(r.rx.take_used(&r.mem), [(0, small.len() as u32)]);
    assert_eq!(r.guest(bufs[0] + 12, 100), small[12..]);
    assert_eq!(r.net.stats.rx_dropped.0, 1);
}

#[test]
fn mergeable_buffers_take_a_frame_in_several_pieces() {
    let mut r = Rig::new(V1 | MRG);
    let bufs = r.post_rx(8, 256);
    let f = frame(HDR_LEN, 1000, 5, 0);
    r.host_send(&f);
    let g = frame(HDR_LEN, 100, 6, 0);
    r.host_send(&g);
    assert!(r.process_rx());
    let used = r.rx.take_used(&r.mem);
    // 1012 bytes: four buffers of 256, 256, 256, 244; then the next frame in one
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        [256, 256, 256, 244, 112]
    );
    let mut got = Vec::new();
    for (&(_, len), addr) in used.iter().zip(&bufs).take(4) {
        got.extend(r.guest(*addr, len as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 4, "num_buffers");
    assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
    let second = r.guest(bufs[4], g.len());
    assert_eq!(u16::from_le_bytes([second[10], second[11]]), 1);
    assert_eq!(second[HDR_LEN..], g[HDR_LEN..]);
}

#[test]
fn a_mergeable_frame_waits_for_enough_buffers() {
    let mut r = Rig::new(V1 | MRG);
    r.post_rx(2, 256);
    let f = frame(HDR_LEN, 1000, 8, 0);
    r.host_send(&f);
    // two buffers are not enough: nothing is completed, the frame waits, the tap is left alone
    assert!(!r.process_rx());
    assert!(r.rx.take_used(&r.mem).is_empty());
    assert!(!r.reading());
    assert_eq!(r.rxq.next_avail(), 0);
    r.post_rx(3, 256);
    assert!(r.process_rx());
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used.iter().map(|u| u.1).sum::<u32>(), f.len() as u32);
    assert_eq!(used.len(), 4);
    assert_eq!(r.net.stats.rx_dropped.0, 0);
    r.post_rx(1, 2048);
    assert!(!r.process_rx());
    assert!(r.reading(), "a buffer, no limit: the tap is watched again");
}

#[test]
fn unusable_receive_buffers_are_returned_empty() {
    let mut r = Rig::new(V1);
    // shorter than the header; a readable buffer; outside guest memory; then a good one
    r.rx.add(&r.mem, &[(DATA, 8, true)]);
    r.rx.add(&r.mem, &[(DATA, 2048, false)]);
    r.rx.add(&r.mem, &[(MEM_SIZE + 0x1000, 2048, true)]);
    let good = DATA + 0x8000;
    r.rx.add(&r.mem, &[(good, 2048, true)]);
    let f = frame(HDR_LEN, 80, 3, 0);
    r.host_send(&f);
    assert!(r.process_rx());
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used, [(0, 0), (1, 0), (2, 0), (3, f.len() as u32)]);
    assert_eq!(r.guest(good + 12, 80), f[12..]);
    assert_eq!(r.net.stats.rx_bad_buffers.0, 3);
}

#[test]
fn reset_forgets_the_waiting_frame_and_stops_reading() {
    let mut r = Rig::new(V1 | MRG);
    r.post_rx(1, 128);
    r.host_send(&frame(HDR_LEN, 1000, 8, 0));
    assert!(!r.process_rx());
    r.net.reset();
    assert!(!r.reading());
    r.net.activate(V1);
    r.new_rx_ring();
    let bufs = r.post_rx(1, 2048);
    let g = frame(HDR_LEN, 64, 1, 0);
    r.host_send(&g);
    assert!(r.process_rx());
    // the first frame was read before the reset and is gone; the next one arrives
    assert_eq!(r.rx.take_used(&r.mem), [(0, g.len() as u32)]);
    assert_eq!(r.guest(bufs[0] + 12, 64), g[12..]);
}

#[test]
fn a_frame_cut_by_the_read_is_dropped_not_delivered() {
    let mut r = Rig::new(V1 | MRG);
    let bufs = r.post_rx(2, 2048);
    // Longer than any frame a tap without offloads sends: it fills every byte offered.
    r.host_send(&frame(HDR_LEN, 70_000, 1, 0));
    let g = frame(HDR_LEN, 64, 2, 0);
    r.host_send(&g);
    assert!(r.process_rx());
    assert_eq!(r.rx.take_used(&r.mem), [(0, g.len() as u32)]);
    assert_eq!(r.guest(bufs[0] + 12, 64), g[12..]);
    assert_eq!(r.net.stats.rx_dropped.0, 1);
}

#[test]
fn transmit_headers_may_ask_only_for_negotiated_offloads() {
    let mut r = Rig::new(V1);
    // flags NEEDS_CSUM; gso TCPV4; gso UDP with ECN; an unknown flag; an unknown gso type
    let headers: [[u8; 2]; 5] = [[1, 0], [0, 1], [0, 0x83], [4, 0], [0, 9]];
    for (i, h) in headers.iter().enumerate() {
        let mut f = frame(HDR_LEN, 100, i as u8, h[0]);
        f[1] = h[1];
        let at = DATA + 0x1000 * i as u64;
        r.mem.write_slice(&f, GuestAddress(at)).unwrap();
        r.tx.add(&r.mem, &[(at, f.len() as u32, false)]);
    }
    assert!(r.process_tx());
    assert_eq!(r.tx.take_used(&r.mem).len(), headers.len());
    assert_eq!(r.host_recv(), None);
    assert_eq!(r.net.stats.tx_malformed.0, headers.len() as u64);
    // with the features negotiated, the same requests pass (the tap checks them further)
    let mut r = Rig::new(V1 | (1 << 0) | (1 << 11));
    let mut f = frame(HDR_LEN, 100, 0, 1);
    f[1] = 1;
    r.mem.write_slice(&f, GuestAddress(DATA)).unwrap();
    r.tx.add(&r.mem, &[(DATA, f.len() as u32, false)]);
    assert!(r.process_tx());
    assert_eq!(r.host_recv().unwrap(), f);
}

/// Every offload the broker offers, negotiated: CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6.
const OFFLOADS: u64 = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 8) | (1 << 11) | (1 << 12);

/// A header as Linux's virtio-net driver writes it for a TSO packet (virtio 1.2, 5.1.6):
/// flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
fn gso_header(flags: u8, gso: u8, gso_size: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&66u16.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&34u16.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes());
    h
}

#[test]
fn negotiated_segmentation_and_checksum_requests_pass_to_the_tap_unchanged() {
    let mut r = Rig::new(V1 | MRG | OFFLOADS);
    // A 64 KiB TCPv4 packet with a partial checksum, as 17 descriptors; then a TCPv6 one;
    // then a frame that only asks for checksum completion.
    let mut sent = Vec::new();
    let mut at = DATA;
    for (gso, len) in [(1u8, 65_000usize), (4, 30_000), (0, 1514)] {
        let mut f = frame(HDR_LEN, len, gso, 0);
        f[..HDR_LEN].copy_from_slice(&gso_header(1, gso, if gso == 0 { 0 } else { 1448 }));
        r.mem.write_slice(&f, GuestAddress(at)).unwrap();
        let parts: Vec<Part> = f
            .chunks(4096)
            .enumerate()
            .map(|(i, c)| (at + 4096 * i as u64, c.len() as u32, false))
            .collect();
        r.tx.add(&r.mem, &parts);
        at += (f.len() as u64 + 0xfff) & !0xfff;
        sent.push(f);
    }
    assert!(r.process_tx());
    for f in &sent {
        assert_eq!(r.host_recv().as_ref(), Some(f));
    }
    assert_eq!(r.host_recv(), None);
    assert_eq!(r.net.stats.tx_malformed.0, 0);
    assert_eq!(r.net.stats.tx_frames, 3);
}

#[test]
fn offloads_not_negotiated_are_still_refused() {
    // TSO4 and checksums, but not TSO6, UFO or ECN
    let mut r = Rig::new(V1 | (1 << 0) | (1 << 11));
    for (i, gso) in [4u8, 3, 0x81].into_iter().enumerate() {
        let mut f = frame(HDR_LEN, 3000, i as u8, 0);
        f[..HDR_LEN].copy_from_slice(&gso_header(1, gso, 1448));
        let at = DATA + 0x1000 * i as u64;
        r.mem.write_slice(&f, GuestAddress(at)).unwrap();
        r.tx.add(&r.mem, &[(at, f.len() as u32, false)]);
    }
    assert!(r.process_tx());
    assert_eq!(r.tx.take_used(&r.mem).len(), 3);
    assert_eq!(r.host_recv(), None);
    assert_eq!(r.net.stats.tx_malformed.0, 3);
}

#[test]
fn a_64k_gso_frame_spreads_over_mergeable_buffers_with_its_header_kept() {
    let mut r = Rig::new(V1 | MRG | OFFLOADS);
    // Linux posts mergeable buffers of about 1.5 KiB; a whole GSO frame needs 44 of them.
    let bufs = r.post_rx(60, 1536);
    let mut f = frame(HDR_LEN, 65_535 + 14, 3, 0);
    f[..HDR_LEN].copy_from_slice(&gso_header(1, 1, 1448));
    r.host_send(&f);
    assert!(r.process_rx());
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used.len(), f.len().div_ceil(1536));
    let mut got = Vec::new();
    for (&(_, len), addr) in used.iter().zip(&bufs) {
        got.extend(r.guest(*addr, len as usize));
    }
    assert_eq!(got.len(), f.len());
    // flags (NEEDS_CSUM), gso type and sizes as the tap wrote them; num_buffers ours
    assert_eq!(got[..NUM_BUFFERS], f[..NUM_BUFFERS]);
    assert_eq!(
        u16::from_le_bytes([got[10], got[11]]) as usize,
        used.len(),
        "num_buffers"
    );
    assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
    assert_eq!(r.net.stats.rx_dropped.0, 0);
}

#[test]
fn without_mergeable_buffers_a_gso_frame_fills_a_big_chain() {
    // Linux without MRG_RXBUF but with GUEST_TSO posts "big packets": a chain of pages.
    let mut r = Rig::new(V1 | OFFLOADS);
    let base = 0x30_0000;
    let parts: Vec<Part> = (0..17).map(|i| (base + 0x1000 * i, 4096, true)).collect();
    r.rx.add(&r.mem, &parts);
    let mut f = frame(HDR_LEN, 65_535 + 14, 5, 0);
    f[..HDR_LEN].copy_from_slice(&gso_header(2, 4, 1428));
    r.host_send(&f);
    assert!(r.process_rx());
    assert_eq!(r.rx.take_used(&r.mem), [(0, f.len() as u32)]);
    let got = r.guest(base, f.len());
    // DATA_VALID kept (GUEST_CSUM), the legacy-free 12-byte header with num_buffers 1
    assert_eq!(got[..NUM_BUFFERS], f[..NUM_BUFFERS]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(got[HDR_LEN..], f[HDR_LEN..]);
}

/// Where `num_buffers` starts in a 12-byte header.
const NUM_BUFFERS: usize = 10;

/// Each direction's limit holds frames where they are (the guest's transmit ring, the tap)
/// and stops the device watching the tap; lifted, everything goes, once.
#[test]
fn rate_limits_hold_frames_in_the_ring_and_the_tap() {
    use protocol::{Bucket, Flow, Limit};
    use std::time::Instant;

    let mut r = Rig::new(V1);
    // One frame a second, one saved up: the first call takes microseconds.
    let one = Limit {
        bytes: None,
        ops: Some(Bucket::new(1, Some(1)).unwrap()),
    };
    r.net.set_rate_limit(Flow::Tx, one, Instant::now());
    r.net.set_rate_limit(Flow::Rx, one, Instant::now());
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(HDR_LEN, 100, i, 0)).collect();
    let heads: Vec<u16> = (0..3)
        .map(|i| {
            let at = DATA + 0x1000 * i as u64;
            r.mem.write_slice(&frames[i], GuestAddress(at)).unwrap();
            r.tx.add(&r.mem, &[(at, frames[i].len() as u32, false)])
        })
        .collect();
    assert!(r.process_tx());
    assert_eq!(r.host_recv().unwrap(), frames[0]);
    assert_eq!(r.host_recv(), None);
    assert_eq!(r.tx.take_used(&r.mem), [(u32::from(heads[0]), 0)]);
    assert_eq!(r.txq.next_avail(), 1, "the second frame went back");
    assert!(r.net.throttled_until(TX).is_some());

    for f in &frames {
        r.host_send(f);
    }
    r.post_rx(3, 2048);
    assert!(r.process_rx());
    // A received frame is charged once read: the burst, then one frame into debt.
    assert_eq!(r.rx.take_used(&r.mem).len(), 2);
    assert!(r.net.throttled_until(RX).is_some());
    assert!(!r.reading(), "the tap waits while the limit does");

    r.net
        .set_rate_limit(Flow::Tx, Limit::default(), Instant::now());
    r.net
        .set_rate_limit(Flow::Rx, Limit::default(), Instant::now());
    assert!(r.process_tx());
    assert_eq!(r.host_recv().unwrap(), frames[1]);
    assert_eq!(r.host_recv().unwrap(), frames[2]);
    let rest = heads[1..]
        .iter()
        .map(|&h| (u32::from(h), 0))
        .collect::<Vec<_>>();
    assert_eq!(r.tx.take_used(&r.mem), rest);
    assert!(r.process_rx());
    assert_eq!(r.rx.take_used(&r.mem).len(), 1);
    assert_eq!(r.net.stats.rx_dropped.0, 0);
    r.post_rx(1, 2048);
    assert!(!r.process_rx());
    assert!(r.reading(), "a buffer, no limit: the tap is watched again");
}
