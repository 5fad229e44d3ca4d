//! The hypervisor half: what hvisor does at EL2 for trapped virtio-mmio accesses (publishing
//! `device_req`, waking the backend, spinning on `cfg_flags`) and for FINISH_REQ (draining
//! `res_list` into guest interrupts).

use std::collections::HashMap;
use std::fmt;
use std::hint::spin_loop;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::MsgFlags;
use protocol::bridge::{BridgeMap, DeviceReq, MAX_CPUS, QUEUE_NOTIFY_OFFSET};
use protocol::channel::{recv_raw, ChannelError};

use crate::layout::Machine;

/// How the backend is woken when it sleeps (`need_wakeup == 1`).
#[derive(Debug)]
pub enum Wakeup {
    /// Current driver: the broker's eventfd.
    EventFd(OwnedFd),
    /// Driver before February 2026: SIGUSR1 to the thread that called INIT_VIRTIO.
    Signal { pid: i32, tid: i32 },
}

impl Wakeup {
    pub fn describe(&self) -> &'static str {
        match self {
            Wakeup::EventFd(_) => "eventfd",
            Wakeup::Signal { .. } => "SIGUSR1",
        }
    }

    fn fire(&self) {
        match self {
            Wakeup::EventFd(fd) => {
                // EAGAIN only if the counter is saturated: the broker is awake anyway.
                let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
            }
            Wakeup::Signal { pid, tid } => {
                // SAFETY: tgkill takes plain integers and touches no memory of ours; nix has
                // no wrapper that targets a thread of another process.
                let _ = unsafe {
                    libc::syscall(libc::SYS_tgkill, *pid, *tid, libc::SIGUSR1) as libc::c_int
                };
            }
        }
    }
}

/// Why a trapped access could not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuError {
    /// The broker did not answer within the watchdog.
    Timeout {
        cpu: u64,
        addr: u64,
        write: bool,
        secs: u64,
    },
    /// The broker closed its socket (it died or quit).
    BrokerGone { cpu: u64, addr: u64, write: bool },
    /// No virtio region of this zone contains the address (a real guest would fault).
    NoRegion { zone: u32, addr: u64 },
    /// hvisor traps only 1-, 2-, 4- and 8-byte accesses.
    BadSize { addr: u64, size: u64 },
}

impl fmt::Display for VcpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = |w: &bool| if *w { "write" } else { "read" };
        match self {
            VcpuError::Timeout {
                cpu,
                addr,
                write,
                secs,
            } => write!(
                f,
                "broker did not answer a {} of 0x{addr:x} from cpu {cpu} within {secs} s",
                what(write)
            ),
            VcpuError::BrokerGone { cpu, addr, write } => write!(
                f,
                "the broker went away while cpu {cpu} waited for a {} of 0x{addr:x}",
                what(write)
            ),
            VcpuError::NoRegion { zone, addr } => {
                write!(f, "zone {zone} has no virtio region at 0x{addr:x}")
            }
            VcpuError::BadSize { addr, size } => {
                write!(f, "{size}-byte access to 0x{addr:x} cannot be trapped")
            }
        }
    }
}

impl std::error::Error for VcpuError {}

/// What hvisor's GICv3 does with an injection while the interrupt sits in a list register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Gic {
    /// As hvisor does (hvisor-abi 2.7): an injection while the interrupt is pending merges
    /// with it; while it is active (taken, not yet EOIed) it is dropped.
    #[default]
    Hvisor,
    /// A GIC that keeps an injection made while active pending until the EOI, as hardware
    /// does for a physical interrupt; for comparison only.
    Ideal,
}

enum Injected {
    Delivered,
    Merged,
    Dropped,
}

/// One (zone, irq) as a GIC list register holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum LrState {
    #[default]
    Idle,
    /// Injected, not yet taken by the guest.
    Pending,
    /// The guest's handler runs (taken, no EOI yet).
    Active,
    /// Active, and injected again meanwhile (only an ideal GIC keeps this).
    ActivePending,
}

