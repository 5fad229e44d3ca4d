//! Real Linux guests: a User-Mode Linux kernel as the zone, its virtio devices reaching the
//! broker through the bridge.
//!
//! UML's virtio transport is vhost-user (`virtio_uml.device=SOCKET:ID` on its command line),
//! so the simulator listens on one vhost-user socket per device of the zone and runs an
//! [`adapter::DeviceLink`] on each: it plays Linux's virtio-mmio layer, turning UML's messages
//! into trapped register accesses of the zone's vCPU. Linux's own drivers (virtio_blk, ...) do
//! the rest, against the real broker and workers.
//!
//! The zone's RAM is UML's memory file, handed to the broker as the physical-memory fd.
//! UML's physical address X is offset X of that file, so the zone's `memory_region`s must be
//! identity-mapped (`zone0_ipa == zonex_ipa`), and UML is given `mem=` up to the end of the
//! highest region. UML shares `[end of its kernel image, mem)` with the device (the image
//! itself, about 10 MiB, is not in the file), so the lowest region must start at or below
//! that: a region from 0x100000 up is safe.
//!
//! Order of events: UML creates its memory file within milliseconds of starting, long before
//! it probes its devices; the simulator takes it from `/proc/<pid>/fd` and only then answers
//! the broker's INIT. UML's first vhost-user messages (SET_OWNER, GET_FEATURES) wait in the
//! socket until the broker is up: UML's boot simply blocks on the GET_FEATURES reply.
//!
//! # What UML 6.1 does on the socket (observed, Debian's 6.1.176)
//!
//! - At boot, one device after the other, in command-line order: connect, SET_OWNER,
//!   GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (UML keeps REPLY_ACK, CONFIG
//!   and BACKEND_REQ of what is offered), SET_BACKEND_REQ_FD (a socketpair end). About 1.2 s
//!   after UML starts; nothing more until a driver binds.
//! - When the driver binds (here: `insmod virtio_blk.ko` from `/init`): SET_FEATURES, GET_CONFIG
//!   (always offset 0, size = the field's offset + length: one message per field read), then
//!   SET_MEM_TABLE, and per queue SET_VRING_CALL, SET_VRING_NUM (always 256), SET_VRING_BASE 0,
//!   SET_VRING_ADDR; then per queue SET_VRING_KICK and SET_VRING_ENABLE 1. Every message but the
//!   GETs asks for a REPLY_ACK, so each is synchronous.
//! - At power-off: SET_VRING_ENABLE 0 for each queue, then GET_FEATURES (as a barrier).
//! - Memory: one region, `[end of the kernel image (0xaa8000 for this kernel), mem)`, with
//!   user address = guest address = file offset; the fd is UML's `O_TMPFILE` in `$TMPDIR`.
//!   Descriptor and ring addresses are UML physical addresses.
//! - Kicks are eventfd writes; calls go to a socketpair end (read by UML's SIGIO handler).
//! - Without BACKEND_REQ, UML 6.1 cannot set up a queue at all: the IRQ its call fds share is
//!   allocated only when the back-end request channel is set up, so `um_request_irq(0, ...)`
//!   fails ("genirq: Flags mismatch irq 0 ... (hr timer)").
//! - UML sends SET_MEM_TABLE with its two-slot region array and `num = 1` (a 72-byte payload
//!   for one 32-byte region), which the `vhost` crate's back-end handler refuses as malformed;
//!   hence our own [`vhost_user`] framing.

pub mod adapter;
pub mod bench;
pub mod console;
pub mod initramfs;
pub mod net;
pub mod script;
pub mod uml;
pub mod vhost_user;

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use protocol::bridge::BridgeMap;
use serde::Serialize;

use self::adapter::{DeviceLink, GuestRam, LinkSummary, ZoneCpu};
use self::script::{Event, FileSum, GuestJob, Rate, RawSum};
use crate::hv::Hypervisor;
use crate::layout::{DevKind, Machine};
use crate::report::{Check, DeviceReport, Report, ZoneReport};
use crate::run::Args;
use crate::server::{Listener, SharedFds};

/// A disk as the guest's driver found it.
#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    pub dev: String,
    pub sectors: u64,
    pub readonly: bool,
}

