//! Each worker in a cgroup of its own, with the memory, pids and CPU limits of its device kind,
//! so a worker gone bad can exhaust only its own share of the host.
//!
//! Worker cgroups are `hvisor-broker/broker<PID>-zone<Z>-<kind>-<addr>` in each hierarchy
//! under the cgroup root: cgroup v2 where it has the controller, else the controller's cgroup
//! v1 hierarchy (hybrid layouts). A controller found nowhere, or a root that is no cgroup file
//! system, leaves the worker without that limit, which the broker logs as a weaker sandbox.
//! A worker's cgroup is removed when its [`Cgroup`] is dropped, after the worker was reaped.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{statfs, FsType, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
use nix::unistd::Pid;
use protocol::DeviceKind;
use serde::{Deserialize, Serialize};

pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";
/// The directory of our worker cgroups in each hierarchy.
const GROUP: &str = "hvisor-broker";
/// The CPU bandwidth period, in microseconds.
const CPU_PERIOD: u64 = 100_000;

/// The limits of one device kind's workers; `None` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory (the worker's own, and guest pages it is first to touch).
    pub memory: Option<u64>,
    /// Tasks (processes and threads).
    pub pids: Option<u64>,
    /// Percent of one CPU.
    pub cpu: Option<u64>,
}

impl Default for Limits {
    /// A worker is one thread (blk: see [`BLK_PIDS`]) that needs a few MiB: these bound a
    /// worker gone bad, not a working one.
    fn default() -> Self {
        Limits {
            memory: Some(256 << 20),
            pids: Some(8),
            cpu: Some(100),
        }
    }
}

/// Where worker cgroups go and their limits per device kind (`--cgroup-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub root: PathBuf,
    pub blk: Limits,
    pub net: Limits,
    pub console: Limits,
}

/// A blk worker's tasks: its event loop and 16 I/O threads, with room to spare.
const BLK_PIDS: u64 = 24;

impl Default for Options {
    fn default() -> Self {
        Options {
            root: DEFAULT_ROOT.into(),
            blk: Limits {
                pids: Some(BLK_PIDS),
                ..Limits::default()
            },
            net: Limits::default(),
            console: Limits::default(),
        }
    }
}

/// One `--cgroup-memory|pids|cpu KIND=VALUE` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// `None`: every kind (`all=`).
    pub kind: Option<DeviceKind>,
    pub value: Option<u64>,
}

impl Options {
    pub fn limits(&self, kind: DeviceKind) -> Limits {
        match kind {
            DeviceKind::Blk => self.blk,
            DeviceKind::Net => self.net,
            DeviceKind::Console => self.console,
        }
    }

    /// Applies `set` to the limits `setting` names.
    pub fn apply(&mut self, setting: Setting, set: impl Fn(&mut Limits, Option<u64>)) {
        for (kind, limits) in [
            (DeviceKind::Blk, &mut self.blk),
            (DeviceKind::Net, &mut self.net),
            (DeviceKind::Console, &mut self.console),
        ] {
            if setting.kind.is_none_or(|k| k == kind) {
                set(limits, setting.value);
            }
        }
    }
}

