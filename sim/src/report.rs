//! The run report (`--report FILE`), described in the crate documentation.

use serde::Serialize;

use crate::hv::HvStats;

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// Feature bits: offered by the device, accepted by the stock driver, accepted by our own.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Features {
    pub device: u64,
    pub stock: u64,
    pub own: u64,
}

/// `struct virtio_blk_config` fields, as read through config space by the own driver.
#[derive(Debug, Default, Clone, Serialize)]
pub struct BlkConfigValues {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct DeviceReport {
    pub zone: u32,
    pub addr: u64,
    pub addr_hex: String,
    pub irq: u32,
    pub kind: String,
    pub capacity_sectors: u64,
    pub device_id: String,
    pub readonly: bool,
    pub features: Features,
    pub config: Option<BlkConfigValues>,
    pub writes: u64,
    pub reads: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub verified_bytes: u64,
    pub interrupts: u64,
    pub missed_interrupts: u64,
    pub shadow_file: Option<String>,
    /// `depth-bench`: one figure per queue depth.
    pub depths: Vec<DepthFigure>,
    /// `depth-bench`: synchronous register reads (MagicValue), before the depths.
    pub sync_read: Option<Latency>,
    pub checks: Vec<Check>,
    pub ok: bool,
    pub error: Option<String>,
}

impl DeviceReport {
    pub fn new(zone: u32, addr: u64, irq: u32, kind: &str) -> Self {
        DeviceReport {
            zone,
            addr,
            addr_hex: format!("0x{addr:x}"),
            irq,
            kind: kind.into(),
            ..Default::default()
        }
    }

    /// Records a check and returns whether it passed.
    pub fn check(&mut self, name: &str, pass: bool, detail: impl Into<String>) -> bool {
        self.checks.push(Check {
            name: name.into(),
            pass,
            detail: detail.into(),
        });
        pass
    }

    pub fn finish(&mut self) {
        self.ok = self.error.is_none() && self.checks.iter().all(|c| c.pass);
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ZoneReport {
    pub zone: u32,
    pub cpu: u64,
    pub devices: Vec<DeviceReport>,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// One throughput figure beside the same operation done directly on the image file.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Throughput {
    pub block_bytes: u64,
    pub ops: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub baseline_ops: u64,
    pub baseline_seconds: f64,
    pub baseline_iops: f64,
    pub baseline_mb_per_s: f64,
    /// virtio / baseline (of IOPS, equivalently of MB/s).
    pub ratio: f64,
    /// Requests kept in flight.
    pub depth: usize,
    /// Interrupts the guest took, and injections made (taken, merged or dropped), per request.
    pub interrupts_per_op: f64,
    pub injections_per_op: f64,
}

/// Random reads of `block_bytes` with `depth` requests kept in flight.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DepthFigure {
    pub depth: usize,
    pub block_bytes: u64,
    pub ops: u64,
    pub seconds: f64,
    pub iops: f64,
    pub interrupts_per_op: f64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct BenchReport {
    pub zone: u32,
    pub addr: u64,
    pub image: String,
    pub capacity_sectors: u64,
    pub sync_read: Latency,
    pub randread_4k_qd1: Throughput,
    pub randread_4k_qd16: Throughput,
    pub seqread_128k: Throughput,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub workload: String,
    pub seed: u64,
    pub wakeup: String,
    pub ok: bool,
    pub elapsed_s: f64,
    pub broker_gone: bool,
    pub hypervisor: HvStats,
    pub checks_passed: u64,
    pub checks_failed: u64,
    pub zones: Vec<ZoneReport>,
    pub bench: Option<BenchReport>,
    /// Linux workloads only.
    pub linux: Option<crate::linux::LinuxReport>,
}

impl Report {
    pub fn tally(&mut self) {
        let checks = self
            .zones
            .iter()
            .flat_map(|z| z.devices.iter())
            .flat_map(|d| d.checks.iter())
            .chain(self.linux.iter().flat_map(|l| l.checks.iter()));
        let (mut pass, mut fail) = (0, 0);
        for c in checks {
            if c.pass {
                pass += 1;
            } else {
                fail += 1;
            }
        }
        self.checks_passed = pass;
        self.checks_failed = fail;
        self.ok = fail == 0 && self.zones.iter().all(|z| z.ok);
    }
}