/// The `linux` part of the report.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LinuxReport {
    pub kernel: String,
    pub release: String,
    /// Bytes of UML memory (`mem=`), which is the physical-memory fd's size.
    pub mem_bytes: u64,
    /// Host seconds from starting UML to its `/init` running.
    pub boot_s: Option<f64>,
    /// Host seconds from starting UML to its exit.
    pub run_s: f64,
    pub exit: String,
    /// The guest finished its workload (`HVSIM done`).
    pub done: bool,
    pub checks: Vec<Check>,
    pub disks: Vec<Disk>,
    pub files: Vec<FileSum>,
    pub raw: Vec<RawSum>,
    pub rates: Vec<Rate>,
    pub links: Vec<LinkSummary>,
    /// `linux-bench`: the guest's operations done on the host, on the same image.
    pub host_rates: Vec<Rate>,
}

impl LinuxReport {
    fn event(&mut self, ev: Event, boot: Duration) {
        match ev {
            Event::Init { .. } => self.boot_s = Some(boot.as_secs_f64()),
            Event::Check { name, pass, detail } => self.checks.push(Check { name, pass, detail }),
            Event::Disk { dev, sectors, ro } => self.disks.push(Disk {
                dev,
                sectors,
                readonly: ro,
            }),
            Event::File(f) => self.files.push(f),
            Event::Raw(r) => self.raw.push(r),
            Event::Rate(r) => self.rates.push(r),
            Event::Done => self.done = true,
        }
    }
}

/// How long a guest that reported `HVSIM done` may take to power off before it is killed.
const DONE_GRACE: Duration = Duration::from_secs(10);

/// What the workload names mean for the guest.
pub fn job_of(workload: crate::guest::Workload) -> Option<GuestJob> {
    use crate::guest::Workload::*;
    match workload {
        LinuxBoot => Some(GuestJob::Boot),
        LinuxBlk => Some(GuestJob::Blk),
        LinuxNet => Some(GuestJob::Net),
        LinuxConsole => Some(GuestJob::Console),
        LinuxBench => Some(GuestJob::Bench),
        _ => None,
    }
}

/// Where the run's sockets, initramfs and UML's memory file live: tmpfs if there is one
/// that allows executable mappings (UML maps its memory executable).
fn runtime_dir() -> Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    let exec_ok = |p: &Path| {
        use nix::sys::statvfs::{statvfs, FsFlags};
        statvfs(p).is_ok_and(|v| !v.flags().contains(FsFlags::ST_NOEXEC))
    };
    let base = if shm.is_dir() && exec_ok(shm) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    tempfile::Builder::new()
        .prefix("hvisor-sim-linux")
        .tempdir_in(&base)
        .with_context(|| format!("creating a directory in {}", base.display()))
}

fn module_name(kind: &DevKind) -> &'static str {
    match kind {
        DevKind::Blk { .. } => "virtio_blk",
        DevKind::Net { .. } => "virtio_net",
        DevKind::Console { .. } => "virtio_console",
    }
}

fn virtio_id(kind: &DevKind) -> u32 {
    match kind {
        DevKind::Net { .. } => 1,
        DevKind::Blk { .. } => 2,
        DevKind::Console { .. } => 3,
    }
}

/// Builds the initramfs for `job` and the devices' kinds.
fn build_initramfs(
    busybox: &Path,
    modules_dir: &Path,
    kinds: &[&DevKind],
    job: GuestJob,
    disks: &[String],
) -> Result<Vec<u8>> {
    let mut c = initramfs::Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "tmp", "mnt", "lib/modules"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    let bb = std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    c.file("bin/busybox", 0o755, &bb);
    c.symlink("bin/sh", "busybox");
    let mut wanted: Vec<&str> = kinds.iter().map(|k| module_name(k)).collect();
    if job == GuestJob::Net {
        // IPv6 (a module in Debian's UML): the workload checks TSO6 too.
        wanted.push("ipv6");
    }
    wanted.dedup();
    let order = initramfs::module_load_order(modules_dir, &wanted)?;
    let mut list = String::new();
    for m in &order {
        let data = std::fs::read(modules_dir.join(m))
            .with_context(|| format!("reading module {}", modules_dir.join(m).display()))?;
        let name = format!("lib/modules/{}", m.display());
        c.file(&name, 0o644, &data);
        list.push_str(&format!("{}\n", m.display()));
    }
    c.file("modules.order", 0o644, list.as_bytes());
    c.file("init", 0o755, script::init_script(job, disks).as_bytes());
    Ok(c.finish())
}

