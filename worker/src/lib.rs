//! What every hvisor-broker device worker shares: startup, guest memory, virtqueues, the event
//! loop, and the [`Device`] trait a device implements.
//!
//! A worker binary is one call: `worker::run(DeviceKind::Blk, |setup, fds| ...)`. [`run`] takes
//! the socket at fd 3, receives the Hello, maps guest memory and closes its fd, builds the device,
//! enters the sandbox, reports Ready, and only then looks at guest data.

pub mod counters;
mod event_loop;
pub mod guest_io;
pub mod inflight;
mod logger;
pub mod memory;
pub mod rate_limit;
#[cfg(feature = "testing")]
pub mod testing;

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, LevelFilter};
use nix::sys::socket::{getsockopt, sockopt, SockType};
use nix::sys::stat::{fstat, SFlag};
use protocol::msg::{SandboxSpec, PROTOCOL_VERSION, WORKER_SOCKET_FD};
use protocol::{BrokerMsg, Channel, DeviceKind, DeviceSetup, Flow, Limit, MemoryRegion, WorkerMsg};

pub use inflight::TrackedQueue;
pub use vm_memory::GuestMemoryMmap;

use event_loop::EventLoop;

/// How long the broker has to send the Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// One virtio device, driven by the event loop. Every method runs in the sandbox on guest
/// data, so none may panic on what the guest wrote.
pub trait Device {
    /// Takes the available buffers of queue `index` with [`TrackedQueue::pop`], completes them
    /// with [`TrackedQueue::publish`], and says whether any were completed. The loop handles
    /// notification suppression and interrupts. After a restart the first chains popped may
    /// be ones the dead worker had taken: served again, from the progress it recorded.
    fn process_queue<'m>(
        &mut self,
        index: usize,
        queue: &mut TrackedQueue<'m>,
        mem: &'m GuestMemoryMmap,
    ) -> bool;

    /// Starts the device's own threads, if it has any, on guest memory `mem`. Called once,
    /// after every privilege is gone and before the seccomp filter, which lets no thread start;
    /// return only once each thread runs (its startup calls are not all allowed).
    fn spawn_threads(&mut self, _mem: &GuestMemoryMmap) -> Result<(), String> {
        Ok(())
    }

    /// The driver set DRIVER_OK with these negotiated features (queues are already set up).
    fn activate(&mut self, _features: u64) {}

    /// The driver reset the device; the queues are gone. Work in flight on other threads is
    /// finished or dropped before this returns: nothing may touch guest memory for it after.
    fn reset(&mut self) {}

    /// The driver took queue `index` out of use: forget anything held for it (as for a reset),
    /// and stop waiting on the host for it (the queue will not be processed again).
    fn stop_queue(&mut self, _index: usize) {}

    /// A driver write to the device config space (the broker has already applied it to its copy).
    fn config_write(&mut self, offset: u32, data: &[u8]) {
        debug!(
            "config write of {} bytes at {offset:#x} ignored",
            data.len()
        );
    }

    /// The broker set the rate limit of `flow` (see [`rate_limit`]); it applies from the next
    /// chain on. A device without flows of that kind ignores it.
    fn set_rate_limit(&mut self, _flow: Flow, _limit: Limit, _now: Instant) {}

    /// While queue `index` waits for its rate limit: when it may go on. The loop then
    /// processes it again (nothing else would: its chains wait in the ring or the tap).
    fn throttled_until(&self, _index: usize) -> Option<Instant> {
        None
    }

    /// The host fds this device waits on (a tap, a pty), by index; registered once, before the
    /// sandbox.
    fn host_fds(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }

    /// What host fd `index` should wake the loop for now. Asked after every round, so a
    /// device stops reading its host fd while the guest has no buffers (the data waits in the
    /// kernel) and waits for writability only while output is pending.
    fn host_interest(&self, _index: usize) -> Interest {
        Interest::NONE
    }

    /// Host fd `index` is ready (or hung up); returns the queues to process now, as a bit mask
    /// (bit q for queue q).
    fn host_ready(&mut self, _index: usize, _readable: bool, _writable: bool) -> u64 {
        0
    }
}

