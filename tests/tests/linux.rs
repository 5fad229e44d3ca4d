//! Real Linux guests: a User-Mode Linux kernel (Debian's `user-mode-linux`) whose own
//! virtio-blk driver reaches hvisor-broker and hvisor-worker-blk through the simulator's
//! vhost-user adapter. Needs `user-mode-linux`, `busybox-static` and `e2fsprogs`; skipped
//! (with a message) only where `/usr/bin/linux` is absent.

#[path = "net/peer.rs"]
mod peer;
#[path = "net/tcp.rs"]
mod tcp;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

const KERNEL: &str = "/usr/bin/linux";
const MIB: u64 = 1 << 20;
/// UML's memory: the zone's one RAM region, from 1 MiB (below the end of UML's kernel
/// image, which is not shared) to 256 MiB.
const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 256 * MIB - RAM;
const TAP: &str = "hvltap0";
/// The host end of the tap and the guest's eth0, as in `linux_net.rs`.
const HOST: &str = "192.0.2.1";
const GUEST: &str = "192.0.2.2";

fn have_uml() -> bool {
    if Path::new(KERNEL).exists() {
        return true;
    }
    eprintln!(
        "skipping: {KERNEL} is absent (apt-get install user-mode-linux busybox-static e2fsprogs)"
    );
    false
}

fn blk(img: &Path, addr: u64, irq: u32) -> Value {
    json!({ "type": "blk", "addr": format!("{addr:#x}"), "len": "0x200", "irq": irq,
            "img": img.to_str().unwrap(), "status": "enable" })
}

fn console(addr: u64, irq: u32, link: &Path) -> Value {
    json!({ "type": "console", "addr": format!("{addr:#x}"), "len": "0x200", "irq": irq,
            "pty_link": link.to_str().unwrap(), "status": "enable" })
}

/// A net device on the tap [`TAP`] (in the test's own network namespace).
fn net(addr: u64, irq: u32) -> Value {
    json!({ "type": "net", "addr": format!("{addr:#x}"), "len": "0x200", "irq": irq,
            "tap": TAP, "mac": ["0x02", "0x00", "0x00", "0x00", "0x02", "0x02"], "mtu": 1500,
            "status": "enable" })
}

fn zone_of(devices: Vec<Value>) -> Value {
    json!({ "zones": [{
        "id": 1,
        "memory_region": [{ "zone0_ipa": format!("{RAM:#x}"), "zonex_ipa": format!("{RAM:#x}"),
                            "size": format!("{RAM_SIZE:#x}") }],
        "devices": devices
    }]})
}

fn zone(disks: &[(&Path, u64, u32)]) -> Value {
    zone_of(
        disks
            .iter()
            .map(|(img, addr, irq)| blk(img, *addr, *irq))
            .collect(),
    )
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

/// A file of an ext2/ext4 image, read on the host with debugfs.
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

/// The UML kernel's pid, from the simulator's "memory file found" line.
fn uml_pid(line: &str) -> i32 {
    line.split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no UML pid in {line:?}"))
}

/// Kills UML's process group when a test ends, passed or failed: a failed test kills the
/// simulator with SIGKILL, which leaves it no chance to.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if !process_group(self.0).is_empty() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The processes of process group `pgid` (their /proc stat lines).
fn process_group(pgid: i32) -> Vec<String> {
    std::fs::read_dir("/proc")
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
            (pgrp == pgid).then_some(stat)
        })
        .collect()
}

