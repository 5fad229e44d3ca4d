//! `hvisor-broker start CONFIG` serves the virtio devices of an hvisor-tool JSON config;
//! `hvisor-broker check CONFIG` validates it and prints what would be served.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use hvisor_broker::serve::{self, Broker, Options};
use hvisor_broker::supervisor::Jail;
use hvisor_broker::{driver, logging, supervisor};
use protocol::msg::SeccompAction;

#[derive(Parser)]
#[command(
    name = "hvisor-broker",
    version,
    about = "Privilege-separated virtio backend for hvisor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the devices of CONFIG (the JSON `hvisor virtio start` takes) until SIGTERM/SIGINT.
    Start {
        config: PathBuf,
        /// The hvisor driver: the /dev/hvisor character device, or a simulator socket.
        #[arg(long, default_value = "/dev/hvisor")]
        driver: PathBuf,
        /// Directory of the hvisor-worker-* binaries (default: beside this binary).
        #[arg(long)]
        worker_dir: Option<PathBuf>,
        /// Microseconds to keep polling the request ring after the last request.
        #[arg(long, default_value_t = 100)]
        poll_us: u64,
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
        /// The unprivileged UID[:GID] workers run as (seen from outside their namespaces).
        #[arg(long, default_value = "65534:65534", value_parser = parse_ids)]
        worker_user: (u32, u32),
        /// Seconds of CPU time a worker may use before it reports Ready; one that uses none
        /// for ten times as long is stopped too.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        ready_timeout: u64,
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
    },
    /// Print the seccomp allowlist of a worker kind: system calls and argument rules.
    Policy {
        #[arg(value_parser = ["blk", "net", "console"])]
        kind: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Audit { driver, json } => audit(&driver, json),
        Command::Policy { kind } => policy(&kind),
        Command::Start {
            config,
            driver,
            worker_dir,
            poll_us,
            log_level,
            syslog_socket,
            seccomp,
            worker_user,
            worker_args,
            ready_timeout,
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
            let jail = Jail {
                uid: worker_user.0,
                gid: worker_user.1,
                seccomp,
            };
            let opts = Options {
                poll: Duration::from_micros(poll_us),
                jail,
                worker_args,
                ready_timeout: Duration::from_secs(ready_timeout),
                ..Options::default()
            };
            match start(&config, &driver, worker_dir, opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let msg = format!("{e:#}");
                    log::error!("{msg}");
                    eprintln!("hvisor-broker: {msg}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn audit(driver: &Path, json: bool) -> ExitCode {
    let text = match hvisor_broker::control::request_audit(driver) {
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

fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    let n = |x: &str| {
        x.parse::<u32>()
            .map_err(|_| format!("{x:?} is not a numeric id"))
    };
    let (u, g) = (n(u)?, n(g)?);
    if u == 0 || g == 0 {
        return Err("workers never run as root".into());
    }
    Ok((u, g))
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
    // A second broker on the same driver would fight over the bridge page.
    let control = hvisor_broker::control::listen_on(driver_path)?;
    let prepared = serve::prepare_all(&loaded.config)?;
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
