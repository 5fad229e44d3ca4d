//! A minimal virtio-blk driver of our own on `virtio_drivers::queue::VirtQueue`, for what the
//! stock driver does not do: DISCARD, WRITE_ZEROES, BLK_SIZE, the full config space, and
//! queues longer than its 16 (the queue size is a parameter, see [`super::deep`]).

use anyhow::{bail, Context, Result};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::Hal;

use super::IrqWaiter;
use crate::report::BlkConfigValues;
use crate::transport::SimTransport;

/// Feature bits (virtio 1.2, 5.2.3 and 6).
pub mod feat {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
    pub const INDIRECT_DESC: u64 = 1 << 28;
    pub const EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Request types.
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;

    pub fn name(s: u8) -> String {
        match s {
            OK => "OK".into(),
            IOERR => "IOERR".into(),
            UNSUPP => "UNSUPP".into(),
            other => format!("status {other}"),
        }
    }
}

/// Everything this driver asks for.
pub const WANTED: u64 = feat::VERSION_1
    | feat::FLUSH
    | feat::DISCARD
    | feat::WRITE_ZEROES
    | feat::RO
    | feat::BLK_SIZE
    | feat::SEG_MAX
    | feat::SIZE_MAX;

/// The queue size unless a user asks for another.
const QUEUE_SIZE: usize = 16;

pub struct RawBlk<'a, H: Hal, const N: usize = QUEUE_SIZE> {
    t: SimTransport<'a>,
    q: VirtQueue<H, N>,
    pub device_features: u64,
    pub negotiated: u64,
    pub config: BlkConfigValues,
}

impl<'a, H: Hal, const N: usize> RawBlk<'a, H, N> {
    /// Resets the device (Status 0) and initialises it from scratch (virtio 3.1.1).
    pub fn init(mut t: SimTransport<'a>, wanted: u64) -> Result<Self> {
        let (device_features, negotiated) = t.negotiate(wanted)?;
        let config = read_config(&t).context("reading config space")?;
        let event_idx = negotiated & feat::EVENT_IDX != 0;
        let q = VirtQueue::new(&mut t, 0, false, event_idx).context("setting up queue 0")?;
        t.driver_ok();
        Ok(RawBlk {
            t,
            q,
            device_features,
            negotiated,
            config,
        })
    }

    pub fn has(&self, f: u64) -> bool {
        self.negotiated & f != 0
    }

    /// One request, waited for by interrupt. `out` goes to the device after the header,
    /// `inp` comes back before the status byte. Returns the status byte.
    pub fn request(
        &mut self,
        irq: &mut IrqWaiter,
        typ: u32,
        sector: u64,
        out: &[u8],
        inp: &mut [u8],
    ) -> Result<u8> {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&typ.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        let mut st = [0xffu8; 1];
        let mut inputs: Vec<&[u8]> = vec![&hdr];
        if !out.is_empty() {
            inputs.push(out);
        }
        let mut outputs: Vec<&mut [u8]> = Vec::new();
        if !inp.is_empty() {
            outputs.push(inp);
        }
        outputs.push(&mut st);
        // SAFETY: the buffers live on this frame until `pop_used` below returns them.
        let token = unsafe { self.submit(&inputs, &mut outputs) }?;
        loop {
            if !irq.wait() {
                if self.q.can_pop() {
                    bail!("request completed but its interrupt never came");
                }
                bail!(
                    "no completion of request type {typ} within {:?}{}",
                    irq.timeout(),
                    if irq.broker_gone() {
                        " (broker gone)"
                    } else {
                        ""
                    }
                );
            }
            self.t.read_isr_and_ack();
            let done = self.q.can_pop();
            irq.eoi();
            if done {
                break;
            }
        }
        // SAFETY: the same buffers as passed to `add` for `token`.
        unsafe { self.q.pop_used(token, &inputs, &mut outputs) }?;
        Ok(st[0])
    }

