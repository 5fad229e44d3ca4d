//! Crash-only workers, end to end: workers killed at random moments while a simulator guest
//! (a virtio-drivers driver, which fails on any I/O error) works, replaced on request, and the
//! broker's fds and memory after many restarts.

use std::time::Duration;

use hvisor_tests::*;
use nix::sys::signal::{kill, Signal};
use serde_json::json;

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3c00;
const MIB: u64 = 1 << 20;
const LABEL: &str = "zone1 blk@0xa003c00";
const START: Duration = Duration::from_secs(60);

fn one_disk(s: &Scratch, size: u64) -> std::path::PathBuf {
    let img = s.image("disk.img", size);
    s.write_json(
        "zone1.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }),
    )
}

fn assert_ok(stack: &mut Stack, report: &serde_json::Value) {
    let failed = failed_checks(report);
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\n{}",
        stack.diagnostics()
    );
}

/// Kills the blk worker at random moments, up to `max` times or until the guest reports;
/// returns how many were killed.
fn kill_at_random(stack: &mut Stack, max: usize, within: Duration, seed: u64) -> usize {
    let mut moments = Moments(seed);
    for n in 0..max {
        let pid = match worker_pid(&mut stack.broker, LABEL, n, START) {
            Ok(pid) => pid,
            // The guest finished while a replacement waited out its backoff, and the broker
            // ended with the simulator: that is the end of the kills, not a failure.
            Err(_) if stack.report.exists() => return n,
            Err(e) => panic!("{e}"),
        };
        std::thread::sleep(moments.next(within));
        if stack.report.exists() {
            return n;
        }
        kill(pid, Signal::SIGKILL).unwrap();
    }
    max
}

fn guest_with_kills(guest: &str, kills: usize, within: Duration, seed: u64) {
    let s = Scratch::new();
    let cfg = one_disk(&s, 8 * MIB);
    let run = SimRun::new(&cfg, guest).timeout(600);
    let mut stack = Stack::start(&s, run, &["--restart-budget", "1000/60"]).unwrap();
    let killed = kill_at_random(&mut stack, kills, within, seed);
    let report = stack.wait_report(Duration::from_secs(600)).unwrap();
    assert_ok(&mut stack, &report);
    assert!(killed > 0, "the guest finished before the first kill");
    let log = stack.broker.text();
    assert!(
        log.contains(&format!("starting a new worker (restart {killed})")),
        "{log}"
    );
    assert!(!log.contains("the device fails"), "{log}");
    let _ = stack.stop_broker();
}

#[test]
fn blk_io_checked_against_a_shadow_survives_kills_at_random_moments() {
    guest_with_kills(
        "blk-verify",
        20,
        Duration::from_millis(40),
        0x9e37_79b9_7f4a_7c15,
    );
}

#[test]
fn kills_during_start_up_activation_queue_stops_and_driver_resets_are_invisible_to_the_guest() {
    // 3000 resets and initialisations, half of them with a read and a queue stop (QueueReady
    // 0) before the reset, then verified I/O; kills land in all of them, and some right after
    // a worker was started (before it is ready)
    guest_with_kills(
        "reset-storm-io",
        20,
        Duration::from_millis(20),
        0x2545_f491_4f6c_dd1d,
    );
}

