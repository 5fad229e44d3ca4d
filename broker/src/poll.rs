//! When the bridge loop polls and when it sleeps. Polling answers a trapped register access
//! (a vCPU spinning until the broker answers) without a wakeup, but every microsecond of it is
//! a microsecond of CPU. Like Linux KVM's halt-polling, the window after the last work adapts:
//! it grows when a sleep ended in work the window would have caught, and shrinks when the loop
//! slept longer than the longest window. A budget caps what polling costs: the rounds that
//! found nothing (each counted up to [`Poller::LONGEST_ROUND`]: a longer one was preempted)
//! may take at most a fraction of wall time, earned as time passes and saved up for at most
//! [`Poller::PERIOD`]. A poll that finds work within [`Poller::FREE`] (back-to-back register
//! accesses) costs nothing from it: a sleep and wakeup would have cost more. Every decision
//! takes `now`, so tests need no clock.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollEvent, EpollTimeout};

/// What the loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Look again without waiting.
    Poll,
    /// Wait for an event.
    Sleep,
}

pub struct Poller {
    /// The longest window (`--poll-us`); zero never polls.
    max: Duration,
    /// The budget in percent of wall time; 100 polls the whole `max` after every round of work
    /// with no cap and no adapting.
    percent: u32,
    /// The window now.
    window: Duration,
    /// Polling time earned and not spent, in nanoseconds; may go below zero by one round.
    credit: i64,
    earned_at: Instant,
    /// The end of the last round that found work, and whether the loop has slept since (its
    /// polling is then charged already).
    idle_since: Option<Instant>,
    asleep: bool,
    /// What the rounds of this idle stretch that found nothing took, in nanoseconds.
    spent: i64,
    /// The end of the round before, where an idle stretch starts.
    last: Instant,
}

impl Poller {
    /// Polling credit is saved up for at most this long a stretch of wall time.
    pub const PERIOD: Duration = Duration::from_millis(10);
    /// A round that found nothing is charged at most this: one that took longer was
    /// preempted, not polling.
    pub const LONGEST_ROUND: Duration = Duration::from_micros(10);
    /// About what a sleep and a wakeup cost the loop: a poll that finds work sooner costs no
    /// budget, and one that begins with no credit left lasts this long.
    pub const FREE: Duration = Duration::from_micros(5);
    /// The first window after the window was zero.
    pub const GROW_START: Duration = Duration::from_micros(10);

    pub fn new(max: Duration, percent: u32, now: Instant) -> Self {
        let percent = percent.min(100);
        let mut p = Poller {
            max,
            percent,
            window: max,
            credit: 0,
            earned_at: now,
            idle_since: None,
            asleep: false,
            spent: 0,
            last: now,
        };
        p.credit = p.cap();
        p
    }

    fn fixed(&self) -> bool {
        self.percent >= 100
    }

    fn cap(&self) -> i64 {
        nanos(Self::PERIOD) * i64::from(self.percent) / 100
    }

    fn earn(&mut self, now: Instant) {
        let passed = nanos(now.saturating_duration_since(self.earned_at));
        self.credit = (self.credit + passed * i64::from(self.percent) / 100).min(self.cap());
        self.earned_at = now;
    }

    /// The loop finished a round at `now`; `worked` if it found a request or an event.
    /// Says whether the next wait polls or sleeps.
    pub fn after_round(&mut self, now: Instant, worked: bool) -> Wait {
        let last = std::mem::replace(&mut self.last, now);
        if self.max.is_zero() {
            return Wait::Sleep;
        }
        if self.fixed() {
            // No budget: poll the whole window after the last work.
            if worked || self.idle_since.is_none() {
                self.idle_since = Some(now);
            }
            let idle = now.saturating_duration_since(self.idle_since.unwrap_or(now));
            return if idle < self.max {
                Wait::Poll
            } else {
                Wait::Sleep
            };
        }
        self.earn(now);
        if worked {
            let idle = self
                .idle_since
                .take()
                .map(|s| now.saturating_duration_since(s));
            let spent = std::mem::take(&mut self.spent);
            if let Some(idle) = idle.filter(|_| std::mem::take(&mut self.asleep)) {
                // Adapt to how long the loop was idle: a longer window would have caught
                // this work without a wakeup, or no window would.
                if idle <= self.max {
                    self.grow();
                } else {
                    self.shrink();
                }
            } else {
                // Found by polling: what a sleep would have cost is free.
                self.credit -= (spent - nanos(Self::FREE)).max(0);
            }
            return self.poll_if_window(now);
        }
        // The first round to find nothing started the idle stretch.
        let start = *self.idle_since.get_or_insert(last);
        if self.asleep {
            return Wait::Sleep;
        }
        self.spent += nanos(now.saturating_duration_since(last).min(Self::LONGEST_ROUND));
        let within = now.saturating_duration_since(start) < self.window;
        if within && self.spent - nanos(Self::FREE) < self.credit.max(0) {
            return Wait::Poll;
        }
        // Polled in vain: all of it is charged.
        self.credit -= std::mem::take(&mut self.spent);
        self.asleep = true;
        Wait::Sleep
    }

