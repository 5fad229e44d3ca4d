//! Benchmark of the console path (not a timed test): runs the simulator's `console-bench`
//! guest against the broker and console worker and plays the user on the pty: it reads what
//! the guest sends and sends what the guest asks for, following the simulator's console
//! protocol. The guest prints each figure beside a plain pty copy measured in the same run.
//! Build with `--release` first:
//! `cargo build --release --workspace --bins && target/release/hvisor-console-bench`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use hvisor_tests::*;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use serde_json::json;

/// The transfer pattern, made as the guest makes it: 8 bytes at a time, so it can be
/// produced in pieces of any multiple of 8.
use hvisor_sim::guest::Rng as Pattern;

/// The user's end: the pty slave in raw mode, blocking (the guest drives the pace).
struct Tty {
    file: File,
    pending: Vec<u8>,
}

impl Tty {
    fn open(path: &Path) -> Result<Tty> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut t = tcgetattr(&file)?;
        cfmakeraw(&mut t);
        tcsetattr(&file, SetArg::TCSANOW, &t)?;
        Ok(Tty {
            file,
            pending: Vec::new(),
        })
    }

    fn read_line(&mut self) -> Result<String> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line[..end]).into_owned());
            }
            ensure!(self.pending.len() < 4096, "no newline from the guest");
            let n = self.file.read(&mut buf)?;
            ensure!(n > 0, "end of file on the console");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Reads `len` bytes into one buffer (checked afterwards, so the reader stays fast).
    fn read_exact(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut out = std::mem::take(&mut self.pending);
        out.reserve(len);
        let mut buf = vec![0u8; 64 * 1024];
        while out.len() < len {
            let want = buf.len().min(len - out.len());
            let n = self.file.read(&mut buf[..want])?;
            ensure!(n > 0, "end of file after {} of {len} bytes", out.len());
            out.extend_from_slice(&buf[..n]);
        }
        self.pending = out.split_off(len);
        Ok(out)
    }
}

fn transfer(line: &str, verb: &str) -> Result<(usize, u64)> {
    let w: Vec<&str> = line.split(' ').collect();
    ensure!(
        w.len() == 4 && w[0] == "HVC" && w[1] == verb,
        "expected HVC {verb}, the guest wrote {line:?}"
    );
    Ok((w[2].parse()?, w[3].parse()?))
}

/// Serves the guest's two transfers until it says DONE.
fn serve(pty: &Path) -> Result<()> {
    let mut tty = Tty::open(pty)?;
    let (len, seed) = transfer(&tty.read_line()?, "BENCH-TX")?;
    let got = tty.read_exact(len)?;
    let mut want = vec![0u8; len];
    Pattern::new(seed).fill(&mut want);
    let answer = match got.iter().zip(&want).position(|(a, b)| a != b) {
        None => format!("HVC GOT {len} ok\n"),
        Some(i) => format!("HVC GOT {len} bad@{i}\n"),
    };
    tty.file.write_all(answer.as_bytes())?;

    let (len, seed) = transfer(&tty.read_line()?, "BENCH-RX")?;
    let mut pattern = Pattern::new(seed);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = chunk.len().min(left);
        pattern.fill(&mut chunk[..n]);
        tty.file.write_all(&chunk[..n])?;
        left -= n;
    }
    let line = tty.read_line()?;
    ensure!(
        line == "HVC DONE",
        "expected HVC DONE, the guest wrote {line:?}"
    );
    Ok(())
}

fn main() -> Result<()> {
    let s = Scratch::new();
    let cfg = s.write_json(
        "bench.json",
        &json!({ "zones": [{
            "id": 1,
            "memory_region": [{ "zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000", "size": "0x10000000" }],
            "devices": [{ "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76,
                          "status": "enable" }]
        }]}),
    );
    let run = SimRun::new(&cfg, "console-bench").staying().timeout(300);
    let no_syslog = s.path("no-syslog");
    let mut stack = Stack::start(&s, run, &["--syslog-socket", no_syslog.to_str().unwrap()])?;
    let line = stack
        .broker
        .wait_for("zone 1 console: ", Duration::from_secs(10))?;
    let pty = line
        .split("zone 1 console: ")
        .nth(1)
        .context("no pty in the broker's log line")?
        .trim()
        .to_string();
    if let Err(e) = serve(Path::new(&pty)) {
        bail!("{e:#}\n{}", stack.diagnostics());
    }
    let report = stack.wait_report(Duration::from_secs(300))?;
    let broker = stack.broker.pid();
    println!("{}", stack.sim.text());
    println!();
    print_memory(broker);
    let st = stack.stop_broker()?;
    if !st.success() {
        bail!("broker exited with {st}:\n{}", stack.diagnostics());
    }
    let failed = failed_checks(&report);
    if !failed.is_empty() {
        bail!("bench checks failed: {failed:?}");
    }
    Ok(())
}
