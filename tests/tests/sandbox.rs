//! The workers' sandboxes, from the kernel's own view (/proc) and from inside.

use std::time::Duration;

use hvisor_tests::*;
use nix::unistd::Pid;
use serde_json::{json, Value};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3c00;
const NAMESPACES: [&str; 7] = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"];

fn two_zone_config(s: &Scratch) -> std::path::PathBuf {
    let a = s.image("a.img", 1 << 20);
    let b = s.image("bb.img", 1 << 20);
    s.write_json(
        "zones.json",
        &json!({ "zones": [
            zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &a, addr: ADDR, irq: 78, readonly: false }]),
            zone_json(2, RAM + RAM_SIZE, RAM_SIZE, &[BlkSpec { img: &b, addr: ADDR, irq: 78, readonly: false }]),
        ]}),
    )
}

fn ns(pid: i32, name: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{name}"))
        .unwrap()
        .display()
        .to_string()
}

/// Every fd a blk worker may hold: stdio, its socket, epoll, the queue eventfds, its image.
fn expected_fd(target: &str) -> bool {
    target == "/dev/null"
        || target.starts_with("socket:")
        || target.starts_with("pipe:")
        || target == "anon_inode:[eventfd]"
        || target == "anon_inode:[eventpoll]"
        || target.ends_with(".img")
}

#[test]
fn every_thread_of_every_worker_is_confined_and_audit_says_so() {
    let s = Scratch::new();
    let cfg = two_zone_config(&s);
    let mut run = SimRun::new(&cfg, "blk-demo");
    run.stay = true;
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    stack.wait_report(Duration::from_secs(60)).unwrap();
    let broker = stack.broker.pid().as_raw();
    let workers = children(stack.broker.pid());
    assert_eq!(workers.len(), 2, "{}", stack.diagnostics());
    for w in &workers {
        let pid = w.as_raw();
        let tasks: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_str().unwrap().parse().unwrap())
            .collect();
        assert!(!tasks.is_empty());
        for tid in tasks {
            let t = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            let field = |f: &str| {
                t.lines()
                    .find_map(|l| {
                        l.strip_prefix(f)?
                            .strip_prefix(':')
                            .map(|v| v.trim().to_string())
                    })
                    .unwrap()
            };
            assert_eq!(field("Seccomp"), "2", "thread {tid}");
            assert_eq!(field("NoNewPrivs"), "1", "thread {tid}");
            for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(field(set), "0000000000000000", "thread {tid} {set}");
            }
            assert!(
                field("Uid").split_whitespace().all(|u| u == "65534"),
                "{}",
                field("Uid")
            );
            assert!(
                field("Gid").split_whitespace().all(|g| g == "65534"),
                "{}",
                field("Gid")
            );
        }
        for n in NAMESPACES {
            assert_ne!(
                ns(pid, n),
                ns(broker, n),
                "worker {pid} shares the broker's {n} namespace"
            );
        }
        // an empty root
        let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .collect();
        assert!(root.is_empty(), "worker root is not empty: {root:?}");
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            let target = std::fs::read_link(e.path()).unwrap().display().to_string();
            assert!(
                expected_fd(&target),
                "worker {pid} holds fd {:?} -> {target}",
                e.file_name()
            );
        }
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        assert!(
            limits
                .lines()
                .any(|l| l.starts_with("Max processes") && l.contains(" 0 ")),
            "{limits}"
        );
        assert!(
            limits
                .lines()
                .any(|l| l.starts_with("Max core file size") && l.contains(" 0 ")),
            "{limits}"
        );
    }

    // the audit says the same as /proc
    let socket = stack.socket.to_str().unwrap().to_string();
    let (ok, out) = broker_cmd(&["audit", "--driver", &socket, "--json"]);
    assert!(ok, "{out}");
    let audit: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(audit["broker_pid"], broker);
    let listed = audit["workers"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    for w in listed {
        let pid = w["pid"].as_i64().unwrap() as i32;
        assert!(
            workers.contains(&Pid::from_raw(pid)),
            "audit names pid {pid}, not a worker"
        );
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        for t in w["threads"].as_array().unwrap() {
            assert_eq!(t["seccomp"], "2");
            assert_eq!(t["no_new_privs"], "1");
            assert_eq!(t["cap_eff"], "0000000000000000");
        }
        assert!(status.contains(&format!(
            "Seccomp:\t{}",
            w["threads"][0]["seccomp"].as_str().unwrap()
        )));
        for n in NAMESPACES {
            assert_eq!(w["namespaces"][n]["own"], true, "{n}");
            assert_eq!(w["namespaces"][n]["id"], ns(pid, n));
        }
        assert_eq!(w["root_entries"], 0);
        assert!(
            w["root_kind"].as_str().unwrap().contains("pivot_root"),
            "{w}"
        );
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        assert_eq!(w["fds"].as_array().unwrap().len(), fds);
        assert_eq!(w["uid"], json!([65534, 65534, 65534, 65534]));
        assert_eq!(w["rlimits"]["Max processes"][0], "0");
    }
    let (ok, table) = broker_cmd(&["audit", "--driver", &socket]);
    assert!(
        ok && table.contains("seccomp 2 (filter)") && table.contains("user:own"),
        "{table}"
    );
    let _ = stack.stop_broker();
}

