//! `bench`: synchronous register latency, 4 KiB random-read IOPS at queue depth 1 and 16 and
//! 128 KiB sequential-read throughput, each beside the same reads done with `pread` on the
//! image, with the interrupts taken and injected per request.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use virtio_drivers::Hal;

use super::deep::{DeepPipe, MAX_DEPTH};
use super::stock::{BlkPipe, Pipe, SECTOR};
use super::{GuestDev, Rng};
use crate::report::{BenchReport, DepthFigure, DeviceReport, Latency, Throughput};
use crate::transport::{reg, SimTransport};

const RUN: Duration = Duration::from_secs(2);
const RAND_BLOCK: u64 = 4096;
const SEQ_BLOCK: u64 = 128 * 1024;

pub fn run<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<BenchReport> {
    let img_path = g.image().context("not a blk device")?.to_owned();
    let img = std::fs::File::open(&img_path)
        .with_context(|| format!("opening {} for the baseline", img_path.display()))?;
    let t = SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?;
    let mut pipe = Pipe::<H>::open(t, g.mem, 1).context("driver initialisation")?;
    let cap = pipe.blk.capacity();
    rep.capacity_sectors = cap;
    rep.readonly = pipe.blk.readonly();
    rep.features.stock = pipe.features;
    let disk = cap * SECTOR;
    anyhow::ensure!(
        disk >= RAND_BLOCK,
        "disk too small to benchmark ({cap} sectors)"
    );

    // Warm the page cache once, untimed, for both sides.
    let mut buf = vec![0u8; SEQ_BLOCK as usize];
    let mut off = 0;
    while off < disk {
        let n = SEQ_BLOCK.min(disk - off) as usize;
        img.read_exact_at(&mut buf[..n], off)?;
        off += n as u64;
    }

    let sync_read = latency(g)?;

    let mut rng = Rng::new(g.opts.seed);
    let blocks = disk / RAND_BLOCK;
    let offsets: Vec<u64> = (0..65536)
        .map(|_| rng.range(0, blocks - 1) * RAND_BLOCK)
        .collect();
    let random = |i: usize| offsets[i % offsets.len()];
    let randread_4k_qd1 = throughput(g, &mut pipe, &img, RAND_BLOCK, random)?;
    let seq = SEQ_BLOCK.min(disk - disk % SECTOR);
    let seq_blocks = (disk / seq).max(1);
    let seqread_128k = throughput(g, &mut pipe, &img, seq, |i| (i as u64 % seq_blocks) * seq)?;
    let mut missed = pipe.missed_interrupts;
    drop(pipe);
    let t = SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?;
    let mut pipe = Pipe::<H>::open(t, g.mem, 16).context("driver initialisation")?;
    let randread_4k_qd16 = throughput(g, &mut pipe, &img, RAND_BLOCK, random)?;
    missed += pipe.missed_interrupts;
    rep.reads = randread_4k_qd1.ops + seqread_128k.ops + randread_4k_qd16.ops;
    rep.missed_interrupts = missed;

    let b = BenchReport {
        zone: g.zone(),
        addr: g.spec.addr,
        image: img_path.display().to_string(),
        capacity_sectors: cap,
        sync_read,
        randread_4k_qd1,
        randread_4k_qd16,
        seqread_128k,
    };
    print_table(&b);
    rep.check(
        "bench_completed",
        true,
        format!(
            "{} register reads, {} + {} + {} device reads",
            b.sync_read.count, b.randread_4k_qd1.ops, b.randread_4k_qd16.ops, b.seqread_128k.ops
        ),
    );
    Ok(b)
}

fn latency(g: &GuestDev<'_>) -> Result<Latency> {
    let addr = g.spec.addr + reg::MAGIC_VALUE;
    for _ in 0..1000 {
        g.vcpu.read(addr, 4)?;
    }
    let reads = g.opts.bench_reads;
    let mut ns = Vec::with_capacity(reads);
    for _ in 0..reads {
        let t = Instant::now();
        let v = g.vcpu.read(addr, 4)?;
        ns.push(t.elapsed().as_nanos() as u64);
        anyhow::ensure!(v == reg::MAGIC as u64, "MagicValue read 0x{v:x}");
    }
    let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
    ns.sort_unstable();
    let pct = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    Ok(Latency {
        count: ns.len() as u64,
        mean_us: mean / 1000.0,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: *ns.last().unwrap() as f64 / 1000.0,
    })
}

