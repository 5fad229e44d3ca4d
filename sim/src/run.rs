//! The `hvisor-sim` program: build the machine, serve one broker, run the guests, report.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use protocol::bridge::BridgeMap;

use crate::guest::{self, GuestOptions, Workload, ZoneJob};
use crate::hal::SLOTS;
use crate::hv::{Gic, Hypervisor};
use crate::layout::{DevKind, Machine};
use crate::mem::PhysMem;
use crate::report::Report;
use crate::server::{Listener, SharedFds};

/// A simulated hvisor with guest zones, serving one hvisor-broker over the simulator socket.
#[derive(Debug, Parser)]
#[command(name = "hvisor-sim", version)]
pub struct Args {
    /// The backend JSON (zones, RAM regions, devices).
    #[arg(long)]
    pub config: PathBuf,
    /// Path of the SOCK_SEQPACKET socket to listen on.
    #[arg(long)]
    pub socket: PathBuf,
    /// Emulate the driver before February 2026: refuse eventfd INIT, wake with SIGUSR1.
    #[arg(long)]
    pub legacy_driver: bool,
    /// Lose every N-th wakeup of the broker, as hvisor can (hvisor-abi 2.5); 0: none.
    #[arg(long, default_value_t = 0)]
    pub lose_wakeups: u64,
    /// What the interrupt controller does with an injection while the guest handles the
    /// same interrupt: `hvisor` drops it, as the real hypervisor does; `ideal` keeps it.
    #[arg(long, value_enum, default_value_t = Gic::Hvisor)]
    pub gic: Gic,
    /// The guest workload.
    #[arg(long, value_enum)]
    pub guest: Workload,
    /// `bench`: how many synchronous register reads it times.
    #[arg(long, default_value_t = 200_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub bench_reads: usize,
    /// `blk-verify`: run it again and again until this file exists.
    #[arg(long)]
    pub repeat_until: Option<PathBuf>,
    /// `rounds`: the directory of its go, done and end files.
    #[arg(long)]
    pub rounds_dir: Option<PathBuf>,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the run report here, as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write each blk device's expected content here (zone<id>-0x<addr>.img).
    #[arg(long)]
    pub shadow_dir: Option<PathBuf>,
    /// Give up (exit 3) if the workload has not finished this many seconds after listening.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// After the workload, keep serving until the broker disconnects.
    #[arg(long)]
    pub stay: bool,
    /// Start the guests only once this file exists (the broker is connected meanwhile).
    #[arg(long)]
    pub wait_for: Option<PathBuf>,
    /// `queue-stop`: with its queue stopped, the guest goes on only once this file exists.
    #[arg(long)]
    pub resume_when: Option<PathBuf>,
    /// `depth-bench`: the queue depths to measure, in order (at most 64 each; above 16 with
    /// our own driver).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub depths: Vec<usize>,
    /// `depth-bench`: how long each depth is measured, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub depth_secs: f64,
    /// `depth-bench`: the size of each read (a multiple of 512, at most 1 MiB).
    #[arg(long, default_value_t = 4096)]
    pub depth_block: u64,
    /// `depth-bench`: compare every read with the image file (costs time beside each read).
    #[arg(long)]
    pub depth_verify: bool,
    /// ZONE=WORKLOAD: that zone runs this workload instead (e.g. a busy neighbour beside a
    /// benchmark); repeatable.
    #[arg(long, value_parser = parse_zone_guest)]
    pub zone_guest: Vec<(u32, Workload)>,
    #[command(flatten)]
    pub net: guest::net::NetArgs,
    /// linux guests: the User-Mode Linux kernel.
    #[arg(long, default_value = crate::linux::uml::DEFAULT_KERNEL)]
    pub linux_kernel: PathBuf,
    /// linux guests: the kernel's modules (default: `/usr/lib/uml/modules/RELEASE`).
    #[arg(long)]
    pub linux_modules: Option<PathBuf>,
    /// linux guests: a static busybox for the initramfs.
    #[arg(long, default_value = crate::linux::uml::DEFAULT_BUSYBOX)]
    pub busybox: PathBuf,
    /// linux guests: print every vhost-user message the adapter receives.
    #[arg(long)]
    pub linux_trace: bool,
}

