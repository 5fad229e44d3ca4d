//! A stand-in blk worker for sandbox tests: it enters the real sandbox through the worker
//! runtime, then, when the driver activates the device, acts as a compromised worker would.
//! `--escape` tries every way out and logs each result (run the broker with `--seccomp trap`,
//! so refused calls fail instead of killing); `--violate` makes one forbidden call (`openat`),
//! to be killed for it; `--stdio` reads fds 0-2 and writes forged log lines and a flood to
//! them; `--grow` tries to make its image file larger (also under `--seccomp trap`); `--lie`
//! sets every counter `hvisor-broker status` reads from it to the largest value.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitCode;

use protocol::{DeviceKind, DeviceSetup};
use worker::{Device, GuestMemoryMmap, TrackedQueue};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Violate,
    Escape,
    Stdio,
    Grow,
    Lie,
}

struct Probe {
    mode: Mode,
    done: bool,
    /// The image and its size, for `--grow`.
    image: Option<OwnedFd>,
    size: u64,
}

impl Device for Probe {
    fn process_queue<'m>(
        &mut self,
        _: usize,
        _: &mut TrackedQueue<'m>,
        _: &'m GuestMemoryMmap,
    ) -> bool {
        false
    }

    fn activate(&mut self, _features: u64) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let results: Vec<(&str, std::io::Result<i64>)> = match self.mode {
            Mode::Violate => {
                // SAFETY: a plain system call on a static path.
                unsafe { libc::openat(libc::AT_FDCWD, c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
                log::error!("probe: openat came back: the sandbox did not kill the worker");
                return;
            }
            // (the errno of the last attempt: only refusal matters here)
            Mode::Escape => attempts()
                .into_iter()
                .map(|(n, rc)| (n, checked(rc)))
                .collect(),
            Mode::Stdio => stdio(),
            Mode::Lie => {
                for word in 0..protocol::inflight::COUNTER_WORDS {
                    worker::counters::add(word, u64::MAX);
                }
                vec![("lie", Ok(0))]
            }
            Mode::Grow => match &self.image {
                Some(image) => grow(image.as_raw_fd(), self.size),
                None => vec![("image fd", Err(std::io::ErrorKind::NotFound.into()))],
            },
        };
        for (name, rc) in results {
            let what = match rc {
                Err(e) => format!("refused ({e})"),
                Ok(rc) => format!("SUCCEEDED ({rc})"),
            };
            log::info!("probe {name}: {what}");
        }
        log::info!("probe done");
    }
}

/// A system call's result, with its errno read at once.
fn checked(rc: i64) -> std::io::Result<i64> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// What a worker finds on fds 0-2 (logged: nothing may be there), and whether forged broker
/// log lines and a flood of output can be written to them.
fn stdio() -> Vec<(&'static str, std::io::Result<i64>)> {
    for fd in 0..=2 {
        let mut buf = [0u8; 256];
        // SAFETY: reads into a local buffer of the length given.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let text = String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned();
        log::info!("probe read fd {fd}: {n} {text:?}");
    }
    let forged = b"hvisor-broker[1]: ERROR forged by a worker\n";
    let flood = vec![b'x'; 1 << 20];
    let mut results = Vec::new();
    for (name, fd) in [("forge on fd 1", 1), ("forge on fd 2", 2)] {
        // SAFETY: writes from a static buffer of the length given.
        let rc = unsafe { libc::write(fd, forged.as_ptr().cast(), forged.len()) };
        results.push((name, checked(rc as i64)));
    }
    // SAFETY: writes from a live buffer of the length given.
    let n = unsafe { libc::write(2, flood.as_ptr().cast(), flood.len()) };
    log::info!("probe flood on fd 2: {n}");
    results
}

/// Every way to make the image file larger (-1: refused).
fn grow(fd: i32, size: u64) -> Vec<(&'static str, std::io::Result<i64>)> {
    const BIG: i64 = 8 << 30;
    let sector = [0x5au8; 512];
    let iov = libc::iovec {
        iov_base: sector.as_ptr() as *mut libc::c_void,
        iov_len: sector.len(),
    };
    let end = size as i64;
    let fallocate = |mode: i32, off: i64, len: i64| {
        // SAFETY: a plain system call on the image fd.
        checked(unsafe { libc::fallocate(fd, mode, off, len) } as i64)
    };
    // SAFETY: each write reads one sector from the live buffer above.
    let pwrite = |off: i64| checked(unsafe { libc::pwritev(fd, &iov, 1, off) } as i64);
    vec![
        ("pwrite at the end", pwrite(end)),
        ("pwrite at 8 GiB", pwrite(BIG)),
        ("fallocate mode 0", fallocate(0, end, BIG)),
        (
            "fallocate keep-size",
            fallocate(libc::FALLOC_FL_KEEP_SIZE, end, BIG),
        ),
        (
            "fallocate zero-range",
            fallocate(libc::FALLOC_FL_ZERO_RANGE, end, BIG),
        ),
        (
            "fallocate zero-range keep-size",
            fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                end,
                BIG,
            ),
        ),
        (
            "fallocate insert-range",
            fallocate(libc::FALLOC_FL_INSERT_RANGE, 0, 4096),
        ),
        (
            "fallocate collapse-range",
            fallocate(libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096),
        ),
        // SAFETY: a plain system call on the image fd.
        (
            "ftruncate 8 GiB",
            checked(unsafe { libc::ftruncate(fd, BIG) } as i64),
        ),
    ]
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
    let mut mode = Mode::Violate;
    let rest: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| {
            let m = match a.as_str() {
                "--escape" => Mode::Escape,
                "--violate" => Mode::Violate,
                "--stdio" => Mode::Stdio,
                "--grow" => Mode::Grow,
                "--lie" => Mode::Lie,
                _ => return true,
            };
            mode = m;
            false
        })
        .collect();
    worker::run_with_args(DeviceKind::Blk, rest.into_iter(), |setup, fds| {
        let size = match setup {
            DeviceSetup::Blk { size, .. } => *size,
            _ => 0,
        };
        Ok(Box::new(Probe {
            mode,
            done: false,
            image: fds.into_iter().next(),
            size,
        }))
    })
}