#[test]
fn an_operator_replaces_a_worker_and_the_guest_goes_on() {
    let s = Scratch::new();
    let cfg = one_disk(&s, 2 * MIB);
    let go = s.path("go");
    let run = SimRun::new(&cfg, "blk-verify").wait_for(&go).timeout(120);
    let mut stack = Stack::start(&s, run, &["--restart-budget", "0/60"]).unwrap();
    let first = worker_pid(&mut stack.broker, LABEL, 0, START).unwrap();
    let restart = |device: &str| {
        broker_cmd(&[
            "restart-worker",
            "1",
            device,
            "--driver",
            stack.socket.to_str().unwrap(),
            "--run-dir",
            run_dir(&stack.socket).to_str().unwrap(),
        ])
    };
    let (ok, out) = restart("net@0xa003c00");
    assert!(!ok && out.contains("zone 1 has no device"), "{out}");
    // by name, then by address: outside the budget (0 here)
    let (ok, out) = restart("blk@0xa003c00");
    assert!(ok && out.contains("replacing worker pid"), "{out}");
    let second = worker_pid(&mut stack.broker, LABEL, 1, START).unwrap();
    let (ok, out) = restart("0xa003c00");
    assert!(ok, "{out}");
    let third = worker_pid(&mut stack.broker, LABEL, 2, START).unwrap();
    assert!(first != second && second != third);
    std::fs::write(&go, b"").unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_ok(&mut stack, &report);
    let log = stack.broker.text();
    assert!(log.contains("replaced as asked"), "{log}");
    assert!(!log.contains("the device fails"), "{log}");
    let _ = stack.stop_broker();
}

#[test]
fn after_a_hundred_restarts_the_broker_holds_what_it_held_before() {
    let s = Scratch::new();
    let cfg = one_disk(&s, 2 * MIB);
    let go = s.path("go");
    let run = SimRun::new(&cfg, "blk-verify").wait_for(&go).timeout(600);
    let mut stack = Stack::start(&s, run, &["--restart-budget", "1000/60"]).unwrap();
    let broker = stack.broker.pid();
    let ready =
        |stack: &mut Stack, n: usize| ready_worker_pid(&mut stack.broker, LABEL, n, START).unwrap();
    // a few first, so that everything the broker allocates once is allocated
    for n in 0..5 {
        kill(ready(&mut stack, n), Signal::SIGKILL).unwrap();
    }
    ready(&mut stack, 5);
    let (fds, rss) = (fd_count(broker), rss_kib(broker).unwrap());
    for n in 5..105 {
        let pid = worker_pid(&mut stack.broker, LABEL, n, START).unwrap();
        kill(pid, Signal::SIGKILL).unwrap();
    }
    ready(&mut stack, 105);
    let (fds_after, rss_after) = (fd_count(broker), rss_kib(broker).unwrap());
    println!("broker fds {fds} -> {fds_after}, resident {rss} KiB -> {rss_after} KiB");
    assert_eq!(fds_after, fds, "{}", stack.broker.text());
    // a page or two of allocator slack, nothing that grows with restarts
    assert!(rss_after <= rss + 256, "{rss} KiB -> {rss_after} KiB");
    std::fs::write(&go, b"").unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_ok(&mut stack, &report);
    let _ = stack.stop_broker();
}

#[test]
fn a_worker_killed_while_its_queue_is_stopped_is_replaced_and_the_device_works_after_re_init() {
    let s = Scratch::new();
    let cfg = one_disk(&s, 2 * MIB);
    let resume = s.path("resume");
    let run = SimRun::new(&cfg, "queue-stop")
        .arg("--resume-when")
        .arg(&resume)
        .timeout(120);
    let mut stack = Stack::start(&s, run, &["--restart-budget", "10/60"]).unwrap();
    stack
        .sim
        .wait_for("blk@0xa003c00: queue 0 stopped", START)
        .unwrap();
    // Whether the worker read the stop before it dies or not, its successor must leave the
    // stopped queue alone and serve the device once the driver initialises it again.
    let first = worker_pid(&mut stack.broker, LABEL, 0, START).unwrap();
    kill(first, Signal::SIGKILL).unwrap();
    ready_worker_pid(&mut stack.broker, LABEL, 1, START).unwrap();
    std::fs::write(&resume, b"").unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_ok(&mut stack, &report);
    assert!(
        check_names(&report).contains(&"stopped_queue_left_alone".to_string()),
        "{report:#}"
    );
    let log = stack.broker.text();
    assert!(log.contains("starting a new worker (restart 1)"), "{log}");
    assert!(!log.contains("the device fails"), "{log}");
    let _ = stack.stop_broker();
}
