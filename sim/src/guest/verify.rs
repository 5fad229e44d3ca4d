//! `blk-verify`: random I/O through the stock driver checked against a shadow of the whole
//! disk, then DISCARD / WRITE_ZEROES / GET_ID / read-only rules through our own driver.

use std::io::Write;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use virtio_drivers::Hal;

use super::rawblk::{self, feat, status, RawBlk};
use super::stock::{BlkPipe, Pipe, SECTOR};
use super::{GuestDev, Rng};
use crate::report::{DeviceReport, Features};
use crate::transport::SimTransport;

/// Largest disk the shadow is kept for.
const MAX_SHADOW: u64 = 1 << 30;
/// Requests the stock phase keeps in flight.
const DEPTH: usize = 4;
/// Sectors per request for whole-disk passes.
const CHUNK: u64 = 16;

/// Counters shared by the phases.
#[derive(Default)]
struct Tally {
    reads: u64,
    writes: u64,
    verified: u64,
    mismatches: Vec<String>,
}

impl Tally {
    fn verify(&mut self, what: &str, sector: u64, got: &[u8], want: &[u8]) {
        if got == want {
            self.verified += got.len() as u64;
        } else if self.mismatches.len() < 8 {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            self.mismatches.push(format!(
                "{what} at sector {sector}: first difference at byte {at} \
                 (got 0x{:02x}, expected 0x{:02x})",
                got[at], want[at]
            ));
        }
    }
}

fn range(sector: u64, len: usize) -> std::ops::Range<usize> {
    let s = (sector * SECTOR) as usize;
    s..s + len
}

