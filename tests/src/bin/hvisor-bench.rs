//! Benchmark of the whole stack (not a timed test): runs the simulator's `bench` guest against
//! the broker and blk worker, then reports the resident memory of both processes. Every speed
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
    let mut run = SimRun::new(&cfg, "bench");
    run.stay = true;
    run.extra = vec!["--timeout".into(), "300".into()];
    let mut stack = Stack::start(&s, run, &[])?;
    let report = stack.wait_report(Duration::from_secs(300))?;
    let broker = stack.broker.pid();
    println!("{}", stack.sim.text());
    println!();
    print_memory(broker);
    let st = stack.stop_broker()?;
    if !st.success() {
        anyhow::bail!("broker exited with {st}:\n{}", stack.diagnostics());
    }
    let failed = failed_checks(&report);
    if !failed.is_empty() {
        anyhow::bail!("bench checks failed: {failed:?}");
    }
    Ok(())
}