#[derive(Debug, Default)]
struct Line {
    state: LrState,
    /// Times the line became pending for the guest to take.
    delivered: u64,
    /// `res_list` entries naming this line, delivered or not.
    injections: u64,
}

/// Interrupt lines of the guests, by (zone, irq).
#[derive(Default)]
struct Irqs {
    lines: HashMap<(u32, u32), Line>,
    stray: u64,
    merged: u64,
    dropped: u64,
}

/// Counters for the report.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct HvStats {
    /// `device_req` entries published.
    pub requests: u64,
    /// Wakeups due (eventfd writes or signals), lost ones included.
    pub wakeups: u64,
    /// Wakeups lost on the way, as hvisor's unfenced `need_wakeup` read can lose them.
    pub lost_wakeups: u64,
    /// FINISH_REQ signals seen.
    pub finish_signals: u64,
    /// Interrupts made pending for a configured (zone, irq).
    pub interrupts: u64,
    /// Injections merged into an interrupt that was already pending.
    pub merged_interrupts: u64,
    /// Injections dropped because the interrupt was active in the guest (hvisor's GIC).
    pub dropped_interrupts: u64,
    /// `res_list` entries naming no configured (zone, irq); hvisor skips unknown zones.
    pub stray_interrupts: u64,
    /// The GIC behaviour simulated.
    pub gic: Gic,
}

/// The simulated hypervisor shared by every vCPU and the hypervisor thread.
pub struct Hypervisor {
    bridge: BridgeMap,
    machine: Machine,
    wakeup: Wakeup,
    /// hvisor's `req_lock`: producers of `req_list` are serialised.
    req_lock: Mutex<()>,
    irqs: Mutex<Irqs>,
    irq_cond: Condvar,
    gic: Gic,
    broker_gone: AtomicBool,
    cpus_in_use: Mutex<u64>,
    requests: AtomicU64,
    wakeups: AtomicU64,
    /// Every this many wakeups one is lost (0: none).
    lose_wakeups: AtomicU64,
    lost_wakeups: AtomicU64,
    finishes: AtomicU64,
    /// How long a vCPU waits for an answer before giving up.
    pub watchdog: Duration,
}

impl Hypervisor {
    /// `watchdog`: how long a vCPU waits for an answer before giving up.
    pub fn new(
        bridge: BridgeMap,
        machine: Machine,
        wakeup: Wakeup,
        watchdog: Duration,
        gic: Gic,
    ) -> Arc<Self> {
        Arc::new(Hypervisor {
            bridge,
            machine,
            wakeup,
            req_lock: Mutex::new(()),
            irqs: Mutex::new(Irqs::default()),
            irq_cond: Condvar::new(),
            gic,
            broker_gone: AtomicBool::new(false),
            cpus_in_use: Mutex::new(0),
            requests: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            lose_wakeups: AtomicU64::new(0),
            lost_wakeups: AtomicU64::new(0),
            finishes: AtomicU64::new(0),
            watchdog,
        })
    }

    /// Loses every `every`-th wakeup of the broker (0: none), before the guests start.
    pub fn lose_wakeups(&self, every: u64) {
        self.lose_wakeups.store(every, Ordering::Relaxed);
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    pub fn wakeup_kind(&self) -> &'static str {
        self.wakeup.describe()
    }

    pub fn broker_gone(&self) -> bool {
        self.broker_gone.load(Ordering::Acquire)
    }

    fn mark_gone(&self) {
        self.broker_gone.store(true, Ordering::Release);
        // Wake interrupt waiters so they notice at once.
        let _g = self.irqs.lock().unwrap();
        self.irq_cond.notify_all();
    }

    pub fn stats(&self) -> HvStats {
        let irqs = self.irqs.lock().unwrap();
        HvStats {
            requests: self.requests.load(Ordering::Relaxed),
            wakeups: self.wakeups.load(Ordering::Relaxed),
            lost_wakeups: self.lost_wakeups.load(Ordering::Relaxed),
            finish_signals: self.finishes.load(Ordering::Relaxed),
            interrupts: irqs.lines.values().map(|l| l.delivered).sum(),
            merged_interrupts: irqs.merged,
            dropped_interrupts: irqs.dropped,
            stray_interrupts: irqs.stray,
            gic: self.gic,
        }
    }

