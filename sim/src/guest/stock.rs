//! The stock `VirtIOBlk` driven the way an interrupt-driven guest does: non-blocking submits,
//! up to a few requests in flight, completion only after the device's interrupt
//! (InterruptStatus read + InterruptACK write, then the used ring); see [`BlkPipe`].

use std::sync::atomic::{fence, AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::{Error, Hal};

use super::IrqWaiter;
use crate::mem::PhysMem;
use crate::transport::{RingAddrs, SimTransport};

pub const SECTOR: u64 = SECTOR_SIZE as u64;

/// What the stock driver accepts when offered (virtio-drivers 0.13, `SUPPORTED_FEATURES`).
pub const STOCK_FEATURES: u64 = (1 << 5) | (1 << 9) | (1 << 28) | (1 << 29) | (1 << 32);

struct Inflight {
    token: u16,
    write: bool,
    sector: u64,
    buf: Vec<u8>,
    req: Box<BlkReq>,
    resp: Box<BlkResp>,
}

/// A finished request.
pub struct Done {
    pub write: bool,
    pub sector: u64,
    pub buf: Vec<u8>,
    pub result: Result<(), Error>,
}

/// A block pipe as an interrupt-driven guest drives it: requests submitted without waiting for
/// each other, completed only after the device's interrupt (InterruptStatus read +
/// InterruptACK write, then the used ring). [`Pipe`] is the stock driver (up to 16 in
/// flight); [`super::deep::DeepPipe`] is ours (up to 64 reads).
pub trait BlkPipe {
    /// The most requests kept in flight.
    fn depth(&self) -> usize;

    fn in_flight(&self) -> usize;

    /// The disk's size in sectors.
    fn capacity(&self) -> u64;

    /// Submits a read of `buf.len()` bytes; waits for room first (requests finished meanwhile
    /// are kept for [`Self::take_done`]).
    fn submit_read(&mut self, irq: &mut IrqWaiter, sector: u64, buf: Vec<u8>) -> Result<()>;

    /// Requests finished so far, in completion order.
    fn take_done(&mut self) -> Vec<Done>;

    /// Whether the used ring holds an entry not completed yet.
    fn used_pending(&mut self) -> bool;

    /// Reads InterruptStatus and acknowledges it.
    fn ack_interrupt(&mut self);

    /// Completes every request in the used ring; returns how many.
    fn complete_used(&mut self) -> Result<usize>;

    /// Completions found in the used ring only after an interrupt wait timed out.
    fn missed_interrupts(&mut self) -> &mut u64;

    /// Waits for an interrupt, acknowledges it, and completes everything in the used ring.
    fn reap(&mut self, irq: &mut IrqWaiter) -> Result<()> {
        if self.in_flight() == 0 {
            return Ok(());
        }
        loop {
            if !irq.wait() {
                if !self.used_pending() {
                    bail!(
                        "{} requests in flight and no interrupt within {:?}{}",
                        self.in_flight(),
                        irq.timeout(),
                        if irq.broker_gone() {
                            " (the broker went away)"
                        } else {
                            ""
                        }
                    );
                }
                *self.missed_interrupts() += 1;
            } else {
                self.ack_interrupt();
            }
            let completed = self.complete_used()?;
            irq.eoi();
            if completed > 0 {
                return Ok(());
            }
        }
    }

    fn drain(&mut self, irq: &mut IrqWaiter) -> Result<()> {
        while self.in_flight() > 0 {
            self.reap(irq)?;
        }
        Ok(())
    }
}

pub struct Pipe<'a, H: Hal> {
    pub blk: VirtIOBlk<H, SimTransport<'a>>,
    mem: &'a PhysMem,
    zone: u32,
    rings: Arc<Mutex<Option<RingAddrs>>>,
    inflight: Vec<Inflight>,
    finished: Vec<Done>,
    depth: usize,
    /// Features the stock driver negotiated.
    pub features: u64,
    /// Completions found in the used ring only after an interrupt wait timed out.
    pub missed_interrupts: u64,
}

