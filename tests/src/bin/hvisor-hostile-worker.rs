//! A compromised worker for the broker's tests: it speaks the protocol by hand, skips the
//! sandbox, and does what a worker taken over by a guest might do to the broker.
//!
//! Installed as `DIR/hvisor-worker-<kind>`, it takes its behaviour from the name of DIR, so it
//! can stand in for one kind while real workers serve the others (`--worker-arg` reaches every
//! worker):
//! - `flood`: Ready, then log records, Failed, Violation and Confined messages as fast as the
//!   socket takes them, for ever; `flood-N`: the same, N messages a second.
//! - `forge`: Ready, then for 3 s about 500 messages a second of every kind, with forged log
//!   lines (newlines, terminal escapes), 4 KiB records and 64 KiB Confined messages; then it
//!   exits.
//! - `slow-ready-N`: Ready only after sleeping N seconds; then it serves nothing.
//! - `never-ready`: never reports Ready.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use protocol::msg::{PROTOCOL_VERSION, WORKER_SOCKET_FD};
use protocol::{BrokerMsg, Channel, ChannelError, WorkerMsg};

enum Mode {
    Flood(Option<u32>),
    Forge,
    SlowReady(u64),
    NeverReady,
}

fn mode() -> Option<Mode> {
    let exe = std::env::args().next()?;
    let dir = std::path::Path::new(&exe).parent()?.file_name()?.to_str()?;
    Some(match dir {
        "flood" => Mode::Flood(None),
        "forge" => Mode::Forge,
        "never-ready" => Mode::NeverReady,
        d => {
            if let Some(n) = d.strip_prefix("flood-") {
                Mode::Flood(Some(n.parse().ok()?))
            } else {
                Mode::SlowReady(d.strip_prefix("slow-ready-")?.parse().ok()?)
            }
        }
    })
}

fn main() -> ExitCode {
    let Some(mode) = mode() else {
        eprintln!("hvisor-hostile-worker: no mode in the name of its directory");
        return ExitCode::from(2);
    };
    // SAFETY: the broker starts workers with their socket at this fd; nothing else owns it.
    let chan = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(WORKER_SOCKET_FD) });
    if chan
        .recv::<BrokerMsg>(Some(Duration::from_secs(10)))
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    let ready = WorkerMsg::Ready {
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
    };
    match mode {
        Mode::Flood(rate) => {
            let _ = chan.send(&ready, &[], false);
            flood(&chan, rate);
        }
        Mode::Forge => {
            let _ = chan.send(&ready, &[], false);
            forge(&chan);
            return ExitCode::SUCCESS;
        }
        Mode::SlowReady(secs) => {
            std::thread::sleep(Duration::from_secs(secs));
            let _ = chan.send(&ready, &[], false);
            idle(&chan);
        }
        Mode::NeverReady => idle(&chan),
    }
    ExitCode::SUCCESS
}

/// Reads (and ignores) what the broker sends until it closes the socket.
fn idle(chan: &Channel) {
    while !matches!(chan.recv::<BrokerMsg>(None), Err(ChannelError::Eof)) {}
}

/// Small messages of every kind, in turn.
fn small(i: u64) -> WorkerMsg {
    match i % 4 {
        0 => WorkerMsg::Log {
            level: 2,
            message: format!("flood {i}"),
        },
        1 => WorkerMsg::Failed {
            reason: format!("flood {i}"),
        },
        2 => WorkerMsg::Violation {
            nr: i as i64,
            arch: 0,
        },
        _ => WorkerMsg::Confined {
            root: format!("flood {i}"),
            notes: vec![],
        },
    }
}

/// Sends until the broker goes away (or kills us), at `rate` messages a second or as fast as
/// the socket takes them.
fn flood(chan: &Channel, rate: Option<u32>) {
    let start = Instant::now();
    for i in 0u64.. {
        if let Some(r) = rate {
            let due = start + Duration::from_secs_f64(i as f64 / f64::from(r.max(1)));
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        loop {
            match chan.send(&small(i), &[], true) {
                Ok(()) => break,
                Err(ChannelError::Io(Errno::EAGAIN)) => {
                    let mut fds = [PollFd::new(chan.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::NONE);
                }
                Err(_) => return,
            }
        }
    }
}

/// What a compromised worker would put in the host's log: lines that look like the broker's
/// own, terminal escapes, and as much text as each message holds.
fn forge(chan: &Channel) {
    let forged = "ok\nhvisor-broker[1]: ERROR zone9 blk@0x0: FORGED by a worker\r\x1b[2J\x1b]0;FORGED\x07\u{9b}31m";
    let long = format!("{forged}{}", "A".repeat(4000));
    let notes: Vec<String> = (0..2000).map(|i| format!("\nFORGED note {i}")).collect();
    let messages = [
        WorkerMsg::Log {
            level: 1,
            message: long.clone(),
        },
        WorkerMsg::Failed {
            reason: long.clone(),
        },
        WorkerMsg::Violation { nr: 2, arch: 0 },
        WorkerMsg::Confined {
            root: format!("pivot_root into an empty tmpfs{forged}"),
            notes,
        },
    ];
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        let mut msg = messages[(i % 4) as usize].clone();
        if let WorkerMsg::Violation { nr, .. } = &mut msg {
            *nr = i as i64;
        }
        if chan.send(&msg, &[], false).is_err() {
            return;
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
}
