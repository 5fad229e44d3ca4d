//! Starting worker processes: fork + exec of the device's own binary with a clean environment,
//! its socket to the broker at fd 3, and nothing else inherited.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use protocol::msg::WORKER_SOCKET_FD;
use protocol::{Channel, DeviceKind};

/// The worker binary for `kind`: `hvisor-worker-<kind>` in `dir`.
pub fn worker_binary(dir: &Path, kind: DeviceKind) -> PathBuf {
    dir.join(format!("hvisor-worker-{}", kind.name()))
}

/// The default worker directory: the one holding the broker's own binary.
pub fn default_worker_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the broker binary")?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Starts `binary` and returns its pid and our end of its socket.
pub fn spawn(binary: &Path, args: &[String]) -> Result<(Pid, Channel)> {
    let (ours, theirs) = Channel::pair()?;
    let theirs: OwnedFd = theirs.into_fd();
    let sock = theirs.as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (prctl, getppid, dup2, fcntl, close_range, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The broker may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            let rc = if sock == WORKER_SOCKET_FD {
                libc::fcntl(sock, libc::F_SETFD, 0)
            } else {
                libc::dup2(sock, WORKER_SOCKET_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Whatever else is open closes at exec (kernels before 5.11 lack the flag: then
            // the broker's own O_CLOEXEC discipline is what holds).
            libc::syscall(
                libc::SYS_close_range,
                WORKER_SOCKET_FD as u32 + 1,
                u32::MAX,
                4u32,
            );
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok((Pid::from_raw(child.id() as libc::pid_t), ours))
}

/// "exited with status 3", "killed by SIGSYS (bad system call: seccomp violation)".
pub fn describe_exit(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, 0) => "exited".into(),
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            let what = match sig {
                Signal::SIGSYS => " (seccomp violation)",
                _ => "",
            };
            format!(
                "killed by {}{what}{}",
                sig.as_str(),
                if *core { ", core dumped" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}
