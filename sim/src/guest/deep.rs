//! [`DeepPipe`]: up to [`MAX_DEPTH`] reads in flight on our own driver with a queue of
//! [`QUEUE`], for the depths the stock driver's queue of 16 cannot keep (`depth-bench` above
//! 16). It is driven as [`super::stock::Pipe`] is: submits do not wait for each other,
//! completions come by interrupt ([`BlkPipe::reap`]).

use std::sync::atomic::{fence, Ordering};

use anyhow::{bail, Context, Result};
use virtio_drivers::{Error, Hal};

use super::rawblk::{feat, req, status, RawBlk};
use super::stock::{BlkPipe, Done};
use super::IrqWaiter;
use crate::transport::SimTransport;

/// The most reads kept in flight: three descriptors each, so they fit the queue.
pub const MAX_DEPTH: usize = 64;
/// The queue size; the device must offer at least this many (QueueNumMax).
pub const QUEUE: usize = 256;
/// What we negotiate when offered: the stock driver's choice for reads (no indirect
/// descriptors: the queue is long enough).
const FEATURES: u64 = feat::VERSION_1 | feat::RO | feat::EVENT_IDX;

/// A read in flight: everything the device may touch until it is popped.
struct Read {
    token: u16,
    sector: u64,
    hdr: Box<[u8; 16]>,
    buf: Vec<u8>,
    status: Box<[u8; 1]>,
}

pub struct DeepPipe<'a, H: Hal> {
    pub blk: RawBlk<'a, H, QUEUE>,
    inflight: Vec<Read>,
    finished: Vec<Done>,
    depth: usize,
    pub missed_interrupts: u64,
}

impl<'a, H: Hal> DeepPipe<'a, H> {
    /// Resets and initialises the device with a queue of [`QUEUE`]; keeps up to `depth` reads
    /// in flight.
    pub fn open(t: SimTransport<'a>, depth: usize) -> Result<Self> {
        anyhow::ensure!(
            (1..=MAX_DEPTH).contains(&depth),
            "queue depth {depth}: our driver keeps 1 to {MAX_DEPTH} reads in flight"
        );
        let blk = RawBlk::init(t, FEATURES)
            .with_context(|| format!("initialisation with a queue of {QUEUE}"))?;
        Ok(DeepPipe {
            blk,
            inflight: Vec::with_capacity(depth),
            finished: Vec::new(),
            depth,
            missed_interrupts: 0,
        })
    }
}

impl<H: Hal> BlkPipe for DeepPipe<'_, H> {
    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn capacity(&self) -> u64 {
        self.blk.config.capacity
    }

    fn submit_read(&mut self, irq: &mut IrqWaiter, sector: u64, mut buf: Vec<u8>) -> Result<()> {
        while self.inflight.len() >= self.depth {
            self.reap(irq)?;
        }
        let mut hdr = Box::new([0u8; 16]);
        hdr[..4].copy_from_slice(&req::IN.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        let mut status = Box::new([0xffu8; 1]);
        // SAFETY: `hdr`, `buf` and `status` move into `inflight` (their heap storage does not
        // move) and are touched again only by `complete_used`, which pops them by `token`, or
        // after the reset in RawBlk's Drop.
        let token = unsafe {
            self.blk
                .submit(&[&hdr[..]], &mut [&mut buf[..], &mut status[..]])
        };
        let token = match token {
            Ok(t) => t,
            Err(e) => bail!("submitting a read at sector {sector}: {e}"),
        };
        self.inflight.push(Read {
            token,
            sector,
            hdr,
            buf,
            status,
        });
        Ok(())
    }

    fn take_done(&mut self) -> Vec<Done> {
        std::mem::take(&mut self.finished)
    }

    fn used_pending(&mut self) -> bool {
        self.blk.peek_used().is_some()
    }

    fn ack_interrupt(&mut self) {
        self.blk.transport().read_isr_and_ack();
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
            // SAFETY: the buffers submitted with `token`, kept in `inflight` until now.
            unsafe {
                self.blk.pop(
                    token,
                    &[&r.hdr[..]],
                    &mut [&mut r.buf[..], &mut r.status[..]],
                )
            }
            .with_context(|| format!("taking the read at sector {}", r.sector))?;
            let result = match r.status[0] {
                status::OK => Ok(()),
                status::UNSUPP => Err(Error::Unsupported),
                _ => Err(Error::IoError),
            };
            n += 1;
            self.finished.push(Done {
                write: false,
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
