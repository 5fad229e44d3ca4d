//! hvisor-worker-blk as a real process under its real sandbox, driven the way the broker drives
//! it: socket at fd 3, Hello with fds, Activate, kicks, calls, Shutdown.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use protocol::channel::wait_readable;
use protocol::msg::{PROTOCOL_VERSION, WORKER_SOCKET_FD};
use protocol::{BrokerMsg, Channel, DeviceSetup, MemoryRegion, QueueConfig, WorkerMsg};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 1 << 20;
const QSIZE: u16 = 64;
const IMAGE_SIZE: u64 = 1 << 20;
const HDR: u64 = RAM + 0x1_0000;
const DATA: u64 = RAM + 0x2_0000;
const STATUS: u64 = RAM + 0x8_0000;
/// The used ring, placed by hand: `MockSplitQueue::create` lays it over the tail of the
/// available ring, where the device's used elements would overwrite `used_event`.
const USED: GuestAddress = GuestAddress(RAM + 0x4000);

/// Starts the worker with `sock` as its fd 3, the way the broker does.
fn spawn(sock: Option<OwnedFd>, args: &[&str]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hvisor-worker-blk"));
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(sock) = sock {
        let raw = sock.as_raw_fd();
        // SAFETY: runs in the forked child before exec and only makes the async-signal-safe
        // calls dup2 and close_range; `sock` stays open in the parent until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, WORKER_SOCKET_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // nothing else open, like the broker's workers (fds of concurrent tests)
                libc::syscall(
                    libc::SYS_close_range,
                    WORKER_SOCKET_FD as u32 + 1,
                    u32::MAX,
                    0u32,
                );
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(sock);
        child
    } else {
        cmd.spawn().unwrap()
    }
}

fn wait(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "worker did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The next non-Log message from the worker.
fn next(broker: &Channel) -> WorkerMsg {
    loop {
        match broker
            .recv::<WorkerMsg>(Some(Duration::from_secs(10)))
            .unwrap()
        {
            (WorkerMsg::Log { level, message }, _) => eprintln!("worker log {level}: {message}"),
            (WorkerMsg::Confined { root, notes }, _) => {
                eprintln!("worker confined: {root} {notes:?}")
            }
            (m, _) => return m,
        }
    }
}

fn eventfd() -> EventFd {
    EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).unwrap()
}

struct Guest {
    ram: OwnedFd,
    record: OwnedFd,
    mem: GuestMemoryMmap,
    image: File,
    kick: EventFd,
    call: EventFd,
}

fn guest() -> Guest {
    let ram =
        nix::sys::memfd::memfd_create("worker-test-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .unwrap();
    nix::unistd::ftruncate(&ram, RAM_SIZE as i64).unwrap();
    let mem = worker::memory::map_regions(ram.as_fd(), &regions()).unwrap();
    let image = tempfile::tempfile().unwrap();
    image.set_len(IMAGE_SIZE).unwrap();
    let record =
        nix::sys::memfd::memfd_create("record", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&record, protocol::inflight::bytes(1) as i64).unwrap();
    Guest {
        ram,
        record,
        mem,
        image,
        kick: eventfd(),
        call: eventfd(),
    }
}

fn regions() -> Vec<MemoryRegion> {
    vec![MemoryRegion {
        guest_addr: RAM,
        size: RAM_SIZE,
        file_offset: 0,
    }]
}

fn hello(version: u32) -> BrokerMsg {
    BrokerMsg::Hello {
        version,
        zone: 1,
        label: "zone1 blk@0xa003c00".into(),
        regions: regions(),
        num_queues: 1,
        setup: DeviceSetup::Blk {
            readonly: false,
            size: IMAGE_SIZE,
            serial: "process-test".into(),
        },
        // started directly by this test, without the broker's namespaces
        sandbox: protocol::msg::SandboxSpec {
            namespaces: false,
            user_namespace: false,
            uid: 65534,
            gid: 65534,
            seccomp: protocol::msg::SeccompAction::Kill,
            file_size_limit: IMAGE_SIZE,
        },
    }
}

fn send_hello(broker: &Channel, g: &Guest, version: u32) {
    let fds: [BorrowedFd; 5] = [
        g.ram.as_fd(),
        g.record.as_fd(),
        g.kick.as_fd(),
        g.call.as_fd(),
        g.image.as_fd(),
    ];
    broker.send(&hello(version), &fds, false).unwrap();
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).map(str::trim))
        .unwrap_or_else(|| panic!("no {name} in /proc status"))
}

