//! What one request costs (not a timed test): the simulator's `depth-bench` guest reads 4 KiB at
//! random from a page-cached image at queue depth 1, 4 and 16, and between the depths the
//! harness reads, from /proc, the CPU time (utime + stime, every thread), the read/write-family
//! system calls (`syscr` + `syscw` of /proc/PID/io: epoll_wait, ioctl and sendmsg are not among
//! them) and the context switches (every thread) of the broker and of the blk worker. Each is
//! printed per request, as the median of ROUNDS runs. Build with `--release` first:
//! `target/release/hvisor-cost-bench [SECS [ROUNDS]]`.

use std::time::Duration;

use hvisor_tests::*;
use nix::unistd::Pid;
use serde_json::json;

const DEPTHS: [usize; 3] = [1, 4, 16];

/// One process's counters at one moment.
#[derive(Clone, Copy, Default)]
struct Costs {
    cpu_us: f64,
    syscalls: f64,
    switches: f64,
}

impl Costs {
    fn of(pid: Pid) -> Costs {
        let tick = 1e6 / clock_ticks() as f64;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The fields after the command, which is in parentheses and may hold spaces.
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<f64> = after
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command.
        let cpu_us = (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) * tick;
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
        let syscalls = field_sum(&io, &["syscr:", "syscw:"]);
        let switches = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                field_sum(
                    &status,
                    &["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"],
                )
            })
            .sum();
        Costs {
            cpu_us,
            syscalls,
            switches,
        }
    }

    /// Per request, from `before` to `self`.
    fn per(&self, before: &Costs, requests: f64) -> Costs {
        Costs {
            cpu_us: (self.cpu_us - before.cpu_us) / requests,
            syscalls: (self.syscalls - before.syscalls) / requests,
            switches: (self.switches - before.switches) / requests,
        }
    }
}

fn field_sum(text: &str, names: &[&str]) -> f64 {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(char::is_whitespace)?;
            names
                .contains(&name)
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

fn clock_ticks() -> i64 {
    // SAFETY: sysconf reads a constant of the system.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1)
}

fn main() -> anyhow::Result<()> {
    let arg = |n: usize, default: u64| {
        std::env::args()
            .nth(n)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (secs, rounds) = (arg(1, 3), arg(2, 3) as usize);
    let s = Scratch::new();
    let img = s.image("cost.img", 64 << 20);
    let cfg = s.write_json(
        "cost.json",
        &json!({ "zones": [zone_json(1, 0x5000_0000, 0x1000_0000, &[BlkSpec { img: &img, addr: 0xa00_3c00, irq: 78, readonly: false }])] }),
    );
    // [round][depth] -> (broker, worker) per request
    let mut runs: Vec<Vec<(Costs, Costs)>> = Vec::new();
    for round in 0..rounds {
        println!("== round {} of {rounds}", round + 1);
        runs.push(run_once(&s, &cfg, secs)?);
    }
    println!();
    println!(
        "cost per request, 4 KiB random reads from the page cache, {secs} s per depth; medians \
         of {rounds} round(s). cpu: user + system time; rw calls: read/write-family system \
         calls (/proc/PID/io); switches: context switches"
    );
    println!(
        "  {:>5} {:>11} {:>9} {:>9} {:>11} {:>9} {:>9}",
        "depth", "broker cpu", "rw calls", "switches", "worker cpu", "rw calls", "switches"
    );
    for (j, depth) in DEPTHS.iter().enumerate() {
        let median = |f: &dyn Fn(&(Costs, Costs)) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(|r| f(&r[j])).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "  {:>5} {:>9.2}us {:>9.2} {:>9.2} {:>9.2}us {:>9.2} {:>9.2}",
            depth,
            median(&|c| c.0.cpu_us),
            median(&|c| c.0.syscalls),
            median(&|c| c.0.switches),
            median(&|c| c.1.cpu_us),
            median(&|c| c.1.syscalls),
            median(&|c| c.1.switches),
        );
    }
    Ok(())
}

/// One simulator run over every depth: the broker's and the worker's cost per request at each.
fn run_once(s: &Scratch, cfg: &std::path::Path, secs: u64) -> anyhow::Result<Vec<(Costs, Costs)>> {
    let mut run = SimRun::new(cfg, "depth-bench");
    run.stay = true;
    let depths = DEPTHS.map(|d| d.to_string()).join(",");
    run.extra = vec![
        "--timeout".into(),
        "600".into(),
        "--depths".into(),
        depths,
        "--depth-secs".into(),
        secs.to_string(),
    ];
    let _ = std::fs::remove_file(s.path("report.json"));
    let mut stack = Stack::start(s, run, &[])?;
    let broker = stack.broker.pid();
    stack
        .broker
        .wait_for("worker pid", Duration::from_secs(30))?;
    let worker = *children(broker)
        .first()
        .ok_or_else(|| anyhow::anyhow!("no worker:\n{}", stack.diagnostics()))?;
    let mut last = (Costs::of(broker), Costs::of(worker));
    let mut snapshots = Vec::new();
    for depth in DEPTHS {
        stack
            .sim
            .wait_for(&format!("depth-bench QD{depth}:"), Duration::from_secs(300))?;
        let now = (Costs::of(broker), Costs::of(worker));
        snapshots.push((last, now));
        last = now;
    }
    let report = stack.wait_report(Duration::from_secs(60))?;
    stack.stop_broker()?;
    let failed = failed_checks(&report);
    if !failed.is_empty() {
        anyhow::bail!("{failed:?}\n{}", stack.diagnostics());
    }
    let figures = &report["zones"][0]["devices"][0]["depths"];
    let mut out = Vec::new();
    for (j, (before, after)) in snapshots.iter().enumerate() {
        let ops = figures[j]["ops"].as_f64().unwrap_or(0.0).max(1.0);
        out.push((after.0.per(&before.0, ops), after.1.per(&before.1, ops)));
    }
    Ok(out)
}
