//! The I/O threads of a blk worker: requests run on them in parallel, so a slow disk serves as
//! many at once as the guest keeps in flight. Only the event loop's thread touches the rings:
//! it parses each chain, submits the request here, and publishes what [`Pool::take_finished`]
//! returns, in the order the requests finished (used entries may be out of order).
//!
//! A FLUSH starts only once every write (OUT, DISCARD, WRITE_ZEROES) submitted before it has
//! finished, so its `fdatasync` covers them; other requests do not wait for each other.
//!
//! The threads are started once, before the seccomp filter (which lets no thread start), and
//! live as long as the process. Until then (in unit tests) requests run on the caller's thread.

use std::collections::{BTreeSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use log::warn;
use nix::sys::eventfd::{EfdFlags, EventFd};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::GuestMemoryMmap;

use crate::blk::Disk;
use crate::request::Request;

/// I/O threads per device: enough for the requests a guest keeps in flight on a typical
/// queue (16 with virtio-drivers; Linux keeps more, which then wait here for a thread).
pub const THREADS: usize = 16;
/// Each thread's stack: the I/O calls keep their buffers on the heap.
const STACK_SIZE: usize = 128 * 1024;

/// A request that has been served: the used element to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub queue: usize,
    pub head: u16,
    pub len: u32,
}

struct Job {
    seq: u64,
    queue: usize,
    head: u16,
    req: Request,
}

impl Job {
    fn is_write(&self) -> bool {
        matches!(
            self.req.kind,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        )
    }

    fn is_flush(&self) -> bool {
        self.req.kind == VIRTIO_BLK_T_FLUSH
    }
}

#[derive(Default)]
struct State {
    /// Submitted and not started, in submission order.
    waiting: VecDeque<Job>,
    /// Sequence numbers of the writes submitted and not finished, which later FLUSHes wait for.
    writes: BTreeSet<u64>,
    /// The queue of each request being served now.
    running: Vec<usize>,
    finished: Vec<Finished>,
    next_seq: u64,
    /// Threads waiting for work.
    sleepers: usize,
    /// The event loop waits for running requests to finish (a reset).
    draining: bool,
}

impl State {
    /// The oldest job that may start: anything but a FLUSH with an earlier write unfinished.
    fn next_runnable(&mut self) -> Option<Job> {
        let oldest_write = self.writes.first().copied();
        let i = self
            .waiting
            .iter()
            .position(|j| !j.is_flush() || oldest_write.is_none_or(|w| w > j.seq))?;
        self.waiting.remove(i)
    }

    /// Records a served job; returns whether the event loop must be woken (nothing was waiting
    /// to be published, so no wake-up is pending).
    fn finish(&mut self, job: &Job, len: u32) -> bool {
        if job.is_write() {
            self.writes.remove(&job.seq);
        }
        if let Some(i) = self.running.iter().position(|&q| q == job.queue) {
            self.running.swap_remove(i);
        }
        self.finished.push(Finished {
            queue: job.queue,
            head: job.head,
            len,
        });
        self.finished.len() == 1
    }
}

struct Shared {
    state: Mutex<State>,
    /// A job was submitted or may have become runnable.
    work: Condvar,
    /// A job finished while the event loop was draining.
    idle: Condvar,
    /// Written when the first of a batch of finished requests is ready to publish.
    done: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic ends the whole worker (see the worker's panic hook), so no thread ever sees
        // a poisoned lock in use; take it regardless rather than panic again.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_event_loop(&self) {
        // EAGAIN: the counter is saturated, so the event loop is woken anyway.
        let _ = self.done.write(1);
    }
}

pub struct Pool {
    shared: Arc<Shared>,
    disk: Arc<Disk>,
    threads: usize,
}

