//! What the fuzz targets share: guest memory and a split virtqueue built from fuzz input.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use protocol::QueueConfig;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use worker::testing::Records;
use worker::Device;

/// Guest memory: two adjacent regions (a buffer may span both), then one after a gap (a
/// buffer may run into the hole).
pub const REGIONS: [(u64, usize); 3] = [(0, 0x2000), (0x2000, 0x1000), (0x1_0000, 0x1000)];
/// Queue `i`'s rings lie at `i * QUEUE_STRIDE` from the start of guest memory.
const QUEUE_STRIDE: u64 = 0x400;
const AVAIL: u64 = 0x200;
const USED: u64 = 0x280;

/// Takes the first byte of `data`, or 0.
pub fn take_u8(data: &mut &[u8]) -> u8 {
    let (b, rest) = data.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
    *data = rest;
    b
}

/// Takes `N` bytes of `data` (zero-padded) as a little-endian number.
pub fn take_le<const N: usize>(data: &mut &[u8]) -> u64 {
    let mut v = 0u64;
    for i in 0..N {
        v |= u64::from(take_u8(data)) << (8 * i);
    }
    v
}

/// Guest memory holding `bytes` from guest address 0 on (in the first two regions) and the
/// rest in the region after the gap.
pub fn guest_memory(bytes: &[u8]) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        REGIONS.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let low = REGIONS[0].1 + REGIONS[1].1;
    let (first, rest) = bytes.split_at(bytes.len().min(low));
    mem.write_slice(first, GuestAddress(0)).expect("low memory");
    let high = &rest[..rest.len().min(REGIONS[2].1)];
    mem.write_slice(high, GuestAddress(REGIONS[2].0))
        .expect("high memory");
    mem
}

/// Takes up to `n` bytes of `data`.
pub fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (taken, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    taken
}

/// Queue 0 of 1 to 32 entries (from `size_bits`) whose rings lie at the start of guest
/// memory, built as a worker builds it at activation.
pub fn queue(size_bits: u8, event_idx: bool, mem: &GuestMemoryMmap) -> Queue {
    queue_at(0, size_bits, event_idx, mem)
}

/// Queue `index` of 1 to 32 entries, its rings in guest memory after those of lower indices.
pub fn queue_at(index: u16, size_bits: u8, event_idx: bool, mem: &GuestMemoryMmap) -> Queue {
    let base = u64::from(index) * QUEUE_STRIDE;
    let cfg = QueueConfig {
        index,
        size: 1 << (size_bits % 6),
        desc: base,
        avail: base + AVAIL,
        used: base + USED,
    };
    worker::fuzzing::build_queue(&cfg, event_idx, mem).expect("a queue inside guest memory")
}

/// A non-blocking socket pair standing in for a device's host fd (a tap: `SeqPacket`, a
/// pty: `Stream`): the device's end, and the host's.
pub fn host_pair(kind: SockType) -> (OwnedFd, OwnedFd) {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    socketpair(AddressFamily::Unix, kind, None, flags).expect("socket pair")
}

/// Drives a two-queue device (receive queue 0, transmit queue 1) as its event loop would:
/// a script from the input of queue processing, host data arriving and the host reading,
/// over guest memory holding the rest of the input.
pub fn drive(device: &mut dyn Device, host: &OwnedFd, data: &[u8]) {
    let mut data = data;
    let sizes = take_u8(&mut data);
    let event_idx = take_u8(&mut data) & 1 != 0;
    let features = take_le::<8>(&mut data);
    let script_len = usize::from(take_u8(&mut data) % 32);
    let mut script = take(&mut data, script_len * 2);
    let mem = guest_memory(data);
    let mut queues = [
        queue_at(0, sizes & 7, event_idx, &mem),
        queue_at(1, sizes >> 3, event_idx, &mem),
    ];
    let mut records = Records::new(2);
    device.activate(features);
    let mut buf = [0u8; 4096];
    while !script.is_empty() {
        match take_u8(&mut script) % 4 {
            q @ 0..=1 => {
                let index = usize::from(q);
                let mut tq = records.tracked(index, &mut queues[index]);
                device.process_queue(index, &mut tq, &mem);
            }
            2 => {
                let len = usize::from(take_u8(&mut script)) * 8;
                let _ = send(
                    host.as_fd().as_raw_fd(),
                    &buf[..len],
                    MsgFlags::MSG_DONTWAIT,
                );
                let ready = device.host_ready(0, true, false);
                for index in 0..2 {
                    if ready & 1 << index != 0 {
                        let mut tq = records.tracked(index, &mut queues[index]);
                        device.process_queue(index, &mut tq, &mem);
                    }
                }
            }
            _ => {
                let _ = take_u8(&mut script);
                let _ = recv(host.as_fd().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT);
                device.host_ready(0, false, true);
            }
        }
    }
    device.reset();
}
