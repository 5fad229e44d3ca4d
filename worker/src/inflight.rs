//! Chains taken and not yet completed, kept in the broker's in-flight record (layout:
//! `protocol::inflight`), so that the worker replacing a dead one completes each exactly once.
//!
//! Devices see a [`TrackedQueue`]: they take chains with [`TrackedQueue::pop`] and complete
//! them with [`TrackedQueue::publish`], in any order and with any number in flight. The order
//! of the writes is that of vhost-user's inflight tracking for split rings:
//! - take: the ring position moves on (in this process only), then the head is marked taken
//!   with that position. A death in between leaves the head unmarked, and the next worker
//!   starts at "published + taken", which is that very position: it takes it again.
//! - publish: the head is noted as the one being published, the used entry and used index are
//!   written to the guest's ring, then the head is cleared and the published index recorded.
//!   A death after the ring write and before the record is seen as a used index that differs
//!   from the record's: the noted head was completed.
//!
//! The next worker ([`resume`]) trusts none of it beyond the guest's own rings: heads must lie
//! inside the queue, at most a queue's worth may be taken, and a taken head is taken again by
//! its number (the guest may since have reused its available ring slot), through a private
//! one-entry available ring ([`Recovery`]) that only descriptor lookups can see.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use log::{debug, warn};
use nix::sys::mman::{mmap, MapFlags, ProtFlags};
use protocol::inflight::{self as layout, MAX_QUEUE_SIZE, PROGRESS, TAKEN};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::counters;

/// The whole record: the broker's, mapped for the life of the process; or, for tests, in
/// this process's memory.
pub enum Record {
    Mapped(&'static [AtomicU64]),
    Owned(Box<[AtomicU64]>),
}

impl Record {
    /// Maps the broker's record for `num_queues` queues (before the sandbox: it is a file
    /// mapping). The memfd is sealed against shrinking, so the mapping stays valid.
    pub fn map(fd: BorrowedFd<'_>, num_queues: usize) -> Result<Record, String> {
        let len = layout::bytes(num_queues);
        let st = nix::sys::stat::fstat(fd).map_err(|e| format!("in-flight record: {e}"))?;
        if u64::try_from(st.st_size).unwrap_or(0) < len as u64 {
            return Err(format!(
                "in-flight record of {} bytes, {len} needed",
                st.st_size
            ));
        }
        let size = NonZeroUsize::new(len).ok_or("empty in-flight record")?;
        // SAFETY: a new shared mapping of a sealed memfd, never unmapped; nothing else in this
        // process aliases it. Its words are only accessed as atomics.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| format!("mapping the in-flight record: {e}"))?;
        // SAFETY: the mapping is page-aligned, `len` bytes long and lives as long as the process.
        let all = unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<AtomicU64>(), len / 8) };
        let (words, counters) = all.split_at(layout::counters_offset(num_queues));
        counters::init(counters);
        Ok(Record::Mapped(words))
    }

    /// A record in this process's memory, for tests.
    pub fn in_memory(num_queues: usize) -> Record {
        let words: Box<[AtomicU64]> = (0..layout::words(num_queues))
            .map(|_| AtomicU64::new(0))
            .collect();
        Record::Owned(words)
    }

    fn words(&self) -> &[AtomicU64] {
        match self {
            Record::Mapped(w) => w,
            Record::Owned(w) => w,
        }
    }

    /// Makes this the record of activation `epoch`; true if it already was (a worker of this
    /// activation died: resume from it), false if it was emptied for a new one.
    pub fn begin(&self, epoch: u64) -> bool {
        let words = self.words();
        if words[0].load(SeqCst) == layout::MAGIC && words[1].load(SeqCst) == epoch {
            return true;
        }
        // The epoch last: a death while emptying leaves a record that is emptied again.
        words[1].store(0, SeqCst);
        for w in &words[layout::HEADER_WORDS..] {
            w.store(0, SeqCst);
        }
        words[0].store(layout::MAGIC, SeqCst);
        words[1].store(epoch, SeqCst);
        false
    }

    pub fn queue(&self, index: usize) -> Option<QueueRecord<'_>> {
        let start = layout::HEADER_WORDS + index * layout::QUEUE_WORDS;
        let words = self.words().get(start..start + layout::QUEUE_WORDS)?;
        let total = (index < 2).then(|| &self.words()[layout::STREAM_TOTALS + index]);
        Some(QueueRecord { words, total })
    }

    /// Sets the host stream totals of queues 0 and 1, as the broker does before a worker starts.
    pub fn set_stream_totals(&self, totals: [u64; 2]) {
        for (i, t) in totals.into_iter().enumerate() {
            self.words()[layout::STREAM_TOTALS + i].store(t, SeqCst);
        }
    }
}

