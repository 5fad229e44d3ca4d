use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

use super::*;

/// Set in a child run of this test binary: the probe to run inside the sandbox.
const PROBE_ENV: &str = "HVISOR_POLICY_PROBE";
const ALIVE: &[u8] = b"probe-survived";

#[test]
fn every_allowlist_compiles_for_this_arch() {
    for kind in [DeviceKind::Blk, DeviceKind::Net, DeviceKind::Console] {
        match allowlist(kind) {
            Some(list) => {
                assert!(!list.is_empty());
                for mode in [SeccompMode::Kill, SeccompMode::Trap, SeccompMode::Log] {
                    let prog = compile(kind, mode).unwrap();
                    assert!(!prog.is_empty());
                }
            }
            None => assert!(matches!(
                compile(kind, SeccompMode::Kill),
                Err(PolicyError::NoAllowlist(_))
            )),
        }
    }
}

#[test]
fn blk_allowlist_is_small_and_printable() {
    let list = allowlist(DeviceKind::Blk).unwrap();
    let names: Vec<&str> = list.iter().map(|a| a.name).collect();
    for forbidden in [
        "openat", "socket", "execve", "ioctl", "ptrace", "mount", "kill",
    ] {
        assert!(
            !names.contains(&forbidden),
            "{forbidden} must not be allowed"
        );
    }
    // clone only for threads; clone3 is listed only so that its ENOSYS refusal wins
    let clone = list.iter().find(|a| a.name == "clone").unwrap();
    assert_eq!(clone.when.len(), 1);
    assert!(refusals()
        .iter()
        .any(|r| r.name == "clone3" && r.errno == libc::ENOSYS));
    // 32 since the rate limits read the clock (clock_gettime, where the vDSO cannot)
    assert!(list.len() <= 32, "{} syscalls", list.len());
    let mmap = list.iter().find(|a| a.name == "mmap").unwrap();
    assert_eq!(
        mmap.to_string(),
        format!(
            "mmap ({}) when arg2 & 0x4 == 0x0 and arg3 & 0x20 == 0x20",
            libc::SYS_mmap
        )
    );
}

#[test]
fn refusals_compile_and_print() {
    assert!(!compile_refusals().unwrap().is_empty());
    let list = refusals();
    assert_eq!(
        list[0].to_string(),
        format!(
            "mremap ({}) fails with EPERM: Operation not permitted",
            libc::SYS_mremap
        )
    );
    // a refused call must pass the allowlist, or the kill would win over the errno
    let allowed = allowlist(DeviceKind::Blk).unwrap();
    for r in &list {
        assert!(
            allowed.iter().any(|a| a.nr == r.nr && a.when.is_empty()),
            "{r}"
        );
    }
}

#[test]
fn mode_parses() {
    assert_eq!("trap".parse::<SeccompMode>().unwrap(), SeccompMode::Trap);
    assert!("allow".parse::<SeccompMode>().is_err());
    assert_eq!(SeccompMode::default(), SeccompMode::Kill);
}

/// Runs one probe in a fresh process (this test binary again, so the sandbox is entered by a
/// single-threaded caller with nothing borrowed from the multi-threaded test runner). Returns
/// the exit status and whether the probe reported that it survived.
fn run_probe(probe: &str) -> (std::process::ExitStatus, bool) {
    let exe = std::env::current_exe().unwrap();
    // stdin: a regular file, for the file-backed mmap probe
    let mut stdin = tempfile_with(b"some data to map");
    stdin.flush().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "tests::sandbox_probe",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, probe)
        // as in a worker, whose environment is empty: a backtrace would open files
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let survived = out.stdout.windows(ALIVE.len()).any(|w| w == ALIVE);
    (out.status, survived)
}

fn tempfile_with(data: &[u8]) -> std::fs::File {
    let fd =
        nix::sys::memfd::memfd_create("probe-input", nix::sys::memfd::MFdFlags::empty()).unwrap();
    let mut f = std::fs::File::from(fd);
    f.write_all(data).unwrap();
    f
}

#[test]
fn allowed_calls_pass_in_the_blk_sandbox() {
    for probe in ["write", "memory", "fcntl_getfd", "mremap"] {
        let (status, survived) = run_probe(probe);
        assert!(
            survived && status.success(),
            "{probe}: {status:?}, survived {survived}"
        );
    }
}

