//! The simulator's handshake and vCPU path against a throwaway responder standing in for the
//! broker: it answers every synchronous access from a small register file and turns every
//! QueueNotify into an interrupt.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use protocol::bridge::{BridgeMap, DeviceReq, DeviceRes};
use protocol::sim::{recv_reply, send_init, Init, Reply, SIGNAL_WAKEUP};
use virtio_drivers::transport::Transport;

use crate::hv::{Gic, Hypervisor, Vcpu, VcpuError, Wakeup};
use crate::layout::{DevKind, DevSpec, Machine, RamRegion, ZoneSpec};
use crate::mem::PhysMem;
use crate::server::{Listener, SharedFds};
use crate::transport::{reg, SimTransport};

const BASE: u64 = 0xa00_0000;
const IRQ: u32 = 78;
const ZONE: u32 = 1;

fn machine() -> Machine {
    Machine {
        zones: vec![ZoneSpec {
            id: ZONE,
            ram: vec![RamRegion {
                zone0_ipa: 0x20_0000,
                zonex_ipa: 0x4000_0000,
                size: 0x10_0000,
            }],
            devices: vec![DevSpec {
                addr: BASE,
                len: 0x200,
                irq: IRQ,
                kind: DevKind::Blk {
                    img: PathBuf::from("unused.img"),
                    readonly: false,
                },
            }],
        }],
    }
}

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "hvisor-sim-test-{}-{name}.sock",
        std::process::id()
    ))
}

/// How the responder is woken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    EventFd,
    /// Asks for eventfd first, as a broker does; the legacy driver refuses; then SIGUSR1.
    LegacyFallback,
}

struct Responder {
    log: Arc<Mutex<Vec<DeviceReq>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Reply, String>>>,
}

impl Responder {
    /// Connects to `path` and serves until `stop`, then closes the connection.
    fn start(path: &Path, mode: Mode) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s, p) = (log.clone(), stop.clone(), path.to_owned());
        let handle = std::thread::spawn(move || serve(&p, mode, &l, &s));
        Responder {
            log,
            stop,
            handle: Some(handle),
        }
    }

    /// Stops and returns the first handshake reply the responder got.
    fn finish(&mut self) -> Reply {
        self.stop.store(true, Ordering::Release);
        self.handle.take().unwrap().join().unwrap().unwrap()
    }

    fn log(&self) -> Vec<DeviceReq> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(
    path: &Path,
    mode: Mode,
    log: &Mutex<Vec<DeviceReq>>,
    stop: &AtomicBool,
) -> Result<Reply, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|x| e(&x))?;
    let addr = UnixAddr::new(path).map_err(|x| e(&x))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while connect(sock.as_raw_fd(), &addr).is_err() {
        if Instant::now() > deadline {
            return Err("cannot connect".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let efd =
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|x| e(&x))?;
    send_init(sock.as_fd(), Init { flags: 0, tid: 0 }, Some(efd.as_fd())).map_err(|x| e(&x))?;
    let (first, mut fds) = recv_reply(sock.as_fd()).map_err(|x| e(&x))?;
    let mut sfd = None;
    if mode == Mode::LegacyFallback {
        if first != (Reply::Error { errno: 22 }) {
            return Err(format!("legacy driver answered {first:?}"));
        }
        // The signal is aimed at this thread: block it here and read it from a signalfd.
        let mut set = SigSet::empty();
        set.add(Signal::SIGUSR1);
        set.thread_block().map_err(|x| e(&x))?;
        sfd = Some(SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK).map_err(|x| e(&x))?);
        let tid = nix::unistd::gettid().as_raw() as u32;
        let init = Init {
            flags: SIGNAL_WAKEUP,
            tid,
        };
        send_init(sock.as_fd(), init, None).map_err(|x| e(&x))?;
        let (r, f) = recv_reply(sock.as_fd()).map_err(|x| e(&x))?;
        if !matches!(r, Reply::Ready { .. }) {
            return Err(format!("second INIT answered {r:?}"));
        }
        fds = f;
    }
    let [bridge_fd, _phys, finish]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| "READY without 3 fds".to_string())?;
    let bridge = BridgeMap::map(bridge_fd.as_fd()).map_err(|x| e(&x))?;
    let mut regs: HashMap<u64, u64> = HashMap::new();
    regs.insert(BASE + reg::MAGIC_VALUE, reg::MAGIC as u64);
    regs.insert(BASE + reg::VERSION, 2);
    regs.insert(BASE + reg::DEVICE_ID, 2);
    regs.insert(BASE + reg::CONFIG, 0x1122_3344_5566_7788);
    regs.insert(BASE + reg::QUEUE_NUM_MAX, 16);
    while !stop.load(Ordering::Acquire) {
        bridge.awake();
        while let Some(req) = bridge.peek_req() {
            log.lock().unwrap().push(req);
            if req.need_interrupt == 1 {
                assert!(bridge.push_res(DeviceRes {
                    target_zone: req.src_zone,
                    irq_id: IRQ,
                }));
                nix::unistd::write(&finish, &1u64.to_ne_bytes()).map_err(|x| e(&x))?;
            } else if req.is_write == 1 {
                regs.insert(req.address, req.value);
                bridge.complete(req.src_cpu, 0);
            } else {
                let v = regs.get(&req.address).copied().unwrap_or(0);
                let mask = if req.size == 8 {
                    u64::MAX
                } else {
                    (1 << (req.size * 8)) - 1
                };
                bridge.complete(req.src_cpu, v & mask);
            }
            bridge.pop_req();
        }
        if !bridge.prepare_sleep() {
            continue;
        }
        // Sleep until woken; the timeout is only there to notice `stop`.
        let fd = match &sfd {
            Some(s) => s.as_fd(),
            None => efd.as_fd(),
        };
        let mut p = [PollFd::new(fd, PollFlags::POLLIN)];
        let _ = poll(&mut p, PollTimeout::from(50u16));
        match &sfd {
            Some(s) => while let Ok(Some(_)) = s.read_signal() {},
            None => while efd.read().is_ok() {},
        }
    }
    Ok(first)
}

