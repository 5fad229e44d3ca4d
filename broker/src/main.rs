//! `hvisor-broker start CONFIG` serves the virtio devices of an hvisor-tool JSON config;
//! `hvisor-broker check CONFIG` validates it and prints what would be served; `zone add`,
//! `zone remove` and `zone list` change and show the zones a running broker serves.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use hvisor_broker::irq::Inject;
use hvisor_broker::lifecycle::{self, OnViolation, RestartBudget};
use hvisor_broker::rundir::RunDir;
use hvisor_broker::serve::{self, Broker, Options};
use hvisor_broker::supervisor::{IdRange, Jail};
use hvisor_broker::{cgroup, driver, generate, logging, notify, supervisor};
use protocol::msg::SeccompAction;

const AFTER_HELP: &str = "\
Under systemd (Type=notify) `start` sends READY=1 once every device's worker is sandboxed and \
ready, and STOPPING=1 when it stops; --ready-file does the same for init scripts. Logs go to \
syslog (/dev/log, where journald listens under systemd) or else to stderr.

Files: /etc/hvisor-broker/virtio_cfg.json (the packaged service's config), /run/hvisor-broker \
(locks and the control socket). Environment: NOTIFY_SOCKET (set by systemd).";

#[derive(Parser)]
#[command(
    name = "hvisor-broker",
    version,
    about = "Privilege-separated virtio backend for hvisor",
    after_long_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// parsed once: the size of the options does not matter
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serve the devices of CONFIG (the JSON `hvisor virtio start` takes) until SIGTERM/SIGINT;
    /// SIGHUP reads CONFIG again and adds, removes or replaces the zones that changed.
    Start {
        config: PathBuf,
        /// The hvisor driver: the /dev/hvisor character device, or a simulator socket.
        #[arg(long, default_value = "/dev/hvisor")]
        driver: PathBuf,
        /// Directory of the hvisor-worker-* binaries (default: beside this binary).
        #[arg(long)]
        worker_dir: Option<PathBuf>,
        /// The longest, in microseconds, the loop polls after its last work before sleeping;
        /// the window adapts up to this (0: never poll).
        #[arg(long, default_value_t = 100)]
        poll_us: u64,
        /// The share of wall time, in percent, polling that finds nothing may cost (100: poll
        /// the whole --poll-us after all work, uncapped).
        #[arg(long, default_value_t = serve::DEFAULT_POLL_BUDGET, value_parser = clap::value_parser!(u32).range(0..=100))]
        poll_budget: u32,
        /// error, warn, info, debug or trace.
        #[arg(long, default_value = "info")]
        log_level: log::LevelFilter,
        /// A syslog socket other than /dev/log.
        #[arg(long)]
        syslog_socket: Option<PathBuf>,
        /// What a worker's refused system call does: kill (report, then die), trap (report; the
        /// call fails with ENOSYS) or log (allowed; the kernel logs it). For finding out what a
        /// new C library needs; never leave trap or log on in production.
        #[arg(long, default_value = "kill", value_parser = parse_seccomp)]
        seccomp: SeccompAction,
        /// An argument for every worker, e.g. `--worker-arg=--log-level=debug` (repeatable).
        #[arg(long = "worker-arg", allow_hyphen_values = true)]
        worker_args: Vec<String>,
        /// The ids workers run as, FIRST:COUNT: each live worker has a uid (and the gid of
        /// the same number) of its own from this range, which no other process should use.
        #[arg(long, default_value = "0x48560000:1024")]
        worker_ids: IdRange,
        /// The cgroup file system the workers' cgroups are made in.
        #[arg(long, default_value = cgroup::DEFAULT_ROOT)]
        cgroup_root: PathBuf,
        /// The memory limit of a kind's workers, KIND=SIZE (blk, net, console or all; SIZE in
        /// bytes with K, M or G, or max), e.g. blk=64M (repeatable; default all=256M).
        #[arg(long, value_parser = cgroup::parse_memory)]
        cgroup_memory: Vec<cgroup::Setting>,
        /// The task limit of a kind's workers, KIND=N or KIND=max (default blk=24, others 8).
        #[arg(long, value_parser = cgroup::parse_pids)]
        cgroup_pids: Vec<cgroup::Setting>,
        /// The CPU limit of a kind's workers, KIND=PERCENT of one CPU or KIND=max (default
        /// all=100%).
        #[arg(long, value_parser = cgroup::parse_cpu)]
        cgroup_cpu: Vec<cgroup::Setting>,
        /// When a device injects its interrupt: `every` used-buffer report and again while the
        /// guest has not acknowledged; `retry` only when the line was clear, and again while
        /// unacknowledged; `once` only when the line was clear (stalls on hvisor, which drops
        /// injections; for comparison only).
        #[arg(long, value_enum, default_value_t = Inject::Every)]
        irq_inject: Inject,
        /// Microseconds after an injection before the first retry while the guest has not
        /// acknowledged; later retries back off to 20 ms.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        irq_retry_us: u64,
        /// Where the locks and the control socket live (made root-only if missing).
        #[arg(long, default_value = hvisor_broker::rundir::DEFAULT)]
        run_dir: PathBuf,
        /// Seconds of CPU time a worker may use before it reports Ready; one that uses none
        /// for ten times as long is stopped too.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        ready_timeout: u64,
        /// Write this file (holding the broker's pid) once every worker is sandboxed and
        /// ready, and remove it on stop: what an init script waits for before `hvisor zone
        /// start`. A file left there by an earlier broker is removed once serving starts.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// What a worker killed by its seccomp filter leads to: `restart` (a new worker, within
        /// the restart budget) or `fail` (the device fails: the guest may own the worker).
        #[arg(long, value_enum, default_value_t = OnViolation::Restart)]
        on_violation: OnViolation,
        /// At most COUNT restarts of a device's worker in any SECONDS; past that the device
        /// fails (the guest sees DEVICE_NEEDS_RESET).
        #[arg(long, default_value = "10/60")]
        restart_budget: RestartBudget,
    },
    /// Replace the worker of DEVICE (e.g. blk@0xa003c00, or 0xa003c00) of zone ZONE: the running
    /// broker stops it and starts a new one, which resumes where it stopped (root only).
    RestartWorker {
        zone: u32,
        device: String,
        /// The driver the broker serves.
        #[arg(long, default_value = "/dev/hvisor")]
        driver: PathBuf,
        /// The broker's run directory.
        #[arg(long, default_value = hvisor_broker::rundir::DEFAULT)]
        run_dir: PathBuf,
    },
    /// Set the rate limit of DEVICE (e.g. blk@0xa003c00, or 0xa003c00) of zone ZONE in the
    /// running broker, replacing the flow's whole limit; the device's later workers keep it
    /// (root only). Bursts default to a tenth of a second's worth.
    RateLimit {
        zone: u32,
        device: String,
        /// Which flow: io (blk, the default there), rx or tx (net: frames to or from the guest).
        #[arg(long, value_parser = ["io", "rx", "tx"])]
        flow: Option<String>,
        /// Bytes a second.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=protocol::Bucket::MAX))]
        bytes_per_sec: Option<u64>,
        /// Bytes that may go at once after an idle spell.
        #[arg(long, requires = "bytes_per_sec", value_parser = clap::value_parser!(u64).range(1..=protocol::Bucket::MAX))]
        burst_bytes: Option<u64>,
        /// Requests (blk) or frames (net) a second.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=protocol::Bucket::MAX))]
        ops_per_sec: Option<u64>,
        /// Requests or frames that may go at once after an idle spell.
        #[arg(long, requires = "ops_per_sec", value_parser = clap::value_parser!(u64).range(1..=protocol::Bucket::MAX))]
        burst_ops: Option<u64>,
        /// Remove the flow's limit.
        #[arg(long, conflicts_with_all = ["bytes_per_sec", "ops_per_sec"], required_unless_present_any = ["bytes_per_sec", "ops_per_sec"])]
        off: bool,
        /// The driver the broker serves.
        #[arg(long, default_value = "/dev/hvisor")]
        driver: PathBuf,
        /// The broker's run directory.
        #[arg(long, default_value = hvisor_broker::rundir::DEFAULT)]
        run_dir: PathBuf,
    },
    /// Add, remove or list the zones the running broker serves (root only).
    Zone {
        #[command(subcommand)]
        action: ZoneAction,
        /// The driver the broker serves.
        #[arg(long, global = true, default_value = "/dev/hvisor")]
        driver: PathBuf,
        /// The broker's run directory.
        #[arg(long, global = true, default_value = hvisor_broker::rundir::DEFAULT)]
        run_dir: PathBuf,
    },
    /// Validate CONFIG and print what would be served; starts nothing.
    Check { config: PathBuf },
    /// Ask the running broker what the kernel says about each worker's sandbox (root only).
    Audit {
        /// The driver the broker serves.
        #[arg(long, default_value = "/dev/hvisor")]
        driver: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The broker's run directory.
        #[arg(long, default_value = hvisor_broker::rundir::DEFAULT)]
        run_dir: PathBuf,
    },
    /// Print the running broker's counters per device: requests, bytes, errors, interrupts,
    /// worker restarts, CPU time and memory (root only).
    Status {
        /// The driver the broker serves.
        #[arg(long, default_value = "/dev/hvisor")]
        driver: PathBuf,
        /// Machine-readable output.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// The Prometheus text format, for node_exporter's textfile collector.
        #[arg(long)]
        prometheus: bool,
        /// The broker's run directory.
        #[arg(long, default_value = hvisor_broker::rundir::DEFAULT)]
        run_dir: PathBuf,
    },
    /// Print the seccomp allowlist of a worker kind: system calls and argument rules.
    Policy {
        #[arg(value_parser = ["blk", "net", "console"])]
        kind: String,
    },
    /// Write the man pages or the shell completions into DIR (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: generate::What,
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ZoneAction {
    /// Serve the zones of CONFIG (an hvisor-tool virtio JSON) beside the running ones, once
    /// checked against them; an error changes nothing.
    Add { config: PathBuf },
    /// Stop serving zone ZONE: its workers end and its images, taps and ptys are released;
    /// returns once they are.
    Remove { zone: u32 },
    /// The zones served, their devices and their workers' state.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Audit {
            driver,
            json,
            run_dir,
        } => audit(&run_dir, &driver, json),
        Command::Status {
            driver,
            json,
            prometheus,
            run_dir,
        } => status(&run_dir, &driver, json, prometheus),
        Command::Policy { kind } => policy(&kind),
        Command::Generate { what, dir } => match generate::write(what, Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hvisor-broker generate: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Zone {
            action,
            driver,
            run_dir,
        } => zone(&run_dir, &driver, action),
        Command::RestartWorker {
            zone,
            device,
            driver,
            run_dir,
        } => match hvisor_broker::control::request_restart(&run_dir, &driver, zone, &device) {
            Ok(message) => {
                println!("{message}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hvisor-broker restart-worker: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::RateLimit {
            zone,
            device,
            flow,
            bytes_per_sec,
            burst_bytes,
            ops_per_sec,
            burst_ops,
            off: _,
            driver,
            run_dir,
        } => {
            let flow = flow.as_deref().and_then(protocol::Flow::from_name);
            let bucket = |rate: Option<u64>, burst| {
                rate.map(|r| protocol::Bucket::new(r, burst)).transpose()
            };
            let answer = bucket(bytes_per_sec, burst_bytes)
                .and_then(|bytes| Ok((bytes, bucket(ops_per_sec, burst_ops)?)))
                .map_err(anyhow::Error::msg)
                .and_then(|(bytes, ops)| {
                    let limit = protocol::Limit { bytes, ops };
                    hvisor_broker::control::request_rate_limit(
                        &run_dir, &driver, zone, &device, flow, limit,
                    )
                });
            match answer {
                Ok(message) => {
                    println!("{message}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("hvisor-broker rate-limit: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Start {
            config,
            driver,
            worker_dir,
            poll_us,
            poll_budget,
            log_level,
            syslog_socket,
            seccomp,
            worker_ids,
            worker_args,
            irq_inject,
            irq_retry_us,
            run_dir,
            cgroup_root,
            cgroup_memory,
            cgroup_pids,
            cgroup_cpu,
            ready_timeout,
            ready_file,
            on_violation,
            restart_budget,
        } => {
            // Before any thread exists: SIGUSR1 (old drivers' wakeup) must never take its
            // default action, and the rest are read through a signalfd.
            if let Err(e) = driver::block_signals() {
                eprintln!("hvisor-broker: blocking signals: {e}");
                return ExitCode::FAILURE;
            }
            ensure_std_fds();
            // Workers inherit supplementary groups across the user namespace, where they could
            // never be dropped again: the broker, root anyway, keeps none.
            let _ = nix::unistd::setgroups(&[]);
            logging::init(log_level, syslog_socket.as_deref());
            let readiness = match notify::Readiness::new(ready_file) {
                Ok(r) => r,
                Err(e) => return failed(e),
            };
            let mut cgroups = cgroup::Options {
                root: cgroup_root,
                ..Default::default()
            };
            for s in cgroup_memory {
                cgroups.apply(s, |l, v| l.memory = v);
            }
            for s in cgroup_pids {
                cgroups.apply(s, |l, v| l.pids = v);
            }
            for s in cgroup_cpu {
                cgroups.apply(s, |l, v| l.cpu = v);
            }
            let jail = Jail::new(worker_ids, seccomp, cgroups);
            let opts = Options {
                poll: Duration::from_micros(poll_us),
                poll_budget,
                jail,
                worker_args,
                inject: irq_inject,
                irq_first_retry: Duration::from_micros(irq_retry_us),
                ready_timeout: Duration::from_secs(ready_timeout),
                readiness,
                restart: lifecycle::Policy {
                    budget: restart_budget,
                    on_violation,
                },
                config_path: std::path::absolute(&config).ok(),
                ..Options::default()
            };
            match start(&config, &driver, &run_dir, worker_dir, opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => failed(e),
            }
        }
    }
}

fn zone(run_dir: &Path, driver: &Path, action: ZoneAction) -> ExitCode {
    use hvisor_broker::control::{self, Request};
    let answer = match action {
        ZoneAction::Add { config } => {
            control::request_zone_change(run_dir, driver, &Request::ZoneAdd { path: config })
        }
        ZoneAction::Remove { zone } => {
            control::request_zone_change(run_dir, driver, &Request::ZoneRemove { zone })
        }
        ZoneAction::List { json } => control::request_zone_list(run_dir, driver).map(|list| {
            if json {
                serde_json::to_string_pretty(&list).unwrap_or_default()
            } else {
                hvisor_broker::zones::render_list(&list)
                    .trim_end()
                    .to_string()
            }
        }),
    };
    match answer {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hvisor-broker zone: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `start` failed: said in the log and on stderr.
fn failed(e: anyhow::Error) -> ExitCode {
    let msg = format!("{e:#}");
    log::error!("{msg}");
    eprintln!("hvisor-broker: {msg}");
    ExitCode::FAILURE
}

fn audit(run_dir: &Path, driver: &Path, json: bool) -> ExitCode {
    let text = match hvisor_broker::control::request_audit(run_dir, driver) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("hvisor-broker audit: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!("{text}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_str::<hvisor_broker::audit::Report>(&text) {
        Ok(report) => {
            print!("{}", hvisor_broker::audit::render(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hvisor-broker audit: unreadable answer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(run_dir: &Path, driver: &Path, json: bool, prometheus: bool) -> ExitCode {
    use hvisor_broker::status;
    let report = match hvisor_broker::control::request_status(run_dir, driver) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hvisor-broker status: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else if prometheus {
        print!("{}", status::prometheus(&report));
    } else {
        print!("{}", status::render(&report));
    }
    ExitCode::SUCCESS
}

fn policy(kind: &str) -> ExitCode {
    let kind = match kind {
        "blk" => protocol::DeviceKind::Blk,
        "net" => protocol::DeviceKind::Net,
        _ => protocol::DeviceKind::Console,
    };
    let Some(list) = policy::allowlist(kind) else {
        eprintln!("no allowlist for {kind} workers");
        return ExitCode::FAILURE;
    };
    println!(
        "{kind} worker seccomp allowlist ({}): {} system calls; anything else is refused",
        std::env::consts::ARCH,
        list.len()
    );
    println!("(default: the SIGSYS reporter names the call, then the worker dies by SIGSYS)");
    for allowed in &list {
        println!("  allow   {allowed}");
    }
    for refused in policy::refusals() {
        println!("  refuse  {refused}");
    }
    ExitCode::SUCCESS
}

fn parse_seccomp(s: &str) -> Result<SeccompAction, String> {
    match s {
        "kill" => Ok(SeccompAction::Kill),
        "trap" => Ok(SeccompAction::Trap),
        "log" => Ok(SeccompAction::Log),
        _ => Err(format!("{s:?}: kill, trap or log")),
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", loaded.config.describe());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{}: invalid configuration:\n{errors}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn start(
    config_path: &Path,
    driver_path: &Path,
    run_dir: &Path,
    worker_dir: Option<PathBuf>,
    mut opts: Options,
) -> Result<()> {
    let loaded = config::load(config_path)
        .map_err(|e| anyhow::anyhow!("{}: invalid configuration:\n{e}", config_path.display()))?;
    for w in &loaded.warnings {
        log::warn!("{}: {w}", config_path.display());
    }
    opts.worker_dir = match worker_dir {
        Some(d) => d,
        None => supervisor::default_worker_dir()?,
    };
    let run = RunDir::create(run_dir)?;
    // A second broker on the same driver would fight over the bridge page.
    let control = hvisor_broker::control::listen_on(run, driver_path)?;
    let prepared = serve::prepare_all(&loaded.config, control.run_dir())?;
    let drv = driver::Driver::open(driver_path)?;
    let mut broker = Broker::new(&loaded.config, prepared, drv, opts, Some(control))?;
    broker.run()
}

/// A daemon started with a closed stdin/stdout/stderr would hand those numbers to the first
/// sockets it opens, and a worker's stdio setup would then clobber them.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            if let Ok(f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                std::mem::forget(f);
            }
        }
    }
}
