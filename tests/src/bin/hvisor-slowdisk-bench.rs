//! Benchmark of a slow disk (not a timed test): the image lies on a FUSE file system of this
//! program's own that answers each read after a fixed delay (direct I/O, so every read reaches
//! it), and the simulator's `depth-bench` guest reads 4 KiB at random at queue depth 1, 4 and
//! 16 (the stock driver) and 32 (the simulator's own driver: a queue of 256). The blk worker
//! serves at most 16 requests at once (its I/O threads), so QD32 is held to what 16 on the
//! disk give. Each figure is printed beside the ideal `depth / delay` and
//! the same run with the blk worker held to one task (`--cgroup-pids blk=1`: no I/O threads,
//! one request at a time, as before they existed); then the memory (PSS) of each process.
//! Build with `--release` first, then
//! `target/release/hvisor-slowdisk-bench [DELAY_US [SECONDS_PER_DEPTH [ROUNDS [GIC]]]]`
//! (defaults 200, 2, 1, hvisor; GIC `ideal` keeps what hvisor's drops).

use std::time::Duration;

use hvisor_tests::fuse::{SlowFs, Timing};
use hvisor_tests::*;
use serde_json::{json, Value};

const DEPTHS: [usize; 4] = [1, 4, 16, 32];

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: f64| -> f64 {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let delay = Duration::from_secs_f64(arg(1, 200.0) / 1e6);
    let secs = arg(2, 2.0);
    let rounds = arg(3, 1.0).max(1.0) as usize;
    // `ideal` keeps injections that meet an active interrupt: the disk's figures without the
    // cost of hvisor's dropped interrupts.
    let gic = std::env::args().nth(4).unwrap_or_else(|| "hvisor".into());
    let s = Scratch::new();
    let backing = s.image("backing.img", 64 << 20);
    let mnt = s.path("slowfs");
    std::fs::create_dir(&mnt)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&backing)?;
    let fs = SlowFs::mount(&mnt, file, Timing::Delay(delay))?;
    let img = fs.image();
    let cfg = s.write_json(
        "slowdisk.json",
        &json!({ "zones": [zone_json(1, 0x5000_0000, 0x1000_0000, &[BlkSpec { img: &img, addr: 0xa00_3c00, irq: 78, readonly: false }])] }),
    );
    let direct: Vec<f64> = DEPTHS
        .iter()
        .map(|&d| direct_iops(&img, d, secs))
        .collect::<anyhow::Result<_>>()?;
    let setups: [(&str, &[&str]); 2] = [
        ("before: one request at a time", &["--cgroup-pids", "blk=1"]),
        ("after: I/O threads", &[]),
    ];
    // Round robin, so that a busy spell of the machine hits both alike; medians.
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        for (i, (name, broker_args)) in setups.iter().enumerate() {
            println!("== round {} of {rounds}: {name}", round + 1);
            let run = SimRun::new(&cfg, "depth-bench")
                .staying()
                .timeout(600)
                .args(["--gic", &gic])
                .depths(&DEPTHS, secs);
            let _ = std::fs::remove_file(s.path("report.json"));
            let mut stack = Stack::start(&s, run, broker_args)?;
            let report = stack.wait_report(Duration::from_secs(600))?;
            if round + 1 == rounds {
                println!("{name}:");
                print_memory(stack.broker.pid());
            }
            let failed = failed_checks(&report);
            if !failed.is_empty() {
                anyhow::bail!("{failed:?}\n{}", stack.diagnostics());
            }
            stack.stop_broker()?;
            runs[i].push(report);
        }
    }
    let us = delay.as_secs_f64() * 1e6;
    println!();
    println!(
        "slow disk: 4 KiB random reads, {us:.0} us per request on the host, {secs} s per depth, \
         {gic} GIC; medians of {rounds} round(s)"
    );
    println!(
        "  {:<32} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8}",
        "setup", "depth", "IOPS", "ideal", "/ideal", "/QD1", "/direct"
    );
    for (i, (name, _)) in setups.iter().enumerate() {
        let qd1 = median(&runs[i], 0);
        for (j, depth) in DEPTHS.iter().enumerate() {
            let iops = median(&runs[i], j);
            let ideal = *depth as f64 / delay.as_secs_f64();
            println!(
                "  {:<32} {:>5} {:>9.0} {:>9.0} {:>8.3} {:>8.2} {:>8.3}",
                name,
                depth,
                iops,
                ideal,
                iops / ideal,
                iops / qd1,
                iops / direct[j]
            );
        }
    }
    for (j, depth) in DEPTHS.iter().enumerate() {
        println!(
            "  {:<32} {:>5} {:>9.0} {:>9.0} {:>8.3} {:>8.2}",
            "direct: pread on the host",
            depth,
            direct[j],
            *depth as f64 / delay.as_secs_f64(),
            direct[j] * delay.as_secs_f64() / *depth as f64,
            direct[j] / direct[0]
        );
    }
    println!(
        "  most reads in flight on the host at once: {}",
        fs.most_reads_at_once()
    );
    Ok(())
}

/// The disk itself: `depth` threads reading 4 KiB at random with `pread` for `secs`.
fn direct_iops(img: &std::path::Path, depth: usize, secs: f64) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(img)?;
    let blocks = file.metadata()?.len() / 4096;
    let run = Duration::from_secs_f64(secs);
    let start = std::time::Instant::now();
    let ops: u64 = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..depth as u64)
            .map(|t| {
                let file = &file;
                scope.spawn(move || {
                    let (mut n, mut x) = (0u64, t * 7919 + 1);
                    let mut buf = [0u8; 4096];
                    while start.elapsed() < run {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        file.read_exact_at(&mut buf, (x >> 33) % blocks * 4096)?;
                        n += 1;
                    }
                    Ok::<u64, std::io::Error>(n)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum::<Result<u64, _>>()
    })?;
    Ok(ops as f64 / start.elapsed().as_secs_f64())
}

/// The median IOPS of the `j`th depth over the runs.
fn median(runs: &[Value], j: usize) -> f64 {
    let mut v: Vec<f64> = runs
        .iter()
        .map(|r| {
            r["zones"][0]["devices"][0]["depths"][j]["iops"]
                .as_f64()
                .unwrap_or(0.0)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
