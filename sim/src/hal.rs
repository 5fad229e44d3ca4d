//! The guest's DMA memory: virtio-drivers allocates rings and bounce buffers through [`Hal`],
//! which has no `self`, so each zone's arena lives in a static slot and the driver is
//! instantiated with `ZoneHal<SLOT>`.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Mutex;

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// First-fit allocator over `[0, size)` with coalescing free. Long workloads allocate and free
/// bounce buffers many thousand times, so a bump allocator would run dry.
#[derive(Debug)]
pub struct FirstFit {
    /// Free extents, offset -> length; never adjacent (they are merged).
    free: BTreeMap<u64, u64>,
    /// Live allocations, offset -> length.
    used: BTreeMap<u64, u64>,
}

impl FirstFit {
    pub fn new(size: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        FirstFit {
            free,
            used: BTreeMap::new(),
        }
    }

    /// `len` bytes aligned to `align` (a power of two), or None when no extent fits.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        debug_assert!(align.is_power_of_two());
        let len = len.max(1);
        let (start, ext_len, at) = self.free.iter().find_map(|(&start, &ext_len)| {
            let at = start.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(len)? <= start + ext_len).then_some((start, ext_len, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let end = at + len;
        if end < start + ext_len {
            self.free.insert(end, start + ext_len - end);
        }
        self.used.insert(at, len);
        Some(at)
    }

    /// Frees the allocation starting at `off`; returns its length, or None if there is none.
    pub fn free(&mut self, off: u64) -> Option<u64> {
        let len = self.used.remove(&off)?;
        let mut start = off;
        let mut end = off + len;
        if let Some((&p, &plen)) = self.free.range(..off).next_back() {
            if p + plen == off {
                self.free.remove(&p);
                start = p;
            }
        }
        if let Some(&nlen) = self.free.get(&end) {
            self.free.remove(&end);
            end += nlen;
        }
        self.free.insert(start, end - start);
        Some(len)
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.used.values().sum()
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

/// One zone's RAM region used for DMA: guest-physical base, host base, allocator.
struct Arena {
    gpa: u64,
    host: usize,
    size: u64,
    alloc: FirstFit,
}

/// Number of zones the simulator can drive at once.
pub const SLOTS: usize = 4;

static ARENAS: [Mutex<Option<Arena>>; SLOTS] = [const { Mutex::new(None) }; SLOTS];

/// Alignment of bounce buffers: a cache line.
const BOUNCE_ALIGN: u64 = 64;

/// Gives slot `slot` the region `[gpa, gpa + size)`, visible in this process at `host`.
///
/// # Safety
/// `host` must point to `size` bytes of writable memory that stay mapped while any driver of
/// this slot runs, and that nothing else in this process allocates from.
pub unsafe fn install(slot: usize, gpa: u64, host: *mut u8, size: u64) {
    *ARENAS[slot].lock().unwrap() = Some(Arena {
        gpa,
        host: host as usize,
        size,
        alloc: FirstFit::new(size),
    });
}

/// Bytes currently allocated in slot `slot` (leak checks).
pub fn allocated(slot: usize) -> u64 {
    ARENAS[slot]
        .lock()
        .unwrap()
        .as_ref()
        .map_or(0, |a| a.alloc.allocated_bytes())
}

/// The [`Hal`] of the zone in arena slot `SLOT`.
pub struct ZoneHal<const SLOT: usize>;

impl<const SLOT: usize> ZoneHal<SLOT> {
    fn with<R>(f: impl FnOnce(&mut Arena) -> R) -> R {
        let mut g = ARENAS[SLOT].lock().unwrap();
        f(g.as_mut().expect("DMA arena of this zone is not installed"))
    }

    /// Allocates `len` bytes; returns (guest-physical, host) addresses.
    fn alloc(len: u64, align: u64) -> Option<(u64, *mut u8)> {
        Self::with(|a| {
            let off = a.alloc.alloc(len, align)?;
            Some((a.gpa + off, (a.host + off as usize) as *mut u8))
        })
    }

    fn free(paddr: u64) -> bool {
        Self::with(|a| {
            paddr
                .checked_sub(a.gpa)
                .and_then(|off| a.alloc.free(off))
                .is_some()
        })
    }

    fn host_of(paddr: u64, len: usize) -> *mut u8 {
        Self::with(|a| {
            let off = paddr
                .checked_sub(a.gpa)
                .filter(|o| o + len as u64 <= a.size)
                .expect("address outside the zone's DMA arena");
            (a.host + off as usize) as *mut u8
        })
    }
}

// SAFETY: allocations come from a region reserved for this slot (see `install`), are zeroed,
// page-aligned for `dma_alloc`, and never handed out twice until freed.
unsafe impl<const SLOT: usize> Hal for ZoneHal<SLOT> {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let len = (pages * PAGE_SIZE) as u64;
        match Self::alloc(len, PAGE_SIZE as u64) {
            Some((gpa, host)) => {
                // SAFETY: `host` is `len` fresh bytes of the arena.
                unsafe { host.write_bytes(0, len as usize) };
                (gpa, NonNull::new(host).unwrap())
            }
            // virtio-drivers treats physical address 0 as allocation failure.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        if Self::free(paddr) {
            0
        } else {
            -1
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // Only the stock MMIO/PCI transports call this; ours traps register accesses instead.
        NonNull::new(Self::host_of(paddr, size)).unwrap()
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        let (gpa, host) =
            Self::alloc(len as u64, BOUNCE_ALIGN).expect("zone RAM exhausted by bounce buffers");
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the caller guarantees `buffer` is readable; `host` has `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(buffer.cast::<u8>().as_ptr(), host, len) };
        } else {
            // The device may write less than `len`: hand back zeros, not stale guest data.
            // SAFETY: `host` has `len` bytes.
            unsafe { host.write_bytes(0, len) };
        }
        gpa
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let len = buffer.len();
        if direction != BufferDirection::DriverToDevice {
            let host = Self::host_of(paddr, len);
            // SAFETY: the caller guarantees `buffer` is writable and is the one shared at
            // `paddr`; `host` has `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(host, buffer.cast::<u8>().as_ptr(), len) };
        }
        let freed = Self::free(paddr);
        debug_assert!(freed, "unshare of an address that was not shared");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_aligns_reuses_and_coalesces() {
        let mut a = FirstFit::new(0x10000);
        let p = a.alloc(0x1000, 0x1000).unwrap();
        let b = a.alloc(10, 64).unwrap();
        let c = a.alloc(0x1000, 0x1000).unwrap();
        assert_eq!(p, 0);
        assert_eq!(b, 0x1000);
        assert_eq!(c, 0x2000, "aligned past the small block");
        assert_eq!(a.allocated_bytes(), 0x2000 + 10);
        // the hole left by alignment is used by a small allocation
        assert_eq!(a.alloc(100, 64).unwrap(), 0x1040);
        assert_eq!(a.free(b), Some(10));
        assert_eq!(a.free(b), None, "double free is refused");
        assert_eq!(a.free(0x1040), Some(100));
        assert_eq!(a.free(p), Some(0x1000));
        assert_eq!(a.free(c), Some(0x1000));
        assert_eq!(a.allocated_bytes(), 0);
        assert_eq!(a.free.len(), 1, "everything merged back: {:?}", a.free);
        assert_eq!(a.free_bytes(), 0x10000);
        assert!(a.alloc(0x10001, 1).is_none());
        assert_eq!(a.alloc(0x10000, 0x1000), Some(0));
    }

    #[test]
    fn first_fit_survives_churn() {
        let mut a = FirstFit::new(1 << 20);
        let mut live: Vec<u64> = Vec::new();
        let mut x = 12345u64;
        for i in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if live.len() > 40 || (x % 3 == 0 && !live.is_empty()) {
                let k = (x as usize / 3) % live.len();
                assert!(a.free(live.swap_remove(k)).is_some());
            } else {
                let len = 1 + x % 9000;
                let off = a.alloc(len, if i % 2 == 0 { 64 } else { 4096 }).unwrap();
                assert!(off + len <= 1 << 20);
                live.push(off);
            }
        }
        for off in live {
            a.free(off).unwrap();
        }
        assert_eq!(a.free_bytes(), 1 << 20);
        assert_eq!(a.free.len(), 1);
    }

    #[test]
    fn zone_hal_bounces_through_the_arena() {
        let mut backing = vec![0xaau8; 64 * 1024];
        let base = backing.as_mut_ptr();
        // SAFETY: `backing` outlives every use below and is touched only through `base`;
        // slot 3 is used by no other test.
        unsafe { install(3, 0x8000_0000, base, backing.len() as u64) };
        type H = ZoneHal<3>;
        let (pa, va) = H::dma_alloc(2, BufferDirection::Both);
        assert_eq!(pa, 0x8000_0000);
        assert_eq!(pa % PAGE_SIZE as u64, 0);
        // SAFETY: two pages were just allocated at `va`.
        let pages = unsafe { std::slice::from_raw_parts(va.as_ptr(), 2 * PAGE_SIZE) };
        assert!(pages.iter().all(|&b| b == 0));

        let mut data = *b"hello, device";
        let buf = NonNull::from(&mut data[..]);
        // SAFETY: `data` lives across share/unshare.
        let g = unsafe { H::share(buf, BufferDirection::Both) };
        let off = (g - 0x8000_0000) as usize;
        // SAFETY: the bounce buffer is 13 bytes inside `backing`.
        let bounce = unsafe { std::slice::from_raw_parts_mut(base.add(off), 13) };
        assert_eq!(bounce, b"hello, device");
        bounce[0] = b'J';
        // SAFETY: the same buffer that was shared at `g`.
        unsafe { H::unshare(g, buf, BufferDirection::Both) };
        assert_eq!(&data, b"Jello, device");
        // SAFETY: allocated above.
        assert_eq!(unsafe { H::dma_dealloc(pa, va, 2) }, 0);
        assert_eq!(allocated(3), 0);
    }
}
