//! Disk benchmark from inside a real Linux guest (not a timed test): runs the simulator's
//! `linux-bench` workload (User-Mode Linux, its own virtio-blk driver, through the broker and
//! the blk worker) and prints the guest's sequential `dd` figures beside the same operations
//! done on the host on the same image file in the same run; then 16 parallel readers and the
//! most requests the guest had outstanding at a kick. Needs Debian's `user-mode-linux` and
//! `busybox-static`. Build with `--release` first:
//! `cargo build --release --workspace --bins && target/release/hvisor-linux-bench [IMAGE_MIB]`.

use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

/// The zone's RAM: identity-mapped from 1 MiB (below the end of UML's kernel image) to 256 MiB.
const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = (256 << 20) - RAM;

fn rate<'a>(rates: &'a [Value], dev: Option<&str>, op: &str) -> Option<&'a Value> {
    rates.iter().find(|r| {
        r["op"] == op
            && match dev {
                Some(d) => r["dev"] == d,
                None => true,
            }
    })
}

fn mbps(r: Option<&Value>) -> Option<f64> {
    r.and_then(|r| r["mb_per_s"].as_f64())
}

fn cell(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0} MB/s"))
        .unwrap_or_else(|| "-".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn main() -> anyhow::Result<()> {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    if !std::path::Path::new("/usr/bin/linux").exists() {
        anyhow::bail!("no /usr/bin/linux: apt-get install user-mode-linux busybox-static");
    }
    let s = Scratch::new();
    // Allocated blocks, not holes, on both sides.
    let img = s.image("bench.img", mib << 20);
    let cfg = s.write_json(
        "bench.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: 0x2000_0000, irq: 78, readonly: false }])] }),
    );
    let run = SimRun::new(&cfg, "linux-bench").timeout(300);
    let mut stack = Stack::start(&s, run, &[])?;
    let report = stack.wait_report(Duration::from_secs(300))?;
    let st = stack.sim.wait_exit(Duration::from_secs(60))?;
    let failed = failed_checks(&report);
    if !failed.is_empty() || !st.success() {
        anyhow::bail!(
            "linux-bench failed (simulator: {st}): {failed:?}\n{}",
            stack.diagnostics()
        );
    }
    let linux = &report["linux"];
    let guest = linux["rates"].as_array().cloned().unwrap_or_default();
    let host = linux["host_rates"].as_array().cloned().unwrap_or_default();
    let bytes = |r: Option<&Value>| r.and_then(|r| r["bytes"].as_u64()).unwrap_or(0) >> 20;

    println!(
        "Linux {} (User-Mode Linux) on a {mib} MiB image, 1 MiB blocks; guest: dd with O_DIRECT",
        linux["release"].as_str().unwrap_or("?")
    );
    println!("through the stack: virtio-blk -> hvisor-sim -> hvisor-broker -> hvisor-worker-blk -> image");
    println!();
    println!("| figure | Linux guest | host O_DIRECT | ratio | host page cache | ratio |");
    println!("|---|---|---|---|---|---|");
    for (op, what) in [
        ("write", "sequential write (dd oflag=direct conv=fsync)"),
        ("read", "sequential read (dd iflag=direct)"),
    ] {
        let g = mbps(rate(&guest, None, op));
        let d = mbps(rate(&host, Some("host-direct"), op));
        let c = mbps(rate(&host, Some("host-cached"), op));
        println!(
            "| {what}, {} MiB | {} | {} | {} | {} | {} |",
            bytes(rate(&guest, None, op)),
            cell(g),
            cell(d),
            ratio(g, d),
            cell(c),
            ratio(g, c)
        );
    }
    println!();
    println!(
        "host O_DIRECT: the same 1 MiB writes (then fdatasync) and reads on the image, bypassing the page cache;"
    );
    println!(
        "host page cache: pwrite then fdatasync, pread from a warm cache: what the worker does for the guest."
    );
    // How many requests Linux keeps in flight depends on scheduling: a figure, not a check.
    let par = rate(&guest, None, "parallel-read");
    println!(
        "16 parallel readers (dd iflag=direct), {} MiB in all: {}; most requests Linux had \
         outstanding on a queue at a kick: {}",
        bytes(par),
        cell(mbps(par)),
        linux["links"][0]["max_in_flight"]
    );
    println!(
        "UML boot to /init {:.2} s, whole run {:.1} s.",
        linux["boot_s"].as_f64().unwrap_or(0.0),
        linux["run_s"].as_f64().unwrap_or(0.0)
    );
    let st = stack.broker.wait_exit(Duration::from_secs(10))?;
    if !st.success() {
        anyhow::bail!("broker exited with {st}:\n{}", stack.diagnostics());
    }
    Ok(())
}
