//! `blk-demo`: what a person watching should see: the device, a few writes, their read-back.

use anyhow::{bail, Context, Result};
use virtio_drivers::Hal;

use super::stock::{Pipe, SECTOR};
use super::GuestDev;
use crate::report::DeviceReport;
use crate::transport::SimTransport;

pub fn run<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    let zone = g.zone();
    let addr = g.spec.addr;
    let say = |msg: String| println!("[zone {zone} blk@0x{addr:x}] {msg}");
    let t = SimTransport::new(g.vcpu, addr, g.spec.len)?;
    let mut pipe = Pipe::<H>::open(t, 1).context("driver initialisation")?;
    let cap = pipe.blk.capacity();
    let ro = pipe.blk.readonly();
    rep.capacity_sectors = cap;
    rep.readonly = ro;
    rep.features.stock = pipe.features;
    rep.device_id = pipe.device_id(&mut g.irq)?;
    say(format!(
        "found virtio-blk: {cap} sectors ({} KiB), {}, id \"{}\"",
        cap / 2,
        if ro { "read-only" } else { "read-write" },
        rep.device_id
    ));
    if cap < 64 {
        bail!("disk too small for the demo ({cap} sectors)");
    }

    // A few multi-sector patterns spread over the disk.
    let patterns: Vec<(u64, Vec<u8>)> = [(0u64, 8u64, b'A'), (cap / 2, 16, b'h'), (cap - 4, 4, b'z')]
        .iter()
        .map(|&(sector, n, base)| {
            let buf = (0..n * SECTOR)
                .map(|i| base.wrapping_add((i % 26) as u8))
                .collect();
            (sector, buf)
        })
        .collect();
    let mut verified = 0u64;
    for (sector, data) in &patterns {
        let n = data.len() as u64 / SECTOR;
        if ro {
            say(format!("read-only: reading {n} sectors at {sector} instead of writing"));
        } else {
            say(format!(
                "write {n} sectors at sector {sector}: \"{}...\"",
                String::from_utf8_lossy(&data[..12])
            ));
            pipe.submit(&mut g.irq, true, *sector, data.clone())?;
            pipe.drain(&mut g.irq)?;
            for d in pipe.take_done() {
                d.result.context("write")?;
                rep.writes += 1;
            }
        }
        pipe.submit(&mut g.irq, false, *sector, vec![0; data.len()])?;
        pipe.drain(&mut g.irq)?;
        for d in pipe.take_done() {
            d.result.context("read")?;
            rep.reads += 1;
            if ro {
                say(format!("read {} bytes", d.buf.len()));
                continue;
            }
            let ok = d.buf == *data;
            rep.check(
                &format!("pattern_at_{sector}"),
                ok,
                format!("{} bytes", d.buf.len()),
            );
            if ok {
                verified += d.buf.len() as u64;
                say(format!("read back {n} sectors at sector {sector}: match"));
            } else {
                say(format!("read back {n} sectors at sector {sector}: MISMATCH"));
            }
        }
    }
    if pipe.flush(&mut g.irq)? {
        rep.flushes += 1;
        say("flushed".into());
    }
    rep.verified_bytes = verified;
    rep.missed_interrupts = pipe.missed_interrupts;
    say(format!(
        "verified {verified} bytes ({} interrupts)",
        g.irq.delivered()
    ));
    Ok(())
}
