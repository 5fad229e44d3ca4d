//! The stock `VirtIOBlk` driven the way an interrupt-driven guest does: non-blocking submits,
//! up to a few requests in flight, completion only after the device's interrupt
//! (InterruptStatus read + InterruptACK write, then the used ring).

use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use anyhow::{bail, Result};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::{Error, Hal};

use super::IrqWaiter;
use crate::transport::SimTransport;

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

pub struct Pipe<'a, H: Hal> {
    pub blk: VirtIOBlk<H, SimTransport<'a>>,
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
    pub fn open(mut t: SimTransport<'a>, depth: usize) -> Result<Self> {
        use virtio_drivers::transport::Transport;
        let features = t.read_device_features() & STOCK_FEATURES;
        let blk = VirtIOBlk::new(t)?;
        Ok(Pipe {
            blk,
            inflight: Vec::new(),
            finished: Vec::new(),
            depth,
            features,
            missed_interrupts: 0,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether `[sector, sector + count)` conflicts with a request in flight: a write
    /// conflicts with anything, a read only with writes.
    pub fn conflicts(&self, sector: u64, count: u64, write: bool) -> bool {
        self.inflight.iter().any(|r| {
            let rc = r.buf.len() as u64 / SECTOR;
            (write || r.write) && sector < r.sector + rc && r.sector < sector + count
        })
    }

    /// Requests finished so far, in completion order.
    pub fn take_done(&mut self) -> Vec<Done> {
        std::mem::take(&mut self.finished)
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

    /// Waits for an interrupt, acknowledges it, and completes everything in the used ring.
    pub fn reap(&mut self, irq: &mut IrqWaiter) -> Result<()> {
        if self.inflight.is_empty() {
            return Ok(());
        }
        loop {
            if !irq.wait() {
                if self.blk.peek_used().is_none() {
                    bail!(
                        "{} requests in flight and no interrupt within {:?}{}",
                        self.inflight.len(),
                        irq.timeout(),
                        if irq.broker_gone() {
                            " (the broker went away)"
                        } else {
                            ""
                        }
                    );
                }
                self.missed_interrupts += 1;
            } else {
                self.blk.ack_interrupt();
            }
            if self.complete_used()? > 0 {
                return Ok(());
            }
        }
    }

    /// Completes every request in the used ring; returns how many.
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

    pub fn drain(&mut self, irq: &mut IrqWaiter) -> Result<()> {
        while !self.inflight.is_empty() {
            self.reap(irq)?;
        }
        Ok(())
    }

    /// A blocking call of the stock driver (FLUSH, GET_ID) spins on the used ring itself; its
    /// interrupt still comes and must be acknowledged, or a device that raises its line only
    /// after ACK would go quiet.
    pub fn settle_interrupt(&mut self, irq: &mut IrqWaiter) {
        if irq.wait_for(Duration::from_secs(2)) {
            self.blk.ack_interrupt();
        } else {
            self.missed_interrupts += 1;
        }
    }

    /// FLUSH; false when the device does not offer it (nothing was sent).
    pub fn flush(&mut self, irq: &mut IrqWaiter) -> Result<bool> {
        if self.features & (1 << 9) == 0 {
            return Ok(false);
        }
        self.blk.flush()?;
        self.settle_interrupt(irq);
        Ok(true)
    }

    pub fn device_id(&mut self, irq: &mut IrqWaiter) -> Result<String> {
        let mut id = [0u8; 20];
        let n = self.blk.device_id(&mut id)?;
        self.settle_interrupt(irq);
        Ok(String::from_utf8_lossy(&id[..n]).into_owned())
    }
}