/// `full`: the full 200-write run; otherwise a short one (used after the hostile probes).
pub fn run<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport, full: bool) -> Result<()> {
    let spec = g.spec;
    let mut rng = Rng::new(g.opts.seed ^ spec.addr ^ ((g.zone() as u64) << 48));
    let t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    let mut pipe = Pipe::<H>::open(t, g.mem, DEPTH).context("stock driver initialisation")?;
    let cap = pipe.blk.capacity();
    let ro = pipe.blk.readonly();
    rep.capacity_sectors = cap;
    rep.readonly = ro;
    rep.features.stock = pipe.features;
    rep.check("capacity_nonzero", cap > 0, format!("{cap} sectors"));
    if cap == 0 || cap * SECTOR > MAX_SHADOW {
        bail!("capacity of {cap} sectors is outside what blk-verify can shadow");
    }
    // The image is compared directly only when it is a plain file the simulator can read.
    let image = g
        .image()
        .and_then(|p| std::fs::File::open(p).ok())
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()));
    if let Some(f) = &image {
        let len = f.metadata()?.len();
        rep.check(
            "capacity_matches_image",
            cap == len / SECTOR,
            format!("device {cap} sectors, image {len} bytes"),
        );
    }
    rep.device_id = pipe.device_id(&mut g.irq).context("GET_ID (stock)")?;
    rep.check(
        "device_id",
        !rep.device_id.is_empty(),
        rep.device_id.clone(),
    );

    let mut tally = Tally::default();
    // The whole disk as it is now: the shadow every later read is checked against.
    let mut shadow = vec![0u8; (cap * SECTOR) as usize];
    let mut s = 0;
    while s < cap {
        let n = CHUNK.min(cap - s);
        pipe.submit(&mut g.irq, false, s, vec![0; (n * SECTOR) as usize])?;
        s += n;
        if s >= cap {
            pipe.drain(&mut g.irq)?;
        }
        for d in pipe.take_done() {
            d.result
                .with_context(|| format!("initial read at sector {}", d.sector))?;
            shadow[range(d.sector, d.buf.len())].copy_from_slice(&d.buf);
            tally.reads += 1;
        }
    }
    if let Some(f) = &image {
        let mut img = vec![0u8; shadow.len()];
        f.read_exact_at(&mut img, 0)?;
        rep.check(
            "initial_read_matches_image",
            img == shadow,
            format!("{} bytes read through the device", shadow.len()),
        );
    }
    let original = ro.then(|| shadow.clone());

    // Random multi-sector I/O, up to DEPTH in flight, never two overlapping when one writes.
    let target_writes = if full { 200 } else { 40 };
    let mut flushes = 0u64;
    let mut ro_write_refused = None;
    let mut ops = 0u64;
    loop {
        let finished = if ro {
            ops >= target_writes
        } else {
            tally.writes >= target_writes
        };
        if finished {
            if ro {
                // One write through the stock driver: the device must refuse it.
                let mut buf = vec![0u8; SECTOR as usize];
                rng.fill(&mut buf);
                pipe.submit(&mut g.irq, true, 0, buf)?;
            }
            pipe.drain(&mut g.irq)?;
        } else {
            ops += 1;
            let n = rng.range(1, 16.min(cap));
            let sector = rng.range(0, cap - n);
            let write = !ro && rng.range(0, 9) < 6;
            while pipe.conflicts(sector, n, write) {
                pipe.reap(&mut g.irq)?;
            }
            // Reads finished so far are checked before this write changes the shadow.
            check_done(&mut pipe, &shadow, &mut tally, ro, &mut ro_write_refused)?;
            let mut buf = vec![0u8; (n * SECTOR) as usize];
            if write {
                rng.fill(&mut buf);
                // Nothing in flight overlaps, so the disk holds this once it completes.
                shadow[range(sector, buf.len())].copy_from_slice(&buf);
                tally.writes += 1;
            }
            pipe.submit(&mut g.irq, write, sector, buf)?;
            if ops % 50 == 0 {
                pipe.drain(&mut g.irq)?;
            }
        }
        check_done(&mut pipe, &shadow, &mut tally, ro, &mut ro_write_refused)?;
        if finished {
            break;
        }
        if ops % 50 == 0 && pipe.flush(&mut g.irq)? {
            flushes += 1;
        }
    }
    if pipe.flush(&mut g.irq)? {
        flushes += 1;
    }
    if let Some(refused) = ro_write_refused {
        rep.check(
            "stock_write_on_readonly_fails",
            refused,
            if refused {
                "IOERR"
            } else {
                "the write succeeded"
            },
        );
    }

    // Full read-back through the stock driver.
    full_compare_stock(&mut pipe, g, &shadow, &mut tally)?;
    rep.check(
        "stock_readback",
        tally.mismatches.is_empty(),
        if tally.mismatches.is_empty() {
            format!("{} bytes verified", tally.verified)
        } else {
            tally.mismatches.join("; ")
        },
    );
    let missed_stock = pipe.missed_interrupts;
    drop(pipe);

    // Our own driver: reset, renegotiate with DISCARD / WRITE_ZEROES / BLK_SIZE ...
    let t = SimTransport::new(g.vcpu, spec.addr, spec.len)?;
    let mut raw = RawBlk::<H>::init(t, rawblk::WANTED).context("own driver initialisation")?;
    rep.features = Features {
        device: raw.device_features,
        stock: raw.device_features & super::stock::STOCK_FEATURES,
        own: raw.negotiated,
    };
    rep.config = Some(raw.config.clone());
    let c = raw.config.clone();
    rep.check(
        "config_capacity",
        c.capacity == cap,
        format!("config space {} sectors, stock driver {cap}", c.capacity),
    );
    rep.check(
        "version_1",
        raw.has(feat::VERSION_1),
        format!("device features 0x{:x}", raw.device_features),
    );
    rep.check(
        "readonly_feature_consistent",
        raw.has(feat::RO) == ro,
        format!("RO negotiated: {}", raw.has(feat::RO)),
    );
    if raw.has(feat::BLK_SIZE) {
        rep.check(
            "blk_size",
            c.blk_size >= 512 && c.blk_size.is_power_of_two(),
            format!("{}", c.blk_size),
        );
    }
    let mut id = [0u8; 20];
    let st = raw.request(&mut g.irq, rawblk::req::GET_ID, 0, &[], &mut id)?;
    let n = id.iter().position(|&b| b == 0).unwrap_or(20);
    let raw_id = String::from_utf8_lossy(&id[..n]).into_owned();
    rep.check(
        "get_id_own_driver",
        st == status::OK && raw_id == rep.device_id,
        format!("{} \"{raw_id}\"", status::name(st)),
    );

    if ro {
        readonly_checks(&mut raw, g, rep, cap)?;
    } else {
        write_checks(&mut raw, g, rep, cap, &mut shadow, &mut tally, &mut rng)?;
    }
    rep.flushes = flushes;

    // Final read-back through our driver.
    let before = tally.mismatches.len();
    let mut s = 0;
    while s < cap {
        let n = CHUNK.min(cap - s);
        let mut buf = vec![0u8; (n * SECTOR) as usize];
        let st = raw.request(&mut g.irq, rawblk::req::IN, s, &[], &mut buf)?;
        if st != status::OK {
            bail!("final read at sector {s}: {}", status::name(st));
        }
        tally.reads += 1;
        tally.verify("final read", s, &buf, &shadow[range(s, buf.len())]);
        s += n;
    }
    rep.check(
        "final_readback",
        tally.mismatches.len() == before,
        if tally.mismatches.len() == before {
            format!("{} bytes", shadow.len())
        } else {
            tally.mismatches[before..].join("; ")
        },
    );
    if let Some(orig) = &original {
        rep.check(
            "readonly_disk_unchanged",
            *orig == shadow,
            "shadow equals the content read at start",
        );
    }
    if raw.has(feat::FLUSH) {
        let st = raw.request(&mut g.irq, rawblk::req::FLUSH, 0, &[], &mut [])?;
        rep.check("flush_own_driver", st == status::OK, status::name(st));
        rep.flushes += 1;
    }
    drop(raw);
    if let Some(f) = &image {
        let mut img = vec![0u8; shadow.len()];
        f.read_exact_at(&mut img, 0)?;
        rep.check(
            "image_matches_shadow",
            img == shadow,
            "image file read directly after the final flush",
        );
    }
    rep.check(
        "interrupt_per_completion",
        missed_stock == 0,
        format!("{missed_stock} completions found without their interrupt"),
    );
    rep.missed_interrupts = missed_stock;
    rep.reads = tally.reads;
    rep.writes = tally.writes;
    rep.verified_bytes = tally.verified;

    if let Some(dir) = &g.opts.shadow_dir {
        let path = dir.join(format!("zone{}-0x{:x}.img", g.zone(), spec.addr));
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(&shadow)?;
        rep.shadow_file = Some(path.display().to_string());
    }
    println!(
        "hvisor-sim: zone {} blk@0x{:x}: {} writes, {} reads, {} bytes verified, {} interrupts",
        g.zone(),
        spec.addr,
        tally.writes,
        tally.reads,
        tally.verified,
        g.irq.delivered()
    );
    Ok(())
}

