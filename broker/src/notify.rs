//! Telling the service manager how start-up went. Under systemd (`Type=notify`) the broker
//! sends `KEY=VALUE` lines in one datagram to the socket `$NOTIFY_SOCKET` names (the documented
//! sd_notify protocol: a path, or `@` for the abstract namespace); without systemd it can write
//! a ready file that an init script waits for. Ready means every device's worker reported
//! itself sandboxed and ready, so a zone started after it finds all its devices served.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The service manager's socket.
struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// The socket `$NOTIFY_SOCKET` names, if any.
    fn from_env() -> Result<Option<Notifier>> {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let addr = parse_addr(name.as_encoded_bytes())?;
        let socket = UnixDatagram::unbound().context("NOTIFY_SOCKET: socket")?;
        Ok(Some(Notifier { socket, addr }))
    }

    fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            log::warn!("telling the service manager {state:?}: {e}");
        }
    }
}

/// A `$NOTIFY_SOCKET` value: `/path` or `@abstract-name`.
fn parse_addr(name: &[u8]) -> Result<SocketAddr> {
    match name.split_first() {
        Some((b'@', abstract_name)) => SocketAddr::from_abstract_name(abstract_name)
            .context("NOTIFY_SOCKET: bad abstract socket name"),
        Some((b'/', _)) => {
            use std::os::unix::ffi::OsStrExt;
            SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(name))
                .context("NOTIFY_SOCKET: bad socket path")
        }
        _ => bail!(
            "NOTIFY_SOCKET={:?}: neither a socket path nor an @abstract name",
            String::from_utf8_lossy(name)
        ),
    }
}

/// A device: its zone and its MMIO address.
pub type Device = (u32, u64);

/// Which devices' workers are ready, and whom to tell when all are.
#[derive(Default)]
pub struct Readiness {
    notifier: Option<Notifier>,
    ready_file: Option<PathBuf>,
    devices: usize,
    /// The start config's devices (zone, address) whose first worker is not ready yet: an
    /// address, unlike an index, stays the same when zones come and go.
    waiting: BTreeSet<Device>,
    told: bool,
}

impl Readiness {
    /// Readiness goes to `$NOTIFY_SOCKET` if set and to `ready_file` if given.
    pub fn new(ready_file: Option<PathBuf>) -> Result<Readiness> {
        Ok(Readiness {
            notifier: Notifier::from_env()?,
            ready_file,
            ..Readiness::default()
        })
    }

    /// Serving starts with `devices` workers to wait for. A ready file left by an earlier
    /// broker is removed now that this one holds the driver's lock (not before: a second
    /// broker, refused, must not remove the running one's).
    pub fn starting(&mut self, devices: impl IntoIterator<Item = Device>) {
        if let Some(f) = &self.ready_file {
            if let Err(e) = remove(f) {
                log::error!("{e:#}");
            }
        }
        self.waiting = devices.into_iter().collect();
        let devices = self.waiting.len();
        self.devices = devices;
        self.status(&format!("STATUS=starting {devices} worker(s)"));
        self.check();
    }

    /// `device`'s worker reported itself sandboxed and ready (again, after a restart, or a
    /// device added at run time, changes nothing).
    pub fn worker_ready(&mut self, device: Device) {
        if self.told || !self.waiting.remove(&device) {
            return;
        }
        self.status(&format!(
            "STATUS={} of {} worker(s) sandboxed and ready",
            self.devices - self.waiting.len(),
            self.devices
        ));
        self.check();
    }

    /// `device` is no longer served (its zone was removed): nothing to wait for.
    pub fn device_gone(&mut self, device: Device) {
        if self.waiting.remove(&device) {
            self.devices -= 1;
            self.check();
        }
    }

    /// The broker is stopping.
    pub fn stopping(&mut self) {
        self.status("STOPPING=1\nSTATUS=stopping");
        if let Some(f) = &self.ready_file {
            if let Err(e) = remove(f) {
                log::warn!("{e:#}");
            }
        }
    }

    fn check(&mut self) {
        if self.told || !self.waiting.is_empty() {
            return;
        }
        self.told = true;
        // The file first: whoever hears READY=1 or reads the log line finds it there.
        if let Some(f) = &self.ready_file {
            if let Err(e) = write_ready_file(f) {
                log::error!("{e:#}");
            }
        }
        self.status(&format!(
            "READY=1\nSTATUS=serving {} device(s)",
            self.devices
        ));
        log::info!(
            "all {} worker(s) sandboxed and ready: serving",
            self.devices
        );
    }

    fn status(&self, state: &str) {
        if let Some(n) = &self.notifier {
            n.send(state);
        }
    }
}

/// Writes the broker's pid to `path` whole: a waiter sees no file or a complete one.
fn write_ready_file(path: &Path) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    remove(&tmp)?;
    // create_new: never through a symlink someone left there
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("ready file {}", tmp.display()))?;
    writeln!(f, "{}", std::process::id())?;
    std::fs::rename(&tmp, path).with_context(|| format!("ready file {}", path.display()))
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the ready file {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_names() {
        let a = parse_addr(b"@/org/freedesktop/systemd1/notify/1").unwrap();
        assert_eq!(
            a.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/1"[..])
        );
        let p = parse_addr(b"/run/systemd/notify").unwrap();
        assert_eq!(p.as_pathname(), Some(Path::new("/run/systemd/notify")));
        assert!(parse_addr(b"vsock:2:1234").is_err());
        assert!(parse_addr(b"").is_err());
    }

    #[test]
    fn ready_file_appears_when_every_worker_is_ready() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ready");
        std::fs::write(&file, "stale").unwrap();
        let mut r = Readiness::new(Some(file.clone())).unwrap();
        r.starting([(1, 0xa003c00), (2, 0xa003c00)]);
        assert!(!file.exists(), "a stale ready file is removed");
        r.worker_ready((2, 0xa003c00));
        r.worker_ready((2, 0xa003c00));
        r.worker_ready((3, 0xa003c00));
        assert!(!file.exists(), "one of two is not all");
        r.worker_ready((1, 0xa003c00));
        let pid = std::fs::read_to_string(&file).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        r.stopping();
        assert!(!file.exists());
    }

    #[test]
    fn no_devices_is_ready_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ready");
        let mut r = Readiness::new(Some(file.clone())).unwrap();
        r.starting([]);
        assert!(file.exists());
    }

    #[test]
    fn a_device_removed_before_its_worker_was_ready_is_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ready");
        let mut r = Readiness::new(Some(file.clone())).unwrap();
        r.starting([(1, 0xa003c00), (2, 0xa003c00)]);
        r.worker_ready((1, 0xa003c00));
        assert!(!file.exists());
        r.device_gone((2, 0xa003c00));
        assert!(file.exists());
    }
}
