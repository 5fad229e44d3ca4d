//! What a local user without privileges can do to a running broker: nothing. Each user is a
//! forked child of the test that dropped to an unused uid before acting.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hvisor_broker::control::socket_path;
use hvisor_tests::*;
use nix::sys::socket::{accept, bind, connect, listen, Backlog, UnixAddr};
use serde_json::{json, Value};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3c00;
const FORGED: &str = r#"{"broker_pid":1,"workers":[]}"#;

fn one_disk(s: &Scratch) -> (PathBuf, PathBuf) {
    let img = s.image("disk.img", 1 << 20);
    let cfg = s.write_json(
        "zone.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }),
    );
    (img, cfg)
}

/// Lets other users into the scratch directory, as into /run or /tmp.
fn open_to_all(s: &Scratch) {
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The abstract name the control socket had before it moved to the run directory.
fn old_abstract_name(driver: &Path) -> UnixAddr {
    let dir = std::fs::canonicalize(driver.parent().unwrap()).unwrap();
    let name = format!(
        "hvisor-broker:{}",
        dir.join(driver.file_name().unwrap()).display()
    );
    UnixAddr::new_abstract(name.as_bytes()).unwrap()
}

fn bound(addr: &UnixAddr) -> nix::Result<OwnedFd> {
    let sock = protocol::channel::seqpacket_socket()?;
    bind(sock.as_raw_fd(), addr)?;
    Ok(sock)
}

fn listener(addr: &UnixAddr) -> nix::Result<OwnedFd> {
    let sock = bound(addr)?;
    listen(&sock, Backlog::new(16)?)?;
    Ok(sock)
}

/// Reads one request and answers it with a forged audit report, in the broker's protocol.
fn answer_forged(sock: &OwnedFd) {
    if let Ok(conn) = accept(sock) {
        let _ = nix::unistd::read(&conn, &mut [0u8; 256]);
        let reply = format!("hvisor-broker control 1\n{FORGED}");
        let _ = nix::unistd::write(&conn, reply.as_bytes());
    }
}

fn audit(run: &Path, driver: &Path) -> (bool, String) {
    broker_cmd(&[
        "audit",
        "--json",
        "--driver",
        driver.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ])
}

#[test]
fn a_user_squatting_the_control_socket_stops_nothing_and_audit_shows_the_real_broker() {
    let s = Scratch::new();
    open_to_all(&s);
    let (_, cfg) = one_disk(&s);
    let driver = s.path("hvisor.sock");
    let run = run_dir(&driver);
    let abstract_name = old_abstract_name(&driver);
    // where the lock and socket used to be, and where they are now
    let squatter = LocalUser::run(&[], |ready| {
        let Ok(sock) = listener(&abstract_name) else {
            return 1;
        };
        if std::fs::create_dir(&run).is_ok() {
            return 2;
        }
        ready.signal();
        loop {
            answer_forged(&sock);
        }
    });
    squatter.wait_ready(Duration::from_secs(10)).unwrap();
    let run_opts = SimRun::new(&cfg, "blk-demo").staying();
    let mut stack = Stack::start(&s, run_opts, &[]).unwrap();
    stack
        .broker
        .wait_for("serving 1 device", Duration::from_secs(20))
        .unwrap();
    stack.wait_report(Duration::from_secs(60)).unwrap();
    // nothing in the run directory is within the user's reach
    let socket = socket_path(&run, &driver);
    let mut late = LocalUser::run(&[], |_| {
        let reached = [
            bound(&UnixAddr::new(&run.join("x.sock")).unwrap()).is_ok(),
            std::fs::File::create(run.join("x.lock")).is_ok(),
            std::fs::read_dir(&run).is_ok(),
            protocol::channel::seqpacket_socket()
                .is_ok_and(|c| connect(c.as_raw_fd(), &UnixAddr::new(&socket).unwrap()).is_ok()),
        ];
        reached.iter().filter(|r| **r).count() as i32
    });
    assert_eq!(late.wait(Duration::from_secs(10)).unwrap(), 0);
    let (ok, out) = stack.audit();
    assert!(ok, "{out}\n{}", stack.diagnostics());
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["broker_pid"], stack.broker.pid().as_raw(), "{out}");
    let _ = stack.stop_broker();
}

#[test]
fn audit_refuses_a_server_that_is_not_a_root_hvisor_broker() {
    let s = Scratch::new();
    let driver = s.path("hvisor.sock");
    let run = run_dir(&driver);
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket = socket_path(&run, &driver);
    let addr = UnixAddr::new(&socket).unwrap();

    // a user's server, on the old abstract name and (bound there by root) at the socket's path
    let abstract_name = old_abstract_name(&driver);
    let in_run_dir = bound(&addr).unwrap();
    let user = LocalUser::run(&[], |ready| {
        let (Ok(old), Ok(())) = (
            listener(&abstract_name),
            listen(&in_run_dir, Backlog::MAXCONN),
        ) else {
            return 1;
        };
        ready.signal();
        loop {
            answer_forged(&in_run_dir);
            answer_forged(&old);
        }
    });
    user.wait_ready(Duration::from_secs(10)).unwrap();
    let (ok, out) = audit(&run, &driver);
    assert!(!ok && !out.contains(FORGED), "{out}");
    assert!(
        out.contains("uid 54321") && out.contains("not root"),
        "{out}"
    );
    drop(user);

    // a root process that is not hvisor-broker
    std::fs::remove_file(&socket).unwrap();
    let root_fake = listener(&addr).unwrap();
    let server = std::thread::spawn(move || answer_forged(&root_fake));
    let (ok, out) = audit(&run, &driver);
    assert!(!ok && !out.contains(FORGED), "{out}");
    assert!(out.contains("not hvisor-broker"), "{out}");
    server.join().unwrap();
}