/// One queue's part of the record.
#[derive(Clone, Copy)]
pub struct QueueRecord<'r> {
    words: &'r [AtomicU64],
    /// The broker's count of this queue's host stream, for queues 0 and 1.
    total: Option<&'r AtomicU64>,
}

impl QueueRecord<'_> {
    const USED: usize = 0;
    const LAST: usize = 1;
    /// The chain being streamed: TAKEN | position << 16 | head.
    const STREAMING: usize = 2;
    /// Where that chain starts in the queue's host stream.
    const STREAM_START: usize = 3;

    fn state(&self, head: u16) -> &AtomicU64 {
        &self.words[layout::QUEUE_HEADER_WORDS + 2 * (usize::from(head) % MAX_QUEUE_SIZE)]
    }

    fn progress_word(&self, head: u16) -> &AtomicU64 {
        &self.words[layout::QUEUE_HEADER_WORDS + 2 * (usize::from(head) % MAX_QUEUE_SIZE) + 1]
    }

    fn used_idx(&self) -> u16 {
        self.words[Self::USED].load(SeqCst) as u16
    }

    /// The available ring position `head` was taken at, if it is taken.
    pub fn position(&self, head: u16) -> Option<u16> {
        let s = self.state(head).load(SeqCst);
        (s & TAKEN != 0).then_some(s as u16)
    }

    fn take(&self, head: u16, pos: u16) {
        self.state(head).store(TAKEN | u64::from(pos), SeqCst);
    }

    fn clear(&self, head: u16) {
        self.state(head).store(0, SeqCst);
        self.progress_word(head).store(0, SeqCst);
    }
}

/// A page of this process's memory placed just above guest memory, holding a one-entry
/// available ring, so a chain can be taken again by its head number.
pub struct Recovery {
    mem: GuestMemoryMmap,
    ring: GuestAddress,
}

impl Recovery {
    const PAGE: usize = 4096;

    /// Built before the sandbox (it maps memory). `None` where guest memory ends too high.
    pub fn new(mem: &GuestMemoryMmap) -> Option<Recovery> {
        let top = mem.iter().map(|r| r.last_addr().0).max()?;
        let ring = top
            .checked_add(1)?
            .checked_next_multiple_of(Self::PAGE as u64)?;
        ring.checked_add(Self::PAGE as u64)?;
        let page = GuestRegionMmap::from_range(GuestAddress(ring), Self::PAGE, None).ok()?;
        let mem = mem.insert_region(Arc::new(page)).ok()?;
        Some(Recovery {
            mem,
            ring: GuestAddress(ring),
        })
    }

    /// The chain at `head` of `queue`, read through the private ring.
    fn chain(&self, queue: &Queue, head: u16) -> Option<DescriptorChain<&GuestMemoryMmap>> {
        let mut q = Queue::new(queue.size()).ok()?;
        q.try_set_desc_table_address(GuestAddress(queue.desc_table()))
            .ok()?;
        q.try_set_avail_ring_address(self.ring).ok()?;
        q.try_set_used_ring_address(GuestAddress(self.ring.0 + 64))
            .ok()?;
        q.set_ready(true);
        // flags 0, idx 1, ring[0] = head
        let entry: [u16; 3] = [0, 1, head];
        self.mem.write_obj(entry, self.ring).ok()?;
        q.pop_descriptor_chain(&self.mem)
    }
}

