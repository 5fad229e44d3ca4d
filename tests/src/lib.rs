//! Runs the real binaries (hvisor-sim, hvisor-broker, hvisor-worker-*) as separate processes
//! for the end-to-end tests and the benchmark. Build them first (`cargo build --bins`, or
//! `--release`); `HVISOR_BIN_DIR` overrides where they are looked for.

pub mod fuse;

use std::ffi::{OsStr, OsString};
use std::fmt::Display;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The directory holding the built binaries: `HVISOR_BIN_DIR`, else the profile directory this
/// test executable was built into (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HVISOR_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --bins` first (or set HVISOR_BIN_DIR)",
        p.display()
    );
    p
}

/// A scratch directory with images, a config and sockets.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("hvb")
                .tempdir()
                .expect("tempdir"),
        }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// An image of `size` bytes filled with a recognisable pattern.
    pub fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let mut f = File::create(&p).expect("create image");
        let mut block = vec![0u8; 4096];
        for off in (0..size).step_by(4096) {
            for (i, b) in block.iter_mut().enumerate() {
                *b = ((off as usize + i) % 251) as u8 ^ name.len() as u8;
            }
            let n = (size - off).min(4096) as usize;
            f.write_all(&block[..n]).expect("write image");
        }
        p
    }
    pub fn write_json(&self, name: &str, v: &Value) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, serde_json::to_vec_pretty(v).unwrap()).unwrap();
        p
    }
    /// A directory `name` owned by the unprivileged user `uid` (the scratch directory is opened
    /// to everyone for it, still root's and writable only by root).
    pub fn user_dir(&self, name: &str, uid: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod scratch");
        let p = self.path(name);
        std::fs::create_dir(&p).expect("mkdir");
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).expect("chown");
        p
    }
}

/// The unprivileged user the path tests play.
pub const NOBODY: u32 = 65534;

/// Runs the shell `script` as user and group `uid` (no supplementary groups) and asserts it
/// succeeded.
pub fn run_as(uid: u32, script: &str) {
    use std::os::unix::process::CommandExt;
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "as uid {uid}: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// A worker directory where `hvisor-hostile-worker` (in `mode`, see its source) stands in for
/// `kind` and the real workers serve the other kinds.
pub fn hostile_workers(scratch: &Scratch, mode: &str, kind: &str) -> String {
    let dir = scratch.path(mode);
    std::fs::create_dir(&dir).expect("worker dir");
    for k in ["blk", "net", "console"] {
        let name = format!("hvisor-worker-{k}");
        let target = if k == kind {
            bin("hvisor-hostile-worker")
        } else {
            bin(&name)
        };
        std::os::unix::fs::symlink(target, dir.join(name)).expect("worker link");
    }
    dir.to_str().expect("utf-8 path").to_string()
}

/// A worker directory where `hvisor-probe-worker` stands in for the blk worker.
pub fn probe_workers(scratch: &Scratch) -> String {
    let dir = scratch.path("workers");
    std::fs::create_dir(&dir).expect("worker dir");
    std::os::unix::fs::symlink(bin("hvisor-probe-worker"), dir.join("hvisor-worker-blk"))
        .expect("worker link");
    dir.to_str().expect("utf-8 path").to_string()
}

/// One blk device for [`zone_json`].
pub struct BlkSpec<'a> {
    pub img: &'a Path,
    pub addr: u64,
    pub irq: u32,
    pub readonly: bool,
}

/// A zone with RAM at `ram_base` (`size` bytes, identity-mapped as on aarch64 boards) and
/// the given blk devices.
pub fn zone_json(id: u32, ram_base: u64, ram_size: u64, blks: &[BlkSpec]) -> Value {
    let devices: Vec<Value> = blks
        .iter()
        .map(|b| {
            let mut d = json!({
                "type": "blk", "addr": format!("{:#x}", b.addr), "len": "0x200", "irq": b.irq,
                "img": b.img.to_str().unwrap(), "status": "enable"
            });
            if b.readonly {
                d["readonly"] = json!(true);
            }
            d
        })
        .collect();
    json!({
        "id": id,
        "memory_region": [{ "zone0_ipa": format!("{ram_base:#x}"), "zonex_ipa": format!("{ram_base:#x}"), "size": format!("{ram_size:#x}") }],
        "devices": devices
    })
}