#[test]
fn serves_requests_inside_its_sandbox() {
    let g = guest();
    let (broker, theirs) = Channel::pair().unwrap();
    let mut child = spawn(Some(theirs.into_fd()), &[]);
    send_hello(&broker, &g, PROTOCOL_VERSION);
    let WorkerMsg::Ready { version, pid } = next(&broker) else {
        panic!("expected Ready");
    };
    assert_eq!((version, pid), (PROTOCOL_VERSION, child.id()));

    // the sandbox as /proc shows it
    let st = proc_status(pid);
    assert_eq!(field(&st, "Seccomp:"), "2");
    assert_eq!(field(&st, "NoNewPrivs:"), "1");
    // the event loop and its 16 I/O threads, each under the same filter
    assert_eq!(field(&st, "Threads:"), "17");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let st = std::fs::read_to_string(task.join("status")).unwrap();
        assert_eq!(field(&st, "Seccomp:"), "2");
        assert_eq!(field(&st, "CapEff:"), "0000000000000000");
        assert_eq!(field(&st, "CapPrm:"), "0000000000000000");
    }
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(&st, caps), "0000000000000000", "{caps}");
    }
    if nix::unistd::geteuid().is_root() {
        assert_eq!(field(&st, "CapBnd:"), "0000000000000000");
    }
    // the guest memory fd is closed; the mapping stays
    let mut fds = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(e.unwrap().path()).unwrap();
        fds.push(target.to_string_lossy().into_owned());
    }
    assert!(
        !fds.iter().any(|t| t.contains("worker-test-ram")),
        "memory fd still open: {fds:?}"
    );
    // stdio, socket, epoll, kick, call, image, the I/O threads' completion eventfd
    assert_eq!(fds.len(), 9, "unexpected fds: {fds:?}");

    // drive a queue with EVENT_IDX, asking for an interrupt after every buffer
    let q = MockSplitQueue::create(&g.mem, GuestAddress(RAM), QSIZE);
    let used_event = q.avail_addr().unchecked_add(4 + 2 * u64::from(QSIZE));
    broker
        .send(
            &BrokerMsg::Activate {
                features: (1 << 29) | (1 << 32),
                queues: vec![QueueConfig {
                    index: 0,
                    size: QSIZE,
                    desc: q.desc_table_addr().0,
                    avail: q.avail_addr().0,
                    used: USED.0,
                }],
                epoch: 1,
            },
            &[],
            false,
        )
        .unwrap();
    let mut next_desc = 0u16;
    let mut request = |kind: u32, sector: u64, data: &[(u64, u32, bool)]| -> (u8, u32) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        g.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        g.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut parts = vec![(HDR, 16, false)];
        parts.extend_from_slice(data);
        parts.push((STATUS, 1, true));
        let first = next_desc;
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < parts.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = (first + i as u16 + 1) % QSIZE;
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        next_desc = (first + parts.len() as u16) % QSIZE;
        let used_idx = || g.mem.read_obj::<u16>(USED.unchecked_add(2)).unwrap();
        let used_before = used_idx();
        g.mem.write_obj(used_before, used_event).unwrap();
        q.add_desc_chains(&descs, first).unwrap();
        g.kick.write(1).unwrap();
        wait_readable(g.call.as_fd(), Duration::from_secs(10)).expect("no interrupt");
        assert!(g.call.read().unwrap() > 0);
        assert_eq!(used_idx(), used_before.wrapping_add(1));
        let elem = USED.unchecked_add(4 + 8 * u64::from(used_before % QSIZE));
        let id: u32 = g.mem.read_obj(elem).unwrap();
        assert_eq!(id, u32::from(first));
        let len: u32 = g.mem.read_obj(elem.unchecked_add(4)).unwrap();
        (g.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    };

    let payload: Vec<u8> = (0..2048u32).map(|i| (i * 13 + 1) as u8).collect();
    g.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(
            VIRTIO_BLK_T_OUT,
            4,
            &[(DATA, 1024, false), (DATA + 1024, 1024, false)]
        ),
        (0, 1)
    );
    let mut on_disk = vec![0u8; 2048];
    g.image.read_exact_at(&mut on_disk, 4 * 512).unwrap();
    assert_eq!(on_disk, payload);

    g.mem
        .write_slice(&[0u8; 2048], GuestAddress(DATA + 0x1_0000))
        .unwrap();
    assert_eq!(
        request(VIRTIO_BLK_T_IN, 4, &[(DATA + 0x1_0000, 2048, true)]),
        (0, 2049)
    );
    let mut back = vec![0u8; 2048];
    g.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x1_0000))
        .unwrap();
    assert_eq!(back, payload);

    assert_eq!(request(VIRTIO_BLK_T_FLUSH, 0, &[]), (0, 1));
    assert_eq!(
        request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]),
        (0, 21)
    );
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&4u64.to_le_bytes());
    seg[8..12].copy_from_slice(&2u32.to_le_bytes());
    g.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 16, false)]),
        (0, 1)
    );
    assert_eq!(
        request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, 16, false)]),
        (0, 1)
    );
    g.image.read_exact_at(&mut on_disk, 4 * 512).unwrap();
    assert_eq!(&on_disk[..1024], &[0u8; 1024][..]);
    assert_eq!(&on_disk[1024..], &payload[1024..]);
    // refusals and a malformed chain: answered, and the worker lives on
    assert_eq!(request(99, 0, &[]), (2, 1));
    assert_eq!(
        request(VIRTIO_BLK_T_IN, IMAGE_SIZE / 512, &[(DATA, 512, true)]),
        (1, 1)
    );
    assert_eq!(
        request(VIRTIO_BLK_T_IN, 0, &[(RAM + RAM_SIZE, 512, true)]),
        (1, 1)
    );

    // reset, config writes, then a clean shutdown
    for msg in [
        BrokerMsg::Reset,
        BrokerMsg::ConfigWrite {
            offset: 0,
            data: vec![0; 4],
        },
        BrokerMsg::Shutdown,
    ] {
        broker.send(&msg, &[], false).unwrap();
    }
    let st = wait(&mut child, Duration::from_secs(10));
    assert!(st.success(), "worker: {st:?}");
}