/// The simulator side, in process: listen, accept the responder, start the hypervisor.
fn simulator(
    name: &str,
    legacy: bool,
    mode: Mode,
    gic: Gic,
) -> (Arc<Hypervisor>, crate::hv::HvThread, Responder, PhysMem) {
    let m = machine();
    let mem = PhysMem::new(&m).unwrap();
    let shared = SharedFds::new().unwrap();
    let bridge = BridgeMap::map(shared.bridge.as_fd()).unwrap();
    let path = sock_path(name);
    let listener = Listener::bind(&path).unwrap();
    let responder = Responder::start(&path, mode);
    let (conn, wakeup) = listener
        .accept_broker(&shared, mem.fd(), mem.size(), legacy)
        .unwrap();
    let hv = Hypervisor::new(bridge, m, wakeup, Duration::from_secs(5), gic);
    let thread = hv.spawn(conn, shared.finish).unwrap();
    (hv, thread, responder, mem)
}

fn exercise(vcpu: &Vcpu, responder: &Responder) {
    let hv = vcpu.hypervisor().clone();
    assert_eq!(vcpu.read(BASE + reg::MAGIC_VALUE, 4).unwrap(), 0x7472_6976);
    vcpu.write(BASE + reg::STATUS, 4, 3).unwrap();
    assert_eq!(vcpu.read(BASE + reg::STATUS, 4).unwrap(), 3);
    // Thousands of round trips: no lost wakeup, no stale answer.
    for i in 0..2000u64 {
        vcpu.write(BASE + reg::QUEUE_DESC_LOW, 4, i).unwrap();
        assert_eq!(vcpu.read(BASE + reg::QUEUE_DESC_LOW, 4).unwrap(), i);
    }
    // QueueNotify does not wait; its interrupt comes back through res_list + FINISH.
    vcpu.write(BASE + reg::QUEUE_NOTIFY, 4, 0).unwrap();
    assert!(hv.take_irq(ZONE, IRQ, Duration::from_secs(5)));
    hv.eoi(ZONE, IRQ);
    // A read of QueueNotify is not waited for either (the offset decides).
    assert_eq!(vcpu.read(BASE + reg::QUEUE_NOTIFY, 4).unwrap(), 0);
    assert!(hv.take_irq(ZONE, IRQ, Duration::from_secs(5)));
    hv.eoi(ZONE, IRQ);

    let log = responder.log();
    assert!(log
        .iter()
        .all(|r| r.src_cpu == vcpu.cpu() && r.src_zone == ZONE));
    assert!(log
        .iter()
        .all(|r| (r.need_interrupt == 1) == (r.address == BASE + reg::QUEUE_NOTIFY)));
    let first = log[0];
    assert_eq!(
        (first.address, first.size, first.is_write),
        (BASE, 4, 0),
        "first access is the MagicValue read"
    );
    assert_eq!(
        vcpu.read(BASE + 0x200, 4),
        Err(VcpuError::NoRegion {
            zone: ZONE,
            addr: BASE + 0x200
        })
    );
}