/// A worker's threads (the blk worker's I/O threads) start in `enter_with`'s hook, before the
/// filter, and then work under it: they wait on locks and condition variables, write, and end.
#[test]
fn threads_started_before_the_filter_work_under_it() {
    let (status, survived) = run_probe("threads_before_filter");
    assert!(survived && status.success(), "{status:?}");
}

/// Once in the sandbox no thread can start: RLIMIT_NPROC 0 refuses it with an error (clone for
/// threads passes the filter), and the worker goes on.
#[test]
fn no_thread_starts_after_the_filter() {
    let (status, survived) = run_probe("thread_after_filter");
    assert!(survived && status.success(), "{status:?}");
}

/// RLIMIT_FSIZE (0 here) refuses a write past it with EFBIG, and SIGXFSZ does not kill.
#[test]
fn a_write_past_the_file_size_limit_fails_and_the_worker_goes_on() {
    let (status, survived) = run_probe("write_past_limit");
    assert!(survived && status.success(), "{status:?}");
}

#[test]
fn a_panic_in_the_sandbox_is_an_exit_not_a_seccomp_kill() {
    let (status, survived) = run_probe("panic");
    assert_eq!(status.code(), Some(101), "{status:?}");
    assert!(!survived);
}

#[test]
fn forbidden_calls_kill_the_blk_worker() {
    for probe in [
        "openat",
        "socket",
        "execve",
        "spawn",
        "ioctl",
        "fcntl",
        "mmap_exec",
        "mmap_file",
        "mprotect_exec",
        "ptrace",
        "mount",
        "kill",
        "proc_write",
        "unshare",
        "ftruncate",
        "fallocate_grow",
        "fallocate_zero_range",
        "fallocate_collapse_range",
    ] {
        let (status, survived) = run_probe(probe);
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{probe}: {status:?}, survived {survived}"
        );
        assert!(!survived, "{probe}");
    }
}

/// Calls that cannot be made with arbitrary arguments and return: they end the probe, or
/// (mremap, clone3) are answered by a refusal, which has its own test.
const NOT_PROBED: [&str; 6] = [
    "exit",
    "exit_group",
    "rt_sigreturn",
    "restart_syscall",
    "mremap",
    "clone3",
];

/// Arguments that satisfy `alt` (other arguments: -1, an invalid fd, address and size).
fn args_for(alt: &[ArgCheck]) -> [u64; 6] {
    let mut args = [u64::MAX; 6];
    for c in alt {
        args[c.index as usize] = u64::from(c.value);
    }
    args
}

fn matches(rule: &Allowed, args: &[u64; 6]) -> bool {
    rule.when.is_empty()
        || rule.when.iter().any(|alt| {
            alt.iter()
                .all(|c| (args[c.index as usize] as u32) & c.mask == c.value)
        })
}

/// In the style of Firecracker's seccomp validation: inside the exact filter of each kind,
/// every rule's call with allowed arguments returns (with an error, the arguments being
/// junk), and the same call with one checked argument perturbed kills the worker by SIGSYS.
#[test]
fn every_rule_allows_its_arguments_and_kills_on_any_other() {
    let mut probes = 0;
    for kind in [DeviceKind::Blk, DeviceKind::Net, DeviceKind::Console] {
        for rule in allowlist(kind).unwrap() {
            if NOT_PROBED.contains(&rule.name) {
                continue;
            }
            let alts: Vec<Vec<ArgCheck>> = if rule.when.is_empty() {
                vec![Vec::new()]
            } else {
                rule.when.clone()
            };
            for alt in &alts {
                let args = args_for(alt);
                let (status, survived) = run_raw_probe(kind, rule.nr, &args);
                assert!(
                    survived && status.success(),
                    "{kind} {rule} with {args:x?}: {status:?}"
                );
                probes += 1;
                for c in alt {
                    let mut bad = args;
                    bad[c.index as usize] = u64::from(c.value ^ c.mask);
                    assert!(
                        !matches(&rule, &bad),
                        "{rule}: perturbing {c} still matches"
                    );
                    let (status, survived) = run_raw_probe(kind, rule.nr, &bad);
                    assert_eq!(
                        status.signal(),
                        Some(libc::SIGSYS),
                        "{kind} {rule} with {bad:x?}: {status:?}, survived {survived}"
                    );
                    probes += 1;
                }
            }
        }
    }
    assert!(probes > 60, "{probes} probes");
}

