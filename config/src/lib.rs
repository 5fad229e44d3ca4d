//! The hvisor-tool virtio JSON (the file `hvisor virtio start` takes), read into typed zones and
//! devices and checked before anything is opened for real.
//!
//! Every problem is collected, each naming the JSON path it was found at, so one run of
//! `hvisor-broker check` reports all of them. Keys hvisor-tool does not know are warnings, not
//! errors, so a file written for hvisor-tool keeps working.

use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub use protocol::{Bucket, Flow, Limit};

mod keys;
mod number;
pub mod paths;
mod validate;

/// Zone ids index per-zone tables in hvisor-tool (`MAX_ZONES` = `MAX_CPUS`).
pub const MAX_ZONES: u32 = 32;
/// `CONFIG_MAX_MEMORY_REGIONS` of hvisor-tool.
pub const MAX_REGIONS: usize = 64;
/// The bridge page's `mmio_addrs[MAX_DEVS]`: enabled devices in total, across zones.
pub const MAX_DEVS: usize = 8;
pub const PAGE_SIZE: u64 = 4096;
/// No RAM region or MMIO range may end above 2^52, the widest physical address of Armv8 (LPA)
/// and x86-64: no board comes near, and larger sizes are typing mistakes or attacks.
pub const PHYS_ADDR_BITS: u32 = 52;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub zones: Vec<Zone>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    pub id: u32,
    pub memory: Vec<MemRegion>,
    /// Enabled devices only, in file order.
    pub devices: Vec<Device>,
}

/// Guest RAM: `size` bytes at `zonex_ipa` in the zone, at `zone0_ipa` as the root zone sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    pub zone0_ipa: u64,
    pub zonex_ipa: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub zone: u32,
    /// Base of the virtio-mmio window in the zone's address space.
    pub addr: u64,
    pub len: u64,
    pub irq: u32,
    /// Where the device is in the file, e.g. `zones[0].devices[2]`, for messages.
    pub json_path: String,
    pub kind: DeviceConfig,
    /// Our extension (`rate_limit`; net: `rx_rate_limit`, `tx_rate_limit`): the flows with a
    /// limit, each once.
    pub rate_limits: Vec<(Flow, Limit)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceConfig {
    /// `img` is kept as written; a relative path is relative to the current directory.
    Blk { img: PathBuf, readonly: bool },
    /// `mtu` is our extension (default 1500): the largest IP packet, offered as VIRTIO_NET_F_MTU.
    Net { tap: String, mac: [u8; 6], mtu: u16 },
    /// Our extensions: `pty_link`, a stable symlink to the pty; `cols`/`rows`, the size the
    /// guest sees (80x25 by default).
    Console {
        pty_link: Option<PathBuf>,
        cols: u16,
        rows: u16,
    },
}

/// The default MTU of a net device.
pub const DEFAULT_MTU: u16 = 1500;
/// The default console size.
pub const DEFAULT_CONSOLE_SIZE: (u16, u16) = (80, 25);

impl DeviceConfig {
    pub fn type_name(&self) -> &'static str {
        match self {
            DeviceConfig::Blk { .. } => "blk",
            DeviceConfig::Net { .. } => "net",
            DeviceConfig::Console { .. } => "console",
        }
    }
}

/// A configuration and the warnings (ignored keys and the like) found while reading it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// One problem: `path` is a JSON path such as `zones[0].devices[2].img`, or the file name when
/// the file itself cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

/// Every problem found, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    fn one(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            path: path.into(),
            reason: reason.into(),
        }])
    }
}

/// Reads and validates the file at `path`. Errors about the file as a whole name the file.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    read_and_parse(path, None)
}

/// Reads and validates the file at `path` as zones to be added beside `running`: besides
/// everything [`load`] checks, no zone id, RAM region, `pty_link` or bridge device slot may
/// be one a running zone has.
pub fn load_addition(path: &Path, running: &Config) -> Result<Loaded, ConfigErrors> {
    read_and_parse(path, Some(running))
}