#[test]
fn eventfd_handshake_and_trapped_accesses() {
    let (hv, _t, mut responder, _mem) = simulator("eventfd", false, Mode::EventFd, Gic::Hvisor);
    assert_eq!(hv.wakeup_kind(), "eventfd");
    let vcpu = hv.vcpu(1, ZONE).unwrap();
    assert!(hv.vcpu(1, ZONE).is_err(), "one vCPU per physical CPU");
    exercise(&vcpu, &responder);
    assert!(
        matches!(responder.finish(), Reply::Ready { phys_size, max_cpus: 32 }
        if phys_size == 0x30_0000)
    );
}

#[test]
fn legacy_driver_refuses_eventfd_and_wakes_with_sigusr1() {
    let (hv, _t, mut responder, _mem) =
        simulator("legacy", true, Mode::LegacyFallback, Gic::Hvisor);
    assert_eq!(hv.wakeup_kind(), "SIGUSR1");
    let vcpu = hv.vcpu(2, ZONE).unwrap();
    exercise(&vcpu, &responder);
    assert!(
        hv.stats().wakeups > 0,
        "the responder sleeps, so signals were sent"
    );
    assert_eq!(responder.finish(), Reply::Error { errno: 22 });
}

#[test]
fn transport_maps_registers_to_trapped_accesses() {
    let (hv, _t, mut responder, _mem) = simulator("transport", false, Mode::EventFd, Gic::Hvisor);
    let vcpu = hv.vcpu(3, ZONE).unwrap();
    let mut t = SimTransport::new(&vcpu, BASE, 0x200).unwrap();
    let skip = responder.log().len();
    t.write_driver_features(0x1_0000_0206);
    assert_eq!(t.read_config_space::<u8>(0).unwrap(), 0x88);
    assert_eq!(t.read_config_space::<u16>(2).unwrap(), 0);
    assert_eq!(
        t.read_config_space::<u64>(0).unwrap(),
        0x1122_3344_5566_7788
    );
    assert!(
        t.read_config_space::<u32>(0x100).is_err(),
        "past the config space"
    );
    t.notify(0);
    // The kick is not waited for: its interrupt says the responder has seen it.
    assert!(hv.take_irq(ZONE, IRQ, Duration::from_secs(5)));
    hv.eoi(ZONE, IRQ);
    let got: Vec<(u64, u64, u8, u64)> = responder.log()[skip..]
        .iter()
        .map(|r| (r.address - BASE, r.size, r.is_write, r.value))
        .collect();
    assert_eq!(
        got,
        vec![
            (reg::DRIVER_FEATURES_SEL, 4, 1, 0),
            (reg::DRIVER_FEATURES, 4, 1, 0x206),
            (reg::DRIVER_FEATURES_SEL, 4, 1, 1),
            (reg::DRIVER_FEATURES, 4, 1, 1),
            (0x100, 1, 0, 0),
            (0x102, 2, 0, 0),
            (0x100, 8, 0, 0),
            (reg::QUEUE_NOTIFY, 4, 1, 0),
        ]
    );
    responder.finish();
}

/// Takes the interrupt, then kicks again while it is active: the responder's injection meets
/// the active list register. Returns whether an interrupt is pending after the EOI.
fn inject_while_active(hv: &Hypervisor, vcpu: &Vcpu) -> bool {
    vcpu.write(BASE + reg::QUEUE_NOTIFY, 4, 0).unwrap();
    assert!(hv.take_irq(ZONE, IRQ, Duration::from_secs(5)));
    let seen = hv.injections(ZONE, IRQ);
    vcpu.write(BASE + reg::QUEUE_NOTIFY, 4, 0).unwrap();
    assert!(hv.wait_injections(ZONE, IRQ, seen, Duration::from_secs(5)));
    hv.eoi(ZONE, IRQ);
    // Nothing else injects: a pending interrupt is there now or never.
    let pending = hv.take_irq(ZONE, IRQ, Duration::ZERO);
    if pending {
        hv.eoi(ZONE, IRQ);
    }
    pending
}

