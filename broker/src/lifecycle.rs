//! A device's workers over time: starting one (spawn plus the Hello with its fds), what it may
//! say, and what happens when it dies: a new worker with the same resources and the same
//! in-flight record, within a restart budget with backoff, or the device failed for good.
//!
//! Nothing here waits. A start is a clone and exec plus one message; the new worker reports
//! Ready when it is ready, and the bridge loop goes on meanwhile. Decisions take `now`, so
//! the budget is tested without processes.

use std::collections::{BTreeSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::eventfd::EventFd;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::unistd::Pid;
use protocol::msg::PROTOCOL_VERSION;
use protocol::{BrokerMsg, Channel, DeviceSetup, MemoryRegion, WorkerMsg};

use crate::budget::{escape, LogBudget, MessageBudget};
use crate::startup::ReadyWatch;
use crate::supervisor::{self, Jail, Placement};

/// Distinct refused system calls logged per worker; more are only counted.
const MAX_VIOLATIONS: usize = 32;
/// Sandbox notes kept from a worker's Confined message.
const MAX_NOTES: usize = 8;
/// Exits kept for audits.
const MAX_EXITS: usize = 16;
/// The first restart in a window is at once; each further one waits twice as long as the
/// one before, from this, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// `--on-violation`: what a worker killed by its seccomp filter leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnViolation {
    /// A new worker, within the restart budget.
    #[default]
    Restart,
    /// The device fails (the guest may own the worker; do not give it another).
    Fail,
}

/// `--restart-budget COUNT/SECONDS`: at most COUNT restarts in any SECONDS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBudget {
    pub count: u32,
    pub window: Duration,
}

impl Default for RestartBudget {
    fn default() -> Self {
        RestartBudget {
            count: 10,
            window: Duration::from_secs(60),
        }
    }
}

impl std::str::FromStr for RestartBudget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (count, secs) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected COUNT/SECONDS, e.g. 10/60"))?;
        let count = count
            .parse()
            .map_err(|_| format!("{count:?} is not a count"))?;
        let secs: u64 = secs
            .parse()
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| format!("{secs:?} is not a number of seconds above 0"))?;
        Ok(RestartBudget {
            count,
            window: Duration::from_secs(secs),
        })
    }
}

/// What the broker does when a device's worker dies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    pub budget: RestartBudget,
    pub on_violation: OnViolation,
}

/// What follows a worker's death.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Start a new worker at this time.
    Restart { at: Instant },
    /// The device fails, for this reason.
    GiveUp(String),
}

/// One exit, for audits.
pub struct Exit {
    pub at: SystemTime,
    pub cause: String,
}

/// A device's restarts and exits; outlives its workers.
#[derive(Default)]
pub struct Life {
    /// Workers started after the first.
    pub restarts: u32,
    /// When the restarts inside the current window happened.
    recent: VecDeque<Instant>,
    pub exits: VecDeque<Exit>,
    /// Workers that ended, all of them (`exits` keeps the last few).
    pub exit_count: u64,
    /// A new worker is due at this time.
    pub restart_at: Option<Instant>,
    /// The operator asked for the current worker to be replaced: its exit is no failure.
    pub replacing: bool,
}

impl Life {
    /// Records how a worker ended and decides what follows. `violation`: it was killed by
    /// its seccomp filter.
    pub fn on_exit(
        &mut self,
        now: Instant,
        cause: String,
        violation: bool,
        policy: &Policy,
    ) -> Next {
        self.record(cause);
        if std::mem::take(&mut self.replacing) {
            return self.restart(now);
        }
        if violation && policy.on_violation == OnViolation::Fail {
            return Next::GiveUp("a seccomp violation, and --on-violation is fail".into());
        }
        let budget = policy.budget;
        while self
            .recent
            .front()
            .is_some_and(|&t| now.duration_since(t) >= budget.window)
        {
            self.recent.pop_front();
        }
        let n = self.recent.len() as u32;
        if n >= budget.count {
            return Next::GiveUp(format!(
                "{n} restarts in {:?}, the budget (--restart-budget)",
                budget.window
            ));
        }
        let delay = match n {
            0 => Duration::ZERO,
            n => (FIRST_BACKOFF * 2u32.saturating_pow(n - 1)).min(MAX_BACKOFF),
        };
        self.recent.push_back(now);
        self.restart(now + delay)
    }

