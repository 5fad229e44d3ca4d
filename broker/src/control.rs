//! The control socket: an abstract Unix socket named after the driver. Binding it is the
//! single-instance lock (released by the kernel when the broker exits, no file system needed);
//! listening on it serves `hvisor-broker audit` to root only.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, sockopt, Backlog, MsgFlags, SockFlag, UnixAddr,
};
use protocol::channel::{recv_raw, send_raw, seqpacket_socket, wait_readable};

/// The one request there is.
pub const AUDIT: &[u8] = b"audit";
/// The largest answer (SEQPACKET keeps it one message).
const MAX_ANSWER: usize = 1 << 20;

fn address(driver: &Path) -> Result<UnixAddr> {
    // The directory is canonicalised, not the file: the simulator removes its socket file once
    // the broker is connected, and the name must stay the same for `audit`.
    let abs = std::path::absolute(driver).unwrap_or_else(|_| driver.to_owned());
    let canonical = match (abs.parent(), abs.file_name()) {
        (Some(dir), Some(file)) => std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_owned())
            .join(file),
        _ => abs.clone(),
    };
    let mut name = format!("hvisor-broker:{}", canonical.display());
    if name.len() > 100 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        canonical.hash(&mut h);
        name = format!("hvisor-broker:{:016x}", h.finish());
    }
    Ok(UnixAddr::new_abstract(name.as_bytes())?)
}

/// Takes the single-instance lock for `driver` and listens for audits.
pub fn listen_on(driver: &Path) -> Result<OwnedFd> {
    let sock = seqpacket_socket()?;
    match bind(sock.as_raw_fd(), &address(driver)?) {
        Ok(()) => {}
        Err(nix::errno::Errno::EADDRINUSE) => {
            bail!(
                "another hvisor-broker is already serving {}",
                driver.display()
            )
        }
        Err(e) => return Err(e).context("taking the single-instance lock"),
    }
    listen(&sock, Backlog::new(4)?)?;
    // SAFETY: F_SETFL on a socket we own.
    unsafe {
        let fl = libc::fcntl(sock.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(sock.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok(sock)
}

/// Takes one pending connection: answers `answer()` to root's audit request; anyone else is
/// hung up on. Never blocks the bridge loop for long (a silent client gets 100 ms).
pub fn serve_one(listener: &OwnedFd, answer: impl FnOnce() -> String) {
    let Ok(conn) = accept4(listener, SockFlag::SOCK_CLOEXEC) else {
        return;
    };
    match getsockopt(&conn, sockopt::PeerCredentials) {
        Ok(cred) if cred.uid() == 0 => {}
        Ok(cred) => {
            log::warn!(
                "refused an audit request from uid {} (pid {})",
                cred.uid(),
                cred.pid()
            );
            return;
        }
        Err(_) => return,
    }
    let mut buf = [0u8; 64];
    if wait_readable(std::os::fd::AsFd::as_fd(&conn), Duration::from_millis(100)).is_err() {
        return;
    }
    let Ok((n, _)) = recv_raw(
        std::os::fd::AsFd::as_fd(&conn),
        &mut buf,
        MsgFlags::MSG_DONTWAIT,
    ) else {
        return;
    };
    if &buf[..n] != AUDIT {
        return;
    }
    let text = answer();
    let _ = send_raw(
        std::os::fd::AsFd::as_fd(&conn),
        text.as_bytes(),
        &[],
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
    );
}

/// Asks the broker serving `driver` for its audit (JSON).
pub fn request_audit(driver: &Path) -> Result<String> {
    let sock = seqpacket_socket()?;
    connect(sock.as_raw_fd(), &address(driver)?).with_context(|| {
        format!(
            "no hvisor-broker is serving {} (or it is not reachable from here)",
            driver.display()
        )
    })?;
    send_raw(
        std::os::fd::AsFd::as_fd(&sock),
        AUDIT,
        &[],
        MsgFlags::MSG_NOSIGNAL,
    )?;
    wait_readable(std::os::fd::AsFd::as_fd(&sock), Duration::from_secs(5))
        .context("waiting for the broker's answer")?;
    let mut buf = vec![0u8; MAX_ANSWER + 1];
    let (n, _) = recv_raw(std::os::fd::AsFd::as_fd(&sock), &mut buf, MsgFlags::empty())
        .context("the broker hung up: audits are for root only")?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}