#[test]
fn hvisors_gic_drops_an_injection_while_the_interrupt_is_active_and_merges_pending_ones() {
    let (hv, _t, mut responder, _mem) = simulator("gic", false, Mode::EventFd, Gic::Hvisor);
    let vcpu = hv.vcpu(5, ZONE).unwrap();
    assert!(!inject_while_active(&hv, &vcpu), "dropped while active");
    assert_eq!(hv.stats().dropped_interrupts, 1);
    // Two injections before the guest takes one merge into one interrupt.
    let seen = hv.injections(ZONE, IRQ);
    vcpu.write(BASE + reg::QUEUE_NOTIFY, 4, 0).unwrap();
    vcpu.write(BASE + reg::QUEUE_NOTIFY, 4, 0).unwrap();
    assert!(hv.wait_injections(ZONE, IRQ, seen + 1, Duration::from_secs(5)));
    assert!(hv.take_irq(ZONE, IRQ, Duration::ZERO));
    hv.eoi(ZONE, IRQ);
    assert!(!hv.take_irq(ZONE, IRQ, Duration::ZERO));
    assert_eq!(hv.stats().merged_interrupts, 1);
    responder.finish();
}

#[test]
fn an_ideal_gic_keeps_an_injection_made_while_active_until_the_eoi() {
    let (hv, _t, mut responder, _mem) = simulator("ideal", false, Mode::EventFd, Gic::Ideal);
    let vcpu = hv.vcpu(6, ZONE).unwrap();
    assert!(inject_while_active(&hv, &vcpu));
    assert_eq!(hv.stats().dropped_interrupts, 0);
    responder.finish();
}

#[test]
fn vcpu_fails_fast_when_the_broker_goes_away() {
    let (hv, _t, mut responder, _mem) = simulator("gone", false, Mode::EventFd, Gic::Hvisor);
    let vcpu = hv.vcpu(4, ZONE).unwrap();
    assert_eq!(vcpu.read(BASE, 4).unwrap(), 0x7472_6976);
    responder.finish();
    let t = Instant::now();
    let err = vcpu.read(BASE, 4).unwrap_err();
    assert!(matches!(err, VcpuError::BrokerGone { cpu: 4, .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(hv.broker_gone());
    assert!(!hv.take_irq(ZONE, IRQ, Duration::from_secs(5)));
}

#[test]
fn malformed_init_is_refused_and_the_next_broker_served() {
    let m = machine();
    let mem = PhysMem::new(&m).unwrap();
    let shared = SharedFds::new().unwrap();
    let path = sock_path("malformed");
    let listener = Listener::bind(&path).unwrap();
    let p = path.clone();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let bad = std::thread::spawn(move || {
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(sock.as_raw_fd(), &UnixAddr::new(&p).unwrap()).unwrap();
        protocol::channel::send_raw(
            sock.as_fd(),
            b"HVSIM002\0\0\0\0\0\0\0\0",
            &[],
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        sent_tx.send(()).unwrap();
        // The simulator closes the connection without READY.
        let mut buf = [0u8; 64];
        protocol::channel::recv_raw(sock.as_fd(), &mut buf, nix::sys::socket::MsgFlags::empty())
            .is_err()
    });
    // The bad client is first in the accept queue; a good one follows.
    sent_rx.recv().unwrap();
    let mut good = Responder::start(&path, Mode::EventFd);
    let (_conn, wakeup) = listener
        .accept_broker(&shared, mem.fd(), mem.size(), false)
        .unwrap();
    assert!(matches!(wakeup, Wakeup::EventFd(_)));
    assert!(bad.join().unwrap(), "the malformed client got no READY");
    drop(_conn);
    assert!(matches!(good.finish(), Reply::Ready { .. }));
}

#[test]
fn a_blocking_driver_call_gives_up_on_a_device_that_never_completes() {
    use crate::guest::stock::Pipe;
    use crate::guest::IrqWaiter;
    use crate::hal::ZoneHal;

    // The responder answers registers but never touches a virtqueue: a dead worker.
    let (hv, _t, mut responder, mem) = simulator("dead", false, Mode::EventFd, Gic::Hvisor);
    let vcpu = hv.vcpu(5, ZONE).unwrap();
    let ram = mem.largest_region(ZONE).unwrap();
    // SAFETY: `mem` outlives the driver below; slot 2 is used by no other test.
    unsafe { crate::hal::install(2, ram.zonex_ipa, ram.host_base(), ram.size) };
    let t = SimTransport::new(&vcpu, BASE, 0x200).unwrap();
    let mut pipe = Pipe::<ZoneHal<2>>::open(t, &mem, 1).unwrap();
    let mut irq = IrqWaiter::new(&vcpu, IRQ, Duration::from_millis(300));
    let t0 = Instant::now();
    let err = pipe.device_id(&mut irq).unwrap_err().to_string();
    assert!(err.contains("did not complete GET_ID"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    drop(pipe);
    assert_eq!(
        crate::hal::allocated(2),
        0,
        "rings and bounce buffers freed"
    );
    responder.finish();
}