#[test]
fn a_flood_of_connections_gets_a_bounded_log_and_the_guest_is_served() {
    const ATTEMPTS: usize = 10_000;
    let started = Instant::now();
    let s = Scratch::new();
    open_to_all(&s);
    let (_, cfg) = one_disk(&s);
    let driver = s.path("hvisor.sock");
    let go = s.path("go");
    let run = SimRun::new(&cfg, "blk-verify")
        .staying()
        .wait_for(&go)
        .timeout(300);
    let no_syslog = s.path("no-syslog");
    let mut stack =
        Stack::start(&s, run, &["--syslog-socket", no_syslog.to_str().unwrap()]).unwrap();
    stack
        .broker
        .wait_for("serving 1 device", Duration::from_secs(20))
        .unwrap();
    let addrs = [
        old_abstract_name(&driver),
        UnixAddr::new(&socket_path(&run_dir(&driver), &driver)).unwrap(),
    ];
    let flood = |addrs: &[UnixAddr]| {
        let mut reached = 0;
        for _ in 0..ATTEMPTS {
            for addr in addrs {
                let Ok(sock) = protocol::channel::seqpacket_socket() else {
                    return -1;
                };
                reached += connect(sock.as_raw_fd(), addr).is_ok() as i32;
            }
        }
        reached
    };
    // a plain user reaches neither the old name (nobody listens) nor the run directory
    let mut plain = LocalUser::run(&[], |_| flood(&addrs));
    assert_eq!(plain.wait(Duration::from_secs(300)).unwrap(), 0);
    // one that may pass the directory's permissions is refused by the broker, while the guest runs
    let mut capable = LocalUser::run(&[caps::Capability::CAP_DAC_OVERRIDE], |ready| {
        ready.signal();
        (flood(&addrs[1..]) != ATTEMPTS as i32) as i32
    });
    capable.wait_ready(Duration::from_secs(10)).unwrap();
    std::fs::write(&go, b"").unwrap();
    assert_eq!(capable.wait(Duration::from_secs(300)).unwrap(), 0);
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    assert_checks(&report, &[], &stack.diagnostics());
    let (ok, out) = stack.audit();
    assert!(ok, "{out}");
    stack.stop_broker().unwrap();
    let elapsed = started.elapsed().as_secs_f64();

    let text = stack.broker.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("control socket"))
        .collect();
    let logged = lines
        .iter()
        .filter(|l| l.contains("refused uid 54321"))
        .count();
    let unlogged: usize = lines
        .iter()
        .filter_map(|l| {
            l.split("control socket: ")
                .nth(1)?
                .split(" log records (")
                .next()
        })
        .filter_map(|n| n.parse::<usize>().ok())
        .sum();
    assert_eq!(logged + unlogged, ATTEMPTS, "{}", lines.join("\n"));
    // Refusals get 320 bytes a second (a burst of as much), about five lines; what is left
    // out is reported at most once a second and when the broker stops.
    let refused_bytes: usize = lines
        .iter()
        .filter_map(|l| l.find("control socket: refused").map(|i| l.len() - i))
        .sum();
    assert!(
        refused_bytes as f64 <= 320.0 * (1.0 + elapsed),
        "{refused_bytes} bytes of refusals in {elapsed:.1} s:\n{}",
        lines.join("\n")
    );
    let reports = lines.len() - logged;
    assert!(
        reports as f64 <= elapsed + 2.0,
        "{reports} reports in {elapsed:.1} s:\n{}",
        lines.join("\n")
    );
}

#[test]
fn a_reader_holding_a_shared_flock_does_not_stop_the_broker_but_a_second_broker_is_refused() {
    let s = Scratch::new();
    open_to_all(&s);
    let (img, cfg) = one_disk(&s);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
    let reader = LocalUser::run(&[], |ready| {
        let Ok(f) = std::fs::File::open(&img) else {
            return 1;
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_fd().as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
            return 2;
        }
        ready.signal();
        loop {
            nix::unistd::pause();
        }
    });
    reader.wait_ready(Duration::from_secs(10)).unwrap();
    let run = SimRun::new(&cfg, "blk-verify").staying();
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let report = stack.wait_report(Duration::from_secs(60)).unwrap();
    assert_checks(&report, &[], &stack.diagnostics());
    assert!(
        stack
            .broker
            .text()
            .contains("another process holds a lock on it"),
        "{}",
        stack.diagnostics()
    );
    // the same image for a second broker (on another driver) stays refused
    let other = s.path("other.sock");
    let (ok, out) = broker_cmd(&[
        "start",
        cfg.to_str().unwrap(),
        "--driver",
        other.to_str().unwrap(),
        "--run-dir",
        run_dir(&stack.socket).to_str().unwrap(),
    ]);
    assert!(
        !ok && out.contains("in use by another hvisor-broker"),
        "{out}"
    );
    let _ = stack.stop_broker();
}