    /// After work: polls if there is a window, else sleeps from `now`.
    fn poll_if_window(&mut self, now: Instant) -> Wait {
        if !self.window.is_zero() {
            return Wait::Poll;
        }
        self.idle_since = Some(now);
        self.asleep = true;
        Wait::Sleep
    }

    /// The window now, for status lines and tests.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn grow(&mut self) {
        self.window = (self.window * 2).clamp(Self::GROW_START, self.max);
    }

    fn shrink(&mut self) {
        self.window /= 2;
        if self.window < Self::GROW_START {
            self.window = Duration::ZERO;
        }
    }
}

/// Waits for events for at most `timeout` (`None`: until one comes) to the microsecond: an
/// interrupt retry 50 us away must not become a zero-timeout spin (epoll_wait counts whole
/// milliseconds). Kernels before epoll_pwait2 (5.11) sleep whole milliseconds, rounded up.
pub fn wait(
    epoll: &Epoll,
    events: &mut [EpollEvent],
    timeout: Option<Duration>,
) -> nix::Result<usize> {
    static NO_PWAIT2: AtomicBool = AtomicBool::new(false);
    // A polling round: plain epoll_wait copies no timeout and sets no signal mask, which
    // makes the round, and so a register access met during it, cheaper.
    if timeout == Some(Duration::ZERO) {
        return epoll.wait(events, EpollTimeout::ZERO);
    }
    if !NO_PWAIT2.load(Ordering::Relaxed) {
        let ts = timeout.map(|t| libc::timespec {
            // `as _`: time_t is 32 or 64 bits by target (and deprecated by name on musl).
            tv_sec: t.as_secs().min(i32::MAX as u64) as _,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        let len = events.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: `EpollEvent` is a transparent `epoll_event`, and the kernel writes at most
        // `len` of them; `ts_ptr` is null or points to a timespec that outlives the call; no
        // signal mask is passed.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                epoll.0.as_raw_fd(),
                events.as_mut_ptr(),
                len,
                ts_ptr,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        match Errno::result(n) {
            Ok(n) => return Ok(n as usize),
            Err(Errno::ENOSYS) => NO_PWAIT2.store(true, Ordering::Relaxed),
            Err(e) => return Err(e),
        }
    }
    let timeout = match timeout {
        None => EpollTimeout::NONE,
        Some(t) => {
            EpollTimeout::from(u16::try_from(t.as_micros().div_ceil(1000)).unwrap_or(u16::MAX))
        }
    };
    epoll.wait(events, timeout)
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// Work arrives every `gap`; a polling round takes 1 us, a sleep ends at the next arrival.
    /// Returns the time spent in polling rounds that found nothing, and the wall time.
    fn run(p: &mut Poller, t0: Instant, gap: Duration, total: Duration) -> (Duration, Duration) {
        let (mut t, mut next_work, mut wasted) = (t0, t0, Duration::ZERO);
        while t < t0 + total {
            let worked = next_work <= t;
            if worked {
                next_work = t + gap;
            }
            match p.after_round(t, worked) {
                Wait::Poll => {
                    if next_work > t + US {
                        wasted += US;
                    }
                    t += US;
                }
                Wait::Sleep => t = t.max(next_work),
            }
        }
        (wasted, t - t0)
    }

    #[test]
    fn zero_window_never_polls() {
        let t = Instant::now();
        let mut p = Poller::new(Duration::ZERO, 100, t);
        assert_eq!(p.after_round(t, true), Wait::Sleep);
        assert_eq!(p.after_round(t + US, false), Wait::Sleep);
    }

    #[test]
    fn no_budget_polls_the_whole_window_after_work() {
        let t = Instant::now();
        let mut p = Poller::new(100 * US, 100, t);
        assert_eq!(p.after_round(t, true), Wait::Poll);
        assert_eq!(p.after_round(t + 99 * US, false), Wait::Poll);
        assert_eq!(p.after_round(t + 100 * US, false), Wait::Sleep);
        assert_eq!(p.after_round(t + 200 * US, true), Wait::Poll);
    }

    #[test]
    fn back_to_back_work_costs_no_budget() {
        let t = Instant::now();
        let mut p = Poller::new(100 * US, 1, t);
        for i in 0..1_000_000u32 {
            assert_eq!(p.after_round(t + i * US, true), Wait::Poll);
        }
    }

    #[test]
    fn polling_between_requests_stays_within_the_budget() {
        for (percent, gap) in [(10, 40), (10, 90), (25, 40), (5, 20)] {
            let t = Instant::now();
            let mut p = Poller::new(100 * US, percent, t);
            let (wasted, wall) = run(&mut p, t, gap * US, Duration::from_secs(1));
            // The budget, and what the first FREE of each poll that found work took.
            let requests = (wall.as_micros() / (gap as u128)) as u32;
            let allowed =
                wall * percent / 100 + Poller::PERIOD * percent / 100 + Poller::FREE * requests;
            assert!(
                wasted <= allowed,
                "{percent}% gap {gap}: {wasted:?} of {wall:?}"
            );
            assert!(!wasted.is_zero(), "{percent}% gap {gap}: never polled");
        }
    }

    #[test]
    fn an_expired_window_sleeps() {
        let t = Instant::now();
        let mut p = Poller::new(50 * US, 50, t);
        assert_eq!(p.after_round(t, true), Wait::Poll);
        assert_eq!(p.after_round(t + 49 * US, false), Wait::Poll);
        assert_eq!(p.after_round(t + 50 * US, false), Wait::Sleep);
        // A wakeup without work (a timer) sleeps on.
        assert_eq!(p.after_round(t + 10_000 * US, false), Wait::Sleep);
    }

    #[test]
    fn long_idles_shrink_the_window_and_short_ones_grow_it() {
        let t = Instant::now();
        let mut p = Poller::new(80 * US, 50, t);
        let mut now = t;
        // Work every 10 ms: polling never catches it, so the window goes to zero.
        for _ in 0..10 {
            now += Duration::from_millis(10);
            p.after_round(now, true);
            assert_eq!(p.after_round(now + 200 * US, false), Wait::Sleep);
        }
        assert_eq!(p.window(), Duration::ZERO);
        assert_eq!(p.after_round(now + 2 * US, false), Wait::Sleep);
        // Then every 30 us: each wakeup doubles it until polling catches the work.
        let mut windows = Vec::new();
        for _ in 0..6 {
            now += 30 * US;
            p.after_round(now, true);
            windows.push(p.window().as_micros());
            p.after_round(now + 30 * US, false);
        }
        assert_eq!(windows, [10, 20, 40, 40, 40, 40]);
    }

    #[test]
    fn out_of_credit_sleeps_and_earns_it_back() {
        let t = Instant::now();
        let mut p = Poller::new(Duration::from_millis(5), 10, t);
        // 1 ms of credit (10% of 10 ms) and what is earned meanwhile, spent on one long
        // fruitless poll of 1 us rounds.
        assert_eq!(p.after_round(t, true), Wait::Poll);
        let mut now = t;
        while p.after_round(now + US, false) == Wait::Poll {
            now += US;
        }
        let polled = now - t;
        assert!(polled >= 1000 * US && polled < 1200 * US, "{polled:?}");
        // Out of credit: work is followed by no more polling than FREE and what was earned.
        let mut rounds = 0;
        p.after_round(now + 2 * US, true);
        while p.after_round(now + (3 + rounds) * US, false) == Wait::Poll {
            rounds += 1;
        }
        assert!(rounds <= 6, "{rounds} rounds");
        // 10 ms later 1 ms is earned back.
        let later = now + Duration::from_millis(10);
        assert_eq!(p.after_round(later, true), Wait::Poll);
        assert_eq!(p.after_round(later + US, false), Wait::Poll);
    }

    #[test]
    fn a_preempted_round_costs_little() {
        let t = Instant::now();
        let mut p = Poller::new(Duration::from_millis(50), 10, t);
        assert_eq!(p.after_round(t, true), Wait::Poll);
        // 3 ms between two rounds is more than the credit, but it was not spent polling.
        assert_eq!(p.after_round(t + 3000 * US, false), Wait::Poll);
        assert_eq!(p.after_round(t + 3001 * US, false), Wait::Poll);
    }
}
