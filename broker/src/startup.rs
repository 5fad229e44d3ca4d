//! How long a worker may take to report Ready. Wall-clock time says little on a loaded
//! machine, where a worker may wait seconds for a CPU; what counts is the CPU time it used (a
//! worker that spends its whole budget without getting ready is stuck in a loop) and how long
//! it went without using any (blocked for good).

use std::time::{Duration, Instant};

use nix::unistd::{sysconf, Pid, SysconfVar};

/// How often /proc is read.
const LOOK_EVERY: Duration = Duration::from_millis(100);
/// A worker that used no CPU time for this many budgets is stuck.
const STALL_FACTOR: u32 = 10;

pub struct ReadyWatch {
    budget: Duration,
    cpu: Duration,
    progress: Instant,
    next_look: Instant,
}

impl ReadyWatch {
    pub fn new(budget: Duration) -> Self {
        let now = Instant::now();
        ReadyWatch {
            budget,
            cpu: Duration::ZERO,
            progress: now,
            next_look: now,
        }
    }

    /// Why the (unready) worker `pid` should be stopped, if it should.
    pub fn overdue(&mut self, pid: Pid) -> Option<String> {
        let now = Instant::now();
        if now < self.next_look {
            return None;
        }
        self.next_look = now + LOOK_EVERY;
        // Unreadable: it exited, and the exit is reported where it is reaped.
        let cpu = cpu_time(pid)?;
        if cpu > self.cpu {
            self.cpu = cpu;
            self.progress = now;
        }
        if cpu > self.budget {
            return Some(format!(
                "used {cpu:.1?} of CPU time (the budget is {:?})",
                self.budget
            ));
        }
        let stalled = now.duration_since(self.progress);
        (stalled > self.budget * STALL_FACTOR)
            .then(|| format!("used no CPU time for {stalled:.1?}"))
    }
}

/// User plus system CPU time of `pid`, from /proc/PID/stat.
fn cpu_time(pid: Pid) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ...": comm may hold anything, so count fields after the last ')'.
    // utime and stime are fields 14 and 15, the 12th and 13th after it.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let hz = sysconf(SysconfVar::CLK_TCK).ok()??;
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    let ticks = utime.saturating_add(stime);
    Some(Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_time_of_a_busy_process() {
        // A child, not this process: qemu-user (the aarch64 tests) fakes /proc/self/stat.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let start = Instant::now();
        let mut used = Duration::ZERO;
        while used == Duration::ZERO && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
            used = cpu_time(pid).unwrap_or_default();
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(used > Duration::ZERO);
    }

    #[test]
    fn a_live_idle_process_is_not_overdue_at_first() {
        let mut w = ReadyWatch::new(Duration::from_secs(10));
        assert_eq!(w.overdue(Pid::this()), None);
    }
}
