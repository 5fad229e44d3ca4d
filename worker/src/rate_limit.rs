//! Rate limits of a device's flows (blk: its requests; net: each direction): a token bucket
//! for bytes and one for operations, as the broker set them ([`protocol::Limit`]).
//!
//! A device asks [`Limiter::admit`] before it starts a request. When a bucket is short, the
//! request goes back to its ring and the queue waits: [`Limiter::until`] says when enough
//! tokens are back, the event loop sleeps until then (its epoll timeout) and processes the
//! queue again. Nothing spins and nothing is dropped: the guest's chains, or the frames in the
//! tap, wait where they are. Everything takes `now`, so the tests need no clock.
//!
//! A request larger than the burst cannot ever find that many tokens: it waits for a full
//! bucket and leaves it in debt, which later requests wait out. So over any time `t` a flow
//! moves at most `rate * t` plus the larger of the burst and one request.

use std::time::{Duration, Instant};

use protocol::{Bucket, Limit};

use crate::counters;

/// Tokens are kept in billionths, so refilling by the nanosecond loses nothing.
const NANO: i128 = 1_000_000_000;

/// One bucket: starts full, refills at `rate` a second up to `burst`, may run into debt.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    bucket: Bucket,
    /// In billionths of a token; negative while in debt.
    level: i128,
    last: Instant,
}

impl TokenBucket {
    pub fn new(bucket: Bucket, now: Instant) -> Self {
        TokenBucket {
            bucket,
            level: i128::from(bucket.burst) * NANO,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_nanos() as i128;
        self.last = self.last.max(now);
        let full = i128::from(self.bucket.burst) * NANO;
        self.level = self
            .level
            .saturating_add(dt.saturating_mul(i128::from(self.bucket.rate)))
            .min(full);
    }

    /// How long until `n` tokens may be taken (`None`: now). A take needs `n` tokens, or a
    /// full bucket when `n` is more than it holds; `n` = 0 asks only that it is not in debt.
    pub fn wait(&mut self, n: u64, now: Instant) -> Option<Duration> {
        self.refill(now);
        let need = i128::from(n.min(self.bucket.burst)) * NANO;
        if self.level >= need {
            return None;
        }
        let rate = i128::from(self.bucket.rate);
        let nanos = (need - self.level + rate - 1) / rate;
        Some(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }

    /// Takes `n` tokens, into debt if need be.
    pub fn take(&mut self, n: u64) {
        self.level -= i128::from(n) * NANO;
    }
}

/// The limit of one flow: its buckets, and whether (and until when) it waits.
#[derive(Debug, Default)]
pub struct Limiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// Set while the flow waits for tokens: when they are back.
    until: Option<Instant>,
}

impl Limiter {
    /// Applies `limit` from now on, with full buckets (`Limit::default()`: no limit).
    pub fn set(&mut self, limit: Limit, now: Instant) {
        self.bytes = limit.bytes.map(|b| TokenBucket::new(b, now));
        self.ops = limit.ops.map(|b| TokenBucket::new(b, now));
        self.until = None;
    }

    /// Whether a request of `ops` operations and `bytes` bytes may start now; if so, its
    /// tokens are taken. If not, the flow waits until [`until`](Self::until); the first
    /// refusal of a wait is counted for `status`. A caller that learns the size only once the
    /// request is done asks with 0 and 0 (the buckets must not be in debt) and then
    /// [`charge`](Self::charge)s it.
    pub fn admit(&mut self, ops: u64, bytes: u64, now: Instant) -> bool {
        let wait_ops = self.ops.as_mut().and_then(|b| b.wait(ops, now));
        let wait_bytes = self.bytes.as_mut().and_then(|b| b.wait(bytes, now));
        match wait_ops.max(wait_bytes) {
            None => {
                self.charge(ops, bytes);
                self.until = None;
                true
            }
            Some(wait) => {
                if self.until.is_none() {
                    counters::add(counters::THROTTLED, 1);
                    counters::add(counters::DELAYED_OPS, ops.max(1));
                    counters::add(counters::DELAYED_BYTES, bytes);
                }
                // A wait past any real run (a huge debt) still must not overflow.
                let year = Duration::from_secs(365 * 86_400);
                self.until = Some(now.checked_add(wait.min(year)).unwrap_or(now));
                false
            }
        }
    }

    /// Takes the tokens of a request already under way.
    pub fn charge(&mut self, ops: u64, bytes: u64) {
        if let Some(b) = &mut self.ops {
            b.take(ops);
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
    }

    /// The request that waited is gone (a reset, a stopped queue): stop waiting for it, and
    /// keep the buckets as they are.
    pub fn stop_waiting(&mut self) {
        self.until = None;
    }

    /// When the waiting flow may go on; `None` while it does not wait.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate: u64, burst: u64) -> Bucket {
        Bucket::new(rate, Some(burst)).unwrap()
    }

