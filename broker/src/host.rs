//! Host resources the broker opens for net and console workers and keeps the control of:
//! the tap (header size and offloads follow what the guest negotiated) and the pty pair (the
//! slave stays open here, so a detached reader causes no hang-up on the worker's master).

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::pty::{openpty, Winsize};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Offload bits of TUNSETOFFLOAD.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;

nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_ptr_bad!(
    tunsetvnethdrsz,
    nix::request_code_write!(b'T', 216, std::mem::size_of::<libc::c_int>()),
    libc::c_int
);
nix::ioctl_write_int_bad!(
    tunsetoffload,
    nix::request_code_write!(b'T', 208, std::mem::size_of::<libc::c_uint>())
);
nix::ioctl_read_bad!(siocgifflags, libc::SIOCGIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifflags, libc::SIOCSIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(siocsifmtu, libc::SIOCSIFMTU, libc::ifreq);

/// The broker's handle on a tap: the same open file the worker reads and writes frames on.
pub struct Tap {
    pub name: String,
    fd: OwnedFd,
}

impl Tap {
    /// Opens (creating when needed) tap `name` with a virtio-net header, non-blocking.
    /// A tap we create gets the configured MTU and is brought up; an existing one keeps the
    /// state its owner gave it.
    pub fn open(name: &str, mtu: u16) -> Result<Tap> {
        let existed = Path::new("/sys/class/net").join(name).exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .context("open /dev/net/tun")?;
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads one ifreq, which lives on our stack for the call.
        unsafe { tunsetiff(file.as_raw_fd(), &req) }
            .with_context(|| format!("TUNSETIFF {name}"))?;
        let tap = Tap {
            name: name.to_string(),
            fd: file.into(),
        };
        tap.set_header_len(12)?;
        if !existed {
            tap.bring_up(mtu)
                .with_context(|| format!("bringing up the new tap {name}"))?;
            log::info!("created tap {name} (mtu {mtu}) and set it up");
        }
        Ok(tap)
    }

    /// Another handle on the same open tap, for the worker.
    pub fn frames_fd(&self) -> Result<OwnedFd> {
        Ok(self.fd.try_clone()?)
    }

    /// 12 bytes (`virtio_net_hdr_v1`) with VERSION_1 or MRG_RXBUF, 10 for legacy drivers.
    pub fn set_header_len(&self, len: i32) -> Result<()> {
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        unsafe { tunsetvnethdrsz(self.fd.as_raw_fd(), &len) }.context("TUNSETVNETHDRSZ")?;
        Ok(())
    }

    /// The offloads the guest accepts on receive (`TUN_F_*`); 0 for none.
    pub fn set_offloads(&self, flags: u32) -> Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        unsafe { tunsetoffload(self.fd.as_raw_fd(), flags as libc::c_int) }
            .context("TUNSETOFFLOAD")?;
        Ok(())
    }

    fn bring_up(&self, mtu: u16) -> Result<()> {
        let sock = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let mut req = ifreq(&self.name)?;
        req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads one ifreq on our stack.
        unsafe { siocsifmtu(sock.as_raw_fd(), &req) }.context("SIOCSIFMTU")?;
        let mut req = ifreq(&self.name)?;
        // SAFETY: both ioctls read or write one ifreq on our stack.
        unsafe {
            siocgifflags(sock.as_raw_fd(), &mut req)?;
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            siocsifflags(sock.as_raw_fd(), &req)?;
        }
        Ok(())
    }
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid empty request.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() {
        bail!("tap name {name:?} does not fit an interface name");
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// A pty pair: the broker relays the master to the worker; the slave is where users attach.
pub struct Pty {
    pub master: OwnedFd,
    /// Held open so the master never sees a hang-up while no reader is attached.
    _slave: OwnedFd,
    pub path: PathBuf,
    link: Option<Link>,
}

impl Pty {
    pub fn open(cols: u16, rows: u16, link: Option<&Path>) -> Result<Pty> {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pair = openpty(&size, None).context("openpty")?;
        for fd in [&pair.master, &pair.slave] {
            set_cloexec(fd)?;
        }
        // Raw both ways: no echo of guest output back into the guest, no CR/LF rewriting.
        let mut t = tcgetattr(&pair.slave)?;
        cfmakeraw(&mut t);
        tcsetattr(&pair.slave, SetArg::TCSANOW, &t)?;
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        unsafe {
            let fl = libc::fcntl(pair.master.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(
                pair.master.as_raw_fd(),
                libc::F_SETFL,
                fl | libc::O_NONBLOCK,
            );
        }
        let path = nix::unistd::ttyname(pair.slave.as_fd()).context("ttyname of the pty")?;
        let link = link
            .map(|l| Link::make(l, &path).with_context(|| format!("pty_link {}", l.display())))
            .transpose()?;
        Ok(Pty {
            master: pair.master,
            _slave: pair.slave,
            path,
            link,
        })
    }

    pub fn link(&self) -> Option<&Path> {
        self.link.as_ref().map(|l| l.shown.as_path())
    }
}

fn set_cloexec(fd: &OwnedFd) -> Result<()> {
    // SAFETY: F_SETFD on an fd we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        bail!("F_SETFD: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A `pty_link` we made, and the directories made for it; all removed when dropped (only what
/// is still ours: someone may have replaced the link, or put files in the directories).
struct Link {
    /// As configured, for messages.
    shown: PathBuf,
    /// Where it is, without symlinks.
    path: PathBuf,
    target: PathBuf,
    /// Outermost first.
    made: Vec<PathBuf>,
}

impl Link {
    /// Points a link at `target`, through the same checks as the config's (see
    /// [`config::paths::link_place`]): only a stale link to a pty is replaced.
    fn make(link: &Path, target: &Path) -> Result<Link> {
        let place = config::paths::link_place(link).map_err(anyhow::Error::msg)?;
        let mut made = Link {
            shown: link.to_owned(),
            path: place.path(),
            target: target.to_owned(),
            made: Vec::new(),
        };
        let mut dir = place.dir;
        for name in &place.missing {
            dir.push(name);
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .with_context(|| format!("mkdir {}", dir.display()))?;
            made.made.push(dir.clone());
        }
        match std::fs::remove_file(&made.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        std::os::unix::fs::symlink(target, &made.path)?;
        Ok(made)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if std::fs::read_link(&self.path).is_ok_and(|t| t == self.target) {
            let _ = std::fs::remove_file(&self.path);
        }
        // Innermost first; one that is not empty keeps its parents too.
        for dir in self.made.iter().rev() {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}
