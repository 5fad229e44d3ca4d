//! virtio-console end to end: hvisor-sim's `console-verify` guest, hvisor-broker and
//! hvisor-worker-console as separate processes, with this test as the user on the pty: it
//! reads what the guest writes and writes what the guest reads, following the simulator's
//! console protocol (see hvisor-sim's crate documentation).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hvisor_tests::*;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use nix::unistd::Pid;
use serde_json::{json, Value};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3800;
const IRQ: u32 = 76;
const MIB: usize = 1 << 20;
/// How long one step of the guest may keep the test waiting.
const STEP: Duration = Duration::from_secs(20);

/// The transfer pattern, as the guest makes it.
use hvisor_sim::guest::console::pattern;

/// The user's end of the console: the pty slave, raw, non-blocking, every wait bounded.
struct Tty {
    file: File,
    /// Read and not yet consumed.
    pending: Vec<u8>,
}

impl Tty {
    fn open(path: &Path) -> Result<Tty> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // TCSANOW: TCSAFLUSH would throw away what the guest wrote while we were away.
        let mut t = tcgetattr(&file)?;
        cfmakeraw(&mut t);
        tcsetattr(&file, SetArg::TCSANOW, &t)?;
        Ok(Tty {
            file,
            pending: Vec::new(),
        })
    }

    fn wait(&self, events: PollFlags, timeout: Duration) -> Result<()> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), events)];
        if poll(&mut fds, PollTimeout::from(ms))? == 0 {
            bail!("the console was silent for {timeout:?}");
        }
        Ok(())
    }

    /// Reads what is there, at most `max` bytes, waiting up to `timeout` for the first.
    fn fill(&mut self, max: usize, timeout: Duration) -> Result<usize> {
        self.wait(PollFlags::POLLIN, timeout)?;
        let mut buf = vec![0u8; max];
        match self.file.read(&mut buf) {
            Ok(0) => bail!("end of file on the console"),
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    fn read_line(&mut self) -> Result<String> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            ensure!(
                self.pending.len() < 4096,
                "no newline in {} bytes: {:?}",
                self.pending.len(),
                String::from_utf8_lossy(&self.pending[..64])
            );
            self.fill(4096, STEP).context("waiting for a line")?;
        }
    }

    /// `len` bytes, read `chunk` at a time with `pause` after each read and `stall` once
    /// half-way (a slow reader); as fast as they come with zero pauses.
    fn read_exact(
        &mut self,
        len: usize,
        chunk: usize,
        pause: Duration,
        stall: Duration,
    ) -> Result<Vec<u8>> {
        let mut stalled = false;
        while self.pending.len() < len {
            let want = chunk.min(len - self.pending.len());
            self.fill(want, STEP)
                .with_context(|| format!("{} of {len} bytes read", self.pending.len()))?;
            std::thread::sleep(pause);
            if !stalled && self.pending.len() >= len / 2 {
                std::thread::sleep(stall);
                stalled = true;
            }
        }
        Ok(self.pending.drain(..len).collect())
    }

    fn write_all(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            match self.file.write(data) {
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wait(PollFlags::POLLOUT, STEP)
                        .context("the guest stopped reading")?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// `HVC <verb> <len> <seed>` taken apart.
fn transfer(line: &str, verb: &str) -> Result<(usize, u64)> {
    let mut words = line.split(' ');
    ensure!(
        words.next() == Some("HVC") && words.next() == Some(verb),
        "expected HVC {verb}, the guest wrote {line:?}"
    );
    let len = words.next().context("no length")?.parse()?;
    let seed = words.next().context("no seed")?.parse()?;
    ensure!(len <= 64 * MIB, "a transfer of {len} bytes");
    Ok((len, seed))
}

/// Reads one transfer, answers it, and says where it differed from the pattern, if anywhere.
fn receive_transfer(
    tty: &mut Tty,
    verb: &str,
    chunk: usize,
    pause: Duration,
    stall: Duration,
) -> Result<Option<usize>> {
    let (len, seed) = transfer(&tty.read_line()?, verb)?;
    let got = tty.read_exact(len, chunk, pause, stall)?;
    let want = pattern(seed, len);
    let diff = got.iter().zip(&want).position(|(a, b)| a != b);
    let answer = match diff {
        None => format!("HVC GOT {len} ok\n"),
        Some(i) => format!("HVC GOT {len} bad@{i}\n"),
    };
    tty.write_all(answer.as_bytes())?;
    Ok(diff)
}

/// Clock ticks of CPU time (user + system) a process has used.
fn cpu_ticks(pid: Pid) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("the worker (pid {pid}) is gone"))?;
    // pid (comm) state ppid ...: utime and stime are fields 14 and 15
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    Ok(f[11] + f[12])
}

