//! Service integration: systemd's readiness protocol (with a NOTIFY_SOCKET of the test's own),
//! the unit file (`systemd-analyze verify`, and its capability set and no_new_privs running
//! the real broker), and the init script for root zones without systemd, run by busybox sh.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hvisor_tests::*;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::{json, Value};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const MIB: u64 = 1 << 20;
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/hvisor-broker.service"
);
const INIT_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/init.d/hvisor-broker"
);
const BUSYBOX: &str = "/bin/busybox";

/// Zone 1 with two blk devices and a console: three workers.
fn config(s: &Scratch) -> PathBuf {
    let a = s.image("a.img", MIB);
    let b = s.image("b.img", MIB);
    let mut zone = zone_json(
        1,
        RAM,
        RAM_SIZE,
        &[
            BlkSpec {
                img: &a,
                addr: 0xa00_3c00,
                irq: 78,
                readonly: false,
            },
            BlkSpec {
                img: &b,
                addr: 0xa00_3e00,
                irq: 79,
                readonly: false,
            },
        ],
    );
    zone["devices"].as_array_mut().unwrap().push(json!({
        "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76, "status": "enable"
    }));
    s.write_json("zone1.json", &json!({ "zones": [zone] }))
}

/// A simulator whose guests never start: the broker just serves.
fn idle<'a>(s: &Scratch, cfg: &'a Path) -> SimRun<'a> {
    SimRun::new(cfg, "blk-demo")
        .staying()
        .wait_for(&s.path("never"))
        .timeout(600)
}

fn assert_sandboxed(broker: Pid, n: usize, context: &str) {
    let workers = children(broker);
    assert_eq!(workers.len(), n, "workers of {broker}: {context}");
    for w in workers {
        assert_eq!(
            proc_status(w, "Seccomp").as_deref(),
            Some("2"),
            "worker {w}: {context}"
        );
    }
}

/// The next datagram on the test's notify socket.
fn next_state(sock: &UnixDatagram, seen: &[String]) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification ({e}); so far: {seen:?}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_sent_once_every_worker_is_sandboxed_and_stopping_on_sigterm() {
    let s = Scratch::new();
    let cfg = config(&s);
    let notify_path = s.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    // a hang guard only
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let ready_file = s.path("ready");
    let mut stack = Stack::start_with(&s, idle(&s, &cfg), |socket| {
        let mut cmd = broker_command(
            &cfg,
            socket,
            &["--ready-file", ready_file.to_str().unwrap()],
        );
        cmd.env("NOTIFY_SOCKET", &notify_path);
        Proc::spawn_cmd("hvisor-broker", cmd)
    })
    .unwrap();
    let mut seen = Vec::new();
    loop {
        let state = next_state(&notify, &seen);
        seen.push(state.clone());
        if state.lines().any(|l| l == "READY=1") {
            // Nothing more happens to the workers' sandboxes after this point.
            assert_sandboxed(stack.broker.pid(), 3, &stack.diagnostics());
            break;
        }
    }
    assert_eq!(
        seen.iter().filter(|s| s.contains("READY=1")).count(),
        1,
        "{seen:?}"
    );
    assert!(seen[0].contains("STATUS=starting 3 worker(s)"), "{seen:?}");
    assert!(
        seen.last().unwrap().contains("STATUS=serving 3 device(s)"),
        "{seen:?}"
    );
    // The log says the same, in order: three workers ready, then serving.
    stack
        .broker
        .wait_for("sandboxed and ready: serving", Duration::from_secs(10))
        .unwrap();
    let log = stack.broker.text();
    let serving = log.find("sandboxed and ready: serving").unwrap();
    assert_eq!(
        log[..serving].matches(") sandboxed and ready").count(),
        3,
        "{log}"
    );

    assert!(ready_file.exists());
    // A second broker on the same driver is refused and leaves the first one's file alone.
    let (ok, out) = broker_cmd(&[
        "start",
        cfg.to_str().unwrap(),
        "--driver",
        stack.socket.to_str().unwrap(),
        "--run-dir",
        run_dir(&stack.socket).to_str().unwrap(),
        "--ready-file",
        ready_file.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("already serving"), "{out}");
    assert!(
        ready_file.exists(),
        "the refused broker removed the ready file"
    );

    stack.broker.signal(Signal::SIGTERM);
    loop {
        let state = next_state(&notify, &seen);
        seen.push(state.clone());
        if state.lines().any(|l| l == "STOPPING=1") {
            break;
        }
    }
    let st = stack.broker.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(st.success(), "{st}: {}", stack.diagnostics());
    assert!(!ready_file.exists(), "the ready file outlived the broker");
}

#[test]
fn a_bad_notify_socket_is_named() {
    let s = Scratch::new();
    let cfg = config(&s);
    let mut cmd = broker_command(&cfg, &s.path("hvisor.sock"), &[]);
    cmd.env("NOTIFY_SOCKET", "vsock:2:9");
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("NOTIFY_SOCKET=\"vsock:2:9\""), "{err}");
}

