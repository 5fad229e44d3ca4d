//! The shared page between hvisor (EL2), `hvisor.ko` and the backend daemon.
//!
//! Layout and constants must match the running hypervisor exactly (MAX_REQ = 32, MAX_CPUS = 32,
//! MAX_DEVS = 8 since mid-2025): a mismatch corrupts the page. The unit tests pin every offset.

use std::cell::UnsafeCell;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicU8, Ordering};

pub const MAX_REQ: u32 = 32;
pub const MAX_CPUS: usize = 32;
pub const MAX_DEVS: usize = 8;
pub const MAX_ZONES: usize = MAX_CPUS;
/// What hvisor-tool maps; the bridge itself is [`BRIDGE_SIZE`] bytes.
pub const MMAP_SIZE: usize = 4096;
pub const BRIDGE_SIZE: usize = 2136;
/// Offset of the QueueNotify register: the only access the hypervisor does not wait for.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

const _: () = assert!(MAX_REQ.is_power_of_two());

/// One trapped guest MMIO access (`struct device_req`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceReq {
    /// Physical CPU of the trapped vCPU; indexes `cfg_flags`/`cfg_values`.
    pub src_cpu: u64,
    /// Absolute guest-physical address of the register.
    pub address: u64,
    pub size: u64,
    pub value: u64,
    pub src_zone: u32,
    pub is_write: u8,
    /// 1 exactly for QueueNotify: the vCPU does not wait for an answer.
    pub need_interrupt: u8,
    pub padding: u16,
}

/// "Inject `irq_id` into `target_zone`" (`struct device_res`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceRes {
    pub target_zone: u32,
    pub irq_id: u32,
}

/// `struct virtio_bridge`. Indices and flags are atomics; ring slots are plain memory owned by
/// whichever side the indices say, accessed with volatile copies.
#[repr(C)]
pub struct VirtioBridge {
    pub req_front: AtomicU32,
    pub req_rear: AtomicU32,
    pub res_front: AtomicU32,
    pub res_rear: AtomicU32,
    req_list: [UnsafeCell<DeviceReq>; MAX_REQ as usize],
    res_list: [UnsafeCell<DeviceRes>; MAX_REQ as usize],
    pub cfg_flags: [AtomicU64; MAX_CPUS],
    pub cfg_values: [AtomicU64; MAX_CPUS],
    pub mmio_addrs: [AtomicU64; MAX_DEVS],
    pub mmio_avail: AtomicU8,
    pub need_wakeup: AtomicU8,
}

const _: () = assert!(std::mem::size_of::<VirtioBridge>() == BRIDGE_SIZE);
const _: () = assert!(std::mem::size_of::<DeviceReq>() == 40);
const _: () = assert!(std::mem::size_of::<DeviceRes>() == 8);

// SAFETY: every field is either atomic or a ring slot whose ownership is handed over through the
// atomic indices with acquire/release ordering, as the hvisor protocol prescribes.
unsafe impl Sync for VirtioBridge {}

#[inline]
fn next(i: u32) -> u32 {
    (i + 1) & (MAX_REQ - 1)
}

impl VirtioBridge {
    // ---- backend (consumer of requests, producer of interrupts) ----

    /// The oldest unconsumed request, if any. Call [`Self::pop_req`] after handling it: the slot
    /// belongs to the backend until the front index moves.
    pub fn peek_req(&self) -> Option<DeviceReq> {
        let front = self.req_front.load(Ordering::Relaxed) & (MAX_REQ - 1);
        if self.req_rear.load(Ordering::Acquire) & (MAX_REQ - 1) == front {
            return None;
        }
        // SAFETY: the slot at `front` was published by the producer (release store of
        // `req_rear`, acquired above) and is not reused until we advance `req_front`.
        Some(unsafe { self.req_list[front as usize].get().read_volatile() })
    }

    /// Releases the slot returned by [`Self::peek_req`] to the producer.
    pub fn pop_req(&self) {
        let front = self.req_front.load(Ordering::Relaxed) & (MAX_REQ - 1);
        self.req_front.store(next(front), Ordering::Release);
    }

    /// Whether requests are waiting (used in the sleep handshake).
    pub fn has_req(&self) -> bool {
        self.req_rear.load(Ordering::Acquire) & (MAX_REQ - 1)
            != self.req_front.load(Ordering::Relaxed) & (MAX_REQ - 1)
    }

