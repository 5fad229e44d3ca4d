//! Request handling driven through a real split queue in guest memory, as a driver would.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use protocol::DeviceSetup;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use worker::testing::Records;
use worker::Device;

use crate::blk::Blk;

const MEM_SIZE: u64 = 4 << 20;
const QSIZE: u16 = 512;
const IMAGE_SECTORS: u64 = 512;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

// guest addresses
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x30_0000;
/// The used ring, placed by hand: `MockSplitQueue::create` lays it over the tail of the
/// available ring.
const USED: u64 = 0x2f_0000;

/// One descriptor: guest address, length, device-writable.
type Part = (u64, u32, bool);

struct Rig {
    mem: GuestMemoryMmap,
    image: File,
    blk: Blk,
}

fn pattern(i: u64) -> u8 {
    (i % 251) as u8 + 1
}

fn rig_with(image: File, readonly: bool) -> Rig {
    let data: Vec<u8> = (0..IMAGE_SECTORS * 512).map(pattern).collect();
    image.write_all_at(&data, 0).unwrap();
    let setup = DeviceSetup::Blk {
        readonly,
        size: IMAGE_SECTORS * 512,
        serial: "hvisor-test-serial-0123456789".into(),
    };
    let fd = OwnedFd::from(image.try_clone().unwrap());
    Rig {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
        image,
        blk: Blk::new(&setup, vec![fd]).unwrap(),
    }
}

fn rig(readonly: bool) -> Rig {
    rig_with(tempfile::tempfile().unwrap(), readonly)
}

impl Rig {
    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Offers one chain and lets the device serve it; returns the used length.
    fn submit(&mut self, parts: &[Part]) -> u32 {
        let q = MockSplitQueue::create(&self.mem, GuestAddress(0), QSIZE);
        self.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < parts.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(Descriptor::new(addr, len, flags, i as u16 + 1))
            })
            .collect();
        q.add_desc_chains(&descs, 0).unwrap();
        let mut queue = queue_of(&q);
        let mut records = Records::new(1);
        assert!(self
            .blk
            .process_queue(0, &mut records.tracked(0, &mut queue), &self.mem));
        assert_eq!(self.used_idx(), 1);
        let (id, len) = self.used_elem(0);
        assert_eq!(id, 0);
        len
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used_elem(&self, i: u64) -> (u32, u32) {
        let at = USED + 4 + 8 * i;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// A typical request: header, data descriptors, status; returns (status, used length).
    fn request(&mut self, kind: u32, sector: u64, data: &[Part]) -> (u8, u32) {
        self.header(kind, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut parts = vec![(HDR, 16, false)];
        parts.extend_from_slice(data);
        parts.push((STATUS, 1, true));
        let len = self.submit(&parts);
        (self.status(), len)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn file(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.image.read_exact_at(&mut v, offset).unwrap();
        v
    }

    /// A DISCARD / WRITE_ZEROES segment at DATA.
    fn segment(&self, sector: u64, sectors: u32, flags: u32) -> Part {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&s, GuestAddress(DATA)).unwrap();
        (DATA, 16, false)
    }
}

/// A ready queue over the mock's descriptor table and available ring, with a fresh used ring.
fn queue_of(q: &MockSplitQueue<GuestMemoryMmap>) -> Queue {
    let mut queue = Queue::new(QSIZE).unwrap();
    queue
        .try_set_desc_table_address(q.desc_table_addr())
        .unwrap();
    queue.try_set_avail_ring_address(q.avail_addr()).unwrap();
    queue.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    queue.set_ready(true);
    queue
}

fn expected(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(pattern).collect()
}

#[test]
fn read_over_several_descriptors() {
    let mut r = rig(false);
    // 1536 bytes from sector 3, in three unequal pieces
    let data = [
        (DATA, 1024, true),
        (DATA + 0x1000, 0, true),
        (DATA + 0x2000, 512, true),
    ];
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 3, &data), (OK, 1536 + 1));
    assert_eq!(r.guest(DATA, 1024), expected(3 * 512, 1024));
    assert_eq!(r.guest(DATA + 0x2000, 512), expected(3 * 512 + 1024, 512));
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    let mut r = rig(false);
    // header in two pieces; status at the end of the last data descriptor
    r.header(VIRTIO_BLK_T_IN, 1);
    let used = r.submit(&[(HDR, 10, false), (HDR + 10, 6, false), (DATA, 513, true)]);
    assert_eq!(used, 513);
    assert_eq!(r.guest(DATA, 512), expected(512, 512));
    assert_eq!(r.guest(DATA + 512, 1), [OK]);
}