/// What the host side saw while serving `console-verify`.
#[derive(Debug, Default)]
struct Served {
    hello: String,
    tx_diff: Option<usize>,
    slow_diff: Option<usize>,
    after_diff: Option<usize>,
    /// Worker CPU ticks while the guest's output was held with no reader (0.5 s).
    blocked_ticks: u64,
    /// Worker CPU ticks while the guest waited for input with a buffer posted (1 s).
    waiting_ticks: u64,
}

/// Plays the user of `console-verify`'s pty: attached at `pty`, reattached at `reattach`.
fn serve_verify(pty: &Path, reattach: &Path, worker: Pid) -> Result<Served> {
    let mut s = Served::default();
    let mut tty = Tty::open(pty)?;
    s.hello = tty.read_line()?;
    let fast = (64 * 1024, Duration::ZERO, Duration::ZERO);
    s.tx_diff = receive_transfer(&mut tty, "TX", fast.0, fast.1, fast.2)?;
    // 1 KiB reads 1 ms apart, and half a second with no read at all half-way
    let slow = (1024, Duration::from_millis(1), Duration::from_millis(500));
    s.slow_diff = receive_transfer(&mut tty, "SLOWTX", slow.0, slow.1, slow.2)?;

    let (len, seed) = transfer(&tty.read_line()?, "RX")?;
    // Written at once: the guest offers no receive buffer for a while, so this blocks until
    // it does, and nothing may be lost meanwhile.
    tty.write_all(&pattern(seed, len))?;

    let line = tty.read_line()?;
    ensure!(line == "HVC DETACH", "expected HVC DETACH, got {line:?}");
    tty.write_all(b"HVC DETACHING\n")?;
    drop(tty);
    // The guest writes on with nobody reading: its output waits in the pty, then its chains.
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(worker)?;
    std::thread::sleep(Duration::from_millis(500));
    s.blocked_ticks = cpu_ticks(worker)? - before;
    let mut tty = Tty::open(reattach)?;
    s.after_diff = receive_transfer(&mut tty, "AFTER", fast.0, fast.1, fast.2)?;

    let line = tty.read_line()?;
    ensure!(line == "HVC IDLE", "expected HVC IDLE, got {line:?}");
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(worker)?;
    std::thread::sleep(Duration::from_secs(1));
    s.waiting_ticks = cpu_ticks(worker)? - before;
    tty.write_all(b"HVC BYE\n")?;
    let line = tty.read_line()?;
    ensure!(line == "HVC DONE", "expected HVC DONE, got {line:?}");
    Ok(s)
}

/// One zone with one console device (and `extra` keys on it).
fn console_config(s: &Scratch, extra: Value) -> PathBuf {
    let mut dev = json!({
        "type": "console", "addr": format!("{ADDR:#x}"), "len": "0x200", "irq": IRQ,
        "status": "enable"
    });
    for (k, v) in extra.as_object().unwrap() {
        dev[k] = v.clone();
    }
    s.write_json(
        "console.json",
        &json!({ "zones": [{
            "id": 1,
            "memory_region": [{ "zone0_ipa": format!("{RAM:#x}"), "zonex_ipa": format!("{RAM:#x}"),
                                "size": format!("{RAM_SIZE:#x}") }],
            "devices": [dev]
        }]}),
    )
}

/// Starts the stack with `console-verify` and returns it with the pty path and link the
/// broker logged, and the worker's pid.
fn start(s: &Scratch, cfg: &Path) -> (Stack, PathBuf, Option<PathBuf>, Pid) {
    let run = SimRun::new(cfg, "console-verify").staying().timeout(120);
    // No syslog: the broker's records come to its stderr, where the test reads the pty path.
    let no_syslog = s.path("no-syslog");
    let mut stack = Stack::start(s, run, &["--syslog-socket", no_syslog.to_str().unwrap()])
        .expect("starting the stack");
    let line = stack
        .broker
        .wait_for("zone 1 console: ", Duration::from_secs(10))
        .unwrap();
    let rest = line.split("zone 1 console: ").nth(1).unwrap();
    let (pty, link) = match rest.split_once(" (linked at ") {
        Some((p, l)) => (p, Some(PathBuf::from(l.trim_end_matches(')')))),
        None => (rest.trim(), None),
    };
    stack
        .broker
        .wait_for(
            "console@0xa003800: irq 76, worker pid",
            Duration::from_secs(10),
        )
        .unwrap();
    let workers = children(stack.broker.pid());
    assert_eq!(workers.len(), 1, "{}", stack.diagnostics());
    (stack, PathBuf::from(pty), link, workers[0])
}

