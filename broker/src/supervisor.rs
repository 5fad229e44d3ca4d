//! Starting worker processes: a clone into new user, pid, mount, net, ipc and uts namespaces,
//! with ids of its own and in a cgroup of its own, then exec of the device's own binary with
//! an empty environment, its socket to the broker at fd 3, /dev/null as stdio, and nothing
//! else inherited. The worker finishes its sandbox itself (policy::enter) once it has mapped
//! guest memory.

use std::cell::{OnceCell, RefCell};
use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::WaitStatus;
use nix::unistd::{pipe2, Pid};
use protocol::msg::{SandboxSpec, SeccompAction, WORKER_SOCKET_FD};
use protocol::{Channel, DeviceKind, DeviceSetup};

use crate::cgroup;

/// The worker binary for `kind`: `hvisor-worker-<kind>` in `dir`.
pub fn worker_binary(dir: &Path, kind: DeviceKind) -> PathBuf {
    dir.join(format!("hvisor-worker-{}", kind.name()))
}

/// The default worker directory: the one holding the broker's own binary.
pub fn default_worker_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the broker binary")?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The ids workers run as (`--worker-ids FIRST:COUNT`): one uid, and the gid of the same
/// number, per live worker, so no worker shares its ids with another worker or with any other
/// service (`nobody` is shared by many, and any process running as it could signal or trace
/// a worker running as it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub count: u32,
}

impl IdRange {
    /// "HV" in the top half: far above the ranges of system and human users and of the
    /// usual subordinate ids (/etc/subuid), below 2^31, and 1024 ids: room for any zone set.
    pub const DEFAULT: IdRange = IdRange {
        first: 0x4856_0000,
        count: 1024,
    };

    fn contains(&self, id: u32) -> bool {
        id.checked_sub(self.first)
            .is_some_and(|off| off < self.count)
    }
}

impl std::str::FromStr for IdRange {
    type Err = String;

    /// `FIRST:COUNT`, each decimal or 0x-hex.
    fn from_str(s: &str) -> Result<Self, String> {
        let number = |x: &str| {
            match x.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => x.parse(),
            }
            .map_err(|_| format!("{x:?} is not a number"))
        };
        let (first, count) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected FIRST:COUNT"))?;
        let range = IdRange {
            first: number(first)?,
            count: number(count)?,
        };
        let last = range
            .count
            .checked_sub(1)
            .and_then(|n| range.first.checked_add(n));
        // (uid_t)-1 means "unchanged" to the set*id calls
        if last.is_none_or(|l| l == u32::MAX) {
            return Err(format!("{s}: not a range of valid ids"));
        }
        if range.first == 0 {
            return Err("workers never run as root".into());
        }
        if range.contains(65534) || range.contains(65535) {
            return Err(format!(
                "{s}: includes 65534/65535 (nobody), ids other processes run as"
            ));
        }
        Ok(range)
    }
}

/// The ids of live workers, handed out in turn (an id comes back as late as possible).
#[derive(Debug)]
struct IdPool {
    range: IdRange,
    next: u32,
    live: BTreeSet<u32>,
}

impl IdPool {
    fn take(&mut self) -> Option<u32> {
        let range = self.range;
        let id = (0..range.count)
            .map(|i| range.first + (self.next + i) % range.count)
            .find(|id| !self.live.contains(id))?;
        self.live.insert(id);
        self.next = (id - range.first + 1) % range.count;
        Some(id)
    }
}

/// Who workers run as, where they are placed, and what a seccomp violation does.
pub struct Jail {
    pub seccomp: SeccompAction,
    ids: Rc<RefCell<IdPool>>,
    cgroup_options: cgroup::Options,
    /// Set up at the first spawn: the hierarchies, or why there are none.
    cgroups: OnceCell<Result<cgroup::Hierarchies, String>>,
}

impl Jail {
    pub fn new(ids: IdRange, seccomp: SeccompAction, cgroups: cgroup::Options) -> Jail {
        Jail {
            seccomp,
            ids: Rc::new(RefCell::new(IdPool {
                range: ids,
                next: 0,
                live: BTreeSet::new(),
            })),
            cgroup_options: cgroups,
            cgroups: OnceCell::new(),
        }
    }
}

impl Default for Jail {
    fn default() -> Self {
        Jail::new(
            IdRange::DEFAULT,
            SeccompAction::Kill,
            cgroup::Options::default(),
        )
    }
}

/// What a worker holds while it lives: its ids and its cgroup. Dropped once the worker was
/// reaped, which frees both.
#[derive(Debug)]
pub struct Lease {
    pub uid: u32,
    pool: Rc<RefCell<IdPool>>,
    cgroup: Option<cgroup::Cgroup>,
}

