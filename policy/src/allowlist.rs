//! The per-device seccomp allowlists, written next to each other so they can be compared.
//!
//! Each list is as small as that worker's event loop needs, plus what Rust std and the C library
//! (glibc or musl) call on their own: allocation, locks, signal masks, and the error path (a
//! message through the logger, then `exit_group`). Everything not listed kills the worker.
//!
//! Opening files, sockets, `ioctl`, `execve` and new processes are absent on purpose: the broker
//! opens every resource and passes the fds before the filter is installed. A worker's threads
//! (the blk worker's I/O threads) are started just before the filter too, so their startup
//! calls need not be allowed; `clone` passes for threads only, which RLIMIT_NPROC 0 refuses by
//! then anyway. `fcntl` is allowed for `F_GETFD` only.

use std::fmt;

use protocol::DeviceKind;

/// One allowed system call and the argument values it is allowed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub name: &'static str,
    pub nr: i64,
    /// Alternatives: the call passes when every check of any one alternative holds.
    /// Empty: any arguments.
    pub when: Vec<Vec<ArgCheck>>,
}

/// `(arg[index] & mask) == value`, on the low 32 bits (every checked argument is an `int`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgCheck {
    pub index: u8,
    pub mask: u32,
    pub value: u32,
}

impl ArgCheck {
    const fn eq(index: u8, value: i32) -> Self {
        ArgCheck {
            index,
            mask: u32::MAX,
            value: value as u32,
        }
    }

    /// The bits of `flag` are all clear.
    const fn clear(index: u8, flag: i32) -> Self {
        ArgCheck {
            index,
            mask: flag as u32,
            value: 0,
        }
    }

    /// The bits of `flag` are all set.
    const fn set(index: u8, flag: i32) -> Self {
        ArgCheck {
            index,
            mask: flag as u32,
            value: flag as u32,
        }
    }
}

impl fmt::Display for ArgCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mask == u32::MAX {
            write!(f, "arg{} == {:#x}", self.index, self.value)
        } else {
            write!(
                f,
                "arg{} & {:#x} == {:#x}",
                self.index, self.mask, self.value
            )
        }
    }
}

impl fmt::Display for Allowed {
    /// One line per syscall, e.g. `mmap  when arg2 & 0x4 == 0x0 and arg3 & 0x20 == 0x20`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.nr)?;
        for (i, alt) in self.when.iter().enumerate() {
            f.write_str(if i == 0 { " when " } else { " or " })?;
            for (j, check) in alt.iter().enumerate() {
                if j > 0 {
                    f.write_str(" and ")?;
                }
                write!(f, "{check}")?;
            }
        }
        Ok(())
    }
}

macro_rules! sys {
    ($name:ident) => {
        Allowed {
            name: stringify!($name).trim_start_matches("SYS_"),
            nr: libc::$name as i64,
            when: Vec::new(),
        }
    };
    ($name:ident, $($alt:expr),+ $(,)?) => {
        Allowed {
            name: stringify!($name).trim_start_matches("SYS_"),
            nr: libc::$name as i64,
            when: vec![$($alt.to_vec()),+],
        }
    };
}

/// The errno of every refused call.
pub const REFUSED_ERRNO: i32 = libc::EPERM;

/// A call the allowlist lets through that must nevertheless fail with [`REFUSED_ERRNO`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub name: &'static str,
    pub nr: i64,
    pub errno: i32,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}) fails with {}",
            self.name,
            self.nr,
            nix::errno::Errno::from_raw(self.errno)
        )
    }
}

/// Calls refused with an error instead of a kill, for every kind. Seccomp cannot compare two
/// arguments, so `mremap` cannot be allowed only when it does not grow a mapping; and grown, a
/// shared mapping of guest memory would reach past its region into the rest of the memory file
/// (the simulator's file holds every zone). The C libraries' realloc falls back to
/// malloc + copy when mremap fails.
///
/// `clone3` cannot be filtered on its flags (they sit in a struct in memory): it answers
/// ENOSYS, on which the C libraries fall back to `clone`, whose flags the allowlist checks.
pub fn refusals() -> Vec<Refused> {
    vec![
        Refused {
            name: "mremap",
            nr: libc::SYS_mremap,
            errno: REFUSED_ERRNO,
        },
        Refused {
            name: "clone3",
            nr: libc::SYS_clone3,
            errno: libc::ENOSYS,
        },
    ]
}

/// The allowlist of a device kind, or `None` while that kind has no worker.
pub fn allowlist(kind: DeviceKind) -> Option<Vec<Allowed>> {
    let mut list = common();
    match kind {
        DeviceKind::Blk => list.extend(blk()),
        DeviceKind::Net => list.extend(net()),
        DeviceKind::Console => list.extend(console()),
    }
    list.sort_by_key(|a| a.nr);
    Some(list)
}

