//! The bridge loop: drains trapped accesses, answers each synchronous one at once from the
//! device's register file, forwards kicks and lifecycle events to workers, and raises the
//! interrupts workers ask for. One thread, so the SIGUSR1 wakeup of old drivers (sent to the
//! thread that made INIT_VIRTIO) always reaches the reader.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use config::{Config, Device};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use protocol::bridge::{DeviceReq, DeviceRes};
use protocol::{BrokerMsg, ChannelError, DeviceKind, Flow, Limit, MemoryRegion, WorkerMsg};

use crate::budget::{LogBudget, MessageBudget};
use crate::devices::{self, Host, Prepared};
use crate::driver::Driver;
use crate::host::Tap;
use crate::irq::{retry_delay, Inject};
use crate::lifecycle::{self, Life, Next, Plumbing, Recipe, Worker};
use crate::notify::Readiness;
use crate::outbox::Outbox;
use crate::poll::{self, Poller, Wait};
use crate::relay::Relay;
use crate::rundir::RunDir;
use crate::supervisor;
use crate::transport::{Effect, MmioTransport};
use crate::{audit, control, status, zones};

pub struct Options {
    /// Where `hvisor-worker-<kind>` binaries live.
    pub worker_dir: PathBuf,
    /// Extra arguments for every worker.
    pub worker_args: Vec<String>,
    /// The longest the loop polls after its last work before sleeping (see `poll`).
    pub poll: Duration,
    /// The share of wall time, in percent, polling that finds nothing may cost; 100 polls the
    /// whole window after all work, with no cap.
    pub poll_budget: u32,
    /// The longest sleep: a safety net for a lost wakeup (hvisor-abi 2.5).
    pub max_sleep: Duration,
    /// The CPU time a worker may use before it reports Ready; one that uses none for ten
    /// times as long is stopped too (see `startup`).
    pub ready_timeout: Duration,
    /// Who workers run as and what a seccomp violation does.
    pub jail: supervisor::Jail,
    /// When devices inject their interrupt.
    pub inject: Inject,
    /// The first retry of an unacknowledged interrupt comes this long after the injection.
    pub irq_first_retry: Duration,
    /// Whom to tell once every worker is ready.
    pub readiness: Readiness,
    /// What a worker's death leads to.
    pub restart: lifecycle::Policy,
    /// The start configuration, read again on SIGHUP.
    pub config_path: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            worker_dir: PathBuf::new(),
            worker_args: Vec::new(),
            poll: Duration::from_micros(100),
            poll_budget: DEFAULT_POLL_BUDGET,
            max_sleep: Duration::from_millis(10),
            ready_timeout: Duration::from_secs(10),
            jail: supervisor::Jail::default(),
            inject: Inject::default(),
            irq_first_retry: crate::irq::FIRST_RETRY,
            readiness: Readiness::default(),
            restart: lifecycle::Policy::default(),
            config_path: None,
        }
    }
}

/// How many times a polling round looks at the bridge page before it looks for events too.
const SPINS: u32 = 100;

/// The default of `--poll-budget`, in percent.
pub const DEFAULT_POLL_BUDGET: u32 = 100;

const TOKEN_WAKEUP: u64 = 0;
const TOKEN_SIGNALS: u64 = 1;
const TOKEN_SIM: u64 = 2;
const TOKEN_CONTROL: u64 = 3;
/// Device `i` owns tokens `DEV_BASE + i * DEV_STRIDE + k`: k = 0 its socket, 1 + q its call
/// fds (no device has `RELAY - 1` queues), `RELAY + j` a console's relay fd `j`.
const DEV_BASE: u64 = 0x100;
const DEV_STRIDE: u64 = 0x100;
const RELAY: u64 = 0xf0;

/// A call eventfd is watched edge-triggered: every write of the worker's is an event, so its
/// count need not be read per request.
pub(crate) const CALL_EVENTS: EpollFlags = EpollFlags::EPOLLIN.union(EpollFlags::EPOLLET);

/// The token of device `i`'s first relay fd.
pub(crate) fn relay_token(i: usize) -> u64 {
    dev_token(i) + RELAY
}
/// The most messages taken from one worker per wakeup, so the bridge ring (every other
/// zone's register accesses) is served between batches.
const MAX_BATCH: usize = 16;

/// The epoll token of device `i`'s worker socket; its queue `q`'s call fd is `+ 1 + q`.
pub(crate) fn dev_token(i: usize) -> u64 {
    DEV_BASE + i as u64 * DEV_STRIDE
}

