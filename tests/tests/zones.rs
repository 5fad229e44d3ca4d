//! Zones at run time, end to end: `hvisor-broker zone add|remove|list` and SIGHUP against a
//! running broker, while another zone's guest does verified blk I/O in the simulator.
//!
//! The simulator is given every zone that may ever exist; zone 2's guest (`rounds`) runs one
//! round (reset, fresh handshake, checked blk I/O) per go file the test writes, as a zone
//! started and shut down by `hvisor zone` would. Zone 1 runs `blk-verify` again and again
//! until the test is done.

#[path = "net/peer.rs"]
mod peer;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvisor_tests::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use peer::{skip_reason, Netns};

const RAM1: u64 = 0x5000_0000;
const RAM2: u64 = 0x6000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const BLK: u64 = 0xa00_3c00;
const MIB: u64 = 1 << 20;
const TAP: &str = "hvztap0";
const WAIT: Duration = Duration::from_secs(120);

/// Zone `id` with RAM at `ram` and one disk.
fn disk_zone(id: u32, ram: u64, img: &Path) -> Value {
    let disk = BlkSpec {
        img,
        addr: BLK,
        irq: 78,
        readonly: false,
    };
    zone_json(id, ram, RAM_SIZE, &[disk])
}

/// Zone 2: a disk, and optionally a console with a `pty_link` and a net device.
fn zone2(img: &Path, link: Option<&Path>, tap: bool) -> Value {
    let mut z = disk_zone(2, RAM2, img);
    let devs = z["devices"].as_array_mut().unwrap();
    if let Some(link) = link {
        devs.push(
            json!({ "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76,
            "pty_link": link.to_str().unwrap(), "status": "enable" }),
        );
    }
    if tap {
        devs.push(json!({ "type": "net", "addr": "0xa003600", "len": "0x200", "irq": 75,
            "tap": TAP, "mac": ["0x02", "0x00", "0x00", "0x00", "0x02", "0x01"], "status": "enable" }));
    }
    z
}

fn zone1(img: &Path) -> Value {
    disk_zone(1, RAM1, img)
}

/// A broker serving zone 1 (from `start.json`), a simulator that knows zones 1 and 2.
struct Run {
    stack: Stack,
    scratch: Scratch,
    rounds: PathBuf,
    done: PathBuf,
    start_cfg: PathBuf,
    zone2_cfg: PathBuf,
    link: PathBuf,
}

fn start(tap: bool) -> Run {
    let scratch = Scratch::new();
    let disk1 = scratch.image("disk1.img", 8 * MIB);
    let disk2 = scratch.image("disk2.img", MIB);
    let link = scratch.path("console2");
    let z1 = zone1(&disk1);
    let z2 = zone2(&disk2, Some(&link), tap);
    let sim_cfg = scratch.write_json("all.json", &json!({ "zones": [z1, z2] }));
    let start_cfg = scratch.write_json("start.json", &json!({ "zones": [z1] }));
    let zone2_cfg = scratch.write_json("zone2.json", &json!({ "zones": [z2] }));
    let rounds = scratch.path("rounds");
    std::fs::create_dir_all(&rounds).unwrap();
    let done = scratch.path("done");
    let run = SimRun::new(&sim_cfg, "blk-verify")
        .args(["--zone-guest", "2=rounds"])
        .arg("--rounds-dir")
        .arg(&rounds)
        .arg("--repeat-until")
        .arg(&done)
        .timeout(1200);
    let mut stack = Stack::start_with(&scratch, run, |socket| {
        start_broker(&start_cfg, socket, &[])
    })
    .unwrap();
    stack
        .broker
        .wait_for("sandboxed and ready: serving", WAIT)
        .unwrap();
    let mut r = Run {
        stack,
        scratch,
        rounds,
        done,
        start_cfg,
        zone2_cfg,
        link,
    };
    r.wait_zones(&[1]);
    r
}

impl Run {
    fn zone(&self, args: &[&str]) -> (bool, String) {
        let mut all = vec!["zone"];
        all.extend_from_slice(args);
        self.stack.ask(&all)
    }