/// Reads `block` bytes at `offset(i)` for i = 0, 1, ... for about [`RUN`], through the device
/// (as many in flight as the pipe's depth) and then one at a time with `pread` on the image.
fn throughput(
    g: &mut GuestDev<'_>,
    pipe: &mut impl BlkPipe,
    img: &std::fs::File,
    block: u64,
    offset: impl Fn(usize) -> u64,
) -> Result<Throughput> {
    let depth = pipe.depth();
    // Untimed, one at a time.
    for i in 0..32 {
        pipe.submit_read(&mut g.irq, offset(i) / SECTOR, vec![0; block as usize])?;
        pipe.drain(&mut g.irq)?;
        reap(pipe, block, None)?;
    }
    let m = measure(g, pipe, block, RUN, &offset, None)?;
    let (ops, secs) = (m.ops, m.seconds);

    let mut buf = vec![0u8; block as usize];
    let start = Instant::now();
    let mut base_ops = 0;
    while start.elapsed() < RUN {
        img.read_exact_at(&mut buf, offset(base_ops))?;
        base_ops += 1;
    }
    let base_secs = start.elapsed().as_secs_f64();

    let iops = ops as f64 / secs;
    let base_iops = base_ops as f64 / base_secs;
    let mb = |iops: f64| iops * block as f64 / 1e6;
    Ok(Throughput {
        block_bytes: block,
        ops,
        seconds: secs,
        iops,
        mb_per_s: mb(iops),
        baseline_ops: base_ops as u64,
        baseline_seconds: base_secs,
        baseline_iops: base_iops,
        baseline_mb_per_s: mb(base_iops),
        ratio: iops / base_iops,
        depth,
        interrupts_per_op: m.interrupts_per_op,
        injections_per_op: m.injections_per_op,
    })
}

/// What [`measure`] found.
struct Measured {
    ops: u64,
    seconds: f64,
    interrupts_per_op: f64,
    injections_per_op: f64,
    /// Bytes compared with the image.
    verified_bytes: u64,
}

/// Reads `block` bytes at `offset(i)` for i = 0, 1, ... for about `run` (at least the pipe's
/// depth of them), as many in flight as the pipe's depth; each compared with `image`, if given.
fn measure(
    g: &mut GuestDev<'_>,
    pipe: &mut impl BlkPipe,
    block: u64,
    run: Duration,
    offset: impl Fn(usize) -> u64,
    image: Option<&std::fs::File>,
) -> Result<Measured> {
    let depth = pipe.depth();
    let (irqs, injections) = (g.irq.delivered(), g.irq.injections());
    let start = Instant::now();
    let (mut submitted, mut ops, mut verified_bytes) = (0, 0, 0);
    // The first `depth` go out together, however short the run.
    while submitted < depth || start.elapsed() < run {
        let sector = offset(submitted) / SECTOR;
        pipe.submit_read(&mut g.irq, sector, vec![0; block as usize])?;
        if depth == 1 {
            pipe.drain(&mut g.irq)?;
        }
        let (n, v) = reap(pipe, block, image)?;
        (ops, verified_bytes) = (ops + n, verified_bytes + v);
        submitted += 1;
    }
    pipe.drain(&mut g.irq)?;
    let (n, v) = reap(pipe, block, image)?;
    (ops, verified_bytes) = (ops + n, verified_bytes + v);
    let seconds = start.elapsed().as_secs_f64();
    let per_op = |n: u64| n as f64 / ops.max(1) as f64;
    Ok(Measured {
        ops,
        seconds,
        interrupts_per_op: per_op(g.irq.delivered() - irqs),
        injections_per_op: per_op(g.irq.injections() - injections),
        verified_bytes,
    })
}

/// Takes the finished reads, each compared with `image` if given; returns how many there were
/// and the bytes compared, or the first one's error or difference.
fn reap(pipe: &mut impl BlkPipe, block: u64, image: Option<&std::fs::File>) -> Result<(u64, u64)> {
    let done = pipe.take_done();
    let mut verified = 0;
    for d in &done {
        if let Err(e) = &d.result {
            anyhow::bail!("{block}-byte read at sector {}: {e}", d.sector);
        }
        if let Some(img) = image {
            let mut want = vec![0u8; d.buf.len()];
            img.read_exact_at(&mut want, d.sector * SECTOR)
                .with_context(|| format!("reading the image at sector {}", d.sector))?;
            if let Some(at) = d.buf.iter().zip(&want).position(|(a, b)| a != b) {
                anyhow::bail!(
                    "{block}-byte read at sector {}: byte {at} differs from the image",
                    d.sector
                );
            }
            verified += want.len() as u64;
        }
    }
    Ok((done.len() as u64, verified))
}