/// A queue whose chains are recorded as they are taken and completed.
pub struct TrackedQueue<'m> {
    queue: &'m mut Queue,
    record: QueueRecord<'m>,
    /// Heads a dead worker had taken, oldest first: taken again before any new chain.
    again: &'m mut VecDeque<u16>,
    recovery: Option<&'m Recovery>,
    /// The head and available ring position of the chain [`pop`](Self::pop) returned last.
    popped: Option<(u16, u16)>,
}

impl<'m> TrackedQueue<'m> {
    pub fn new(
        queue: &'m mut Queue,
        record: QueueRecord<'m>,
        again: &'m mut VecDeque<u16>,
        recovery: Option<&'m Recovery>,
    ) -> Self {
        TrackedQueue {
            queue,
            record,
            again,
            recovery,
            popped: None,
        }
    }

    /// The next chain to serve: one a dead worker had taken, else the next available one.
    pub fn pop(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        while let Some(head) = self.again.pop_front() {
            if let Some(chain) = self.recovery.and_then(|r| r.chain(self.queue, head)) {
                self.popped = self.record.position(head).map(|pos| (head, pos));
                return Some(chain);
            }
            warn!("chain {head}, taken before a restart, cannot be read again; returned empty");
            self.publish(mem, head, 0);
        }
        let chain = loop {
            let chain = self.queue.pop_descriptor_chain(mem)?;
            if chain.head_index() < self.queue.size() {
                break chain;
            }
            // A head beyond the queue names no descriptor, and the used ring cannot take it:
            // the guest's mistake costs it that ring entry, and nothing is recorded for it.
            debug!(
                "available ring entry {} is no head: skipped",
                chain.head_index()
            );
            counters::add(counters::ERRORS, 1);
        };
        let pos = self.queue.next_avail().wrapping_sub(1);
        self.record.take(chain.head_index(), pos);
        self.popped = Some((chain.head_index(), pos));
        let depth = pos.wrapping_sub(self.queue.next_used()).wrapping_add(1);
        counters::raise(counters::QUEUE_HIGH_WATER, depth.into());
        Some(chain)
    }

    /// Gives back the chain `head`, the last one taken and not completed: it is served again
    /// later, from the byte its progress says.
    pub fn put_back(&mut self, head: u16) {
        match self.record.position(head) {
            Some(pos) if pos == self.queue.next_avail().wrapping_sub(1) => {
                self.record.state(head).store(0, SeqCst);
                self.queue.go_to_previous_position();
            }
            // Taken again after a restart: it stays taken, at the front.
            Some(_) => self.again.push_front(head),
            None => {}
        }
    }