/// `KIND=VALUE`, KIND one of blk, net, console or all, VALUE `max` or what `number` reads.
fn parse_setting(s: &str, number: fn(&str) -> Option<u64>) -> Result<Setting, String> {
    let (kind, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected KIND=VALUE, e.g. blk=64M"))?;
    let kind = match kind {
        "blk" => Some(DeviceKind::Blk),
        "net" => Some(DeviceKind::Net),
        "console" => Some(DeviceKind::Console),
        "all" => None,
        _ => return Err(format!("{kind:?}: blk, net, console or all")),
    };
    let value = match value {
        "max" => None,
        v => Some(number(v).ok_or_else(|| format!("{v:?} is not a valid limit"))?),
    };
    Ok(Setting { kind, value })
}

/// `blk=64M`: bytes, with an optional K, M or G suffix (powers of 1024).
pub fn parse_memory(s: &str) -> Result<Setting, String> {
    parse_setting(s, |v| {
        let (digits, shift) = match v.char_indices().last()? {
            (i, 'K' | 'k') => (&v[..i], 10),
            (i, 'M' | 'm') => (&v[..i], 20),
            (i, 'G' | 'g') => (&v[..i], 30),
            _ => (v, 0),
        };
        let n: u64 = digits.parse().ok()?;
        // with less, the worker could not even start
        n.checked_mul(1 << shift).filter(|&b| b >= 1 << 20)
    })
}

/// `blk=8`: tasks, at least one.
pub fn parse_pids(s: &str) -> Result<Setting, String> {
    parse_setting(s, |v| v.parse().ok().filter(|&n| n >= 1))
}

/// `blk=50%`: percent of one CPU, 1 to 100 times the CPU count.
pub fn parse_cpu(s: &str) -> Result<Setting, String> {
    parse_setting(s, |v| {
        v.strip_suffix('%')
            .unwrap_or(v)
            .parse()
            .ok()
            .filter(|&p| (1..=100_000).contains(&p))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Memory,
    Pids,
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
        }
    }

    /// The files that carry `limits` for this controller, in cgroup v2 or v1.
    fn settings(self, v2: bool, limits: &Limits) -> Vec<(&'static str, String)> {
        let or = |v: Option<u64>, none: &str| v.map_or(none.to_string(), |n| n.to_string());
        let quota = limits.cpu.map(|p| (p * CPU_PERIOD / 100).max(1000));
        match (self, v2) {
            (Controller::Memory, true) => vec![("memory.max", or(limits.memory, "max"))],
            (Controller::Memory, false) => {
                vec![("memory.limit_in_bytes", or(limits.memory, "-1"))]
            }
            (Controller::Pids, _) => vec![("pids.max", or(limits.pids, "max"))],
            (Controller::Cpu, true) => {
                vec![("cpu.max", format!("{} {CPU_PERIOD}", or(quota, "max")))]
            }
            (Controller::Cpu, false) => vec![
                ("cpu.cfs_period_us", CPU_PERIOD.to_string()),
                ("cpu.cfs_quota_us", or(quota, "-1")),
            ],
        }
    }
}

/// Every limit file a worker cgroup may have, for the audit.
const LIMIT_FILES: [&str; 6] = [
    "memory.max",
    "memory.limit_in_bytes",
    "pids.max",
    "cpu.max",
    "cpu.cfs_quota_us",
    "cpu.cfs_period_us",
];

/// Our directory in one cgroup hierarchy, and the controllers we use there.
struct Hierarchy {
    dir: PathBuf,
    v2: bool,
    controllers: Vec<Controller>,
}

/// The hierarchies worker cgroups are made in.
pub struct Hierarchies {
    list: Vec<Hierarchy>,
    /// Controllers no hierarchy has, said plainly.
    pub missing: Vec<String>,
}

fn fs_type(path: &Path) -> Option<FsType> {
    statfs(path).ok().map(|s| s.filesystem_type())
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
}

fn mkdir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(format!("creating {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

impl Hierarchies {
    /// Finds the hierarchies under `root` and makes our directory in each, with the
    /// controllers enabled for the workers' cgroups (cgroup v2).
    pub fn open(root: &Path) -> Result<Self, String> {
        let mut left = Controller::ALL.to_vec();
        let mut list = Vec::new();
        // cgroup v2 at the root, or beside the v1 hierarchies in a hybrid layout
        if let Some(v2) = [root.to_path_buf(), root.join("unified")]
            .into_iter()
            .find(|d| fs_type(d) == Some(CGROUP2_SUPER_MAGIC))
        {
            let offered =
                std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
            let ours: Vec<Controller> = Controller::ALL
                .into_iter()
                .filter(|c| offered.split_whitespace().any(|o| o == c.name()))
                .collect();
            if !ours.is_empty() {
                let enable: Vec<String> = ours.iter().map(|c| format!("+{}", c.name())).collect();
                let dir = v2.join(GROUP);
                write(&v2.join("cgroup.subtree_control"), &enable.join(" "))?;
                mkdir(&dir)?;
                remove_stale(&dir);
                write(&dir.join("cgroup.subtree_control"), &enable.join(" "))?;
                left.retain(|c| !ours.contains(c));
                list.push(Hierarchy {
                    dir,
                    v2: true,
                    controllers: ours,
                });
            }
        }
        for c in left.clone() {
            let mount = root.join(c.name());
            if fs_type(&mount) == Some(CGROUP_SUPER_MAGIC) {
                let dir = mount.join(GROUP);
                mkdir(&dir)?;
                remove_stale(&dir);
                left.retain(|l| *l != c);
                list.push(Hierarchy {
                    dir,
                    v2: false,
                    controllers: vec![c],
                });
            }
        }
        if list.is_empty() {
            return Err(format!(
                "{} is not a cgroup file system with a memory, pids or cpu controller",
                root.display()
            ));
        }
        let missing = left
            .iter()
            .map(|c| {
                format!(
                    "no {0} limit: no cgroup hierarchy under {1} has the {0} controller",
                    c.name(),
                    root.display()
                )
            })
            .collect();
        Ok(Hierarchies { list, missing })
    }

    /// Makes cgroup `name` with `limits` in every hierarchy and moves `pid` into it.
    pub fn place(&self, name: &str, limits: &Limits, pid: Pid) -> Result<Cgroup, String> {
        let mut cgroup = Cgroup { dirs: Vec::new() };
        for h in &self.list {
            let dir = h.dir.join(name);
            mkdir(&dir)?;
            cgroup.dirs.push(dir.clone());
            for c in &h.controllers {
                for (file, value) in c.settings(h.v2, limits) {
                    write(&dir.join(file), &value)?;
                }
            }
        }
        // Moved last, so a failure above leaves only empty cgroups to remove.
        for dir in &cgroup.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(cgroup)
    }
}

/// Removes the worker cgroups of brokers that are gone (killed before they could remove them;
/// their workers died with them). The kernel refuses to remove a cgroup still in use.
fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let broker = name.to_str().and_then(|n| {
            n.strip_prefix("broker")?
                .split('-')
                .next()?
                .parse::<u32>()
                .ok()
        });
        if broker.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// A worker's cgroup, one directory per hierarchy; removed when dropped.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                log::warn!("removing cgroup {}: {e}", d.display());
            }
        }
    }
}

