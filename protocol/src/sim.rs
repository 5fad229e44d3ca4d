//! The handshake of the simulated `/dev/hvisor` (sim-protocol v1). Fixed: independent tools
//! speak it.

use std::os::fd::{BorrowedFd, OwnedFd};

use nix::sys::socket::MsgFlags;

use crate::channel::{recv_raw, send_raw, ChannelError};

pub const MAGIC: &[u8; 8] = b"HVSIM001";
pub const ERR_MAGIC: &[u8; 8] = b"HVSIMERR";
/// INIT flag: the driver before February 2026, which wakes the daemon with SIGUSR1.
pub const SIGNAL_WAKEUP: u32 = 1;

/// Broker -> simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Init {
    pub flags: u32,
    pub tid: u32,
}

/// Simulator -> broker: READY (fds: bridge, physical memory, finish eventfd) or ERROR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Ready { phys_size: u64, max_cpus: u32 },
    Error { errno: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Channel(#[from] ChannelError),
    #[error("bad handshake message: {0}")]
    Bad(String),
}

pub fn send_init(
    sock: BorrowedFd<'_>,
    init: Init,
    eventfd: Option<BorrowedFd<'_>>,
) -> Result<(), HandshakeError> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&init.flags.to_le_bytes());
    b.extend_from_slice(&init.tid.to_le_bytes());
    let fds: Vec<BorrowedFd> = eventfd.into_iter().collect();
    send_raw(sock, &b, &fds, MsgFlags::MSG_NOSIGNAL)?;
    Ok(())
}

/// Reads an INIT and checks it carries exactly the fds its flags call for.
pub fn recv_init(sock: BorrowedFd<'_>) -> Result<(Init, Option<OwnedFd>), HandshakeError> {
    let mut buf = [0u8; 64];
    let (n, mut fds) = recv_raw(sock, &mut buf, MsgFlags::empty())?;
    if n != 16 || &buf[..8] != MAGIC {
        return Err(HandshakeError::Bad(format!(
            "INIT of {n} bytes or wrong magic"
        )));
    }
    let flags = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    let tid = u32::from_le_bytes(buf[12..16].try_into().unwrap());
    let want = if flags & SIGNAL_WAKEUP != 0 { 0 } else { 1 };
    if fds.len() != want {
        return Err(HandshakeError::Bad(format!(
            "INIT with {} fds, expected {want}",
            fds.len()
        )));
    }
    Ok((Init { flags, tid }, fds.pop()))
}

pub fn send_reply(
    sock: BorrowedFd<'_>,
    reply: Reply,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandshakeError> {
    let mut b = Vec::with_capacity(24);
    match reply {
        Reply::Ready {
            phys_size,
            max_cpus,
        } => {
            b.extend_from_slice(MAGIC);
            b.extend_from_slice(&phys_size.to_le_bytes());
            b.extend_from_slice(&max_cpus.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        Reply::Error { errno } => {
            b.extend_from_slice(ERR_MAGIC);
            b.extend_from_slice(&errno.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
    }
    send_raw(sock, &b, fds, MsgFlags::MSG_NOSIGNAL)?;
    Ok(())
}

/// Reads READY (with exactly three fds) or ERROR (with none).
pub fn recv_reply(sock: BorrowedFd<'_>) -> Result<(Reply, Vec<OwnedFd>), HandshakeError> {
    let mut buf = [0u8; 64];
    let (n, fds) = recv_raw(sock, &mut buf, MsgFlags::empty())?;
    if n == 24 && &buf[..8] == MAGIC {
        if fds.len() != 3 {
            return Err(HandshakeError::Bad(format!(
                "READY with {} fds, expected 3",
                fds.len()
            )));
        }
        let phys_size = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        let max_cpus = u32::from_le_bytes(buf[16..20].try_into().unwrap());
        return Ok((
            Reply::Ready {
                phys_size,
                max_cpus,
            },
            fds,
        ));
    }
    if n == 16 && &buf[..8] == ERR_MAGIC && fds.is_empty() {
        let errno = u32::from_le_bytes(buf[8..12].try_into().unwrap());
        return Ok((Reply::Error { errno }, fds));
    }
    Err(HandshakeError::Bad(format!(
        "reply of {n} bytes with {} fds",
        fds.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Channel;
    use std::os::fd::AsFd;

    #[test]
    fn init_and_replies_round_trip() {
        let (a, b) = Channel::pair().unwrap();
        send_init(
            a.as_fd(),
            Init {
                flags: SIGNAL_WAKEUP,
                tid: 42,
            },
            None,
        )
        .unwrap();
        let (init, fd) = recv_init(b.as_fd()).unwrap();
        assert_eq!(
            init,
            Init {
                flags: SIGNAL_WAKEUP,
                tid: 42
            }
        );
        assert!(fd.is_none());

        send_reply(b.as_fd(), Reply::Error { errno: 22 }, &[]).unwrap();
        assert_eq!(recv_reply(a.as_fd()).unwrap().0, Reply::Error { errno: 22 });

        let f = a.as_fd();
        send_reply(
            b.as_fd(),
            Reply::Ready {
                phys_size: 1 << 30,
                max_cpus: 32,
            },
            &[f, f, f],
        )
        .unwrap();
        let (r, fds) = recv_reply(a.as_fd()).unwrap();
        assert_eq!(
            r,
            Reply::Ready {
                phys_size: 1 << 30,
                max_cpus: 32
            }
        );
        assert_eq!(fds.len(), 3);
    }

    #[test]
    fn eventfd_init_without_fd_is_refused() {
        let (a, b) = Channel::pair().unwrap();
        send_init(a.as_fd(), Init { flags: 0, tid: 0 }, None).unwrap();
        assert!(recv_init(b.as_fd()).is_err());
        send_reply(
            b.as_fd(),
            Reply::Ready {
                phys_size: 0,
                max_cpus: 32,
            },
            &[],
        )
        .unwrap();
        assert!(recv_reply(a.as_fd()).is_err());
    }
}
