//! Benchmark (not a timed test): what adding and removing a zone costs another zone's vCPU.
//! Zone 1 runs the simulator's `bench` guest (synchronous register reads: p50, p99) twice in
//! one run: once alone, once while zone 2 (a disk and a console) is added and removed again
//! and again through `hvisor-broker zone add|remove`. Build with `--release` first:
//! `cargo build --release --workspace --bins && target/release/hvisor-zones-bench [ROUNDS [READS]]`
//! (3 runs of each, 2000000 timed reads a run).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// `hvisor-broker zone ARGS` against the broker on `socket`.
fn zone(socket: &Path, args: &[&str]) -> anyhow::Result<()> {
    let run_dir = run_dir(socket);
    let mut all = vec!["zone"];
    all.extend_from_slice(args);
    all.extend([
        "--driver",
        socket.to_str().unwrap(),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]);
    let (ok, out) = broker_cmd(&all);
    anyhow::ensure!(ok, "zone {args:?}: {out}");
    Ok(())
}

/// One run of zone 1's benchmark; with `churn`, zone 2 comes and goes meanwhile (from the
/// first timed read to the end of the run, which the timed reads take most of). Returns the
/// register read p50 and p99 (us) and the add/remove cycles done.
fn measure(churn: bool, reads: &str) -> anyhow::Result<(f64, f64, usize)> {
    let s = Scratch::new();
    let disk1 = s.image("disk1.img", 32 * MIB);
    let disk2 = s.image("disk2.img", MIB);
    let z1 = zone_json(
        1,
        0x5000_0000,
        0x0400_0000,
        &[BlkSpec {
            img: &disk1,
            addr: 0xa00_3c00,
            irq: 78,
            readonly: false,
        }],
    );
    let mut z2 = zone_json(
        2,
        0x6000_0000,
        0x0400_0000,
        &[BlkSpec {
            img: &disk2,
            addr: 0xa00_3c00,
            irq: 78,
            readonly: false,
        }],
    );
    z2["devices"].as_array_mut().unwrap().push(json!({
        "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76, "status": "enable"
    }));
    let all = s.write_json("all.json", &json!({ "zones": [z1, z2] }));
    let start = s.write_json("start.json", &json!({ "zones": [z1] }));
    let zone2 = s.write_json("zone2.json", &json!({ "zones": [z2] }));
    // Zone 2's guest stays idle: only the broker's side of it comes and goes.
    let rounds = s.path("rounds");
    std::fs::create_dir_all(&rounds)?;
    std::fs::write(rounds.join("zone2-end"), b"")?;
    let go = s.path("go");
    let run = SimRun::new(&all, "bench")
        .args(["--zone-guest", "2=rounds"])
        .arg("--rounds-dir")
        .arg(&rounds)
        .wait_for(&go)
        // Long enough for many additions and removals to land among them.
        .args(["--bench-reads", reads])
        .timeout(600);
    let mut stack = Stack::start_with(&s, run, |socket| start_broker(&start, socket, &[]))?;
    stack
        .broker
        .wait_for("sandboxed and ready: serving", Duration::from_secs(60))?;
    let stop = AtomicBool::new(false);
    let cycles = AtomicUsize::new(0);
    let socket = stack.socket.clone();
    let done = stack.report.clone();
    let report: anyhow::Result<Value> = std::thread::scope(|scope| {
        let churner = churn.then(|| {
            scope.spawn(|| -> anyhow::Result<()> {
                while !stop.load(Ordering::SeqCst) {
                    let cycle = zone(&socket, &["add", zone2.to_str().unwrap()])
                        .and_then(|()| zone(&socket, &["remove", "2"]));
                    match cycle {
                        Ok(()) => cycles.fetch_add(1, Ordering::SeqCst),
                        // The guests finished and the broker left with the simulator.
                        Err(_) if done.exists() => break,
                        Err(e) => return Err(e),
                    };
                }
                Ok(())
            })
        });
        std::fs::write(&go, b"")?;
        let report = stack.wait_report(Duration::from_secs(600));
        stop.store(true, Ordering::SeqCst);
        if let Some(t) = churner {
            t.join().expect("churn thread")?;
        }
        report
    });
    let report = report?;
    let failed = failed_checks(&report);
    anyhow::ensure!(failed.is_empty(), "the guests' checks failed: {failed:?}");
    let _ = stack.stop_broker();
    let read = &report["bench"]["sync_read"];
    let us = |k: &str| read[k].as_f64().unwrap_or(f64::NAN);
    Ok((us("p50_us"), us("p99_us"), cycles.load(Ordering::SeqCst)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| {
        (std::env::args().nth(i))
            .and_then(|n| n.parse().ok())
            .unwrap_or(default)
    };
    let rounds = arg(1, 3).max(1);
    let reads = arg(2, 2_000_000).max(1).to_string();
    // Round robin, so that a busy spell of the machine hits both alike; medians.
    let mut alone = (Vec::new(), Vec::new());
    let mut churned = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (p50, p99, _) = measure(false, &reads)?;
        alone.0.push(p50);
        alone.1.push(p99);
        let (p50, p99, cycles) = measure(true, &reads)?;
        churned.0.push(p50);
        churned.1.push(p99);
        churned.2.push(cycles as f64);
    }
    println!(
        "zone 1 register reads (MagicValue), {reads} a run, medians of {rounds} run(s), us   p50      p99"
    );
    println!(
        "  alone                                              {:8.2} {:8.2}",
        median(alone.0),
        median(alone.1)
    );
    println!(
        "  zone 2 added and removed (median {:4} times a run) {:8.2} {:8.2}",
        median(churned.2),
        median(churned.0),
        median(churned.1)
    );
    Ok(())
}