fn assert_verified(stack: &mut Stack, served: &Served, cols: u16, rows: u16) -> Value {
    assert_eq!(
        served.hello,
        format!("hvisor-console-verify hello {cols}x{rows}")
    );
    assert_eq!(served.tx_diff, None, "1 MiB guest -> host differs");
    assert_eq!(served.slow_diff, None, "1 MiB to a slow reader differs");
    assert_eq!(served.after_diff, None, "output after the reattach differs");
    let report = stack.wait_report(Duration::from_secs(60)).unwrap();
    eprintln!("host side: {served:?}");
    for check in report["zones"][0]["devices"][0]["checks"]
        .as_array()
        .unwrap()
    {
        eprintln!("guest check {}: {}", check["name"], check["detail"]);
    }
    assert_checks(
        &report,
        &[
            "size_stock",
            "features",
            "config_space",
            "tx_1mib",
            "tx_1mib_slow_reader",
            "rx_1mib",
            "detach_reattach",
            "idle_wakeup",
            "interrupts",
        ],
        &stack.diagnostics(),
    );
    report
}

fn assert_sandboxed(w: Pid) {
    assert_eq!(proc_status(w, "Seccomp").as_deref(), Some("2"));
    assert_eq!(proc_status(w, "NoNewPrivs").as_deref(), Some("1"));
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            proc_status(w, set).as_deref(),
            Some("0000000000000000"),
            "{set}"
        );
    }
}

#[test]
fn a_megabyte_each_way_a_slow_reader_and_a_reattach_through_the_link_lose_nothing() {
    let s = Scratch::new();
    let link = s.path("run/hvisor/zone1-console");
    let cfg = console_config(
        &s,
        json!({ "pty_link": link.to_str().unwrap(), "cols": 132, "rows": "43" }),
    );
    let (mut stack, pty, logged_link, worker) = start(&s, &cfg);
    assert_eq!(logged_link.as_deref(), Some(link.as_path()));
    assert!(pty.starts_with("/dev/pts/"), "{}", pty.display());
    assert_eq!(std::fs::read_link(&link).unwrap(), pty);

    // first attached at the logged path, back through the link after the detach
    let served = serve_verify(&pty, &link, worker)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.diagnostics()));
    assert_verified(&mut stack, &served, 132, 43);
    // (it has served guest data, so it is past its Ready and in the sandbox)
    assert_sandboxed(worker);
    // a held console and a waiting one sleep (a tick may fall in by chance, not a loop's worth)
    assert!(served.blocked_ticks <= 1, "{served:?}");
    assert!(served.waiting_ticks <= 1, "{served:?}");

    // idle after the workload (the guest reset the device): not a single tick in a second
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(worker).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let after = cpu_ticks(worker).unwrap();
    assert_eq!(after, before, "an idle console worker used CPU");
    assert!(stack.broker.alive(), "{}", stack.diagnostics());

    let st = stack.stop_broker().unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "pty_link left behind after the broker stopped"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(!process_exists(worker), "the worker outlived the broker");
}

#[test]
fn without_a_link_the_pty_is_found_in_the_log_and_the_size_is_80x25() {
    let s = Scratch::new();
    let cfg = console_config(&s, json!({}));
    let (mut stack, pty, link, worker) = start(&s, &cfg);
    assert_eq!(link, None);
    let served = serve_verify(&pty, &pty, worker)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.diagnostics()));
    assert_verified(&mut stack, &served, 80, 25);
    assert_sandboxed(worker);
    // a megabyte or more each way went through the pty, as the worker counted it
    let (ok, out) = stack.ask(&["status", "--json"]);
    assert!(ok, "{out}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let counted = &status["devices"][0]["worker_reported"];
    for key in ["bytes_read", "bytes_written"] {
        assert!(counted[key].as_u64().unwrap() >= 1 << 20, "{status:#}");
    }
    let st = stack.stop_broker().unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
}

#[test]
fn directories_made_for_the_link_are_removed_and_a_stale_link_is_replaced() {
    // The link two directories below one that exists: both are made at start, and removed at
    // stop since they are empty again.
    let s = Scratch::new();
    let link = s.path("run/made/deeper/zone1-console");
    std::fs::create_dir(s.path("run")).unwrap();
    let cfg = console_config(&s, json!({ "pty_link": link.to_str().unwrap() }));
    let (mut stack, pty, _, _) = start(&s, &cfg);
    assert_eq!(std::fs::read_link(&link).unwrap(), pty);
    assert!(
        stack.stop_broker().unwrap().success(),
        "{}",
        stack.diagnostics()
    );
    assert!(!s.path("run/made").exists(), "made directories left behind");
    assert!(
        s.path("run").is_dir(),
        "a directory we did not make was removed"
    );

    // A link to a pty that is gone is a stale one of ours: replaced, then removed at stop.
    let s = Scratch::new();
    let link = s.path("zone1-console");
    std::os::unix::fs::symlink("/dev/pts/424242", &link).unwrap();
    let cfg = console_config(&s, json!({ "pty_link": link.to_str().unwrap() }));
    let (mut stack, pty, _, _) = start(&s, &cfg);
    assert_eq!(std::fs::read_link(&link).unwrap(), pty);
    assert!(
        stack.stop_broker().unwrap().success(),
        "{}",
        stack.diagnostics()
    );
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "link left behind"
    );
}