/// A running process whose output is collected in the background.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
}

impl Proc {
    /// Runs `cmd` (stdout and stderr collected) as a process of the test.
    pub fn spawn_cmd(name: &'static str, cmd: Command) -> Result<Proc> {
        Self::spawn(name, cmd)
    }

    fn spawn(name: &'static str, mut cmd: Command) -> Result<Proc> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        let readers = vec![
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ];
        Ok(Self::watch(name, child, readers))
    }

    /// Runs `cmd` with its stderr on a new pseudo-terminal, as from an operator's terminal,
    /// where `typed` was typed (without echo) and waits to be read. Collects what it prints
    /// there and on stdout.
    pub fn spawn_on_tty(name: &'static str, mut cmd: Command, typed: &[u8]) -> Result<Proc> {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        let pty = nix::pty::openpty(None, None)?;
        let mut mode = tcgetattr(&pty.slave)?;
        mode.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &mode)?;
        let mut master = File::from(pty.master);
        master.write_all(typed)?;
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(pty.slave))
            .stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        // Only the child holds the terminal now: reading it ends when the child's side closes.
        drop(cmd);
        let readers = vec![
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(master),
        ];
        Ok(Self::watch(name, child, readers))
    }

    /// Collects the lines `readers` yield, in the background.
    fn watch(name: &'static str, child: Child, readers: Vec<Box<dyn Read + Send>>) -> Proc {
        let (tx, rx) = mpsc::channel();
        for r in readers {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if std::env::var_os("HVISOR_TEST_ECHO").is_some() {
                        eprintln!("[{name}] {line}");
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            name,
            child,
            lines: rx,
            log: Vec::new(),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Collects what the process printed so far.
    pub fn pump(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.log.push(l);
        }
    }

    /// After the exit: takes every line until the readers reach the end of the output (or it
    /// stays quiet for a while, should a child of the process still hold it open).
    fn drain(&mut self) {
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.log.push(l);
        }
    }

    /// Waits until a printed line contains `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
            return Ok(l.clone());
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(l) => {
                    let hit = l.contains(needle);
                    self.log.push(l.clone());
                    if hit {
                        return Ok(l);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "{} ended before printing {needle:?}:\n{}",
                        self.name,
                        self.log.join("\n")
                    )
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.log.join("\n")
                );
            }
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                self.drain();
                return Ok(st);
            }
            if Instant::now() >= deadline {
                self.pump();
                bail!(
                    "{} still running after {timeout:?}:\n{}",
                    self.name,
                    self.log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(self.pid(), sig);
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn text(&mut self) -> String {
        self.pump();
        self.log.join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Options for one simulator run: `SimRun::new(cfg, guest)` and the chainable methods below.
pub struct SimRun<'a> {
    pub config: &'a Path,
    pub guest: &'a str,
    pub seed: u64,
    pub legacy_driver: bool,
    pub stay: bool,
    pub extra: Vec<OsString>,
}

impl<'a> SimRun<'a> {
    pub fn new(config: &'a Path, guest: &'a str) -> Self {
        SimRun {
            config,
            guest,
            seed: 1,
            legacy_driver: false,
            stay: false,
            extra: Vec::new(),
        }
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn legacy_driver(mut self) -> Self {
        self.legacy_driver = true;
        self
    }

    /// `--stay`: the simulator serves on after the workload, so the broker and its workers
    /// can still be looked at.
    pub fn staying(mut self) -> Self {
        self.stay = true;
        self
    }

    /// `--timeout`: the simulator gives up after this many seconds (its default is 60).
    pub fn timeout(self, secs: u64) -> Self {
        self.arg("--timeout").arg(secs.to_string())
    }

    /// `--wait-for`: the guests start only once `path` exists.
    pub fn wait_for(self, path: &Path) -> Self {
        self.arg("--wait-for").arg(path)
    }

    /// `depth-bench`: these queue depths, `secs` seconds each.
    pub fn depths(self, depths: &[usize], secs: impl Display) -> Self {
        let depths = depths.iter().map(usize::to_string).collect::<Vec<_>>();
        self.arg("--depths")
            .arg(depths.join(","))
            .arg("--depth-secs")
            .arg(secs.to_string())
    }

    /// `--net-host`, `--net-guest`, `--net-port`: the tap's host side (where the peer
    /// listens), the guest's address and the peer's UDP port.
    pub fn net(self, host: impl Display, guest: impl Display, port: u16) -> Self {
        self.arg("--net-host")
            .arg(host.to_string())
            .arg("--net-guest")
            .arg(guest.to_string())
            .arg("--net-port")
            .arg(port.to_string())
    }

    /// Any other simulator argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.extra.push(arg.as_ref().to_owned());
        self
    }

    pub fn args(self, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Self {
        args.into_iter().fold(self, Self::arg)
    }
}

/// The simulator, the broker and where their outputs go.
pub struct Stack {
    pub sim: Proc,
    pub broker: Proc,
    pub socket: PathBuf,
    pub report: PathBuf,
    pub shadow_dir: PathBuf,
}

impl Stack {
    /// Starts the simulator, waits until it listens, then starts the broker against it.
    pub fn start(scratch: &Scratch, run: SimRun, broker_args: &[&str]) -> Result<Stack> {
        let config = run.config;
        Self::start_with(scratch, run, |socket| {
            start_broker(config, socket, broker_args)
        })
    }

    /// [`Stack::start`] with the broker started by `broker` (given the simulator's socket).
    pub fn start_with(
        scratch: &Scratch,
        run: SimRun,
        broker: impl FnOnce(&Path) -> Result<Proc>,
    ) -> Result<Stack> {
        let socket = scratch.path("hvisor.sock");
        let report = scratch.path("report.json");
        let shadow_dir = scratch.path("shadow");
        std::fs::create_dir_all(&shadow_dir)?;
        let mut cmd = Command::new(bin("hvisor-sim"));
        cmd.arg("--config")
            .arg(run.config)
            .arg("--socket")
            .arg(&socket)
            .arg("--guest")
            .arg(run.guest);
        cmd.arg("--seed")
            .arg(run.seed.to_string())
            .arg("--report")
            .arg(&report)
            .arg("--shadow-dir")
            .arg(&shadow_dir);
        if run.legacy_driver {
            cmd.arg("--legacy-driver");
        }
        if run.stay {
            cmd.arg("--stay");
        }
        cmd.args(&run.extra);
        let mut sim = Proc::spawn("hvisor-sim", cmd)?;
        sim.wait_for("listening on", Duration::from_secs(20))?;
        let broker = broker(&socket)?;
        Ok(Stack {
            sim,
            broker,
            socket,
            report,
            shadow_dir,
        })
    }

    /// Waits for the guest workload to finish and returns its report.
    pub fn wait_report(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        while !self.report.exists() {
            if !self.sim.alive() {
                let st = self.sim.wait_exit(Duration::from_secs(1))?;
                if !self.report.exists() {
                    bail!(
                        "simulator exited ({st}) without a report:\n{}\n--- broker ---\n{}",
                        self.sim.text(),
                        self.broker.text()
                    );
                }
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "no report within {timeout:?}:\n{}\n--- broker ---\n{}",
                    self.sim.text(),
                    self.broker.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // the report is written whole; give a slow writer a moment
        std::thread::sleep(Duration::from_millis(50));
        let text = std::fs::read_to_string(&self.report)?;
        let report: Value =
            serde_json::from_str(&text).with_context(|| format!("report: {text}"))?;
        let hv = &report["hypervisor"];
        // Seen with --nocapture: whether injections met an active interrupt in this run.
        println!(
            "interrupts: {} taken, {} merged, {} dropped while active",
            hv["interrupts"], hv["merged_interrupts"], hv["dropped_interrupts"]
        );
        Ok(report)
    }

    /// Stops the broker with SIGTERM and returns its exit status.
    pub fn stop_broker(&mut self) -> Result<ExitStatus> {
        self.broker.signal(Signal::SIGTERM);
        self.broker.wait_exit(Duration::from_secs(10))
    }

    /// `hvisor-broker audit --json` for this stack's broker: (success, output).
    pub fn audit(&self) -> (bool, String) {
        self.ask(&["audit", "--json"])
    }

    /// `hvisor-broker ARGS` on this stack's broker's control socket: (success, output).
    pub fn ask(&self, args: &[&str]) -> (bool, String) {
        let run_dir = run_dir(&self.socket);
        let mut all = args.to_vec();
        all.extend([
            "--driver",
            self.socket.to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
        ]);
        broker_cmd(&all)
    }

    pub fn diagnostics(&mut self) -> String {
        format!(
            "--- sim ---\n{}\n--- broker ---\n{}",
            self.sim.text(),
            self.broker.text()
        )
    }
}

/// The run directory of a test's broker: beside its driver socket, in the test's own scratch
/// directory, so tests running side by side never share a lock.
pub fn run_dir(socket: &Path) -> PathBuf {
    socket.with_file_name("broker-run")
}

pub fn start_broker(config: &Path, socket: &Path, args: &[&str]) -> Result<Proc> {
    start_broker_at(&bin("hvisor-broker"), config, socket, args)
}

/// [`start_broker`] with the broker binary at `program` (its workers are those beside it).
pub fn start_broker_at(
    program: &Path,
    config: &Path,
    socket: &Path,
    args: &[&str],
) -> Result<Proc> {
    Proc::spawn(
        "hvisor-broker",
        broker_command_at(program, config, socket, args),
    )
}

/// `hvisor-broker start CONFIG --driver SOCKET ARGS`.
pub fn broker_command(config: &Path, socket: &Path, args: &[&str]) -> Command {
    broker_command_at(&bin("hvisor-broker"), config, socket, args)
}

fn broker_command_at(program: &Path, config: &Path, socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("start")
        .arg(config)
        .arg("--driver")
        .arg(socket)
        .arg("--run-dir")
        .arg(run_dir(socket))
        .args(args);
    cmd
}

/// Runs `hvisor-broker ARGS` to completion and returns (success, stdout + stderr).
pub fn broker_cmd(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("hvisor-broker"))
        .args(args)
        .output()
        .expect("run hvisor-broker");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Children of `pid` (the workers of a broker), from /proc.
pub fn children(pid: Pid) -> Vec<Pid> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                // pid (comm) state ppid ...: comm may contain spaces, so split after ')'
                if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
                    let ppid: i32 = rest
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    if ppid == pid.as_raw() {
                        out.push(Pid::from_raw(p));
                    }
                }
            }
        }
    }
    out
}

