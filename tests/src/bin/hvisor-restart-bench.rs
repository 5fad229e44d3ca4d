//! Benchmark (not a timed test): how long a device is without a worker when its worker dies,
//! from the SIGKILL to its replacement reporting Ready (sandboxed, activated as the driver
//! left the device, serving), median and max over a number of kills. Kills are spaced past a
//! one-second restart window, so no backoff is included. Build with `--release` first.

use std::time::{Duration, Instant};

use hvisor_tests::*;
use nix::sys::signal::{kill, Signal};
use serde_json::json;

const LABEL: &str = "zone1 blk@0xa003c00";

fn main() -> anyhow::Result<()> {
    let samples: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let s = Scratch::new();
    let img = s.image("bench.img", 8 << 20);
    let cfg = s.write_json(
        "zone1.json",
        &json!({ "zones": [zone_json(1, 0x5000_0000, 0x0400_0000, &[BlkSpec { img: &img, addr: 0xa00_3c00, irq: 78, readonly: false }])] }),
    );
    let go = s.path("go");
    let run = SimRun::new(&cfg, "blk-verify").wait_for(&go).timeout(600);
    let mut stack = Stack::start(&s, run, &["--restart-budget", "1000/1"])?;
    let wait = Duration::from_secs(60);
    let ready = |stack: &mut Stack, n: usize| ready_worker_pid(&mut stack.broker, LABEL, n, wait);
    let mut times = Vec::new();
    let mut pid = ready(&mut stack, 0)?;
    for n in 1..=samples {
        std::thread::sleep(Duration::from_millis(1100));
        let t0 = Instant::now();
        kill(pid, Signal::SIGKILL)?;
        pid = ready(&mut stack, n)?;
        times.push(t0.elapsed());
    }
    std::fs::write(&go, b"")?;
    let report = stack.wait_report(Duration::from_secs(300))?;
    let failed = failed_checks(&report);
    if !failed.is_empty() {
        anyhow::bail!("the guest's checks failed after the restarts: {failed:?}");
    }
    let _ = stack.stop_broker();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "worker restart, SIGKILL to the replacement's Ready, {samples} kills: median {:.1} ms, max {:.1} ms",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
    Ok(())
}