/// Checks the requests of the random phase that finished.
fn check_done<H: Hal>(
    pipe: &mut Pipe<'_, H>,
    shadow: &[u8],
    tally: &mut Tally,
    ro: bool,
    ro_write_refused: &mut Option<bool>,
) -> Result<()> {
    for d in pipe.take_done() {
        if d.write {
            if ro {
                *ro_write_refused = Some(d.result.is_err());
            } else {
                d.result
                    .with_context(|| format!("write at sector {}", d.sector))?;
            }
        } else {
            d.result
                .with_context(|| format!("read at sector {}", d.sector))?;
            tally.reads += 1;
            let want = &shadow[range(d.sector, d.buf.len())];
            tally.verify("random read", d.sector, &d.buf, want);
        }
    }
    Ok(())
}

fn full_compare_stock<H: Hal>(
    pipe: &mut Pipe<'_, H>,
    g: &mut GuestDev<'_>,
    shadow: &[u8],
    tally: &mut Tally,
) -> Result<()> {
    let cap = shadow.len() as u64 / SECTOR;
    let mut s = 0;
    while s < cap {
        let n = CHUNK.min(cap - s);
        pipe.submit(&mut g.irq, false, s, vec![0; (n * SECTOR) as usize])?;
        s += n;
        if s >= cap {
            pipe.drain(&mut g.irq)?;
        }
        for d in pipe.take_done() {
            d.result
                .with_context(|| format!("read-back at sector {}", d.sector))?;
            tally.reads += 1;
            tally.verify(
                "read-back",
                d.sector,
                &d.buf,
                &shadow[range(d.sector, d.buf.len())],
            );
        }
    }
    Ok(())
}

/// A range for DISCARD / WRITE_ZEROES within the device's limits, away from sector 0.
fn pick_range(rng: &mut Rng, cap: u64, max: u32, align: u32) -> (u64, u32) {
    let want = 24u64.min(cap / 4).max(1);
    let n = if max == 0 { want } else { want.min(max as u64) };
    let align = (align as u64).max(1);
    let mut s = rng.range(0, cap - n);
    s -= s % align;
    (s, n as u32)
}

