//! virtio-blk end to end: hvisor-sim (a guest driven by virtio-drivers), hvisor-broker and
//! hvisor-worker-blk as separate processes, on real image files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hvisor_tests::*;
use nix::sys::signal::Signal;
use serde_json::json;

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3c00;
const MIB: u64 = 1 << 20;

fn shadow_for(dir: &Path, zone: u32) -> PathBuf {
    let prefix = format!("zone{zone}-");
    std::fs::read_dir(dir)
        .expect("shadow dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .unwrap_or_else(|| panic!("no shadow image for zone {zone} in {}", dir.display()))
}

fn assert_report_ok(stack: &mut Stack, report: &serde_json::Value) {
    let failed = failed_checks(report);
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\nreport: {report:#}\n{}",
        stack.diagnostics()
    );
}

#[test]
fn guest_writes_reads_flushes_discards_and_the_image_holds_exactly_what_it_wrote() {
    let s = Scratch::new();
    let img = s.image("disk.img", 8 * MIB);
    let cfg = s.write_json("zone1.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let run = SimRun::new(&cfg, "blk-verify").seed(7);
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_report_ok(&mut stack, &report);
    let names = check_names(&report).join(" ").to_lowercase();
    for what in ["flush", "discard", "write_zeroes", "id", "capacity"] {
        assert!(
            names.contains(what),
            "no {what} check in the report: {names}"
        );
    }
    let st = stack.sim.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "simulator: {st}\n{}", stack.diagnostics());
    // the broker stops by itself when the simulator leaves; the image is complete then
    let st = stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
    let shadow = std::fs::read(shadow_for(&stack.shadow_dir, 1)).unwrap();
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(disk.len(), shadow.len());
    let first_diff = disk.iter().zip(&shadow).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "image differs from what the guest wrote");
}

#[test]
fn two_zones_with_a_disk_at_the_same_address_do_not_mix() {
    let s = Scratch::new();
    let a = s.image("a.img", 4 * MIB);
    let b = s.image("bb.img", 4 * MIB);
    let cfg = s.write_json(
        "zones.json",
        &json!({ "zones": [
            zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &a, addr: ADDR, irq: 78, readonly: false }]),
            zone_json(2, RAM + RAM_SIZE, RAM_SIZE, &[BlkSpec { img: &b, addr: ADDR, irq: 78, readonly: false }]),
        ]}),
    );
    let mut stack = Stack::start(&s, SimRun::new(&cfg, "blk-verify"), &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(180)).unwrap();
    assert_report_ok(&mut stack, &report);
    stack.sim.wait_exit(Duration::from_secs(30)).unwrap();
    stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    for (zone, img) in [(1, &a), (2, &b)] {
        let shadow = std::fs::read(shadow_for(&stack.shadow_dir, zone)).unwrap();
        assert!(
            std::fs::read(img).unwrap() == shadow,
            "zone {zone}: image differs from its own guest's writes"
        );
    }
    assert!(std::fs::read(&a).unwrap() != std::fs::read(&b).unwrap());
}