#[test]
fn an_escape_attempt_from_inside_a_worker_finds_nothing() {
    let s = Scratch::new();
    let img = s.image("disk.img", 1 << 20);
    let cfg = s.write_json("zone.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let workers = s.path("workers");
    std::fs::create_dir(&workers).unwrap();
    std::os::unix::fs::symlink(
        bin("hvisor-probe-worker"),
        workers.join("hvisor-worker-blk"),
    )
    .unwrap();
    let dir = workers.to_str().unwrap().to_string();
    let mut run = SimRun::new(&cfg, "blk-demo");
    run.extra = vec!["--timeout".into(), "20".into()];
    let mut stack = Stack::start(
        &s,
        run,
        &[
            "--worker-dir",
            &dir,
            "--worker-arg=--escape",
            "--seccomp",
            "trap",
        ],
    )
    .unwrap();
    stack
        .broker
        .wait_for("probe done", Duration::from_secs(20))
        .unwrap();
    let log = stack.broker.text();
    let probes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(": probe ") && !l.contains("probe done"))
        .collect();
    assert!(probes.len() >= 15, "{log}");
    for p in &probes {
        assert!(p.contains("refused"), "an escape attempt got through: {p}");
    }
    // the reporter named the refused calls
    for call in [
        "openat", "socket", "ptrace", "mount", "kill", "execve", "unshare",
    ] {
        assert!(
            log.contains(&format!("made a refused system call: {call}")),
            "{call} not reported:\n{log}"
        );
    }
    let _ = stack.stop_broker();
}

#[test]
fn a_worker_making_a_forbidden_call_is_killed_and_the_call_named() {
    let s = Scratch::new();
    let img = s.image("disk.img", 1 << 20);
    let cfg = s.write_json("zone.json", &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }));
    let workers = s.path("workers");
    std::fs::create_dir(&workers).unwrap();
    std::os::unix::fs::symlink(
        bin("hvisor-probe-worker"),
        workers.join("hvisor-worker-blk"),
    )
    .unwrap();
    let dir = workers.to_str().unwrap().to_string();
    let mut run = SimRun::new(&cfg, "blk-demo");
    run.extra = vec!["--timeout".into(), "20".into()];
    let mut stack =
        Stack::start(&s, run, &["--worker-dir", &dir, "--worker-arg=--violate"]).unwrap();
    stack
        .broker
        .wait_for(
            "killed: seccomp violation, syscall openat",
            Duration::from_secs(20),
        )
        .unwrap();
    assert!(stack.broker.alive(), "{}", stack.diagnostics());
    assert!(!stack.broker.text().contains("openat came back"));
    let _ = stack.stop_broker();
}

#[test]
fn policy_prints_each_allowlist_with_its_argument_rules() {
    for (kind, call) in [
        ("blk", "preadv"),
        ("net", "writev"),
        ("console", "epoll_ctl"),
    ] {
        let (ok, out) = broker_cmd(&["policy", kind]);
        assert!(ok, "{out}");
        assert!(out.contains(&format!("allow   {call}")), "{kind}: {out}");
        assert!(
            out.contains("mmap") && out.contains("when arg2 & 0x4 == 0x0"),
            "{out}"
        );
        assert!(
            out.contains("refuse  clone3") && !out.contains("allow   openat"),
            "{out}"
        );
    }
}
