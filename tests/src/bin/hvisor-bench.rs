//! Benchmark of the whole stack (not a timed test): runs the simulator's `bench` guest against
//! the broker and blk worker, then reports the resident memory of both processes; the run is
//! repeated with the broker's interrupt policies on both GIC models and compared. Every speed
//! figure is printed beside a baseline measured in the same run. Build with `--release` first:
//! `cargo build --release --workspace --bins && target/release/hvisor-bench [IMAGE_MIB [ROUNDS]]`.

use std::io::Write;
use std::time::Duration;

use hvisor_tests::*;
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let s = Scratch::new();
    let img = s.path("bench.img");
    {
        // real data, not holes: reading a sparse file would flatter both sides
        let mut f = std::fs::File::create(&img)?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for c in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block)?;
        }
    }
    let cfg = s.write_json(
        "bench.json",
        &json!({ "zones": [zone_json(1, 0x5000_0000, 0x1000_0000, &[BlkSpec { img: &img, addr: 0xa00_3c00, irq: 78, readonly: false }])] }),
    );
    // The same guest against the broker as it was (injecting once, on a GIC that drops
    // nothing: on hvisor's it stalls) and as it is, in one run.
    let setups: [(&str, &[&str], &str); 5] = [
        (
            "before: once, ideal GIC",
            &["--irq-inject", "once"],
            "ideal",
        ),
        ("after: every, ideal GIC", &[], "ideal"),
        ("after: every, hvisor GIC", &[], "hvisor"),
        (
            "after: every, retry 200us, hvisor",
            &["--irq-retry-us", "200"],
            "hvisor",
        ),
        (
            "after: retry only, hvisor GIC",
            &["--irq-inject", "retry"],
            "hvisor",
        ),
    ];
    // Round robin, so that a busy spell of the machine hits every setup alike; medians.
    let rounds: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let mut runs: Vec<Vec<serde_json::Value>> = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        for (i, (name, broker_args, gic)) in setups.iter().enumerate() {
            println!("== round {} of {rounds}: {name}", round + 1);
            let report = run_once(&s, &cfg, broker_args, gic, round == 0 && i == 0)?;
            runs[i].push(report);
        }
    }
    println!();
    println!(
        "interrupt delivery, 4 KiB random reads: medians of {rounds} rounds (IOPS ratio against \
         the first row)"
    );
    println!(
        "  {:<34} {:>9} {:>6} {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "setup",
        "QD1 IOPS",
        "ratio",
        "QD16 IOPS",
        "ratio",
        "irq/req1",
        "inj/req1",
        "irq/r16",
        "inj/r16",
        "dropped"
    );
    let median = |i: usize, f: &dyn Fn(&serde_json::Value) -> f64| {
        let mut v: Vec<f64> = runs[i].iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let bench = |q: &'static str, k: &'static str| {
        move |r: &serde_json::Value| r["bench"][q][k].as_f64().unwrap_or(0.0)
    };
    let (base1, base16) = (
        median(0, &bench("randread_4k_qd1", "iops")),
        median(0, &bench("randread_4k_qd16", "iops")),
    );
    for (i, (name, _, _)) in setups.iter().enumerate() {
        let (q1, q16) = (
            median(i, &bench("randread_4k_qd1", "iops")),
            median(i, &bench("randread_4k_qd16", "iops")),
        );
        println!(
            "  {:<34} {:>9.0} {:>6.3} {:>9.0} {:>6.3} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.0}",
            name,
            q1,
            q1 / base1,
            q16,
            q16 / base16,
            median(i, &bench("randread_4k_qd1", "interrupts_per_op")),
            median(i, &bench("randread_4k_qd1", "injections_per_op")),
            median(i, &bench("randread_4k_qd16", "interrupts_per_op")),
            median(i, &bench("randread_4k_qd16", "injections_per_op")),
            median(i, &|r| r["hypervisor"]["dropped_interrupts"]
                .as_f64()
                .unwrap_or(0.0)),
        );
    }
    Ok(())
}

fn run_once(
    s: &Scratch,
    cfg: &std::path::Path,
    broker_args: &[&str],
    gic: &str,
    memory: bool,
) -> anyhow::Result<serde_json::Value> {
    let run = SimRun::new(cfg, "bench")
        .staying()
        .timeout(300)
        .args(["--gic", gic]);
    let _ = std::fs::remove_file(s.path("report.json"));
    let mut stack = Stack::start(s, run, broker_args)?;
    let report = stack.wait_report(Duration::from_secs(300))?;
    let broker = stack.broker.pid();
    println!("{}", stack.sim.text());
    if memory {
        println!();
        print_memory(broker);
    }
    let st = stack.stop_broker()?;
    if !st.success() {
        anyhow::bail!("broker exited with {st}:\n{}", stack.diagnostics());
    }
    stack.sim.wait_exit(Duration::from_secs(30))?;
    let failed = failed_checks(&report);
    if !failed.is_empty() {
        anyhow::bail!("bench checks failed: {failed:?}");
    }
    Ok(report)
}