impl<'a, H: Hal> Pipe<'a, H> {
    /// Probes the device features, then lets the stock driver initialise the device.
    pub fn open(mut t: SimTransport<'a>, mem: &'a PhysMem, depth: usize) -> Result<Self> {
        use virtio_drivers::transport::Transport;
        let features = t.read_device_features() & STOCK_FEATURES;
        let zone = t.vcpu().zone();
        let rings = t.rings();
        let blk = VirtIOBlk::new(t)?;
        Ok(Pipe {
            blk,
            mem,
            zone,
            rings,
            inflight: Vec::new(),
            finished: Vec::new(),
            depth,
            features,
            missed_interrupts: 0,
        })
    }

    /// Whether `[sector, sector + count)` conflicts with a request in flight: a write
    /// conflicts with anything, a read only with writes.
    pub fn conflicts(&self, sector: u64, count: u64, write: bool) -> bool {
        self.inflight.iter().any(|r| {
            let rc = r.buf.len() as u64 / SECTOR;
            (write || r.write) && sector < r.sector + rc && r.sector < sector + count
        })
    }

    /// Submits a read (`buf` is its size) or a write (`buf` is its data); waits for room first
    /// (requests finished meanwhile are kept for [`Self::take_done`]).
    pub fn submit(
        &mut self,
        irq: &mut IrqWaiter,
        write: bool,
        sector: u64,
        mut buf: Vec<u8>,
    ) -> Result<()> {
        while self.inflight.len() >= self.depth {
            self.reap(irq)?;
        }
        let mut req = Box::new(BlkReq::default());
        let mut resp = Box::new(BlkResp::default());
        loop {
            // SAFETY: `req`, `buf` and `resp` move into `inflight` (their heap storage does
            // not move) and are touched again only by `complete_*` with the same token.
            let r = unsafe {
                if write {
                    self.blk
                        .write_blocks_nb(sector as usize, &mut req, &buf, &mut resp)
                } else {
                    self.blk
                        .read_blocks_nb(sector as usize, &mut req, &mut buf, &mut resp)
                }
            };
            match r {
                Ok(token) => {
                    self.inflight.push(Inflight {
                        token,
                        write,
                        sector,
                        buf,
                        req,
                        resp,
                    });
                    return Ok(());
                }
                Err(Error::QueueFull) if !self.inflight.is_empty() => self.reap(irq)?,
                Err(e) => bail!("submitting a request at sector {sector}: {e}"),
            }
        }
    }

    /// A blocking call of the stock driver (FLUSH, GET_ID) spins on the used ring itself. An
    /// interrupt that came meanwhile must be acknowledged, or a device that raises its line only
    /// after ACK would go quiet. None may come at all: with EVENT_IDX the driver has already
    /// consumed the entry (and said so in `used_event`) when the device decides, so the device
    /// rightly stays silent; one that comes later is taken by the next wait as a stale one.
    pub fn settle_interrupt(&mut self, irq: &mut IrqWaiter) {
        if irq.wait_for(Duration::ZERO) {
            self.blk.ack_interrupt();
            irq.eoi();
        }
    }

    /// FLUSH; false when the device does not offer it (nothing was sent).
    pub fn flush(&mut self, irq: &mut IrqWaiter) -> Result<bool> {
        if self.features & (1 << 9) == 0 {
            return Ok(false);
        }
        self.bounded("FLUSH", irq.timeout(), |blk| blk.flush())??;
        self.settle_interrupt(irq);
        Ok(true)
    }

    pub fn device_id(&mut self, irq: &mut IrqWaiter) -> Result<String> {
        let mut id = [0u8; 20];
        let n = self.bounded("GET_ID", irq.timeout(), |blk| blk.device_id(&mut id))??;
        self.settle_interrupt(irq);
        Ok(String::from_utf8_lossy(&id[..n]).into_owned())
    }

