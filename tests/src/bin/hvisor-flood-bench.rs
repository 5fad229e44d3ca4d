//! Benchmark (not a timed test): the register-read latency of one zone's disk while another
//! zone's worker floods the broker with messages at the most it may send without being
//! stopped, beside the same figure with that worker idle. Build with `--release` first.

use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

/// Messages a second: just under the broker's budget for one worker.
const FLOOD_RATE: u32 = 1800;

/// MagicValue read latency (mean, p50, p99 in us) of zone 2's disk while zone 1's console
/// worker is the real one, or the hostile worker in `mode`.
fn measure(mode: Option<&str>) -> anyhow::Result<[f64; 3]> {
    let s = Scratch::new();
    let img = s.image("bench.img", 32 << 20);
    let mut zone1 = zone_json(1, 0x5000_0000, 0x0400_0000, &[]);
    zone1["devices"] = json!([{ "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76, "status": "enable" }]);
    let cfg = s.write_json(
        "zones.json",
        &json!({ "zones": [
            zone1,
            zone_json(2, 0x5400_0000, 0x1000_0000, &[BlkSpec { img: &img, addr: 0xa00_3c00, irq: 78, readonly: false }]),
        ]}),
    );
    let dir = mode.map(|m| hostile_workers(&s, m, "console"));
    let args: Vec<&str> = match &dir {
        Some(d) => vec!["--worker-dir", d],
        None => vec![],
    };
    let run = SimRun::new(&cfg, "bench").timeout(300);
    let mut stack = Stack::start(&s, run, &args)?;
    let report = stack.wait_report(Duration::from_secs(300))?;
    let log = stack.broker.text();
    let _ = stack.stop_broker();
    if log.contains("stopping it") {
        anyhow::bail!("the flooding worker was stopped; lower FLOOD_RATE:\n{log}");
    }
    let failed = failed_checks(&report);
    if !failed.is_empty() {
        anyhow::bail!("bench checks failed: {failed:?}");
    }
    let lat: &Value = &report["bench"]["sync_read"];
    let f = |k: &str| lat[k].as_f64().unwrap_or(f64::NAN);
    Ok([f("mean_us"), f("p50_us"), f("p99_us")])
}

fn main() -> anyhow::Result<()> {
    let idle = measure(None)?;
    let mode = format!("flood-{FLOOD_RATE}");
    let flood = measure(Some(&mode))?;
    println!(
        "register reads of zone 2's disk, zone 1's worker idle vs. sending {FLOOD_RATE} messages/s:"
    );
    println!("            idle us   flood us   ratio");
    for (i, name) in ["mean", "p50", "p99"].iter().enumerate() {
        println!(
            "  {name:<6} {:>10.2} {:>10.2} {:>7.2}x",
            idle[i],
            flood[i],
            flood[i] / idle[i]
        );
    }
    Ok(())
}