    /// The operator asked for a new worker where there is none (the device failed): a fresh
    /// budget.
    pub fn start_over(&mut self, now: Instant) {
        self.recent.clear();
        self.restart_at = Some(now);
    }

    fn restart(&mut self, at: Instant) -> Next {
        self.restart_at = Some(at);
        Next::Restart { at }
    }

    fn record(&mut self, cause: String) {
        self.exit_count += 1;
        if self.exits.len() == MAX_EXITS {
            self.exits.pop_front();
        }
        self.exits.push_back(Exit {
            at: SystemTime::now(),
            cause,
        });
    }

    /// Each exit as "TIME: cause", oldest first.
    pub fn exit_lines(&self) -> Vec<String> {
        self.exits
            .iter()
            .map(|e| format!("{}: {}", utc(e.at), e.cause))
            .collect()
    }
}

/// `2024-05-01 12:00:00.123 UTC`.
fn utc(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rest / 3600,
        rest / 60 % 60,
        rest % 60,
        d.subsec_millis()
    )
}

/// Everything needed to start a device's worker, again and again.
pub struct Recipe {
    pub label: String,
    pub binary: PathBuf,
    pub zone: u32,
    pub addr: u64,
    pub regions: Vec<MemoryRegion>,
    pub setup: DeviceSetup,
    /// The in-flight record every worker of the device inherits.
    pub record: OwnedFd,
    /// The broker's copies of the device's host fds (image, tap, pty).
    pub host_fds: Vec<OwnedFd>,
}

/// The broker's memfd for a record of `num_queues` queues: zero, of fixed size (sealed), so
/// no worker can make the next one's mapping fault.
pub fn inflight_record(num_queues: usize) -> Result<OwnedFd> {
    let fd = memfd_create(
        "hvisor-inflight",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .context("creating the in-flight record")?;
    let len = protocol::inflight::bytes(num_queues);
    nix::unistd::ftruncate(&fd, len as libc::off_t).context("sizing the in-flight record")?;
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).context("sealing the in-flight record")?;
    Ok(fd)
}

/// Writes the host stream totals (see `protocol::inflight`) into a device's record; done
/// while no worker of the device runs.
pub fn set_stream_totals(record: &OwnedFd, totals: [u64; 2]) -> Result<()> {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&totals[0].to_ne_bytes());
    bytes[8..].copy_from_slice(&totals[1].to_ne_bytes());
    let at = (protocol::inflight::STREAM_TOTALS * 8) as libc::off_t;
    let n = nix::sys::uio::pwrite(record, &bytes, at).context("writing the in-flight record")?;
    anyhow::ensure!(n == bytes.len(), "short write to the in-flight record");
    Ok(())
}

/// A live worker process.
pub struct Worker {
    pub pid: Pid,
    pub channel: Channel,
    pub ready: bool,
    pub startup: ReadyWatch,
    /// Socket closed; waiting for SIGCHLD until this deadline, then SIGKILL.
    pub gone_since: Option<Instant>,
    /// The last system call its filter refused, as its SIGSYS reporter said.
    pub violation: Option<i64>,
    /// The refused calls already logged.
    violations: BTreeSet<i64>,
    /// Its Failed message was logged: one per life.
    failed: bool,
    /// How it confined itself, as it reported (escaped, once per life).
    pub confinement: Option<(String, Vec<String>)>,
    /// Its ids and cgroup, freed when it is dropped after being reaped.
    pub lease: supervisor::Lease,
    pub messages: MessageBudget,
}

