//! Starting worker processes: a clone into new user, pid, mount, net, ipc and uts namespaces,
//! then exec of the device's own binary with an empty environment, its socket to the broker at
//! fd 3, and nothing else inherited. The worker finishes its sandbox itself (policy::enter)
//! once it has mapped guest memory.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::WaitStatus;
use nix::unistd::{pipe2, Pid};
use protocol::msg::{SandboxSpec, SeccompAction, WORKER_SOCKET_FD};
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

/// Who workers run as, and what a seccomp violation does.
#[derive(Debug, Clone, Copy)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
    pub seccomp: SeccompAction,
}

impl Default for Jail {
    fn default() -> Self {
        // nobody / nogroup: owns no file the worker could reach anyway
        Jail {
            uid: 65534,
            gid: 65534,
            seccomp: SeccompAction::Kill,
        }
    }
}

/// A started worker.
pub struct Spawned {
    pub pid: Pid,
    pub channel: Channel,
    /// What was set up around it; goes to the worker in the Hello.
    pub sandbox: SandboxSpec,
    /// Weaker confinement than asked for, said plainly.
    pub notes: Vec<String>,
}

const ALL_NS: libc::c_int = libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// Starts `binary`. Tries every namespace; where the kernel refuses the user namespace (or
/// all of them), falls back to the strongest confinement it allows and says so.
pub fn spawn(binary: &Path, args: &[String], jail: Jail) -> Result<Spawned> {
    // Everything the child needs is prepared here: after clone it may only make system calls.
    let exe = open(binary, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .with_context(|| format!("opening {}", binary.display()))?;
    let name = CString::new(binary.as_os_str().as_bytes()).context("binary path")?;
    let argv_owned: Vec<CString> = std::iter::once(Ok(name))
        .chain(args.iter().map(|a| CString::new(a.as_str())))
        .collect::<Result<_, _>>()
        .context("worker arguments")?;
    let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let devnull = open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())?;
    let (ours, theirs) = Channel::pair()?;
    let theirs: OwnedFd = theirs.into_fd();
    let (sync_r, sync_w) = pipe2(OFlag::O_CLOEXEC)?;
    let child = ChildArgs {
        sock: theirs.as_raw_fd(),
        sync: sync_r.as_raw_fd(),
        devnull: devnull.as_raw_fd(),
        exe: exe.as_raw_fd(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
    };

    let mut notes = Vec::new();
    let attempts = [
        (ALL_NS | libc::CLONE_NEWUSER, true, true),
        (ALL_NS, true, false),
        (0, false, false),
    ];
    let mut started = None;
    for (flags, namespaces, user_namespace) in attempts {
        // SAFETY: the broker is single-threaded, so the child (a copy of this thread) owns
        // every lock it might see; it only makes raw system calls before exec (`child_main`).
        match unsafe { clone_child(flags, &child) } {
            Ok(pid) => {
                started = Some((pid, namespaces, user_namespace));
                break;
            }
            Err(e) => notes.push(match (namespaces, user_namespace) {
                (true, true) => format!("user namespaces unavailable ({e})"),
                (true, false) => format!("pid/mount/net/ipc/uts namespaces unavailable ({e})"),
                _ => format!("fork failed ({e})"),
            }),
        }
    }
    let Some((pid, namespaces, user_namespace)) = started else {
        bail!("starting {}: {}", binary.display(), notes.join("; "));
    };
    drop(sync_r);
    if user_namespace {
        if let Err(e) = map_ids(pid, jail.uid, jail.gid) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            return Err(e.context("writing the worker's uid/gid maps"));
        }
    }
    // Go: the child is waiting for this byte (or EOF, if we died).
    nix::unistd::write(&sync_w, &[1]).context("releasing the worker")?;
    drop(sync_w);
    Ok(Spawned {
        pid,
        channel: ours,
        sandbox: SandboxSpec {
            namespaces,
            user_namespace,
            uid: jail.uid,
            gid: jail.gid,
            seccomp: jail.seccomp,
        },
        notes,
    })
}

/// The worker's root maps to the unprivileged ids outside; it may never add groups.
fn map_ids(pid: Pid, uid: u32, gid: u32) -> Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    std::fs::write(proc.join("uid_map"), format!("0 {uid} 1\n"))?;
    std::fs::write(proc.join("setgroups"), "deny")?;
    std::fs::write(proc.join("gid_map"), format!("0 {gid} 1\n"))?;
    Ok(())
}

struct ChildArgs {
    sock: RawFd,
    sync: RawFd,
    devnull: RawFd,
    exe: RawFd,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
}

/// clone(2) without a new stack, like fork, but with namespace flags.
///
/// # Safety
/// The caller must be single-threaded; the child runs `child_main` and never returns.
unsafe fn clone_child(flags: libc::c_int, args: &ChildArgs) -> Result<Pid, Errno> {
    // SAFETY: raw clone with a null stack duplicates this thread (see the function's contract).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match rc {
        -1 => Err(Errno::last()),
        // SAFETY: we are the child; see `child_main`.
        0 => unsafe { child_main(args) },
        pid => Ok(Pid::from_raw(pid as libc::pid_t)),
    }
}

/// The child between clone and exec: system calls only, no allocation, no locks.
///
/// # Safety
/// Only in the child of `clone_child`.
unsafe fn child_main(a: &ChildArgs) -> ! {
    // SAFETY: each call is a plain system call on fds and buffers prepared by the parent.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        // Wait for the id maps; EOF means the broker died before releasing us.
        let mut go = 0u8;
        if libc::read(a.sync, (&mut go as *mut u8).cast(), 1) != 1 {
            libc::_exit(1);
        }
        // Become the user namespace's root, which the broker mapped to the unprivileged ids
        // outside (writing the map changes no credentials). Without a user namespace this is a
        // no-op for root; the worker drops to the unprivileged ids itself.
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
        {
            libc::_exit(125);
        }
        libc::dup2(a.devnull, 0);
        libc::dup2(a.devnull, 1);
        let rc = if a.sock == WORKER_SOCKET_FD {
            libc::fcntl(a.sock, libc::F_SETFD, 0)
        } else {
            libc::dup2(a.sock, WORKER_SOCKET_FD)
        };
        if rc < 0 {
            libc::_exit(126);
        }
        // Anything else still open closes at exec (kernels before 5.11 lack the flag; the
        // broker's O_CLOEXEC discipline then holds alone).
        libc::syscall(
            libc::SYS_close_range,
            WORKER_SOCKET_FD as u32 + 1,
            u32::MAX,
            4u32,
        );
        // The broker blocks the signals it reads through signalfds; the worker starts clean.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // By fd: the binary's directory may not be searchable by the worker's uid.
        libc::syscall(
            libc::SYS_execveat,
            a.exe,
            c"".as_ptr(),
            a.argv,
            a.envp,
            libc::AT_EMPTY_PATH,
        );
        libc::_exit(127)
    }
}

/// "exited with status 3", "killed by SIGSYS".
pub fn describe_exit(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, 0) => "exited".into(),
        WaitStatus::Exited(_, 125) => "could not take its ids (status 125)".into(),
        WaitStatus::Exited(_, 126) => "could not set up its socket (status 126)".into(),
        WaitStatus::Exited(_, 127) => "could not be executed (status 127)".into(),
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            format!(
                "killed by {}{}",
                sig.as_str(),
                if *core { ", core dumped" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}