    #[test]
    fn a_full_bucket_gives_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(bucket(1000, 100), t0);
        assert_eq!(b.wait(100, t0), None);
        b.take(100);
        assert_eq!(b.wait(1, t0), Some(Duration::from_millis(1)));
        assert_eq!(b.wait(50, t0), Some(Duration::from_millis(50)));
        // Half the wait: half the tokens.
        let t1 = t0 + Duration::from_millis(25);
        assert_eq!(b.wait(50, t1), Some(Duration::from_millis(25)));
        assert_eq!(b.wait(25, t1), None);
        // Idle for long: no more than the burst.
        let t2 = t0 + Duration::from_secs(3600);
        assert_eq!(b.wait(100, t2), None);
        assert!(
            b.wait(101, t2).is_none(),
            "more than the burst waits for a full bucket"
        );
        b.take(101);
        assert_eq!(b.wait(0, t2), Some(Duration::from_millis(1)));
    }

    #[test]
    fn a_request_beyond_the_burst_waits_for_a_full_bucket_and_leaves_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(bucket(1_000_000, 100_000), t0);
        b.take(1);
        assert_eq!(b.wait(1 << 20, t0), Some(Duration::from_micros(1)));
        let t1 = t0 + Duration::from_micros(1);
        assert_eq!(b.wait(1 << 20, t1), None);
        b.take(1 << 20);
        // The debt is waited out before anything else goes.
        let debt = (1u64 << 20) - 100_000;
        assert_eq!(b.wait(0, t1), Some(Duration::from_micros(debt)));
    }

    #[test]
    fn rounding_never_gives_a_wait_of_zero() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(bucket(3, 1), t0);
        b.take(1);
        let w = b.wait(1, t0).unwrap();
        assert!(w >= Duration::from_nanos(333_333_333), "{w:?}");
        assert_eq!(b.wait(1, t0 + w), None);
    }

    #[test]
    fn the_extremes_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(bucket(Bucket::MAX, Bucket::MAX), t0);
        b.take(u64::MAX);
        b.take(u64::MAX);
        assert!(b.wait(u64::MAX, t0).is_some());
        let later = t0 + Duration::from_secs(1 << 40);
        assert_eq!(b.wait(Bucket::MAX, later), None);
        let mut slow = TokenBucket::new(bucket(1, 1), t0);
        slow.take(u64::MAX);
        assert!(slow.wait(1, t0).unwrap() > Duration::from_secs(1 << 32));
    }

    #[test]
    fn a_limiter_needs_both_buckets_and_takes_from_neither_when_one_is_short() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        assert!(l.admit(1, u64::MAX, t0), "no limit");
        l.set(
            Limit {
                bytes: Some(bucket(1000, 1000)),
                ops: Some(bucket(10, 2)),
            },
            t0,
        );
        assert!(l.admit(1, 400, t0));
        assert!(l.admit(1, 400, t0));
        // ops are out; bytes (200 left) are not taken
        assert!(!l.admit(1, 100, t0));
        assert_eq!(l.until(), Some(t0 + Duration::from_millis(100)));
        let t1 = t0 + Duration::from_millis(100);
        // 300 bytes by now: 400 are 100 ms away
        assert!(!l.admit(1, 400, t1));
        assert_eq!(l.until(), Some(t1 + Duration::from_millis(100)));
        assert!(l.admit(1, 300, t1));
        assert_eq!(l.until(), None);
        // Off again.
        l.set(Limit::default(), t1);
        assert!(l.admit(1000, 1 << 40, t1));
    }

    #[test]
    fn a_size_known_afterwards_is_charged_and_waited_out() {
        let t0 = Instant::now();
        let mut l = Limiter::default();
        l.set(
            Limit {
                bytes: Some(bucket(1000, 100)),
                ops: None,
            },
            t0,
        );
        assert!(l.admit(0, 0, t0));
        l.charge(1, 1100);
        assert!(!l.admit(0, 0, t0));
        assert_eq!(l.until(), Some(t0 + Duration::from_secs(1)));
        assert!(l.admit(0, 0, t0 + Duration::from_secs(1)));
    }

    /// Over a long run of requests, each let through as soon as it may go, what passed is
    /// at most rate * time plus the larger of the burst and one request.
    #[test]
    fn the_bound_holds_over_a_run() {
        for (rate, burst, size) in [(20 << 20, 1 << 20, 1 << 20), (20 << 20, 4096, 1 << 20)] {
            let t0 = Instant::now();
            let mut l = Limiter::default();
            l.set(
                Limit {
                    bytes: Some(bucket(rate, burst)),
                    ops: None,
                },
                t0,
            );
            let (mut now, mut passed) = (t0, 0u64);
            while now < t0 + Duration::from_secs(5) {
                if l.admit(1, size, now) {
                    passed += size;
                } else {
                    now = l.until().unwrap();
                }
            }
            let secs = (now - t0).as_secs_f64();
            let bound = rate as f64 * secs + burst.max(size) as f64;
            assert!(passed as f64 <= bound, "{passed} > {bound}");
            assert!(passed as f64 >= rate as f64 * secs - size as f64);
        }
    }
}
