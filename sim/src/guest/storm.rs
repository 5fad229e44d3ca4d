//! Drivers that abuse the device lifecycle.
//!
//! - `reset-storm`: [`CYCLES`] full initialisations (reset, negotiation, config reads, queue
//!   setup, DRIVER_OK), each with [`CONFIG_WRITES`] config-space writes; every other one
//!   also reads a sector and then takes the queue out of use (QueueReady 0) before the
//!   reset. Then a short `blk-verify`: the device must still work.
//! - `queue-stop`: one initialisation, a read, queue 0 taken out of use (QueueReady 0), then
//!   a pause until the file `--resume-when` names exists (a test replaces the worker
//!   meanwhile); the stopped queue's last chain is made available again before the pause (as
//!   if the driver reused the memory) and notified after it; then the device is reset and a
//!   short `blk-verify` run:
//!   the device must work again and the stopped queue's used index must not have moved.
//! - `dead-device`: one initialisation (a test makes its worker die at DRIVER_OK), then waits
//!   for DEVICE_NEEDS_RESET, resets the device and initialises it again: NEEDS_RESET must stay
//!   and DRIVER_OK must be refused, since nothing serves the device any more.

use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport};
use virtio_drivers::Hal;

use super::rawblk::{self, RawBlk};
use super::{GuestDev, IrqWaiter};
use crate::mem::PhysMem;
use crate::report::DeviceReport;
use crate::transport::{reg, RingAddrs, SimTransport};

pub const CYCLES: usize = 3000;
const CONFIG_WRITES: u64 = 8;
/// How long `dead-device` waits for the device to report the loss of its worker.
const DEATH_WAIT: Duration = Duration::from_secs(30);

/// With `io`, every other cycle reads a sector and stops the queue before the reset: that
/// needs a worker that serves, which a test that stalls the worker cannot give.
pub fn reset_storm<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport, io: bool) -> Result<()> {
    let t = SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?;
    for i in 0..CYCLES {
        let mut blk = RawBlk::<H>::init(
            SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?,
            rawblk::WANTED,
        )
        .with_context(|| format!("initialisation {i}"))?;
        for off in 0..CONFIG_WRITES {
            // The writeback byte of virtio_blk_config and its neighbours.
            t.write(reg::CONFIG + 0x20 + off, 1, i as u64 & 1);
        }
        if io && i % 2 == 1 {
            read_then_stop_queue(&mut blk, &mut g.irq, i as u64)
                .with_context(|| format!("initialisation {i}"))?;
        }
        drop(blk);
    }
    t.write(reg::STATUS, 4, 0);
    println!(
        "hvisor-sim: zone {} blk@0x{:x}: {CYCLES} reset cycles done",
        g.zone(),
        g.spec.addr
    );
    rep.check("reset_storm", true, format!("{CYCLES} initialisations"));
    super::verify::run::<H>(g, rep, false)
}

/// Reads one sector, then takes queue 0 out of use (virtio 1.2, 4.2.2.2): the device must
/// answer the read and agree at once to stop.
fn read_then_stop_queue<H: Hal>(
    blk: &mut RawBlk<'_, H>,
    irq: &mut IrqWaiter,
    n: u64,
) -> Result<()> {
    let mut sector = [0u8; 512];
    let status = blk.request(
        irq,
        rawblk::req::IN,
        n % blk.config.capacity.max(1),
        &[],
        &mut sector,
    )?;
    if status != 0 {
        bail!("read before the queue stop: status {status}");
    }
    // Only QueueReady: the queue's size and addresses stay as they were.
    let t = blk.transport();
    t.write(reg::QUEUE_SEL, 4, 0);
    t.write(reg::QUEUE_READY, 4, 0);
    if t.read(reg::QUEUE_READY, 4) != 0 {
        bail!("QueueReady still reads 1 after the driver wrote 0");
    }
    Ok(())
}