/// A field of /proc/PID/status, e.g. "Seccomp".
pub fn proc_status(pid: Pid, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

pub fn process_exists(pid: Pid) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && proc_status(pid, "State")
            .map(|s| !s.starts_with('Z'))
            .unwrap_or(false)
}

/// Every check of a simulator report (`{"name", "pass", "detail"}` objects anywhere in it).
pub fn failed_checks(report: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let (Some(Value::String(name)), Some(Value::Bool(pass))) =
                    (m.get("name"), m.get("pass"))
                {
                    if !pass {
                        out.push(format!(
                            "{name}: {}",
                            m.get("detail").map(|d| d.to_string()).unwrap_or_default()
                        ));
                    }
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(report, &mut out);
    out
}

/// Asserts that every check of `report` passed and that each of `wanted` is among them;
/// `context` (logs) is printed on failure.
pub fn assert_checks(report: &Value, wanted: &[&str], context: &str) {
    let failed = failed_checks(report);
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\nreport: {report:#}\n{context}"
    );
    let names = check_names(report);
    for want in wanted {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} check: {names:?}"
        );
    }
}

/// Names of all checks in a report.
pub fn check_names(report: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let (Some(Value::String(name)), Some(Value::Bool(_))) =
                    (m.get("name"), m.get("pass"))
                {
                    out.push(name.clone());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(report, &mut out);
    out
}

/// Reads `len` bytes of a file at `off`.
pub fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).expect("read_at");
    buf
}