fn run_raw_probe(kind: DeviceKind, nr: i64, args: &[u64; 6]) -> (std::process::ExitStatus, bool) {
    let spec = format!(
        "raw:{}:{nr}:{}",
        kind.name(),
        args.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    run_probe(&spec)
}

/// The body of a child run; does nothing in a normal test run.
#[test]
fn sandbox_probe() {
    let Ok(probe) = std::env::var(PROBE_ENV) else {
        return;
    };
    if let Some(raw) = probe.strip_prefix("raw:") {
        let mut parts = raw.splitn(3, ':');
        let kind = match parts.next().unwrap() {
            "blk" => DeviceKind::Blk,
            "net" => DeviceKind::Net,
            _ => DeviceKind::Console,
        };
        let nr: i64 = parts.next().unwrap().parse().unwrap();
        let a: Vec<u64> = parts
            .next()
            .unwrap()
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        enter_unprivileged(kind);
        // SAFETY: a raw system call; the arguments are junk by design (invalid fds, addresses
        // and sizes) so the kernel refuses them without touching our memory.
        unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
        let _ = nix::unistd::write(std::io::stdout(), ALIVE);
        // At once: the verdict is written, and exit handlers would run beside the test
        // harness's own thread (one raw probe in CI died of SIGSEGV after its call returned).
        // SAFETY: _exit ends the process without touching any of its state.
        unsafe { libc::_exit(0) };
    }
    if probe == "threads_before_filter" {
        threads_before_filter();
    }
    enter_unprivileged(DeviceKind::Blk);
    let stdout = std::io::stdout();
    let stdin = std::io::stdin();
    let page = NonZeroUsize::new(4096).unwrap();
    match probe.as_str() {
        "write" => {}
        "memory" => {
            // large enough for mmap, grown by mremap, freed by munmap
            let mut v = vec![1u8; 1 << 20];
            v.resize(8 << 20, 2);
            assert_eq!(
                v.iter().map(|&b| b as usize).sum::<usize>(),
                (1 << 20) + (14 << 20)
            );
        }
        "openat" => {
            let _ = std::fs::File::open("/");
        }
        "socket" => {
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
        }
        "execve" => {
            let _ = nix::unistd::execv(c"/bin/true", &[c"true"]);
        }
        "spawn" => {
            let _ = Command::new("/bin/true").status();
        }
        "ioctl" => {
            let _ = nix::sys::termios::tcgetattr(&stdout);
        }
        "fcntl" => {
            let _ = nix::fcntl::fcntl(&stdout, nix::fcntl::FcntlArg::F_GETFL);
        }
        "mremap" => {
            use nix::sys::mman::{mmap_anonymous, mremap, MRemapFlags, MapFlags, ProtFlags};
            // SAFETY: a new private anonymous mapping aliases nothing; the mremap is refused,
            // so the mapping stays as it is.
            let grown = unsafe {
                let p = mmap_anonymous(
                    None,
                    page,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_PRIVATE,
                )
                .unwrap();
                mremap(
                    p,
                    page.get(),
                    4 * page.get(),
                    MRemapFlags::MREMAP_MAYMOVE,
                    None,
                )
            };
            assert_eq!(grown.unwrap_err(), nix::errno::Errno::EPERM);
        }
        "fcntl_getfd" => {
            nix::fcntl::fcntl(&stdout, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        }
        "mmap_exec" => {
            use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
            // SAFETY: a new private anonymous mapping aliases nothing.
            let _ = unsafe {
                mmap_anonymous(
                    None,
                    page,
                    ProtFlags::PROT_READ | ProtFlags::PROT_EXEC,
                    MapFlags::MAP_PRIVATE,
                )
            };
        }
        "mmap_file" => {
            use nix::sys::mman::{mmap, MapFlags, ProtFlags};
            // SAFETY: a new read-only mapping of our own stdin file aliases nothing.
            let _ = unsafe {
                mmap(
                    None,
                    page,
                    ProtFlags::PROT_READ,
                    MapFlags::MAP_SHARED,
                    &stdin,
                    0,
                )
            };
        }
        "mprotect_exec" => {
            use nix::sys::mman::{mmap_anonymous, mprotect, MapFlags, ProtFlags};
            // SAFETY: the page is a new private anonymous mapping that nothing else refers to;
            // changing its protection affects no Rust object.
            let _ = unsafe {
                mmap_anonymous(
                    None,
                    page,
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_PRIVATE,
                )
                .and_then(|p| mprotect(p, page.get(), ProtFlags::PROT_READ | ProtFlags::PROT_EXEC))
            };
        }
        "ptrace" => {
            // SAFETY: a raw call; refused before the kernel acts on it.
            unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
        }
        "mount" => {
            let _ = nix::mount::mount(
                Some("none"),
                "/",
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            );
        }
        "kill" => {
            // the broker, were it reachable
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(1),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        "proc_write" => {
            let _ = std::fs::write("/proc/self/comm", "escaped");
        }
        "unshare" => {
            let _ = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER);
        }
        "write_past_limit" => {
            let data = [std::io::IoSlice::new(b"grow")];
            let r = nix::sys::uio::pwritev(&stdin, &data, 1 << 20);
            assert_eq!(r, Err(nix::errno::Errno::EFBIG));
        }
        "ftruncate" => {
            let _ = nix::unistd::ftruncate(&stdin, 8 << 30);
        }
        "fallocate_grow" => fallocate(&stdin, nix::fcntl::FallocateFlags::empty()),
        "fallocate_zero_range" => fallocate(
            &stdin,
            nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        ),
        "fallocate_collapse_range" => {
            fallocate(&stdin, nix::fcntl::FallocateFlags::FALLOC_FL_COLLAPSE_RANGE)
        }
        "thread_after_filter" => {
            assert!(std::thread::Builder::new().spawn(|| {}).is_err());
        }
        "panic" => panic!("a worker bug"),
        other => panic!("unknown probe {other}"),
    }
    let _ = nix::unistd::write(&stdout, ALIVE);
    // the ordinary exit path of a worker
    std::process::exit(0);
}

/// 8 GiB from the end of a 16-byte file: each mode would grow it or allocate blocks.
fn fallocate(file: &std::io::Stdin, mode: nix::fcntl::FallocateFlags) {
    let _ = nix::fcntl::fallocate(file, mode, 16, 8 << 30);
}

/// Four threads started in the hook; once the filter is in, they take turns on a lock, wait on
/// a condition variable, report through a channel, write to stdout and end.
fn threads_before_filter() {
    use std::sync::{mpsc, Arc, Condvar, Mutex};
    let go = Arc::new((Mutex::new(false), Condvar::new()));
    let (done_tx, done_rx) = mpsc::channel();
    let mut handles = Vec::new();
    enter_unprivileged_with(DeviceKind::Blk, || {
        let (started_tx, started_rx) = mpsc::channel();
        for i in 0..4u32 {
            let (go, done_tx, started_tx) = (go.clone(), done_tx.clone(), started_tx.clone());
            handles.push(std::thread::spawn(move || {
                started_tx.send(()).unwrap();
                let (lock, cv) = &*go;
                let mut g = lock.lock().unwrap();
                while !*g {
                    g = cv.wait(g).unwrap();
                }
                drop(g);
                let _ = nix::unistd::write(std::io::stdout(), b"");
                done_tx.send(i).unwrap();
            }));
        }
        for _ in 0..4 {
            started_rx.recv().unwrap();
        }
        Ok(())
    });
    *go.0.lock().unwrap() = true;
    go.1.notify_all();
    let mut seen: Vec<u32> = (0..4).map(|_| done_rx.recv().unwrap()).collect();
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2, 3]);
    for h in handles {
        h.join().unwrap();
    }
    let _ = nix::unistd::write(std::io::stdout(), ALIVE);
    std::process::exit(0);
}

/// The whole recipe but for namespaces (the test runs without the broker).
fn enter_unprivileged(kind: DeviceKind) {
    enter_unprivileged_with(kind, || Ok(()));
}

fn enter_unprivileged_with(kind: DeviceKind, spawn: impl FnOnce() -> Result<(), String>) {
    let spec = SandboxSpec {
        namespaces: false,
        user_namespace: false,
        uid: 65534,
        gid: 65534,
        seccomp: protocol::msg::SeccompAction::Kill,
        file_size_limit: 0,
    };
    enter_with(kind, &spec, -1, spawn).expect("entering the sandbox");
}
