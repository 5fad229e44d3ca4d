//! Per-device rate limits end to end: hvisor-sim guests, hvisor-broker and the workers as
//! separate processes. Every assertion is an upper bound (what a limited device delivered
//! over the time the guest measured, which spans every request it counted) or an outcome;
//! none depends on how fast the machine is.

use std::path::Path;
use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3c00;
const LABEL: &str = "zone1 blk@0xa003c00";
const MIB: u64 = 1 << 20;
/// 128 KiB reads: few requests per second at these limits, many bytes each.
const BLOCK: u64 = 128 * 1024;

fn disk_zone(id: u32, img: &Path, rate_limit: Option<Value>) -> Value {
    let ram = RAM + u64::from(id - 1) * RAM_SIZE;
    let mut zone = zone_json(
        id,
        ram,
        RAM_SIZE,
        &[BlkSpec {
            img,
            addr: ADDR,
            irq: 78,
            readonly: false,
        }],
    );
    if let Some(limit) = rate_limit {
        zone["devices"][0]["rate_limit"] = limit;
    }
    zone
}

/// A `depth-bench` run: 128 KiB random reads at QD1 then QD32 (our own driver's queue of
/// 256; the stock one's holds 16), `secs` each.
fn depth_bench(cfg: &Path, secs: f64) -> SimRun<'_> {
    SimRun::new(cfg, "depth-bench")
        .depths(&[1, 32], secs)
        .args(["--depth-block", &BLOCK.to_string()])
}

/// Each depth's reads of zone 1's disk came to at most `rate` a second over the time the
/// guest measured, plus the burst (or one read, if larger).
#[track_caller]
fn assert_bounded(report: &Value, rate: u64, burst: u64) {
    let dev = &report["zones"][0]["devices"][0];
    let depths = dev["depths"].as_array().expect("depth figures");
    assert_eq!(depths.len(), 2, "{dev:#}");
    for d in depths {
        let bytes = d["ops"].as_u64().unwrap() * d["block_bytes"].as_u64().unwrap();
        let secs = d["seconds"].as_f64().unwrap();
        let bound = rate as f64 * secs + burst.max(BLOCK) as f64;
        println!(
            "QD{}: {bytes} bytes in {secs:.2} s ({:.2} MB/s), bound {bound:.0}",
            d["depth"],
            bytes as f64 / secs / 1e6
        );
        assert!(
            bytes as f64 <= bound,
            "QD{}: {bytes} bytes in {secs:.2} s, more than {rate} a second + {burst}",
            d["depth"]
        );
    }
}