#[test]
fn write_then_read_back() {
    let mut r = rig(false);
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    r.mem
        .write_slice(&payload[..512], GuestAddress(DATA))
        .unwrap();
    r.mem
        .write_slice(&payload[512..], GuestAddress(DATA + 0x3000))
        .unwrap();
    let data = [(DATA, 512, false), (DATA + 0x3000, 512, false)];
    assert_eq!(r.request(VIRTIO_BLK_T_OUT, 5, &data), (OK, 1));
    assert_eq!(r.file(5 * 512, 1024), payload);
    // neighbours untouched
    assert_eq!(r.file(4 * 512, 512), expected(4 * 512, 512));
    assert_eq!(r.file(7 * 512, 512), expected(7 * 512, 512));
}

#[test]
fn flush_and_get_id() {
    let mut r = rig(false);
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    // 20 bytes fit: the serial cut to 20
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]),
        (OK, 21)
    );
    assert_eq!(r.guest(DATA, 20), b"hvisor-test-serial-0");
    // a short buffer gets what fits
    r.mem.write_slice(&[0xaa; 20], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 6, true)]),
        (OK, 7)
    );
    assert_eq!(r.guest(DATA, 7), b"hvisor\xaa");
    // a short serial is zero-padded
    let setup = DeviceSetup::Blk {
        readonly: false,
        size: 512,
        serial: "disk0".into(),
    };
    let fd = OwnedFd::from(r.image.try_clone().unwrap());
    r.blk = Blk::new(&setup, vec![fd]).unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 64, true)]),
        (OK, 21)
    );
    assert_eq!(r.guest(DATA, 20), b"disk0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
}

#[test]
fn discard_leaves_a_hole_that_reads_as_zeros() {
    let mut r = rig(false);
    let seg = r.segment(8, 4, 0);
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, &[seg]), (OK, 1));
    assert_eq!(r.file(8 * 512, 4 * 512), vec![0; 4 * 512]);
    assert_eq!(r.file(7 * 512, 512), expected(7 * 512, 512));
    assert_eq!(r.file(12 * 512, 512), expected(12 * 512, 512));
    assert_eq!(r.image.metadata().unwrap().len(), IMAGE_SECTORS * 512);
    // and through the device
    r.mem
        .write_slice(&[0xaa; 2048], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 8, &[(DATA, 2048, true)]),
        (OK, 2049)
    );
    assert_eq!(r.guest(DATA, 2048), vec![0; 2048]);
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    // a regular file, and a memfd (tmpfs cannot zero a range: the write fallback runs)
    let memfd =
        nix::sys::memfd::memfd_create("image", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    for image in [tempfile::tempfile().unwrap(), File::from(memfd)] {
        let mut r = rig_with(image, false);
        let seg = r.segment(2, 3, 0);
        assert_eq!(r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]), (OK, 1));
        assert_eq!(r.file(2 * 512, 3 * 512), vec![0; 3 * 512]);
        assert_eq!(r.file(5 * 512, 512), expected(5 * 512, 512));
        let seg = r.segment(20, 100, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]), (OK, 1));
        assert_eq!(r.file(20 * 512, 100 * 512), vec![0; 100 * 512]);
        assert_eq!(r.file(19 * 512, 512), expected(19 * 512, 512));
        assert_eq!(r.file(120 * 512, 512), expected(120 * 512, 512));
        assert_eq!(r.image.metadata().unwrap().len(), IMAGE_SECTORS * 512);
    }
}

#[test]
fn discard_and_write_zeroes_limits() {
    let mut r = rig(false);
    // flags: UNMAP is not for discards; unknown bits never
    let seg = r.segment(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, &[seg]).0, UNSUPP);
    let seg = r.segment(0, 1, 2);
    assert_eq!(r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]).0, UNSUPP);
    // two segments (max_discard_seg is 1), a partial segment, none
    r.segment(0, 1, 0);
    for data in [&[(DATA, 32, false)][..], &[(DATA, 8, false)], &[]] {
        assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, data).0, IOERR);
    }
    // too many sectors, beyond the image
    let seg = r.segment(0, 0x40_0000, 0);
    assert_eq!(r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]).0, IOERR);
    let seg = r.segment(IMAGE_SECTORS - 1, 2, 0);
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, &[seg]).0, IOERR);
    let seg = r.segment(u64::MAX / 256, 1, 0);
    assert_eq!(r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]).0, IOERR);
    assert_eq!(r.file(0, 512), expected(0, 512));
}

