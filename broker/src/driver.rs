//! The hvisor driver: the real `/dev/hvisor`, or the simulator socket of sim-protocol v1.
//!
//! Both give the broker the same three things: the bridge page, a wakeup it can sleep on, and a
//! way to say "interrupts are queued" (FINISH_REQ); plus the fd through which zone memory is
//! mapped at root-zone physical offsets.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{connect, UnixAddr};
use protocol::bridge::{BridgeMap, VirtioBridge};
use protocol::sim;

/// `include/hvisor.h`: type 1, "bad" ioctls whose size field does not describe the argument.
pub const HVISOR_INIT_VIRTIO: libc::c_ulong = nix::request_code_none!(1, 0) as libc::c_ulong;
pub const HVISOR_FINISH_REQ: libc::c_ulong = nix::request_code_none!(1, 2) as libc::c_ulong;
pub const HVISOR_SET_EVENTFD: libc::c_ulong =
    nix::request_code_write!(1, 7, std::mem::size_of::<libc::c_int>()) as libc::c_ulong;

/// LoongArch only: drop a level-style virtio interrupt line (hypercall 11).
pub const HVISOR_DEASSERT_IRQ: libc::c_ulong =
    nix::request_code_write!(1, 11, std::mem::size_of::<IrqLineArgs>()) as libc::c_ulong;

/// `struct hvisor_irq_line_args`.
#[repr(C)]
pub struct IrqLineArgs {
    pub zone_id: u32,
    pub irq_id: u32,
}

nix::ioctl_none_bad!(ioctl_init_virtio, HVISOR_INIT_VIRTIO);
nix::ioctl_none_bad!(ioctl_finish_req, HVISOR_FINISH_REQ);
nix::ioctl_write_int_bad!(ioctl_set_eventfd, HVISOR_SET_EVENTFD);
#[cfg(target_arch = "loongarch64")]
nix::ioctl_write_ptr_bad!(ioctl_deassert_irq, HVISOR_DEASSERT_IRQ, IrqLineArgs);

/// The signal of drivers before February 2026 (`SIGHVI` = 10 on every hvisor architecture).
pub const WAKEUP_SIGNAL: Signal = Signal::SIGUSR1;

/// How the driver wakes us.
pub enum Wakeup {
    EventFd(EventFd),
    /// SIGUSR1 to the thread that made INIT (this one), read through a signalfd.
    Signal(SignalFd),
}

enum Finish {
    Ioctl,
    /// The simulator's finish eventfd.
    EventFd(OwnedFd),
}

pub struct Driver {
    path: PathBuf,
    /// `/dev/hvisor` itself, or the simulator's physical-memory fd.
    memory: OwnedFd,
    /// The simulator socket, kept to notice the simulator going away.
    sim_socket: Option<OwnedFd>,
    bridge: BridgeMap,
    wakeup: Wakeup,
    finish: Finish,
    /// The driver refused HVISOR_DEASSERT_IRQ once (said once, then not tried again).
    no_deassert: std::cell::Cell<bool>,
}

impl Driver {
    /// Opens the driver at `path`: a character device is the real `/dev/hvisor`, a socket is
    /// the simulator. SIGUSR1 must already be blocked in every thread (see `block_signals`).
    pub fn open(path: &Path) -> Result<Driver> {
        let meta = std::fs::metadata(path).with_context(|| format!("driver {}", path.display()))?;
        let ft = meta.file_type();
        if ft.is_char_device() {
            Self::open_hvisor(path)
        } else if ft.is_socket() {
            Self::open_sim(path)
        } else {
            bail!(
                "driver {}: neither a character device nor a simulator socket",
                path.display()
            )
        }
    }

    fn open_hvisor(path: &Path) -> Result<Driver> {
        let dev: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        // SAFETY: INIT_VIRTIO takes no argument.
        let rc = unsafe { ioctl_init_virtio(dev.as_raw_fd()) }
            .with_context(|| format!("{}: HVISOR_INIT_VIRTIO", path.display()))?;
        if rc != 0 {
            bail!("{}: HVISOR_INIT_VIRTIO returned {rc}: the driver has no virtio IRQ (is /hvisor_virtio_device in the root device tree?)", path.display());
        }
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        // SAFETY: SET_EVENTFD takes the eventfd number by value; the driver takes its own
        // reference to the eventfd.
        let wakeup = match unsafe { ioctl_set_eventfd(dev.as_raw_fd(), efd.as_fd().as_raw_fd()) } {
            Ok(_) => Wakeup::EventFd(efd),
            Err(Errno::EINVAL) => {
                log::info!(
                    "{}: driver predates HVISOR_SET_EVENTFD, using SIGUSR1 wakeups",
                    path.display()
                );
                Wakeup::Signal(signal_wakeup()?)
            }
            Err(e) => return Err(anyhow!("{}: HVISOR_SET_EVENTFD: {e}", path.display())),
        };
        let bridge = BridgeMap::map(dev.as_fd()).context("mmap of the bridge page")?;
        Ok(Driver {
            path: path.to_owned(),
            memory: dev.into(),
            sim_socket: None,
            bridge,
            wakeup,
            finish: Finish::Ioctl,
            no_deassert: Default::default(),
        })
    }