/// `depth-bench`: random reads of `--depth-block` bytes (4 KiB) for `--depth-secs` at each
/// of `--depths`, started cold
/// (the first `depth` reads go out together), with nothing else read from the disk: a disk
/// that answers only once N reads wait at once shows whether the device keeps them in flight.
/// Depths up to 16 use the stock driver (as before, so figures stay comparable), deeper ones
/// our own with a queue of 256 ([`DeepPipe`]). With `--depth-verify`, every read is compared
/// with the image file.
/// Synchronous register reads are timed first.
pub fn depths<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    let block = g.opts.depth_block;
    anyhow::ensure!(
        block > 0 && block % SECTOR == 0 && block <= 1 << 20,
        "a read of {block} bytes: a multiple of {SECTOR}, at most 1 MiB"
    );
    let image = match g.opts.depth_verify {
        true => {
            let path = g.image().context("not a blk device")?;
            let f = std::fs::File::open(path)
                .with_context(|| format!("opening {} to verify reads", path.display()))?;
            Some(f)
        }
        false => None,
    };
    let mut rng = Rng::new(g.opts.seed);
    let l = latency(g)?;
    println!(
        "hvisor-sim: depth-bench register reads: mean {:.2} us, p50 {:.2}, p99 {:.2}",
        l.mean_us, l.p50_us, l.p99_us
    );
    rep.sync_read = Some(l);
    for &depth in &g.opts.depths.clone() {
        anyhow::ensure!(
            (1..=MAX_DEPTH).contains(&depth),
            "queue depth {depth}: 1 to {MAX_DEPTH} requests in flight"
        );
        let t = SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?;
        if depth <= STOCK_DEPTH {
            let mut pipe = Pipe::<H>::open(t, g.mem, depth).context("driver initialisation")?;
            one_depth(g, rep, &mut pipe, &mut rng, image.as_ref())?;
        } else {
            let mut pipe = DeepPipe::<H>::open(t, depth)?;
            one_depth(g, rep, &mut pipe, &mut rng, image.as_ref())?;
        }
    }
    Ok(())
}

/// The most requests the stock driver keeps in flight (its queue of 16).
const STOCK_DEPTH: usize = 16;

/// `depth-bench` at the pipe's depth.
fn one_depth(
    g: &mut GuestDev<'_>,
    rep: &mut DeviceReport,
    pipe: &mut impl BlkPipe,
    rng: &mut Rng,
    image: Option<&std::fs::File>,
) -> Result<()> {
    let run = Duration::from_secs_f64(g.opts.depth_secs.max(0.0));
    let (block, depth) = (g.opts.depth_block, pipe.depth());
    let blocks = pipe.capacity() * SECTOR / block;
    anyhow::ensure!(blocks > 0, "disk too small to benchmark");
    let offsets: Vec<u64> = (0..4096)
        .map(|_| rng.range(0, blocks - 1) * block)
        .collect();
    let m = measure(g, pipe, block, run, |i| offsets[i % offsets.len()], image)?;
    rep.missed_interrupts += *pipe.missed_interrupts();
    rep.reads += m.ops;
    rep.verified_bytes += m.verified_bytes;
    let iops = m.ops as f64 / m.seconds;
    rep.check(
        &format!("depth_{depth}"),
        true,
        format!("{} reads in {:.2} s: {iops:.0} IOPS", m.ops, m.seconds),
    );
    println!("hvisor-sim: depth-bench QD{depth}: {iops:.0} IOPS");
    rep.depths.push(DepthFigure {
        depth,
        block_bytes: block,
        ops: m.ops,
        seconds: m.seconds,
        iops,
        interrupts_per_op: m.interrupts_per_op,
    });
    Ok(())
}

fn print_table(b: &BenchReport) {
    let l = &b.sync_read;
    println!(
        "hvisor-sim bench: zone {} blk@0x{:x}, {} sectors, image {}",
        b.zone, b.addr, b.capacity_sectors, b.image
    );
    println!(
        "  {:<38} {:>12} {:>12} {:>8}",
        "measure", "virtio", "baseline", "ratio"
    );
    for (name, v) in [
        ("sync register read mean (us)", l.mean_us),
        ("sync register read p50 (us)", l.p50_us),
        ("sync register read p99 (us)", l.p99_us),
    ] {
        println!("  {name:<38} {v:>12.2} {:>12} {:>8}", "-", "-");
    }
    for r in [&b.randread_4k_qd1, &b.randread_4k_qd16] {
        println!(
            "  {:<38} {:>12.0} {:>12.0} {:>8.4}",
            format!("4 KiB random read, QD{} (IOPS)", r.depth),
            r.iops,
            r.baseline_iops,
            r.ratio
        );
        println!(
            "  {:<38} {:>12.2} {:>12} {:>8}",
            format!("  interrupts taken per request, QD{}", r.depth),
            r.interrupts_per_op,
            "-",
            "-"
        );
        println!(
            "  {:<38} {:>12.2} {:>12} {:>8}",
            format!("  injections per request, QD{}", r.depth),
            r.injections_per_op,
            "-",
            "-"
        );
    }
    let s = &b.seqread_128k;
    println!(
        "  {:<38} {:>12.1} {:>12.1} {:>8.4}",
        format!("{} KiB sequential read (MB/s)", s.block_bytes / 1024),
        s.mb_per_s,
        s.baseline_mb_per_s,
        s.ratio
    );
}