    /// A vCPU of `zone` on physical CPU `cpu`. Each CPU has one `cfg_flags` slot, so it may
    /// be held by one vCPU at a time.
    pub fn vcpu(self: &Arc<Self>, cpu: u64, zone: u32) -> anyhow::Result<Vcpu> {
        anyhow::ensure!(
            (cpu as usize) < MAX_CPUS,
            "cpu {cpu} is beyond the bridge's {MAX_CPUS} CPUs"
        );
        let mut used = self.cpus_in_use.lock().unwrap();
        anyhow::ensure!(*used & (1 << cpu) == 0, "cpu {cpu} already has a vCPU");
        *used |= 1 << cpu;
        Ok(Vcpu {
            hv: self.clone(),
            cpu,
            zone,
        })
    }

    /// Interrupts made pending so far for (zone, irq).
    pub fn irq_count(&self, zone: u32, irq: u32) -> u64 {
        let irqs = self.irqs.lock().unwrap();
        irqs.lines.get(&(zone, irq)).map_or(0, |l| l.delivered)
    }

    /// The guest takes the interrupt (zone, irq): waits until it is pending, then makes it
    /// active, as a CPU entering its handler does. Injections meet an active line until the
    /// guest calls [`Hypervisor::eoi`]. False on timeout or when the broker went away.
    pub fn take_irq(&self, zone: u32, irq: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut irqs = self.irqs.lock().unwrap();
        loop {
            let line = irqs.lines.entry((zone, irq)).or_default();
            if line.state == LrState::Pending {
                line.state = LrState::Active;
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.broker_gone() {
                return false;
            }
            irqs = self.irq_cond.wait_timeout(irqs, left).unwrap().0;
        }
    }

    /// End of interrupt: the guest's handler for (zone, irq) is done.
    pub fn eoi(&self, zone: u32, irq: u32) {
        let mut irqs = self.irqs.lock().unwrap();
        let line = irqs.lines.entry((zone, irq)).or_default();
        line.state = match line.state {
            LrState::ActivePending => {
                self.irq_cond.notify_all();
                LrState::Pending
            }
            LrState::Active => LrState::Idle,
            other => other,
        };
    }

    /// `res_list` entries that named (zone, irq) so far, whether delivered or not.
    pub fn injections(&self, zone: u32, irq: u32) -> u64 {
        let irqs = self.irqs.lock().unwrap();
        irqs.lines.get(&(zone, irq)).map_or(0, |l| l.injections)
    }

    /// Waits until more than `seen` injections named (zone, irq); false on timeout.
    pub fn wait_injections(&self, zone: u32, irq: u32, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut irqs = self.irqs.lock().unwrap();
        loop {
            if irqs.lines.get(&(zone, irq)).map_or(0, |l| l.injections) > seen {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.broker_gone() {
                return false;
            }
            irqs = self.irq_cond.wait_timeout(irqs, left).unwrap().0;
        }
    }

    /// Waits until the broker closes its socket.
    pub fn wait_broker_gone(&self) {
        let mut irqs = self.irqs.lock().unwrap();
        while !self.broker_gone() {
            irqs = self
                .irq_cond
                .wait_timeout(irqs, Duration::from_millis(200))
                .unwrap()
                .0;
        }
    }

    /// Hypercall FINISH_REQ: drain `res_list` and inject each interrupt into its list register.
    fn drain_res(&self) {
        let mut irqs = self.irqs.lock().unwrap();
        let mut any = false;
        while let Some(res) = self.bridge.pop_res() {
            let known = self
                .machine
                .zones
                .iter()
                .filter(|z| z.id == res.target_zone)
                .flat_map(|z| z.devices.iter())
                .any(|d| d.irq == res.irq_id);
            if !known {
                irqs.stray += 1;
                continue;
            }
            any = true;
            let line = irqs.lines.entry((res.target_zone, res.irq_id)).or_default();
            line.injections += 1;
            let (next, outcome) = match (line.state, self.gic) {
                (LrState::Idle, _) => (LrState::Pending, Injected::Delivered),
                (LrState::Active, Gic::Ideal) => (LrState::ActivePending, Injected::Delivered),
                (LrState::Active, Gic::Hvisor) => (LrState::Active, Injected::Dropped),
                (state, _) => (state, Injected::Merged),
            };
            line.state = next;
            match outcome {
                Injected::Delivered => line.delivered += 1,
                Injected::Merged => irqs.merged += 1,
                Injected::Dropped => irqs.dropped += 1,
            }
        }
        if any {
            self.irq_cond.notify_all();
        }
    }

    /// Starts the thread that plays hypercall FINISH_REQ and watches the broker's socket.
    pub fn spawn(self: &Arc<Self>, sock: OwnedFd, finish: EventFd) -> anyhow::Result<HvThread> {
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let stop_dup = stop.as_fd().try_clone_to_owned()?;
        let hv = self.clone();
        let handle = std::thread::Builder::new()
            .name("hypervisor".into())
            .spawn(move || hv.run(sock, finish, stop))?;
        Ok(HvThread {
            stop: stop_dup,
            handle: Some(handle),
        })
    }

    fn run(&self, sock: OwnedFd, finish: EventFd, stop: EventFd) {
        const FINISH: u64 = 1;
        const SOCK: u64 = 2;
        const STOP: u64 = 3;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll_create");
        let add = |fd: std::os::fd::BorrowedFd<'_>, flags: EpollFlags, tag| {
            epoll
                .add(fd, EpollEvent::new(flags, tag))
                .expect("epoll_ctl");
        };
        add(finish.as_fd(), EpollFlags::EPOLLIN, FINISH);
        add(
            sock.as_fd(),
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
            SOCK,
        );
        add(stop.as_fd(), EpollFlags::EPOLLIN, STOP);
        let mut sock_open = true;
        let mut events = [EpollEvent::empty(); 4];
        loop {
            let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => panic!("epoll_wait: {e}"),
            };
            for ev in &events[..n] {
                match ev.data() {
                    FINISH => {
                        if let Ok(k) = finish.read() {
                            self.finishes.fetch_add(k, Ordering::Relaxed);
                        }
                        self.drain_res();
                    }
                    SOCK if sock_open && self.check_socket(&sock) => {
                        sock_open = false;
                        let _ = epoll.delete(sock.as_fd());
                        self.mark_gone();
                    }
                    STOP => return,
                    _ => {}
                }
            }
        }
    }