pub fn queue_stop<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    let t = SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?;
    let mut blk = RawBlk::<H>::init(t, rawblk::WANTED)?;
    let rings = (*blk.transport().rings().lock().unwrap()).context("queue 0 has no rings")?;
    read_then_stop_queue(&mut blk, &mut g.irq, 0)?;
    let used = offer_again(g.mem, g.zone(), &rings).context("rings outside the zone's RAM")?;
    println!(
        "hvisor-sim: zone {} blk@0x{:x}: queue 0 stopped",
        g.zone(),
        g.spec.addr
    );
    if let Some(resume) = &g.opts.resume_when {
        // The run's --timeout bounds the wait.
        while !resume.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    rep.check("queue_stopped", true, "QueueReady 0 agreed".to_string());
    blk.transport().notify(0);
    // Reset, keeping the old rings' memory (the next initialisation gets other memory).
    blk.transport().set_status(DeviceStatus::empty());
    super::verify::run::<H>(g, rep, false)?;
    let now = used_index(g.mem, g.zone(), &rings).context("rings outside the zone's RAM")?;
    rep.check(
        "stopped_queue_left_alone",
        now == used,
        format!("used index {used} -> {now}"),
    );
    drop(blk);
    Ok(())
}

/// As a driver may reuse a stopped queue's memory for anything: makes the last chain
/// available again in its avail ring. Returns the used ring's index, which nobody may move.
fn offer_again(mem: &PhysMem, zone: u32, r: &RingAddrs) -> Option<u16> {
    let avail = mem.translate(zone, r.avail, 4 + 2 * u64::from(r.size))?;
    // SAFETY: the avail ring lies inside the zone's mapping (`translate` checked its whole
    // extent) and is 2-byte aligned; no device may read it any more.
    unsafe {
        let idx = &*avail.add(2).cast::<AtomicU16>();
        let i = idx.load(Ordering::Acquire);
        let last = avail.add(4 + 2 * (usize::from(i.wrapping_sub(1)) % r.size as usize));
        let next = avail.add(4 + 2 * (usize::from(i) % r.size as usize));
        next.cast::<u16>()
            .write_volatile(last.cast::<u16>().read_volatile());
        idx.store(i.wrapping_add(1), Ordering::Release);
    }
    used_index(mem, zone, r)
}

fn used_index(mem: &PhysMem, zone: u32, r: &RingAddrs) -> Option<u16> {
    let used = mem.translate(zone, r.used, 4)?;
    // SAFETY: inside the zone's mapping (`translate` checked), 2-byte aligned.
    Some(unsafe { (*used.add(2).cast::<AtomicU16>()).load(Ordering::Acquire) })
}

pub fn dead_device<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    let needs_reset = DeviceStatus::DEVICE_NEEDS_RESET;
    let mut t = SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?;
    t.negotiate(rawblk::WANTED)?;
    let q = VirtQueue::<H, 16>::new(&mut t, 0, false, false).context("setting up queue 0")?;
    t.driver_ok();
    let start = Instant::now();
    while !t.get_status().contains(needs_reset) && start.elapsed() < DEATH_WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = t.get_status();
    rep.check(
        "needs_reset_once_dead",
        st.contains(needs_reset),
        format!("{st:?}"),
    );
    drop(q);
    t.set_status(DeviceStatus::empty());
    let st = t.get_status();
    rep.check(
        "needs_reset_after_reset",
        st.contains(needs_reset),
        format!("{st:?}"),
    );
    let negotiated = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    t.set_status(DeviceStatus::ACKNOWLEDGE);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let features = t.read_device_features() & rawblk::WANTED;
    t.write_driver_features(features);
    t.set_status(negotiated);
    let q = VirtQueue::<H, 16>::new(&mut t, 0, false, false).context("setting up queue 0")?;
    t.driver_ok();
    let st = t.get_status();
    rep.check(
        "driver_ok_refused_while_dead",
        st.contains(needs_reset) && !st.contains(DeviceStatus::DRIVER_OK),
        format!("{st:?}"),
    );
    drop(q);
    Ok(())
}
