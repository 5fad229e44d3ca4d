//! Benchmark of per-device rate limits (not a timed test): the simulator's `depth-bench`
//! guest reads 128 KiB at random at queue depth 1, 16 and 32 from a disk limited to 20 MB/s,
//! while a second zone does the same on an unlimited disk; then that second zone runs alone.
//! Printed: the limit, what the limited disk delivered and the ratio, per depth; the
//! neighbour's IOPS beside the limited disk and alone, in the same run of this program.
//! Build with `--release` first, then `target/release/hvisor-ratelimit-bench [SECONDS_PER_DEPTH]`
//! (default 5).

use std::path::Path;
use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

const RATE: u64 = 20_000_000;
const BURST: u64 = 1 << 20;
const BLOCK: u64 = 128 * 1024;
const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
/// QD32 is beyond the stock driver's queue of 16: the simulator's own driver keeps it.
const DEPTHS: [usize; 3] = [1, 16, 32];

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5.0);
    let s = Scratch::new();
    let limited = s.image("limited.img", 64 << 20);
    let free = s.image("free.img", 64 << 20);
    let limit = json!({ "bytes_per_sec": RATE, "burst_bytes": BURST });
    let both = json!({ "zones": [zone(1, &limited, Some(limit)), zone(2, &free, None)] });
    let alone = json!({ "zones": [zone(2, &free, None)] });

    let side_by_side = run(&s, "both.json", &both, secs)?;
    let by_itself = run(&s, "alone.json", &alone, secs)?;
    let lim = &side_by_side["zones"][0]["devices"][0]["depths"];
    let beside = &side_by_side["zones"][1]["devices"][0]["depths"];
    let solo = &by_itself["zones"][0]["devices"][0]["depths"];

    println!();
    println!("rate limits: 128 KiB random reads, {secs} s per depth");
    println!(
        "  {:<6} {:>10} {:>14} {:>8} {:>7}   {:>18} {:>14} {:>7}",
        "depth",
        "limit MB/s",
        "delivered MB/s",
        "over s",
        "ratio",
        "neighbour IOPS",
        "alone IOPS",
        "ratio"
    );
    for j in 0..DEPTHS.len() {
        let d = &lim[j];
        let bytes = d["ops"].as_f64().unwrap_or(0.0) * BLOCK as f64;
        let over = d["seconds"].as_f64().unwrap_or(0.0);
        let mbs = bytes / over.max(1e-9) / 1e6;
        let (n, a) = (iops(&beside[j]), iops(&solo[j]));
        println!(
            "  QD{:<4} {:>10.1} {:>14.2} {:>8.2} {:>7.3}   {:>18.0} {:>14.0} {:>7.3}",
            d["depth"],
            RATE as f64 / 1e6,
            mbs,
            over,
            mbs / (RATE as f64 / 1e6),
            n,
            a,
            n / a.max(1e-9)
        );
    }
    Ok(())
}

fn zone(id: u32, img: &Path, rate_limit: Option<Value>) -> Value {
    let ram = RAM + u64::from(id - 1) * RAM_SIZE;
    let spec = BlkSpec {
        img,
        addr: 0xa00_3c00,
        irq: 78,
        readonly: false,
    };
    let mut z = zone_json(id, ram, RAM_SIZE, &[spec]);
    if let Some(limit) = rate_limit {
        z["devices"][0]["rate_limit"] = limit;
    }
    z
}

fn iops(d: &Value) -> f64 {
    d["iops"].as_f64().unwrap_or(0.0)
}

/// One simulator run of `depth-bench` in every zone of `config`; its report.
fn run(s: &Scratch, name: &str, config: &Value, secs: f64) -> anyhow::Result<Value> {
    let cfg = s.write_json(name, config);
    let run = SimRun::new(&cfg, "depth-bench")
        .staying()
        .timeout(600)
        .depths(&DEPTHS, secs)
        .args(["--depth-block", &BLOCK.to_string()]);
    let _ = std::fs::remove_file(s.path("report.json"));
    let mut stack = Stack::start(s, run, &[])?;
    let report = stack.wait_report(Duration::from_secs(600))?;
    let failed = failed_checks(&report);
    if !failed.is_empty() {
        anyhow::bail!("{failed:?}\n{}", stack.diagnostics());
    }
    stack.stop_broker()?;
    Ok(report)
}