    /// True when the connection is over (EOF, error, or a message the protocol forbids).
    fn check_socket(&self, sock: &OwnedFd) -> bool {
        let mut buf = [0u8; 64];
        match recv_raw(sock.as_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Err(ChannelError::Io(Errno::EAGAIN)) => false,
            Err(ChannelError::Eof) => {
                println!("hvisor-sim: broker disconnected");
                true
            }
            Ok((n, fds)) => {
                eprintln!(
                    "hvisor-sim: refused a message of {n} bytes with {} fds after READY \
                     (the socket carries nothing more); closing the connection",
                    fds.len()
                );
                let _ = nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(sock),
                    nix::sys::socket::Shutdown::Both,
                );
                true
            }
            Err(e) => {
                eprintln!("hvisor-sim: broker socket: {e}; treating the broker as gone");
                true
            }
        }
    }
}

/// The running hypervisor thread; stops it on drop.
pub struct HvThread {
    stop: OwnedFd,
    handle: Option<JoinHandle<()>>,
}

impl Drop for HvThread {
    fn drop(&mut self) {
        let _ = nix::unistd::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Busy-wait iterations before a waiting vCPU starts yielding its core.
const SPINS_BEFORE_YIELD: u32 = 4000;
/// hvisor's MAX_BACKOFF for a full request ring.
const MAX_BACKOFF: u32 = 1024;

/// A guest vCPU pinned to a physical CPU: every access is trapped and forwarded as hvisor does.
pub struct Vcpu {
    hv: Arc<Hypervisor>,
    cpu: u64,
    zone: u32,
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        *self.hv.cpus_in_use.lock().unwrap() &= !(1 << self.cpu);
    }
}

impl Vcpu {
    pub fn cpu(&self) -> u64 {
        self.cpu
    }

