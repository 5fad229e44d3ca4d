//! `hvisor-broker start CONFIG` serves the virtio devices of an hvisor-tool JSON config;
//! `hvisor-broker check CONFIG` validates it and prints what would be served.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hvisor_broker::serve::{self, Broker, Options};
use hvisor_broker::supervisor::Jail;
use hvisor_broker::{driver, logging, supervisor};
use protocol::msg::SeccompAction;
use nix::sys::socket::{bind, UnixAddr};

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
        /// The unprivileged UID[:GID] workers run as (seen from outside their namespaces).
        #[arg(long, default_value = "65534:65534", value_parser = parse_ids)]
        worker_user: (u32, u32),
    },
    /// Validate CONFIG and print what would be served; starts nothing.
    Check { config: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Start {
            config,
            driver,
            worker_dir,
            poll_us,
            log_level,
            syslog_socket,
            seccomp,
            worker_user,
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
    let n = |x: &str| x.parse::<u32>().map_err(|_| format!("{x:?} is not a numeric id"));
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
    let _instance = single_instance(driver_path)?;
    let prepared = serve::prepare_all(&loaded.config)?;
    let drv = driver::Driver::open(driver_path)?;
    let mut broker = Broker::new(&loaded.config, prepared, drv, opts)?;
    broker.run()
}

/// A second broker on the same driver would fight over the bridge page: hold an abstract
/// socket named after the driver (released by the kernel when we exit, needs no writable
/// file system).
fn single_instance(driver: &Path) -> Result<OwnedFd> {
    let canonical = std::fs::canonicalize(driver).unwrap_or_else(|_| driver.to_owned());
    let mut name = format!("hvisor-broker:{}", canonical.display());
    if name.len() > 100 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        canonical.hash(&mut h);
        name = format!("hvisor-broker:{:016x}", h.finish());
    }
    let sock = protocol::channel::seqpacket_socket()?;
    let addr = UnixAddr::new_abstract(name.as_bytes())?;
    match bind(sock.as_raw_fd(), &addr) {
        Ok(()) => Ok(sock),
        Err(nix::errno::Errno::EADDRINUSE) => {
            bail!(
                "another hvisor-broker is already serving {}",
                driver.display()
            )
        }
        Err(e) => Err(e).context("taking the single-instance lock"),
    }
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