fn read_and_parse(path: &Path, running: Option<&Config>) -> Result<Loaded, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors::one(&name, format!("cannot read: {e}")))?;
    parse_named(&text, &name, running)
}

/// Validates JSON text. Syntax errors are reported against `<input>`.
pub fn parse(text: &str) -> Result<Loaded, ConfigErrors> {
    parse_named(text, "<input>", None)
}

fn parse_named(text: &str, name: &str, running: Option<&Config>) -> Result<Loaded, ConfigErrors> {
    // serde_json's message ends with "at line L column C".
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ConfigErrors::one(name, format!("not valid JSON: {e}")))?;
    let mut errors = keys::duplicates(text);
    match validate::validate(&value, running) {
        Ok(loaded) if errors.is_empty() => Ok(loaded),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(more) => {
            errors.extend(more.0);
            Err(ConfigErrors(errors))
        }
    }
}

impl Config {
    /// A human summary, as printed by `hvisor-broker check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for zone in &self.zones {
            out.push_str(&format!(
                "zone {}: {} RAM region(s), {} device(s)\n",
                zone.id,
                zone.memory.len(),
                zone.devices.len()
            ));
            for r in &zone.memory {
                out.push_str(&format!(
                    "  ram     {} ({}) at zone0 {:#x}\n",
                    range(r.zonex_ipa, r.size),
                    mib(r.size),
                    r.zone0_ipa
                ));
            }
            for d in &zone.devices {
                out.push_str(&format!(
                    "  {:<7} {:#x}+{:#x} irq {}",
                    d.kind.type_name(),
                    d.addr,
                    d.len,
                    d.irq
                ));
                match &d.kind {
                    DeviceConfig::Blk { img, readonly } => {
                        let mode = if *readonly { "read-only" } else { "read-write" };
                        let size = match image_size(img) {
                            Ok(n) => format!("{n} bytes, {}", mib(n)),
                            Err(e) => format!("size unknown: {e}"),
                        };
                        out.push_str(&format!(" img {} {mode} ({size})", img.display()));
                    }
                    DeviceConfig::Net { tap, mac, mtu } => {
                        out.push_str(&format!(" tap {tap} mac {} mtu {mtu}", format_mac(mac)));
                    }
                    DeviceConfig::Console {
                        pty_link,
                        cols,
                        rows,
                    } => {
                        out.push_str(&format!(" pty {cols}x{rows}"));
                        if let Some(link) = pty_link {
                            out.push_str(&format!(" linked at {}", link.display()));
                        }
                    }
                }
                for (flow, limit) in &d.rate_limits {
                    out.push_str(&format!(" {}", describe_limit(*flow, limit)));
                }
                out.push('\n');
            }
        }
        out
    }
}

/// `rate limit io: 20971520 bytes/s (burst 1048576), 1000 ops/s (burst 100)`
pub fn describe_limit(flow: Flow, limit: &Limit) -> String {
    format!("rate limit {}: {limit}", flow.name())
}

/// The JSON key of `flow`'s limit in a device entry.
pub fn rate_limit_key(flow: Flow) -> &'static str {
    match flow {
        Flow::Io => "rate_limit",
        Flow::Rx => "rx_rate_limit",
        Flow::Tx => "tx_rate_limit",
    }
}

/// `02:00:00:00:01:01`
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Seeking to the end also sizes block devices, whose metadata length is 0.
fn image_size(img: &Path) -> std::io::Result<u64> {
    File::open(img)?.seek(SeekFrom::End(0))
}

fn range(start: u64, size: u64) -> String {
    let last = start.saturating_add(size.saturating_sub(1));
    format!("{start:#x}-{last:#x}")
}

fn mib(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    if bytes % MIB == 0 {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.2} MiB", bytes as f64 / MIB as f64)
    }
}

#[cfg(test)]
mod tests;
