//! The counters `hvisor-broker status` shows, in the in-flight record's counter words (layout:
//! `protocol::inflight::counter`): relaxed atomics in shared memory, so counting costs an add
//! and the broker reads them only when asked.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

pub use protocol::inflight::counter::*;

static COUNTERS: OnceLock<&'static [AtomicU64]> = OnceLock::new();

/// Counts into `words` from now on (once per process; without it, counting does nothing).
pub fn init(words: &'static [AtomicU64]) {
    let _ = COUNTERS.set(words);
}

fn word(index: usize) -> Option<&'static AtomicU64> {
    COUNTERS.get()?.get(index)
}

/// Adds `n` to counter `index`.
pub fn add(index: usize, n: u64) {
    if let Some(w) = word(index) {
        w.fetch_add(n, Relaxed);
    }
}

/// Raises counter `index` to `n` if it is lower.
pub fn raise(index: usize, n: u64) {
    if let Some(w) = word(index) {
        if w.load(Relaxed) < n {
            w.fetch_max(n, Relaxed);
        }
    }
}