impl Lease {
    /// The worker's cgroup directories (none where it has no cgroup).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup
            .as_ref()
            .map(|c| c.dirs().to_vec())
            .unwrap_or_default()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.borrow_mut().live.remove(&self.uid);
    }
}

/// The device a worker serves, which decides its cgroup and its file size limit.
pub struct Placement {
    pub kind: DeviceKind,
    pub zone: u32,
    pub addr: u64,
    /// RLIMIT_FSIZE: a writable disk's size, else 0.
    pub file_size_limit: u64,
    /// Workers of this device started before this one.
    pub generation: u32,
}

impl Placement {
    pub fn of(zone: u32, addr: u64, setup: &DeviceSetup) -> Placement {
        let file_size_limit = match setup {
            DeviceSetup::Blk {
                readonly: false,
                size,
                ..
            } => *size,
            _ => 0,
        };
        Placement {
            kind: setup.kind(),
            zone,
            addr,
            file_size_limit,
            generation: 0,
        }
    }

    /// Unique among the workers of every broker on the host, restarted ones included (a
    /// dead worker's cgroup may linger a moment).
    fn cgroup_name(&self) -> String {
        let restart = match self.generation {
            0 => String::new(),
            n => format!("-r{n}"),
        };
        format!(
            "broker{}-zone{}-{}-{:#x}{restart}",
            std::process::id(),
            self.zone,
            self.kind.name(),
            self.addr
        )
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
    pub lease: Lease,
}

const ALL_NS: libc::c_int = libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

impl Jail {
    /// Starts `binary` for the device of `placement`, with ids of its own. Tries every
    /// namespace; where the kernel refuses the user namespace (or all of them), or gives no
    /// cgroup, falls back to the strongest confinement it allows and says so.
    pub fn spawn(&self, binary: &Path, args: &[String], placement: Placement) -> Result<Spawned> {
        let uid = self.ids.borrow_mut().take().with_context(|| {
            format!(
                "no free worker id: all {} of --worker-ids are in use",
                self.ids.borrow().range.count
            )
        })?;
        let lease = Lease {
            uid,
            pool: self.ids.clone(),
            cgroup: None,
        };
        let mut spawned = start(binary, args, uid, lease, |pid| self.place(&placement, pid))?;
        spawned.sandbox.seccomp = self.seccomp;
        spawned.sandbox.file_size_limit = placement.file_size_limit;
        Ok(spawned)
    }

    /// Puts worker `pid` in a cgroup of its own; or says why it has none.
    fn place(&self, placement: &Placement, pid: Pid) -> (Option<cgroup::Cgroup>, Vec<String>) {
        let hierarchies = self
            .cgroups
            .get_or_init(|| cgroup::Hierarchies::open(&self.cgroup_options.root));
        let h = match hierarchies {
            Ok(h) => h,
            Err(e) => return (None, vec![format!("no cgroup of its own: {e}")]),
        };
        let limits = self.cgroup_options.limits(placement.kind);
        match h.place(&placement.cgroup_name(), &limits, pid) {
            Ok(c) => (Some(c), h.missing.clone()),
            Err(e) => (None, vec![format!("no cgroup of its own: {e}")]),
        }
    }
}

/// Clones and starts `binary` as `uid` (and the gid of that number); `place` puts the child
/// in its cgroup before it may run.
fn start(
    binary: &Path,
    args: &[String],
    uid: u32,
    mut lease: Lease,
    place: impl FnOnce(Pid) -> (Option<cgroup::Cgroup>, Vec<String>),
) -> Result<Spawned> {
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
        if let Err(e) = map_ids(pid, uid, uid) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            return Err(e.context("writing the worker's uid/gid maps"));
        }
    }
    let (cgroup, cgroup_notes) = place(pid);
    lease.cgroup = cgroup;
    notes.extend(cgroup_notes);
    // Go: the child is waiting for this byte (or EOF, if we died).
    nix::unistd::write(&sync_w, &[1]).context("releasing the worker")?;
    drop(sync_w);
    Ok(Spawned {
        pid,
        channel: ours,
        sandbox: SandboxSpec {
            namespaces,
            user_namespace,
            uid,
            gid: uid,
            seccomp: SeccompAction::Kill,
            file_size_limit: 0,
        },
        notes,
        lease,
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
        // Nothing of the broker's: its stderr may be the operator's terminal, and its log
        // has a budget a worker must not get around. The worker logs through its socket.
        for fd in 0..=2 {
            libc::dup2(a.devnull, fd);
        }
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