/// `--zone-guest 2=blk-verify`
fn parse_zone_guest(s: &str) -> Result<(u32, Workload), String> {
    let (zone, name) = s.split_once('=').ok_or("expected ZONE=WORKLOAD")?;
    let zone = zone.parse().map_err(|e| format!("zone {zone:?}: {e}"))?;
    let w = <Workload as clap::ValueEnum>::from_str(name, false)?;
    if crate::linux::job_of(w).is_some() {
        return Err(format!("{name} runs a whole machine, not one zone"));
    }
    Ok((zone, w))
}

/// Exit status of a setup failure.
const EXIT_SETUP: i32 = 2;
const EXIT_TIMEOUT: i32 = 3;
/// How long a vCPU (or a guest waiting for an interrupt) waits for the broker.
pub(crate) const VCPU_WATCHDOG: Duration = Duration::from_secs(10);

/// Runs the program; returns the exit status.
pub fn main(args: Args) -> i32 {
    quiet_guest_faults();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hvisor-sim: {e:#}");
            EXIT_SETUP
        }
    }
}

fn run(args: Args) -> Result<i32> {
    let loaded = config::load(&args.config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    for w in &loaded.warnings {
        eprintln!("hvisor-sim: warning: {w}");
    }
    let machine = Machine::from_config(&loaded.config);
    if let Some(job) = crate::linux::job_of(args.guest) {
        return crate::linux::run(&args, machine, job);
    }
    anyhow::ensure!(
        machine.zones.len() <= SLOTS,
        "{} zones configured; the simulator drives at most {SLOTS}",
        machine.zones.len()
    );
    if let Some(dir) = &args.shadow_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mem = Arc::new(PhysMem::new(&machine)?);
    let shared = SharedFds::new()?;
    let bridge = BridgeMap::map(shared.bridge.as_fd()).context("mapping the bridge page")?;
    let listener = Listener::bind(&args.socket)?;
    let started = Instant::now();
    println!("hvisor-sim: listening on {}", args.socket.display());

    let watchdog = start_watchdog(Duration::from_secs(args.timeout));
    let (conn, wakeup) =
        listener.accept_broker(&shared, mem.fd(), mem.size(), args.legacy_driver)?;
    // One broker only: later connection attempts are refused rather than left waiting.
    drop(listener);
    println!(
        "hvisor-sim: broker connected ({} wakeup)",
        wakeup.describe()
    );
    let hv = Hypervisor::new(bridge, machine.clone(), wakeup, VCPU_WATCHDOG, args.gic);
    hv.lose_wakeups(args.lose_wakeups);
    let _hv_thread = hv.spawn(conn, shared.finish)?;

    if let Some(go) = &args.wait_for {
        println!("hvisor-sim: guests wait for {}", go.display());
        while !go.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    guest::net::configure(args.net.clone());
    let opts = GuestOptions {
        workload: args.guest,
        seed: args.seed,
        shadow_dir: args.shadow_dir.clone(),
        resume_when: args.resume_when.clone(),
        rounds_dir: args.rounds_dir.clone(),
        repeat_until: args.repeat_until.clone(),
        bench_reads: args.bench_reads,
        irq_timeout: hv.watchdog,
        depths: args.depths.clone(),
        depth_secs: args.depth_secs,
        depth_block: args.depth_block,
        depth_verify: args.depth_verify,
    };
    let bench_zone = machine
        .zones
        .iter()
        .find(|z| {
            z.devices
                .iter()
                .any(|d| matches!(d.kind, DevKind::Blk { .. }))
        })
        .map(|z| z.id);
    let mut threads = Vec::new();
    for (i, zone) in machine.zones.iter().enumerate() {
        let mut opts = opts.clone();
        if let Some((_, w)) = args.zone_guest.iter().find(|(z, _)| *z == zone.id) {
            opts.workload = *w;
        }
        let job = ZoneJob {
            hv: hv.clone(),
            mem: mem.clone(),
            zone: zone.clone(),
            cpu: i as u64 + 1,
            slot: i,
            opts,
            bench: Some(zone.id) == bench_zone,
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("zone{}", zone.id))
                .spawn(move || guest::run_zone(job))?,
        );
    }
    let mut report = Report {
        workload: args.guest.name().into(),
        seed: args.seed,
        wakeup: hv.wakeup_kind().into(),
        ..Default::default()
    };
    for t in threads {
        let (z, b) = t.join().expect("zone threads catch their panics");
        report.zones.push(z);
        if b.is_some() {
            report.bench = b;
        }
    }
    drop(watchdog);
    if args.guest == Workload::Bench && bench_zone.is_none() {
        eprintln!("hvisor-sim: bench: the configuration has no blk device");
    }
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.broker_gone = hv.broker_gone();
    report.hypervisor = hv.stats();
    report.tally();
    if args.guest == Workload::Bench && report.bench.is_none() {
        report.ok = false;
    }
    print_summary(&report);
    write_report(&args, &report)?;
    let code = if report.ok { 0 } else { 1 };
    if args.stay && !hv.broker_gone() {
        println!("hvisor-sim: workload finished; serving until the broker disconnects");
        hv.wait_broker_gone();
    }
    Ok(code)
}

/// Writes the report where `--report` says, if it does.
pub(crate) fn write_report(args: &Args, report: &Report) -> Result<()> {
    if let Some(path) = &args.report {
        // Written aside and renamed, so a reader never sees half a report.
        let json = serde_json::to_vec_pretty(report)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, json).with_context(|| format!("writing {}", path.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A vCPU fault unwinds its guest thread and lands in the report and the summary; the default
/// hook would add a panic message and backtrace to stderr for what is an expected outcome.
fn quiet_guest_faults() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or("");
        if !msg.starts_with(crate::transport::GUEST_FAULT) {
            default(info);
        }
    }));
}