fn run_linux(s: &Scratch, cfg: &Path, guest: &str) -> (Stack, Value) {
    let run = SimRun::new(cfg, guest).timeout(150);
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

/// Makes an ext4 file system on `img` (the guest's busybox has no mkfs for it).
fn mkfs_ext4(img: &Path) {
    let out = Command::new("mkfs.ext4")
        .args(["-F", "-q"])
        .arg(img)
        .output()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `e2fsck -fn` finds `img` consistent.
fn assert_fsck_clean(img: &Path) {
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(img)
        .output()
        .expect("e2fsck (e2fsprogs) must be installed");
    assert!(
        fsck.status.success(),
        "e2fsck {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

#[test]
fn linux_ext4_and_ext2_files_and_a_64_mib_round_trip_match_their_checksums_on_the_host() {
    if !have_uml() {
        return;
    }
    let s = Scratch::new();
    let ext4_img = s.path("ext4.img");
    let raw_img = s.path("raw.img");
    let ext2_img = s.path("ext2.img");
    for (img, size) in [
        (&ext4_img, 64 * MIB),
        (&raw_img, 80 * MIB),
        (&ext2_img, 32 * MIB),
    ] {
        std::fs::File::create(img).unwrap().set_len(size).unwrap();
    }
    mkfs_ext4(&ext4_img);
    let cfg = s.write_json(
        "zone.json",
        &zone(&[
            (&ext4_img, 0x2000_0000, 78),
            (&raw_img, 0x2000_0200, 79),
            (&ext2_img, 0x2000_0400, 80),
        ]),
    );
    let (_stack, report) = run_linux(&s, &cfg, "linux-blk");
    let linux = &report["linux"];
    assert_eq!(linux["done"], true, "{report:#}");
    // Linux used the host's ext4 (with its journal) on vda and made ext2 on the blank vdc.
    let names = check_names(&report);
    for want in [
        "vda-mount-ext4",
        "vda-journal",
        "vda-reread",
        "vdc-mke2fs",
        "vdc-mount-ext2",
        "vdc-reread",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }

    // Both file systems are consistent, and every file the guest wrote is there, whole.
    for (dev, img) in [("vda", &ext4_img), ("vdc", &ext2_img)] {
        assert_fsck_clean(img);
        let files: Vec<&Value> = linux["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["dev"] == dev)
            .collect();
        assert_eq!(files.len(), 6, "{dev}: {report:#}");
        for f in files {
            let path = f["path"].as_str().unwrap();
            let data = debugfs_cat(img, path);
            assert_eq!(
                data.len() as u64,
                f["bytes"].as_u64().unwrap(),
                "{dev} {path}"
            );
            assert_eq!(sha256(&data), f["sha256"].as_str().unwrap(), "{dev} {path}");
        }
        assert!(
            debugfs_cat(img, "/hello.txt").starts_with(b"hello from a Linux guest"),
            "{dev} hello.txt"
        );
        assert_eq!(
            debugfs_cat(img, "/dir/big.bin").len() as u64,
            8 * MIB,
            "{dev}"
        );
    }

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
    let run = SimRun::new(&cfg, "linux-blk").timeout(150);
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    let line = stack
        .sim
        .wait_for("memory file found", Duration::from_secs(30))
        .unwrap();
    let uml = uml_pid(&line);
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
    let group_left = process_group(uml);
    assert!(group_left.is_empty(), "UML processes left: {group_left:?}");
}

/// The user's end of the guest's hvc0: the broker's pty, raw, non-blocking, every wait bounded.
struct Tty {
    file: std::fs::File,
    /// Read and not yet split into lines.
    pending: Vec<u8>,
    /// Every line read so far.
    seen: Vec<String>,
    /// Queued by [`Tty::send`], written while [`Tty::line_where`] waits.
    outgoing: Vec<u8>,
}

impl Tty {
    fn open(path: &Path) -> Tty {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let mut t = tcgetattr(&file).unwrap();
        cfmakeraw(&mut t);
        tcsetattr(&file, SetArg::TCSANOW, &t).unwrap();
        Tty {
            file,
            pending: Vec::new(),
            seen: Vec::new(),
            outgoing: Vec::new(),
        }
    }

    /// Types `line` and a newline.
    fn type_line(&mut self, line: &str) {
        let mut data = format!("{line}\n").into_bytes();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !data.is_empty() {
            match (&self.file).write(&data) {
                Ok(n) => drop(data.drain(..n)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "the pty stays full");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("writing to the console: {e}"),
            }
        }
    }

    /// Queues `data` to be typed while the next [`Tty::line_where`] reads: typing much
    /// without reading would fill the guest's output and stall it.
    fn send(&mut self, data: &[u8]) {
        self.outgoing.extend_from_slice(data);
    }

    /// Writes as much of the queued input as the pty takes now.
    fn flush_some(&mut self) {
        match (&self.file).write(&self.outgoing) {
            Ok(n) => drop(self.outgoing.drain(..n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("writing to the console: {e}"),
        }
    }

    /// The first line (without its CR LF) for which `want` is true, waiting up to `timeout`
    /// and typing the queued input meanwhile.
    fn line_where(&mut self, want: impl Fn(&str) -> bool, timeout: Duration) -> String {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::io::Read;
        use std::os::fd::AsFd;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                self.seen.push(line.clone());
                if want(&line) {
                    return line;
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "no such line on hvc0 within {timeout:?}; seen:\n{}\npending: {:?}",
                self.seen.join("\n"),
                String::from_utf8_lossy(&self.pending)
            );
            let ms = u16::try_from(left.as_millis().min(200)).unwrap();
            let mut events = PollFlags::POLLIN;
            if !self.outgoing.is_empty() {
                events |= PollFlags::POLLOUT;
            }
            let mut fds = [PollFd::new(self.file.as_fd(), events)];
            if poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) == 0 {
                continue;
            }
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if revents.contains(PollFlags::POLLOUT) {
                self.flush_some();
            }
            if !revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                continue;
            }
            let mut buf = [0u8; 4096];
            match (&self.file).read(&mut buf) {
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading the console: {e}"),
            }
        }
    }

    /// Runs `cmd` in the guest's shell and returns the words of the output line that starts
    /// with `tag` (the typed line, echoed by the guest's tty, never matches: `tag` is built
    /// there by the shell).
    fn ask(&mut self, cmd: &str, tag: &str, timeout: Duration) -> Vec<String> {
        self.type_line(cmd);
        let line = self.line_where(|l| l.trim_start().starts_with(tag), timeout);
        line.split_whitespace().map(String::from).collect()
    }
}

/// The value of the word `KEY-value` in `words`.
fn word<'a>(words: &'a [String], key: &str) -> &'a str {
    let prefix = format!("{key}-");
    words
        .iter()
        .find_map(|w| w.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {words:?}"))
}

/// A stack whose Linux guest runs a shell on hvc0; returns it with the user's end of hvc0.
fn start_console_guest(s: &Scratch, cfg: &Path, link: &Path) -> (Stack, KillGroup, Tty) {
    start_console_guest_with(s, cfg, link, 150, &[])
}

/// [`start_console_guest`] with a simulator timeout and broker arguments.
fn start_console_guest_with(
    s: &Scratch,
    cfg: &Path,
    link: &Path,
    timeout: u32,
    broker_args: &[&str],
) -> (Stack, KillGroup, Tty) {
    let run = SimRun::new(cfg, "linux-console").timeout(timeout.into());
    let mut stack = Stack::start(s, run, broker_args).unwrap();
    let line = stack
        .sim
        .wait_for("memory file found", Duration::from_secs(30))
        .unwrap();
    let uml = KillGroup(uml_pid(&line));
    stack
        .broker
        .wait_for("zone 1 console: /dev/pts/", Duration::from_secs(30))
        .unwrap();
    let shell = stack
        .sim
        .wait_for("HVSIM check hvc0-shell", Duration::from_secs(60))
        .unwrap();
    assert!(
        shell.contains("hvc0-shell pass"),
        "{shell}\n{}",
        stack.diagnostics()
    );
    let tty = Tty::open(link);
    (stack, uml, tty)
}

#[test]
fn a_shell_on_linux_hvc0_answers_through_the_brokers_pty() {
    if !have_uml() {
        return;
    }
    let s = Scratch::new();
    let link = s.path("zone1-console");
    let cfg = s.write_json("zone.json", &zone_of(vec![console(0x2000_0000, 78, &link)]));
    let (mut stack, uml, mut tty) = start_console_guest(&s, &cfg, &link);
    let out = tty.ask(
        "echo ANSWER-$((6*7)) RELEASE-$(uname -r) TTY-$(tty)",
        "ANSWER-",
        Duration::from_secs(30),
    );
    assert_eq!(word(&out, "ANSWER"), "42", "{out:?}");
    assert_eq!(word(&out, "TTY"), "/dev/hvc0", "{out:?}");
    let release = word(&out, "RELEASE").to_string();
    let report = end_console_session(&mut stack, &mut tty, &uml);
    assert_eq!(report["linux"]["release"], release.as_str());
    eprintln!("hvc0: {}", tty.seen.join("\n      "));
}

/// Types `exit` to end the guest's shell; checks that the guest, simulator and broker end
/// cleanly and that UML's own console (the HVSIM lines) stayed apart from hvc0.
fn end_console_session(stack: &mut Stack, tty: &mut Tty, uml: &KillGroup) -> Value {
    tty.type_line("exit");
    let report = stack.wait_report(Duration::from_secs(60)).unwrap();
    let failed = failed_checks(&report);
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\n{}",
        stack.diagnostics()
    );
    assert!(
        check_names(&report).iter().any(|n| n == "hvc0-session"),
        "{report:#}"
    );
    assert!(
        !tty.seen.iter().any(|l| l.contains("HVSIM")),
        "{:?}",
        tty.seen
    );
    let st = stack.sim.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "simulator: {st}\n{}", stack.diagnostics());
    let st = stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
    assert!(process_group(uml.0).is_empty());
    report
}

/// Line `i` of the echo test: distinct, 10 to 129 characters (no spaces at either end,
/// nothing the shell's `read` changes).
fn echo_line(i: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let tail: String = (0..(i * 37) % 120)
        .map(|k| ALPHABET[(i + k) % ALPHABET.len()] as char)
        .collect();
    format!("line-{i:04} {tail}").trim_end().to_string()
}

#[test]
fn a_thousand_lines_typed_into_the_brokers_pty_come_back_from_linux_hvc0_once_each_in_order() {
    echo_lines_through_hvc0(1000, 0);
}

/// The kills land anywhere, inside the worker's pipe reads and writes too (docs/console.md).
#[test]
fn lines_echoed_through_hvc0_arrive_once_each_in_order_across_console_worker_kills() {
    echo_lines_through_hvc0(lines_for(echo_bytes()), 20);
}

/// Bytes typed in the console kill test in a CI run (a quarter of the full check's 1 MiB,
/// which takes minutes); `HVISOR_ECHO_BYTES` sets another number.
fn echo_bytes() -> usize {
    std::env::var("HVISOR_ECHO_BYTES")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(256 << 10)
}

/// How many of the echo test's lines (with their newlines) make at least `bytes`.
fn lines_for(bytes: usize) -> usize {
    let mut total = 0;
    (0..)
        .take_while(|&i| {
            let more = total < bytes;
            total += echo_line(i).len() + 1;
            more
        })
        .count()
}

/// Types `count` lines into the broker's pty, which a loop on Linux's hvc0 echoes back, while
/// the console worker is killed `kills` times: every line must come back once, in order.
fn echo_lines_through_hvc0(count: usize, kills: usize) {
    if !have_uml() {
        return;
    }
    let s = Scratch::new();
    let link = s.path("zone1-console");
    let cfg = s.write_json("zone.json", &zone_of(vec![console(0x2000_0000, 78, &link)]));
    let (mut stack, uml, mut tty) =
        start_console_guest_with(&s, &cfg, &link, 1200, &["--restart-budget", "1000/60"]);
    // Terminal echo off: each line comes back exactly once, from the loop.
    tty.ask(
        "stty -echo; n=0; echo READY-$n; \
         while read -r l && [ \"$l\" != END ]; do n=$((n + 1)); echo \"ECHO $l\"; done; \
         echo COUNT-$n; stty echo",
        "READY-",
        Duration::from_secs(30),
    );
    let lines: Vec<String> = (0..count).map(echo_line).collect();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let started = std::time::Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let broker = stack.broker.pid();
    let killed = std::thread::scope(|scope| {
        let killer = scope.spawn(|| {
            kill_worker_repeatedly(
                broker,
                "hvisor-worker-c",
                kills,
                Duration::from_millis(300),
                0x6a09_e667_f3bc_c908,
                &stop,
                &AtomicUsize::new(0),
            )
        });
        tty.send(format!("{}\nEND\n", lines.join("\n")).as_bytes());
        tty.line_where(|l| l.starts_with("COUNT-"), Duration::from_secs(900));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        killer.join().unwrap()
    });
    eprintln!(
        "{count} lines ({bytes} bytes) echoed through hvc0 in {:.2} s, {killed} console worker kills",
        started.elapsed().as_secs_f64()
    );
    let echoed: Vec<&str> = tty
        .seen
        .iter()
        .filter_map(|l| l.strip_prefix("ECHO "))
        .collect();
    if let Some(i) = (0..count).find(|&i| echoed.get(i) != Some(&lines[i].as_str())) {
        panic!(
            "echo {i}: {:?}, typed {:?} ({} echoes)",
            echoed.get(i),
            lines[i],
            echoed.len()
        );
    }
    assert_eq!(echoed.len(), count, "more echoes than lines");
    let counted = tty.seen.iter().find(|l| l.starts_with("COUNT-")).cloned();
    assert_eq!(counted, Some(format!("COUNT-{count}")));
    // Nothing typed came back but through the loop.
    assert!(!tty.seen.iter().any(|l| l.starts_with("line-")));
    end_console_session(&mut stack, &mut tty, &uml);
    if kills > 0 {
        assert!(killed > 0, "the echo finished before the first kill");
        let log = stack.broker.text();
        assert!(log.contains(&format!("(restart {killed})")), "{log}");
    }
}

#[test]
fn a_worker_killed_during_linux_io_is_replaced_and_every_device_keeps_serving() {
    if !have_uml() {
        return;
    }
    let s = Scratch::new();
    let link = s.path("zone1-console");
    let fs_img = s.image("fs.img", 16 * MIB);
    let raw_img = s.image("raw.img", 64 * MIB);
    let cfg = s.write_json(
        "zone.json",
        &zone_of(vec![
            blk(&fs_img, 0x2000_0000, 78),
            blk(&raw_img, 0x2000_0200, 79),
            console(0x2000_0400, 80, &link),
        ]),
    );
    let (mut stack, uml, mut tty) = start_console_guest(&s, &cfg, &link);
    let started = stack
        .broker
        .wait_for(
            "zone1 blk@0x20000200: irq 79, worker pid ",
            Duration::from_secs(10),
        )
        .unwrap();
    let victim: i32 = started
        .split("worker pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no worker pid in {started:?}"));

    // vdb busy with direct writes, for good, in the background of the hvc0 shell.
    let out = tty.ask(
        "(while :; do dd if=/dev/zero of=/dev/vdb bs=1048576 count=64 oflag=direct 2>/dev/null; done) & echo LOOP-$!",
        "LOOP-",
        Duration::from_secs(30),
    );
    eprintln!("vdb writer: {out:?}");
    // Wait until the worker has done some of it (zeros replace the image's pattern).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while read_at(&raw_img, 0, 4096).iter().any(|&b| b != 0) {
        assert!(std::time::Instant::now() < deadline, "vdb is not written");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let gone = stack
        .broker
        .wait_for(
            &format!("worker (pid {victim}) killed by SIGKILL"),
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(gone.contains("zone1 blk@0x20000200"), "{gone}");
    assert!(stack.broker.alive(), "{}", stack.diagnostics());
    stack
        .broker
        .wait_for(
            "zone1 blk@0x20000200: starting a new worker (restart 1)",
            Duration::from_secs(10),
        )
        .unwrap();
    // vdb goes on: the image is written again after the replacement started
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&raw_img)
            .unwrap(),
        &[0xa5u8; 4096],
        0,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while read_at(&raw_img, 0, 4096).iter().any(|&b| b != 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "vdb is not written again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The console still answers, and vda still does I/O that the host reads back.
    let out = tty.ask("echo ANSWER-$((6*7))", "ANSWER-", Duration::from_secs(30));
    assert_eq!(word(&out, "ANSWER"), "42");
    let out = tty.ask(
        "head -c 4194304 /dev/urandom > /tmp/x; \
         dd if=/tmp/x of=/dev/vda bs=1048576 oflag=direct conv=fsync 2>/dev/null; \
         echo WROTE-$(sha256sum </tmp/x | cut -c1-64) \
         READ-$(dd if=/dev/vda bs=1048576 count=4 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)",
        "WROTE-",
        Duration::from_secs(60),
    );
    let wrote = word(&out, "WROTE").to_string();
    assert_eq!(word(&out, "READ"), wrote, "{out:?}");
    assert_eq!(wrote.len(), 64);
    assert_eq!(sha256(&read_at(&fs_img, 0, 4 * MIB as usize)), wrote);
    tty.type_line("exit");

    // The guest powers off with vdb still busy; nothing is left behind.
    let report = stack.wait_report(Duration::from_secs(60)).unwrap();
    assert_eq!(report["linux"]["done"], true, "{report:#}");
    let names = check_names(&report);
    assert!(names.iter().any(|n| n == "hvc0-session"), "{names:?}");
    let st = stack.sim.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(
        st.code().is_some(),
        "simulator: {st}\n{}",
        stack.diagnostics()
    );
    assert!(stack.broker.alive() || stack.broker.wait_exit(Duration::from_secs(1)).is_ok());
    let st = stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
    let left = process_group(uml.0);
    assert!(left.is_empty(), "UML processes left: {left:?}");
    assert!(!process_exists(nix::unistd::Pid::from_raw(victim)));
    eprintln!("UML: {}", report["linux"]["exit"]);
}

/// Kills of the blk worker in a CI run; `HVISOR_KILLS` sets another number (the soak script
/// runs it with 100).
fn kills() -> usize {
    std::env::var("HVISOR_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(20)
}

#[test]
fn linux_ext4_files_written_with_fsync_survive_blk_worker_kills_with_no_io_error() {
    if !have_uml() {
        return;
    }
    const FILES: usize = 300;
    let s = Scratch::new();
    let link = s.path("zone1-console");
    let img = s.image("fs.img", 64 * MIB);
    mkfs_ext4(&img);
    let cfg = s.write_json(
        "zone.json",
        &zone_of(vec![
            blk(&img, 0x2000_0000, 78),
            console(0x2000_0200, 79, &link),
        ]),
    );
    let (mut stack, uml, mut tty) =
        start_console_guest_with(&s, &cfg, &link, 900, &["--restart-budget", "1000/60"]);
    let out = tty.ask(
        "mkdir -p /tmp/m; mount -t ext4 /dev/vda /tmp/m; echo MOUNTED-$?",
        "MOUNTED-",
        Duration::from_secs(60),
    );
    assert_eq!(word(&out, "MOUNTED"), "0", "{out:?}");
    // Files of random data, each written with fsync and compared, its checksum kept in RAM.
    tty.type_line(&format!(
        "(i=0; while [ $i -lt {FILES} ]; do head -c 65536 /dev/urandom > /tmp/x; \
         dd if=/tmp/x of=/tmp/m/f$i bs=65536 conv=fsync 2>/dev/null || echo W''ERR-$i; \
         cmp -s /tmp/x /tmp/m/f$i || echo V''ERR-$i; \
         echo SUM-f$i-$(sha256sum < /tmp/x | cut -c1-64) >> /tmp/sums; i=$((i+1)); done; \
         echo LOOP''DONE-1) &"
    ));
    let label = "zone1 blk@0x20000000";
    let mut moments = Moments(0x5851_f42d_4c95_7f2d);
    let kills = kills();
    for n in 0..kills {
        let pid = worker_pid(&mut stack.broker, label, n, Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(50) + moments.next(Duration::from_millis(400)));
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
            // It died another way meanwhile (the broker says how): that is a death too.
            stack.broker.pump();
            let about = format!("pid {pid}");
            let said: Vec<&String> = (stack.broker.log.iter())
                .filter(|l| l.contains(&about))
                .collect();
            eprintln!("worker {n} (pid {pid}) was gone before its kill ({e}): {said:#?}");
        }
    }
    stack
        .broker
        .wait_for(
            &format!("starting a new worker (restart {kills})"),
            Duration::from_secs(60),
        )
        .unwrap();
    tty.line_where(|l| l.contains("LOOPDONE-1"), Duration::from_secs(600));
    let out = tty.ask(
        "echo ERRORS-$(dmesg | grep -ci -e 'I/O error' -e 'blk_update_request' -e 'EXT4-fs error')",
        "ERRORS-",
        Duration::from_secs(60),
    );
    let errors = word(&out, "ERRORS").to_string();
    tty.type_line("cat /tmp/sums; echo SUMS''DONE-1");
    tty.line_where(|l| l.contains("SUMSDONE-1"), Duration::from_secs(60));
    let out = tty.ask(
        "umount /tmp/m; echo UMOUNTED-$?",
        "UMOUNTED-",
        Duration::from_secs(60),
    );
    assert_eq!(word(&out, "UMOUNTED"), "0", "{out:?}");
    let seen = tty.seen.clone();
    end_console_session(&mut stack, &mut tty, &uml);
    assert_eq!(errors, "0", "I/O errors in the guest's kernel log");
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("WERR-") || l.contains("VERR-")),
        "{seen:#?}"
    );
    // Every acknowledged file is on the disk, and the file system is consistent.
    assert_fsck_clean(&img);
    let sums: Vec<(String, String)> = (seen.iter())
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("SUM-")?;
            let (name, sum) = rest.split_once('-')?;
            Some((name.to_string(), sum.to_string()))
        })
        .collect();
    assert_eq!(sums.len(), FILES, "{seen:#?}");
    for (name, sum) in &sums {
        assert_eq!(
            &sha256(&debugfs_cat(&img, &format!("/{name}"))),
            sum,
            "{name}"
        );
    }
}

