//! The workers' sandboxes, from the kernel's own view (/proc) and from inside.

use std::time::Duration;

use hvisor_tests::*;
use nix::unistd::Pid;
use serde_json::{json, Value};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3c00;
const NAMESPACES: [&str; 7] = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"];
/// The default `--worker-ids`.
const WORKER_IDS: std::ops::Range<u32> = 0x4856_0000..0x4856_0000 + 1024;

/// Two zones with a disk each; zone 1 also has a console (net needs a namespace of its own:
/// tests/tests/net.rs checks its worker the same way).
fn two_zone_config(s: &Scratch) -> std::path::PathBuf {
    let a = s.image("a.img", 1 << 20);
    let b = s.image("bb.img", 1 << 20);
    let mut zone1 = zone_json(
        1,
        RAM,
        RAM_SIZE,
        &[BlkSpec {
            img: &a,
            addr: ADDR,
            irq: 78,
            readonly: false,
        }],
    );
    zone1["devices"].as_array_mut().unwrap().push(
        json!({ "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76, "status": "enable" }),
    );
    s.write_json(
        "zones.json",
        &json!({ "zones": [
            zone1,
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

/// Every fd a worker may hold: stdio, its socket, epoll, the queue eventfds, its image or its
/// console pipes.
fn expected_fd(target: &str) -> bool {
    target == "/dev/null"
        || target == "/dev/ptmx"
        || target.starts_with("/dev/pts/")
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
    let run = SimRun::new(&cfg, "blk-demo").staying();
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    stack.wait_report(Duration::from_secs(60)).unwrap();
    let broker = stack.broker.pid().as_raw();
    let workers = children(stack.broker.pid());
    assert_eq!(workers.len(), 3, "{}", stack.diagnostics());
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
            for ids in [field("Uid"), field("Gid")] {
                let ids: Vec<u32> = ids.split_whitespace().map(|i| i.parse().unwrap()).collect();
                assert!(
                    ids.iter().all(|&i| i == ids[0] && WORKER_IDS.contains(&i)),
                    "{ids:?}"
                );
            }
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
    let (ok, out) = stack.audit();
    assert!(ok, "{out}");
    let audit: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(audit["broker_pid"], broker);
    let listed = audit["workers"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
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
            w["claimed_root"].as_str().unwrap().contains("pivot_root"),
            "{w}"
        );
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        assert_eq!(w["fds"].as_array().unwrap().len(), fds);
        let uid = proc_status(Pid::from_raw(pid), "Uid").unwrap();
        assert_eq!(
            w["uid"],
            json!(uid
                .split_whitespace()
                .map(|u| u.parse::<u32>().unwrap())
                .collect::<Vec<_>>())
        );
        assert_eq!(w["rlimits"]["Max processes"][0], "0");
    }
    let socket = stack.socket.to_str().unwrap();
    let run = run_dir(&stack.socket);
    let (ok, table) = broker_cmd(&[
        "audit",
        "--driver",
        socket,
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    assert!(
        ok && table.contains("seccomp 2 (filter)") && table.contains("user:own"),
        "{table}"
    );
    let _ = stack.stop_broker();
}

/// Whether a process running as `uid` (the shared `nobody` of every other service, say) may
/// signal `pid`.
fn may_signal_as(uid: u32, pid: Pid) -> bool {
    // SAFETY: the child makes only raw system calls, then _exit.
    match unsafe { libc::fork() } {
        0 => unsafe {
            let ok = libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(uid, uid, uid) == 0
                && libc::setresuid(uid, uid, uid) == 0;
            let code = match (ok, libc::kill(pid.as_raw(), 0)) {
                (false, _) => 2,
                (true, 0) => 0,
                _ => 1,
            };
            libc::_exit(code)
        },
        child => {
            let status = nix::sys::wait::waitpid(Pid::from_raw(child), None).unwrap();
            match status {
                nix::sys::wait::WaitStatus::Exited(_, 0) => true,
                nix::sys::wait::WaitStatus::Exited(_, 1) => false,
                other => panic!("the probe as uid {uid}: {other:?}"),
            }
        }
    }
}

/// Each worker runs as ids of its own, from the broker's range: none shares them with another
/// worker, and a process of the old shared `nobody` cannot signal any of them.
#[test]
fn workers_have_ids_of_their_own_that_nobody_cannot_signal() {
    let s = Scratch::new();
    let cfg = two_zone_config(&s);
    let run = SimRun::new(&cfg, "blk-demo").staying();
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    stack.wait_report(Duration::from_secs(60)).unwrap();
    let workers = children(stack.broker.pid());
    assert_eq!(workers.len(), 3, "{}", stack.diagnostics());
    let mut uids = std::collections::BTreeSet::new();
    for &w in &workers {
        let uid: u32 = proc_status(w, "Uid")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(WORKER_IDS.contains(&uid), "worker {w} runs as {uid}");
        uids.insert(uid);
        assert!(!may_signal_as(65534, w), "nobody may signal worker {w}");
        // the test itself, root, still may
        assert!(may_signal_as(0, w));
    }
    assert_eq!(uids.len(), 3, "workers share ids: {uids:?}");
    let socket = stack.socket.to_str().unwrap().to_string();
    let run = run_dir(&stack.socket).to_str().unwrap().to_string();
    let (ok, table) = broker_cmd(&["audit", "--driver", &socket, "--run-dir", &run]);
    assert!(ok, "{table}");
    for uid in &uids {
        assert!(
            table.contains(&format!("uid/gid     {uid}/{uid}/{uid}/{uid} / {uid}/")),
            "{table}"
        );
    }
    let _ = stack.stop_broker();
}

/// The directory of `pid`'s cgroup that holds `controller`'s files, from /proc/PID/cgroup.
fn cgroup_dir(pid: Pid, controller: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.splitn(3, ':').collect()).collect();
    if let Some(l) = lines
        .iter()
        .find(|l| l[1].split(',').any(|c| c == controller))
    {
        return format!("/sys/fs/cgroup/{controller}{}", l[2]).into();
    }
    let v2 = lines
        .iter()
        .find(|l| l[0] == "0")
        .expect("a cgroup v2 line");
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(|root| std::path::PathBuf::from(format!("{root}{}", v2[2])))
        .find(|d| d.join(format!("{controller}.max")).exists())
        .unwrap_or_else(|| panic!("no {controller} cgroup for {pid}:\n{text}"))
}

/// The first of `files` in `dir`.
fn cgroup_file(dir: &std::path::Path, files: &[&str]) -> String {
    files
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .unwrap_or_else(|| panic!("none of {files:?} in {}", dir.display()))
        .trim()
        .to_string()
}

/// Each worker is in a cgroup of its own with the limits of its kind, which the audit reads
/// back; the cgroups go when the workers do.
#[test]
fn each_worker_has_a_cgroup_of_its_own_with_its_kinds_limits() {
    let s = Scratch::new();
    let cfg = two_zone_config(&s);
    let run = SimRun::new(&cfg, "blk-demo").staying();
    let args = [
        "--cgroup-memory",
        "blk=48M",
        "--cgroup-pids",
        "all=5",
        "--cgroup-cpu",
        "console=30%",
    ];
    let mut stack = Stack::start(&s, run, &args).unwrap();
    stack.wait_report(Duration::from_secs(60)).unwrap();
    let broker = stack.broker.pid();
    let workers = children(broker);
    assert_eq!(workers.len(), 3, "{}", stack.diagnostics());
    let mut dirs = std::collections::BTreeSet::new();
    for &w in &workers {
        // By its name (comm), not its command line, whose path may contain any word.
        let console = std::fs::read_to_string(format!("/proc/{w}/comm"))
            .unwrap()
            .starts_with("hvisor-worker-c");
        for controller in ["memory", "pids", "cpu"] {
            let dir = cgroup_dir(w, controller);
            assert_ne!(
                dir,
                cgroup_dir(broker, controller),
                "worker {w} in the broker's {controller} cgroup"
            );
            assert!(
                dir.display().to_string().contains("/hvisor-broker/"),
                "{}",
                dir.display()
            );
            dirs.insert(dir);
        }
        let memory = cgroup_file(
            &cgroup_dir(w, "memory"),
            &["memory.max", "memory.limit_in_bytes"],
        );
        let want = if console { 256u64 << 20 } else { 48 << 20 };
        assert_eq!(memory, want.to_string(), "worker {w}");
        assert_eq!(cgroup_file(&cgroup_dir(w, "pids"), &["pids.max"]), "5");
        let cpu = cgroup_file(&cgroup_dir(w, "cpu"), &["cpu.max", "cpu.cfs_quota_us"]);
        let quota = if console { "30000" } else { "100000" };
        assert!(cpu.starts_with(quota), "worker {w}: cpu {cpu}");
    }
    assert_eq!(dirs.len(), 9, "workers share cgroups: {dirs:?}");
    let socket = stack.socket.to_str().unwrap().to_string();
    let run = run_dir(&stack.socket).to_str().unwrap().to_string();
    let (ok, out) = broker_cmd(&["audit", "--driver", &socket, "--json", "--run-dir", &run]);
    assert!(ok, "{out}");
    let audit: Value = serde_json::from_str(&out).unwrap();
    for w in audit["workers"].as_array().unwrap() {
        let cgroups = w["cgroups"].as_array().unwrap();
        assert!(!cgroups.is_empty(), "{w}");
        for c in cgroups {
            assert_eq!(c["member"], true, "{c}");
            let path = std::path::PathBuf::from(c["path"].as_str().unwrap());
            assert!(dirs.contains(&path), "{c}");
            assert!(!c["limits"].as_object().unwrap().is_empty(), "{c}");
        }
    }
    let (ok, table) = broker_cmd(&["audit", "--driver", &socket, "--run-dir", &run]);
    assert!(ok && table.contains("pids.max 5"), "{table}");
    assert!(stack.stop_broker().unwrap().success());
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}

/// Where there are no cgroups to be had, the worker still runs, and the log says what is
/// missing.
#[test]
fn without_cgroups_the_worker_runs_in_a_weaker_sandbox_that_is_logged() {
    let s = Scratch::new();
    let img = s.image("disk.img", 1 << 20);
    let cfg = s.write_json(
        "zone.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }),
    );
    let not_cgroups = s.path("not-cgroups");
    std::fs::create_dir(&not_cgroups).unwrap();
    let root = not_cgroups.to_str().unwrap();
    let mut stack =
        Stack::start(&s, SimRun::new(&cfg, "blk-demo"), &["--cgroup-root", root]).unwrap();
    let line = stack
        .broker
        .wait_for(
            "weaker sandbox: no cgroup of its own",
            Duration::from_secs(20),
        )
        .unwrap();
    assert!(line.contains("is not a cgroup file system"), "{line}");
    let report = stack.wait_report(Duration::from_secs(60)).unwrap();
    assert_checks(&report, &[], &stack.diagnostics());
    assert_eq!(std::fs::read_dir(&not_cgroups).unwrap().count(), 0);
    let _ = stack.stop_broker();
}

/// A one-disk zone, and a worker directory where the probe stands in for the blk worker.
fn probe_setup(s: &Scratch) -> (std::path::PathBuf, String) {
    let img = s.image("disk.img", 1 << 20);
    let cfg = s.write_json(
        "zone.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }),
    );
    (cfg, probe_workers(s))
}

#[test]
fn an_escape_attempt_from_inside_a_worker_finds_nothing() {
    let s = Scratch::new();
    let (cfg, dir) = probe_setup(&s);
    let run = SimRun::new(&cfg, "blk-demo").timeout(20);
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
    let (cfg, dir) = probe_setup(&s);
    let run = SimRun::new(&cfg, "blk-demo").timeout(20);
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

/// The probe's result lines (`probe NAME: ...`), once it is done.
fn probe_results(stack: &mut Stack) -> Vec<String> {
    stack
        .broker
        .wait_for("probe done", Duration::from_secs(20))
        .unwrap();
    let log = stack.broker.text();
    log.lines()
        .filter(|l| l.contains(": probe ") && !l.contains("probe done"))
        .map(str::to_string)
        .collect()
}

/// The broker's stderr is the operator's terminal, where a line was typed: a worker reading
/// its stdio gets nothing of it, and what it writes there (forged broker log lines, a flood)
/// reaches neither the terminal nor the log.
#[test]
fn a_worker_reads_and_writes_nothing_of_the_brokers_stdio() {
    let s = Scratch::new();
    let (cfg, dir) = probe_setup(&s);
    let run = SimRun::new(&cfg, "blk-demo").timeout(20);
    let args = ["--worker-dir", &dir, "--worker-arg=--stdio"];
    let mut stack = Stack::start_with(&s, run, |socket| {
        let cmd = broker_command(&cfg, socket, &args);
        Proc::spawn_on_tty("hvisor-broker", cmd, b"operator-secret\n")
    })
    .unwrap();
    let results = probe_results(&mut stack);
    let log = stack.broker.text();
    // (a flood that got through would make the log unreadable)
    let short: Vec<&str> = log.lines().filter(|l| l.len() < 300).collect();
    for fd in 0..=2 {
        assert!(
            log.contains(&format!("probe read fd {fd}: 0 \"\"")),
            "fd {fd}:\n{short:#?}"
        );
    }
    assert!(!log.contains("operator-secret"), "{short:#?}");
    assert!(!log.contains("forged by a worker"), "{short:#?}");
    assert!(!log.contains("xxxxxxxx"), "the flood reached the terminal");
    // it did write
    assert!(
        results
            .iter()
            .any(|r| r.contains("probe forge on fd 2: SUCCEEDED")),
        "{short:#?}"
    );
    let _ = stack.stop_broker();
}

/// A blk worker gone bad tries every way to make its image (and the host's disk) larger:
/// writes past the end fail with EFBIG, size-changing calls are refused, and the image keeps
/// its size and its blocks.
#[test]
fn a_worker_cannot_grow_its_image() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new();
    let (cfg, dir) = probe_setup(&s);
    let img = s.path("disk.img");
    let before = std::fs::metadata(&img).unwrap();
    let run = SimRun::new(&cfg, "blk-demo").timeout(20);
    let args = [
        "--worker-dir",
        &dir,
        "--worker-arg=--grow",
        "--seccomp",
        "trap",
    ];
    let mut stack = Stack::start(&s, run, &args).unwrap();
    let results = probe_results(&mut stack);
    assert_eq!(results.len(), 9, "{}", stack.diagnostics());
    for r in &results {
        assert!(r.contains("refused"), "the image could grow: {r}");
        if r.contains("pwrite") {
            assert!(r.contains("File too large"), "{r}");
        }
    }
    let _ = stack.stop_broker();
    let after = std::fs::metadata(&img).unwrap();
    assert_eq!(after.len(), before.len());
    assert!(
        after.blocks() <= before.blocks(),
        "{} blocks, were {}",
        after.blocks(),
        before.blocks()
    );
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

/// Root zones often boot from an initramfs, where `pivot_root` is refused. Here the broker runs
/// chrooted, in a mount namespace of its own, into a bind mount whose parent is shared (only
/// within that namespace): `pivot_root` refuses that too, and a chrooted process may not create
/// a user namespace. The worker must still end up in an empty root, and the log must say what
/// was weaker.
#[test]
fn where_pivot_root_is_refused_the_worker_still_gets_an_empty_root() {
    use std::os::unix::process::CommandExt;
    let s = Scratch::new();
    let root = s.path("root");
    let work = root.join("work");
    for d in ["work", "bin", "proc", "dev", "tmp", "run"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    // the binaries and the shared libraries they load, at the same paths
    for b in ["hvisor-broker", "hvisor-worker-blk"] {
        std::fs::copy(bin(b), root.join("bin").join(b)).unwrap();
        let ldd = std::process::Command::new("ldd")
            .arg(bin(b))
            .output()
            .unwrap();
        for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
            if word.starts_with('/') {
                let dst = root.join(word.trim_start_matches('/'));
                std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
                let _ = std::fs::copy(word, &dst);
            }
        }
    }
    let img = work.join("disk.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let inner = json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: std::path::Path::new("/work/disk.img"), addr: ADDR, irq: 78, readonly: false }])] });
    std::fs::write(work.join("zone.json"), serde_json::to_vec(&inner).unwrap()).unwrap();
    let outer = json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] });
    let outer_cfg = s.write_json("outer.json", &outer);

    let socket = work.join("hvisor.sock");
    let mut sim_cmd = std::process::Command::new(bin("hvisor-sim"));
    sim_cmd
        .args(["--guest", "blk-demo", "--stay", "--config"])
        .arg(&outer_cfg)
        .arg("--socket")
        .arg(&socket);
    let mut sim = Proc::spawn_cmd("hvisor-sim", sim_cmd).unwrap();
    sim.wait_for("listening on", Duration::from_secs(20))
        .unwrap();

    let mut cmd = std::process::Command::new("/bin/hvisor-broker");
    cmd.args([
        "start",
        "/work/zone.json",
        "--driver",
        "/work/hvisor.sock",
        "--worker-dir",
        "/bin",
    ]);
    let root_c = std::ffi::CString::new(root.to_str().unwrap()).unwrap();
    let proc_c = std::ffi::CString::new(root.join("proc").to_str().unwrap()).unwrap();
    let dev_c = std::ffi::CString::new(root.join("dev").to_str().unwrap()).unwrap();
    // SAFETY: only system calls between fork and exec, on strings prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let bind = |src: &std::ffi::CStr, dst: &std::ffi::CStr| {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            };
            let propagate = |flags| {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    flags,
                    std::ptr::null(),
                )
            };
            // Private first, so nothing below reaches the host; then the old root shared again,
            // in a peer group of this namespace alone.
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || propagate(libc::MS_REC | libc::MS_PRIVATE) != 0
                || bind(&root_c, &root_c) != 0
                || bind(c"/proc", &proc_c) != 0
                || bind(c"/dev", &dev_c) != 0
                || propagate(libc::MS_SHARED) != 0
                || libc::chroot(root_c.as_ptr()) != 0
                || libc::chdir(c"/".as_ptr()) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut broker = Proc::spawn_cmd("hvisor-broker", cmd).unwrap();
    let line = broker
        .wait_for("confined: ", Duration::from_secs(20))
        .unwrap();
    assert!(
        line.contains("chroot into an empty read-only tmpfs"),
        "{line}"
    );
    assert!(line.contains("pivot_root refused"), "{line}");
    broker
        .wait_for("weaker sandbox: no user namespace", Duration::from_secs(5))
        .unwrap();
    assert!(broker
        .text()
        .contains("weaker sandbox: user namespaces unavailable"));
    broker
        .wait_for("sandboxed and ready", Duration::from_secs(10))
        .unwrap();
    let workers = children(broker.pid());
    assert_eq!(workers.len(), 1, "{}", broker.text());
    let w = workers[0].as_raw();
    let entries: Vec<_> = std::fs::read_dir(format!("/proc/{w}/root"))
        .unwrap()
        .collect();
    assert!(entries.is_empty(), "{entries:?}");
    assert_eq!(proc_status(workers[0], "Seccomp").as_deref(), Some("2"));
    assert_eq!(
        proc_status(workers[0], "CapEff").as_deref(),
        Some("0000000000000000")
    );
    sim.wait_for("result: PASS", Duration::from_secs(30))
        .unwrap();
    broker.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.wait_exit(Duration::from_secs(10)).unwrap().success());
}
