//! `hvisor-broker status`: per device, what the broker counted itself (interrupts, worker
//! restarts and exits, the worker's CPU time and memory from /proc) and what the worker
//! counted in its in-flight record's counter words. Those a compromised worker may set to
//! anything, so they are read only when asked, checked for what cannot be, and labelled
//! worker-reported; they cannot say anything about another device.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::os::fd::BorrowedFd;

use protocol::inflight::{self, counter, COUNTER_WORDS, MAX_QUEUE_SIZE};
use protocol::Limit;
use serde::{Deserialize, Serialize};

/// The answer to a status request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub broker_pid: u32,
    pub devices: Vec<DeviceStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// What the broker itself keeps of the device.
    #[serde(flatten)]
    pub broker: BrokerCounted,
    /// What /proc says of the live worker, if any.
    pub worker_cpu_seconds: Option<f64>,
    pub worker_memory_bytes: Option<u64>,
    /// Counted by the device's workers: believable only as far as they are.
    pub worker_reported: WorkerReported,
}

/// What the broker knows of a device without asking anyone.
#[derive(Debug, Serialize, Deserialize)]
pub struct BrokerCounted {
    pub zone: u32,
    /// `blk@0xa003c00`: what `restart-worker` takes.
    pub device: String,
    pub kind: String,
    /// Interrupts pushed to the hypervisor, retries included.
    pub interrupts_injected: u64,
    /// Of those, injected again by the retry timer.
    pub interrupts_reinjected: u64,
    pub worker_restarts: u32,
    pub worker_exits: u64,
    pub worker_pid: Option<i32>,
    /// The rate limits in force, by flow (`io`, `rx`, `tx`); a flow without one is absent.
    #[serde(default)]
    pub rate_limits: BTreeMap<String, Limit>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReported {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    /// `None` if the worker wrote more than a queue can hold.
    pub queue_depth_high_water: Option<u64>,
    /// Times a rate limit made a queue wait, and the requests (frames) and bytes held back
    /// at the start of those waits (received frames: their bytes are not known yet).
    #[serde(default)]
    pub rate_limited: u64,
    #[serde(default)]
    pub rate_limit_delayed_requests: u64,
    #[serde(default)]
    pub rate_limit_delayed_bytes: u64,
}

/// The status of one device: what the broker counted, completed from /proc and from the
/// counter words of its in-flight `record` (of `num_queues` queues).
pub fn device(broker: BrokerCounted, record: BorrowedFd<'_>, num_queues: usize) -> DeviceStatus {
    let usage = broker.worker_pid.and_then(proc_usage);
    DeviceStatus {
        broker,
        worker_cpu_seconds: usage.map(|u| u.0),
        worker_memory_bytes: usage.map(|u| u.1),
        worker_reported: worker_counters(record, num_queues),
    }
}

/// The counter words of a record (sealed at its size: the read cannot come up short, but a
/// short one reads as zeros).
fn worker_counters(record: BorrowedFd<'_>, num_queues: usize) -> WorkerReported {
    let mut buf = [0u8; COUNTER_WORDS * 8];
    let offset = (inflight::counters_offset(num_queues) * 8) as libc::off_t;
    if nix::sys::uio::pread(record, &mut buf, offset).is_err() {
        return WorkerReported::default();
    }
    let word = |i: usize| u64::from_ne_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    let high = word(counter::QUEUE_HIGH_WATER);
    WorkerReported {
        requests: word(counter::REQUESTS),
        bytes_read: word(counter::BYTES_READ),
        bytes_written: word(counter::BYTES_WRITTEN),
        errors: word(counter::ERRORS),
        queue_depth_high_water: (high <= MAX_QUEUE_SIZE as u64).then_some(high),
        rate_limited: word(counter::THROTTLED),
        rate_limit_delayed_requests: word(counter::DELAYED_OPS),
        rate_limit_delayed_bytes: word(counter::DELAYED_BYTES),
    }
}

/// CPU seconds (user and system) and resident bytes of process `pid`.
fn proc_usage(pid: i32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold anything): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)? as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Some((ticks as f64 / hz, rss_kb * 1024))
}

/// One metric: its name (after the prefix), type, help, and value per device.
type Metric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&DeviceStatus) -> Option<f64>,
);