/// The settings of `CapabilityBoundingSet=` in the unit file, as setpriv takes them.
fn unit_capabilities() -> String {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    let mut caps = String::from("-all");
    for c in line.split_whitespace() {
        caps.push_str(",+");
        caps.push_str(&c.trim_start_matches("CAP_").to_lowercase());
    }
    caps
}

#[test]
fn the_units_capabilities_and_no_new_privs_are_enough() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(unit.contains("\nNoNewPrivileges=yes\n"));
    let caps = unit_capabilities();
    let s = Scratch::new();
    let cfg = config(&s);
    let run = SimRun::new(&cfg, "blk-demo").staying();
    let mut stack = Stack::start_with(&s, run, |socket| {
        let broker = broker_command(&cfg, socket, &[]);
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--bounding-set={caps}"))
            .arg("--no-new-privs")
            .arg("--")
            .arg(broker.get_program())
            .args(broker.get_args());
        Proc::spawn_cmd("hvisor-broker", cmd)
    })
    .unwrap();
    let report: Value = stack.wait_report(Duration::from_secs(60)).unwrap();
    assert!(
        failed_checks(&report).is_empty(),
        "{:?}\n{}",
        failed_checks(&report),
        stack.diagnostics()
    );
    // The guest used only its disk: the other workers may still be starting.
    stack
        .broker
        .wait_for("worker(s) sandboxed and ready", Duration::from_secs(60))
        .unwrap();
    let broker = stack.broker.pid();
    assert_eq!(proc_status(broker, "NoNewPrivs").as_deref(), Some("1"));
    assert_sandboxed(broker, 3, &stack.diagnostics());
    // The audit still sees into every worker (another uid's /proc needs CAP_SYS_PTRACE).
    let (ok, audit) = stack.audit();
    assert!(ok, "audit: {audit}");
    let audit: Value = serde_json::from_str(&audit).unwrap();
    let workers = audit["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{audit:#}");
    for w in workers {
        assert!(w["namespaces"].as_object().unwrap().len() >= 5, "{w:#}");
        assert!(!w["root"].as_str().unwrap().is_empty(), "{w:#}");
    }
    // the whole sandbox, nothing weaker
    assert!(
        !stack.broker.text().contains("weaker sandbox"),
        "{}",
        stack.diagnostics()
    );
    let st = stack.stop_broker().unwrap();
    assert!(st.success(), "{st}: {}", stack.diagnostics());
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no systemd-analyze (systemd is not installed)");
        return;
    }
    // A root holding the system's own units, the unit and the executables where it expects
    // them (the broker, and kill for ExecReload).
    let s = Scratch::new();
    let root = s.path("root");
    for exe in ["usr/sbin/hvisor-broker", "bin/kill"] {
        let path = root.join(exe);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, PermissionsExt::from_mode(0o755)).unwrap();
    }
    let units = root.join("usr/lib/systemd");
    std::fs::create_dir_all(&units).unwrap();
    let copied = Command::new("cp")
        .args(["-r", "/lib/systemd/system"])
        .arg(&units)
        .status()
        .unwrap();
    assert!(copied.success());
    let unit = units.join("system/hvisor-broker.service");
    std::fs::copy(UNIT, &unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    // Unknown or misspelt keys are only warnings: none are allowed either.
    assert!(said.trim().is_empty(), "{said}");
}

