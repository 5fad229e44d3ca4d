//! What a compromised worker or a hostile guest may cost the broker: its own device, never
//! another zone's, never the host's log, never its own device's recovery.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvisor_tests::*;
use nix::sys::signal::{kill, Signal};
use serde_json::{json, Value};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3c00;
/// The broker's log budget per source: bytes a second, and the burst.
const LOG_RATE: f64 = 16.0 * 1024.0;
const LOG_BURST: f64 = 64.0 * 1024.0;

fn one_disk(s: &Scratch) -> PathBuf {
    let img = s.image("disk.img", 1 << 20);
    s.write_json(
        "zone.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }),
    )
}

/// Guests that never start: the test only looks at the broker and its worker.
fn idle_guests<'a>(s: &Scratch, cfg: &'a Path) -> SimRun<'a> {
    SimRun::new(cfg, "blk-demo")
        .wait_for(&s.path("never"))
        .timeout(120)
}

fn worker_of(stack: &mut Stack) -> nix::unistd::Pid {
    let workers = children(stack.broker.pid());
    assert_eq!(workers.len(), 1, "{}", stack.diagnostics());
    workers[0]
}

/// The most the log budget lets one source write in `elapsed`, plus `slack` for the broker's
/// own lines.
fn log_bound(elapsed: Duration, slack: f64) -> f64 {
    LOG_BURST + LOG_RATE * elapsed.as_secs_f64() + slack
}