    /// Completes `head` with `len` bytes written to the guest; false if the ring refused it.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
        self.record.words[QueueRecord::LAST].store(u64::from(head), SeqCst);
        if let Err(e) = self.queue.add_used(mem, head, len) {
            warn!("completing chain {head}: {e}");
            counters::add(counters::ERRORS, 1);
            return false;
        }
        counters::add(counters::REQUESTS, 1);
        self.record.clear(head);
        let used = u64::from(self.queue.next_used());
        self.record.words[QueueRecord::USED].store(used, SeqCst);
        true
    }

    /// The bytes recorded for `head` since it was last taken from the ring.
    pub fn progress(&self, head: u16) -> u32 {
        let Some(pos) = self.record.position(head) else {
            return 0;
        };
        let p = self.record.progress_word(head).load(SeqCst);
        if p & PROGRESS != 0 && (p >> 32) as u16 == pos {
            p as u32
        } else {
            0
        }
    }

    /// Records that `head` got (or sent) `bytes` so far; kept across [`put_back`](Self::put_back).
    pub fn set_progress(&mut self, head: u16, bytes: u32) {
        if let Some(pos) = self.record.position(head) {
            let word = PROGRESS | (u64::from(pos) << 32) | u64::from(bytes);
            self.record.progress_word(head).store(word, SeqCst);
        }
    }

    /// How many bytes of this queue's host stream the workers before this one moved, as the
    /// broker counted them (0 where it counts none).
    pub fn stream_total(&self) -> u64 {
        self.record.total.map_or(0, |t| t.load(SeqCst))
    }

    /// Where in the queue's host stream chain `head`, the one popped last, starts, if this
    /// worker or a dead one noted it with [`set_stream_start`](Self::set_stream_start).
    pub fn stream_start(&self, head: u16) -> Option<u64> {
        let tag = self.stream_tag(head)?;
        (self.record.words[QueueRecord::STREAMING].load(SeqCst) == tag)
            .then(|| self.record.words[QueueRecord::STREAM_START].load(SeqCst))
    }

    /// Notes that chain `head`, the one popped last, starts at byte `at` of the queue's host
    /// stream; done before any of its bytes move, one chain at a time per queue.
    pub fn set_stream_start(&mut self, head: u16, at: u64) {
        if let Some(tag) = self.stream_tag(head) {
            // The start first: a death in between leaves the tag of an earlier chain.
            self.record.words[QueueRecord::STREAM_START].store(at, SeqCst);
            self.record.words[QueueRecord::STREAMING].store(tag, SeqCst);
        }
    }

    fn stream_tag(&self, head: u16) -> Option<u64> {
        let (h, pos) = self.popped.filter(|&(h, _)| h == head)?;
        Some(TAKEN | u64::from(pos) << 16 | u64::from(h))
    }

    /// Whether the next [`pop`](Self::pop) serves a chain a dead worker had taken.
    pub fn resuming(&self) -> bool {
        !self.again.is_empty()
    }

    pub fn size(&self) -> u16 {
        self.queue.size()
    }

    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool, String> {
        self.queue
            .enable_notification(mem)
            .map_err(|e| e.to_string())
    }

    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        self.queue
            .disable_notification(mem)
            .map_err(|e| e.to_string())
    }
}

/// Sets up `queue` (new, at index 0) to go on where a dead worker of the same activation
/// stopped, from `record` checked against the guest's rings; returns the heads it had taken,
/// oldest first, to be served again.
pub fn resume(queue: &mut Queue, record: QueueRecord<'_>, mem: &GuestMemoryMmap) -> VecDeque<u16> {
    let used = match queue.used_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(u) => u.0,
        Err(e) => {
            warn!("resuming: the used ring cannot be read ({e}); starting afresh");
            return VecDeque::new();
        }
    };
    if record.used_idx() != used {
        // It died after publishing the head it noted and before recording that.
        let last = record.words[QueueRecord::LAST].load(SeqCst) as u16;
        record.clear(last);
        record.words[QueueRecord::USED].store(u64::from(used), SeqCst);
    }
    let size = queue.size();
    // A head the queue cannot have is no chain: a worker wrote nonsense.
    for head in size..MAX_QUEUE_SIZE as u16 {
        if record.position(head).is_some() {
            record.clear(head);
        }
    }
    let mut taken: Vec<(u16, u16)> = (0..size)
        .filter_map(|h| record.position(h).map(|pos| (pos, h)))
        .collect();
    let next_avail = used.wrapping_add(taken.len() as u16);
    // Oldest first: every position lies in the queue's worth before `next_avail`.
    taken.sort_by_key(|&(pos, _)| pos.wrapping_sub(next_avail));
    queue.set_next_used(used);
    queue.set_next_avail(next_avail);
    taken.into_iter().map(|(_, h)| h).collect()
}

#[cfg(test)]
mod tests;