/// The fds every worker of a device gets besides its host fds.
pub struct Plumbing<'a> {
    pub memory: BorrowedFd<'a>,
    pub kicks: &'a [EventFd],
    pub calls: &'a [EventFd],
}

/// Starts a worker for `recipe` and sends its Hello; does not wait for it.
pub fn start(
    jail: &Jail,
    args: &[String],
    ready_timeout: Duration,
    recipe: &Recipe,
    fds: Plumbing<'_>,
    generation: u32,
) -> Result<Worker> {
    let label = &recipe.label;
    let mut placement = Placement::of(recipe.zone, recipe.addr, &recipe.setup);
    placement.generation = generation;
    let spawned = jail
        .spawn(&recipe.binary, args, placement)
        .with_context(|| format!("{label}: starting its worker"))?;
    for note in &spawned.notes {
        log::warn!("{label}: weaker sandbox: {note}");
    }
    let hello = BrokerMsg::Hello {
        version: PROTOCOL_VERSION,
        zone: recipe.zone,
        label: label.clone(),
        regions: recipe.regions.clone(),
        num_queues: fds.kicks.len() as u16,
        setup: recipe.setup.clone(),
        sandbox: spawned.sandbox,
    };
    let mut all = vec![fds.memory, recipe.record.as_fd()];
    all.extend(fds.kicks.iter().map(|k| k.as_fd()));
    all.extend(fds.calls.iter().map(|c| c.as_fd()));
    all.extend(recipe.host_fds.iter().map(|f| f.as_fd()));
    // A fresh socket has room for the Hello: this does not block.
    if let Err(e) = spawned.channel.send(&hello, &all, true) {
        let _ = nix::sys::signal::kill(spawned.pid, nix::sys::signal::Signal::SIGKILL);
        return Err(e).with_context(|| format!("{label}: sending its setup to the worker"));
    }
    Ok(Worker {
        pid: spawned.pid,
        channel: spawned.channel,
        ready: false,
        startup: ReadyWatch::new(ready_timeout),
        gone_since: None,
        violation: None,
        violations: BTreeSet::new(),
        failed: false,
        confinement: None,
        lease: spawned.lease,
        messages: MessageBudget::new(),
    })
}

/// `openat`, or the number where the name is not known.
pub fn syscall_label(nr: i64) -> String {
    match policy::syscall_name(nr) {
        Some(name) => name.to_string(),
        None => format!("#{nr}"),
    }
}