    fn add(&self, cfg: &Path) -> (bool, String) {
        self.zone(&["add", cfg.to_str().unwrap()])
    }

    fn list(&self) -> Value {
        let (ok, out) = self.zone(&["list", "--json"]);
        assert!(ok, "zone list: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// The zones served (not those being removed), with each device's name and irq.
    fn served(&self) -> Vec<(u64, Vec<(String, u64)>)> {
        let list = self.list();
        (list["zones"].as_array().unwrap().iter())
            .filter(|z| z["state"] == "served")
            .map(|z| {
                let devs = z["devices"].as_array().unwrap().iter();
                let devs = devs.map(|d| {
                    (
                        d["device"].as_str().unwrap().to_string(),
                        d["irq"].as_u64().unwrap(),
                    )
                });
                (z["zone"].as_u64().unwrap(), devs.collect())
            })
            .collect()
    }

    fn served_ids(&self) -> Vec<u64> {
        self.served().into_iter().map(|(id, _)| id).collect()
    }

    /// Waits (a hang guard) until exactly `ids` are served and no zone is being removed.
    fn wait_zones(&mut self, ids: &[u64]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let list = self.list();
            let all = list["zones"].as_array().unwrap();
            let served: Vec<u64> = all.iter().map(|z| z["zone"].as_u64().unwrap()).collect();
            let removing = all.iter().any(|z| z["state"] != "served");
            if served == ids && !removing {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "zones {served:?}, not {ids:?}:\n{list:#}\n{}",
                self.stack.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lets zone 2's guest run round `n` and returns what it wrote.
    fn round(&mut self, n: u64) -> String {
        std::fs::write(self.rounds.join(format!("zone2-go{n}")), b"").unwrap();
        let done = self.rounds.join(format!("zone2-done{n}"));
        let deadline = Instant::now() + WAIT;
        while !done.exists() {
            assert!(
                Instant::now() < deadline && self.stack.sim.alive(),
                "round {n} did not end:\n{}",
                self.stack.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::read_to_string(done).unwrap()
    }

    /// Ends both guests and checks the report: zone 1's verified I/O and zone 2's rounds.
    fn finish(self, rounds: u64) {
        self.finish_with_failures(rounds, 0)
    }

    /// [`finish`](Self::finish) where `failed` rounds were meant to fail.
    fn finish_with_failures(mut self, rounds: u64, failed: u64) {
        std::fs::write(self.rounds.join("zone2-end"), b"").unwrap();
        std::fs::write(&self.done, b"").unwrap();
        let report = self.stack.wait_report(Duration::from_secs(600)).unwrap();
        let bad = failed_checks(&report);
        let expected = usize::from(failed > 0);
        assert!(
            bad.len() == expected && bad.iter().all(|c| c.starts_with("rounds: ")),
            "failed checks: {bad:#?}\n{}",
            self.stack.diagnostics()
        );
        let checks = check_names(&report);
        assert!(checks.iter().any(|c| c == "rounds"), "{checks:?}");
        // Seen with --nocapture: how much verified I/O zone 1 did meanwhile.
        let runs = checks.iter().filter(|c| *c == "stock_readback").count();
        println!("zone 1 ran blk-verify {runs} time(s)");
        let text = report.to_string();
        assert!(
            text.contains(&format!("{rounds} round(s) passed, {failed} failed")),
            "{report:#}"
        );
        let _ = self.stack.stop_broker();
        drop(self.scratch);
    }
}

/// The broker's open files, for a message.
fn fds(run: &Run) -> String {
    let dir = format!("/proc/{}/fd", run.stack.broker.pid());
    let mut out: Vec<String> = (std::fs::read_dir(dir).into_iter().flatten().flatten())
        .map(|e| {
            format!(
                "{:?} -> {:?}",
                e.file_name(),
                std::fs::read_link(e.path()).ok()
            )
        })
        .collect();
    out.sort();
    out.join("\n")
}

/// What must come back after every removal: the broker's fds and children.
fn footprint(run: &Run) -> (usize, usize) {
    let pid = run.stack.broker.pid();
    (fd_count(pid), children(pid).len())
}

#[test]
fn a_zone_added_and_removed_50_times_leaks_nothing_while_another_does_verified_io() {
    let ns = match skip_reason() {
        None => {
            let ns = Netns::create("zones").unwrap();
            ns.enter().unwrap();
            Some(ns)
        }
        Some(why) => {
            eprintln!("no net device in zone 2: {why}");
            None
        }
    };
    let mut run = start(ns.is_some());
    let before = footprint(&run);
    let tap_exists = |ns: &Netns| ns.ip(&["link", "show", TAP]).is_ok();
    for n in 1..=50 {
        let (ok, out) = run.add(&run.zone2_cfg);
        assert!(
            ok,
            "round {n}: zone add: {out}\n{}",
            run.stack.diagnostics()
        );
        assert_eq!(run.served_ids(), [1, 2]);
        assert!(
            run.link.exists(),
            "round {n}: no pty_link while zone 2 is served"
        );
        if let Some(ns) = &ns {
            assert!(tap_exists(ns), "round {n}: no tap while zone 2 is served");
        }
        let outcome = run.round(n);
        assert_eq!(outcome, "ok", "round {n}\n{}", run.stack.diagnostics());
        let (ok, out) = run.zone(&["remove", "2"]);
        assert!(ok, "round {n}: zone remove: {out}");
        assert!(out.contains("zone 2 removed"), "{out}");
        // Answered once everything is released.
        assert_eq!(run.served_ids(), [1]);
        assert_eq!(
            footprint(&run),
            before,
            "round {n}: fds, children\n{}",
            fds(&run)
        );
        assert!(!run.link.exists(), "round {n}: pty_link left behind");
        if let Some(ns) = &ns {
            assert!(!tap_exists(ns), "round {n}: tap left behind");
        }
    }
    run.finish(50);
    drop(ns);
}

#[test]
fn a_bad_zone_add_changes_nothing_and_says_what_was_wrong() {
    let run = start(false);
    let s = &run.scratch;
    let disk1 = s.path("disk1.img");
    let disk2 = s.path("disk2.img");
    let before = (run.list(), footprint(&run));
    let mut overlap = zone2(&disk2, None, false);
    overlap["memory_region"][0]["zone0_ipa"] = json!(format!("{:#x}", RAM1 + MIB));
    let mut clash = zone2(&disk2, None, false);
    let twin = clash["devices"][0].clone();
    clash["devices"].as_array_mut().unwrap().push(twin);
    // Passes validation; the console's pty is opened before the disk is refused.
    let in_use = {
        let mut z = zone2(&disk1, Some(&run.link), false);
        z["devices"].as_array_mut().unwrap().reverse();
        z
    };
    let cases = [
        (
            "overlap",
            overlap,
            "overlaps running zone 1 memory_region[0]",
        ),
        (
            "duplicate",
            zone1(&disk2),
            "duplicate zone id 1 (also running zone 1)",
        ),
        (
            "missing",
            zone2(&s.path("nowhere.img"), None, false),
            "zones[0].devices[0].img",
        ),
        ("clash", clash, "zones[0].devices[1]: MMIO range"),
        (
            "in-use",
            in_use,
            "in use by another hvisor-broker (or another device of this one)",
        ),
    ];
    for (name, zone, wanted) in cases {
        let cfg = s.write_json(&format!("{name}.json"), &json!({ "zones": [zone] }));
        let (ok, out) = run.add(&cfg);
        assert!(!ok, "{name}: accepted: {out}");
        assert!(out.contains(wanted), "{name}: {out}");
        assert!(out.contains("nothing changed"), "{name}: {out}");
        assert_eq!((run.list(), footprint(&run)), before, "{name}");
        assert!(!run.link.exists(), "{name}: pty_link left behind");
    }
    // Nothing was held back: the good file is served.
    let (ok, out) = run.add(&run.zone2_cfg);
    assert!(ok, "{out}");
    let mut run = run;
    assert_eq!(run.round(1), "ok");
    run.finish(1);
}

#[test]
fn sighup_applies_the_changed_start_config() {
    let mut run = start(false);
    let s = &run.scratch;
    let z1 = zone1(&s.path("disk1.img"));
    let z2 = zone2(&s.path("disk2.img"), Some(&run.link), false);
    let start_cfg = run.start_cfg.clone();
    let write =
        |zones: Value| std::fs::write(&start_cfg, json!({ "zones": zones }).to_string()).unwrap();
    write(json!([z1, z2]));
    run.stack.broker.signal(Signal::SIGHUP);
    run.wait_zones(&[1, 2]);
    assert_eq!(run.round(1), "ok");
    // A changed zone is removed and added again as it now is.
    let mut changed = z2.clone();
    changed["devices"][0]["irq"] = json!(79);
    write(json!([z1, changed]));
    run.stack.broker.signal(Signal::SIGHUP);
    let deadline = Instant::now() + WAIT;
    while !run
        .served()
        .iter()
        .any(|(id, devs)| *id == 2 && devs[0].1 == 79)
    {
        assert!(Instant::now() < deadline, "{:#}", run.list());
        std::thread::sleep(Duration::from_millis(20));
    }
    run.stack
        .broker
        .wait_for("zones added: none; removed: none; changed: 2", WAIT)
        .unwrap();
    // A bad file changes nothing.
    std::fs::write(&start_cfg, "{ \"zones\": [").unwrap();
    run.stack.broker.signal(Signal::SIGHUP);
    run.stack
        .broker
        .wait_for("invalid configuration, nothing changed", WAIT)
        .unwrap();
    assert_eq!(run.served_ids(), [1, 2]);
    write(json!([z1]));
    run.stack.broker.signal(Signal::SIGHUP);
    run.wait_zones(&[1]);
    assert!(!run.link.exists(), "pty_link left behind");
    run.finish(1);
}

#[test]
fn a_zone_that_resets_its_devices_and_starts_over_is_served_again() {
    let mut run = start(false);
    let (ok, out) = run.add(&run.zone2_cfg);
    assert!(ok, "{out}");
    // Each round is a new boot of the zone: Status 0 while the device is running, then a
    // fresh handshake, with the broker serving throughout.
    for n in 1..=10 {
        assert_eq!(run.round(n), "ok", "round {n}\n{}", run.stack.diagnostics());
    }
    let log = run.stack.broker.text();
    assert!(
        !log.contains("zone2 blk@0xa003c00 worker (pid"),
        "no worker may die:\n{log}"
    );
    // Removed while its guest still runs: every access is answered (the device reads 0, so
    // the driver gives up) and no vCPU waits. Added again, the zone starts over.
    let (ok, out) = run.zone(&["remove", "2"]);
    assert!(ok, "{out}");
    let outcome = run.round(11);
    assert!(
        outcome.starts_with("error: no virtio device at 0xa003c00: magic 0x0"),
        "{outcome}"
    );
    let (ok, out) = run.add(&run.zone2_cfg);
    assert!(ok, "{out}");
    assert_eq!(run.round(12), "ok", "{}", run.stack.diagnostics());
    run.finish_with_failures(11, 1);
}

#[test]
fn removing_a_zone_renumbers_the_devices_after_it_and_they_go_on_serving() {
    let mut run = start(false);
    let (ok, out) = run.add(&run.zone2_cfg);
    assert!(ok, "{out}");
    // Zone 1's devices come first: taking them out moves zone 2's down, and their fds are
    // watched under their new numbers. (Zone 1's guest then fails, as a zone's guest does
    // whose devices are gone.)
    let (ok, out) = run.zone(&["remove", "1"]);
    assert!(ok, "{out}");
    assert_eq!(run.served_ids(), [2]);
    assert_eq!(run.round(1), "ok", "{}", run.stack.diagnostics());
    assert!(run.stack.broker.alive(), "{}", run.stack.diagnostics());
    assert_eq!(run.served_ids(), [2]);
}