pub(crate) struct Slot {
    pub(crate) zone: u32,
    pub(crate) base: u64,
    len: u64,
    pub(crate) irq: u32,
    pub(crate) label: String,
    pub(crate) kind: DeviceKind,
    transport: MmioTransport,
    kicks: Vec<EventFd>,
    /// Queues notified in this pass over the ring, kicked once it is drained.
    kick_due: Vec<bool>,
    pub(crate) calls: Vec<EventFd>,
    pub(crate) worker: Option<Worker>,
    /// How to start its worker again, and its restarts.
    recipe: Recipe,
    pub(crate) life: Life,
    /// Counts the driver's activations; a replacement worker is activated with the same one.
    epoch: u64,
    /// The interrupt is to be pushed to `res_list` in this round.
    irq_pending: bool,
    /// When to inject again if the guest has not acknowledged by then (hvisor drops an
    /// injection that meets the interrupt active in the guest).
    irq_retry_at: Option<Instant>,
    /// Retries since the last injection the device asked for; they back off.
    irq_retries: u32,
    /// Injections, and those of them by the retry timer, for `status`.
    irq_injected: u64,
    irq_reinjected: u64,
    host: Host,
    /// A console's pipes to its pty.
    pub(crate) relay: Option<Relay>,
    /// Everything its worker makes the broker log.
    worker_log: LogBudget,
    /// What its guest makes the broker log.
    guest_log: LogBudget,
    /// Control messages waiting for room in the worker's socket.
    outbox: Outbox,
    /// The socket is watched for room (EPOLLOUT) while the outbox is not empty.
    pub(crate) watching_out: bool,
    /// The rate limits of its flows, from the config or the control socket: every worker of
    /// the device gets them.
    rate_limits: BTreeMap<Flow, Limit>,
}

impl Slot {
    /// The device asked for its interrupt: inject it this round, with fresh retry delays.
    fn interrupt(&mut self) {
        self.irq_pending = true;
        self.irq_retries = 0;
    }
}

/// What the broker knows of each worker, for the audit to complete from /proc.
fn known(slots: &[Slot]) -> Vec<audit::Known> {
    slots
        .iter()
        .map(|s| audit::Known {
            label: s.label.clone(),
            device: s.kind.to_string(),
            zone: s.zone,
            pid: s.worker.as_ref().map(|w| w.pid.as_raw()),
            restarts: s.life.restarts,
            last_exit: s.life.exits.back().map(|e| e.cause.clone()),
            exits: s.life.exit_lines(),
            claimed_root: s
                .worker
                .as_ref()
                .and_then(|w| w.confinement.as_ref().map(|c| c.0.clone())),
            claimed_notes: s
                .worker
                .as_ref()
                .and_then(|w| w.confinement.as_ref().map(|c| c.1.clone()))
                .unwrap_or_default(),
            cgroups: (s.worker.as_ref())
                .map(|w| w.lease.cgroup_dirs())
                .unwrap_or_default(),
        })
        .collect()
}

/// What the broker knows of each device, for the status report.
fn statuses(slots: &[Slot]) -> status::Report {
    let devices = slots.iter().map(|s| {
        let counted = status::BrokerCounted {
            zone: s.zone,
            device: format!("{}@{:#x}", s.kind, s.base),
            kind: s.kind.to_string(),
            interrupts_injected: s.irq_injected,
            interrupts_reinjected: s.irq_reinjected,
            worker_restarts: s.life.restarts,
            worker_exits: s.life.exit_count,
            worker_pid: s.worker.as_ref().map(|w| w.pid.as_raw()),
            rate_limits: (s.rate_limits.iter())
                .filter(|(_, l)| !l.is_off())
                .map(|(f, l)| (f.name().to_string(), *l))
                .collect(),
        };
        status::device(counted, s.recipe.record.as_fd(), s.kicks.len())
    });
    status::Report {
        broker_pid: std::process::id(),
        devices: devices.collect(),
    }
}

/// The tap follows what the driver negotiated: the legacy 10-byte header for drivers without
/// VERSION_1 or MRG_RXBUF (RuxOS), and only the receive offloads the guest accepts.
fn configure_tap(tap: &Tap, features: u64) -> Result<()> {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::*;
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let hdr = if has(VIRTIO_F_VERSION_1) || has(VIRTIO_NET_F_MRG_RXBUF) {
        12
    } else {
        10
    };
    tap.set_header_len(hdr)?;
    let mut offloads = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        offloads |= crate::host::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            offloads |= crate::host::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            offloads |= crate::host::TUN_F_TSO6;
        }
    }
    tap.set_offloads(offloads)?;
    log::debug!(
        "tap {}: {hdr}-byte header, offloads {offloads:#x}",
        tap.name
    );
    Ok(())
}

/// Stops a worker that broke the rules: SIGKILL, and nothing more is read from it (its exit
/// is reported, and a new worker started or the device failed, where it is reaped).
fn stop_worker(epoll: &Epoll, w: &mut Worker, label: &str, why: &str) {
    log::error!("{label}: worker (pid {}) {why}; stopping it", w.pid);
    let _ = kill(w.pid, Signal::SIGKILL);
    epoll.delete(w.channel.as_fd()).ok();
    w.gone_since = Some(Instant::now());
}