const METRICS: &[Metric] = &[
    (
        "worker_reported_requests_total",
        "counter",
        "Requests the device's workers completed (worker-reported).",
        |d| Some(d.worker_reported.requests as f64),
    ),
    (
        "worker_reported_read_bytes_total",
        "counter",
        "Bytes read for the guest from the image, tap or pty (worker-reported).",
        |d| Some(d.worker_reported.bytes_read as f64),
    ),
    (
        "worker_reported_written_bytes_total",
        "counter",
        "Bytes written from the guest to the image, tap or pty (worker-reported).",
        |d| Some(d.worker_reported.bytes_written as f64),
    ),
    (
        "worker_reported_errors_total",
        "counter",
        "Requests answered with an error (worker-reported).",
        |d| Some(d.worker_reported.errors as f64),
    ),
    (
        "worker_reported_queue_depth_high_water",
        "gauge",
        "Most requests in flight on one queue at once (worker-reported).",
        |d| d.worker_reported.queue_depth_high_water.map(|v| v as f64),
    ),
    (
        "worker_reported_rate_limited_total",
        "counter",
        "Times a rate limit made a queue wait (worker-reported).",
        |d| Some(d.worker_reported.rate_limited as f64),
    ),
    (
        "worker_reported_rate_limit_delayed_requests_total",
        "counter",
        "Requests or frames a rate limit held back (worker-reported).",
        |d| Some(d.worker_reported.rate_limit_delayed_requests as f64),
    ),
    (
        "worker_reported_rate_limit_delayed_bytes_total",
        "counter",
        "Bytes of the requests or sent frames a rate limit held back (worker-reported).",
        |d| Some(d.worker_reported.rate_limit_delayed_bytes as f64),
    ),
    (
        "interrupts_injected_total",
        "counter",
        "Interrupts the broker injected, retries included.",
        |d| Some(d.broker.interrupts_injected as f64),
    ),
    (
        "interrupts_reinjected_total",
        "counter",
        "Interrupts injected again because the guest had not acknowledged them.",
        |d| Some(d.broker.interrupts_reinjected as f64),
    ),
    (
        "worker_restarts_total",
        "counter",
        "Workers started after the device's first.",
        |d| Some(d.broker.worker_restarts.into()),
    ),
    (
        "worker_exits_total",
        "counter",
        "Workers of the device that ended.",
        |d| Some(d.broker.worker_exits as f64),
    ),
    (
        "worker_cpu_seconds_total",
        "counter",
        "CPU time (user and system) of the device's live worker.",
        |d| d.worker_cpu_seconds,
    ),
    (
        "worker_memory_bytes",
        "gauge",
        "Resident memory of the device's live worker.",
        |d| d.worker_memory_bytes.map(|v| v as f64),
    ),
];

/// The Prometheus text format (for node_exporter's textfile collector).
pub fn prometheus(r: &Report) -> String {
    let mut out = String::new();
    for (name, kind, help, value) in METRICS {
        let _ = writeln!(out, "# HELP hvisor_broker_{name} {help}");
        let _ = writeln!(out, "# TYPE hvisor_broker_{name} {kind}");
        for d in &r.devices {
            if let Some(v) = value(d) {
                let _ = writeln!(
                    out,
                    "hvisor_broker_{name}{{zone=\"{}\",device=\"{}\",kind=\"{}\"}} {v}",
                    d.broker.zone,
                    escape(&d.broker.device),
                    escape(&d.broker.kind)
                );
            }
        }
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// For people: one block per device.
pub fn render(r: &Report) -> String {
    let mut out = format!("hvisor-broker (pid {})\n", r.broker_pid);
    for d in &r.devices {
        let w = &d.worker_reported;
        let _ = writeln!(out, "zone {} {}:", d.broker.zone, d.broker.device);
        let _ = writeln!(
            out,
            "  worker-reported: {} requests, {} bytes read, {} written, {} errors, queue depth high-water {}",
            w.requests,
            w.bytes_read,
            w.bytes_written,
            w.errors,
            w.queue_depth_high_water
                .map_or("(not believable)".into(), |v| v.to_string())
        );
        if w.rate_limited > 0 {
            let _ = writeln!(
                out,
                "  worker-reported: rate-limited {} times, {} requests ({} bytes) held back",
                w.rate_limited, w.rate_limit_delayed_requests, w.rate_limit_delayed_bytes
            );
        }
        for (flow, limit) in &d.broker.rate_limits {
            if let Some(flow) = protocol::Flow::from_name(flow) {
                let _ = writeln!(out, "  {}", config::describe_limit(flow, limit));
            }
        }
        let _ = writeln!(
            out,
            "  interrupts: {} injected ({} by retry); workers: {} restarts, {} exits",
            d.broker.interrupts_injected,
            d.broker.interrupts_reinjected,
            d.broker.worker_restarts,
            d.broker.worker_exits
        );
        match (
            d.broker.worker_pid,
            d.worker_cpu_seconds,
            d.worker_memory_bytes,
        ) {
            (Some(pid), Some(cpu), Some(mem)) => {
                let _ = writeln!(
                    out,
                    "  worker pid {pid}: {cpu:.2} s CPU, {mem} bytes resident"
                );
            }
            (Some(pid), ..) => {
                let _ = writeln!(out, "  worker pid {pid}");
            }
            _ => {
                let _ = writeln!(out, "  no worker");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_that_cannot_be_are_not_believed() {
        let fd = crate::lifecycle::inflight_record(2).unwrap();
        let words = [7u64, 4096, 512, 1, 99_999, 3, 4, 5];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let offset = (inflight::counters_offset(2) * 8) as libc::off_t;
        nix::sys::uio::pwrite(&fd, &bytes, offset).unwrap();
        let w = worker_counters(std::os::fd::AsFd::as_fd(&fd), 2);
        assert_eq!(
            (w.requests, w.bytes_read, w.bytes_written, w.errors),
            (7, 4096, 512, 1)
        );
        assert_eq!(w.queue_depth_high_water, None);
        assert_eq!(
            (
                w.rate_limited,
                w.rate_limit_delayed_requests,
                w.rate_limit_delayed_bytes
            ),
            (3, 4, 5)
        );
    }

    #[test]
    fn own_usage_is_read() {
        let (_, mem) = proc_usage(std::process::id() as i32).unwrap();
        assert!(mem > 0);
    }
}