    /// Runs a blocking call of the stock driver, which spins on the used ring for ever. If
    /// the device has not answered within `timeout`, the guest gives up on the request the
    /// way a driver's timeout handler would: it retires the chain itself (a used entry of
    /// length 0), which ends the spin; the device is then treated as failed.
    fn bounded<R>(
        &mut self,
        what: &str,
        timeout: Duration,
        f: impl FnOnce(&mut VirtIOBlk<H, SimTransport<'a>>) -> R,
    ) -> Result<R> {
        if self.in_flight() > 0 {
            bail!("{what} with requests in flight");
        }
        let rings = (*self.rings.lock().unwrap()).context("queue 0 is not set up")?;
        let (mem, zone) = (self.mem, self.zone);
        let done = AtomicBool::new(false);
        let gave_up = AtomicBool::new(false);
        let r = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let deadline = Instant::now() + timeout;
                while !done.load(Ordering::Acquire) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        gave_up.store(retire_last_chain(mem, zone, &rings), Ordering::Release);
                        return;
                    }
                    std::thread::park_timeout(left);
                }
            });
            let r = f(&mut self.blk);
            done.store(true, Ordering::Release);
            watcher.thread().unpark();
            r
        });
        if gave_up.load(Ordering::Acquire) {
            bail!("the device did not complete {what} within {timeout:?}; the guest gave up on it");
        }
        Ok(r)
    }
}

impl<H: Hal> BlkPipe for Pipe<'_, H> {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn capacity(&self) -> u64 {
        self.blk.capacity()
    }

    fn submit_read(&mut self, irq: &mut IrqWaiter, sector: u64, buf: Vec<u8>) -> Result<()> {
        self.submit(irq, false, sector, buf)
    }

    fn take_done(&mut self) -> Vec<Done> {
        std::mem::take(&mut self.finished)
    }

    fn used_pending(&mut self) -> bool {
        self.blk.peek_used().is_some()
    }

    fn ack_interrupt(&mut self) {
        self.blk.ack_interrupt();
    }

    fn complete_used(&mut self) -> Result<usize> {
        let mut n = 0;
        loop {
            // Pairs with the device's fence between publishing `used.idx` and reading
            // `used_event`: either we see its entry or it sees our new `used_event`.
            fence(Ordering::SeqCst);
            let Some(token) = self.blk.peek_used() else {
                return Ok(n);
            };
            let Some(i) = self.inflight.iter().position(|r| r.token == token) else {
                bail!("the device returned token {token}, which is not in flight");
            };
            let mut r = self.inflight.swap_remove(i);
            // SAFETY: the buffers are those submitted with `token`.
            let result = unsafe {
                if r.write {
                    self.blk
                        .complete_write_blocks(token, &r.req, &r.buf, &mut r.resp)
                } else {
                    self.blk
                        .complete_read_blocks(token, &r.req, &mut r.buf, &mut r.resp)
                }
            };
            n += 1;
            self.finished.push(Done {
                write: r.write,
                sector: r.sector,
                buf: r.buf,
                result,
            });
        }
    }

    fn missed_interrupts(&mut self) -> &mut u64 {
        &mut self.missed_interrupts
    }
}

/// Puts the most recently added chain of the queue into its used ring, as if the device had
/// completed it having written nothing. False if the rings are not in the zone's RAM.
fn retire_last_chain(mem: &PhysMem, zone: u32, r: &RingAddrs) -> bool {
    let size = r.size as u64;
    let (Some(avail), Some(used)) = (
        mem.translate(zone, r.avail, 4 + 2 * size),
        mem.translate(zone, r.used, 4 + 8 * size),
    ) else {
        return false;
    };
    // SAFETY: both rings lie inside the zone's mapping (`translate` checked their whole
    // extent) and are 4-byte aligned; the indices are accessed atomically, as the device and
    // the driver do, and the used slot written is one the device has not published.
    unsafe {
        let avail_idx = (*avail.add(2).cast::<AtomicU16>()).load(Ordering::Acquire);
        let slot = (avail_idx.wrapping_sub(1) as u64 % size) as usize;
        let head = avail.add(4 + 2 * slot).cast::<u16>().read_volatile();
        let used_idx = &*used.add(2).cast::<AtomicU16>();
        let ui = used_idx.load(Ordering::Acquire);
        let elem = used.add(4 + 8 * (ui as u64 % size) as usize);
        elem.cast::<u32>().write_volatile(head as u32);
        elem.add(4).cast::<u32>().write_volatile(0);
        used_idx.store(ui.wrapping_add(1), Ordering::Release);
    }
    true
}