#[test]
fn read_only_devices_refuse_writes() {
    let mut r = rig(true);
    r.mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]),
        (IOERR, 1)
    );
    let seg = r.segment(0, 1, 0);
    assert_eq!(r.request(VIRTIO_BLK_T_DISCARD, 0, &[seg]), (IOERR, 1));
    let seg = r.segment(0, 1, 0);
    assert_eq!(r.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[seg]), (IOERR, 1));
    assert_eq!(r.file(0, 512), expected(0, 512));
    // reads, flush and the id still work
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0, OK);
    assert_eq!(r.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert_eq!(r.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]).0, OK);
}

#[test]
fn ranges_and_lengths_are_checked() {
    let mut r = rig(false);
    let last = IMAGE_SECTORS - 1;
    assert_eq!(r.request(VIRTIO_BLK_T_IN, last, &[(DATA, 512, true)]).0, OK);
    for (sector, len) in [
        (last, 1024),
        (IMAGE_SECTORS, 512),
        (u64::MAX / 512, 512),
        (u64::MAX, 512),
    ] {
        assert_eq!(
            r.request(VIRTIO_BLK_T_IN, sector, &[(DATA, len, true)]),
            (IOERR, 1)
        );
        assert_eq!(
            r.request(VIRTIO_BLK_T_OUT, sector, &[(DATA, len, false)]),
            (IOERR, 1)
        );
    }
    // not a multiple of 512
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 511, true)]),
        (IOERR, 1)
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 700, false)]),
        (IOERR, 1)
    );
    // data on the wrong side
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, false)]),
        (IOERR, 1)
    );
    assert_eq!(
        r.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, true)]),
        (IOERR, 1)
    );
    assert_eq!(r.file(0, 512), expected(0, 512));
}

#[test]
fn segment_limits() {
    let mut r = rig(false);
    let seg = |n: u64| -> Vec<Part> { (0..n).map(|i| (DATA + i * 512, 512, true)).collect() };
    assert_eq!(
        r.request(VIRTIO_BLK_T_IN, 0, &seg(254)),
        (OK, 254 * 512 + 1)
    );
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, &seg(255)), (IOERR, 1));
    // size_max is 1 MiB per segment
    let big = [(DATA, 1 << 20, true)];
    r.image.set_len(4 << 20).unwrap();
    let setup = DeviceSetup::Blk {
        readonly: false,
        size: 4 << 20,
        serial: String::new(),
    };
    r.blk = Blk::new(&setup, vec![OwnedFd::from(r.image.try_clone().unwrap())]).unwrap();
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, &big), (OK, (1 << 20) + 1));
    let bigger = [(DATA, (1 << 20) + 512, true)];
    assert_eq!(r.request(VIRTIO_BLK_T_IN, 0, &bigger), (IOERR, 1));
}

#[test]
fn unknown_types_are_unsupported() {
    let mut r = rig(false);
    for kind in [2, 3, 14, 15, 0x8000_0000] {
        assert_eq!(r.request(kind, 0, &[(DATA, 512, true)]), (UNSUPP, 1));
    }
}

#[test]
fn malformed_chains_never_crash() {
    let mut r = rig(false);
    r.header(VIRTIO_BLK_T_IN, 0);
    let outside = MEM_SIZE + 0x1000;

    // no writable byte at all: completed with nothing written
    assert_eq!(r.submit(&[(HDR, 16, false), (DATA, 512, false)]), 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 0, true)]), 0);
    // the status byte outside guest memory
    assert_eq!(r.submit(&[(HDR, 16, false), (outside, 1, true)]), 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (MEM_SIZE - 1, 2, true)]), 0);

    // the status byte is writable: IOERR
    let cases: &[&[Part]] = &[
        // header too short
        &[(HDR, 8, false), (STATUS, 1, true)],
        &[(STATUS, 1, true)],
        // header outside guest memory
        &[(outside, 16, false), (STATUS, 1, true)],
        // data outside guest memory, or running off its end
        &[(HDR, 16, false), (outside, 512, true), (STATUS, 1, true)],
        &[
            (HDR, 16, false),
            (MEM_SIZE - 256, 512, true),
            (STATUS, 1, true),
        ],
        &[
            (HDR, 16, false),
            (u64::MAX - 100, 512, true),
            (STATUS, 1, true),
        ],
        // a readable descriptor after a writable one
        &[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA, 512, false),
            (STATUS, 1, true),
        ],
    ];
    for parts in cases {
        r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(r.submit(parts), 1, "{parts:x?}");
        assert_eq!(r.status(), IOERR, "{parts:x?}");
    }
}

