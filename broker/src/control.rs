//! The control socket and the single-instance lock, both in the root-only run directory
//! ([`crate::rundir`]) under a name derived from the driver: the lock is a `flock` (released by
//! the kernel whenever the broker exits), the socket answers `hvisor-broker audit` for root.
//!
//! Nothing here waits inside the bridge loop: connections are accepted a few per wakeup and
//! kept (a few at most) until their request arrives, and refusals reach the log within a
//! budget. The audit client trusts an answer only from a root process running hvisor-broker
//! that speaks this protocol and names its own pid.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, MsgFlags,
    SockFlag, SockType, UnixAddr,
};
use protocol::channel::{recv_raw, send_raw, seqpacket_socket, wait_readable};

use crate::budget::LogBudget;
use crate::rundir::RunDir;

/// Starts every message: the protocol and its version.
const MAGIC: &str = "hvisor-broker control 1";
/// The largest answer (SEQPACKET keeps it one message).
const MAX_ANSWER: usize = 1 << 20;
/// Connections taken per wakeup: the rest wait in the backlog, the loop goes on.
const ACCEPT_PER_WAKEUP: usize = 8;
/// Root connections waiting for their request; the oldest is dropped for a new one.
const MAX_PENDING: usize = 4;
/// How long a connection may take to send its request.
const REQUEST_TIME: Duration = Duration::from_secs(1);

fn audit_request() -> String {
    format!("{MAGIC} audit")
}

/// The file name (without extension) of `driver`'s lock and socket: its name, readable, and a
/// hash of its canonical path, stable across builds so `audit` finds the socket.
fn base_name(driver: &Path) -> String {
    // The directory is canonicalised, not the file: the simulator removes its socket file once
    // the broker is connected, and the name must stay the same for `audit`.
    let abs = std::path::absolute(driver).unwrap_or_else(|_| driver.to_owned());
    let canonical = match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(file)) => std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_owned())
            .join(file),
        _ => abs.clone(),
    };
    let file: String = abs
        .file_name()
        .map(|f| f.to_string_lossy().chars().take(32).collect())
        .unwrap_or_default();
    // FNV-1a
    let hash = canonical
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    format!("{file}-{hash:016x}")
}

/// Where the control socket for `driver` is.
pub fn socket_path(run_dir: &Path, driver: &Path) -> PathBuf {
    run_dir.join(format!("{}.sock", base_name(driver)))
}

fn unix_addr(path: &Path) -> Result<UnixAddr> {
    UnixAddr::new(path).with_context(|| {
        format!(
            "{}: too long for a Unix socket; use a shorter --run-dir",
            path.display()
        )
    })
}

/// The broker's end: holds the single-instance lock and serves audits.
pub struct Control {
    /// Woken by the listener and by pending connections; the bridge loop waits on this.
    wakeup: Epoll,
    listener: OwnedFd,
    pending: VecDeque<(OwnedFd, Instant)>,
    refusals: LogBudget,
    /// The socket's file name in `run`.
    name: String,
    run: RunDir,
    _lock: File,
}

/// Takes the single-instance lock for `driver` and listens for audits.
pub fn listen_on(run: RunDir, driver: &Path) -> Result<Control> {
    let base = base_name(driver);
    let Some(lock) = run.lock(&format!("{base}.lock"), false)? else {
        bail!(
            "another hvisor-broker is already serving {}",
            driver.display()
        );
    };
    let name = format!("{base}.sock");
    run.remove(&name);
    let path = run.path().join(&name);
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&listener),
        &unix_addr(&path)?,
    )
    .with_context(|| format!("binding the control socket {}", path.display()))?;
    listen(&listener, Backlog::new(ACCEPT_PER_WAKEUP as i32)?)?;
    let wakeup = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    wakeup.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
    Ok(Control {
        wakeup,
        listener,
        pending: VecDeque::new(),
        refusals: LogBudget::control(),
        name,
        run,
        _lock: lock,
    })
}

impl AsFd for Control {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.wakeup.0.as_fd()
    }
}

impl Control {
    /// The run directory it holds its lock in.
    pub fn run_dir(&self) -> &RunDir {
        &self.run
    }

    /// Takes a few new connections and answers `answer()` to every complete audit request.
    /// Never blocks.
    pub fn serve(&mut self, answer: impl FnOnce() -> String) {
        let now = Instant::now();
        for _ in 0..ACCEPT_PER_WAKEUP {
            match accept4(
                &self.listener,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(conn) => self.admit(conn, now),
                Err(Errno::EINTR) | Err(Errno::ECONNABORTED) => {}
                Err(_) => break,
            }
        }
        self.answer_pending(now, answer);
    }

