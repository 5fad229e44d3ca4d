//! A stand-in blk worker for sandbox tests: it enters the real sandbox through the worker
//! runtime, then, when the driver activates the device, tries to get out. `--escape` makes
//! every attempt and logs each result (run the broker with `--seccomp trap`, so refused calls
//! fail instead of killing); `--violate` makes one forbidden call (`openat`), as a compromised
//! worker would, to be killed for it.

use std::ffi::CStr;
use std::process::ExitCode;

use protocol::DeviceKind;
use virtio_queue::Queue;
use worker::{Device, GuestMemoryMmap};

struct Probe {
    escape: bool,
    done: bool,
}

impl Device for Probe {
    fn process_queue(&mut self, _: usize, _: &mut Queue, _: &GuestMemoryMmap) -> bool {
        false
    }

    fn activate(&mut self, _features: u64) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if !self.escape {
            // SAFETY: a plain system call on a static path.
            unsafe { libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
            log::error!("probe: openat came back: the sandbox did not kill the worker");
            return;
        }
        for (name, rc) in attempts() {
            let what = if rc < 0 {
                format!("refused ({})", std::io::Error::last_os_error())
            } else {
                format!("SUCCEEDED ({rc})")
            };
            log::info!("probe {name}: {what}");
        }
        log::info!("probe done");
    }
}

fn path(p: &CStr) -> *const libc::c_char {
    p.as_ptr()
}

/// Each attempt: a way out of the sandbox, and what the kernel answered (-1: refused).
fn attempts() -> Vec<(&'static str, i64)> {
    let no_args: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: raw system calls whose pointer arguments are static strings, null, or the
    // null-terminated array above; each is expected to be refused before the kernel acts.
    unsafe {
        vec![
            (
                "open /etc/passwd",
                libc::openat(libc::AT_FDCWD, path(c"/etc/passwd"), libc::O_RDONLY) as i64,
            ),
            (
                "open /proc/self/status",
                libc::openat(libc::AT_FDCWD, path(c"/proc/self/status"), libc::O_RDONLY) as i64,
            ),
            (
                "write to /proc/sys",
                libc::openat(
                    libc::AT_FDCWD,
                    path(c"/proc/sys/kernel/hostname"),
                    libc::O_WRONLY,
                ) as i64,
            ),
            (
                "inet socket",
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
            ),
            (
                "unix socket",
                libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as i64,
            ),
            ("ptrace pid 1", libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0)),
            (
                "mount tmpfs",
                libc::mount(
                    path(c"none"),
                    path(c"/"),
                    path(c"tmpfs"),
                    0,
                    std::ptr::null(),
                ) as i64,
            ),
            ("kill pid 1", libc::kill(1, libc::SIGCONT) as i64),
            (
                "execve /bin/sh",
                libc::execve(path(c"/bin/sh"), no_args.as_ptr(), no_args.as_ptr()) as i64,
            ),
            (
                "fork",
                libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0),
            ),
            ("setresuid 0", libc::setresuid(0, 0, 0) as i64),
            ("unshare user", libc::unshare(libc::CLONE_NEWUSER) as i64),
            ("chroot", libc::chroot(path(c"/")) as i64),
            (
                "map the socket",
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    3,
                    0,
                ) as i64,
            ),
            (
                "executable memory",
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ) as i64,
            ),
            (
                "ioctl",
                libc::ioctl(3, libc::FIONREAD, std::ptr::null_mut::<libc::c_int>()) as i64,
            ),
            (
                "io_uring",
                libc::syscall(libc::SYS_io_uring_setup, 1, std::ptr::null_mut::<u8>()),
            ),
            (
                "bpf",
                libc::syscall(libc::SYS_bpf, 0, std::ptr::null_mut::<u8>(), 0),
            ),
        ]
    }
}

fn main() -> ExitCode {
    let mut escape = false;
    let rest: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| match a.as_str() {
            "--escape" => {
                escape = true;
                false
            }
            "--violate" => false,
            _ => true,
        })
        .collect();
    worker::run_with_args(DeviceKind::Blk, rest.into_iter(), |_, _| {
        Ok(Box::new(Probe {
            escape,
            done: false,
        }))
    })
}