/// Runs a Linux workload; returns the exit status.
pub fn run(args: &Args, machine: Machine, job: GuestJob) -> Result<i32> {
    let started = Instant::now();
    let [zone] = machine.zones.as_slice() else {
        bail!(
            "a linux guest needs exactly one zone in the configuration ({} given)",
            machine.zones.len()
        );
    };
    for r in &zone.ram {
        if r.zone0_ipa != r.zonex_ipa {
            bail!(
                "zone {}: RAM region at 0x{:x} maps to zone0_ipa 0x{:x}: a linux guest's RAM is \
                 UML's memory file, where physical address X is offset X, so zone0_ipa must equal zonex_ipa",
                zone.id,
                r.zonex_ipa,
                r.zone0_ipa
            );
        }
    }
    let mem = machine.phys_size();
    if mem < 32 << 20 || mem % 1024 != 0 {
        bail!("zone {}: UML needs at least 32 MiB of RAM, a whole number of KiB (the regions end at 0x{mem:x})", zone.id);
    }
    let kernel = &args.linux_kernel;
    if !kernel.exists() {
        bail!(
            "no User-Mode Linux kernel at {} (Debian: apt-get install user-mode-linux busybox-static)",
            kernel.display()
        );
    }
    let release = uml::kernel_release(kernel)?;
    let modules_dir = args
        .linux_modules
        .clone()
        .unwrap_or_else(|| PathBuf::from(uml::MODULES_ROOT).join(&release));
    let dir = runtime_dir()?;

    let kinds: Vec<&DevKind> = zone.devices.iter().map(|d| &d.kind).collect();
    let disks: Vec<String> = zone
        .devices
        .iter()
        .filter(|d| matches!(d.kind, DevKind::Blk { .. }))
        .enumerate()
        .map(|(i, _)| format!("vd{}", (b'a' + i as u8) as char))
        .collect();
    let initrd = dir.path().join("initramfs.cpio");
    std::fs::write(
        &initrd,
        build_initramfs(&args.busybox, &modules_dir, &kinds, job, &disks)?,
    )?;
    let mut vu_listeners = Vec::new();
    let mut cmdline = vec![
        format!("mem={}K", mem / 1024),
        format!("initrd={}", initrd.display()),
        "con=null".into(),
        "con0=null,fd:1".into(),
        "ssl=null".into(),
        "quiet".into(),
    ];
    for (i, d) in zone.devices.iter().enumerate() {
        let path = dir.path().join(format!("vu{i}.sock"));
        vu_listeners.push(
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?,
        );
        cmdline.push(format!(
            "virtio_uml.device={}:{}",
            path.display(),
            virtio_id(&d.kind)
        ));
    }

    let shared = SharedFds::new()?;
    let bridge = BridgeMap::map(shared.bridge.as_fd()).context("mapping the bridge page")?;
    let listener = Listener::bind(&args.socket)?;
    println!("hvisor-sim: listening on {}", args.socket.display());
    let watchdog = crate::run::start_watchdog(Duration::from_secs(args.timeout));

    println!(
        "hvisor-sim: linux: starting {} ({release}) {}",
        kernel.display(),
        cmdline.join(" ")
    );
    uml::become_subreaper();
    let mut uml = uml::Uml::start(kernel, &cmdline, dir.path())?;
    let memfile = uml.memory_file(dir.path(), mem, Duration::from_secs(10))?;
    println!(
        "hvisor-sim: linux: UML (pid {}) memory file found after {:.0} ms; waiting for the broker",
        uml.pid(),
        uml.started.elapsed().as_secs_f64() * 1e3
    );
    let ram = Arc::new(GuestRam::map(memfile)?);
    // Keep the console flowing (and printed) while the broker connects.
    let (con_tx, con_rx) = std::sync::mpsc::channel::<String>();
    let lines = std::mem::replace(&mut uml.lines, con_rx);
    let uml_start = uml.started;
    let printer = std::thread::Builder::new()
        .name("uml-printer".into())
        .spawn(move || {
            for l in lines {
                println!("linux| {l}");
                if con_tx.send(l).is_err() {
                    break;
                }
            }
        })?;

    let (conn, wakeup) =
        listener.accept_broker(&shared, ram.file().as_fd(), mem, args.legacy_driver)?;
    drop(listener);
    println!(
        "hvisor-sim: broker connected ({} wakeup)",
        wakeup.describe()
    );
    let hv = Hypervisor::new(
        bridge,
        machine.clone(),
        wakeup,
        crate::run::VCPU_WATCHDOG,
        args.gic,
    );
    hv.lose_wakeups(args.lose_wakeups);
    let _hv_thread = hv.spawn(conn, shared.finish)?;
    let cpu = Arc::new(ZoneCpu::new(hv.vcpu(1, zone.id)?));

    let mut links = Vec::new();
    let mut threads = Vec::new();
    for (spec, l) in zone.devices.iter().zip(vu_listeners) {
        let link = DeviceLink::new(
            spec.clone(),
            cpu.clone(),
            ram.clone(),
            zone.ram.clone(),
            args.linux_trace,
        );
        let (a, b) = (link.clone(), link.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("vu-0x{:x}", spec.addr))
                .spawn(move || adapter::accept_and_serve(a, l))?,
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("irq-{}", spec.irq))
                .spawn(move || b.interrupts())?,
        );
        links.push(link);
    }

    let mut lrep = LinuxReport {
        kernel: kernel.display().to_string(),
        release,
        mem_bytes: mem,
        ..Default::default()
    };
    let mut gone_at: Option<Instant> = None;
    let mut done_at: Option<Instant> = None;
    let status = loop {
        if let Ok(line) = uml.lines.recv_timeout(Duration::from_millis(50)) {
            if let Some(ev) = script::parse(&line) {
                lrep.event(ev, uml_start.elapsed());
            }
            continue;
        }
        if let Some(st) = uml.try_wait() {
            break st.to_string();
        }
        if lrep.done {
            // A guest whose disk lost its worker may never finish halting (its request is
            // still in flight): its workload is over, so it gets a bounded time to exit.
            let t = *done_at.get_or_insert_with(Instant::now);
            if t.elapsed() > DONE_GRACE {
                uml.kill();
                break format!("killed: no exit {DONE_GRACE:?} after the workload finished");
            }
        }
        if hv.broker_gone() {
            // Give the guest a moment to notice its failed devices and finish.
            let t = *gone_at.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(5) {
                uml.kill();
                break "killed: the broker went away".to_string();
            }
        }
    };
    lrep.run_s = uml_start.elapsed().as_secs_f64();
    // The console's last lines.
    while let Ok(line) = uml.lines.recv_timeout(Duration::from_millis(200)) {
        if let Some(ev) = script::parse(&line) {
            lrep.event(ev, uml_start.elapsed());
        }
    }
    let _ = printer.join();
    lrep.exit = status;
    uml.kill();
    for l in &links {
        l.stop();
    }
    for t in threads {
        let _ = t.join();
    }
    drop(watchdog);
    if job == GuestJob::Bench {
        let img = zone.devices.iter().find_map(|d| match &d.kind {
            DevKind::Blk { img, .. } => Some(img),
            _ => None,
        });
        match img.map(|img| bench::host_rates(img)) {
            Some(Ok(r)) => lrep.host_rates = r,
            Some(Err(e)) => lrep.checks.push(Check {
                name: "host-bench".into(),
                pass: false,
                detail: format!("{e:#}"),
            }),
            None => {}
        }
    }

    let mut zrep = ZoneReport {
        zone: zone.id,
        cpu: 1,
        ..Default::default()
    };
    for l in &links {
        let s = l.summary();
        let kind = match l.spec.kind {
            DevKind::Blk { .. } => "blk",
            DevKind::Net { .. } => "net",
            DevKind::Console { .. } => "console",
        };
        let mut d = DeviceReport::new(zone.id, l.spec.addr, l.spec.irq, kind);
        d.features.device = s.device_features;
        d.features.own = s.driver_features;
        d.interrupts = s.interrupts;
        d.check(
            "adapter_connected",
            s.connected,
            "UML connected to the vhost-user socket",
        );
        d.check(
            "adapter_probe",
            s.probed,
            "magic, version, device ID, reset, ACKNOWLEDGE",
        );
        d.check(
            "adapter_features_ok",
            s.features_ok,
            format!("driver features 0x{:x}", s.driver_features),
        );
        d.check(
            "adapter_driver_ok",
            s.driver_ok_reached,
            format!("{} queues enabled", s.queues_enabled),
        );
        d.check("adapter_errors", s.errors.is_empty(), s.errors.join("; "));
        d.finish();
        zrep.devices.push(d);
        lrep.links.push(s);
    }
    zrep.ok = zrep.devices.iter().all(|d| d.ok);
    let done = lrep.done;
    lrep.checks.push(Check {
        name: "linux_done".into(),
        pass: done,
        detail: format!("the guest's workload finished; UML exit: {}", lrep.exit),
    });

    let mut report = Report {
        workload: args.guest.name().into(),
        seed: args.seed,
        wakeup: hv.wakeup_kind().into(),
        zones: vec![zrep],
        linux: Some(lrep),
        ..Default::default()
    };
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.broker_gone = hv.broker_gone();
    report.hypervisor = hv.stats();
    report.tally();
    crate::run::print_summary(&report);
    crate::run::write_report(args, &report)?;
    let code = if report.ok { 0 } else { 1 };
    if args.stay && !hv.broker_gone() {
        println!("hvisor-sim: workload finished; serving until the broker disconnects");
        hv.wait_broker_gone();
    }
    Ok(code)
}