fn status(stack: &Stack) -> Value {
    let (ok, out) = stack.ask(&["status", "--json"]);
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_disk_limited_to_20_mb_s_delivers_no_more_at_qd1_and_qd32_and_its_neighbour_is_unaffected() {
    let s = Scratch::new();
    let limited = s.image("limited.img", 16 * MIB);
    let free = s.image("free.img", 8 * MIB);
    let (rate, burst) = (20_000_000, MIB);
    let limit = json!({ "bytes_per_sec": rate, "burst_bytes": burst });
    let cfg = s.write_json(
        "zones.json",
        &json!({ "zones": [disk_zone(1, &limited, Some(limit)), disk_zone(2, &free, None)] }),
    );
    let run = depth_bench(&cfg, 2.0)
        .staying()
        .args(["--zone-guest", "2=blk-verify"])
        .timeout(180);
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(180)).unwrap();
    let failed = failed_checks(&report);
    assert!(failed.is_empty(), "{failed:#?}\n{}", stack.diagnostics());
    assert_bounded(&report, rate, burst);
    // The neighbour, running at the same time, wrote and read back its disk in full.
    let neighbour = &report["zones"][1]["devices"][0];
    assert_eq!(neighbour["zone"], 2);
    assert_eq!(neighbour["ok"], true, "{neighbour:#}");
    assert!(
        neighbour["verified_bytes"].as_u64().unwrap() > 0,
        "{neighbour:#}"
    );
    let st = status(&stack);
    assert_eq!(st["devices"][0]["rate_limits"]["io"]["bytes"]["rate"], rate);
    assert!(
        st["devices"][1]["rate_limits"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{st:#}"
    );
    assert_eq!(st["devices"][1]["worker_reported"]["rate_limited"], 0);
    let _ = stack.stop_broker();
}

#[test]
fn a_limit_set_at_run_time_holds_and_survives_a_worker_restart() {
    let s = Scratch::new();
    let img = s.image("disk.img", 16 * MIB);
    // The config's limit is eight times the one set at run time.
    let limit = json!({ "bytes_per_sec": 8_000_000 });
    let cfg = s.write_json(
        "zone1.json",
        &json!({ "zones": [disk_zone(1, &img, Some(limit))] }),
    );
    let go = s.path("go");
    let run = depth_bench(&cfg, 2.0).staying().wait_for(&go).timeout(180);
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    worker_pid(&mut stack.broker, LABEL, 0, Duration::from_secs(30)).unwrap();

    // Refusals name what was wrong.
    let (ok, out) = stack.ask(&["rate-limit", "1", "net@0xa003c00", "--bytes-per-sec", "1"]);
    assert!(!ok && out.contains("zone 1 has no device"), "{out}");
    let (ok, out) = stack.ask(&[
        "rate-limit",
        "1",
        "blk@0xa003c00",
        "--flow",
        "rx",
        "--ops-per-sec",
        "1",
    ]);
    assert!(!ok && out.contains("has one flow, io"), "{out}");
    let (ok, out) = stack.ask(&["rate-limit", "1", "0xa003c00", "--bytes-per-sec", "0"]);
    assert!(!ok && out.contains("bytes-per-sec"), "{out}");

    let (rate, burst) = (1_000_000, BLOCK);
    let (ok, out) = stack.ask(&[
        "rate-limit",
        "1",
        "blk@0xa003c00",
        "--bytes-per-sec",
        &rate.to_string(),
        "--burst-bytes",
        &burst.to_string(),
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("rate limit io: 1000000 bytes/s (burst 131072)"),
        "{out}"
    );
    let (ok, out) = stack.ask(&["restart-worker", "1", "blk@0xa003c00"]);
    assert!(ok, "{out}");
    worker_pid(&mut stack.broker, LABEL, 1, Duration::from_secs(30)).unwrap();
    std::fs::write(&go, b"").unwrap();

    let report = stack.wait_report(Duration::from_secs(180)).unwrap();
    let failed = failed_checks(&report);
    assert!(failed.is_empty(), "{failed:#?}\n{}", stack.diagnostics());
    assert_bounded(&report, rate, burst);

    // 32 reads at once are 4 MiB, past any burst of 128 KiB: the queue waited, and said so.
    let st = status(&stack);
    let dev = &st["devices"][0];
    assert_eq!(dev["rate_limits"]["io"]["bytes"]["burst"], burst, "{st:#}");
    let counted = &dev["worker_reported"];
    assert!(counted["rate_limited"].as_u64().unwrap() > 0, "{st:#}");
    assert!(
        counted["rate_limit_delayed_requests"].as_u64().unwrap() > 0,
        "{st:#}"
    );
    assert!(
        counted["rate_limit_delayed_bytes"].as_u64().unwrap() >= BLOCK,
        "{st:#}"
    );
    let (ok, out) = stack.ask(&["status", "--prometheus"]);
    assert!(ok, "{out}");
    let line = "hvisor_broker_worker_reported_rate_limited_total{zone=\"1\",device=\"blk@0xa003c00\",kind=\"blk\"}";
    assert!(out.contains(line), "{out}");
    let (ok, out) = stack.ask(&["status"]);
    assert!(
        ok && out.contains("rate limit io: 1000000 bytes/s"),
        "{out}"
    );

    let (ok, out) = stack.ask(&["rate-limit", "1", "blk@0xa003c00", "--off"]);
    assert!(ok && out.contains("rate limit io: off"), "{out}");
    let st = status(&stack);
    assert!(
        st["devices"][0]["rate_limits"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{st:#}"
    );
    let _ = stack.stop_broker();
}

/// Requests the limit holds back go back to the ring: a worker killed at any moment, while
/// requests wait, leaves its successor nothing lost and nothing done twice. The guest checks
/// every read against what it wrote, and the image must hold exactly that.
#[test]
fn a_throttled_disk_survives_worker_kills_and_the_image_holds_what_the_guest_wrote() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

    let s = Scratch::new();
    let img = s.image("disk.img", 8 * MIB);
    let limit = json!({ "ops_per_sec": 400, "burst_ops": 8, "bytes_per_sec": 4_000_000 });
    let cfg = s.write_json(
        "zone1.json",
        &json!({ "zones": [disk_zone(1, &img, Some(limit))] }),
    );
    let run = SimRun::new(&cfg, "blk-verify").timeout(600);
    let mut stack = Stack::start(&s, run, &["--restart-budget", "1000/60"]).unwrap();
    let (stop, killed) = (AtomicBool::new(false), AtomicUsize::new(0));
    let broker = stack.broker.pid();
    let report = std::thread::scope(|scope| {
        let killer = scope.spawn(|| {
            kill_worker_repeatedly(
                broker,
                "hvisor-worker-b",
                10,
                Duration::from_millis(300),
                0x5851_f42d_4c95_7f2d,
                &stop,
                &killed,
            )
        });
        let report = stack.wait_report(Duration::from_secs(600));
        stop.store(true, SeqCst);
        killer.join().unwrap();
        report.unwrap()
    });
    let failed = failed_checks(&report);
    assert!(failed.is_empty(), "{failed:#?}\n{}", stack.diagnostics());
    assert!(
        killed.load(SeqCst) > 0,
        "the guest finished before the first kill"
    );
    // The broker leaves with the simulator; the image is complete then.
    let st = stack.broker.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
    let shadow = std::fs::read(stack.shadow_dir.join("zone1-0xa003c00.img")).unwrap();
    let disk = std::fs::read(&img).unwrap();
    assert!(
        disk == shadow,
        "the image differs from what the guest wrote"
    );
}
