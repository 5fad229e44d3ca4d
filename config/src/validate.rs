//! Turns the parsed JSON into a [`Config`], collecting every error and warning on the way.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::number::{kind_of, parse_value, C_INT_MAX};
use crate::{
    rate_limit_key, Bucket, Config, ConfigError, ConfigErrors, Device, DeviceConfig, Flow, Limit,
    Loaded, MemRegion, Zone, MAX_DEVS, MAX_REGIONS, MAX_ZONES, PAGE_SIZE, PHYS_ADDR_BITS,
};

const TOP_KEYS: &[&str] = &["zones"];
const ZONE_KEYS: &[&str] = &["id", "memory_region", "devices"];
const REGION_KEYS: &[&str] = &["zone0_ipa", "zonex_ipa", "size"];
const COMMON_DEVICE_KEYS: &[&str] = &["type", "status", "addr", "len", "irq"];
/// Smallest window that holds the virtio-mmio register block (config space starts at 0x100).
const MIN_DEVICE_LEN: u64 = 0x100;
/// IFNAMSIZ - 1.
const MAX_TAP_NAME: usize = 15;
/// Where the physical address space ends.
const PHYS_END: u64 = 1 << PHYS_ADDR_BITS;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blk,
    Net,
    Console,
    Gpu,
    Scmi,
}

impl Kind {
    fn from_name(s: &str) -> Option<Kind> {
        Some(match s {
            "blk" => Kind::Blk,
            "net" => Kind::Net,
            "console" => Kind::Console,
            "gpu" => Kind::Gpu,
            "scmi" => Kind::Scmi,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Blk => "blk",
            Kind::Net => "net",
            Kind::Console => "console",
            Kind::Gpu => "gpu",
            Kind::Scmi => "scmi",
        }
    }

    /// Keys that matter for this type besides the common ones.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::Blk => &["img", "readonly", "rate_limit"],
            Kind::Net => &["tap", "mac", "mtu", "rx_rate_limit", "tx_rate_limit"],
            Kind::Console => &["pty_link", "cols", "rows"],
            Kind::Gpu => &["width", "height"],
            Kind::Scmi => &["clock_ids", "reset_ids", "power_ids"],
        }
    }
}

/// Keys hvisor-tool knows on some device type (`readonly`, `mtu`, `pty_link`, `cols`, `rows`
/// and the rate limits are ours).
const ANY_DEVICE_KEYS: &[&str] = &[
    "img",
    "readonly",
    "rate_limit",
    "tap",
    "mac",
    "mtu",
    "rx_rate_limit",
    "tx_rate_limit",
    "pty_link",
    "cols",
    "rows",
    "width",
    "height",
    "clock_ids",
    "reset_ids",
    "power_ids",
];

