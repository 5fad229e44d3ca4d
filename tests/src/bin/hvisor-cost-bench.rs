//! What one request costs (not a timed test): the simulator's `depth-bench` guest reads 4 KiB at
//! random from a page-cached image at queue depth 1, 4 and 16, and between the depths the
//! harness reads, from /proc, the CPU time (utime + stime, every thread), the read/write-family
//! system calls (`syscr` + `syscw` of /proc/PID/io: epoll_wait, ioctl and sendmsg are not among
//! them) and the context switches (every thread) of the broker and of the blk worker, per
//! request, and the IOPS; before the depths, the guest times 200000 synchronous register reads.
//! The setups alternate round by round: with `HVISOR_BEFORE_DIR` set, first the broker (and the
//! blk worker beside it) built there, e.g. from the commit before the cost work (`scripts/bench.sh`
//! builds one); then this build's broker with its defaults, and with BROKER_ARGS (default
//! `--poll-budget 10`). Each figure is the median of ROUNDS runs; each setup's ratios are to the
//! first's. Build with `--release` first:
//! `target/release/hvisor-cost-bench [SECS [ROUNDS [BROKER_ARGS...]]]`.

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
    // Further arguments go to the broker of the last setup.
    let mut extra: Vec<String> = std::env::args().skip(3).collect();
    if extra.is_empty() {
        extra = vec!["--poll-budget".into(), "10".into()];
    }
    let mut setups: Vec<Setup> = Vec::new();
    if let Some(dir) = std::env::var_os("HVISOR_BEFORE_DIR") {
        let broker = std::path::PathBuf::from(dir).join("hvisor-broker");
        anyhow::ensure!(broker.exists(), "{} is not built", broker.display());
        setups.push(Setup {
            name: "before: the broker and blk worker of HVISOR_BEFORE_DIR".into(),
            broker,
            args: Vec::new(),
        });
    }
    setups.push(Setup {
        name: "now, the defaults (polling all of --poll-us after all work)".into(),
        broker: bin("hvisor-broker"),
        args: Vec::new(),
    });
    setups.push(Setup {
        name: format!("now, {}", extra.join(" ")),
        broker: bin("hvisor-broker"),
        args: extra,
    });
    // [setup][round]
    let mut runs: Vec<Vec<Run>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (k, setup) in setups.iter().enumerate() {
            println!("== round {} of {rounds}: {}", round + 1, setup.name);
            runs[k].push(run_once(&s, &cfg, secs, setup)?);
        }
    }
    println!();
    println!(
        "cost per request, 4 KiB random reads from the page cache, {secs} s per depth; medians \
         of {rounds} round(s). cpu: user + system time; rw calls: read/write-family system \
         calls (/proc/PID/io); switches: context switches"
    );
    let median = |k: usize, f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs[k].iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (k, setup) in setups.iter().enumerate() {
        println!("  {}", setup.name);
        println!(
            "  {:>5} {:>9} {:>11} {:>9} {:>9} {:>11} {:>9} {:>9}",
            "depth",
            "IOPS",
            "broker cpu",
            "rw calls",
            "switches",
            "worker cpu",
            "rw calls",
            "switches"
        );
        for (j, depth) in DEPTHS.iter().enumerate() {
            println!(
                "  {:>5} {:>9.0} {:>9.2}us {:>9.2} {:>9.2} {:>9.2}us {:>9.2} {:>9.2}",
                depth,
                median(k, &|r| r.iops[j]),
                median(k, &|r| r.costs[j].0.cpu_us),
                median(k, &|r| r.costs[j].0.syscalls),
                median(k, &|r| r.costs[j].0.switches),
                median(k, &|r| r.costs[j].1.cpu_us),
                median(k, &|r| r.costs[j].1.syscalls),
                median(k, &|r| r.costs[j].1.switches),
            );
        }
        let reg = |i: usize| median(k, &|r| r.register[i]);
        println!(
            "  register read mean / p50 / p99: {:.2} / {:.2} / {:.2} us (p99 {:.2}x the mean)",
            reg(0),
            reg(1),
            reg(2),
            reg(2) / reg(0)
        );
    }
    for (k, setup) in setups.iter().enumerate().skip(1) {
        println!("  {} / {}:", setup.name, setups[0].name);
        let ratio = |f: &dyn Fn(&Run) -> f64| median(k, f) / median(0, f);
        for (j, depth) in DEPTHS.iter().enumerate() {
            println!(
                "    QD{depth}: IOPS {:.2}, broker cpu {:.2}, worker cpu {:.2}, broker+worker cpu {:.2}",
                ratio(&|r| r.iops[j]),
                ratio(&|r| r.costs[j].0.cpu_us),
                ratio(&|r| r.costs[j].1.cpu_us),
                ratio(&|r| r.costs[j].0.cpu_us + r.costs[j].1.cpu_us),
            );
        }
        println!(
            "    register read mean {:.2}, p50 {:.2}, p99 {:.2}",
            ratio(&|r| r.register[0]),
            ratio(&|r| r.register[1]),
            ratio(&|r| r.register[2]),
        );
    }
    Ok(())
}

/// A broker to measure: its binary (its workers are those beside it) and its arguments.
struct Setup {
    name: String,
    broker: std::path::PathBuf,
    args: Vec<String>,
}

/// What one run measured: per depth the broker's and the worker's cost per request and the
/// IOPS; the register reads' mean, p50 and p99 in us.
struct Run {
    costs: Vec<(Costs, Costs)>,
    iops: Vec<f64>,
    register: [f64; 3],
}

/// One simulator run over every depth: the broker's and the worker's cost per request at each.
fn run_once(s: &Scratch, cfg: &std::path::Path, secs: u64, setup: &Setup) -> anyhow::Result<Run> {
    let run = SimRun::new(cfg, "depth-bench")
        .staying()
        .timeout(600)
        .depths(&DEPTHS, secs);
    let _ = std::fs::remove_file(s.path("report.json"));
    let args: Vec<&str> = setup.args.iter().map(String::as_str).collect();
    let mut stack = Stack::start_with(s, run, |socket| {
        start_broker_at(&setup.broker, cfg, socket, &args)
    })?;
    let broker = stack.broker.pid();
    stack
        .broker
        .wait_for("worker pid", Duration::from_secs(30))?;
    let worker = *children(broker)
        .first()
        .ok_or_else(|| anyhow::anyhow!("no worker:\n{}", stack.diagnostics()))?;
    stack
        .sim
        .wait_for("depth-bench register reads", Duration::from_secs(300))?;
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
    let device = &report["zones"][0]["devices"][0];
    let figure = |j: usize, k: &str| device["depths"][j][k].as_f64().unwrap_or(0.0);
    let mut costs = Vec::new();
    for (j, (before, after)) in snapshots.iter().enumerate() {
        let ops = figure(j, "ops").max(1.0);
        costs.push((after.0.per(&before.0, ops), after.1.per(&before.1, ops)));
    }
    let reg = |k: &str| device["sync_read"][k].as_f64().unwrap_or(0.0);
    Ok(Run {
        costs,
        iops: (0..DEPTHS.len()).map(|j| figure(j, "iops")).collect(),
        register: [reg("mean_us"), reg("p50_us"), reg("p99_us")],
    })
}
