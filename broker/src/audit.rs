//! What the kernel says about each worker, read from /proc: the audit `hvisor-broker audit`
//! prints. Nothing here is what the broker intended; every field is read back, except the
//! `claimed_*` fields: what the worker said about itself, which a compromised worker can
//! forge, and which are printed as its claims.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use crate::budget::escape;

/// One worker as the broker knows it, before /proc is read.
pub struct Known {
    pub label: String,
    pub device: String,
    pub zone: u32,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Each recent exit, "TIME: cause", oldest first.
    pub exits: Vec<String>,
    /// The worker's own account of its root, and notes on a weaker sandbox.
    pub claimed_root: Option<String>,
    pub claimed_notes: Vec<String>,
    /// The worker's cgroup directories.
    pub cgroups: Vec<std::path::PathBuf>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Report {
    pub broker_pid: i32,
    pub workers: Vec<Worker>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Worker {
    pub label: String,
    pub device: String,
    pub zone: u32,
    pub pid: Option<i32>,
    pub running: bool,
    /// real, effective, saved, filesystem (as seen from the broker's namespace)
    pub uid: Vec<u32>,
    pub gid: Vec<u32>,
    pub groups: Vec<u32>,
    /// namespace -> (worker's id, whether it differs from the broker's)
    pub namespaces: BTreeMap<String, Namespace>,
    pub threads: Vec<Thread>,
    pub root: String,
    pub root_entries: Option<usize>,
    /// What the worker says, not what was read: see the module documentation.
    pub claimed_root: Option<String>,
    pub claimed_notes: Vec<String>,
    /// limit name -> (soft, hard)
    pub rlimits: BTreeMap<String, (String, String)>,
    pub fds: Vec<(i32, String)>,
    /// Workers of this device started after the first, and how recent ones ended.
    pub restarts: u32,
    pub last_exit: Option<String>,
    #[serde(default)]
    pub exits: Vec<String>,
    /// Its cgroups, read back from their files.
    pub cgroups: Vec<crate::cgroup::View>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Namespace {
    pub id: String,
    pub own: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Thread {
    pub tid: i32,
    pub seccomp: String,
    pub seccomp_filters: Option<String>,
    pub no_new_privs: String,
    pub cap_inh: String,
    pub cap_prm: String,
    pub cap_eff: String,
    pub cap_bnd: String,
    pub cap_amb: String,
}

pub const NAMESPACES: [&str; 8] = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup", "time"];

pub fn collect(known: Vec<Known>) -> Report {
    let me = std::process::id() as i32;
    Report {
        broker_pid: me,
        workers: known.into_iter().map(|k| worker(me, k)).collect(),
    }
}

fn status_field(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

fn ids(text: &str, field: &str) -> Vec<u32> {
    status_field(text, field)
        .map(|v| {
            v.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn worker(me: i32, k: Known) -> Worker {
    let mut w = Worker {
        label: k.label,
        device: k.device,
        zone: k.zone,
        pid: k.pid,
        running: false,
        uid: Vec::new(),
        gid: Vec::new(),
        groups: Vec::new(),
        namespaces: BTreeMap::new(),
        threads: Vec::new(),
        root: String::new(),
        root_entries: None,
        claimed_root: k.claimed_root,
        claimed_notes: k.claimed_notes,
        rlimits: BTreeMap::new(),
        fds: Vec::new(),
        restarts: k.restarts,
        last_exit: k.last_exit,
        exits: k.exits,
        cgroups: Vec::new(),
    };
    let Some(pid) = k.pid else { return w };
    w.cgroups = crate::cgroup::read_back(&k.cgroups, pid);
    let dir = format!("/proc/{pid}");
    let Ok(status) = std::fs::read_to_string(format!("{dir}/status")) else {
        return w;
    };
    w.running = true;
    w.uid = ids(&status, "Uid");
    w.gid = ids(&status, "Gid");
    w.groups = ids(&status, "Groups");
    for ns in NAMESPACES {
        let theirs = std::fs::read_link(format!("{dir}/ns/{ns}")).map(|p| p.display().to_string());
        let ours =
            std::fs::read_link(format!("/proc/{me}/ns/{ns}")).map(|p| p.display().to_string());
        if let Ok(id) = theirs {
            let own = ours.map(|o| o != id).unwrap_or(true);
            w.namespaces.insert(ns.to_string(), Namespace { id, own });
        }
    }
    if let Ok(tasks) = std::fs::read_dir(format!("{dir}/task")) {
        let mut tids: Vec<i32> = tasks
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        tids.sort();
        for tid in tids {
            let Ok(t) = std::fs::read_to_string(format!("{dir}/task/{tid}/status")) else {
                continue;
            };
            let f = |name| status_field(&t, name).unwrap_or_default();
            w.threads.push(Thread {
                tid,
                seccomp: f("Seccomp"),
                seccomp_filters: status_field(&t, "Seccomp_filters"),
                no_new_privs: f("NoNewPrivs"),
                cap_inh: f("CapInh"),
                cap_prm: f("CapPrm"),
                cap_eff: f("CapEff"),
                cap_bnd: f("CapBnd"),
                cap_amb: f("CapAmb"),
            });
        }
    }
    w.root = std::fs::read_link(format!("{dir}/root"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    w.root_entries = std::fs::read_dir(format!("{dir}/root"))
        .ok()
        .map(|rd| rd.count());
    if let Ok(limits) = std::fs::read_to_string(format!("{dir}/limits")) {
        for line in limits.lines().skip(1) {
            // "Max open files            9                    9                    files"
            let cols: Vec<&str> = line
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect();
            if cols.len() >= 3 {
                w.rlimits.insert(
                    cols[0].to_string(),
                    (cols[1].to_string(), cols[2].to_string()),
                );
            }
        }
    }
    if let Ok(fds) = std::fs::read_dir(format!("{dir}/fd")) {
        let mut list: Vec<(i32, String)> = fds
            .flatten()
            .filter_map(|e| {
                let fd = e.file_name().to_str()?.parse().ok()?;
                let target = std::fs::read_link(e.path())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                Some((fd, target))
            })
            .collect();
        list.sort();
        w.fds = list;
    }
    w
}

/// The human table.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "hvisor-broker (pid {}): {} worker(s)",
        r.broker_pid,
        r.workers.len()
    );
    for w in &r.workers {
        let state = if w.running { "running" } else { "not running" };
        let pid = w.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "\n{}  ({} worker, pid {pid}, {state}, restarts {})",
            w.label, w.device, w.restarts
        );
        for e in &w.exits {
            let _ = writeln!(out, "  exit        {e}");
        }
        if !w.running {
            continue;
        }
        let _ = writeln!(
            out,
            "  uid/gid     {} / {}  groups [{}]",
            join(&w.uid),
            join(&w.gid),
            join(&w.groups)
        );
        let ns: Vec<String> = w
            .namespaces
            .iter()
            .map(|(n, v)| format!("{n}:{}", if v.own { "own" } else { "shared" }))
            .collect();
        let _ = writeln!(out, "  namespaces  {}", ns.join(" "));
        for t in &w.threads {
            let _ = writeln!(
                out,
                "  thread {:<5} seccomp {} (filters {}), no_new_privs {}",
                t.tid,
                seccomp_mode(&t.seccomp),
                t.seccomp_filters.as_deref().unwrap_or("?"),
                t.no_new_privs
            );
            let _ = writeln!(
                out,
                "               caps inh {} prm {} eff {} bnd {} amb {}",
                t.cap_inh, t.cap_prm, t.cap_eff, t.cap_bnd, t.cap_amb
            );
        }
        let entries = w
            .root_entries
            .map(|n| format!("{n} entries"))
            .unwrap_or_else(|| "unreadable".into());
        let _ = writeln!(out, "  root        {} ({entries})", w.root);
        if let Some(root) = &w.claimed_root {
            let _ = writeln!(out, "  worker says: confined: {}", escape(root));
        }
        for n in &w.claimed_notes {
            let _ = writeln!(out, "  worker says: weaker sandbox: {}", escape(n));
        }
        let limits: Vec<String> = [
            "Max open files",
            "Max processes",
            "Max core file size",
            "Max locked memory",
            "Max file size",
        ]
        .iter()
        .filter_map(|k| {
            w.rlimits
                .get(*k)
                .map(|(s, h)| format!("{} {s}/{h}", short_limit(k)))
        })
        .collect();
        let _ = writeln!(out, "  rlimits     {}", limits.join(", "));
        for c in &w.cgroups {
            let _ = writeln!(out, "  cgroup      {c}");
        }
        for (fd, target) in &w.fds {
            let _ = writeln!(out, "  fd {fd:<8} {target}");
        }
    }
    out
}

fn short_limit(name: &str) -> &str {
    match name {
        "Max open files" => "nofile",
        "Max processes" => "nproc",
        "Max core file size" => "core",
        "Max locked memory" => "memlock",
        "Max file size" => "fsize",
        other => other,
    }
}

fn seccomp_mode(v: &str) -> String {
    match v {
        "0" => "0 (off)".into(),
        "1" => "1 (strict)".into(),
        "2" => "2 (filter)".into(),
        other => other.into(),
    }
}

fn join(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join("/")
}
