//! The simulator socket (sim-protocol v1): listen, accept one broker, hand it the bridge page,
//! the physical memory and the finish eventfd.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{accept, bind, getsockopt, listen, sockopt, Backlog, UnixAddr};
use protocol::bridge::{MAX_CPUS, MMAP_SIZE};
use protocol::sim::{recv_init, send_reply, Reply, SIGNAL_WAKEUP};

use crate::hv::Wakeup;

/// EINVAL, what the old driver answers to SET_EVENTFD.
const EINVAL: u32 = 22;

/// What the broker gets in READY, and what the simulator keeps of it.
pub struct SharedFds {
    /// A memfd of [`MMAP_SIZE`] bytes holding `struct virtio_bridge` at offset 0.
    pub bridge: OwnedFd,
    /// FINISH_REQ: the broker adds 1 after publishing `res_list` entries.
    pub finish: EventFd,
}

impl SharedFds {
    pub fn new() -> Result<Self> {
        let bridge = memfd_create("hvisor-sim-bridge", MFdFlags::MFD_CLOEXEC)
            .context("memfd_create (bridge)")?;
        nix::unistd::ftruncate(&bridge, MMAP_SIZE as i64).context("sizing the bridge page")?;
        let finish = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .context("eventfd (finish)")?;
        Ok(SharedFds { bridge, finish })
    }
}

/// The listening socket; removes its file when dropped.
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
}

impl Listener {
    /// Binds a `SOCK_SEQPACKET` socket at `path`, replacing a stale socket file.
    pub fn bind(path: &Path) -> Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale socket {}", path.display()))?;
            }
            Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
            Err(_) => {}
        }
        let fd = protocol::channel::seqpacket_socket().context("socket")?;
        let addr = UnixAddr::new(path).context("socket path")?;
        bind(fd.as_raw_fd(), &addr).with_context(|| format!("bind {}", path.display()))?;
        listen(&fd, Backlog::new(4).unwrap()).context("listen")?;
        Ok(Listener {
            fd,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until one completes the handshake. A connection that sends a
    /// malformed message is told why (on stderr) and closed; the simulator keeps listening.
    pub fn accept_broker(
        &self,
        shared: &SharedFds,
        phys: BorrowedFd<'_>,
        phys_size: u64,
        legacy: bool,
    ) -> Result<(OwnedFd, Wakeup)> {
        loop {
            let conn = accept(&self.fd).context("accept")?;
            match handshake(conn.as_fd(), shared, phys, phys_size, legacy) {
                Ok(w) => return Ok((conn, w)),
                Err(e) => eprintln!("hvisor-sim: refused a connection: {e:#}"),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connection's handshake: INIT -> READY (or ERROR, then a second INIT, for the legacy
/// driver).
pub fn handshake(
    conn: BorrowedFd<'_>,
    shared: &SharedFds,
    phys: BorrowedFd<'_>,
    phys_size: u64,
    legacy: bool,
) -> Result<Wakeup> {
    let peer = getsockopt(&conn, sockopt::PeerCredentials).context("SO_PEERCRED")?;
    loop {
        let (init, efd) = recv_init(conn).context("INIT")?;
        if init.flags & !SIGNAL_WAKEUP != 0 {
            anyhow::bail!("INIT with unknown flags 0x{:x}", init.flags);
        }
        let wakeup = if init.flags & SIGNAL_WAKEUP != 0 {
            if init.tid == 0 {
                anyhow::bail!("SIGNAL_WAKEUP INIT without a thread id");
            }
            // The signal goes to a thread of the connecting process, nowhere else.
            let task = format!("/proc/{}/task/{}", peer.pid(), init.tid);
            if !Path::new(&task).exists() {
                anyhow::bail!(
                    "SIGNAL_WAKEUP INIT names thread {} which is not a thread of the peer (pid {})",
                    init.tid,
                    peer.pid()
                );
            }
            Wakeup::Signal {
                pid: peer.pid(),
                tid: init.tid as i32,
            }
        } else {
            if init.tid != 0 {
                anyhow::bail!("eventfd INIT with a nonzero tid ({})", init.tid);
            }
            let efd = efd.context("eventfd INIT without its fd")?;
            if legacy {
                // The old driver has no SET_EVENTFD: EINVAL, and the broker may retry.
                drop(efd);
                send_reply(conn, Reply::Error { errno: EINVAL }, &[]).context("ERROR")?;
                continue;
            }
            Wakeup::EventFd(efd)
        };
        send_reply(
            conn,
            Reply::Ready {
                phys_size,
                max_cpus: MAX_CPUS as u32,
            },
            &[shared.bridge.as_fd(), phys, shared.finish.as_fd()],
        )
        .context("READY")?;
        return Ok(wakeup);
    }
}