#[allow(clippy::too_many_arguments)]
fn zero_op<H: Hal>(
    raw: &mut RawBlk<'_, H>,
    g: &mut GuestDev<'_>,
    rep: &mut DeviceReport,
    shadow: &mut [u8],
    tally: &mut Tally,
    name: &str,
    typ: u32,
    (sector, n): (u64, u32),
) -> Result<()> {
    let st = raw.range_op(&mut g.irq, typ, sector, n, false)?;
    let ok = rep.check(
        name,
        st == status::OK,
        format!("{n} sectors at {sector}: {}", status::name(st)),
    );
    if !ok {
        return Ok(());
    }
    let r = range(sector, (n as u64 * SECTOR) as usize);
    shadow[r.clone()].fill(0);
    let mut buf = vec![0xa5u8; r.len()];
    let st = raw.request(&mut g.irq, rawblk::req::IN, sector, &[], &mut buf)?;
    tally.reads += 1;
    let zeros = st == status::OK && buf.iter().all(|&b| b == 0);
    if zeros {
        tally.verified += buf.len() as u64;
    }
    rep.check(
        &format!("{name}_reads_zero"),
        zeros,
        format!(
            "read back {}: {}",
            status::name(st),
            if zeros { "zeros" } else { "data" }
        ),
    );
    Ok(())
}

fn write_checks<H: Hal>(
    raw: &mut RawBlk<'_, H>,
    g: &mut GuestDev<'_>,
    rep: &mut DeviceReport,
    cap: u64,
    shadow: &mut [u8],
    tally: &mut Tally,
    rng: &mut Rng,
) -> Result<()> {
    // A plain OUT/IN round trip through our own driver first.
    let n = 8.min(cap);
    let sector = rng.range(0, cap - n);
    let mut data = vec![0u8; (n * SECTOR) as usize];
    rng.fill(&mut data);
    let st = raw.request(&mut g.irq, rawblk::req::OUT, sector, &data, &mut [])?;
    if rep.check("write_own_driver", st == status::OK, status::name(st)) {
        shadow[range(sector, data.len())].copy_from_slice(&data);
        tally.writes += 1;
    }
    let mut back = vec![0u8; data.len()];
    let st = raw.request(&mut g.irq, rawblk::req::IN, sector, &[], &mut back)?;
    tally.reads += 1;
    tally.verify(
        "own-driver read",
        sector,
        &back,
        &shadow[range(sector, back.len())],
    );
    rep.check(
        "read_own_driver",
        st == status::OK && back == data,
        status::name(st),
    );

    let c = raw.config.clone();
    if raw.has(feat::DISCARD) {
        let r = pick_range(rng, cap, c.max_discard_sectors, c.discard_sector_alignment);
        zero_op(
            raw,
            g,
            rep,
            shadow,
            tally,
            "discard",
            rawblk::req::DISCARD,
            r,
        )?;
        rep.discards += 1;
    } else {
        rep.check("discard", true, "not offered by the device; skipped");
    }
    if raw.has(feat::WRITE_ZEROES) {
        let r = pick_range(rng, cap, c.max_write_zeroes_sectors, 1);
        zero_op(
            raw,
            g,
            rep,
            shadow,
            tally,
            "write_zeroes",
            rawblk::req::WRITE_ZEROES,
            r,
        )?;
        rep.write_zeroes += 1;
    } else {
        rep.check("write_zeroes", true, "not offered by the device; skipped");
    }
    Ok(())
}

/// On a read-only device every modifying request must fail with IOERR.
fn readonly_checks<H: Hal>(
    raw: &mut RawBlk<'_, H>,
    g: &mut GuestDev<'_>,
    rep: &mut DeviceReport,
    cap: u64,
) -> Result<()> {
    let data = vec![0x5au8; SECTOR as usize];
    let st = raw.request(&mut g.irq, rawblk::req::OUT, cap / 2, &data, &mut [])?;
    rep.check("readonly_out_ioerr", st == status::IOERR, status::name(st));
    for (name, typ, f) in [
        (
            "readonly_discard_ioerr",
            rawblk::req::DISCARD,
            feat::DISCARD,
        ),
        (
            "readonly_write_zeroes_ioerr",
            rawblk::req::WRITE_ZEROES,
            feat::WRITE_ZEROES,
        ),
    ] {
        let st = raw.range_op(&mut g.irq, typ, 0, 1.min(cap as u32), false)?;
        // Without the feature negotiated, "unsupported" is an equally correct refusal.
        let pass = st == status::IOERR || (!raw.has(f) && st == status::UNSUPP);
        rep.check(
            name,
            pass,
            format!(
                "{} (feature {}negotiated)",
                status::name(st),
                if raw.has(f) { "" } else { "not " }
            ),
        );
    }
    Ok(())
}