#[test]
fn linux_bench_measures_the_guest_and_the_host_on_the_same_image() {
    if !have_uml() {
        return;
    }
    let s = Scratch::new();
    let img = s.image("bench.img", 64 * MIB);
    let cfg = s.write_json("zone.json", &zone(&[(&img, 0x2000_0000, 78)]));
    let (_stack, report) = run_linux(&s, &cfg, "linux-bench");
    let linux = &report["linux"];
    let find = |list: &str, dev: &str, op: &str| -> Value {
        linux[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["dev"] == dev && r["op"] == op)
            .cloned()
            .unwrap_or_else(|| panic!("no {list} {dev} {op} in {report:#}"))
    };
    for (list, dev) in [("rates", "vda"), ("host_rates", "host-cached")] {
        let w = find(list, dev, "write");
        let r = find(list, dev, "read");
        assert_eq!(w["bytes"], 64 * MIB, "{w}");
        assert_eq!(r["bytes"], 4 * 64 * MIB, "{r}");
        for x in [&w, &r] {
            assert!(x["mb_per_s"].as_f64().unwrap() > 0.0, "{x}");
            eprintln!(
                "{dev} {}: {:.0} MB/s",
                x["op"],
                x["mb_per_s"].as_f64().unwrap()
            );
        }
    }
    // The 16 parallel readers read the whole written range once.
    let par = find("rates", "vda", "parallel-read");
    assert_eq!(par["bytes"], 64 * MIB, "{par}");
    eprintln!(
        "vda parallel-read: {:.0} MB/s, most requests outstanding at a kick: {}",
        par["mb_per_s"].as_f64().unwrap_or(0.0),
        linux["links"][0]["max_in_flight"]
    );
}