/// What a host fd should wake the event loop for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    pub const NONE: Interest = Interest {
        read: false,
        write: false,
    };
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };
    pub const WRITE: Interest = Interest {
        read: false,
        write: true,
    };
    pub const BOTH: Interest = Interest {
        read: true,
        write: true,
    };
}

/// Exit codes besides success (0) and a failure reported to the broker (1).
const EXIT_USAGE: u8 = 2;

/// The whole life of a worker process; `main` returns what this returns.
///
/// `build` receives the device setup and the device's own fds (those after the queue
/// eventfds) and runs before the sandbox, so it may still inspect them.
pub fn run<F>(kind: DeviceKind, build: F) -> ExitCode
where
    F: FnOnce(&DeviceSetup, Vec<OwnedFd>) -> Result<Box<dyn Device>, String>,
{
    run_with_args(kind, std::env::args().skip(1), build)
}

/// [`run`] with the arguments given, for a binary that consumed some of its own.
pub fn run_with_args<F>(kind: DeviceKind, args: impl Iterator<Item = String>, build: F) -> ExitCode
where
    F: FnOnce(&DeviceSetup, Vec<OwnedFd>) -> Result<Box<dyn Device>, String>,
{
    let options = match Options::parse(args) {
        Ok(o) => o,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "hvisor-worker-{kind}: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let chan = match take_socket() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "hvisor-worker-{kind}: {e}\n\
                 This program is started by hvisor-broker, which passes its socket as fd \
                 {WORKER_SOCKET_FD}; it is not meant to be run by hand."
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let pid = std::process::id();
    logger::install(chan.clone(), options.log_level);
    match start(kind, &chan, pid, build) {
        Ok(event_loop) => event_loop.run(),
        Err(reason) => {
            error!("{reason}");
            let _ = chan.send(&WorkerMsg::Failed { reason }, &[], false);
            ExitCode::FAILURE
        }
    }
}

/// Everything up to Ready: after this returns, the worker is sandboxed.
fn start<F>(kind: DeviceKind, chan: &Arc<Channel>, pid: u32, build: F) -> Result<EventLoop, String>
where
    F: FnOnce(&DeviceSetup, Vec<OwnedFd>) -> Result<Box<dyn Device>, String>,
{
    let (hello, fds) = chan
        .recv::<BrokerMsg>(Some(HELLO_TIMEOUT))
        .map_err(|e| format!("waiting for Hello: {e}"))?;
    let Hello {
        regions,
        num_queues,
        setup,
        sandbox,
    } = check_hello(kind, hello)?;
    info!("worker starting, {num_queues} queue(s)");

    // The channel checked the count: memory, record, kicks, calls, then the device's fds.
    let n = num_queues as usize;
    let mut fds = fds.into_iter();
    let mem_fd = fds.next().ok_or("no memory fd")?;
    let record_fd = fds.next().ok_or("no in-flight record")?;
    let kicks: Vec<OwnedFd> = fds.by_ref().take(n).collect();
    let calls: Vec<OwnedFd> = fds.by_ref().take(n).collect();
    let device_fds: Vec<OwnedFd> = fds.collect();

    let mem =
        memory::map_regions(mem_fd.as_fd(), &regions).map_err(|e| format!("guest memory: {e}"))?;
    // Closed before any guest data is read: on hvisor this fd reaches all physical memory.
    drop(mem_fd);

    let record = inflight::Record::map(record_fd.as_fd(), n)?;
    drop(record_fd);

    let device = build(&setup, device_fds)?;
    let mut event_loop = EventLoop::new(chan.clone(), mem, kicks, calls, record, device)
        .map_err(|e| format!("epoll: {e}"))?;

    let confinement = policy::enter_with(kind, &sandbox, WORKER_SOCKET_FD, || {
        event_loop.spawn_threads()
    })
    .map_err(|e| format!("sandbox: {e}"))?;
    chan.send(
        &WorkerMsg::Confined {
            root: confinement.root,
            notes: confinement.notes,
        },
        &[],
        false,
    )
    .map_err(|e| format!("sending Confined: {e}"))?;
    chan.send(
        &WorkerMsg::Ready {
            version: PROTOCOL_VERSION,
            pid,
        },
        &[],
        false,
    )
    .map_err(|e| format!("sending Ready: {e}"))?;
    debug!("sandboxed (seccomp {:?}), ready", sandbox.seccomp);
    Ok(event_loop)
}

/// What a worker takes from the broker's Hello.
struct Hello {
    regions: Vec<MemoryRegion>,
    num_queues: u16,
    setup: DeviceSetup,
    sandbox: SandboxSpec,
}

/// The first message, if it is a Hello of this protocol for a `kind` device.
fn check_hello(kind: DeviceKind, hello: BrokerMsg) -> Result<Hello, String> {
    let BrokerMsg::Hello {
        version,
        regions,
        num_queues,
        setup,
        sandbox,
        ..
    } = hello
    else {
        return Err(format!("expected Hello, got {hello:?}"));
    };
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "broker speaks protocol {version}, this worker {PROTOCOL_VERSION}"
        ));
    }
    if setup.kind() != kind {
        return Err(format!("a {} setup sent to a {kind} worker", setup.kind()));
    }
    Ok(Hello {
        regions,
        num_queues,
        setup,
        sandbox,
    })
}