/// Prints the resident memory (now and peak) of the broker and each of its workers.
pub fn print_memory(broker: Pid) {
    println!(
        "memory of each process, in MiB: PSS (proportional: shared pages divided among their \
         users), of it anonymous and file-backed (code); RSS now and at its peak, target < 16 \
         MiB each"
    );
    println!(
        "  {:<22} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "process", "PSS", "anon", "file", "RSS", "peak"
    );
    let kib = |pid, field| {
        proc_status(pid, field)
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0) as f64
            / 1024.0
    };
    for pid in std::iter::once(broker).chain(children(broker)) {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let pss = Pss::of(pid).unwrap_or_default();
        let mib = |k: u64| k as f64 / 1024.0;
        println!(
            "  {:<22} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2}",
            name.trim(),
            mib(pss.total),
            mib(pss.anon),
            mib(pss.file),
            kib(pid, "VmRSS"),
            kib(pid, "VmHWM")
        );
    }
}

/// A process's proportional set size, from /proc/PID/smaps_rollup, in KiB.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pss {
    pub total: u64,
    pub anon: u64,
    pub file: u64,
}

impl Pss {
    pub fn of(pid: Pid) -> Option<Pss> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Some(Pss {
            total: field("Pss:"),
            anon: field("Pss_Anon:"),
            file: field("Pss_File:"),
        })
    }
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: Pid) -> Option<u64> {
    proc_status(pid, "VmRSS")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A local user without privileges: a forked child that leaves root (no supplementary groups,
/// then gid and uid [`LocalUser::ID`]) and exits with what `act` returns. It may keep some
/// capabilities effective (`keep`), to reach what only the capability would open. Killed and
/// reaped when dropped.
pub struct LocalUser {
    pid: Pid,
    ready: std::os::fd::OwnedFd,
    code: Option<i32>,
}

/// Handed to the user's `act`: tells the test the user is in place.
pub struct Ready(std::os::fd::OwnedFd);

impl Ready {
    pub fn signal(&self) {
        let _ = nix::unistd::write(&self.0, b"r");
    }
}

impl LocalUser {
    /// An id no account uses.
    pub const ID: u32 = 54321;

    pub fn run(keep: &[caps::Capability], act: impl FnOnce(&Ready) -> i32) -> LocalUser {
        let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        // SAFETY: the child only drops its ids, runs `act` and leaves with _exit, never
        // returning into the test harness.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                drop(rx);
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    become_user(keep);
                    act(&Ready(tx))
                }))
                .unwrap_or(101);
                // SAFETY: ends the child without running the test process's exit handlers.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => LocalUser {
                pid: child,
                ready: rx,
                code: None,
            },
        }
    }

    /// Waits until the user called [`Ready::signal`] (or ended).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        protocol::channel::wait_readable(std::os::fd::AsFd::as_fd(&self.ready), timeout)
            .map_err(|e| anyhow!("the local user did not get ready: {e}"))
    }

    /// Waits for the user's exit code.
    pub fn wait(&mut self, timeout: Duration) -> Result<i32> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let deadline = Instant::now() + timeout;
        while self.code.is_none() {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG))? {
                WaitStatus::Exited(_, c) => self.code = Some(c),
                WaitStatus::Signaled(_, s, _) => self.code = Some(128 + s as i32),
                _ if Instant::now() >= deadline => bail!("the local user still runs"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        Ok(self.code.unwrap_or(-1))
    }
}

