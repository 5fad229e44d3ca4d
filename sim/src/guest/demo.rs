//! `blk-demo`: what a person watching should see: the device, a few writes, their read-back.

use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use virtio_drivers::Hal;

use super::stock::{BlkPipe, Pipe, SECTOR};
use super::GuestDev;
use crate::report::DeviceReport;
use crate::transport::SimTransport;

pub fn run<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    let zone = g.zone();
    let addr = g.spec.addr;
    let say = |msg: String| println!("[zone {zone} blk@0x{addr:x}] {msg}");
    let t = SimTransport::new(g.vcpu, addr, g.spec.len)?;
    let mut pipe = Pipe::<H>::open(t, g.mem, 1).context("driver initialisation")?;
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
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let patterns: Vec<(u64, Vec<u8>)> = [(0u64, 8u64, 0u64), (cap / 2, 16, 33), (cap - 4, 4, 51)]
        .iter()
        .map(|&(sector, n, first)| {
            let buf = (0..n * SECTOR)
                .map(|i| ALPHABET[((first + i) % ALPHABET.len() as u64) as usize])
                .collect();
            (sector, buf)
        })
        .collect();
    let mut verified = 0u64;
    let image = g.image().and_then(|p| std::fs::File::open(p).ok());
    for (sector, data) in &patterns {
        let n = data.len() as u64 / SECTOR;
        if ro {
            say(format!(
                "read-only: reading {n} sectors at {sector} instead of writing"
            ));
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
                // Nothing to write: check the read against the image itself, if readable.
                let mut want = vec![0u8; d.buf.len()];
                let same = image
                    .as_ref()
                    .and_then(|f| f.read_exact_at(&mut want, sector * SECTOR).ok())
                    .map(|()| want == d.buf);
                if same == Some(true) {
                    verified += d.buf.len() as u64;
                }
                if let Some(same) = same {
                    rep.check(
                        &format!("image_at_{sector}"),
                        same,
                        format!("{} bytes", d.buf.len()),
                    );
                }
                say(format!(
                    "read {} bytes at sector {sector}{}",
                    d.buf.len(),
                    match same {
                        Some(true) => ": matches the image",
                        Some(false) => ": DIFFERS from the image",
                        None => "",
                    }
                ));
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
                say(format!(
                    "read back {n} sectors at sector {sector}: MISMATCH"
                ));
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