/// One worker cgroup as its files say, for the audit.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct View {
    pub path: String,
    /// The worker is listed in its `cgroup.procs`.
    pub member: bool,
    /// limit file -> its content
    pub limits: BTreeMap<String, String>,
}

impl fmt::Display for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({})",
            self.path,
            if self.member {
                "member"
            } else {
                "NOT a member"
            }
        )?;
        for (file, value) in &self.limits {
            write!(f, " {file} {value}")?;
        }
        Ok(())
    }
}

/// Reads back each cgroup directory of worker `pid`.
pub fn read_back(dirs: &[PathBuf], pid: i32) -> Vec<View> {
    dirs.iter()
        .map(|d| View {
            path: d.display().to_string(),
            member: std::fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim() == pid.to_string()),
            limits: LIMIT_FILES
                .iter()
                .filter_map(|f| {
                    let v = std::fs::read_to_string(d.join(f)).ok()?;
                    Some((f.to_string(), v.trim().to_string()))
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse() {
        let blk = Some(DeviceKind::Blk);
        assert_eq!(
            parse_memory("blk=64M").unwrap(),
            Setting {
                kind: blk,
                value: Some(64 << 20)
            }
        );
        assert_eq!(parse_memory("all=max").unwrap().value, None);
        assert_eq!(parse_memory("net=2G").unwrap().value, Some(2 << 30));
        assert!(parse_memory("blk=4K").is_err(), "below 1 MiB");
        assert!(parse_memory("disk=64M").is_err());
        assert!(parse_memory("64M").is_err());
        assert_eq!(parse_pids("console=4").unwrap().value, Some(4));
        assert!(parse_pids("blk=0").is_err());
        assert_eq!(parse_cpu("blk=50%").unwrap().value, Some(50));
        assert_eq!(parse_cpu("blk=200").unwrap().value, Some(200));
        assert!(parse_cpu("blk=0%").is_err());
    }

    #[test]
    fn limits_become_cgroup_files() {
        let l = Limits {
            memory: Some(64 << 20),
            pids: None,
            cpu: Some(50),
        };
        assert_eq!(
            Controller::Cpu.settings(true, &l),
            [("cpu.max", "50000 100000".to_string())]
        );
        assert_eq!(
            Controller::Cpu.settings(false, &l)[1],
            ("cpu.cfs_quota_us", "50000".to_string())
        );
        assert_eq!(
            Controller::Pids.settings(true, &l),
            [("pids.max", "max".to_string())]
        );
        assert_eq!(
            Controller::Memory.settings(false, &l),
            [("memory.limit_in_bytes", (64u64 << 20).to_string())]
        );
        let mut o = Options::default();
        o.apply(parse_pids("net=3").unwrap(), |l, v| l.pids = v);
        assert_eq!(o.limits(DeviceKind::Net).pids, Some(3));
        assert_eq!(o.limits(DeviceKind::Blk).pids, Some(BLK_PIDS));
    }

    #[test]
    fn only_the_cgroups_of_brokers_that_are_gone_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let gone = d.path().join("broker999999999-zone1-blk-0xa003c00");
        let live = d
            .path()
            .join(format!("broker{}-zone1-blk-0xa003c00", std::process::id()));
        let other = d.path().join("someone-else");
        for dir in [&gone, &live, &other] {
            std::fs::create_dir(dir).unwrap();
        }
        remove_stale(d.path());
        assert!(!gone.exists() && live.exists() && other.exists());
    }

    #[test]
    fn a_directory_that_is_no_cgroup_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = Hierarchies::open(d.path()).err().unwrap();
        assert!(e.contains("is not a cgroup file system"), "{e}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