pub struct Broker {
    pub(crate) driver: Driver,
    pub(crate) slots: Vec<Slot>,
    pub(crate) epoll: Epoll,
    signals: SignalFd,
    pub(crate) opts: Options,
    stop: bool,
    /// The single-instance lock and the socket answering audits.
    pub(crate) control: Option<control::Control>,
    /// The zones served, as configured.
    pub(crate) config: Config,
    /// Removed zones whose workers are still ending.
    pub(crate) retiring: Vec<zones::Retiring>,
    /// The control socket woke the loop: requests are taken after the batch, since a zone
    /// removal renumbers the devices the batch's tokens name.
    control_due: bool,
    /// SIGHUP arrived: the start configuration is applied after the batch.
    reload_due: bool,
}

/// Where a zone's RAM is, as its workers map it.
pub(crate) fn regions(zone: &config::Zone) -> Vec<MemoryRegion> {
    zone.memory
        .iter()
        .map(|r| MemoryRegion {
            guest_addr: r.zonex_ipa,
            size: r.size,
            file_offset: r.zone0_ipa,
        })
        .collect()
}

/// Opens every device's resources (nothing is started if one fails), then the driver is used
/// to start the workers.
pub fn prepare_all(config: &Config, run: &RunDir) -> Result<Vec<(Device, Prepared)>> {
    let mut out = Vec::new();
    for zone in &config.zones {
        for dev in &zone.devices {
            out.push((dev.clone(), devices::prepare(dev, run)?));
        }
    }
    Ok(out)
}