    /// Offers a chain and notifies the device if it asks to be.
    ///
    /// # Safety
    /// As [`VirtQueue::add`]: the buffers stay valid and untouched until [`Self::pop`] (or a
    /// reset) gives them back.
    pub unsafe fn submit<'b>(
        &mut self,
        inputs: &[&'b [u8]],
        outputs: &mut [&'b mut [u8]],
    ) -> virtio_drivers::Result<u16> {
        // SAFETY: the caller keeps the buffers as `add` requires.
        let token = unsafe { self.q.add(inputs, outputs) }?;
        if self.q.should_notify() {
            self.t.notify(0);
        }
        Ok(token)
    }

    /// The token of the next used entry, if the device has published one.
    pub fn peek_used(&self) -> Option<u16> {
        self.q.peek_used()
    }

    /// Takes the next used entry, which must be `token`'s; returns the length written.
    ///
    /// # Safety
    /// As [`VirtQueue::pop_used`]: the buffers are those submitted with `token`.
    pub unsafe fn pop<'b>(
        &mut self,
        token: u16,
        inputs: &'b [&'b [u8]],
        outputs: &'b mut [&'b mut [u8]],
    ) -> virtio_drivers::Result<u32> {
        // SAFETY: the caller passes the buffers of `token`.
        unsafe { self.q.pop_used(token, inputs, outputs) }
    }

    /// Reads sector 0 and, while its interrupt is still being handled (taken and ACKed, no
    /// EOI yet, as in Linux's `vm_interrupt`), sector 1: the device completes the second
    /// request and its injection meets the active interrupt. After the EOI the second request
    /// sits in the used ring; returns whether an interrupt for it came within `wait`.
    pub fn completion_inside_handler(
        &mut self,
        irq: &mut IrqWaiter,
        wait: std::time::Duration,
    ) -> Result<bool> {
        let header = |sector: u64| {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&req::IN.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            h
        };
        let (ha, hb) = (header(0), header(1));
        let (mut da, mut sa, mut db, mut sb) = ([0u8; 512], [0xffu8], [0u8; 512], [0xffu8]);
        let (ia, ib): ([&[u8]; 1], [&[u8]; 1]) = ([&ha], [&hb]);
        let mut oa: [&mut [u8]; 2] = [&mut da, &mut sa];
        let mut ob: [&mut [u8]; 2] = [&mut db, &mut sb];
        // SAFETY: the buffers live on this frame until `pop_used` returns them or the device
        // is reset (Drop) before they go.
        let ta = unsafe { self.q.add(&ia, &mut oa) }?;
        self.t.notify(0);
        anyhow::ensure!(irq.wait(), "the first request's interrupt never came");
        self.t.read_isr_and_ack();
        let seen = irq.injections();
        // SAFETY: as above.
        let tb = unsafe { self.q.add(&ib, &mut ob) }?;
        self.t.notify(0);
        anyhow::ensure!(
            irq.wait_injections(seen, irq.timeout()),
            "the second request was never signalled"
        );
        // SAFETY: the buffers passed to `add` for `ta`; the device completes in order.
        unsafe { self.q.pop_used(ta, &ia, &mut oa) }?;
        irq.eoi();
        let signalled = irq.wait_for(wait);
        if signalled {
            self.t.read_isr_and_ack();
            irq.eoi();
            // SAFETY: the buffers passed to `add` for `tb`.
            unsafe { self.q.pop_used(tb, &ib, &mut ob) }?;
        }
        Ok(signalled)
    }

    /// DISCARD or WRITE_ZEROES of one range (`struct virtio_blk_discard_write_zeroes`).
    pub fn range_op(
        &mut self,
        irq: &mut IrqWaiter,
        typ: u32,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<u8> {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..].copy_from_slice(&(unmap as u32).to_le_bytes());
        self.request(irq, typ, 0, &seg, &mut [])
    }

    pub fn transport(&mut self) -> &mut SimTransport<'a> {
        &mut self.t
    }
}

impl<H: Hal, const N: usize> Drop for RawBlk<'_, H, N> {
    fn drop(&mut self) {
        // Reset before the rings are freed, so the device stops looking at them.
        self.t.set_status(DeviceStatus::empty());
    }
}

/// `struct virtio_blk_config`, field by field at each field's natural width.
fn read_config(t: &SimTransport<'_>) -> Result<BlkConfigValues> {
    let c = t.read_consistent(|| {
        Ok(BlkConfigValues {
            capacity: t.read_config_space::<u64>(0)?,
            size_max: t.read_config_space::<u32>(8)?,
            seg_max: t.read_config_space::<u32>(12)?,
            blk_size: t.read_config_space::<u32>(20)?,
            max_discard_sectors: t.read_config_space::<u32>(36)?,
            max_discard_seg: t.read_config_space::<u32>(40)?,
            discard_sector_alignment: t.read_config_space::<u32>(44)?,
            max_write_zeroes_sectors: t.read_config_space::<u32>(48)?,
            max_write_zeroes_seg: t.read_config_space::<u32>(52)?,
            write_zeroes_may_unmap: t.read_config_space::<u8>(56)?,
        })
    })?;
    Ok(c)
}
