//! The steps of the recipe before capabilities go: an empty root, resource limits, locked
//! securebits and the unprivileged ids.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{signal, SigHandler, Signal};
use nix::unistd::{chdir, chroot, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

use crate::PolicyError;

/// Where the empty root is mounted before it becomes `/`: the first of these that exists (an
/// initramfs may lack some). Our own mount namespace, so the host does not see it.
const MOUNT_POINTS: [&str; 4] = ["/tmp", "/mnt", "/run", "/dev"];

fn step(what: &'static str) -> impl Fn(Errno) -> PolicyError {
    move |e| PolicyError::Step { what, errno: e }
}

/// Makes an empty, read-only tmpfs the root. `own_mount_ns`: the worker has its own mount
/// namespace, so mounting does not touch the host. Returns how it was done, for the audit.
pub fn empty_root(own_mount_ns: bool) -> Result<String, PolicyError> {
    if !own_mount_ns {
        return Ok(
            "host root kept: no mount namespace (files stay unreachable: no open or \
                   openat is allowed)"
                .into(),
        );
    }
    // Nothing we mount may propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("making / private"))?;
    let dir = MOUNT_POINTS
        .iter()
        .find(|d| Path::new(d).is_dir())
        .ok_or(PolicyError::Step {
            what: "finding a mount point",
            errno: Errno::ENOENT,
        })?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        *dir,
        Some("tmpfs"),
        flags,
        Some("size=4k,nr_inodes=4,mode=0555"),
    )
    .map_err(step("mounting the empty root"))?;
    chdir(*dir).map_err(step("entering the empty root"))?;
    let how = match pivot_root(".", ".") {
        Ok(()) => {
            // The old root is stacked under the new one: detach it.
            umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the old root"))?;
            "pivot_root into an empty read-only tmpfs".to_string()
        }
        // An initramfs root cannot be pivoted away from; chroot confines as well once no
        // capability (CAP_SYS_CHROOT, CAP_SYS_ADMIN) remains to break out with.
        Err(Errno::EINVAL) => {
            chroot(".").map_err(step("chroot into the empty root"))?;
            "chroot into an empty read-only tmpfs (pivot_root refused, as on an initramfs root)"
                .to_string()
        }
        Err(e) => {
            return Err(PolicyError::Step {
                what: "pivot_root",
                errno: e,
            })
        }
    };
    chdir("/").map_err(step("entering /"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
        None::<&str>,
    )
    .map_err(step("making the root read-only"))?;
    Ok(how)
}

/// The highest open fd, read before the root (and /proc with it) goes away.
pub fn highest_fd() -> i32 {
    std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .max()
                .unwrap_or(2)
        })
        .unwrap_or(64)
}

/// No new fds beyond those held, no file grown past `file_size`, no core dumps, nothing
/// locked. (No new processes or threads comes last: [`forbid_new_processes`].)
pub fn limit_resources(highest_fd: i32, file_size: u64) -> Result<(), PolicyError> {
    let fds = (highest_fd.max(2) + 1) as u64;
    setrlimit(Resource::RLIMIT_NOFILE, fds, fds).map_err(step("RLIMIT_NOFILE"))?;
    // A write past the limit then fails with EFBIG instead of killing the worker.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.map_err(step("ignoring SIGXFSZ"))?;
    setrlimit(Resource::RLIMIT_FSIZE, file_size, file_size).map_err(step("RLIMIT_FSIZE"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("RLIMIT_CORE"))?;
    setrlimit(Resource::RLIMIT_MEMLOCK, 0, 0).map_err(step("RLIMIT_MEMLOCK"))?;
    Ok(())
}

/// No new processes or threads, once the worker has started its own threads (without
/// capabilities, nothing exempts it from the limit).
pub fn forbid_new_processes() -> Result<(), PolicyError> {
    setrlimit(Resource::RLIMIT_NPROC, 0, 0).map_err(step("RLIMIT_NPROC"))
}

/// Root gets no capabilities back from any uid change or exec, and none of this can be undone.
pub fn lock_securebits() -> Result<(), PolicyError> {
    const NOROOT: libc::c_ulong = 1 << 0;
    const NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    const KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
    const NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
    const NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
    let bits = NOROOT
        | NOROOT_LOCKED
        | NO_SETUID_FIXUP
        | NO_SETUID_FIXUP_LOCKED
        | KEEP_CAPS_LOCKED
        | NO_CAP_AMBIENT_RAISE
        | NO_CAP_AMBIENT_RAISE_LOCKED;
    // SAFETY: PR_SET_SECUREBITS takes an integer; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) } != 0 {
        return Err(PolicyError::Step {
            what: "locking securebits",
            errno: Errno::last(),
        });
    }
    Ok(())
}

/// Becomes `uid`/`gid` with no supplementary groups (outside a user namespace: inside one the
/// broker already mapped the worker's root to these ids).
pub fn become_user(uid: u32, gid: u32) -> Result<(), PolicyError> {
    setgroups(&[]).map_err(step("setgroups"))?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(step("setresgid"))?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(step("setresuid"))?;
    Ok(())
}