/// Entry points for the fuzz targets: the checks a worker applies to what it is sent.
#[doc(hidden)]
pub mod fuzzing {
    use protocol::{BrokerMsg, DeviceKind, QueueConfig};
    use virtio_queue::Queue;
    use vm_memory::GuestMemoryMmap;

    /// Whether a worker of `kind` accepts `hello` as its first message.
    pub fn check_hello(kind: DeviceKind, hello: BrokerMsg) -> Result<(), String> {
        super::check_hello(kind, hello).map(|_| ())
    }

    /// The queue a worker builds at activation from `cfg`.
    pub fn build_queue(
        cfg: &QueueConfig,
        event_idx: bool,
        mem: &GuestMemoryMmap,
    ) -> Result<Queue, String> {
        crate::event_loop::build_queue(cfg, event_idx, mem)
    }
}

/// Takes ownership of fd 3 once it is known to be a SEQPACKET socket.
fn take_socket() -> Result<Channel, String> {
    // SAFETY: F_GETFD only asks whether fd 3 is open. Ownership is taken only if it is; no other
    // part of this process uses that number, which the broker set up for this purpose.
    let fd = unsafe {
        if libc::fcntl(WORKER_SOCKET_FD, libc::F_GETFD) < 0 {
            return Err(format!("fd {WORKER_SOCKET_FD} is not open"));
        }
        OwnedFd::from_raw_fd(WORKER_SOCKET_FD)
    };
    let is_socket = fstat(&fd)
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK)
        .unwrap_or(false);
    if !is_socket || getsockopt(&fd, sockopt::SockType) != Ok(SockType::SeqPacket) {
        // Not ours to close: leave whatever it is alone.
        let _ = fd.into_raw_fd();
        return Err(format!("fd {WORKER_SOCKET_FD} is not a SEQPACKET socket"));
    }
    Ok(Channel::from_fd(fd))
}

const USAGE: &str = "usage: hvisor-worker-<kind> [--log-level=error|warn|info|debug|trace]";

struct Options {
    log_level: LevelFilter,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut options = Options {
            log_level: LevelFilter::Info,
        };
        for arg in args {
            if let Some(level) = arg.strip_prefix("--log-level=") {
                options.log_level = level
                    .parse()
                    .map_err(|_| format!("unknown log level {level:?}"))?;
            } else {
                return Err(format!("unknown argument {arg:?}"));
            }
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let parse = |a: &[&str]| Options::parse(a.iter().map(|s| s.to_string()));
        assert_eq!(parse(&[]).unwrap().log_level, LevelFilter::Info);
        assert_eq!(
            parse(&["--log-level=debug"]).unwrap().log_level,
            LevelFilter::Debug
        );
        // the seccomp mode is the broker's to choose, in the Hello
        assert!(parse(&["--seccomp=trap"]).is_err());
        assert!(parse(&["--verbose"]).is_err());
    }
}