impl Drop for LocalUser {
    fn drop(&mut self) {
        if self.code.is_none() {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(self.pid, None);
        }
    }
}

fn become_user(keep: &[caps::Capability]) {
    let id = LocalUser::ID;
    if !keep.is_empty() {
        // SAFETY: PR_SET_KEEPCAPS takes no pointers.
        assert_eq!(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }, 0);
    }
    nix::unistd::setgroups(&[]).expect("setgroups");
    nix::unistd::setgid(nix::unistd::Gid::from_raw(id)).expect("setgid");
    nix::unistd::setuid(nix::unistd::Uid::from_raw(id)).expect("setuid");
    let keep: caps::CapsHashSet = keep.iter().copied().collect();
    caps::set(None, caps::CapSet::Effective, &keep).expect("capset");
}

pub fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(anyhow!(msg.into()))
}

/// [`worker_pid`], once that worker is sandboxed and ready (each wait up to `timeout`).
pub fn ready_worker_pid(
    broker: &mut Proc,
    label: &str,
    n: usize,
    timeout: Duration,
) -> Result<Pid> {
    let pid = worker_pid(broker, label, n, timeout)?;
    broker.wait_for(&format!("worker (pid {pid}) sandboxed and ready"), timeout)?;
    Ok(pid)
}

