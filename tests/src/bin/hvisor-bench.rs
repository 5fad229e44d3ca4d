//! Benchmark of the whole stack (not a timed test): runs the simulator's `bench` guest against
//! the broker and blk worker, then reports the resident memory of both processes; the run is
//! repeated with the broker's interrupt policies on both GIC models and compared. Every speed
//! figure is printed beside a baseline measured in the same run. Build with `--release` first:
//! `cargo build --release --workspace --bins && target/release/hvisor-bench [IMAGE_MIB]`.

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
    let setups: [(&str, &[&str], &str); 4] = [
        (
            "before: inject once, ideal GIC",
            &["--irq-inject", "once"],
            "ideal",
        ),
        ("after: every + retry, ideal GIC", &[], "ideal"),
        ("after: every + retry, hvisor GIC", &[], "hvisor"),
        (
            "after: retry only, hvisor GIC",
            &["--irq-inject", "retry"],
            "hvisor",
        ),
    ];
    let mut rows = Vec::new();
    for (i, (name, broker_args, gic)) in setups.iter().enumerate() {
        println!("== {name}");
        let report = run_once(&s, &cfg, broker_args, gic, i == 0)?;
        rows.push((name, report["bench"].clone(), report["hypervisor"].clone()));
    }
    println!();
    println!("interrupt delivery, 4 KiB random reads (IOPS ratio against the first row)");
    println!(
        "  {:<36} {:>9} {:>7} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "setup",
        "QD1 IOPS",
        "ratio",
        "QD16 IOPS",
        "ratio",
        "irq/req1",
        "inj/req1",
        "irq/r16",
        "dropped"
    );
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let (base1, base16) = (
        f(&rows[0].1["randread_4k_qd1"], "iops"),
        f(&rows[0].1["randread_4k_qd16"], "iops"),
    );
    for (name, b, hv) in &rows {
        let (q1, q16) = (&b["randread_4k_qd1"], &b["randread_4k_qd16"]);
        println!(
            "  {:<36} {:>9.0} {:>7.3} {:>9.0} {:>7.3} {:>8.2} {:>8.2} {:>8.2} {:>8}",
            name,
            f(q1, "iops"),
            f(q1, "iops") / base1,
            f(q16, "iops"),
            f(q16, "iops") / base16,
            f(q1, "interrupts_per_op"),
            f(q1, "injections_per_op"),
            f(q16, "interrupts_per_op"),
            hv["dropped_interrupts"].as_u64().unwrap_or(0)
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
    let mut run = SimRun::new(cfg, "bench");
    run.stay = true;
    run.extra = vec!["--timeout".into(), "300".into(), "--gic".into(), gic.into()];
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