impl Pool {
    /// Creates the pool's eventfd (the sandbox allows creating none later); no threads yet.
    pub fn new(disk: Arc<Disk>) -> Result<Self, String> {
        let done = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| format!("eventfd: {e}"))?;
        Ok(Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                idle: Condvar::new(),
                done,
            }),
            disk,
            threads: 0,
        })
    }

    /// Starts up to `n` I/O threads on `mem`, and returns once each runs (its startup calls
    /// made: the seccomp filter that follows would refuse some of them). A task limit (the
    /// broker's cgroup `pids.max`) may allow fewer: the pool then makes do with those, and with
    /// none serves requests on the event loop's thread, one at a time.
    pub fn spawn(&mut self, n: usize, mem: &GuestMemoryMmap) {
        let (started, running) = std::sync::mpsc::channel();
        for i in 0..n {
            let (shared, disk, mem) = (self.shared.clone(), self.disk.clone(), mem.clone());
            let started = started.clone();
            let spawned = std::thread::Builder::new()
                .stack_size(STACK_SIZE)
                .spawn(move || {
                    let _ = started.send(());
                    drop(started);
                    serve(&shared, &disk, &mem);
                });
            if let Err(e) = spawned {
                warn!("{i} of {n} I/O threads started ({e}): fewer requests run at once");
                break;
            }
            self.threads += 1;
        }
        drop(started);
        // Ends when every started thread has dropped its sender.
        for _ in running {}
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The fd that becomes readable when requests have finished.
    pub fn done_fd(&self) -> BorrowedFd<'_> {
        self.shared.done.as_fd()
    }

    /// Clears the wake-up; returns the queues with finished requests, as a bit mask.
    pub fn acknowledge(&self) -> u64 {
        let _ = self.shared.done.read();
        let state = self.shared.lock();
        state
            .finished
            .iter()
            .fold(0, |mask, f| mask | 1u64 << f.queue.min(63))
    }

    /// Hands requests of `queue` to the threads (with none, serves them here and now).
    pub fn submit(
        &self,
        queue: usize,
        reqs: impl IntoIterator<Item = (u16, Request)>,
        mem: &GuestMemoryMmap,
    ) {
        let mut state = self.shared.lock();
        let mut added = 0;
        for (head, req) in reqs {
            let job = Job {
                seq: state.next_seq,
                queue,
                head,
                req,
            };
            state.next_seq += 1;
            if self.threads == 0 {
                let len = self.disk.serve(&job.req, mem);
                state.finish(&job, len);
                continue;
            }
            if job.is_write() {
                state.writes.insert(job.seq);
            }
            state.waiting.push_back(job);
            added += 1;
        }
        let wake = added.min(state.sleepers);
        drop(state);
        for _ in 0..wake {
            self.shared.work.notify_one();
        }
    }

    /// Removes and returns the finished requests of `queue`, oldest first.
    pub fn take_finished(&self, queue: usize) -> Vec<Finished> {
        let mut state = self.shared.lock();
        if state.finished.iter().all(|f| f.queue == queue) {
            return std::mem::take(&mut state.finished);
        }
        let (mine, others) = state.finished.iter().partition(|f| f.queue == queue);
        state.finished = others;
        mine
    }

    /// Forgets the requests of the queues `which` selects: those not started are dropped,
    /// those running are waited for (so nothing touches guest memory for them afterwards),
    /// and none of them is published.
    pub fn cancel(&self, which: impl Fn(usize) -> bool) {
        let mut state = self.shared.lock();
        let State {
            waiting, writes, ..
        } = &mut *state;
        waiting.retain(|j| {
            let keep = !which(j.queue);
            if !keep {
                writes.remove(&j.seq);
            }
            keep
        });
        state.draining = true;
        while state.running.iter().any(|&q| which(q)) {
            state = self
                .shared
                .idle
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.draining = false;
        state.finished.retain(|f| !which(f.queue));
        // Dropped writes may have held back a FLUSH of another queue.
        if !state.waiting.is_empty() {
            self.shared.work.notify_all();
        }
    }
}

/// An I/O thread: serves runnable jobs, oldest first, for the life of the process.
fn serve(shared: &Shared, disk: &Disk, mem: &GuestMemoryMmap) {
    let mut state = shared.lock();
    loop {
        let Some(job) = state.next_runnable() else {
            state.sleepers += 1;
            state = shared
                .work
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.sleepers -= 1;
            continue;
        };
        state.running.push(job.queue);
        drop(state);
        let len = disk.serve(&job.req, mem);
        state = shared.lock();
        let first = state.finish(&job, len);
        if state.draining {
            shared.idle.notify_all();
        }
        // A finished write may let a FLUSH start; this thread takes one job, another the rest.
        if job.is_write() && state.sleepers > 0 && !state.waiting.is_empty() {
            shared.work.notify_one();
        }
        if first {
            drop(state);
            shared.wake_event_loop();
            state = shared.lock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Data;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
    use vm_memory::GuestAddress;

    fn job(state: &mut State, kind: u32) {
        let job = Job {
            seq: state.next_seq,
            queue: 0,
            head: state.next_seq as u16,
            req: Request {
                kind,
                sector: 0,
                readable: Data::default(),
                writable: Data::default(),
                status: GuestAddress(0),
            },
        };
        state.next_seq += 1;
        if job.is_write() {
            state.writes.insert(job.seq);
        }
        state.waiting.push_back(job);
    }

    fn heads(jobs: &[Job]) -> Vec<u16> {
        jobs.iter().map(|j| j.head).collect()
    }

    #[test]
    fn a_flush_waits_for_the_writes_before_it_and_nothing_else() {
        let mut s = State::default();
        for kind in [
            VIRTIO_BLK_T_OUT,          // 0
            VIRTIO_BLK_T_DISCARD,      // 1
            VIRTIO_BLK_T_FLUSH,        // 2: after 0 and 1
            VIRTIO_BLK_T_IN,           // 3
            VIRTIO_BLK_T_OUT,          // 4
            VIRTIO_BLK_T_FLUSH,        // 5: after 0, 1 and 4
            VIRTIO_BLK_T_WRITE_ZEROES, // 6
        ] {
            job(&mut s, kind);
        }
        // everything but the flushes may start at once
        let mut started = Vec::new();
        while let Some(j) = s.next_runnable() {
            started.push(j);
        }
        assert_eq!(heads(&started), [0, 1, 3, 4, 6]);
        // the write after the first flush does not hold it back
        s.finish(&started[0], 1);
        s.finish(&started[4], 1);
        assert!(s.next_runnable().is_none());
        s.finish(&started[1], 1);
        let first = s.next_runnable().unwrap();
        assert_eq!(first.head, 2);
        assert!(s.next_runnable().is_none());
        s.finish(&started[3], 1);
        s.finish(&first, 1);
        s.finish(&started[2], 1);
        assert_eq!(s.next_runnable().unwrap().head, 5);
        assert!(s.writes.is_empty());
    }

    #[test]
    fn the_event_loop_is_woken_once_per_batch() {
        let mut s = State::default();
        job(&mut s, VIRTIO_BLK_T_IN);
        job(&mut s, VIRTIO_BLK_T_IN);
        let (a, b) = (s.next_runnable().unwrap(), s.next_runnable().unwrap());
        assert!(s.finish(&b, 1));
        assert!(!s.finish(&a, 1));
        // in order of finishing
        let got: Vec<u16> = s.finished.iter().map(|f| f.head).collect();
        assert_eq!(got, [1, 0]);
    }
}