#[test]
fn a_read_only_disk_refuses_writes_and_stays_unchanged() {
    let s = Scratch::new();
    let img = s.image("ro.img", 2 * MIB);
    let before = std::fs::read(&img).unwrap();
    let cfg = s.write_json("ro.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: true }])] }));
    let mut stack = Stack::start(&s, SimRun::new(&cfg, "blk-verify"), &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_report_ok(&mut stack, &report);
    assert!(
        report.to_string().contains("\"readonly\":true"),
        "device not seen read-only: {report}"
    );
    stack.sim.wait_exit(Duration::from_secs(30)).unwrap();
    stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only image was modified"
    );
}

#[test]
fn the_legacy_sigusr1_wakeup_serves_the_same_workload() {
    let s = Scratch::new();
    let img = s.image("disk.img", 4 * MIB);
    let cfg = s.write_json("zone1.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let run = SimRun::new(&cfg, "blk-verify").legacy_driver();
    // no polling window: every request has to come through a SIGUSR1 wakeup
    let mut stack = Stack::start(&s, run, &["--poll-us", "0"]).unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_report_ok(&mut stack, &report);
    assert!(
        stack.broker.text().contains("SIGUSR1"),
        "{}",
        stack.diagnostics()
    );
    stack.sim.wait_exit(Duration::from_secs(30)).unwrap();
    stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    let shadow = std::fs::read(shadow_for(&stack.shadow_dir, 1)).unwrap();
    assert!(std::fs::read(&img).unwrap() == shadow);
}

/// hvisor can lose a wakeup of the backend (hvisor-abi 2.5); the simulator loses every third.
/// The broker's bounded sleep finds those requests anyway: slower, never stuck.
#[test]
fn lost_wakeups_only_delay_the_guest() {
    let s = Scratch::new();
    let img = s.image("disk.img", 4 * MIB);
    let cfg = s.write_json("zone.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let run = SimRun::new(&cfg, "blk-verify").args(["--lose-wakeups", "3"]);
    // No polling: every request after a pause needs a wakeup, and every third is lost.
    let mut stack = Stack::start(&s, run, &["--poll-us", "0"]).unwrap();
    let report = stack.wait_report(Duration::from_secs(180)).unwrap();
    assert_report_ok(&mut stack, &report);
    let lost = report["hypervisor"]["lost_wakeups"].as_u64().unwrap();
    assert!(lost > 0, "no wakeup was lost: {report:#}");
}

#[test]
fn hostile_register_accesses_are_answered_and_the_device_still_works() {
    let s = Scratch::new();
    let img = s.image("disk.img", 4 * MIB);
    let cfg = s.write_json("zone1.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let run = SimRun::new(&cfg, "hostile").staying();
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_report_ok(&mut stack, &report);
    assert!(
        check_names(&report).len() >= 10,
        "too few hostile checks: {report:#}"
    );
    assert!(
        stack.broker.alive(),
        "the broker died:\n{}",
        stack.diagnostics()
    );
    let st = stack.stop_broker().unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
}

#[test]
fn the_worker_is_sandboxed_and_sigterm_stops_everything() {
    let s = Scratch::new();
    let img = s.image("disk.img", 2 * MIB);
    let cfg = s.write_json("zone1.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let run = SimRun::new(&cfg, "blk-demo").staying();
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    stack.wait_report(Duration::from_secs(60)).unwrap();
    let workers = children(stack.broker.pid());
    assert_eq!(
        workers.len(),
        1,
        "expected one worker:\n{}",
        stack.diagnostics()
    );
    let w = workers[0];
    assert_eq!(proc_status(w, "Seccomp").as_deref(), Some("2"));
    assert_eq!(proc_status(w, "NoNewPrivs").as_deref(), Some("1"));
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            proc_status(w, set).as_deref(),
            Some("0000000000000000"),
            "{set}"
        );
    }
    // its records reach the broker's log, tagged with zone and device
    assert!(
        stack.broker.text().contains("zone1 blk@0xa003c00"),
        "{}",
        stack.diagnostics()
    );

    // a second broker on the same driver is refused
    let (ok, out) = broker_cmd(&[
        "start",
        cfg.to_str().unwrap(),
        "--driver",
        stack.socket.to_str().unwrap(),
        "--run-dir",
        run_dir(&stack.socket).to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("already serving"), "{out}");

    let st = stack.stop_broker().unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
    std::thread::sleep(Duration::from_millis(100));
    assert!(!process_exists(w), "the worker outlived the broker");
    assert!(stack.sim.wait_exit(Duration::from_secs(10)).is_ok());
}

#[test]
fn a_killed_worker_is_reported_and_replaced_and_its_guest_never_notices() {
    let s = Scratch::new();
    let a = s.image("a.img", 2 * MIB);
    let b = s.image("bb.img", 2 * MIB);
    let cfg = s.write_json(
        "zones.json",
        &json!({ "zones": [
            zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &a, addr: ADDR, irq: 78, readonly: false }]),
            zone_json(2, RAM + RAM_SIZE, RAM_SIZE, &[BlkSpec { img: &b, addr: ADDR, irq: 78, readonly: false }]),
        ]}),
    );
    let go = s.path("go");
    let run = SimRun::new(&cfg, "blk-demo")
        .staying()
        .wait_for(&go)
        .timeout(40);
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    stack
        .broker
        .wait_for("zone1 blk@0xa003c00: worker", Duration::from_secs(10))
        .unwrap();
    stack
        .broker
        .wait_for("zone2 blk@0xa003c00: worker", Duration::from_secs(10))
        .unwrap();
    let line = stack
        .broker
        .wait_for(
            "zone1 blk@0xa003c00: irq 78, worker pid",
            Duration::from_secs(1),
        )
        .unwrap();
    let pid: i32 = line
        .split("worker pid ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    stack
        .broker
        .wait_for(
            &format!("worker (pid {pid}) killed by SIGKILL"),
            Duration::from_secs(5),
        )
        .unwrap();
    stack
        .broker
        .wait_for(
            "zone1 blk@0xa003c00: starting a new worker (restart 1)",
            Duration::from_secs(5),
        )
        .unwrap();
    std::fs::write(&go, b"").unwrap();
    let report = stack.wait_report(Duration::from_secs(60)).unwrap();
    // both zones are served in full: zone 1 by the replacement worker
    assert!(stack.broker.alive(), "{}", stack.diagnostics());
    let zone = |id: u64| {
        report["zones"]
            .as_array()
            .unwrap()
            .iter()
            .find(|z| z["zone"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(zone(2)["ok"], true, "zone 2 failed: {report:#}");
    assert_eq!(zone(1)["ok"], true, "zone 1 failed: {report:#}");
    let (ok, audit) = stack.audit();
    assert!(ok, "{audit}");
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let w = (audit["workers"].as_array().unwrap().iter())
        .find(|w| w["label"] == "zone1 blk@0xa003c00")
        .unwrap();
    assert_eq!(w["restarts"], 1, "{w:#}");
    assert!(
        w["exits"][0]
            .as_str()
            .unwrap()
            .ends_with("UTC: killed by SIGKILL"),
        "{w:#}"
    );
    let _ = stack.stop_broker();
}

#[test]
fn records_go_to_syslog_as_hvisor_broker_facility_daemon() {
    let s = Scratch::new();
    let img = s.image("disk.img", MIB);
    let cfg = s.write_json(
        "zone1.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }),
    );
    let log_path = s.path("log.sock");
    let syslog = std::os::unix::net::UnixDatagram::bind(&log_path).unwrap();
    syslog
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut stack = Stack::start(
        &s,
        SimRun::new(&cfg, "blk-demo"),
        &["--syslog-socket", log_path.to_str().unwrap()],
    )
    .unwrap();
    stack.wait_report(Duration::from_secs(60)).unwrap();
    stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    let mut records = Vec::new();
    let mut buf = [0u8; 4096];
    syslog.set_nonblocking(true).unwrap();
    while let Ok(n) = syslog.recv(&mut buf) {
        records.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // <30> = facility daemon (3) * 8 + info (6)
    let worker = records
        .iter()
        .find(|r| r.contains("zone1 blk@0xa003c00: worker starting"));
    let worker = worker.unwrap_or_else(|| panic!("no worker record in syslog: {records:#?}"));
    assert!(
        worker.starts_with("<30>") && worker.contains("hvisor-broker["),
        "{worker}"
    );
    // nothing went to stderr instead
    assert!(
        !stack.broker.text().contains("worker starting"),
        "{}",
        stack.broker.text()
    );
}

/// Many requests in flight on the host: the image lies on a FUSE file system of the test's own
/// that answers no read until 8 wait at once, and the guest keeps 8 in flight; the run completes
/// only if the worker has all 8 on the disk together. (Served one at a time, the barrier is
/// never met: the guest gives up waiting, and the file system's hang guard lets go later.)
#[test]
fn requests_the_guest_keeps_in_flight_are_in_flight_on_the_host_together() {
    let s = Scratch::new();
    let backing = s.image("backing.img", 4 * MIB);
    let mnt = s.path("slowfs");
    std::fs::create_dir(&mnt).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&backing)
        .unwrap();
    let timing = fuse::Timing::Barrier {
        reads: 8,
        hang_guard: Duration::from_secs(30),
    };
    let fs = fuse::SlowFs::mount(&mnt, file, timing).unwrap();
    let img = fs.image();
    let cfg = s.write_json("zone1.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let run = SimRun::new(&cfg, "depth-bench").depths(&[8], 0);
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert!(
        fs.barrier_met(),
        "at most {} of the guest's 8 reads were in flight on the host at once\n{}",
        fs.most_reads_at_once(),
        stack.diagnostics()
    );
    assert_report_ok(&mut stack, &report);
    assert!(stack.stop_broker().unwrap().success());
}

/// Deeper than the stock driver's queue of 16: our own driver keeps 32, then 64, reads in
/// flight on a queue of 256. Each run completes and every read matches the image.
#[test]
fn a_guest_keeping_32_and_64_reads_in_flight_completes_and_every_read_matches_the_image() {
    let s = Scratch::new();
    let img = s.image("disk.img", 4 * MIB);
    let cfg = s.write_json("zone1.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let run = SimRun::new(&cfg, "depth-bench")
        .depths(&[32, 64], 1)
        .arg("--depth-verify");
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_report_ok(&mut stack, &report);
    let dev = &report["zones"][0]["devices"][0];
    let depths = dev["depths"].as_array().expect("depth figures");
    let mut ops = 0;
    for (d, depth) in depths.iter().zip([32, 64]) {
        assert_eq!(d["depth"], depth, "{dev:#}");
        // The first `depth` reads go out together, however short the run.
        assert!(d["ops"].as_u64().unwrap() >= depth, "{dev:#}");
        ops += d["ops"].as_u64().unwrap();
    }
    assert_eq!(depths.len(), 2, "{dev:#}");
    assert_eq!(dev["reads"], ops, "{dev:#}");
    assert_eq!(dev["verified_bytes"], ops * 4096, "{dev:#}");
    assert!(stack.stop_broker().unwrap().success());
}