/// Stops a broker the init script left running when a test fails half-way.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// `busybox sh` running the init script with settings pointing into the scratch directory.
fn init_script(s: &Scratch, cfg: &Path, driver: &Path, action: &str) -> Command {
    let defaults = format!(
        "BROKER={}\nCONFIG={}\nDRIVER={}\nOPTIONS=\"--run-dir {}\"\nWORKDIR={}\nPIDFILE={}\n\
         READY_FILE={}\nLOG={}\nTIMEOUT=60\n",
        bin("hvisor-broker").display(),
        cfg.display(),
        driver.display(),
        run_dir(driver).display(),
        s.path("work").display(),
        s.path("broker.pid").display(),
        s.path("broker.ready").display(),
        s.path("broker.log").display(),
    );
    std::fs::write(s.path("defaults"), defaults).unwrap();
    let mut cmd = Command::new(BUSYBOX);
    cmd.args(["sh", INIT_SCRIPT, action])
        .env("HVISOR_BROKER_DEFAULTS", s.path("defaults"));
    cmd
}

fn run(mut cmd: Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_init_script_returns_once_ready_and_stops_the_broker() {
    if !Path::new(BUSYBOX).exists() {
        eprintln!("skipped: no {BUSYBOX} (Debian's busybox-static)");
        return;
    }
    let s = Scratch::new();
    let cfg = config(&s);
    let _guard = KillOnDrop(s.path("broker.pid"));
    // The script's `start` plays the broker's part in the stack: it returns once ready.
    let mut stack = Stack::start_with(&s, idle(&s, &cfg), |socket| {
        Proc::spawn_cmd("init script", init_script(&s, &cfg, socket, "start"))
    })
    .unwrap();
    let st = stack.broker.wait_exit(Duration::from_secs(90)).unwrap();
    let log = std::fs::read_to_string(s.path("broker.log")).unwrap_or_default();
    assert!(st.success(), "start: {st}\n{}\n{log}", stack.broker.text());
    assert!(stack.broker.text().contains("hvisor-broker: ready (pid "));
    // At that moment every worker is sandboxed.
    let pid: i32 = std::fs::read_to_string(s.path("broker.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_sandboxed(Pid::from_raw(pid), 3, &log);
    let ready = std::fs::read_to_string(s.path("broker.ready")).unwrap();
    assert_eq!(ready.trim(), pid.to_string());

    let (code, out) = run(init_script(&s, &cfg, &stack.socket, "status"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("running and ready"), "{out}");
    let (code, out) = run(init_script(&s, &cfg, &stack.socket, "start"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already running"), "{out}");

    let (code, out) = run(init_script(&s, &cfg, &stack.socket, "stop"));
    assert_eq!(code, 0, "{out}");
    assert!(!process_exists(Pid::from_raw(pid)), "{out}");
    assert!(!s.path("broker.ready").exists());
    assert!(!s.path("broker.pid").exists());
    let log = std::fs::read_to_string(s.path("broker.log")).unwrap();
    assert!(log.contains("stopping on SIGTERM"), "{log}");
    let (code, out) = run(init_script(&s, &cfg, &stack.socket, "status"));
    assert_eq!(code, 3, "{out}");
}

#[test]
fn the_init_script_says_why_the_broker_did_not_start() {
    if !Path::new(BUSYBOX).exists() {
        eprintln!("skipped: no {BUSYBOX} (Debian's busybox-static)");
        return;
    }
    let s = Scratch::new();
    let cfg = s.path("zone1.json");
    std::fs::write(&cfg, "{ \"zones\": [ { \"id\": 1 } ] }").unwrap();
    let _guard = KillOnDrop(s.path("broker.pid"));
    let (code, out) = run(init_script(&s, &cfg, &s.path("hvisor.sock"), "start"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed to start"), "{out}");
    assert!(out.contains("invalid configuration"), "{out}");
    assert!(!s.path("broker.pid").exists());
}