/// The pid of the `n`th worker (0: the first) the broker started for device `label`
/// (`zone1 blk@0xa003c00`), once it was started.
pub fn worker_pid(broker: &mut Proc, label: &str, n: usize, timeout: Duration) -> Result<Pid> {
    let deadline = Instant::now() + timeout;
    let prefix = format!("{label}: irq ");
    loop {
        broker.pump();
        let started: Vec<&String> = (broker.log.iter())
            .filter(|l| l.contains(&prefix) && l.contains("worker pid "))
            .collect();
        if let Some(line) = started.get(n) {
            let pid = line
                .split("worker pid ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no pid in {line:?}"))?;
            return Ok(Pid::from_raw(pid));
        }
        if Instant::now() >= deadline || !broker.alive() {
            bail!(
                "{label}: no worker number {n} within {timeout:?}:\n{}",
                broker.log.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Open fds of a process.
pub fn fd_count(pid: Pid) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A small deterministic generator for "random moments" (xorshift).
pub struct Moments(pub u64);

impl Moments {
    /// A delay below `max`.
    pub fn next(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        max.mul_f64((self.0 % 1000) as f64 / 1000.0)
    }
}

/// Kills the worker of `broker` whose command name starts with `comm` (`hvisor-worker-c`;
/// names are cut at 15 characters) `kills` times, each at a random moment once its
/// predecessor was replaced, until `stop` is set; returns how many it killed, and keeps that
/// count in `killed` as it goes. Meant for a thread beside a workload.
pub fn kill_worker_repeatedly(
    broker: Pid,
    comm: &str,
    kills: usize,
    within: Duration,
    seed: u64,
    stop: &std::sync::atomic::AtomicBool,
    killed: &std::sync::atomic::AtomicUsize,
) -> usize {
    let mut moments = Moments(seed);
    let mut last = None;
    for n in 0..kills {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = loop {
            let found = children(broker).into_iter().find(|&p| {
                Some(p) != last
                    && std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.starts_with(comm))
            });
            if let Some(p) = found {
                break p;
            }
            if stop.load(std::sync::atomic::Ordering::SeqCst) || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        std::thread::sleep(moments.next(within));
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return n;
        }
        let _ = kill(pid, Signal::SIGKILL);
        killed.store(n + 1, std::sync::atomic::Ordering::SeqCst);
        last = Some(pid);
    }
    kills
}
