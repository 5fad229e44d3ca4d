//! Real Linux guests: a User-Mode Linux kernel (Debian's `user-mode-linux`) whose own
//! virtio-blk driver reaches hvisor-broker and hvisor-worker-blk through the simulator's
//! vhost-user adapter. Needs `user-mode-linux`, `busybox-static` and `e2fsprogs`; skipped
//! (with a message) only where `/usr/bin/linux` is absent.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

const KERNEL: &str = "/usr/bin/linux";
const MIB: u64 = 1 << 20;
/// UML's memory: the zone's one RAM region, from 1 MiB (below the end of UML's kernel
/// image, which is not shared) to 256 MiB.
const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 256 * MIB - RAM;

fn have_uml() -> bool {
    if Path::new(KERNEL).exists() {
        return true;
    }
    eprintln!(
        "skipping: {KERNEL} is absent (apt-get install user-mode-linux busybox-static e2fsprogs)"
    );
    false
}

fn zone(disks: &[(&Path, u64, u32)]) -> Value {
    let devices: Vec<Value> = disks
        .iter()
        .map(|(img, addr, irq)| {
            json!({ "type": "blk", "addr": format!("{addr:#x}"), "len": "0x200", "irq": irq,
                    "img": img.to_str().unwrap(), "status": "enable" })
        })
        .collect();
    json!({ "zones": [{
        "id": 1,
        "memory_region": [{ "zone0_ipa": format!("{RAM:#x}"), "zonex_ipa": format!("{RAM:#x}"),
                            "size": format!("{RAM_SIZE:#x}") }],
        "devices": devices
    }]})
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A file of an ext2 image, read on the host with debugfs.
fn debugfs_cat(img: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(img)
        .stderr(Stdio::null())
        .output()
        .expect("debugfs (e2fsprogs) must be installed");
    assert!(out.status.success(), "debugfs cat {path} failed");
    out.stdout
}

fn run_linux(s: &Scratch, cfg: &Path, guest: &str) -> (Stack, Value) {
    let mut run = SimRun::new(cfg, guest);
    run.extra = vec!["--timeout".into(), "150".into()];
    let mut stack = Stack::start(s, run, &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(170)).unwrap();
    let failed = failed_checks(&report);
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\nreport: {report:#}\n{}",
        stack.diagnostics()
    );
    let st = stack.sim.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "simulator: {st}\n{}", stack.diagnostics());
    let st = stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
    (stack, report)
}

