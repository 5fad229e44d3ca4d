//! The control socket and the single-instance lock, both in the root-only run directory
//! ([`crate::rundir`]) under a name derived from the driver: the lock is a `flock` (released by
//! the kernel whenever the broker exits), the socket answers `hvisor-broker audit`, `status`,
//! `restart-worker` and `zone add|remove|list` for root.
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
use protocol::{Bucket, Flow, Limit};

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

/// The longest request: a zone file's path fits.
const MAX_REQUEST: usize = 4352;
/// How long a client waits for the answer (a zone removal waits for its workers to end).
const ANSWER_TIME: Duration = Duration::from_secs(30);

/// What a control client may ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The audit (JSON).
    Audit,
    /// Counters and usage per device (JSON).
    Status,
    /// Replace the worker of DEVICE (`blk@0xa003c00`, or its address) of zone ZONE.
    RestartWorker { zone: u32, device: String },
    /// Set the rate limit of a flow of DEVICE (`None`: the device's only flow).
    RateLimit {
        zone: u32,
        device: String,
        flow: Option<Flow>,
        limit: Limit,
    },
    /// Serve the zones of the file at PATH (absolute) beside the running ones.
    ZoneAdd { path: PathBuf },
    /// Stop serving zone ZONE; answered once its workers have ended and its resources are
    /// released.
    ZoneRemove { zone: u32 },
    /// The zones served, their devices and state (JSON).
    ZoneList,
}

/// `rate 1000 burst 100`, or `-` for no bucket.
fn bucket_text(b: Option<Bucket>) -> String {
    b.map_or("-".into(), |b| format!("{} {}", b.rate, b.burst))
}

/// The reverse of [`bucket_text`], as two words or one `-`; checked like the config's.
fn parse_bucket<'a>(words: &mut impl Iterator<Item = &'a str>) -> Option<Option<Bucket>> {
    match words.next()? {
        "-" => Some(None),
        rate => {
            let burst = words.next()?.parse().ok()?;
            Bucket::new(rate.parse().ok()?, Some(burst)).ok().map(Some)
        }
    }
}

fn parse_flow(word: &str) -> Option<Option<Flow>> {
    match word {
        "-" => Some(None),
        _ => Flow::from_name(word).map(Some),
    }
}

impl Request {
    /// The request as it travels on the socket.
    pub fn text(&self) -> String {
        match self {
            Request::Audit => format!("{MAGIC} audit"),
            Request::Status => format!("{MAGIC} status"),
            Request::RestartWorker { zone, device } => {
                format!("{MAGIC} restart-worker {zone} {device}")
            }
            Request::RateLimit {
                zone,
                device,
                flow,
                limit,
            } => format!(
                "{MAGIC} rate-limit {zone} {device} {} {} {}",
                flow.map_or("-", Flow::name),
                bucket_text(limit.bytes),
                bucket_text(limit.ops)
            ),
            Request::ZoneAdd { path } => format!("{MAGIC} zone-add {}", path.display()),
            Request::ZoneRemove { zone } => format!("{MAGIC} zone-remove {zone}"),
            Request::ZoneList => format!("{MAGIC} zone-list"),
        }
    }

    /// The request a client sent, if it is one this broker knows.
    pub fn parse(bytes: &[u8]) -> Option<Request> {
        let text = std::str::from_utf8(bytes).ok()?.strip_prefix(MAGIC)?;
        // The path is the rest of the line: it may hold spaces.
        if let Some(path) = text.strip_prefix(" zone-add /") {
            let path = PathBuf::from(format!("/{path}"));
            return (!path.as_os_str().is_empty()).then_some(Request::ZoneAdd { path });
        }
        let words: Vec<&str> = text.split(' ').skip(1).collect();
        match words.as_slice() {
            ["audit"] => Some(Request::Audit),
            ["status"] => Some(Request::Status),
            ["restart-worker", zone, device] if device.len() <= 64 => {
                Some(Request::RestartWorker {
                    zone: zone.parse().ok()?,
                    device: device.to_string(),
                })
            }
            ["rate-limit", zone, device, flow, rest @ ..] if device.len() <= 64 => {
                let mut rest = rest.iter().copied();
                let limit = Limit {
                    bytes: parse_bucket(&mut rest)?,
                    ops: parse_bucket(&mut rest)?,
                };
                if rest.next().is_some() {
                    return None;
                }
                Some(Request::RateLimit {
                    zone: zone.parse().ok()?,
                    device: device.to_string(),
                    flow: parse_flow(flow)?,
                    limit,
                })
            }
            ["zone-remove", zone] => Some(Request::ZoneRemove {
                zone: zone.parse().ok()?,
            }),
            ["zone-list"] => Some(Request::ZoneList),
            _ => None,
        }
    }
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