    /// Answers a synchronous access from `cpu`: the value first, then the flag the vCPU spins on.
    /// Returns false (and touches nothing) for a CPU number outside the page.
    pub fn complete(&self, cpu: u64, value: u64) -> bool {
        let Some(slot) = self.cfg_values.get(cpu as usize) else {
            return false;
        };
        slot.store(value, Ordering::Relaxed);
        fence(Ordering::Release);
        self.cfg_flags[cpu as usize].fetch_add(1, Ordering::Release);
        true
    }

    /// Queues an interrupt for the hypervisor. False when the ring is full (31 entries): the
    /// caller must flush with FINISH_REQ first; the ring is never overrun.
    pub fn push_res(&self, res: DeviceRes) -> bool {
        let rear = self.res_rear.load(Ordering::Relaxed) & (MAX_REQ - 1);
        if next(rear) == self.res_front.load(Ordering::Acquire) & (MAX_REQ - 1) {
            return false;
        }
        // SAFETY: slots between rear and front-1 belong to the backend until `res_rear` moves.
        unsafe { self.res_list[rear as usize].get().write_volatile(res) };
        self.res_rear.store(next(rear), Ordering::Release);
        true
    }

    /// Looks for a request up to `times` times, without a system call; true once one is there.
    pub fn spin_for_req(&self, times: u32) -> bool {
        for _ in 0..times {
            if self.has_req() {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    /// Dekker-style sleep: announce the sleep, then re-check. Returns true if the caller may
    /// sleep; false if a request slipped in (the flag is cleared again).
    pub fn prepare_sleep(&self) -> bool {
        self.need_wakeup.store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.has_req() {
            self.need_wakeup.store(0, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub fn awake(&self) {
        self.need_wakeup.store(0, Ordering::Relaxed);
    }

    // ---- hypervisor side (used by the simulator) ----

    /// Publishes a request. The caller serialises producers (hvisor's `req_lock`).
    /// False when the ring is full.
    pub fn push_req(&self, req: DeviceReq) -> bool {
        let rear = self.req_rear.load(Ordering::Relaxed) & (MAX_REQ - 1);
        if next(rear) == self.req_front.load(Ordering::Acquire) & (MAX_REQ - 1) {
            return false;
        }
        // SAFETY: the slot at `rear` is free (the ring is not full) and owned by the producer
        // until the release store below publishes it.
        unsafe { self.req_list[rear as usize].get().write_volatile(req) };
        self.req_rear.store(next(rear), Ordering::Release);
        true
    }

    /// Takes the oldest interrupt request, as hypercall FINISH_REQ does.
    pub fn pop_res(&self) -> Option<DeviceRes> {
        let front = self.res_front.load(Ordering::Relaxed) & (MAX_REQ - 1);
        if self.res_rear.load(Ordering::Acquire) & (MAX_REQ - 1) == front {
            return None;
        }
        // SAFETY: published by the backend's release store of `res_rear`, acquired above.
        let res = unsafe { self.res_list[front as usize].get().read_volatile() };
        self.res_front.store(next(front), Ordering::Release);
        Some(res)
    }

    /// Whether the backend asked to be woken (read after publishing a request).
    pub fn wants_wakeup(&self) -> bool {
        fence(Ordering::SeqCst);
        self.need_wakeup.load(Ordering::Relaxed) == 1
    }
}

/// A shared mapping of the bridge page (`mmap(fd, offset 0)` after INIT_VIRTIO, or the
/// simulator's memfd).
pub struct BridgeMap {
    ptr: NonNull<VirtioBridge>,
}

// SAFETY: the mapping is process-wide shared memory; all access goes through `VirtioBridge`,
// which is Sync.
unsafe impl Send for BridgeMap {}
// SAFETY: as above.
unsafe impl Sync for BridgeMap {}

impl BridgeMap {
    /// Maps [`MMAP_SIZE`] bytes of `fd` at offset 0, read-write and shared.
    pub fn map(fd: BorrowedFd<'_>) -> nix::Result<Self> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        // SAFETY: a fresh shared mapping that nothing else in this process aliases; the kernel
        // (or the simulator's memfd of at least 4096 bytes) backs all of it.
        let ptr = unsafe {
            mmap(
                None,
                std::num::NonZeroUsize::new(MMAP_SIZE).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )?
        };
        Ok(Self { ptr: ptr.cast() })
    }
}

impl std::ops::Deref for BridgeMap {
    type Target = VirtioBridge;
    fn deref(&self) -> &VirtioBridge {
        // SAFETY: the mapping is page-aligned, at least BRIDGE_SIZE long and lives until drop;
        // every field of VirtioBridge is valid for any bit pattern.
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for BridgeMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; no reference outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), MMAP_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_hvisor_h() {
        assert_eq!(offset_of!(VirtioBridge, req_front), 0);
        assert_eq!(offset_of!(VirtioBridge, req_rear), 4);
        assert_eq!(offset_of!(VirtioBridge, res_front), 8);
        assert_eq!(offset_of!(VirtioBridge, res_rear), 12);
        assert_eq!(offset_of!(VirtioBridge, req_list), 16);
        assert_eq!(offset_of!(VirtioBridge, res_list), 1296);
        assert_eq!(offset_of!(VirtioBridge, cfg_flags), 1552);
        assert_eq!(offset_of!(VirtioBridge, cfg_values), 1808);
        assert_eq!(offset_of!(VirtioBridge, mmio_addrs), 2064);
        assert_eq!(offset_of!(VirtioBridge, mmio_avail), 2128);
        assert_eq!(offset_of!(VirtioBridge, need_wakeup), 2129);
        assert_eq!(size_of::<VirtioBridge>(), 2136);
        assert!(size_of::<VirtioBridge>() <= MMAP_SIZE);

        assert_eq!(offset_of!(DeviceReq, src_cpu), 0);
        assert_eq!(offset_of!(DeviceReq, address), 8);
        assert_eq!(offset_of!(DeviceReq, size), 16);
        assert_eq!(offset_of!(DeviceReq, value), 24);
        assert_eq!(offset_of!(DeviceReq, src_zone), 32);
        assert_eq!(offset_of!(DeviceReq, is_write), 36);
        assert_eq!(offset_of!(DeviceReq, need_interrupt), 37);
        assert_eq!(offset_of!(DeviceReq, padding), 38);
        assert_eq!(offset_of!(DeviceRes, target_zone), 0);
        assert_eq!(offset_of!(DeviceRes, irq_id), 4);
    }

    fn page() -> Box<VirtioBridge> {
        // SAFETY: all-zero bytes are a valid VirtioBridge (atomics and plain integers).
        unsafe { Box::new(std::mem::zeroed()) }
    }

    #[test]
    fn request_ring_holds_31_and_keeps_order() {
        let b = page();
        for i in 0..31 {
            assert!(b.push_req(DeviceReq {
                address: i,
                ..Default::default()
            }));
        }
        assert!(!b.push_req(DeviceReq::default()), "a full ring must refuse");
        for i in 0..31 {
            assert_eq!(b.peek_req().unwrap().address, i);
            b.pop_req();
        }
        assert!(b.peek_req().is_none());
        // wraps around
        for round in 0..100u64 {
            assert!(b.push_req(DeviceReq {
                value: round,
                ..Default::default()
            }));
            assert_eq!(b.peek_req().unwrap().value, round);
            b.pop_req();
        }
    }

    #[test]
    fn spinning_sees_a_request_and_gives_up_without_one() {
        let b = page();
        assert!(!b.spin_for_req(100));
        assert!(b.push_req(DeviceReq::default()));
        assert!(b.spin_for_req(1));
        b.pop_req();
        assert!(!b.spin_for_req(1));
    }

    #[test]
    fn response_ring_never_overflows() {
        let b = page();
        for i in 0..31 {
            assert!(b.push_res(DeviceRes {
                target_zone: 1,
                irq_id: i
            }));
        }
        assert!(!b.push_res(DeviceRes::default()));
        assert_eq!(
            b.pop_res(),
            Some(DeviceRes {
                target_zone: 1,
                irq_id: 0
            })
        );
        assert!(b.push_res(DeviceRes::default()));
    }

    #[test]
    fn complete_bumps_flag_after_value_and_rejects_bad_cpu() {
        let b = page();
        assert!(b.complete(3, 0xabcd));
        assert_eq!(b.cfg_values[3].load(Ordering::Relaxed), 0xabcd);
        assert_eq!(b.cfg_flags[3].load(Ordering::Relaxed), 1);
        assert!(!b.complete(32, 1));
        assert!(!b.complete(u64::MAX, 1));
    }

    #[test]
    fn sleep_handshake_sees_late_request() {
        let b = page();
        assert!(b.prepare_sleep());
        assert!(b.wants_wakeup());
        b.awake();
        b.push_req(DeviceReq::default());
        assert!(!b.prepare_sleep());
        assert!(!b.wants_wakeup());
    }
}