impl Worker {
    /// Logs (within the worker's budget, its text escaped) and records one message;
    /// `Err` says why the worker must be stopped. What a worker may say once is taken once.
    pub fn take_message(
        &mut self,
        budget: &mut LogBudget,
        label: &str,
        msg: WorkerMsg,
    ) -> Result<(), String> {
        let pid = self.pid;
        match msg {
            WorkerMsg::Ready { version, pid: _ } => {
                if version != PROTOCOL_VERSION {
                    return Err(format!("speaks protocol {version}, not {PROTOCOL_VERSION}"));
                }
                if !std::mem::replace(&mut self.ready, true) {
                    log::info!("{label}: worker (pid {pid}) sandboxed and ready");
                }
            }
            WorkerMsg::Log { level, message } => {
                let level = match level {
                    1 => log::Level::Error,
                    2 => log::Level::Warn,
                    3 => log::Level::Info,
                    4 => log::Level::Debug,
                    _ => log::Level::Trace,
                };
                budget.log(level, label, format_args!("{}", escape(&message)));
            }
            WorkerMsg::Failed { reason } => {
                if !std::mem::replace(&mut self.failed, true) {
                    let reason = escape(&reason);
                    budget.log(
                        log::Level::Error,
                        label,
                        format_args!("worker (pid {pid}) failed: {reason}"),
                    );
                }
            }
            WorkerMsg::Violation { nr, arch: _ } => {
                self.violation = Some(nr);
                if self.violations.len() < MAX_VIOLATIONS && self.violations.insert(nr) {
                    budget.log(
                        log::Level::Error,
                        label,
                        format_args!(
                            "worker (pid {pid}) made a refused system call: {}",
                            syscall_label(nr)
                        ),
                    );
                }
            }
            WorkerMsg::Confined { root, notes } => {
                if self.confinement.is_some() {
                    return Ok(());
                }
                let root = escape(&root);
                budget.log(
                    log::Level::Info,
                    label,
                    format_args!("worker (pid {pid}) confined: {root}"),
                );
                let notes: Vec<String> = notes.iter().take(MAX_NOTES).map(|n| escape(n)).collect();
                for n in &notes {
                    budget.log(log::Level::Warn, label, format_args!("weaker sandbox: {n}"));
                }
                self.confinement = Some((root, notes));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(count: u32, secs: u64) -> Policy {
        Policy {
            budget: RestartBudget {
                count,
                window: Duration::from_secs(secs),
            },
            on_violation: OnViolation::Restart,
        }
    }

    #[test]
    fn restarts_back_off_and_stop_at_the_budget() {
        let p = policy(10, 60);
        let mut life = Life::default();
        let t0 = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..10 {
            match life.on_exit(t0, "killed by SIGKILL".into(), false, &p) {
                Next::Restart { at } => delays.push(at - t0),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(delays[0], Duration::ZERO);
        assert_eq!(delays[1], FIRST_BACKOFF);
        assert_eq!(delays[2], FIRST_BACKOFF * 2);
        assert_eq!(delays[9], MAX_BACKOFF);
        assert!(matches!(
            life.on_exit(t0, "x".into(), false, &p),
            Next::GiveUp(_)
        ));
        // a window later the budget is whole again
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            life.on_exit(later, "x".into(), false, &p),
            Next::Restart { at: later }
        );
        assert_eq!(life.exits.len(), 12);
    }

    #[test]
    fn a_violation_fails_the_device_only_when_asked() {
        let mut p = policy(10, 60);
        let t0 = Instant::now();
        let mut life = Life::default();
        assert!(matches!(
            life.on_exit(t0, "seccomp".into(), true, &p),
            Next::Restart { .. }
        ));
        p.on_violation = OnViolation::Fail;
        assert!(matches!(
            life.on_exit(t0, "seccomp".into(), true, &p),
            Next::GiveUp(_)
        ));
    }

    #[test]
    fn an_operator_restart_is_immediate_and_free() {
        let p = policy(1, 60);
        let t0 = Instant::now();
        let mut life = Life::default();
        for _ in 0..5 {
            life.replacing = true;
            assert_eq!(
                life.on_exit(t0, "exited".into(), false, &p),
                Next::Restart { at: t0 }
            );
        }
        assert!(matches!(
            life.on_exit(t0, "x".into(), false, &p),
            Next::Restart { .. }
        ));
        assert!(matches!(
            life.on_exit(t0, "x".into(), false, &p),
            Next::GiveUp(_)
        ));
    }

    #[test]
    fn budgets_parse() {
        assert_eq!(
            "10/60".parse::<RestartBudget>().unwrap(),
            RestartBudget::default()
        );
        assert!("10".parse::<RestartBudget>().is_err());
        assert!("10/0".parse::<RestartBudget>().is_err());
        assert!("x/5".parse::<RestartBudget>().is_err());
    }

    #[test]
    fn times_are_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_123);
        assert_eq!(utc(t), "2000-02-29 00:00:00.123 UTC");
    }

    #[test]
    fn records_are_sealed_at_their_size() {
        let fd = inflight_record(2).unwrap();
        let st = nix::sys::stat::fstat(&fd).unwrap();
        assert_eq!(st.st_size as usize, protocol::inflight::bytes(2));
        assert!(nix::unistd::ftruncate(&fd, 0).is_err());
    }
}
