//! The vhost-user wire format, as much of it as User-Mode Linux's `virtio_uml` speaks: a
//! 12-byte header (request, flags, payload size; little-endian), the payload, and fds attached
//! over `SCM_RIGHTS` to the header, on a `SOCK_STREAM` Unix socket.
//!
//! Written here rather than taken from the `vhost` crate's backend handler, which refuses
//! UML's SET_MEM_TABLE: UML always sends its two-slot region array (72 bytes of payload) with
//! `num = 1`, and the crate requires the payload to be exactly `8 + num * 32` bytes (and keeps
//! its framing `Endpoint` private). Here a payload may be longer than what it announces.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags};

/// Front-end requests (the vhost-user specification's numbering).
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const RESET_DEVICE: u32 = 34;

    /// A name for logs.
    pub fn name(code: u32) -> &'static str {
        match code {
            GET_FEATURES => "GET_FEATURES",
            SET_FEATURES => "SET_FEATURES",
            SET_OWNER => "SET_OWNER",
            RESET_OWNER => "RESET_OWNER",
            SET_MEM_TABLE => "SET_MEM_TABLE",
            SET_VRING_NUM => "SET_VRING_NUM",
            SET_VRING_ADDR => "SET_VRING_ADDR",
            SET_VRING_BASE => "SET_VRING_BASE",
            GET_VRING_BASE => "GET_VRING_BASE",
            SET_VRING_KICK => "SET_VRING_KICK",
            SET_VRING_CALL => "SET_VRING_CALL",
            SET_VRING_ERR => "SET_VRING_ERR",
            GET_PROTOCOL_FEATURES => "GET_PROTOCOL_FEATURES",
            SET_PROTOCOL_FEATURES => "SET_PROTOCOL_FEATURES",
            GET_QUEUE_NUM => "GET_QUEUE_NUM",
            SET_VRING_ENABLE => "SET_VRING_ENABLE",
            SET_BACKEND_REQ_FD => "SET_BACKEND_REQ_FD",
            GET_CONFIG => "GET_CONFIG",
            SET_CONFIG => "SET_CONFIG",
            RESET_DEVICE => "RESET_DEVICE",
            _ => "unknown",
        }
    }
}

/// Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
pub mod proto {
    pub const REPLY_ACK: u64 = 1 << 3;
    /// The back-end request channel (`SET_BACKEND_REQ_FD`). UML 6.1 needs it for more than
    /// config changes: only its setup allocates the IRQ that the queues' call fds share, and
    /// without it every queue setup fails ("genirq: Flags mismatch irq 0").
    pub const BACKEND_REQ: u64 = 1 << 5;
    pub const CONFIG: u64 = 1 << 9;
}

/// Back-end requests (on the channel of SET_BACKEND_REQ_FD).
pub mod backend_req {
    pub const CONFIG_CHANGE_MSG: u32 = 2;
}

/// Virtio feature bit 30: the back end speaks GET/SET_PROTOCOL_FEATURES (and rings start
/// disabled until SET_VRING_ENABLE).
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Bit 8 of a SET_VRING_KICK/CALL/ERR payload: no fd attached (poll instead).
pub const VRING_NOFD: u64 = 1 << 8;

const VERSION: u32 = 1;
const FLAG_REPLY: u32 = 1 << 2;
const FLAG_NEED_REPLY: u32 = 1 << 3;
const HEADER: usize = 12;
/// Larger payloads are refused (UML's largest is a config-space read of at most 256 bytes).
pub const MAX_PAYLOAD: usize = 4096;
const MAX_FDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the front end closed the connection")]
    Eof,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("socket: {0}")]
    Io(#[from] Errno),
}

