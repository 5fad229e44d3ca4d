//! `hvisor-broker status`: the counters of a blk workload, a worker restart, and the
//! Prometheus text read back by a Prometheus text-format parser.

use std::collections::BTreeMap;
use std::time::Duration;

use hvisor_tests::*;
use nix::sys::signal::{kill, Signal};
use serde_json::{json, Value};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const MIB: u64 = 1 << 20;
const DISKS: [(u64, u32); 2] = [(0xa00_3c00, 78), (0xa00_3e00, 79)];

fn status_json(stack: &mut Stack) -> Value {
    let (ok, out) = stack.ask(&["status", "--json"]);
    assert!(ok, "status: {out}\n{}", stack.diagnostics());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn device<'a>(status: &'a Value, name: &str) -> &'a Value {
    (status["devices"].as_array().unwrap().iter())
        .find(|d| d["device"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status:#}"))
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// What the guest says it asked of the device at `addr`.
fn guest_counts(report: &Value, addr: u64) -> (u64, u64, u64) {
    let devices = report["zones"][0]["devices"].as_array().unwrap();
    let d = devices.iter().find(|d| d["addr"] == addr).unwrap();
    let requests = ["writes", "reads", "flushes", "discards", "write_zeroes"]
        .iter()
        .map(|k| num(&d[*k]))
        .sum();
    (requests, num(&d["reads"]), num(&d["writes"]))
}

#[test]
fn status_counts_a_blk_workload_per_device_and_a_worker_restart() {
    let s = Scratch::new();
    let imgs = [s.image("a.img", 4 * MIB), s.image("b.img", 4 * MIB)];
    let specs: Vec<BlkSpec> = (imgs.iter().zip(DISKS))
        .map(|(img, (addr, irq))| BlkSpec {
            img,
            addr,
            irq,
            readonly: false,
        })
        .collect();
    let cfg = s.write_json(
        "zone1.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &specs)] }),
    );
    let run = SimRun::new(&cfg, "blk-verify").staying();
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(300)).unwrap();
    assert!(failed_checks(&report).is_empty(), "{report:#}");

    let status = status_json(&mut stack);
    for (addr, _) in DISKS {
        let d = device(&status, &format!("blk@{addr:#x}"));
        let (requests, reads, writes) = guest_counts(&report, addr);
        let w = &d["worker_reported"];
        assert!(reads > 0 && writes > 0, "{report:#}");
        assert!(num(&w["requests"]) >= requests, "{requests} asked: {d:#}");
        // every read and write moves at least a sector
        assert!(num(&w["bytes_read"]) >= 512 * reads, "{d:#}");
        assert!(num(&w["bytes_written"]) >= 512 * writes, "{d:#}");
        assert!(num(&w["queue_depth_high_water"]) >= 1, "{d:#}");
        assert!(num(&d["interrupts_injected"]) > 0, "{d:#}");
        assert_eq!(num(&d["worker_restarts"]), 0, "{d:#}");
        assert!(num(&d["worker_memory_bytes"]) > 0, "{d:#}");
        assert!(d["worker_cpu_seconds"].as_f64().is_some(), "{d:#}");
    }

    // the first disk's worker dies: counted, replaced; the other device's numbers stay its own
    let label = format!("zone1 blk@{:#x}", DISKS[0].0);
    let pid = worker_pid(&mut stack.broker, &label, 0, Duration::from_secs(30)).unwrap();
    let before = device(&status, &format!("blk@{:#x}", DISKS[0].0)).clone();
    kill(pid, Signal::SIGKILL).unwrap();
    let new = worker_pid(&mut stack.broker, &label, 1, Duration::from_secs(60)).unwrap();
    let status = status_json(&mut stack);
    let d = device(&status, &format!("blk@{:#x}", DISKS[0].0));
    assert_eq!(num(&d["worker_restarts"]), 1, "{d:#}");
    assert_eq!(num(&d["worker_exits"]), 1, "{d:#}");
    assert_eq!(d["worker_pid"], new.as_raw(), "{d:#}");
    // the record's counters outlive the worker
    assert!(
        num(&d["worker_reported"]["requests"]) >= num(&before["worker_reported"]["requests"]),
        "{before:#}\n{d:#}"
    );
    let other = device(&status, &format!("blk@{:#x}", DISKS[1].0));
    assert_eq!(num(&other["worker_restarts"]), 0, "{other:#}");
    assert_eq!(num(&other["worker_exits"]), 0, "{other:#}");

    let (ok, text) = stack.ask(&["status", "--prometheus"]);
    assert!(ok, "{text}");
    let status = status_json(&mut stack);
    assert_prometheus_matches(&text, &status);
    let _ = stack.stop_broker();
}

#[test]
fn a_worker_lying_about_its_counters_is_shown_as_such_and_nothing_more() {
    let s = Scratch::new();
    let img = s.image("disk.img", MIB);
    let addr = DISKS[0].0;
    let spec = BlkSpec {
        img: &img,
        addr,
        irq: 78,
        readonly: false,
    };
    let cfg = s.write_json(
        "zone1.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[spec])] }),
    );
    let workers = probe_workers(&s);
    let run = SimRun::new(&cfg, "blk-demo").timeout(60);
    let args = ["--worker-dir", &workers, "--worker-arg=--lie"];
    let mut stack = Stack::start(&s, run, &args).unwrap();
    stack
        .broker
        .wait_for("probe done", Duration::from_secs(30))
        .unwrap();
    let status = status_json(&mut stack);
    let d = device(&status, &format!("blk@{addr:#x}"));
    let w = &d["worker_reported"];
    // its own numbers, as it wrote them, where they could be; a depth no queue has is not shown
    assert_eq!(num(&w["requests"]), u64::MAX, "{d:#}");
    assert_eq!(w["queue_depth_high_water"], Value::Null, "{d:#}");
    // what the broker counts itself is not the worker's to set
    assert_eq!(num(&d["worker_restarts"]), 0, "{d:#}");
    assert_eq!(num(&d["worker_exits"]), 0, "{d:#}");
    assert!(num(&d["interrupts_injected"]) < 1 << 32, "{d:#}");
    let (ok, text) = stack.ask(&["status", "--prometheus"]);
    assert!(ok, "{text}");
    assert!(
        !text.contains("hvisor_broker_worker_reported_queue_depth_high_water{"),
        "{text}"
    );
    assert_prometheus_matches(&text, &status);
    let (ok, human) = stack.ask(&["status"]);
    assert!(ok && human.contains("not believable"), "{human}");
    assert!(stack.broker.alive(), "{}", stack.diagnostics());
    let _ = stack.stop_broker();
}

/// Parses `text` as the Prometheus text format and checks it against the JSON status: the
/// same counters, and the live workers' CPU time and memory.
fn assert_prometheus_matches(text: &str, status: &Value) {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    let mut seen: BTreeMap<(String, String), f64> = BTreeMap::new();
    for s in &scrape.samples {
        assert!(s.metric.starts_with("hvisor_broker_"), "{}", s.metric);
        assert_eq!(s.labels.get("zone"), Some("1"), "{text}");
        assert_eq!(s.labels.get("kind"), Some("blk"), "{text}");
        assert!(
            scrape.docs.contains_key(&s.metric),
            "{} has no HELP: {text}",
            s.metric
        );
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{}: not a plain value", s.metric),
        };
        let device = s.labels.get("device").unwrap().to_string();
        seen.insert((s.metric.clone(), device), value);
    }
    let counters = [
        (
            "worker_reported_requests_total",
            "/worker_reported/requests",
        ),
        (
            "worker_reported_read_bytes_total",
            "/worker_reported/bytes_read",
        ),
        (
            "worker_reported_written_bytes_total",
            "/worker_reported/bytes_written",
        ),
        ("worker_reported_errors_total", "/worker_reported/errors"),
        (
            "worker_reported_queue_depth_high_water",
            "/worker_reported/queue_depth_high_water",
        ),
        ("interrupts_injected_total", "/interrupts_injected"),
        ("interrupts_reinjected_total", "/interrupts_reinjected"),
        ("worker_restarts_total", "/worker_restarts"),
        ("worker_exits_total", "/worker_exits"),
    ];
    for d in status["devices"].as_array().unwrap() {
        let name = d["device"].as_str().unwrap().to_string();
        let get = |metric: &str| seen.get(&(format!("hvisor_broker_{metric}"), name.clone()));
        for (metric, pointer) in counters {
            let want = d.pointer(pointer).unwrap().as_u64().map(|v| v as f64);
            assert_eq!(get(metric).copied(), want, "{metric} of {name}: {text}");
        }
        assert!(get("worker_cpu_seconds_total").is_some(), "{text}");
        assert!(
            get("worker_memory_bytes").is_some_and(|&m| m > 0.0),
            "{text}"
        );
    }
}