#[test]
fn chains_of_several_requests_and_bad_heads() {
    let mut r = rig(false);
    let q = MockSplitQueue::create(&r.mem, GuestAddress(0), QSIZE);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    let flush = |status: u64| {
        [
            RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 0)),
            RawDescriptor::from(Descriptor::new(status, 1, VRING_DESC_F_WRITE as u16, 0)),
        ]
    };
    for (i, status) in [STATUS, STATUS + 1].iter().enumerate() {
        let mut d = flush(*status);
        d[0] = RawDescriptor::from(Descriptor::new(
            HDR,
            16,
            VRING_DESC_F_NEXT as u16,
            2 * i as u16 + 1,
        ));
        q.add_desc_chains(&d, 2 * i as u16).unwrap();
    }
    // a third available entry naming a descriptor beyond the table
    let avail_idx = q.avail().idx().load();
    q.avail()
        .ring()
        .ref_at(avail_idx as usize)
        .unwrap()
        .store(QSIZE + 5);
    q.avail().idx().store(avail_idx + 1);

    r.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    let mut queue = queue_of(&q);
    let mut records = Records::new(1);
    assert!(r
        .blk
        .process_queue(0, &mut records.tracked(0, &mut queue), &r.mem));
    assert_eq!(r.used_idx(), 2);
    assert_eq!(r.guest(STATUS, 2), [OK, OK]);
    assert_eq!(queue.next_avail(), 3);
}

/// A request the rate limit holds back goes back to the ring, untaken: served once the limit
/// allows, and every request completed exactly once.
#[test]
fn a_rate_limit_holds_requests_in_the_ring_and_loses_none() {
    use protocol::{Bucket, Flow, Limit};
    use std::time::Instant;
    use worker::testing::Ring;

    let mut r = rig(false);
    let mut ring = Ring::new(0x10_0000, 16);
    let heads: Vec<u16> = (0..5)
        .map(|i| {
            let (id, status) = (DATA + 32 * i, STATUS + i);
            ring.add(
                &r.mem,
                &[(HDR, 16, false), (id, 20, true), (status, 1, true)],
            )
        })
        .collect();
    // GET_ID: no I/O, so the first call takes microseconds, far less than a token's second.
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    let two_a_day = Limit {
        bytes: None,
        ops: Some(Bucket::new(1, Some(2)).unwrap()),
    };
    r.blk.set_rate_limit(Flow::Io, two_a_day, Instant::now());
    let mut queue = ring.queue();
    let mut records = Records::new(1);
    r.blk
        .process_queue(0, &mut records.tracked(0, &mut queue), &r.mem);
    let first: Vec<u32> = ring.take_used(&r.mem).iter().map(|u| u.0).collect();
    assert_eq!(first, [heads[0], heads[1]].map(u32::from));
    // The third went back: not taken, and the queue waits for tokens.
    assert_eq!(queue.next_avail(), 2);
    assert!(r.blk.throttled_until(0).is_some());
    // The limit lifted: the rest, once each.
    r.blk
        .set_rate_limit(Flow::Io, Limit::default(), Instant::now());
    assert!(r.blk.throttled_until(0).is_none());
    r.blk
        .process_queue(0, &mut records.tracked(0, &mut queue), &r.mem);
    let rest: Vec<u32> = ring.take_used(&r.mem).iter().map(|u| u.0).collect();
    assert_eq!(
        rest,
        heads[2..].iter().map(|&h| u32::from(h)).collect::<Vec<_>>()
    );
    assert_eq!(r.guest(STATUS, 5), [OK; 5]);
}
