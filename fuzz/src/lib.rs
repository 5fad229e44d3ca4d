//! What the fuzz targets share: guest memory and a split virtqueue built from fuzz input.

use protocol::QueueConfig;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: two adjacent regions (a buffer may span both), then one after a gap (a
/// buffer may run into the hole).
pub const REGIONS: [(u64, usize); 3] = [(0, 0x2000), (0x2000, 0x1000), (0x1_0000, 0x1000)];
/// The queue's rings, at the start of guest memory.
const DESC: u64 = 0;
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

/// A queue of 1 to 32 entries (from `size_bits`) whose rings lie at the start of guest
/// memory, built as a worker builds it at activation.
pub fn queue(size_bits: u8, event_idx: bool, mem: &GuestMemoryMmap) -> Queue {
    let cfg = QueueConfig {
        index: 0,
        size: 1 << (size_bits % 6),
        desc: DESC,
        avail: AVAIL,
        used: USED,
    };
    worker::fuzzing::build_queue(&cfg, event_idx, mem).expect("a queue inside guest memory")
}