    /// Answers each pending connection whose request has arrived; drops those that sent
    /// something else, hung up or took too long.
    fn answer_pending(&mut self, now: Instant, answer: impl FnOnce() -> String) {
        let mut answer = Some(answer);
        let mut text = None;
        for (conn, since) in std::mem::take(&mut self.pending) {
            let mut buf = [0u8; 64];
            match recv_raw(conn.as_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok((n, _)) if buf[..n] == *audit_request().as_bytes() => {
                    let text = text.get_or_insert_with(|| {
                        let report = answer.take().map(|f| f()).unwrap_or_default();
                        format!("{MAGIC}\n{report}")
                    });
                    let _ = send_raw(
                        conn.as_fd(),
                        text.as_bytes(),
                        &[],
                        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                    );
                }
                Ok(_) => self.refuse(format_args!("a request it does not know")),
                Err(protocol::ChannelError::Io(Errno::EAGAIN)) if now - since < REQUEST_TIME => {
                    self.pending.push_back((conn, since));
                    continue;
                }
                Err(_) => {}
            }
            let _ = self.wakeup.delete(&conn);
        }
    }

    /// Keeps a root connection until its request arrives; refuses anyone else at once.
    fn admit(&mut self, conn: OwnedFd, now: Instant) {
        match getsockopt(&conn, sockopt::PeerCredentials) {
            Ok(cred) if cred.uid() == 0 => {}
            Ok(cred) => {
                let (uid, pid) = (cred.uid(), cred.pid());
                return self.refuse(format_args!("uid {uid} (pid {pid}): only root may ask"));
            }
            Err(e) => return self.refuse(format_args!("a peer it cannot identify ({e})")),
        }
        if self.pending.len() >= MAX_PENDING {
            if let Some((old, _)) = self.pending.pop_front() {
                let _ = self.wakeup.delete(&old);
            }
        }
        if self
            .wakeup
            .add(&conn, EpollEvent::new(EpollFlags::EPOLLIN, 0))
            .is_ok()
        {
            self.pending.push_back((conn, now));
        }
    }

    fn refuse(&mut self, what: std::fmt::Arguments) {
        self.refusals.log(
            log::Level::Warn,
            "control socket",
            format_args!("refused {what}"),
        );
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.refusals.flush("control socket");
        // Still under the lock: no other broker owns this name yet.
        self.run.remove(&self.name);
    }
}

/// Asks the broker serving `driver` for its audit (JSON), after making sure it is one.
pub fn request_audit(run_dir: &Path, driver: &Path) -> Result<String> {
    if !nix::unistd::geteuid().is_root() {
        bail!("audits are for root only");
    }
    let run = RunDir::open(run_dir)
        .with_context(|| format!("no hvisor-broker is serving {}", driver.display()))?;
    let path = socket_path(run.path(), driver);
    let sock = seqpacket_socket()?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &unix_addr(&path)?).with_context(|| {
        format!(
            "no hvisor-broker is serving {} ({})",
            driver.display(),
            path.display()
        )
    })?;
    let pid = check_peer(&sock, &path)?;
    send_raw(
        sock.as_fd(),
        audit_request().as_bytes(),
        &[],
        MsgFlags::MSG_NOSIGNAL,
    )?;
    wait_readable(sock.as_fd(), Duration::from_secs(5))
        .context("waiting for the broker's answer")?;
    let mut buf = vec![0u8; MAX_ANSWER + 1];
    let (n, _) = recv_raw(sock.as_fd(), &mut buf, MsgFlags::empty())
        .context("the broker hung up without answering")?;
    buf.truncate(n);
    let text = String::from_utf8_lossy(&buf);
    let Some(report) = text.strip_prefix(&format!("{MAGIC}\n")) else {
        bail!(
            "{} does not speak hvisor-broker's control protocol ({MAGIC}); not reading it",
            path.display()
        );
    };
    let claimed = serde_json::from_str::<serde_json::Value>(report)
        .ok()
        .and_then(|v| v["broker_pid"].as_i64());
    if claimed != Some(pid as i64) {
        bail!(
            "the answer from pid {pid} on {} names another broker ({claimed:?}); not reading it",
            path.display()
        );
    }
    Ok(report.to_owned())
}

/// The pid of the server on `sock`, once it is known to be root running hvisor-broker.
fn check_peer(sock: &OwnedFd, path: &Path) -> Result<i32> {
    let cred = getsockopt(sock, sockopt::PeerCredentials)?;
    if cred.uid() != 0 {
        bail!(
            "{} is served by uid {} (pid {}), not root: not an hvisor-broker; not asking it",
            path.display(),
            cred.uid(),
            cred.pid()
        );
    }
    let exe = std::fs::read_link(format!("/proc/{}/exe", cred.pid())).unwrap_or_default();
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned());
    let name = name.as_deref().unwrap_or("");
    if name.trim_end_matches(" (deleted)") != "hvisor-broker" {
        bail!(
            "{} is served by pid {} running {:?}, not hvisor-broker; not asking it",
            path.display(),
            cred.pid(),
            exe
        );
    }
    Ok(cred.pid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_are_stable_and_bounded() {
        let a = base_name(Path::new("/dev/hvisor"));
        assert_eq!(a, base_name(Path::new("/dev/../dev/hvisor")));
        assert!(a.starts_with("hvisor-"), "{a}");
        assert_ne!(a, base_name(Path::new("/dev/hvisor2")));
        let long = "x".repeat(300);
        assert!(base_name(Path::new(&long)).len() <= 32 + 17);
    }
}
