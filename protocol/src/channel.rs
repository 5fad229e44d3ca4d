//! One message per `SOCK_SEQPACKET` datagram, with fds attached over `SCM_RIGHTS`.
//!
//! SEQPACKET keeps message boundaries and ties fds to the message they travel with. Received fds
//! are close-on-exec (`MSG_CMSG_CLOEXEC`) and owned at once; truncated data or control data is
//! an error, never a silently shorter message.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::msg::{self, FdCount};

/// The most fds one message may carry.
pub const MAX_FDS: usize = 16;
/// The most fds Linux passes in one message.
const SCM_MAX_FD: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("peer closed the connection")]
    Eof,
    #[error("no message within {0:?}")]
    Timeout(Duration),
    #[error("message truncated (larger than {0} bytes)")]
    Truncated(usize),
    #[error("control data truncated: fds were dropped")]
    ControlTruncated,
    #[error("message carries {got} fds, expected {expected}")]
    FdCount { got: usize, expected: usize },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("message too large to send: {0}")]
    Encode(String),
    #[error("socket: {0}")]
    Io(#[from] Errno),
}

/// A connected SEQPACKET socket.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair, both ends close-on-exec.
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    pub fn from_fd(fd: OwnedFd) -> Self {
        Channel { fd }
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Encodes and sends one message with its fds. `nonblocking` turns a full socket buffer
    /// into `Io(EAGAIN)` instead of a wait.
    pub fn send<T: Serialize>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
        nonblocking: bool,
    ) -> Result<(), ChannelError> {
        let bytes = msg::encode(msg)?;
        let mut flags = MsgFlags::MSG_NOSIGNAL;
        if nonblocking {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        send_raw(self.fd.as_fd(), &bytes, fds, flags)
    }

    /// Receives one message, checking that it carries exactly the fds its type announces.
    pub fn recv<T: DeserializeOwned + FdCount>(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        if let Some(t) = timeout {
            wait_readable(self.fd.as_fd(), t)?;
        }
        let mut buf = vec![0u8; msg::MAX_MESSAGE + 1];
        let (len, fds) = recv_raw(self.fd.as_fd(), &mut buf, MsgFlags::empty())?;
        let msg = decode_checked(&buf[..len], fds.len())?;
        Ok((msg, fds))
    }

    /// Like [`Self::recv`] but returns `Ok(None)` at once when nothing is queued.
    pub fn try_recv<T: DeserializeOwned + FdCount>(
        &self,
    ) -> Result<Option<(T, Vec<OwnedFd>)>, ChannelError> {
        match self.recv(Some(Duration::ZERO)) {
            Err(ChannelError::Timeout(_)) => Ok(None),
            other => other.map(Some),
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Decodes one received datagram of `bytes` that carried `fds` fds, refusing any fd count
/// other than the one its type announces.
pub fn decode_checked<T: DeserializeOwned + FdCount>(
    bytes: &[u8],
    fds: usize,
) -> Result<T, ChannelError> {
    let msg: T = msg::decode(bytes)?;
    let expected = msg.fd_count();
    if fds != expected {
        return Err(ChannelError::FdCount { got: fds, expected });
    }
    Ok(msg)
}

/// An unconnected close-on-exec `AF_UNIX` `SOCK_SEQPACKET` socket.
pub fn seqpacket_socket() -> nix::Result<OwnedFd> {
    nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Waits until `fd` is readable (or hung up) for at most `timeout`.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(), ChannelError> {
    let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32)
        .unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, ms) {
            Ok(0) => return Err(ChannelError::Timeout(timeout)),
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends one datagram with fds attached.
pub fn send_raw(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: MsgFlags,
) -> Result<(), ChannelError> {
    if fds.len() > MAX_FDS {
        return Err(ChannelError::Encode(format!(
            "{} fds (at most {MAX_FDS})",
            fds.len()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(bytes)];
    loop {
        match sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(ChannelError::Encode("short send".into())),
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(ChannelError::Eof),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one datagram into `buf`; returns its length and the fds it carried (owned,
/// close-on-exec). A datagram that does not fit, or whose fds were cut, is an error (its fds
/// are closed).
pub fn recv_raw(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> Result<(usize, Vec<OwnedFd>), ChannelError> {
    // Room for as many fds as the kernel passes in one message (SCM_MAX_FD), so that extra fds
    // arrive owned and are closed on refusal instead of being cut off by the kernel.
    let mut cmsg_buf = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let cap = buf.len();
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            flags | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            Err(Errno::ECONNRESET) => return Err(ChannelError::Eof),
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    // nix refuses to walk truncated control data (ENOBUFS).
    let cmsgs = msg.cmsgs().map_err(|_| ChannelError::ControlTruncated)?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(received) = c {
            for r in received {
                // SAFETY: the kernel just installed `r` in our table for this message; nothing
                // else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(ChannelError::ControlTruncated);
    }
    if fds.len() > MAX_FDS {
        return Err(ChannelError::FdCount {
            got: fds.len(),
            expected: MAX_FDS,
        });
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.bytes >= cap {
        return Err(ChannelError::Truncated(cap - 1));
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Err(ChannelError::Eof);
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{BrokerMsg, WorkerMsg};
    use std::io::{Read, Seek, Write};

    #[test]
    fn message_and_fd_round_trip() {
        let (a, b) = Channel::pair().unwrap();
        let mut f = tempfile_in_memory();
        f.write_all(b"payload").unwrap();
        a.send(&WorkerMsg::Ready { version: 1, pid: 7 }, &[], false)
            .unwrap();
        let (m, fds) = b.recv::<WorkerMsg>(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(m, WorkerMsg::Ready { version: 1, pid: 7 });
        assert!(fds.is_empty());

        a.send(&BrokerMsg::Reset, &[], false).unwrap();
        assert!(matches!(
            b.recv::<BrokerMsg>(None).unwrap().0,
            BrokerMsg::Reset
        ));

        // an fd travels and stays usable
        let raw = [f.as_fd()];
        send_raw(a.as_fd(), b"x", &raw, MsgFlags::empty()).unwrap();
        let mut buf = [0u8; 8];
        let (n, mut fds) = recv_raw(b.as_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(n, 1);
        let mut got = std::fs::File::from(fds.pop().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "payload");
    }

    #[test]
    fn wrong_fd_count_is_refused() {
        let (a, b) = Channel::pair().unwrap();
        let f = tempfile_in_memory();
        let bytes = msg::encode(&BrokerMsg::Reset).unwrap();
        send_raw(a.as_fd(), &bytes, &[f.as_fd()], MsgFlags::empty()).unwrap();
        match b.recv::<BrokerMsg>(None) {
            Err(ChannelError::FdCount {
                got: 1,
                expected: 0,
            }) => {}
            other => panic!("expected an fd count error, got {other:?}"),
        }
    }

    #[test]
    fn more_fds_than_a_message_may_carry_are_refused() {
        let (a, b) = Channel::pair().unwrap();
        let f = tempfile_in_memory();
        // more fds than our receiver makes room for (send_raw itself would refuse them)
        let raw: Vec<RawFd> = (0..MAX_FDS + 4).map(|_| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut buf = [0u8; 8];
        let r = recv_raw(b.as_fd(), &mut buf, MsgFlags::empty());
        assert!(
            matches!(r, Err(ChannelError::FdCount { got: 20, .. })),
            "{r:?}"
        );
        // and through our own receiver: a message larger than the buffer
        send_raw(a.as_fd(), &[0u8; 64], &[], MsgFlags::empty()).unwrap();
        let mut tiny = [0u8; 16];
        assert!(matches!(
            recv_raw(b.as_fd(), &mut tiny, MsgFlags::empty()),
            Err(ChannelError::Truncated(_))
        ));
    }

    #[test]
    fn garbage_and_oversize_are_errors_not_panics() {
        let (a, b) = Channel::pair().unwrap();
        send_raw(a.as_fd(), &[0xff; 40], &[], MsgFlags::empty()).unwrap();
        assert!(matches!(
            b.recv::<BrokerMsg>(None),
            Err(ChannelError::Decode(_))
        ));
        send_raw(
            a.as_fd(),
            &vec![0u8; msg::MAX_MESSAGE + 10],
            &[],
            MsgFlags::empty(),
        )
        .unwrap();
        assert!(matches!(
            b.recv::<BrokerMsg>(None),
            Err(ChannelError::Truncated(_))
        ));
        let huge = BrokerMsg::ConfigWrite {
            offset: 0,
            data: vec![1; msg::MAX_MESSAGE],
        };
        assert!(matches!(
            a.send(&huge, &[], false),
            Err(ChannelError::Encode(_))
        ));
    }

    #[test]
    fn timeout_and_eof() {
        let (a, b) = Channel::pair().unwrap();
        assert!(matches!(
            b.recv::<BrokerMsg>(Some(Duration::from_millis(10))),
            Err(ChannelError::Timeout(_))
        ));
        assert!(b.try_recv::<BrokerMsg>().unwrap().is_none());
        drop(a);
        assert!(matches!(b.recv::<BrokerMsg>(None), Err(ChannelError::Eof)));
    }

    fn tempfile_in_memory() -> std::fs::File {
        let fd =
            nix::sys::memfd::memfd_create("channel-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        std::fs::File::from(fd)
    }
}