    pub fn zone(&self) -> u32 {
        self.zone
    }

    pub fn hypervisor(&self) -> &Arc<Hypervisor> {
        &self.hv
    }

    pub fn read(&self, addr: u64, size: u64) -> Result<u64, VcpuError> {
        self.access(addr, size, 0, false)
    }

    pub fn write(&self, addr: u64, size: u64, value: u64) -> Result<(), VcpuError> {
        self.access(addr, size, value, true).map(drop)
    }

    /// hvisor's `mmio_virtio_handler` (hvisor-abi 2.4), step by step.
    fn access(&self, addr: u64, size: u64, value: u64, write: bool) -> Result<u64, VcpuError> {
        if ![1, 2, 4, 8].contains(&size) {
            return Err(VcpuError::BadSize { addr, size });
        }
        let dev = self
            .hv
            .machine
            .device_at(self.zone, addr)
            .ok_or(VcpuError::NoRegion {
                zone: self.zone,
                addr,
            })?;
        // Decided from the offset alone, read or write, as the hypervisor does.
        let need_interrupt = addr - dev.addr == QUEUE_NOTIFY_OFFSET;
        let bridge = &*self.hv.bridge;
        let cpu = self.cpu as usize;
        let old = bridge.cfg_flags[cpu].load(Ordering::Acquire);
        let req = DeviceReq {
            src_cpu: self.cpu,
            address: addr,
            size,
            value: if write { value } else { 0 },
            src_zone: self.zone,
            is_write: write as u8,
            need_interrupt: need_interrupt as u8,
            padding: 0,
        };
        let start = Instant::now();
        let gone = || VcpuError::BrokerGone {
            cpu: self.cpu,
            addr,
            write,
        };
        let timeout = || VcpuError::Timeout {
            cpu: self.cpu,
            addr,
            write,
            secs: self.hv.watchdog.as_secs(),
        };

        let mut backoff = 1;
        loop {
            {
                let _g = self.hv.req_lock.lock().unwrap();
                if bridge.push_req(req) {
                    break;
                }
            }
            // Full ring: back off without the lock so the consumer's progress is not blocked.
            for _ in 0..backoff {
                spin_loop();
            }
            if backoff < MAX_BACKOFF {
                backoff *= 2;
            } else {
                std::thread::yield_now();
                if self.hv.broker_gone() {
                    return Err(gone());
                }
                if start.elapsed() > self.hv.watchdog {
                    return Err(timeout());
                }
            }
        }
        self.hv.requests.fetch_add(1, Ordering::Relaxed);
        if bridge.wants_wakeup() {
            let n = self.hv.wakeups.fetch_add(1, Ordering::Relaxed) + 1;
            let every = self.hv.lose_wakeups.load(Ordering::Relaxed);
            if every != 0 && n % every == 0 {
                // hvisor reads `need_wakeup` without a fence before it (hvisor-abi 2.5): on a
                // weakly ordered CPU it can see the flag still clear and wake nobody.
                self.hv.lost_wakeups.fetch_add(1, Ordering::Relaxed);
            } else {
                self.hv.wakeup.fire();
            }
        }
        if need_interrupt {
            return Ok(0);
        }

        let mut spins = 0u32;
        loop {
            if bridge.cfg_flags[cpu].load(Ordering::Acquire) != old {
                return Ok(bridge.cfg_values[cpu].load(Ordering::Acquire));
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                spin_loop();
                continue;
            }
            // Two cores are shared with the broker and its workers: stop hogging one.
            std::thread::yield_now();
            if self.hv.broker_gone() {
                return Err(gone());
            }
            if start.elapsed() > self.hv.watchdog {
                return Err(timeout());
            }
        }
    }
}