#[test]
fn a_flooding_worker_in_one_zone_stalls_no_other_zone() {
    let s = Scratch::new();
    let img = s.image("b.img", 1 << 20);
    let mut zone1 = zone_json(1, RAM, RAM_SIZE, &[]);
    zone1["devices"] = json!([{ "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76, "status": "enable" }]);
    let cfg = s.write_json(
        "zones.json",
        &json!({ "zones": [
            zone1,
            zone_json(2, RAM + RAM_SIZE, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }]),
        ]}),
    );
    let dir = hostile_workers(&s, "flood", "console");
    let run = SimRun::new(&cfg, "blk-verify").timeout(150);
    let mut stack = Stack::start(&s, run, &["--worker-dir", &dir]).unwrap();
    let report = stack.wait_report(Duration::from_secs(180)).unwrap();
    let log = stack.diagnostics();
    assert_checks(&report, &["capacity_nonzero", "get_id_own_driver"], &log);
    assert!(
        report["zones"][1]["devices"][0]["ok"] == json!(true),
        "{report:#}"
    );
    stack
        .broker
        .wait_for(
            "zone1 console@0xa003800 worker (pid",
            Duration::from_secs(30),
        )
        .unwrap();
    let log = stack.broker.text();
    assert!(log.contains("message budget"), "{log}");
    assert!(log.contains("killed by SIGKILL"), "{log}");
    let _ = stack.stop_broker();
}

#[test]
fn a_worker_can_neither_flood_nor_forge_the_log_and_audit_labels_its_claims() {
    let s = Scratch::new();
    let cfg = one_disk(&s);
    let dir = hostile_workers(&s, "forge", "blk");
    let started = Instant::now();
    // one worker's life: no replacement (each would be budgeted the same way)
    let args = ["--worker-dir", &dir, "--restart-budget", "0/60"];
    let mut stack = Stack::start(&s, idle_guests(&s, &cfg), &args).unwrap();
    stack
        .broker
        .wait_for("confined:", Duration::from_secs(30))
        .unwrap();
    let (ok, out) = stack.audit();
    assert!(ok, "{out}");
    let audit: Value = serde_json::from_str(&out).unwrap();
    let w = &audit["workers"][0];
    assert!(
        w["claimed_root"]
            .as_str()
            .is_some_and(|r| r.starts_with("pivot_root into an empty tmpfs")),
        "{w}"
    );
    assert!(w.get("root_kind").is_none(), "{w}");
    let socket = stack.socket.to_str().unwrap().to_string();
    let run = run_dir(&stack.socket).to_str().unwrap().to_string();
    let (ok, table) = broker_cmd(&["audit", "--driver", &socket, "--run-dir", &run]);
    assert!(ok, "{table}");
    assert!(
        table.contains("worker says: confined: pivot_root into an empty tmpfs"),
        "{table}"
    );
    assert!(
        !table.chars().any(|c| c.is_control() && c != '\n'),
        "{table:?}"
    );
    for line in table.lines() {
        assert!(
            !line.trim_start().starts_with("root") || !line.contains("pivot_root"),
            "a claim printed as a fact: {line}"
        );
    }
    // The worker exits after its flood; what reached the log by then is bounded.
    stack
        .broker
        .wait_for(" exited", Duration::from_secs(60))
        .unwrap();
    let elapsed = started.elapsed();
    let log = stack.broker.text();
    let prefix = format!("hvisor-broker[{}]: ", stack.broker.pid());
    for line in log.lines() {
        assert!(
            line.starts_with(&prefix),
            "a line the broker did not start: {line:?}"
        );
        assert!(
            !line.chars().any(char::is_control),
            "raw control character: {line:?}"
        );
    }
    let bytes = log.len() as f64;
    assert!(
        bytes <= log_bound(elapsed, 8192.0),
        "{bytes} bytes of log in {elapsed:?}"
    );
    assert!(log.contains("suppressed"), "{log}");
    assert_eq!(log.matches("failed: ").count(), 1, "{log}");
    assert_eq!(log.matches("confined: ").count(), 1, "{log}");
    let _ = stack.stop_broker();
}

/// Starts the reset storm on a one-disk zone; `pause` stops the worker (as a loaded machine
/// might) until the storm is over.
fn reset_storm(pause: bool) -> (Stack, Value, Duration, Scratch) {
    let s = Scratch::new();
    let cfg = one_disk(&s);
    let go = s.path("go");
    let run = SimRun::new(&cfg, "reset-storm")
        .staying()
        .wait_for(&go)
        .timeout(240);
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    stack
        .broker
        .wait_for("sandboxed and ready", Duration::from_secs(30))
        .unwrap();
    let worker = worker_of(&mut stack);
    if pause {
        kill(worker, Signal::SIGSTOP).unwrap();
    }
    let started = Instant::now();
    std::fs::write(&go, b"").unwrap();
    stack
        .sim
        .wait_for("reset cycles done", Duration::from_secs(200))
        .unwrap();
    let elapsed = started.elapsed();
    if pause {
        // Today's code may have killed it already: the checks below say so.
        let _ = kill(worker, Signal::SIGCONT);
    }
    let report = stack.wait_report(Duration::from_secs(200)).unwrap();
    let log = stack.diagnostics();
    assert_checks(&report, &["reset_storm", "get_id_own_driver"], &log);
    assert!(process_exists(worker), "{log}");
    assert!(!log.contains("stopping it"), "{log}");
    (stack, report, elapsed, s)
}

#[test]
fn a_reset_storm_against_a_stalled_worker_neither_kills_it_nor_breaks_the_device() {
    let (mut stack, ..) = reset_storm(true);
    let _ = stack.stop_broker();
}

#[test]
fn an_activate_loop_cannot_flood_the_host_log() {
    let (mut stack, _, elapsed, _s) = reset_storm(false);
    // Stopped first: what was suppressed is reported at the latest then.
    assert!(stack.stop_broker().unwrap().success());
    let log = stack.broker.text();
    let ready: Vec<&str> = log.lines().filter(|l| l.contains("driver ready")).collect();
    let bytes: usize = ready.iter().map(|l| l.len()).sum();
    assert!(
        (bytes as f64) <= log_bound(elapsed, 4096.0),
        "{} driver-ready lines ({bytes} bytes) in {elapsed:?}",
        ready.len()
    );
    assert!(ready.len() < 3000, "{}", ready.len());
    assert!(log.contains("suppressed"), "{log}");
}

/// The dead-device guest against a worker that makes a forbidden call at every activation:
/// returns the broker's log once the guest saw NEEDS_RESET, stay through a reset, and DRIVER_OK
/// refused.
fn violating_worker_fails_its_device(extra: &[&str]) -> String {
    let s = Scratch::new();
    let cfg = one_disk(&s);
    let dir = probe_workers(&s);
    let run = SimRun::new(&cfg, "dead-device").timeout(60);
    let mut args = vec!["--worker-dir", &dir, "--worker-arg=--violate"];
    args.extend_from_slice(extra);
    let mut stack = Stack::start(&s, run, &args).unwrap();
    let report = stack.wait_report(Duration::from_secs(90)).unwrap();
    let log = stack.diagnostics();
    assert_checks(
        &report,
        &[
            "needs_reset_once_dead",
            "needs_reset_after_reset",
            "driver_ok_refused_while_dead",
        ],
        &log,
    );
    log
}

#[test]
fn a_worker_that_keeps_dying_is_restarted_within_its_budget_then_its_device_fails() {
    let log = violating_worker_fails_its_device(&["--restart-budget", "3/60"]);
    assert!(log.contains("starting a new worker (restart 3)"), "{log}");
    assert!(!log.contains("(restart 4)"), "{log}");
    assert!(
        log.contains("no new worker after 3 restarts in 60s, the budget"),
        "{log}"
    );
    assert!(log.contains("seccomp violation, syscall openat"), "{log}");
}

#[test]
fn with_on_violation_fail_a_seccomp_kill_fails_the_device_at_once() {
    let log = violating_worker_fails_its_device(&["--on-violation", "fail"]);
    assert!(!log.contains("starting a new worker"), "{log}");
    assert!(
        log.contains("no new worker after a seccomp violation"),
        "{log}"
    );
}

#[test]
fn a_slow_starting_worker_is_not_stopped_for_being_slow() {
    let s = Scratch::new();
    let cfg = one_disk(&s);
    let dir = hostile_workers(&s, "slow-ready-3", "blk");
    let mut stack = Stack::start(
        &s,
        idle_guests(&s, &cfg),
        &["--worker-dir", &dir, "--ready-timeout", "1"],
    )
    .unwrap();
    stack
        .broker
        .wait_for("sandboxed and ready", Duration::from_secs(60))
        .unwrap();
    let worker = worker_of(&mut stack);
    let log = stack.broker.text();
    assert!(!log.contains("not ready"), "{log}");
    assert!(process_exists(worker), "{log}");
    let _ = stack.stop_broker();
}

#[test]
fn a_worker_that_never_reports_ready_is_stopped_eventually() {
    let s = Scratch::new();
    let cfg = one_disk(&s);
    let dir = hostile_workers(&s, "never-ready", "blk");
    let mut stack = Stack::start(
        &s,
        idle_guests(&s, &cfg),
        &["--worker-dir", &dir, "--ready-timeout", "1"],
    )
    .unwrap();
    stack
        .broker
        .wait_for("not ready", Duration::from_secs(90))
        .unwrap();
    stack
        .broker
        .wait_for("killed by SIGKILL", Duration::from_secs(30))
        .unwrap();
    assert!(stack.broker.alive(), "{}", stack.diagnostics());
    let _ = stack.stop_broker();
}
