//! The in-flight record: what a worker must leave behind for the worker that replaces it.
//!
//! The broker creates one per device (a sealed memfd of [`bytes`] bytes, all zero) and hands
//! the same one to every worker of that device; it never reads the queues' part, since a worker
//! wrote it, and reads the counters only for `hvisor-broker status`.
//! The next worker checks it against the rings like any guest data. The idea is vhost-user's
//! "inflight I/O tracking" for split rings: per queue, the used index the worker has published
//! and, per descriptor head, whether it is taken and not yet completed (and where in the
//! available ring it was taken), written in an order that a death at any instruction leaves
//! recoverable (see `worker::inflight`). The next available index is not stored: it is the
//! published used index plus the heads in flight, which no death can make disagree.
//!
//! Layout, in native-endian u64 words (broker and workers run on the same machine):
//! - header: [`MAGIC`], the activation epoch the record belongs to, and the host stream
//!   totals of queues 0 and 1 ([`STREAM_TOTALS`]): the bytes every worker before this one
//!   took from (queue 0) or gave to (queue 1) the broker's pipes of a console, counted by the
//!   broker and written here before it starts each worker;
//! - per queue, [`QUEUE_WORDS`] words: the published used index, the head being published,
//!   the chain being streamed ([`TAKEN`] | its available ring position << 16 | its head) and
//!   where in the queue's host stream its first byte is, then per head `i < MAX_QUEUE_SIZE`
//!   two words: its state ([`TAKEN`] | its available ring position, or 0) and its progress
//!   ([`PROGRESS`] | position << 32 | bytes, or 0): the bytes a console or net chain got, or
//!   sent, before its used entry was published;
//! - after the queues, [`COUNTER_WORDS`] words of counters the worker keeps for
//!   `hvisor-broker status` (indices in [`counter`]): never emptied, so they add up over the
//!   device's workers. The broker reads them on a status request only, as worker-reported.

/// "hvinflt1": a record written by this layout.
pub const MAGIC: u64 = u64::from_le_bytes(*b"hvinflt1");
/// The largest queue a record has room for; every device model's maximum fits.
pub const MAX_QUEUE_SIZE: usize = 1024;
pub const HEADER_WORDS: usize = 4;
/// The word index of queue 0's host stream total; queue 1's follows.
pub const STREAM_TOTALS: usize = 2;
pub const QUEUE_HEADER_WORDS: usize = 4;
pub const QUEUE_WORDS: usize = QUEUE_HEADER_WORDS + 2 * MAX_QUEUE_SIZE;
/// The state word of a taken head: this bit, and its available ring position.
pub const TAKEN: u64 = 1 << 63;
/// The progress word of a head with progress: this bit, position << 32, bytes.
pub const PROGRESS: u64 = 1 << 63;

/// The worker's counters: word indices from [`counters_offset`].
pub mod counter {
    /// Chains completed.
    pub const REQUESTS: usize = 0;
    /// Bytes read for the guest from the device's host side (image, tap or pty).
    pub const BYTES_READ: usize = 1;
    /// Bytes written from the guest to the device's host side.
    pub const BYTES_WRITTEN: usize = 2;
    /// Requests answered with an error (net: frames the tap refused), chains the ring refused.
    pub const ERRORS: usize = 3;
    /// The most chains taken and not yet completed on one queue at once.
    pub const QUEUE_HIGH_WATER: usize = 4;
    /// Times a rate limit held a queue back (each wait counted once).
    pub const THROTTLED: usize = 5;
    /// The requests (frames) and bytes that had to wait for a rate limit.
    pub const DELAYED_OPS: usize = 6;
    pub const DELAYED_BYTES: usize = 7;
}
pub const COUNTER_WORDS: usize = 8;

/// Words of the queue part of a record for `num_queues` queues.
pub fn words(num_queues: usize) -> usize {
    HEADER_WORDS + num_queues * QUEUE_WORDS
}

/// Where the counters start, in words.
pub fn counters_offset(num_queues: usize) -> usize {
    words(num_queues)
}

/// Bytes of a record for `num_queues` queues, counters included.
pub fn bytes(num_queues: usize) -> usize {
    (words(num_queues) + COUNTER_WORDS) * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes(1), (4 + 4 + 2048 + COUNTER_WORDS) * 8);
        assert_eq!(words(2), 4 + 2 * QUEUE_WORDS);
    }
}