#[test]
fn linux_boots_and_its_virtio_blk_driver_negotiates_with_the_broker() {
    if !have_uml() {
        return;
    }
    let s = Scratch::new();
    let img = s.image("disk.img", 8 * MIB);
    let cfg = s.write_json("zone.json", &zone(&[(&img, 0x2000_0000, 78)]));
    let (mut stack, report) = run_linux(&s, &cfg, "linux-boot");
    let linux = &report["linux"];
    assert_eq!(linux["done"], true, "{report:#}");
    let boot = linux["boot_s"].as_f64().unwrap();
    eprintln!("UML reached /init {boot:.2} s after it started");
    assert_eq!(linux["disks"][0]["dev"], "vda");
    assert_eq!(linux["disks"][0]["sectors"], 8 * MIB / 512);
    let link = &linux["links"][0];
    let order: Vec<&str> = link["message_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // UML probes at boot, sets up queues when the driver binds (after insmod).
    assert_eq!(
        order[..5],
        [
            "SET_OWNER",
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES",
            "SET_BACKEND_REQ_FD"
        ],
        "{order:?}"
    );
    let mem_table = order.iter().position(|m| *m == "SET_MEM_TABLE").unwrap();
    assert!(order.iter().position(|m| *m == "SET_FEATURES").unwrap() < mem_table);
    assert!(order.contains(&"SET_VRING_ENABLE 0 1"), "{order:?}");
    assert_eq!(link["driver_ok_reached"], true);
    // Linux accepted EVENT_IDX and INDIRECT_DESC from the broker's offer.
    let f = link["driver_features"].as_u64().unwrap();
    assert!(f & (1 << 29) != 0 && f & (1 << 28) != 0 && f & (1 << 32) != 0);
    assert!(link["interrupts"].as_u64().unwrap() > 0, "{report:#}");
    assert!(
        stack.broker.text().contains("driver ready"),
        "{}",
        stack.diagnostics()
    );
}

#[test]
fn linux_makes_a_file_system_and_a_64_mib_round_trip_that_the_host_reads_back() {
    if !have_uml() {
        return;
    }
    let s = Scratch::new();
    let fs_img = s.path("fs.img");
    let raw_img = s.path("raw.img");
    std::fs::File::create(&fs_img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    std::fs::File::create(&raw_img)
        .unwrap()
        .set_len(80 * MIB)
        .unwrap();
    let cfg = s.write_json(
        "zone.json",
        &zone(&[(&fs_img, 0x2000_0000, 78), (&raw_img, 0x2000_0200, 79)]),
    );
    let (_stack, report) = run_linux(&s, &cfg, "linux-blk");
    let linux = &report["linux"];
    assert_eq!(linux["done"], true, "{report:#}");

    // The file system is consistent, and every file the guest wrote is there, whole.
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&fs_img)
        .output()
        .expect("e2fsck (e2fsprogs) must be installed");
    assert!(
        fsck.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let files = linux["files"].as_array().unwrap();
    assert_eq!(files.len(), 5, "{report:#}");
    for f in files {
        let path = f["path"].as_str().unwrap();
        let data = debugfs_cat(&fs_img, path);
        assert_eq!(data.len() as u64, f["bytes"].as_u64().unwrap(), "{path}");
        assert_eq!(sha256(&data), f["sha256"].as_str().unwrap(), "{path}");
    }
    assert!(
        debugfs_cat(&fs_img, "/hello.txt").starts_with(b"hello from a Linux guest"),
        "hello.txt"
    );

    // The raw disk holds the guest's 64 MiB at offset 0.
    let raw = &linux["raw"][0];
    assert_eq!(raw["dev"], "vdb");
    assert_eq!(raw["bytes"], 64 * MIB);
    let disk = std::fs::read(&raw_img).unwrap();
    assert_eq!(
        sha256(&disk[..64 * MIB as usize]),
        raw["sha256"].as_str().unwrap()
    );
    // The guest wrote random data to the next 8 MiB and discarded it: zeros on the host too.
    let names = check_names(&report);
    assert!(
        names.iter().any(|n| n == "vdb-discard-reads-zeros"),
        "{names:?}"
    );
    assert!(
        disk[64 * MIB as usize..].iter().all(|&b| b == 0),
        "discarded bytes (or bytes past them) are not zero"
    );
    for r in linux["rates"].as_array().unwrap() {
        eprintln!(
            "linux dd {} {}: {} bytes in {} s ({:.0} MB/s)",
            r["dev"],
            r["op"],
            r["bytes"],
            r["seconds"],
            r["mb_per_s"].as_f64().unwrap_or(0.0)
        );
    }
}

#[test]
fn a_broker_killed_mid_run_fails_the_run_and_leaves_no_uml_behind() {
    if !have_uml() {
        return;
    }
    let s = Scratch::new();
    let fs_img = s.image("fs.img", 32 * MIB);
    let cfg = s.write_json("zone.json", &zone(&[(&fs_img, 0x2000_0000, 78)]));
    let mut run = SimRun::new(&cfg, "linux-blk");
    run.extra = vec!["--timeout".into(), "150".into()];
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let line = stack
        .sim
        .wait_for("memory file found", Duration::from_secs(30))
        .unwrap();
    let uml: i32 = line
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no UML pid in {line:?}"));
    // Once Linux is writing its files, the broker dies.
    stack
        .sim
        .wait_for("HVSIM check vda-mount", Duration::from_secs(60))
        .unwrap();
    stack.broker.child.kill().unwrap();
    let st = stack.sim.wait_exit(Duration::from_secs(40)).unwrap();
    assert_eq!(st.code(), Some(1), "{}", stack.diagnostics());
    let report: Value = serde_json::from_slice(&std::fs::read(&stack.report).unwrap()).unwrap();
    assert_eq!(report["broker_gone"], true);
    assert_eq!(report["ok"], false);
    // UML and every helper of its process group are gone.
    let group_left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let pgrp: i32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(2)?
                .parse()
                .ok()?;
            (pgrp == uml).then_some(stat)
        })
        .collect();
    assert!(group_left.is_empty(), "UML processes left: {group_left:?}");
}