/// What every worker needs: its socket and eventfds, memory, and the runtime's own calls.
fn common() -> Vec<Allowed> {
    vec![
        // eventfds (kick read, call write); stdio is /dev/null
        sys!(SYS_read),
        sys!(SYS_write),
        sys!(SYS_close),
        // Only asks whether an fd is open: std's debug builds check that before every close.
        sys!(SYS_fcntl, [ArgCheck::eq(1, libc::F_GETFD)]),
        // the broker socket; fds arriving with a malformed message are closed
        sys!(SYS_recvmsg),
        sys!(SYS_sendmsg),
        sys!(SYS_epoll_pwait),
        // glibc calls epoll_wait where the kernel has it; musl tries epoll_pwait first.
        #[cfg(target_arch = "x86_64")]
        sys!(SYS_epoll_wait),
        // Anonymous memory only, never executable: guest memory was mapped before the filter,
        // so no file-backed mapping (in particular of the zone memory fd) can be made again.
        sys!(
            SYS_mmap,
            [
                ArgCheck::clear(2, libc::PROT_EXEC),
                ArgCheck::set(3, libc::MAP_ANONYMOUS)
            ]
        ),
        sys!(SYS_mprotect, [ArgCheck::clear(2, libc::PROT_EXEC)]),
        sys!(SYS_munmap),
        // Allowed here only so that the refusal below wins over a kill (see `refusals`).
        sys!(SYS_mremap),
        sys!(SYS_brk),
        // free() returning pages: glibc uses DONTNEED, musl FREE
        sys!(
            SYS_madvise,
            [ArgCheck::eq(2, libc::MADV_DONTNEED)],
            [ArgCheck::eq(2, libc::MADV_FREE)]
        ),
        sys!(SYS_futex),
        sys!(SYS_sched_yield),
        // Rate limits read the monotonic clock; the vDSO answers without a system call where
        // the clock source allows, this where it does not.
        sys!(SYS_clock_gettime, [ArgCheck::eq(0, libc::CLOCK_MONOTONIC)]),
        // std's hash seeds, drawn lazily
        sys!(SYS_getrandom),
        sys!(SYS_rt_sigprocmask),
        sys!(SYS_rt_sigreturn),
        sys!(SYS_sigaltstack),
        // std names the thread by id in a panic message
        sys!(SYS_gettid),
        sys!(SYS_restart_syscall),
        sys!(SYS_exit_group),
        // ends only the calling thread
        sys!(SYS_exit),
        // Threads only, never a new process; and RLIMIT_NPROC 0 refuses even threads once the
        // filter is in (a worker starts its threads just before).
        sys!(SYS_clone, [ArgCheck::set(0, libc::CLONE_THREAD)]),
        // Allowed here only so that the ENOSYS refusal wins over a kill (see `refusals`).
        sys!(SYS_clone3),
    ]
}

/// virtio-blk: zero-copy I/O on the image fd.
fn blk() -> Vec<Allowed> {
    vec![
        sys!(SYS_preadv),
        // A read served at once from the page cache, only where it needs no waiting.
        sys!(SYS_preadv2, [ArgCheck::eq(5, libc::RWF_NOWAIT)]),
        sys!(SYS_pwritev),
        sys!(SYS_fdatasync),
        // DISCARD and WRITE_ZEROES with UNMAP: a hole punched inside the image (also on block
        // devices). No other mode: mode 0 and ZERO_RANGE allocate disk space (ZERO_RANGE past
        // the end even with KEEP_SIZE), INSERT/COLLAPSE_RANGE change the size. Writes stay
        // within the image by RLIMIT_FSIZE.
        sys!(
            SYS_fallocate,
            [ArgCheck::eq(
                1,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            )]
        ),
    ]
}

/// The event loop re-arms its host fd (tap, pty) as the guest posts or stops posting buffers;
/// it never adds a new fd.
fn host_fd_events() -> Allowed {
    sys!(
        SYS_epoll_ctl,
        [ArgCheck::eq(1, libc::EPOLL_CTL_MOD)],
        [ArgCheck::eq(1, libc::EPOLL_CTL_DEL)]
    )
}

/// virtio-net: one `writev` per transmitted frame, straight out of the guest's buffers, and
/// one `readv` per received frame into them (plus a local tail for what does not fit). The
/// tap is watched for readability only while the guest has receive buffers.
fn net() -> Vec<Allowed> {
    vec![host_fd_events(), sys!(SYS_readv), sys!(SYS_writev)]
}

/// virtio-console: a chain's guest buffers are written to, or filled from, the broker's pipes
/// in one `writev`/`readv`, straight from guest memory; the loop watches the transmit pipe for
/// writability only while output is held, the receive pipe for readability only while the
/// guest has receive buffers.
fn console() -> Vec<Allowed> {
    vec![host_fd_events(), sys!(SYS_readv), sys!(SYS_writev)]
}