/// MiB of each transfer of the net worker kill test; `HVISOR_NET_MIB` sets another size.
fn net_mib() -> usize {
    std::env::var("HVISOR_NET_MIB")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(64)
}

/// Holds a host end back until the killer has killed `need` workers (or, as a hang guard
/// only, two minutes passed: the test then fails on the count).
fn await_kills(killed: &AtomicUsize, need: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while killed.load(Ordering::SeqCst) < need && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn tcp_transfers_both_ways_survive_net_worker_kills_with_matching_checksums() {
    if !have_uml() {
        return;
    }
    if let Some(why) = peer::skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    const KILLS: usize = 20;
    const UP_KILLS: usize = KILLS / 2;
    const PORT_UP: u16 = 7101;
    const PORT_DOWN: u16 = 7102;
    let mib = net_mib();
    let bytes = mib << 20;
    let ns = peer::Netns::create("linux-net-kills").unwrap();
    ns.enter().unwrap();

    // The host ends hold each transfer back until its share of the kills was done, so every
    // kill lands while a connection is open, whatever the machine's speed: the upload has
    // UP_KILLS before its last piece, the download the rest.
    let killed = Arc::new(AtomicUsize::new(0));
    let wait = Duration::from_secs(600);
    let k = killed.clone();
    let up = tcp::serve_paced(
        tcp::listen("0.0.0.0", PORT_UP),
        bytes,
        true,
        Vec::new(),
        0,
        wait,
        move |got| await_kills(&k, got * (UP_KILLS + 1) / bytes),
    );
    let mut down_data = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut down_data)
        .unwrap();
    let down_sum = sha256(&down_data);
    let k = killed.clone();
    let down = tcp::serve_paced(
        tcp::listen("0.0.0.0", PORT_DOWN),
        0,
        false,
        down_data,
        1,
        wait,
        move |sent| await_kills(&k, UP_KILLS + sent * (KILLS - UP_KILLS + 1) / bytes),
    );

    let s = Scratch::new();
    let link = s.path("zone1-console");
    let cfg = s.write_json(
        "zone.json",
        &zone_of(vec![net(0x2000_0000, 78), console(0x2000_0200, 79, &link)]),
    );
    let (mut stack, uml, mut tty) =
        start_console_guest_with(&s, &cfg, &link, 1200, &["--restart-budget", "1000/60"]);
    ns.wait_for_link(TAP, Duration::from_secs(20)).unwrap();
    ns.host_side(TAP, &format!("{HOST}/24")).unwrap();
    let out = tty.ask(
        &format!(
            "ip link set eth0 up && ip addr add {GUEST}/24 dev eth0; i=0; \
             while ! ping -c 1 -W 1 {HOST} >/dev/null 2>&1 && [ $i -lt 30 ]; do i=$((i+1)); done; \
             ping -c 1 -W 5 {HOST} >/dev/null; echo PING-$?"
        ),
        "PING-",
        Duration::from_secs(120),
    );
    assert_eq!(word(&out, "PING"), "0", "{out:?}");
    let out = tty.ask(
        &format!(
            "dd if=/dev/urandom of=/tmp/up bs=1048576 count={mib} 2>/dev/null; \
             echo UPSUM-$(sha256sum /tmp/up | cut -c1-64)"
        ),
        "UPSUM-",
        Duration::from_secs(300),
    );
    let up_sum = word(&out, "UPSUM").to_string();

    let stop = AtomicBool::new(false);
    let broker = stack.broker.pid();
    let started = std::time::Instant::now();
    let (out, done) = std::thread::scope(|scope| {
        let killer = scope.spawn(|| {
            kill_worker_repeatedly(
                broker,
                "hvisor-worker-n",
                KILLS,
                Duration::from_millis(300),
                0xbb67_ae85_84ca_a73b,
                &stop,
                &killed,
            )
        });
        let out = tty.ask(
            &format!(
                "nc {HOST} {PORT_UP} -e dd if=/tmp/up bs=65536 2>/dev/null; echo UP-$?; \
                 rm /tmp/up; nc {HOST} {PORT_DOWN} -e dd of=/tmp/down bs=65536 2>/dev/null; \
                 echo DOWN-$? SIZE-$(stat -c %s /tmp/down) SUM-$(sha256sum /tmp/down | cut -c1-64); \
                 rm /tmp/down"
            ),
            "DOWN-",
            Duration::from_secs(900),
        );
        stop.store(true, Ordering::SeqCst);
        (out, killer.join().unwrap())
    });
    eprintln!(
        "{mib} MiB each way over TCP in {:.1} s, {done} net worker kills",
        started.elapsed().as_secs_f64()
    );
    let up_status = tty.seen.iter().find_map(|l| l.trim().strip_prefix("UP-"));
    assert_eq!(up_status, Some("0"), "the upload failed");
    assert_eq!(word(&out, "DOWN"), "0", "the download failed: {out:?}");
    assert_eq!(word(&out, "SIZE"), bytes.to_string(), "{out:?}");
    assert_eq!(word(&out, "SUM"), down_sum, "host to guest");
    let got = up.join().unwrap().expect("the guest's upload");
    assert_eq!(got.bytes, bytes);
    assert_eq!(sha256(&got.data), up_sum, "guest to host");
    down.join().unwrap().expect("the download");
    assert_eq!(done, KILLS);
    end_console_session(&mut stack, &mut tty, &uml);
    let log = stack.broker.text();
    assert!(log.contains(&format!("(restart {KILLS})")), "{log}");
    assert!(!log.contains("the device fails"), "{log}");
}