    /// Takes a few new connections and returns every complete request, with the connection
    /// to [`reply`](Self::reply) on. Never blocks.
    pub fn serve(&mut self) -> Vec<(OwnedFd, Request)> {
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
        self.take_requests(now)
    }

    /// Sends `answer` on a connection [`serve`](Self::serve) returned, and closes it.
    pub fn reply(&self, conn: OwnedFd, answer: &str) {
        let text = format!("{MAGIC}\n{answer}");
        let _ = send_raw(
            conn.as_fd(),
            text.as_bytes(),
            &[],
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        );
        let _ = self.wakeup.delete(&conn);
    }

    /// The pending connections whose request has arrived; drops those that sent something
    /// else, hung up or took too long.
    fn take_requests(&mut self, now: Instant) -> Vec<(OwnedFd, Request)> {
        let mut out = Vec::new();
        for (conn, since) in std::mem::take(&mut self.pending) {
            let mut buf = [0u8; MAX_REQUEST];
            match recv_raw(conn.as_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok((n, _)) => match Request::parse(&buf[..n]) {
                    Some(req) => {
                        // Its answer may wait (a zone removal): a hang-up meanwhile must not
                        // keep the loop awake.
                        let _ = self.wakeup.delete(&conn);
                        out.push((conn, req));
                        continue;
                    }
                    None => self.refuse(format_args!("a request it does not know")),
                },
                Err(protocol::ChannelError::Io(Errno::EAGAIN)) if now - since < REQUEST_TIME => {
                    self.pending.push_back((conn, since));
                    continue;
                }
                Err(_) => {}
            }
            let _ = self.wakeup.delete(&conn);
        }
        out
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
    request(run_dir, driver, &Request::Audit)
}

/// Asks the broker serving `driver` for its devices' status.
pub fn request_status(run_dir: &Path, driver: &Path) -> Result<crate::status::Report> {
    if !nix::unistd::geteuid().is_root() {
        bail!("status is for root only");
    }
    let text = request(run_dir, driver, &Request::Status)?;
    serde_json::from_str(&text).context("unreadable answer")
}

/// Asks the broker serving `driver` to replace a worker; returns its answer, or its refusal
/// as an error.
pub fn request_restart(run_dir: &Path, driver: &Path, zone: u32, device: &str) -> Result<String> {
    let req = Request::RestartWorker {
        zone,
        device: device.to_string(),
    };
    request_action(run_dir, driver, &req)
}

/// Asks the broker serving `driver` to set a rate limit; returns its answer, or its refusal
/// as an error.
pub fn request_rate_limit(
    run_dir: &Path,
    driver: &Path,
    zone: u32,
    device: &str,
    flow: Option<Flow>,
    limit: Limit,
) -> Result<String> {
    let req = Request::RateLimit {
        zone,
        device: device.to_string(),
        flow,
        limit,
    };
    request_action(run_dir, driver, &req)
}

/// Asks the broker serving `driver` to add the zones of `file`, or to remove a zone.
pub fn request_zone_change(run_dir: &Path, driver: &Path, req: &Request) -> Result<String> {
    let req = match req {
        Request::ZoneAdd { path } => Request::ZoneAdd {
            // The broker reads the file: relative to where the client is.
            path: std::path::absolute(path)
                .with_context(|| format!("{}: no absolute path", path.display()))?,
        },
        other => other.clone(),
    };
    request_action(run_dir, driver, &req)
}

/// Asks the broker serving `driver` for its zones (JSON).
pub fn request_zone_list(run_dir: &Path, driver: &Path) -> Result<serde_json::Value> {
    if !nix::unistd::geteuid().is_root() {
        bail!("zone lists are for root only");
    }
    let text = request(run_dir, driver, &Request::ZoneList)?;
    serde_json::from_str(&text).context("unreadable answer")
}

/// The answer to a request for a change: whether it was made, and what was done or wrong.
pub fn action_answer(ok: bool, message: &str) -> String {
    serde_json::json!({
        "broker_pid": std::process::id(),
        "ok": ok,
        "message": message,
    })
    .to_string()
}

/// Sends a request answered with `ok` and `message`; returns the message, or a refusal as an
/// error.
fn request_action(run_dir: &Path, driver: &Path, req: &Request) -> Result<String> {
    if !nix::unistd::geteuid().is_root() {
        bail!("only root may ask the broker for changes");
    }
    let answer: serde_json::Value = serde_json::from_str(&request(run_dir, driver, req)?)?;
    let message = answer["message"].as_str().unwrap_or_default().to_string();
    if answer["ok"] != true {
        bail!("{message}");
    }
    Ok(message)
}

/// Sends `req` to the broker serving `driver` once it is known to be one, and returns its
/// answer (JSON naming the broker's pid).
fn request(run_dir: &Path, driver: &Path, req: &Request) -> Result<String> {
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
        req.text().as_bytes(),
        &[],
        MsgFlags::MSG_NOSIGNAL,
    )?;
    wait_readable(sock.as_fd(), ANSWER_TIME).context("waiting for the broker's answer")?;
    let mut buf = vec![0u8; MAX_ANSWER + 1];
    let (n, _) = recv_raw(sock.as_fd(), &mut buf, MsgFlags::empty())
        .context("the broker hung up without answering")?;
    buf.truncate(n);
    // The broker closes its end right after answering. Waiting for that means whoever asked
    // next (say, counting the broker's fds) finds nothing left of this connection.
    let _ = wait_readable(sock.as_fd(), Duration::from_secs(1));
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
    fn requests_round_trip_and_nothing_else_parses() {
        for req in [
            Request::Audit,
            Request::Status,
            Request::RestartWorker {
                zone: 1,
                device: "blk@0xa003c00".into(),
            },
            Request::RateLimit {
                zone: 1,
                device: "net@0xa003600".into(),
                flow: Some(Flow::Tx),
                limit: Limit {
                    bytes: Some(Bucket {
                        rate: 20 << 20,
                        burst: 1 << 20,
                    }),
                    ops: None,
                },
            },
            Request::RateLimit {
                zone: 1,
                device: "0xa003c00".into(),
                flow: None,
                limit: Limit::default(),
            },
            Request::ZoneAdd {
                path: "/etc/hvisor/zone 2.json".into(),
            },
            Request::ZoneRemove { zone: 2 },
            Request::ZoneList,
        ] {
            assert_eq!(Request::parse(req.text().as_bytes()), Some(req));
        }
        for bad in [
            "audit",
            "hvisor-broker control 1 audit ",
            "hvisor-broker control 1 restart-worker x blk",
            "hvisor-broker control 1 restart-worker 1",
            "hvisor-broker control 2 audit",
            "hvisor-broker control 1 rate-limit 1 blk - -",
            "hvisor-broker control 1 rate-limit 1 blk - - - -",
            "hvisor-broker control 1 rate-limit 1 blk up - -",
            "hvisor-broker control 1 rate-limit 1 blk - 0 10 -",
            "hvisor-broker control 1 rate-limit 1 blk - 10 0 -",
            "hvisor-broker control 1 rate-limit 1 blk - 10 -",
            "hvisor-broker control 1 rate-limit 1 blk - 10 x -",
            "hvisor-broker control 1 rate-limit 1 blk - 281474976710657 1 -",
            "hvisor-broker control 1 zone-add zone2.json",
            "hvisor-broker control 1 zone-remove two",
        ] {
            assert_eq!(Request::parse(bad.as_bytes()), None, "{bad}");
        }
    }

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