impl Broker {
    pub fn new(
        config: &Config,
        prepared: Vec<(Device, Prepared)>,
        driver: Driver,
        opts: Options,
        control: Option<control::Control>,
    ) -> Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        if let Some(c) = &control {
            epoll.add(c, EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONTROL))?;
        }
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGCHLD,
            Signal::SIGHUP,
        ] {
            mask.add(s);
        }
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        epoll.add(
            driver.wakeup_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_WAKEUP),
        )?;
        epoll.add(
            signals.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_SIGNALS),
        )?;
        if let Some(s) = driver.sim_socket() {
            epoll.add(
                s,
                EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, TOKEN_SIM),
            )?;
        }
        let mut broker = Broker {
            driver,
            slots: Vec::new(),
            epoll,
            signals,
            opts,
            stop: false,
            control,
            config: config.clone(),
            retiring: Vec::new(),
            control_due: false,
            reload_due: false,
        };
        for (dev, prep) in prepared {
            let zone = config
                .zones
                .iter()
                .find(|z| z.id == dev.zone)
                .context("device of an unknown zone")?;
            broker.add_device(&dev, prep, regions(zone))?;
        }
        broker.publish_addresses();
        Ok(broker)
    }

    /// The legacy hint some hypervisor builds still read: the devices' addresses.
    pub(crate) fn publish_addresses(&self) {
        use std::sync::atomic::Ordering;
        let bridge = self.driver.bridge();
        for (i, a) in bridge.mmio_addrs.iter().enumerate() {
            a.store(self.slots.get(i).map_or(0, |s| s.base), Ordering::Relaxed);
        }
        bridge.mmio_avail.store(1, Ordering::Release);
    }

    pub(crate) fn add_device(
        &mut self,
        dev: &Device,
        prep: Prepared,
        regions: Vec<MemoryRegion>,
    ) -> Result<()> {
        let label = format!("zone{} {}@{:#x}", dev.zone, prep.kind, dev.addr);
        let nq = prep.model.queue_max.len();
        let efd = || EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC);
        let kicks = (0..nq).map(|_| efd()).collect::<nix::Result<Vec<_>>>()?;
        let calls = (0..nq).map(|_| efd()).collect::<nix::Result<Vec<_>>>()?;
        let recipe = Recipe {
            label: label.clone(),
            binary: supervisor::worker_binary(&self.opts.worker_dir, prep.kind),
            zone: dev.zone,
            addr: dev.addr,
            regions,
            setup: prep.setup,
            record: lifecycle::inflight_record(nq).with_context(|| label.clone())?,
            host_fds: prep.fds,
        };
        let mut transport = MmioTransport::new(prep.model);
        transport.set_inject(self.opts.inject);
        self.slots.push(Slot {
            zone: dev.zone,
            base: dev.addr,
            len: dev.len,
            irq: dev.irq,
            label,
            kind: prep.kind,
            transport,
            kick_due: vec![false; kicks.len()],
            kicks,
            calls,
            worker: None,
            recipe,
            life: Life::default(),
            epoch: 0,
            irq_pending: false,
            irq_retry_at: None,
            irq_retries: 0,
            irq_injected: 0,
            irq_reinjected: 0,
            host: prep.host,
            relay: prep.relay,
            worker_log: LogBudget::worker(),
            guest_log: LogBudget::guest(),
            outbox: Outbox::default(),
            watching_out: false,
            rate_limits: dev.rate_limits.iter().copied().collect(),
        });
        let i = self.slots.len() - 1;
        if let Some(relay) = &self.slots[i].relay {
            let token = relay_token(i);
            for (j, fd) in relay.fds().into_iter().enumerate() {
                self.epoll
                    .add(fd, EpollEvent::new(EpollFlags::empty(), token + j as u64))?;
            }
            self.watch_relay(i);
        }
        self.start_worker(i)
    }

    /// Moves a console's bytes as far as they go now, then watches for what they wait on.
    fn on_relay(&mut self, i: usize) {
        if let Some(relay) = &mut self.slots[i].relay {
            relay.pump();
        }
        self.watch_relay(i);
    }

    fn watch_relay(&mut self, i: usize) {
        let Some(relay) = &mut self.slots[i].relay else {
            return;
        };
        let token = relay_token(i);
        let want = relay.interest();
        let mut now = relay.registered;
        for (j, fd) in relay.fds().into_iter().enumerate() {
            let mut ev = EpollEvent::new(want[j], token + j as u64);
            if now[j] != want[j] && self.epoll.modify(fd, &mut ev).is_ok() {
                now[j] = want[j];
            }
        }
        relay.registered = now;
    }

    /// Starts a worker for device `i` and, if the driver had activated the device, activates
    /// it the same way (it resumes from the in-flight record) and signals the used buffers
    /// its predecessor published. Does not wait for the worker.
    fn start_worker(&mut self, i: usize) -> Result<()> {
        let slot = &mut self.slots[i];
        if let Some(relay) = &slot.relay {
            // No worker runs now: the counts are exact, and the new worker goes on from them.
            lifecycle::set_stream_totals(&slot.recipe.record, relay.totals())
                .with_context(|| slot.label.clone())?;
        }
        let fds = Plumbing {
            memory: self.driver.memory_fd(),
            kicks: &slot.kicks,
            calls: &slot.calls,
        };
        let opts = &self.opts;
        let generation = slot.life.restarts;
        let w = lifecycle::start(
            &opts.jail,
            &opts.worker_args,
            opts.ready_timeout,
            &slot.recipe,
            fds,
            generation,
        )?;
        let token = dev_token(i);
        self.epoll.add(
            w.channel.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, token),
        )?;
        for (q, c) in slot.calls.iter().enumerate() {
            // Edge-triggered: every write of the worker's is an event, so the count is never
            // read per request; emptied here so that a predecessor that saturated it cannot
            // leave this worker's writes failing.
            let _ = c.read();
            self.epoll.add(
                c.as_fd(),
                EpollEvent::new(CALL_EVENTS, token + 1 + q as u64),
            )?;
        }
        log::info!(
            "{}: irq {}, worker pid {} started ({})",
            slot.label,
            slot.irq,
            w.pid,
            slot.recipe.binary.display()
        );
        slot.worker = Some(w);
        slot.watching_out = false;
        slot.outbox = Outbox::default();
        for (&flow, &limit) in slot.rate_limits.iter().filter(|(_, l)| !l.is_off()) {
            slot.outbox.push(BrokerMsg::RateLimit { flow, limit });
        }
        if let Some((features, queues)) = slot.transport.replay() {
            slot.outbox.push(BrokerMsg::Activate {
                features,
                queues,
                epoch: slot.epoch,
            });
            if slot.transport.raise_used() {
                slot.interrupt();
            }
        }
        self.flush_outbox(i);
        Ok(())
    }

    /// Replaces the worker of device `i` when its time has come; a start that fails counts
    /// as a death.
    fn restart_due(&mut self, i: usize, now: Instant) {
        let slot = &mut self.slots[i];
        if slot.worker.is_some() || slot.life.restart_at.is_none_or(|at| at > now) {
            return;
        }
        slot.life.restart_at = None;
        slot.life.restarts += 1;
        if let Err(e) = self.start_worker(i) {
            let cause = format!("could not be started: {e:#}");
            log::error!("{}: {cause}", self.slots[i].label);
            self.after_exit(i, cause, false);
        }
    }

    /// Decides what follows the end of device `i`'s worker: a new one, or the device fails.
    fn after_exit(&mut self, i: usize, cause: String, violation: bool) {
        let slot = &mut self.slots[i];
        let now = Instant::now();
        slot.outbox = Outbox::default();
        match slot.life.on_exit(now, cause, violation, &self.opts.restart) {
            Next::Restart { at } => {
                let wait = at.saturating_duration_since(now);
                log::warn!(
                    "{}: starting a new worker (restart {}){}",
                    slot.label,
                    slot.life.restarts + 1,
                    if wait.is_zero() {
                        String::new()
                    } else {
                        format!(" in {wait:?}")
                    }
                );
            }
            Next::GiveUp(why) => {
                slot.life.restart_at = None;
                log::error!(
                    "{}: no new worker after {why}; the device fails (NEEDS_RESET)",
                    slot.label
                );
                if slot.transport.fail() {
                    slot.interrupt();
                }
            }
        }
    }

    /// Serves until SIGTERM/SIGINT (or the simulator leaving), then stops the workers.
    pub fn run(&mut self) -> Result<()> {
        let mut events = vec![EpollEvent::empty(); 64];
        let mut poller = Poller::new(self.opts.poll, self.opts.poll_budget, Instant::now());
        let mut events_seen = false;
        let mut looked_last = true;
        log::info!(
            "serving {} device(s) through {} ({} wakeup)",
            self.slots.len(),
            self.driver.path().display(),
            if self.driver.uses_signal() {
                "SIGUSR1"
            } else {
                "eventfd"
            }
        );
        self.opts
            .readiness
            .starting(self.slots.iter().map(|s| (s.zone, s.base)));
        while !self.stop {
            // Requests already waiting (even from before we started) are served first.
            let worked = self.drain_bridge() || events_seen;
            let mut sleeping = false;
            let timeout = if poller.after_round(Instant::now(), worked) == Wait::Poll {
                Duration::ZERO
            } else {
                if !self.driver.bridge().prepare_sleep() {
                    continue;
                }
                sleeping = true;
                match self.next_retry() {
                    Some(at) => at
                        .saturating_duration_since(Instant::now())
                        .min(self.opts.max_sleep),
                    None => self.opts.max_sleep,
                }
            };
            // A polling round watches the bridge page alone for a moment first: a register
            // access then seldom waits for a system call to end. Events are still looked for
            // at least every other round, so a worker's completion waits one pass at most.
            let skip_events = !sleeping && looked_last && self.driver.bridge().spin_for_req(SPINS);
            looked_last = !skip_events;
            let n = if skip_events {
                0
            } else {
                match poll::wait(&self.epoll, &mut events, Some(timeout)) {
                    Ok(n) => n,
                    Err(Errno::EINTR) => 0,
                    Err(e) => return Err(e).context("epoll_wait"),
                }
            };
            if sleeping {
                self.driver.bridge().awake();
            }
            events_seen = n > 0;
            for ev in &events[..n] {
                self.dispatch(ev.data())?;
            }
            if std::mem::take(&mut self.control_due) {
                self.on_control();
            }
            if std::mem::take(&mut self.reload_due) {
                self.reload();
            }
            self.retry_interrupts();
            self.flush_interrupts()?;
            if sleeping || n > 0 {
                self.check_deadlines();
            }
        }
        self.opts.readiness.stopping();
        self.shutdown();
        Ok(())
    }

    fn drain_bridge(&mut self) -> bool {
        let mut any = false;
        while let Some(req) = self.driver.bridge().peek_req() {
            self.handle(req);
            self.driver.bridge().pop_req();
            any = true;
        }
        if any {
            self.kick_workers();
        }
        any
    }

    /// Kicks each queue notified since the last time once: one eventfd write for every
    /// QueueNotify the guest wrote in one pass over the ring.
    fn kick_workers(&mut self) {
        for slot in &mut self.slots {
            for (due, kick) in slot.kick_due.iter_mut().zip(&slot.kicks) {
                if std::mem::take(due) {
                    let _ = kick.write(1);
                }
            }
        }
    }

    fn handle(&mut self, req: DeviceReq) {
        let slot = self.slots.iter().position(|s| {
            s.zone == req.src_zone && req.address >= s.base && req.address - s.base < s.len
        });
        let Some(i) = slot else {
            log::debug!(
                "zone{} cpu{}: access to {:#x} matches no device; reads 0",
                req.src_zone,
                req.src_cpu,
                req.address
            );
            if req.need_interrupt == 0 {
                self.complete(&req, 0);
            }
            return;
        };
        let offset = req.address - self.slots[i].base;
        let transport = &mut self.slots[i].transport;
        let (value, effect) = if req.is_write != 0 {
            (0, transport.write(offset, req.size, req.value))
        } else {
            (transport.read(offset, req.size), None)
        };
        // QueueNotify is never answered: the vCPU did not wait, and a stray completion would
        // release that CPU's next access early.
        if req.need_interrupt == 0 {
            self.complete(&req, value);
        }
        if let Some(effect) = effect {
            self.apply(i, effect);
        }
    }

    fn complete(&self, req: &DeviceReq, value: u64) {
        if !self.driver.bridge().complete(req.src_cpu, value) {
            log::warn!(
                "request from cpu {} (outside the bridge page) left unanswered",
                req.src_cpu
            );
        }
    }

    fn apply(&mut self, i: usize, effect: Effect) {
        let slot = &mut self.slots[i];
        let msg = match effect {
            Effect::Notify(q) => {
                if let Some(due) = slot.kick_due.get_mut(q as usize) {
                    *due = true;
                }
                return;
            }
            Effect::Activate { features, queues } => {
                slot.guest_log.log(
                    log::Level::Info,
                    &slot.label,
                    format_args!(
                        "driver ready, features {features:#x}, {} queue(s)",
                        queues.len()
                    ),
                );
                if let Host::Tap(tap) = &slot.host {
                    if let Err(e) = configure_tap(tap, features) {
                        slot.guest_log
                            .log(log::Level::Error, &slot.label, format_args!("{e:#}"));
                    }
                }
                slot.epoch += 1;
                BrokerMsg::Activate {
                    features,
                    queues,
                    epoch: slot.epoch,
                }
            }
            Effect::Deassert => {
                // Acknowledged: no retry is due, nor a wakeup for one.
                slot.irq_retry_at = None;
                self.driver.deassert_irq(slot.zone, slot.irq);
                return;
            }
            Effect::Reset => {
                slot.irq_pending = false;
                slot.irq_retry_at = None;
                self.driver.deassert_irq(slot.zone, slot.irq);
                BrokerMsg::Reset
            }
            Effect::ConfigWrite { offset, data } => BrokerMsg::ConfigWrite { offset, data },
            Effect::StopQueue(index) => BrokerMsg::StopQueue { index },
        };
        slot.outbox.push(msg);
        self.flush_outbox(i);
    }

    /// Sends what waits for the worker while its socket has room, and watches the socket for
    /// room while something still waits. A full socket is a slow worker, not a reason to
    /// stop it.
    fn flush_outbox(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        let Some(w) = slot.worker.as_ref().filter(|w| w.gone_since.is_none()) else {
            slot.outbox = Outbox::default();
            return;
        };
        while let Some(msg) = slot.outbox.front() {
            match w.channel.send(&msg, &[], true) {
                Ok(()) => slot.outbox.pop(),
                Err(ChannelError::Io(Errno::EAGAIN)) => break,
                Err(e) => {
                    // Gone: its end of the socket or its exit is handled where it is read.
                    log::debug!("{}: sending to the worker: {e}", slot.label);
                    slot.outbox = Outbox::default();
                    break;
                }
            }
        }
        let want_out = !slot.outbox.is_empty();
        if want_out != slot.watching_out {
            let mut flags = EpollFlags::EPOLLIN;
            if want_out {
                flags |= EpollFlags::EPOLLOUT;
            }
            let mut ev = EpollEvent::new(flags, dev_token(i));
            if self.epoll.modify(w.channel.as_fd(), &mut ev).is_ok() {
                slot.watching_out = want_out;
            }
        }
    }

    fn dispatch(&mut self, token: u64) -> Result<()> {
        match token {
            TOKEN_WAKEUP => self.driver.clear_wakeup(),
            TOKEN_SIGNALS => self.on_signals(),
            TOKEN_CONTROL => self.control_due = true,
            TOKEN_SIM => {
                log::warn!("the simulator closed its connection; stopping");
                self.stop = true;
            }
            t if t >= DEV_BASE => {
                let i = ((t - DEV_BASE) / DEV_STRIDE) as usize;
                let k = (t - DEV_BASE) % DEV_STRIDE;
                if i >= self.slots.len() {
                    return Ok(());
                }
                if k == 0 {
                    self.flush_outbox(i);
                    self.on_worker_message(i)?;
                } else if k >= RELAY {
                    self.on_relay(i);
                } else {
                    self.on_call(i);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Answers the control requests that arrived.
    fn on_control(&mut self) {
        let Some(c) = &mut self.control else { return };
        let mut report = None;
        for (conn, req) in c.serve() {
            let answer = match req {
                control::Request::Audit => report
                    .get_or_insert_with(|| {
                        serde_json::to_string(&audit::collect(known(&self.slots)))
                            .unwrap_or_default()
                    })
                    .clone(),
                control::Request::Status => {
                    serde_json::to_string(&statuses(&self.slots)).unwrap_or_default()
                }
                control::Request::RestartWorker { zone, device } => {
                    let (ok, message) = self.replace_worker(zone, &device);
                    control::action_answer(ok, &message)
                }
                control::Request::RateLimit {
                    zone,
                    device,
                    flow,
                    limit,
                } => {
                    let (ok, message) = self.set_rate_limit(zone, &device, flow, limit);
                    control::action_answer(ok, &message)
                }
                control::Request::ZoneAdd { path } => match self.add_zones_from(&path) {
                    Ok(message) => control::action_answer(true, &message),
                    Err(e) => control::action_answer(false, &format!("{e:#}")),
                },
                control::Request::ZoneRemove { zone } => {
                    // Answered once its workers have ended.
                    if let Err(conn) = self.remove_zone(zone, zones::Then::Reply(conn)) {
                        let message = format!("no zone {zone} is served");
                        if let Some(c) = &self.control {
                            c.reply(conn, &control::action_answer(false, &message));
                        }
                    }
                    continue;
                }
                control::Request::ZoneList => self.zone_list().to_string(),
            };
            if let Some(c) = &self.control {
                c.reply(conn, &answer);
            }
        }
    }

    /// Device `device` of `zone` (`blk@0xa003c00` or the address), as the operator named it.
    fn find_slot(&self, zone: u32, device: &str) -> Result<usize, String> {
        let addr = match device.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => device.parse().ok(),
        };
        self.slots
            .iter()
            .position(|s| {
                s.zone == zone
                    && (addr == Some(s.base) || format!("{}@{:#x}", s.kind, s.base) == device)
            })
            .ok_or_else(|| format!("zone {zone} has no device {device:?}"))
    }

    /// The operator set the rate limit of a flow of `device` (see [`Self::find_slot`]): kept
    /// for the device's next workers, and sent to the live one.
    fn set_rate_limit(
        &mut self,
        zone: u32,
        device: &str,
        flow: Option<Flow>,
        limit: Limit,
    ) -> (bool, String) {
        let i = match self.find_slot(zone, device) {
            Ok(i) => i,
            Err(why) => return (false, why),
        };
        let slot = &mut self.slots[i];
        let flows = Flow::of(slot.kind);
        let flow = match (flow, flows) {
            (Some(f), _) if flows.contains(&f) => f,
            (None, [only]) => *only,
            _ => {
                let names: Vec<&str> = flows.iter().map(|f| f.name()).collect();
                let why = match names.as_slice() {
                    [] => "has no rate limits".to_string(),
                    [only] => format!("has one flow, {only}"),
                    _ => format!("has flows {}: name one", names.join(" and ")),
                };
                return (
                    false,
                    format!("{}: a {} device {why}", slot.label, slot.kind),
                );
            }
        };
        let what = config::describe_limit(flow, &limit);
        log::warn!("{}: {what}, as asked on the control socket", slot.label);
        slot.rate_limits.insert(flow, limit);
        slot.outbox.push(BrokerMsg::RateLimit { flow, limit });
        self.flush_outbox(i);
        (true, format!("{}: {what}", self.slots[i].label))
    }

    /// The operator asked for a new worker for `device` of `zone` (see [`Self::find_slot`]):
    /// the live one is asked to stop (and killed if it does not) and replaced at once, outside
    /// the restart budget; a failed device gets a worker and a fresh budget.
    fn replace_worker(&mut self, zone: u32, device: &str) -> (bool, String) {
        let slot = match self.find_slot(zone, device) {
            Ok(i) => &mut self.slots[i],
            Err(why) => return (false, why),
        };
        let label = slot.label.clone();
        log::warn!("{label}: a new worker was asked for on the control socket");
        let Some(w) = slot.worker.as_mut() else {
            slot.transport.revive();
            slot.life.start_over(Instant::now());
            return (true, format!("{label}: starting a new worker"));
        };
        slot.life.replacing = true;
        if w.gone_since.is_none() {
            let _ = w.channel.send(&BrokerMsg::Shutdown, &[], true);
            self.epoll.delete(w.channel.as_fd()).ok();
            w.gone_since = Some(Instant::now());
        }
        (true, format!("{label}: replacing worker pid {}", w.pid))
    }

    fn on_call(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.transport.is_active() && slot.transport.raise_used() {
            slot.interrupt();
        }
    }

    /// Takes at most [`MAX_BATCH`] messages from worker `i`; the rest wait for the next round
    /// (its socket stays readable), after the bridge ring.
    fn on_worker_message(&mut self, i: usize) -> Result<()> {
        let slot = &mut self.slots[i];
        let Some(w) = slot.worker.as_mut().filter(|w| w.gone_since.is_none()) else {
            return Ok(());
        };
        for _ in 0..MAX_BATCH {
            let msg = match w.channel.try_recv::<WorkerMsg>() {
                Ok(None) => return Ok(()),
                Ok(Some((msg, _))) => msg,
                Err(ChannelError::Eof) | Err(ChannelError::Io(_)) => {
                    self.epoll.delete(w.channel.as_fd()).ok();
                    for c in &slot.calls {
                        self.epoll.delete(c.as_fd()).ok();
                    }
                    // What follows is decided where it is reaped.
                    w.gone_since = Some(Instant::now());
                    return Ok(());
                }
                Err(e) => {
                    let why = format!("malformed message ({e})");
                    stop_worker(&self.epoll, w, &slot.label, &why);
                    return Ok(());
                }
            };
            if !w.messages.take() {
                let why = format!(
                    "over its message budget ({} a second)",
                    MessageBudget::PER_SECOND
                );
                stop_worker(&self.epoll, w, &slot.label, &why);
                return Ok(());
            }
            if let Err(why) = w.take_message(&mut slot.worker_log, &slot.label, msg) {
                stop_worker(&self.epoll, w, &slot.label, &why);
                return Ok(());
            }
            if w.ready {
                self.opts.readiness.worker_ready((slot.zone, slot.base));
            }
        }
        Ok(())
    }

    fn on_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) => {
                    log::info!(
                        "stopping on {}",
                        Signal::try_from(info.ssi_signo as i32)
                            .map(|s| s.as_str())
                            .unwrap_or("signal")
                    );
                    self.stop = true;
                }
                Ok(Signal::SIGCHLD) => self.reap(),
                Ok(Signal::SIGHUP) => self.reload_due = true,
                _ => {}
            }
        }
    }

    /// Collects every exited worker, reports how it ended, and has it replaced (or the
    /// device failed: see [`lifecycle::Life::on_exit`]). The broker and every other device go on.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            let Some(i) =
                (self.slots.iter()).position(|s| s.worker.as_ref().is_some_and(|w| w.pid == pid))
            else {
                self.retired_exit(pid, &status);
                continue;
            };
            let slot = &mut self.slots[i];
            let w = slot.worker.take().expect("found above");
            let violation = matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _));
            let how = match (violation, w.violation) {
                (true, Some(nr)) => format!(
                    "killed: seccomp violation, syscall {}",
                    lifecycle::syscall_label(nr)
                ),
                (true, None) => "killed: seccomp violation".to_string(),
                _ => supervisor::describe_exit(&status),
            };
            self.epoll.delete(w.channel.as_fd()).ok();
            for c in &slot.calls {
                self.epoll.delete(c.as_fd()).ok();
            }
            if self.stop {
                log::info!("{} worker (pid {pid}) {how}", slot.label);
                continue;
            }
            if slot.life.replacing {
                log::info!("{} worker (pid {pid}) {how}, replaced as asked", slot.label);
            } else {
                log::error!("{} worker (pid {pid}) {how}", slot.label);
            }
            self.after_exit(i, how, violation);
        }
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        zones::tick(&mut self.retiring, now);
        for i in 0..self.slots.len() {
            self.restart_due(i, now);
        }
        for slot in &mut self.slots {
            slot.worker_log.report(&slot.label);
            slot.guest_log.report(&slot.label);
            let Some(w) = slot.worker.as_mut() else {
                continue;
            };
            if !w.ready && w.gone_since.is_none() {
                if let Some(why) = w.startup.overdue(w.pid) {
                    log::error!(
                        "{}: worker (pid {}) not ready: it {why}; stopping it",
                        slot.label,
                        w.pid
                    );
                    let _ = kill(w.pid, Signal::SIGKILL);
                    w.ready = true;
                }
            }
            if let Some(t) = w.gone_since {
                if t.elapsed() > Duration::from_secs(1) {
                    let _ = kill(w.pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// The earliest retry of an unacknowledged interrupt.
    fn next_retry(&self) -> Option<Instant> {
        self.slots.iter().filter_map(|s| s.irq_retry_at).min()
    }

    /// Injects again every interrupt the guest has not acknowledged by its retry time: the
    /// injection may have met the interrupt active in the guest and been dropped.
    fn retry_interrupts(&mut self) {
        let Some(first) = self.next_retry() else {
            return;
        };
        let now = Instant::now();
        if first > now {
            return;
        }
        for slot in &mut self.slots {
            if slot.irq_retry_at.is_none_or(|at| at > now) {
                continue;
            }
            slot.irq_retry_at = None;
            if slot.transport.retry_interrupt() {
                slot.irq_pending = true;
                slot.irq_retries += 1;
                slot.irq_reinjected += 1;
            }
        }
    }

    /// Pushes pending interrupts to `res_list` and tells the hypervisor. A full ring is flushed
    /// and retried; what still does not fit stays pending for the next round.
    fn flush_interrupts(&mut self) -> Result<()> {
        let mut pushed = false;
        for i in 0..self.slots.len() {
            if !self.slots[i].irq_pending {
                continue;
            }
            let res = DeviceRes {
                target_zone: self.slots[i].zone,
                irq_id: self.slots[i].irq,
            };
            let mut ok = self.driver.bridge().push_res(res);
            if !ok && pushed {
                self.driver.finish_req()?;
                pushed = false;
                ok = self.driver.bridge().push_res(res);
            }
            if ok {
                let slot = &mut self.slots[i];
                slot.irq_pending = false;
                slot.irq_injected += 1;
                let delay = retry_delay(self.opts.irq_first_retry, slot.irq_retries);
                slot.irq_retry_at = Some(Instant::now() + delay);
                pushed = true;
            }
        }
        if pushed {
            self.driver.finish_req()?;
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        zones::tick(&mut self.retiring, Instant::now() + zones::STOP_TIME);
        for slot in &self.slots {
            if let Some(w) = &slot.worker {
                let _ = w.channel.send(&BrokerMsg::Shutdown, &[], true);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.slots.iter().any(|s| s.worker.is_some()) && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(5));
        }
        for slot in &self.slots {
            if let Some(w) = &slot.worker {
                log::warn!(
                    "{}: worker (pid {}) did not stop; killing it",
                    slot.label,
                    w.pid
                );
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.slots.iter().any(|s| s.worker.is_some()) && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_millis(5));
        }
        self.reap();
        for slot in &mut self.slots {
            slot.worker_log.flush(&slot.label);
            slot.guest_log.flush(&slot.label);
        }
        log::info!("stopped");
    }

    /// Device kinds served, for tests and status lines.
    pub fn served(&self) -> Vec<(u32, DeviceKind, u64)> {
        self.slots
            .iter()
            .map(|s| (s.zone, s.kind, s.base))
            .collect()
    }
}