    fn open_sim(path: &Path) -> Result<Driver> {
        let sock = protocol::channel::seqpacket_socket()?;
        let addr = UnixAddr::new(path)?;
        connect(sock.as_raw_fd(), &addr)
            .with_context(|| format!("connect to simulator {}", path.display()))?;
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        sim::send_init(
            sock.as_fd(),
            sim::Init { flags: 0, tid: 0 },
            Some(efd.as_fd()),
        )?;
        let (mut reply, mut fds) = sim::recv_reply(sock.as_fd())?;
        let wakeup = match reply {
            sim::Reply::Ready { .. } => Wakeup::EventFd(efd),
            sim::Reply::Error { errno } if errno == Errno::EINVAL as u32 => {
                log::info!(
                    "{}: driver predates HVISOR_SET_EVENTFD, using SIGUSR1 wakeups",
                    path.display()
                );
                let sfd = signal_wakeup()?;
                let tid = nix::unistd::gettid().as_raw() as u32;
                sim::send_init(
                    sock.as_fd(),
                    sim::Init {
                        flags: sim::SIGNAL_WAKEUP,
                        tid,
                    },
                    None,
                )?;
                (reply, fds) = sim::recv_reply(sock.as_fd())?;
                Wakeup::Signal(sfd)
            }
            sim::Reply::Error { errno } => bail!("simulator refused INIT: errno {errno}"),
        };
        let sim::Reply::Ready { .. } = reply else {
            bail!("simulator refused INIT twice");
        };
        let mut fds = fds.into_iter();
        let (bridge_fd, memory, finish) = (
            fds.next().unwrap(),
            fds.next().unwrap(),
            fds.next().unwrap(),
        );
        let bridge =
            BridgeMap::map(bridge_fd.as_fd()).context("mmap of the simulator bridge page")?;
        Ok(Driver {
            path: path.to_owned(),
            memory,
            sim_socket: Some(sock),
            bridge,
            wakeup,
            finish: Finish::EventFd(finish),
            no_deassert: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bridge(&self) -> &VirtioBridge {
        &self.bridge
    }

    /// The fd zone memory is mapped from, at offset = root-zone physical address.
    pub fn memory_fd(&self) -> BorrowedFd<'_> {
        self.memory.as_fd()
    }

    /// The fd that becomes readable when the driver wakes us.
    pub fn wakeup_fd(&self) -> BorrowedFd<'_> {
        match &self.wakeup {
            Wakeup::EventFd(e) => e.as_fd(),
            Wakeup::Signal(s) => s.as_fd(),
        }
    }

    /// The simulator connection, readable at EOF when the simulator goes away.
    pub fn sim_socket(&self) -> Option<BorrowedFd<'_>> {
        self.sim_socket.as_ref().map(|s| s.as_fd())
    }

    pub fn uses_signal(&self) -> bool {
        matches!(self.wakeup, Wakeup::Signal(_))
    }

    /// Consumes pending wakeups so the fd stops being readable.
    pub fn clear_wakeup(&self) {
        match &self.wakeup {
            Wakeup::EventFd(e) => {
                let _ = e.read();
            }
            Wakeup::Signal(s) => while let Ok(Some(_)) = s.read_signal() {},
        }
    }

    /// Tells the hypervisor that `res_list` holds interrupts (hypercall 1). On return from the
    /// real driver the ring has been drained.
    pub fn finish_req(&self) -> Result<()> {
        match &self.finish {
            Finish::Ioctl => loop {
                // SAFETY: FINISH_REQ takes no argument.
                match unsafe { ioctl_finish_req(self.memory.as_raw_fd()) } {
                    Err(Errno::EINTR) => continue,
                    Err(e) => bail!("HVISOR_FINISH_REQ: {e}"),
                    Ok(_) => return Ok(()),
                }
            },
            Finish::EventFd(e) => match nix::unistd::write(e, &1u64.to_ne_bytes()) {
                Ok(_) | Err(Errno::EAGAIN) => Ok(()),
                Err(e) => bail!("simulator finish eventfd: {e}"),
            },
        }
    }
}

impl Driver {
    /// The guest acknowledged `irq` of `zone` completely, or reset the device. LoongArch's
    /// hvisor keeps an injected line up until told (hvisor-abi 1.6); elsewhere, and with the
    /// simulator, there is nothing to do.
    pub fn deassert_irq(&self, zone: u32, irq: u32) {
        if !cfg!(target_arch = "loongarch64")
            || !matches!(self.finish, Finish::Ioctl)
            || self.no_deassert.get()
        {
            return;
        }
        #[cfg(target_arch = "loongarch64")]
        {
            let args = IrqLineArgs {
                zone_id: zone,
                irq_id: irq,
            };
            // SAFETY: the driver copies `args` (8 bytes) in during the call.
            if let Err(e) = unsafe { ioctl_deassert_irq(self.memory.as_raw_fd(), &args) } {
                log::warn!(
                    "HVISOR_DEASSERT_IRQ (zone {zone}, irq {irq}): {e}; this driver predates it, \
                     so interrupt lines are no longer deasserted"
                );
                self.no_deassert.set(true);
            }
        }
        let _ = (zone, irq);
    }
}

fn signal_wakeup() -> Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(WAKEUP_SIGNAL);
    Ok(SignalFd::with_flags(
        &mask,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}

/// Blocks the signals the broker reads through signalfds. Call first thing in `main`, before
/// any thread exists, so that no thread can take SIGUSR1's default action (termination).
pub fn block_signals() -> Result<SigSet> {
    let mut mask = SigSet::empty();
    for s in [
        WAKEUP_SIGNAL,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGCHLD,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block()?;
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_hvisor_h() {
        assert_eq!(HVISOR_INIT_VIRTIO, 0x100);
        assert_eq!(HVISOR_FINISH_REQ, 0x102);
        assert_eq!(HVISOR_SET_EVENTFD, 0x4004_0107);
        assert_eq!(HVISOR_DEASSERT_IRQ, 0x4008_010b);
        assert_eq!(WAKEUP_SIGNAL as i32, 10);
    }
}