/// Ends the process with status 3 unless dropped within `timeout`.
pub(crate) fn start_watchdog(timeout: Duration) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                eprintln!(
                    "hvisor-sim: guest workload did not finish within {} s",
                    timeout.as_secs()
                );
                crate::linux::uml::abandon();
                std::process::exit(EXIT_TIMEOUT);
            }
        })
        .expect("spawning the watchdog");
    tx
}

pub(crate) fn print_summary(r: &Report) {
    println!("hvisor-sim: summary of {} (seed {})", r.workload, r.seed);
    for z in &r.zones {
        if let Some(e) = &z.error {
            println!("  zone {} (cpu {}): FAILED: {e}", z.zone, z.cpu);
        }
        for d in &z.devices {
            let failed: Vec<_> = d.checks.iter().filter(|c| !c.pass).collect();
            // Only blk counts requests and verified bytes.
            let io = if d.kind == "blk" {
                format!(
                    "; {} writes, {} reads, {} bytes verified",
                    d.writes, d.reads, d.verified_bytes
                )
            } else {
                String::new()
            };
            println!(
                "  zone {} {}@{}: {} ({} checks, {} failed{io}, {} interrupts)",
                d.zone,
                d.kind,
                d.addr_hex,
                if d.ok { "ok" } else { "FAILED" },
                d.checks.len(),
                failed.len(),
                d.interrupts
            );
            for c in failed {
                println!("    FAIL {}: {}", c.name, c.detail);
            }
        }
    }
    let h = &r.hypervisor;
    println!(
        "  hypervisor: {} requests, {} wakeups ({} lost), {} finish signals, {} interrupts ({} merged, \
         {} dropped while active, {} stray; {:?} GIC){}",
        h.requests,
        h.wakeups,
        h.lost_wakeups,
        h.finish_signals,
        h.interrupts,
        h.merged_interrupts,
        h.dropped_interrupts,
        h.stray_interrupts,
        h.gic,
        if r.broker_gone {
            "; the broker went away"
        } else {
            ""
        }
    );
    println!(
        "hvisor-sim: result: {} ({} checks passed, {} failed, {:.1} s)",
        if r.ok { "PASS" } else { "FAIL" },
        r.checks_passed,
        r.checks_failed,
        r.elapsed_s
    );
}