#[test]
fn a_malformed_message_after_the_sandbox_is_a_clean_failure() {
    let g = guest();
    let (broker, theirs) = Channel::pair().unwrap();
    let mut child = spawn(Some(theirs.into_fd()), &["--log-level=debug"]);
    send_hello(&broker, &g, PROTOCOL_VERSION);
    assert!(matches!(next(&broker), WorkerMsg::Ready { .. }));
    protocol::channel::send_raw(
        broker.as_fd(),
        &[0xee; 9],
        &[],
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    assert!(matches!(next(&broker), WorkerMsg::Failed { .. }));
    // an exit code, not SIGSYS: the error path fits the allowlist
    let st = wait(&mut child, Duration::from_secs(10));
    assert_eq!((st.code(), st.signal()), (Some(1), None), "{st:?}");
}

#[test]
fn the_broker_going_away_ends_the_worker() {
    let g = guest();
    let (broker, theirs) = Channel::pair().unwrap();
    let mut child = spawn(Some(theirs.into_fd()), &[]);
    send_hello(&broker, &g, PROTOCOL_VERSION);
    assert!(matches!(next(&broker), WorkerMsg::Ready { .. }));
    drop(broker);
    let st = wait(&mut child, Duration::from_secs(10));
    assert!(st.success(), "{st:?}");
}

#[test]
fn a_version_mismatch_is_refused() {
    let g = guest();
    let (broker, theirs) = Channel::pair().unwrap();
    let mut child = spawn(Some(theirs.into_fd()), &[]);
    send_hello(&broker, &g, PROTOCOL_VERSION + 1);
    let WorkerMsg::Failed { reason } = next(&broker) else {
        panic!("expected Failed");
    };
    assert!(reason.contains("protocol"), "{reason}");
    assert_eq!(wait(&mut child, Duration::from_secs(10)).code(), Some(1));
}

#[test]
fn without_its_socket_it_explains_and_exits() {
    let child = spawn(None, &[]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fd 3"), "{err}");

    let (_broker, theirs) = Channel::pair().unwrap();
    let out = spawn(Some(theirs.into_fd()), &["--seccomp=none"])
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}