/// Validates `root`; with `running`, as zones to be added beside those (ids, RAM, pty links
/// and the bridge page's device slots are shared with them).
pub fn validate(root: &Value, running: Option<&Config>) -> Result<Loaded, ConfigErrors> {
    let mut c = Checker::default();
    if let Some(running) = running {
        c.seed(running);
    }
    let zones = c.config(root);
    if c.errors.is_empty() {
        Ok(Loaded {
            config: Config { zones },
            warnings: c.warnings,
        })
    } else {
        Err(ConfigErrors(c.errors))
    }
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A half-open range `[start, end)` tagged with the index of the item it came from.
#[derive(Clone, Copy)]
struct Span {
    index: usize,
    start: u64,
    end: u64,
}

impl Span {
    fn new(index: usize, start: u64, len: u64) -> Option<Span> {
        Some(Span {
            index,
            start,
            end: start.checked_add(len)?,
        })
    }

    fn overlaps(&self, other: &Span) -> bool {
        self.start < other.end && other.start < self.end
    }

    fn show(&self) -> String {
        format!("{:#x}-{:#x}", self.start, self.end.saturating_sub(1))
    }
}

/// Pairs `(later, earlier)` (by index) of overlapping spans, at least one pair for every span
/// that overlaps an earlier-starting one. A sort and sweep, since the input length is
/// attacker-sized until it has been checked.
fn overlapping(spans: &[Span]) -> Vec<(Span, Span)> {
    let mut sorted = spans.to_vec();
    sorted.sort_by_key(|s| (s.start, s.index));
    let mut pairs = Vec::new();
    let mut reach: Option<Span> = None;
    for s in sorted {
        match reach {
            Some(r) if s.start < r.end => {
                pairs.push(if s.index > r.index { (s, r) } else { (r, s) });
                if s.end > r.end {
                    reach = Some(s);
                }
            }
            // Spans are never empty, so `s` now reaches furthest.
            _ => reach = Some(s),
        }
    }
    pairs.sort_by_key(|(later, earlier)| (later.index, earlier.index));
    pairs
}

#[derive(Default)]
struct Checker {
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
    /// Zone id -> where the zone that has it is (`zones[1]`, or a running zone).
    zone_ids: HashMap<u32, String>,
    /// Devices with `"status": "enable"` and a known type, across all zones.
    enabled: usize,
    /// Every valid region of every zone, with the zone's index and the region's path: RAM of
    /// two zones must not overlap in the root zone's view.
    all_ram: Vec<(usize, String, MemRegion)>,
    /// Each `pty_link` (as resolved) -> the JSON path of the first console with it.
    pty_links: HashMap<PathBuf, String>,
}

impl Checker {
    /// Takes in what running zones already hold. Their indices follow any the file can have,
    /// and their regions come first, so an overlap is reported at the new zone's path.
    fn seed(&mut self, running: &Config) {
        for (k, zone) in running.zones.iter().enumerate() {
            let name = format!("running zone {}", zone.id);
            self.zone_ids.insert(zone.id, name.clone());
            self.enabled += zone.devices.len();
            let index = usize::MAX - k;
            for (i, r) in zone.memory.iter().enumerate() {
                let path = format!("{name} memory_region[{i}]");
                self.all_ram.push((index, path, *r));
            }
            for d in &zone.devices {
                if let DeviceConfig::Console {
                    pty_link: Some(link),
                    ..
                } = &d.kind
                {
                    if let Ok(place) = crate::paths::link_place(link) {
                        let path = format!("{name} {}", d.json_path);
                        self.pty_links.insert(place.path(), path);
                    }
                }
            }
        }
    }

    fn err(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.into(),
            reason: reason.into(),
        });
    }

    fn unknown_keys(&mut self, obj: &Map<String, Value>, path: &str, known: &[&str]) {
        for key in obj.keys() {
            if !known.contains(&key.as_str()) {
                self.warnings
                    .push(format!("{}: unknown key, ignored", join(path, key)));
            }
        }
    }

    fn object<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a Map<String, Value>> {
        let obj = v.as_object();
        if obj.is_none() {
            self.err(path, format!("must be an object, not {}", kind_of(v)));
        }
        obj
    }

    /// A required array member.
    fn array<'a>(
        &mut self,
        obj: &'a Map<String, Value>,
        path: &str,
        key: &str,
    ) -> Option<&'a Vec<Value>> {
        let p = join(path, key);
        match obj.get(key) {
            None => {
                self.err(p, "is required");
                None
            }
            Some(Value::Array(a)) => Some(a),
            Some(v) => {
                self.err(p, format!("must be an array, not {}", kind_of(v)));
                None
            }
        }
    }

    /// A required string member.
    fn string<'a>(
        &mut self,
        obj: &'a Map<String, Value>,
        path: &str,
        key: &str,
    ) -> Option<&'a str> {
        let p = join(path, key);
        match obj.get(key) {
            None => {
                self.err(p, "is required");
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(v) => {
                self.err(p, format!("must be a string, not {}", kind_of(v)));
                None
            }
        }
    }

    /// A required number member of at most `bits` bits.
    fn number(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        key: &str,
        bits: u32,
    ) -> Option<u64> {
        let p = join(path, key);
        match obj.get(key) {
            None => {
                self.err(p, "is required");
                None
            }
            Some(v) => self.number_value(v, &p, bits),
        }
    }

    fn number_value(&mut self, v: &Value, path: &str, bits: u32) -> Option<u64> {
        match parse_value(v, bits) {
            Ok(n) => {
                if n.wide_json_number {
                    self.warnings.push(format!(
                        "{path}: hvisor-tool reads JSON numbers as a C int (at most {C_INT_MAX}), \
                         write it as a string such as \"{:#x}\"",
                        n.value
                    ));
                }
                Some(n.value)
            }
            Err(reason) => {
                self.err(path, reason);
                None
            }
        }
    }

    /// A required non-zero number.
    fn nonzero(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        key: &str,
        bits: u32,
    ) -> Option<u64> {
        match self.number(obj, path, key, bits)? {
            0 => {
                self.err(join(path, key), "must not be 0");
                None
            }
            n => Some(n),
        }
    }

    fn config(&mut self, root: &Value) -> Vec<Zone> {
        let Some(obj) = self.object(root, "(top level)") else {
            return Vec::new();
        };
        self.unknown_keys(obj, "", TOP_KEYS);
        let Some(list) = self.array(obj, "", "zones") else {
            return Vec::new();
        };
        if list.is_empty() {
            self.err("zones", "must list at least one zone");
            return Vec::new();
        }
        if list.len() > MAX_ZONES as usize {
            self.err(
                "zones",
                format!("{} zones; at most {MAX_ZONES} are supported", list.len()),
            );
        }
        let zones = list
            .iter()
            .enumerate()
            .filter_map(|(i, z)| self.zone(z, &format!("zones[{i}]"), i))
            .collect();
        if self.enabled == 0 {
            self.err("zones", "nothing to serve: no enabled device");
        }
        self.zones_apart();
        zones
    }

    /// RAM of one zone must not be another's: each zone's workers map its regions at zone0_ipa.
    fn zones_apart(&mut self) {
        let spans: Vec<Span> = self
            .all_ram
            .iter()
            .enumerate()
            .filter_map(|(i, (_, _, r))| Span::new(i, r.zone0_ipa, r.size))
            .collect();
        for (later, earlier) in overlapping(&spans) {
            let (zl, pl, _) = &self.all_ram[later.index];
            let (ze, pe, _) = &self.all_ram[earlier.index];
            // Overlaps within a zone are already reported.
            if zl != ze {
                let reason = format!(
                    "overlaps {pe} in zone0_ipa space ({} and {}): RAM of another zone",
                    later.show(),
                    earlier.show()
                );
                self.err(pl.clone(), reason);
            }
        }
    }

    fn zone(&mut self, v: &Value, path: &str, index: usize) -> Option<Zone> {
        let obj = self.object(v, path)?;
        self.unknown_keys(obj, path, ZONE_KEYS);
        let id = self.number(obj, path, "id", 32).and_then(|id| {
            let p = join(path, "id");
            if id >= u64::from(MAX_ZONES) {
                self.err(p, format!("zone id {id} is not below {MAX_ZONES}"));
                return None;
            }
            let id = u32::try_from(id).ok()?;
            if let Some(first) = self.zone_ids.get(&id) {
                let reason = format!("duplicate zone id {id} (also {first})");
                self.err(p, reason);
                return None;
            }
            self.zone_ids.insert(id, path.to_string());
            Some(id)
        });
        let memory = self.regions(obj, path);
        self.all_ram.extend(
            memory
                .iter()
                .map(|(i, r)| (index, format!("{path}.memory_region[{i}]"), *r)),
        );
        let enabled_before = self.enabled;
        let devices = self.devices(obj, path, id.unwrap_or(0), &memory);
        if memory.is_empty() && self.enabled > enabled_before {
            if let Some(Value::Array(a)) = obj.get("memory_region") {
                if a.is_empty() {
                    self.err(
                        join(path, "memory_region"),
                        "is empty, but the zone has enabled devices (their queues live in zone RAM)",
                    );
                }
            }
        }
        Some(Zone {
            id: id.unwrap_or(0),
            memory: memory.into_iter().map(|(_, r)| r).collect(),
            devices,
        })
    }

    /// The zone's valid regions, each with its index in the file.
    fn regions(&mut self, obj: &Map<String, Value>, zpath: &str) -> Vec<(usize, MemRegion)> {
        let path = join(zpath, "memory_region");
        let Some(list) = self.array(obj, zpath, "memory_region") else {
            return Vec::new();
        };
        if list.len() > MAX_REGIONS {
            self.err(
                &path,
                format!(
                    "{} regions; at most {MAX_REGIONS} are supported",
                    list.len()
                ),
            );
        }
        let mut good = Vec::new();
        for (i, v) in list.iter().enumerate() {
            if let Some(r) = self.region(v, &format!("{path}[{i}]")) {
                good.push((i, r));
            }
        }
        for (space, pick) in [
            (
                "zonex_ipa",
                (|r: &MemRegion| r.zonex_ipa) as fn(&MemRegion) -> u64,
            ),
            ("zone0_ipa", |r: &MemRegion| r.zone0_ipa),
        ] {
            let spans: Vec<Span> = good
                .iter()
                .filter_map(|(i, r)| Span::new(*i, pick(r), r.size))
                .collect();
            for (later, earlier) in overlapping(&spans) {
                self.err(
                    format!("{path}[{}]", later.index),
                    format!(
                        "overlaps {path}[{}] in {space} space ({} and {})",
                        earlier.index,
                        later.show(),
                        earlier.show()
                    ),
                );
            }
        }
        good
    }

    fn region(&mut self, v: &Value, path: &str) -> Option<MemRegion> {
        let obj = self.object(v, path)?;
        self.unknown_keys(obj, path, REGION_KEYS);
        let zone0 = self.number(obj, path, "zone0_ipa", 64);
        let zonex = self.number(obj, path, "zonex_ipa", 64);
        let size = self.nonzero(obj, path, "size", 64);
        let mut ok = true;
        match zone0 {
            Some(0) => {
                self.err(
                    join(path, "zone0_ipa"),
                    "must not be 0: zone memory is mapped from /dev/hvisor at offset zone0_ipa, \
                     and offset 0 is the bridge page",
                );
                ok = false;
            }
            Some(a) => ok &= self.aligned(a, path, "zone0_ipa"),
            None => {}
        }
        if let Some(a) = zonex {
            ok &= self.aligned(a, path, "zonex_ipa");
        }
        // Workers map whole pages: a partial one would expose what follows the region.
        if let Some(s) = size.filter(|s| s % PAGE_SIZE != 0) {
            self.err(
                join(path, "size"),
                format!("{s:#x} is not a whole number of pages ({PAGE_SIZE:#x} bytes)"),
            );
            ok = false;
        }
        let (zone0, zonex, size) = (zone0?, zonex?, size?);
        for (key, start) in [("zone0_ipa", zone0), ("zonex_ipa", zonex)] {
            if let Some(reason) = range_problem(start, size) {
                self.err(path, format!("{key} {start:#x} + size {size:#x} {reason}"));
                ok = false;
            }
        }
        ok.then_some(MemRegion {
            zone0_ipa: zone0,
            zonex_ipa: zonex,
            size,
        })
    }

    fn aligned(&mut self, addr: u64, path: &str, key: &str) -> bool {
        let ok = addr % PAGE_SIZE == 0;
        if !ok {
            self.err(
                join(path, key),
                format!("{addr:#x} is not page aligned ({PAGE_SIZE:#x})"),
            );
        }
        ok
    }

    fn devices(
        &mut self,
        obj: &Map<String, Value>,
        zpath: &str,
        zone: u32,
        ram: &[(usize, MemRegion)],
    ) -> Vec<Device> {
        let path = join(zpath, "devices");
        let Some(list) = self.array(obj, zpath, "devices") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut spans = Vec::new();
        for (i, v) in list.iter().enumerate() {
            let dpath = format!("{path}[{i}]");
            let (span, dev) = self.device(v, &dpath, i, zone, (zpath, ram));
            spans.extend(span);
            out.extend(dev);
        }
        for (later, earlier) in overlapping(&spans) {
            self.err(
                format!("{path}[{}]", later.index),
                format!(
                    "MMIO range {} overlaps {path}[{}] ({})",
                    later.show(),
                    earlier.index,
                    earlier.show()
                ),
            );
        }
        out
    }

    /// Checks one device. Returns its MMIO range when that much is valid (for overlap checks,
    /// even if other fields are wrong) and the device when it is enabled and entirely valid.
    fn device(
        &mut self,
        v: &Value,
        path: &str,
        index: usize,
        zone: u32,
        (zpath, ram): (&str, &[(usize, MemRegion)]),
    ) -> (Option<Span>, Option<Device>) {
        let Some(obj) = self.object(v, path) else {
            return (None, None);
        };
        let kind = self.string(obj, path, "type").and_then(|t| {
            let kind = Kind::from_name(t);
            if kind.is_none() {
                self.err(
                    join(path, "type"),
                    format!("unknown device type {t:?} (expected \"blk\", \"net\" or \"console\")"),
                );
            }
            kind
        });
        if let Some(kind) = kind {
            for key in obj.keys() {
                let k = key.as_str();
                if !COMMON_DEVICE_KEYS.contains(&k) && !kind.keys().contains(&k) {
                    let what = if ANY_DEVICE_KEYS.contains(&k) {
                        format!("unknown key for a {} device, ignored", kind.name())
                    } else {
                        "unknown key, ignored".to_string()
                    };
                    self.warnings.push(format!("{}: {what}", join(path, key)));
                }
            }
        } else {
            self.unknown_keys(obj, path, &[COMMON_DEVICE_KEYS, ANY_DEVICE_KEYS].concat());
        }
        match self.string(obj, path, "status") {
            Some("disable") => return (None, None),
            Some("enable") => {
                // A device of unknown type is already an error and takes no slot.
                self.enabled += usize::from(kind.is_some());
                if kind.is_some() && self.enabled == MAX_DEVS + 1 {
                    self.err(
                        path,
                        format!(
                            "more than {MAX_DEVS} enabled devices in total \
                             (the hvisor bridge page has {MAX_DEVS} device slots)"
                        ),
                    );
                }
            }
            Some(other) => self.err(
                join(path, "status"),
                format!("must be \"enable\" or \"disable\", not {other:?}"),
            ),
            // Missing or not a string (already reported): check the rest as if enabled.
            None => {}
        }
        if let Some(k @ (Kind::Gpu | Kind::Scmi)) = kind {
            self.err(
                join(path, "type"),
                format!("{:?} is not supported by hvisor-broker", k.name()),
            );
        }

        let addr = self.nonzero(obj, path, "addr", 64);
        let len = self.nonzero(obj, path, "len", 64).and_then(|len| {
            if len < MIN_DEVICE_LEN {
                self.err(
                    join(path, "len"),
                    format!(
                        "{len:#x} is smaller than the {MIN_DEVICE_LEN:#x}-byte virtio-mmio register block"
                    ),
                );
                return None;
            }
            Some(len)
        });
        let irq = self.nonzero(obj, path, "irq", 32);
        let span = match (addr, len) {
            (Some(a), Some(l)) => {
                if let Some(reason) = range_problem(a, l) {
                    self.err(path, format!("addr {a:#x} + len {l:#x} {reason}"));
                }
                Span::new(index, a, l)
            }
            _ => None,
        };
        if let Some(s) = span {
            for (i, r) in ram {
                if let Some(r) = Span::new(*i, r.zonex_ipa, r.size) {
                    if s.overlaps(&r) {
                        self.err(
                            path,
                            format!(
                                "MMIO range {} overlaps RAM {zpath}.memory_region[{i}] ({})",
                                s.show(),
                                r.show()
                            ),
                        );
                    }
                }
            }
        }

        let config = match kind {
            Some(Kind::Blk) => self.blk(obj, path),
            Some(Kind::Net) => self.net(obj, path),
            Some(Kind::Console) => self.console(obj, path),
            _ => None,
        };
        let flows = match kind {
            Some(Kind::Blk) => &[Flow::Io][..],
            Some(Kind::Net) => &[Flow::Rx, Flow::Tx][..],
            _ => &[],
        };
        let rate_limits = self.rate_limits(obj, path, flows);
        let device = match (span, irq, config, rate_limits) {
            (Some(s), Some(irq), Some(kind), Some(rate_limits)) => {
                u32::try_from(irq).ok().map(|irq| Device {
                    zone,
                    addr: s.start,
                    len: s.end - s.start,
                    irq,
                    json_path: path.to_string(),
                    kind,
                    rate_limits,
                })
            }
            _ => None,
        };
        (span, device)
    }

    fn blk(&mut self, obj: &Map<String, Value>, path: &str) -> Option<DeviceConfig> {
        let img = self.string(obj, path, "img");
        let readonly = match obj.get("readonly") {
            None => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                self.err(
                    join(path, "readonly"),
                    format!("must be true or false, not {}", kind_of(v)),
                );
                None
            }
        };
        let img = match img {
            Some("") => {
                self.err(join(path, "img"), "must not be empty");
                return None;
            }
            Some(s) => PathBuf::from(s),
            None => return None,
        };
        let readonly = readonly?;
        if let Err(reason) = crate::paths::open_image(&img, readonly) {
            self.err(join(path, "img"), reason);
            return None;
        }
        Some(DeviceConfig::Blk { img, readonly })
    }

    fn net(&mut self, obj: &Map<String, Value>, path: &str) -> Option<DeviceConfig> {
        let tap = self
            .string(obj, path, "tap")
            .and_then(|t| match tap_problem(t) {
                Some(reason) => {
                    self.err(join(path, "tap"), format!("{t:?} {reason}"));
                    None
                }
                None => Some(t.to_string()),
            });
        let mac = self.mac(obj, path);
        let mtu = self.small_number(obj, path, "mtu", crate::DEFAULT_MTU, 68..=65535);
        Some(DeviceConfig::Net {
            tap: tap?,
            mac: mac?,
            mtu: mtu?,
        })
    }

    fn console(&mut self, obj: &Map<String, Value>, path: &str) -> Option<DeviceConfig> {
        let (dcols, drows) = crate::DEFAULT_CONSOLE_SIZE;
        let cols = self.small_number(obj, path, "cols", dcols, 1..=u16::MAX);
        let rows = self.small_number(obj, path, "rows", drows, 1..=u16::MAX);
        let pty_link = match obj.get("pty_link") {
            None => Some(None),
            Some(Value::String(s)) if s.starts_with('/') && s.len() > 1 => self
                .pty_link(PathBuf::from(s), &join(path, "pty_link"))
                .map(Some),
            Some(v) => {
                let what = match v {
                    Value::String(s) => format!("{s:?}"),
                    other => kind_of(other).to_string(),
                };
                self.err(
                    join(path, "pty_link"),
                    format!("must be an absolute path, not {what}"),
                );
                None
            }
        };
        Some(DeviceConfig::Console {
            pty_link: pty_link?,
            cols: cols?,
            rows: rows?,
        })
    }

    /// A link that is safe to make and no other console's.
    fn pty_link(&mut self, link: PathBuf, path: &str) -> Option<PathBuf> {
        let place = match crate::paths::link_place(&link) {
            Ok(place) => place,
            Err(reason) => {
                self.err(path, reason);
                return None;
            }
        };
        if let Some(first) = self.pty_links.get(&place.path()) {
            let reason = format!("{link:?} is the same link as {first}");
            self.err(path, reason);
            return None;
        }
        self.pty_links.insert(place.path(), path.to_string());
        Some(link)
    }

    /// The rate limits of a device with these `flows`, each under its own key.
    fn rate_limits(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        flows: &[Flow],
    ) -> Option<Vec<(Flow, Limit)>> {
        let mut out = Vec::new();
        let mut ok = true;
        for &flow in flows {
            let key = rate_limit_key(flow);
            if let Some(v) = obj.get(key) {
                match self.limit(v, &join(path, key)) {
                    Some(limit) => out.push((flow, limit)),
                    None => ok = false,
                }
            }
        }
        ok.then_some(out)
    }

    /// `{"bytes_per_sec": N, "burst_bytes": N, "ops_per_sec": N, "burst_ops": N}`: at least
    /// one rate; a burst only beside its rate.
    fn limit(&mut self, v: &Value, path: &str) -> Option<Limit> {
        const KEYS: &[&str] = &["bytes_per_sec", "burst_bytes", "ops_per_sec", "burst_ops"];
        let obj = self.object(v, path)?;
        let mut ok = true;
        for key in obj.keys().filter(|k| !KEYS.contains(&k.as_str())) {
            self.err(
                join(path, key),
                format!(
                    "unknown rate limit key (expected one of {})",
                    KEYS.join(", ")
                ),
            );
            ok = false;
        }
        let bytes = self.bucket(obj, path, "bytes_per_sec", "burst_bytes");
        let ops = self.bucket(obj, path, "ops_per_sec", "burst_ops");
        let limit = Limit {
            bytes: bytes?,
            ops: ops?,
        };
        if ok && limit.is_off() {
            self.err(
                path,
                "sets no limit: give bytes_per_sec, ops_per_sec or both",
            );
            return None;
        }
        ok.then_some(limit)
    }

    /// One bucket of a rate limit, if its rate is given.
    fn bucket(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        rate_key: &str,
        burst_key: &str,
    ) -> Option<Option<Bucket>> {
        // Not for hvisor-tool, which ignores these keys: no C int warnings.
        let mut get = |key: &str| match obj.get(key).map(|v| parse_value(v, 64)) {
            None => Ok(None),
            Some(Ok(n)) => Ok(Some(n.value)),
            Some(Err(reason)) => {
                self.err(join(path, key), reason);
                Err(())
            }
        };
        let (rate, burst) = (get(rate_key), get(burst_key));
        let (Ok(rate), Ok(burst)) = (rate, burst) else {
            return None;
        };
        let Some(rate) = rate else {
            if burst.is_some() {
                self.err(join(path, burst_key), format!("needs {rate_key} beside it"));
                return None;
            }
            return Some(None);
        };
        match Bucket::new(rate, burst) {
            Ok(b) => Some(Some(b)),
            Err(reason) => {
                let key = if Bucket::new(rate, None).is_err() {
                    rate_key
                } else {
                    burst_key
                };
                self.err(join(path, key), reason);
                None
            }
        }
    }

    /// An optional 16-bit number within `range`, `default` when absent.
    fn small_number(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        key: &str,
        default: u16,
        range: std::ops::RangeInclusive<u16>,
    ) -> Option<u16> {
        if !obj.contains_key(key) {
            return Some(default);
        }
        let n = self.number(obj, path, key, 16)?;
        match u16::try_from(n) {
            Ok(v) if range.contains(&v) => Some(v),
            _ => {
                self.err(
                    join(path, key),
                    format!("{n} is outside {}..={}", range.start(), range.end()),
                );
                None
            }
        }
    }

    fn mac(&mut self, obj: &Map<String, Value>, path: &str) -> Option<[u8; 6]> {
        let p = join(path, "mac");
        let items = self.array(obj, path, "mac")?;
        if items.len() != 6 {
            self.err(
                &p,
                format!("has {} items; a MAC address has 6 bytes", items.len()),
            );
            return None;
        }
        let mut mac = [0u8; 6];
        let mut ok = true;
        for (i, (v, byte)) in items.iter().zip(mac.iter_mut()).enumerate() {
            match self.number_value(v, &format!("{p}[{i}]"), 8) {
                Some(b) => *byte = u8::try_from(b).unwrap_or(0),
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        if mac == [0; 6] {
            self.err(p, "00:00:00:00:00:00 is all zero, not an address");
            return None;
        }
        if mac[0] & 1 != 0 {
            self.err(
                p,
                format!(
                    "{} is a multicast address (low bit of the first byte set)",
                    crate::format_mac(&mac)
                ),
            );
            return None;
        }
        Some(mac)
    }
}

/// Why `name` cannot be a Linux interface name, if it cannot.
fn tap_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("must not be empty".to_string())
    } else if name.len() > MAX_TAP_NAME {
        Some(format!(
            "is {} bytes long; interface names have at most {MAX_TAP_NAME}",
            name.len()
        ))
    } else if name == "." || name == ".." {
        Some("is not a valid interface name".to_string())
    } else if name
        .chars()
        .any(|c| matches!(c, '/' | ':' | '%' | '\0') || c.is_whitespace())
    {
        // The kernel refuses these, or (for '%') makes up a name of its own.
        Some("must not contain '/', ':', '%', white space or NUL".to_string())
    } else {
        None
    }
}

/// Why `[start, start + len)` cannot be a physical range, if it cannot.
fn range_problem(start: u64, len: u64) -> Option<String> {
    match start.checked_add(len) {
        None => Some("overflows 64 bits".to_string()),
        Some(end) if end > PHYS_END => Some(format!(
            "ends beyond the {PHYS_ADDR_BITS}-bit physical address space"
        )),
        Some(_) => None,
    }
}
