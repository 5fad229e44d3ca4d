//! Guest zones: one thread per zone, with its own vCPU, driving that zone's blk devices with
//! virtio-drivers through [`SimTransport`] and [`ZoneHal`].

pub mod bench;
pub mod console;
pub mod deep;
pub mod demo;
pub mod hostile;
pub mod irq_window;
pub mod net;
pub mod rawblk;
pub mod rounds;
pub mod stock;
pub mod storm;
pub mod verify;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use virtio_drivers::Hal;

use crate::hal::{self, ZoneHal, SLOTS};
use crate::hv::{Hypervisor, Vcpu};
use crate::layout::{DevKind, DevSpec, ZoneSpec};
use crate::mem::PhysMem;
use crate::report::{BenchReport, DeviceReport, ZoneReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Every device of the zone, visibly: blk write/read/verify, net ARP and ping, console hello.
    Demo,
    BlkDemo,
    BlkVerify,
    Hostile,
    /// blk completions that land while the guest handles the interrupt (dropped injections).
    IrqWindow,
    /// Thousands of reset / initialise / DRIVER_OK cycles with config writes, then blk-verify.
    ResetStorm,
    /// The same, every other cycle with a read and the queue stopped before the reset.
    ResetStormIo,
    /// A zone started, stopped and started again, one round per go file (see `rounds`).
    Rounds,
    /// The device after its worker died at DRIVER_OK (see `storm`).
    DeadDevice,
    /// A queue taken out of use, a pause for the test, a reset, then blk-verify (see `storm`).
    QueueStop,
    Bench,
    /// 4 KiB random reads at each of `--depths` queue depths (a slow disk's parallelism).
    DepthBench,
    NetVerify,
    NetBench,
    ConsoleVerify,
    ConsoleBench,
    /// A User-Mode Linux guest boots and loads its virtio drivers (see `crate::linux`).
    LinuxBoot,
    /// A User-Mode Linux guest: ext2 on the first disk, a raw dd round trip on the second.
    LinuxBlk,
    /// A User-Mode Linux guest on its virtio-net device (see `crate::linux::net`).
    LinuxNet,
    /// A User-Mode Linux guest with a shell on its virtio console (see `crate::linux::console`).
    LinuxConsole,
    /// Disk benchmarks from inside a User-Mode Linux guest (see `crate::linux::bench`).
    LinuxBench,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Demo => "demo",
            Workload::BlkDemo => "blk-demo",
            Workload::BlkVerify => "blk-verify",
            Workload::Hostile => "hostile",
            Workload::IrqWindow => "irq-window",
            Workload::ResetStorm => "reset-storm",
            Workload::ResetStormIo => "reset-storm-io",
            Workload::Rounds => "rounds",
            Workload::DeadDevice => "dead-device",
            Workload::QueueStop => "queue-stop",
            Workload::Bench => "bench",
            Workload::DepthBench => "depth-bench",
            Workload::NetVerify => "net-verify",
            Workload::NetBench => "net-bench",
            Workload::ConsoleVerify => "console-verify",
            Workload::ConsoleBench => "console-bench",
            Workload::LinuxBoot => "linux-boot",
            Workload::LinuxBlk => "linux-blk",
            Workload::LinuxNet => "linux-net",
            Workload::LinuxConsole => "linux-console",
            Workload::LinuxBench => "linux-bench",
        }
    }

    /// The device kind the workload drives.
    pub fn serves(self, kind: &DevKind) -> bool {
        match self {
            Workload::Demo => true,
            Workload::BlkDemo
            | Workload::BlkVerify
            | Workload::Hostile
            | Workload::IrqWindow
            | Workload::ResetStorm
            | Workload::ResetStormIo
            | Workload::Rounds
            | Workload::DeadDevice
            | Workload::QueueStop
            | Workload::Bench
            | Workload::DepthBench => {
                matches!(kind, DevKind::Blk { .. })
            }
            Workload::NetVerify | Workload::NetBench => matches!(kind, DevKind::Net { .. }),
            Workload::ConsoleVerify | Workload::ConsoleBench => {
                matches!(kind, DevKind::Console { .. })
            }
            // Run by `crate::linux`, never by the zone threads.
            Workload::LinuxBoot
            | Workload::LinuxBlk
            | Workload::LinuxNet
            | Workload::LinuxConsole
            | Workload::LinuxBench => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GuestOptions {
    pub workload: Workload,
    pub seed: u64,
    pub shadow_dir: Option<PathBuf>,
    /// `queue-stop`: the file whose existence ends its pause.
    pub resume_when: Option<PathBuf>,
    /// `bench`: how many synchronous register reads it times.
    pub bench_reads: usize,
    /// `blk-verify`: run again and again until this file exists.
    pub repeat_until: Option<PathBuf>,
    /// `rounds`: where its go, done and end files are.
    pub rounds_dir: Option<PathBuf>,
    /// How long a guest waits for a device interrupt.
    pub irq_timeout: Duration,
    /// `depth-bench`: queue depths, and seconds per depth.
    pub depths: Vec<usize>,
    pub depth_secs: f64,
    /// `depth-bench`: bytes per read.
    pub depth_block: u64,
    /// `depth-bench`: compare every read with the image file.
    pub depth_verify: bool,
}

/// splitmix64: small, seedable, good enough for test patterns.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough value in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Interrupt side of a guest driver, as a CPU's interrupt controller shows it: `wait` takes
/// the device's interrupt (it becomes active) and `eoi` ends the handler. Between the two,
/// hvisor drops injections (hvisor-abi 2.7), so handlers call `eoi` where Linux's would: after
/// acknowledging the device and processing its used rings. A handler that does not is ended by
/// the next wait.
pub struct IrqWaiter {
    hv: Arc<Hypervisor>,
    zone: u32,
    irq: u32,
    start: u64,
    active: bool,
    timeout: Duration,
}

impl IrqWaiter {
    pub fn new(vcpu: &Vcpu, irq: u32, timeout: Duration) -> Self {
        let hv = vcpu.hypervisor().clone();
        let start = hv.irq_count(vcpu.zone(), irq);
        IrqWaiter {
            hv,
            zone: vcpu.zone(),
            irq,
            start,
            active: false,
            timeout,
        }
    }

    /// Takes the next interrupt; false on timeout or when the broker is gone.
    pub fn wait(&mut self) -> bool {
        self.wait_for(self.timeout)
    }

    pub fn wait_for(&mut self, timeout: Duration) -> bool {
        self.eoi();
        self.active = self.hv.take_irq(self.zone, self.irq, timeout);
        self.active
    }

    /// Ends the handler of the interrupt taken last, if it is still running.
    pub fn eoi(&mut self) {
        if std::mem::take(&mut self.active) {
            self.hv.eoi(self.zone, self.irq);
        }
    }

    /// Interrupts delivered since this waiter was made.
    pub fn delivered(&self) -> u64 {
        self.hv.irq_count(self.zone, self.irq) - self.start
    }

    /// Injections that named this interrupt so far, delivered or dropped.
    pub fn injections(&self) -> u64 {
        self.hv.injections(self.zone, self.irq)
    }

    /// Waits until more than `seen` injections named this interrupt.
    pub fn wait_injections(&self, seen: u64, timeout: Duration) -> bool {
        self.hv.wait_injections(self.zone, self.irq, seen, timeout)
    }

    pub fn broker_gone(&self) -> bool {
        self.hv.broker_gone()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Drop for IrqWaiter {
    fn drop(&mut self) {
        self.eoi();
    }
}

/// Everything a workload needs for one device.
pub struct GuestDev<'a> {
    pub vcpu: &'a Vcpu,
    /// The zone's RAM as this process sees it.
    pub mem: &'a PhysMem,
    pub spec: &'a DevSpec,
    pub opts: &'a GuestOptions,
    pub irq: IrqWaiter,
}

impl GuestDev<'_> {
    pub fn zone(&self) -> u32 {
        self.vcpu.zone()
    }

    pub fn image(&self) -> Option<&std::path::Path> {
        match &self.spec.kind {
            DevKind::Blk { img, .. } => Some(img),
            _ => None,
        }
    }
}

/// Runs `f` once, or again and again until the file `until` exists.
fn repeat(until: Option<&std::path::Path>, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    loop {
        f()?;
        if until.is_none_or(|u| u.exists()) {
            return Ok(());
        }
    }
}

/// What a zone thread needs.
pub struct ZoneJob {
    pub hv: Arc<Hypervisor>,
    pub mem: Arc<PhysMem>,
    pub zone: ZoneSpec,
    pub cpu: u64,
    pub slot: usize,
    pub opts: GuestOptions,
    /// Whether this zone runs the benchmark (only the first zone with a blk device does).
    pub bench: bool,
}

/// Runs the workload in one zone; never panics (a failed vCPU ends up in the report).
pub fn run_zone(job: ZoneJob) -> (ZoneReport, Option<BenchReport>) {
    let mut rep = ZoneReport {
        zone: job.zone.id,
        cpu: job.cpu,
        ..Default::default()
    };
    let mut bench = None;
    let res = (|| -> Result<()> {
        anyhow::ensure!(job.slot < SLOTS, "at most {SLOTS} zones can be simulated");
        let vcpu = job.hv.vcpu(job.cpu, job.zone.id)?;
        let ram = job
            .mem
            .largest_region(job.zone.id)
            .with_context(|| format!("zone {} has no RAM", job.zone.id))?;
        // SAFETY: the mapping lives in `job.mem`, which this thread keeps alive until the
        // drivers are gone, and only this zone's drivers allocate from it.
        unsafe { hal::install(job.slot, ram.zonex_ipa, ram.host_base(), ram.size) };
        match job.slot {
            0 => run_devices::<ZoneHal<0>>(&job, &vcpu, &mut rep, &mut bench),
            1 => run_devices::<ZoneHal<1>>(&job, &vcpu, &mut rep, &mut bench),
            2 => run_devices::<ZoneHal<2>>(&job, &vcpu, &mut rep, &mut bench),
            _ => run_devices::<ZoneHal<3>>(&job, &vcpu, &mut rep, &mut bench),
        }
        Ok(())
    })();
    if let Err(e) = res {
        rep.error = Some(format!("{e:#}"));
    }
    rep.ok = rep.error.is_none() && rep.devices.iter().all(|d| d.ok);
    (rep, bench)
}

fn run_devices<H: Hal>(
    job: &ZoneJob,
    vcpu: &Vcpu,
    rep: &mut ZoneReport,
    bench: &mut Option<BenchReport>,
) {
    let devices = job
        .zone
        .devices
        .iter()
        .filter(|d| job.opts.workload.serves(&d.kind));
    for (i, spec) in devices.enumerate() {
        if job.opts.workload == Workload::Bench && (!job.bench || i > 0) {
            // The benchmark measures one device; the others stay idle.
            continue;
        }
        let kind = match spec.kind {
            DevKind::Blk { .. } => "blk",
            DevKind::Net { .. } => "net",
            DevKind::Console { .. } => "console",
        };
        let mut dev_rep = DeviceReport::new(job.zone.id, spec.addr, spec.irq, kind);
        let mut g = GuestDev {
            vcpu,
            mem: &job.mem,
            spec,
            opts: &job.opts,
            irq: IrqWaiter::new(vcpu, spec.irq, job.opts.irq_timeout),
        };
        let out = catch_unwind(AssertUnwindSafe(|| match job.opts.workload {
            Workload::Demo => match spec.kind {
                DevKind::Blk { .. } => demo::run::<H>(&mut g, &mut dev_rep),
                DevKind::Net { .. } => net::demo::<H>(&mut g, &mut dev_rep),
                DevKind::Console { .. } => console::demo::<H>(&mut g, &mut dev_rep),
            },
            Workload::BlkDemo => demo::run::<H>(&mut g, &mut dev_rep),
            Workload::BlkVerify => repeat(job.opts.repeat_until.as_deref(), || {
                verify::run::<H>(&mut g, &mut dev_rep, true)
            }),
            Workload::Hostile => hostile::run::<H>(&mut g, &mut dev_rep),
            Workload::IrqWindow => irq_window::run::<H>(&mut g, &mut dev_rep),
            Workload::ResetStorm => storm::reset_storm::<H>(&mut g, &mut dev_rep, false),
            Workload::ResetStormIo => storm::reset_storm::<H>(&mut g, &mut dev_rep, true),
            Workload::DeadDevice => storm::dead_device::<H>(&mut g, &mut dev_rep),
            Workload::Rounds => rounds::run::<H>(&mut g, &mut dev_rep),
            Workload::QueueStop => storm::queue_stop::<H>(&mut g, &mut dev_rep),
            Workload::Bench => bench::run::<H>(&mut g, &mut dev_rep).map(|b| {
                *bench = Some(b);
            }),
            Workload::DepthBench => bench::depths::<H>(&mut g, &mut dev_rep),
            Workload::NetVerify => net::verify::<H>(&mut g, &mut dev_rep),
            Workload::NetBench => net::bench::<H>(&mut g, &mut dev_rep),
            Workload::ConsoleVerify => console::verify::<H>(&mut g, &mut dev_rep),
            Workload::ConsoleBench => console::bench::<H>(&mut g, &mut dev_rep),
            Workload::LinuxBoot
            | Workload::LinuxBlk
            | Workload::LinuxNet
            | Workload::LinuxConsole
            | Workload::LinuxBench => Err(anyhow::anyhow!(
                "linux workloads do not run on zone threads"
            )),
        }));
        let err = match out {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(p) => Some(
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "guest thread panicked".into()),
            ),
        };
        dev_rep.interrupts = g.irq.delivered();
        if let Some(e) = err {
            println!(
                "hvisor-sim: zone {} {kind}@0x{:x}: FAILED: {e}",
                job.zone.id, spec.addr
            );
            dev_rep.check("workload", false, e.clone());
            dev_rep.error = Some(e);
        }
        dev_rep.finish();
        rep.devices.push(dev_rep);
    }
}
