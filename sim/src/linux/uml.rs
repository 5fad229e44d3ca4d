//! Starting a User-Mode Linux kernel and finding its memory.
//!
//! UML keeps its "physical" memory in a file it creates at boot in `$TMPDIR` (an unlinked
//! `O_TMPFILE`) and maps at `0x60000000`; physical address X is file offset X. That file is
//! what the broker must receive as the physical-memory fd, so the simulator reopens it through
//! `/proc/<pid>/fd` long before UML sends its first vhost-user message.
//!
//! Two settings make the layout predictable: address-space randomisation is switched off for
//! UML (with a randomised `brk`, UML enlarges its memory by the random gap and the region it
//! shares moves), and `mem=` is given in KiB so the file is exactly the size asked for.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Where the kernel and its modules are, as Debian's `user-mode-linux` installs them.
pub const DEFAULT_KERNEL: &str = "/usr/bin/linux";
pub const MODULES_ROOT: &str = "/usr/lib/uml/modules";
/// `busybox-static`'s binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// The kernel's release, from `linux --version` (e.g. `6.1.176`).
pub fn kernel_release(kernel: &Path) -> Result<String> {
    let out = Command::new(kernel)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --version", kernel.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let release = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string();
    if release.is_empty() || !release.starts_with(|c: char| c.is_ascii_digit()) {
        bail!(
            "{} --version printed {text:?}: not a User-Mode Linux kernel?",
            kernel.display()
        );
    }
    Ok(release)
}

/// The process group of the running UML and its runtime directory, for [`abandon`].
static RUNNING: std::sync::Mutex<Option<(i32, PathBuf)>> = std::sync::Mutex::new(None);

/// For an exit that skips destructors (the `--timeout` watchdog): kills the running UML's
/// process group and removes its runtime directory (sockets, initramfs).
pub fn abandon() {
    if let Some((pgid, dir)) = RUNNING.lock().unwrap().take() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A running UML kernel in its own process group (UML forks helpers for guest processes).
pub struct Uml {
    child: Child,
    pub started: Instant,
    /// Console lines (stdout and stderr of the kernel), in order.
    pub lines: mpsc::Receiver<String>,
}

impl Uml {
    /// Starts `kernel` with `args`; its memory file goes to `tmpdir`.
    pub fn start(kernel: &Path, args: &[String], tmpdir: &Path) -> Result<Uml> {
        let mut cmd = Command::new(kernel);
        cmd.args(args)
            .env("TMPDIR", tmpdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: personality(2) is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;
                if libc::personality(ADDR_NO_RANDOMIZE) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", kernel.display()))?;
        *RUNNING.lock().unwrap() = Some((child.id() as i32, tmpdir.to_path_buf()));
        let (tx, rx) = mpsc::channel();
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::Builder::new()
                .name("uml-console".into())
                .spawn(move || {
                    for line in BufReader::new(r).split(b'\n').map_while(Result::ok) {
                        let line = String::from_utf8_lossy(&line)
                            .trim_end_matches('\r')
                            .to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                })?;
        }
        Ok(Uml {
            child,
            started,
            lines: rx,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The exit status once the kernel process has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for UML's memory file to appear with `size` bytes and opens it read-write.
    pub fn memory_file(&mut self, tmpdir: &Path, size: u64, timeout: Duration) -> Result<File> {
        let deadline = Instant::now() + timeout;
        let fd_dir = PathBuf::from(format!("/proc/{}/fd", self.pid()));
        loop {
            if let Some(st) = self.try_wait() {
                bail!("the UML kernel exited ({st}) before its memory was set up");
            }
            if let Ok(rd) = std::fs::read_dir(&fd_dir) {
                for e in rd.flatten() {
                    let Ok(target) = std::fs::read_link(e.path()) else {
                        continue;
                    };
                    let t = target.to_string_lossy();
                    if !(t.starts_with(&*tmpdir.to_string_lossy()) && t.ends_with("(deleted)")) {
                        continue;
                    }
                    let Ok(f) = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(e.path())
                    else {
                        continue;
                    };
                    // UML sizes the file by writing its last byte: wait for that.
                    if f.metadata().map(|m| m.size()).unwrap_or(0) == size {
                        return Ok(f);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the UML kernel (pid {}) created no {size}-byte memory file in {} within {timeout:?}",
                    self.pid(),
                    tmpdir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills the kernel and every helper process of its group, and reaps them.
    pub fn kill(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.pid());
        if self.try_wait().is_none() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait();
        }
        self.reap_helpers();
        let mut running = RUNNING.lock().unwrap();
        if running.as_ref().is_some_and(|(p, _)| *p == self.pid()) {
            *running = None;
        }
    }

    /// UML's helper processes (one per guest address space) outlive a killed kernel for a
    /// moment; as the simulator is their subreaper (see [`become_subreaper`]) they are its
    /// children then. Kill what is left of the group and reap it, so nothing stays behind.
    fn reap_helpers(&mut self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let group = nix::unistd::Pid::from_raw(-self.pid());
        // Only while the group still has children of ours: its id is then still in use.
        match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
            Err(_) => return,
            Ok(WaitStatus::StillAlive) => {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(self.pid()),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Ok(_) => {}
        }
        while let Ok(_) | Err(nix::errno::Errno::EINTR) = waitpid(group, None) {}
    }
}

impl Drop for Uml {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes this process the reaper of orphaned descendants (UML's helpers, once the kernel
/// process is gone), so [`Uml::kill`] can reap them rather than leave them to init.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("hvisor-sim: PR_SET_CHILD_SUBREAPER: {e}; UML's helpers are left to init");
    }
}

/// True when `a` and `b` are the same file (device and inode).
pub fn same_file(a: &impl AsFd, b: &OwnedFd) -> bool {
    let sa = nix::sys::stat::fstat(a.as_fd());
    let sb = nix::sys::stat::fstat(b);
    matches!((sa, sb), (Ok(x), Ok(y)) if x.st_dev == y.st_dev && x.st_ino == y.st_ino)
}