/// One front-end message.
#[derive(Debug)]
pub struct Msg {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    pub fn name(&self) -> &'static str {
        req::name(self.request)
    }

    /// The front end asked for an acknowledgement (REPLY_ACK).
    pub fn needs_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    fn need(&self, len: usize) -> Result<(), WireError> {
        if self.payload.len() < len {
            return Err(WireError::Malformed(format!(
                "{} carries {} bytes, needs {len}",
                self.name(),
                self.payload.len()
            )));
        }
        Ok(())
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.payload[off..off + 4].try_into().unwrap())
    }

    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.payload[off..off + 8].try_into().unwrap())
    }

    /// A `u64` payload (features, vring index of KICK/CALL/ERR).
    pub fn u64(&self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.u64_at(0))
    }

    /// `struct vhost_vring_state`: (index, num).
    pub fn vring_state(&self) -> Result<(u32, u32), WireError> {
        self.need(8)?;
        Ok((self.u32_at(0), self.u32_at(4)))
    }

    /// `struct vhost_vring_addr`.
    pub fn vring_addr(&self) -> Result<VringAddr, WireError> {
        self.need(40)?;
        Ok(VringAddr {
            index: self.u32_at(0),
            flags: self.u32_at(4),
            desc: self.u64_at(8),
            used: self.u64_at(16),
            avail: self.u64_at(24),
            log: self.u64_at(32),
        })
    }

    /// SET_MEM_TABLE's regions. The payload may hold more slots than `num` (UML sends two).
    pub fn mem_regions(&self) -> Result<Vec<MemRegion>, WireError> {
        self.need(8)?;
        let num = self.u32_at(0) as usize;
        if num == 0 || num > MAX_FDS {
            return Err(WireError::Malformed(format!(
                "SET_MEM_TABLE with {num} regions"
            )));
        }
        self.need(8 + num * 32)?;
        Ok((0..num)
            .map(|i| {
                let o = 8 + i * 32;
                MemRegion {
                    guest_addr: self.u64_at(o),
                    size: self.u64_at(o + 8),
                    user_addr: self.u64_at(o + 16),
                    mmap_offset: self.u64_at(o + 24),
                }
            })
            .collect())
    }

    /// GET/SET_CONFIG: (offset, size, flags, data that follows).
    pub fn config(&self) -> Result<(u32, u32, u32, &[u8]), WireError> {
        self.need(12)?;
        Ok((
            self.u32_at(0),
            self.u32_at(4),
            self.u32_at(8),
            &self.payload[12..],
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringAddr {
    pub index: u32,
    pub flags: u32,
    pub desc: u64,
    pub used: u64,
    pub avail: u64,
    pub log: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

/// Reads exactly `buf.len()` bytes; the fds of the first read are returned.
fn read_full(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    want_fds: bool,
) -> Result<Vec<OwnedFd>, WireError> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            want_fds.then_some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            Err(Errno::ECONNRESET) => return Err(WireError::Eof),
            other => other?,
        };
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(received) = c {
                    for r in received {
                        // SAFETY: the kernel just installed `r` in our table; nothing else
                        // owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                    }
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(WireError::Malformed("too many fds attached".into()));
        }
        if msg.bytes == 0 {
            return Err(WireError::Eof);
        }
        got += msg.bytes;
    }
    Ok(fds)
}

/// Receives one message (blocking).
pub fn recv(sock: BorrowedFd<'_>) -> Result<Msg, WireError> {
    let mut hdr = [0u8; HEADER];
    let mut fds = read_full(sock, &mut hdr, true)?;
    let request = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
    let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
    if flags & 3 != VERSION || flags & FLAG_REPLY != 0 {
        return Err(WireError::Malformed(format!(
            "{} with flags 0x{flags:x}",
            req::name(request)
        )));
    }
    if size > MAX_PAYLOAD {
        return Err(WireError::Malformed(format!(
            "{} announces {size} bytes of payload",
            req::name(request)
        )));
    }
    let mut payload = vec![0u8; size];
    if size > 0 {
        fds.extend(read_full(sock, &mut payload, true)?);
    }
    Ok(Msg {
        request,
        flags,
        payload,
        fds,
    })
}

/// Sends the reply to `to` with `payload`.
pub fn reply(sock: BorrowedFd<'_>, to: &Msg, payload: &[u8]) -> Result<(), WireError> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&to.request.to_le_bytes());
    out.extend_from_slice(&(VERSION | FLAG_REPLY).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let mut sent = 0;
    while sent < out.len() {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&out[sent..])],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(WireError::Eof),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends a back-end request without payload, asking for no reply.
pub fn send_request(sock: BorrowedFd<'_>, request: u32) -> Result<(), WireError> {
    let mut out = Vec::with_capacity(HEADER);
    out.extend_from_slice(&request.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    match sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&out)],
        &[],
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    ) {
        Ok(n) if n == out.len() => Ok(()),
        Ok(_) => Err(WireError::Malformed("back-end request cut short".into())),
        Err(e) => Err(e.into()),
    }
}

/// Replies with a `u64`.
pub fn reply_u64(sock: BorrowedFd<'_>, to: &Msg, v: u64) -> Result<(), WireError> {
    reply(sock, to, &v.to_le_bytes())
}

/// The REPLY_ACK answer (0 success, 1 failure), when the front end asked for one.
pub fn ack(sock: BorrowedFd<'_>, to: &Msg, ok: bool) -> Result<(), WireError> {
    if to.needs_reply() {
        reply_u64(sock, to, if ok { 0 } else { 1 })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn frame(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = request.to_le_bytes().to_vec();
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn mem_table_with_spare_slots_and_replies() {
        let (mut a, b) = UnixStream::pair().unwrap();
        // UML's SET_MEM_TABLE: num = 1, two slots, NEED_REPLY.
        let mut p = vec![0u8; 8 + 2 * 32];
        p[0] = 1;
        p[8..16].copy_from_slice(&0xaa8000u64.to_le_bytes());
        p[16..24].copy_from_slice(&0x100_0000u64.to_le_bytes());
        p[24..32].copy_from_slice(&0xaa8000u64.to_le_bytes());
        p[32..40].copy_from_slice(&0xaa8000u64.to_le_bytes());
        a.write_all(&frame(req::SET_MEM_TABLE, 1 | FLAG_NEED_REPLY, &p))
            .unwrap();
        a.write_all(&frame(req::GET_FEATURES, 1, &[])).unwrap();
        let m = recv(b.as_fd()).unwrap();
        assert_eq!(m.name(), "SET_MEM_TABLE");
        assert!(m.needs_reply());
        assert_eq!(
            m.mem_regions().unwrap(),
            vec![MemRegion {
                guest_addr: 0xaa8000,
                size: 0x100_0000,
                user_addr: 0xaa8000,
                mmap_offset: 0xaa8000
            }]
        );
        ack(b.as_fd(), &m, true).unwrap();
        let m = recv(b.as_fd()).unwrap();
        assert_eq!(m.request, req::GET_FEATURES);
        assert!(!m.needs_reply());
        reply_u64(b.as_fd(), &m, F_PROTOCOL_FEATURES).unwrap();
        let mut buf = [0u8; 40];
        std::io::Read::read_exact(&mut a, &mut buf).unwrap();
        assert_eq!(buf[..12], frame(req::SET_MEM_TABLE, 5, &[0; 8])[..12]);
        assert_eq!(buf[12..20], [0; 8]);
        assert_eq!(buf[20..32], frame(req::GET_FEATURES, 5, &[0; 8])[..12]);
        assert_eq!(u64::from_le_bytes(buf[32..40].try_into().unwrap()), 1 << 30);
        drop(a);
        assert!(matches!(recv(b.as_fd()), Err(WireError::Eof)));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&frame(req::SET_OWNER, 5, &[])).unwrap();
        assert!(matches!(recv(b.as_fd()), Err(WireError::Malformed(_))));
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut big = frame(req::GET_CONFIG, 1, &[]);
        big[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        a.write_all(&big).unwrap();
        assert!(matches!(recv(b.as_fd()), Err(WireError::Malformed(_))));
        let m = Msg {
            request: req::SET_VRING_ADDR,
            flags: 1,
            payload: vec![0; 8],
            fds: vec![],
        };
        assert!(m.vring_addr().is_err());
        let m = Msg {
            request: req::SET_MEM_TABLE,
            flags: 1,
            payload: vec![9, 0, 0, 0, 0, 0, 0, 0],
            fds: vec![],
        };
        assert!(m.mem_regions().is_err());
    }
}
