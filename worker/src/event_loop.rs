//! The worker's single-threaded loop: broker messages on the socket, guest kicks on eventfds.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use protocol::{BrokerMsg, Channel, ChannelError, QueueConfig, WorkerMsg};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::inflight::{self, Record, Recovery, TrackedQueue};
use crate::{Device, Interest};

/// The epoll token of the broker socket; kick `i` uses `i`, host fd `j` uses `HOST + j`.
const SOCKET: u64 = u64::MAX;
const HOST: u64 = 1 << 32;

pub(crate) struct EventLoop {
    chan: Arc<Channel>,
    epoll: Epoll,
    mem: GuestMemoryMmap,
    kicks: Vec<OwnedFd>,
    calls: Vec<OwnedFd>,
    /// `None` until activated, and for a queue the driver set up wrongly.
    queues: Vec<Option<Active>>,
    /// What a dead predecessor left, and where this worker leaves the same.
    record: Record,
    recovery: Option<Recovery>,
    device: Box<dyn Device>,
    /// The interest each host fd is registered with now; `None` once it hung up and was
    /// removed (a hung-up fd is reported whatever the interest, so it would spin the loop).
    host_interest: Vec<Option<Interest>>,
}

impl EventLoop {
    /// Registers every fd up front, so the loop itself needs no `epoll_ctl`.
    pub(crate) fn new(
        chan: Arc<Channel>,
        mem: GuestMemoryMmap,
        kicks: Vec<OwnedFd>,
        calls: Vec<OwnedFd>,
        record: Record,
        device: Box<dyn Device>,
    ) -> Result<Self, Errno> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(chan.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, SOCKET))?;
        for (i, kick) in kicks.iter().enumerate() {
            epoll.add(kick, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
        }
        let queues = kicks.iter().map(|_| None).collect();
        let host = device.host_fds();
        for (j, fd) in host.iter().enumerate() {
            epoll.add(fd, EpollEvent::new(EpollFlags::empty(), HOST + j as u64))?;
        }
        let host_interest = vec![Some(Interest::NONE); host.len()];
        drop(host);
        let recovery = Recovery::new(&mem);
        let mut event_loop = EventLoop {
            chan,
            epoll,
            record,
            recovery,
            mem,
            kicks,
            calls,
            queues,
            device,
            host_interest,
        };
        event_loop.update_interest()?;
        Ok(event_loop)
    }

    /// Starts the device's threads (see [`Device::spawn_threads`]).
    pub(crate) fn spawn_threads(&mut self) -> Result<(), String> {
        self.device.spawn_threads(&self.mem)
    }

    /// Re-registers the host fds whose wanted events changed (one `epoll_ctl` each).
    fn update_interest(&mut self) -> Result<(), Errno> {
        for j in 0..self.host_interest.len() {
            let want = self.device.host_interest(j);
            if self.host_interest[j].is_none_or(|now| now == want) {
                continue;
            }
            let mut flags = EpollFlags::empty();
            if want.read {
                flags |= EpollFlags::EPOLLIN;
            }
            if want.write {
                flags |= EpollFlags::EPOLLOUT;
            }
            let fds = self.device.host_fds();
            let mut event = EpollEvent::new(flags, HOST + j as u64);
            self.epoll.modify(fds[j], &mut event)?;
            self.host_interest[j] = Some(want);
        }
        Ok(())
    }

    /// Runs until the broker says Shutdown or goes away (success), or sends something malformed.
    pub(crate) fn run(mut self) -> ExitCode {
        let mut events = [EpollEvent::empty(); 16];
        loop {
            let n = match self.epoll.wait(&mut events, self.timeout(Instant::now())) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return self.fail(format!("epoll: {e}")),
            };
            let ready = &events[..n];
            // Messages first: a Reset or Activate sent before a kick must be seen before it.
            if ready.iter().any(|e| e.data() == SOCKET) {
                if let Some(code) = self.on_message() {
                    return code;
                }
            }
            for event in ready.iter().filter(|e| e.data() != SOCKET) {
                if event.data() >= HOST {
                    self.on_host(event);
                } else {
                    self.on_kick(event.data() as usize);
                }
            }
            self.release_throttled(Instant::now());
            if let Err(e) = self.update_interest() {
                return self.fail(format!("epoll: {e}"));
            }
        }
    }

    /// When the first queue waiting for its rate limit may go on, as an epoll timeout (whole
    /// milliseconds, rounded up and at least one, so a wait never comes back early and spins).
    fn timeout(&self, now: Instant) -> EpollTimeout {
        let Some(at) = (0..self.queues.len())
            .filter_map(|i| self.device.throttled_until(i))
            .min()
        else {
            return EpollTimeout::NONE;
        };
        let wait = at.saturating_duration_since(now);
        let ms = wait.as_millis() + u128::from(wait.subsec_nanos() % 1_000_000 != 0);
        let ms = u16::try_from(ms.max(1)).unwrap_or(u16::MAX);
        EpollTimeout::from(ms)
    }

    /// Processes every queue whose rate-limit wait is over.
    fn release_throttled(&mut self, now: Instant) {
        for i in 0..self.queues.len() {
            if self.device.throttled_until(i).is_some_and(|at| at <= now) {
                self.process(i);
            }
        }
    }

    fn on_host(&mut self, event: &EpollEvent) {
        let j = (event.data() - HOST) as usize;
        let ev = event.events();
        // A hang-up or error is reported whatever the interest: let the device read it.
        let gone = ev.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR);
        let readable = ev.contains(EpollFlags::EPOLLIN) || gone;
        let writable = ev.contains(EpollFlags::EPOLLOUT);
        let queues = self.device.host_ready(j, readable, writable);
        if gone && self.host_interest.get(j).is_some_and(Option::is_some) {
            warn!("host fd {j} hung up; no longer watched");
            let fds = self.device.host_fds();
            if let Some(fd) = fds.get(j) {
                let _ = self.epoll.delete(fd);
            }
            self.host_interest[j] = None;
        }
        for q in 0..self.queues.len().min(64) {
            if queues & (1 << q) != 0 {
                self.process(q);
            }
        }
    }

    fn on_message(&mut self) -> Option<ExitCode> {
        let msg = match self.chan.recv::<BrokerMsg>(None) {
            Ok((msg, _)) => msg,
            Err(ChannelError::Eof) => {
                debug!("broker closed the socket");
                return Some(ExitCode::SUCCESS);
            }
            Err(e) => return Some(self.fail(format!("message from the broker: {e}"))),
        };
        match msg {
            BrokerMsg::Activate {
                features,
                queues,
                epoch,
            } => self.activate(features, &queues, epoch),
            BrokerMsg::Reset => {
                debug!("reset");
                self.queues.iter_mut().for_each(|q| *q = None);
                self.device.reset();
            }
            BrokerMsg::ConfigWrite { offset, data } => self.device.config_write(offset, &data),
            BrokerMsg::StopQueue { index } => {
                debug!("queue {index} taken out of use");
                if let Some(q) = self.queues.get_mut(usize::from(index)) {
                    *q = None;
                    self.device.stop_queue(usize::from(index));
                }
            }
            BrokerMsg::RateLimit { flow, limit } => {
                info!("rate limit {}: {limit}", flow.name());
                self.device.set_rate_limit(flow, limit, Instant::now());
                // A queue waiting for the old limit goes by the new one.
                for i in 0..self.queues.len() {
                    self.process(i);
                }
            }
            BrokerMsg::Shutdown => return Some(ExitCode::SUCCESS),
            BrokerMsg::Hello { .. } => {
                return Some(self.fail("a second Hello".into()));
            }
        }
        None
    }

    fn activate(&mut self, features: u64, configs: &[QueueConfig], epoch: u64) {
        self.queues.iter_mut().for_each(|q| *q = None);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let resuming = self.record.begin(epoch);
        for cfg in configs {
            let i = cfg.index as usize;
            let Some(record) = self.record.queue(i).filter(|_| i < self.queues.len()) else {
                error!("queue {i} does not exist; ignored");
                continue;
            };
            match build_queue(cfg, event_idx, &self.mem) {
                Ok(mut queue) => {
                    let again = if resuming {
                        inflight::resume(&mut queue, record, &self.mem)
                    } else {
                        VecDeque::new()
                    };
                    if !again.is_empty() {
                        info!("queue {i}: {} chain(s) taken before a restart", again.len());
                    }
                    self.queues[i] = Some(Active { queue, again });
                }
                Err(why) => error!("queue {i}: {why}; the queue stays unused"),
            }
        }
        debug!("activated: features {features:#x}, event_idx {event_idx}, epoch {epoch}");
        self.device.activate(features);
        // Kicks that came before activation were dropped; look at every queue once.
        for i in 0..self.queues.len() {
            self.process(i);
        }
    }

    fn on_kick(&mut self, i: usize) {
        let Some(kick) = self.kicks.get(i) else {
            return;
        };
        let mut buf = [0u8; 8];
        match nix::unistd::read(kick, &mut buf) {
            Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(e) => warn!("queue {i}: reading the kick eventfd: {e}"),
        }
        self.process(i);
    }

    /// Drains queue `i` and interrupts the guest if it asked to be. With EVENT_IDX the drain
    /// repeats until no buffer arrived while notifications were off, or the driver would never
    /// kick again.
    fn process(&mut self, i: usize) {
        let (Some(Some(active)), Some(record)) = (self.queues.get_mut(i), self.record.queue(i))
        else {
            return;
        };
        let mem = &self.mem;
        let mut queue = TrackedQueue::new(
            &mut active.queue,
            record,
            &mut active.again,
            self.recovery.as_ref(),
        );
        let mut added = false;
        let mut idle_rounds = 0;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                warn!("queue {i}: {e}");
            }
            let before = (queue.next_avail(), queue.resuming());
            added |= self.device.process_queue(i, &mut queue, mem);
            let progressed = (queue.next_avail(), queue.resuming()) != before;
            match queue.enable_notification(mem) {
                Ok(true) if progressed => idle_rounds = 0,
                // More buffers than were taken: a round that took nothing may have run while
                // notifications were off, so the driver added a chain without kicking. Look once
                // more; a second empty round means the device is holding back (no room on the
                // host side) or the avail index is bogus: wait for the next event, never spin.
                Ok(true) => {
                    idle_rounds += 1;
                    if idle_rounds > 1 {
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    warn!("queue {i}: {e}");
                    break;
                }
            }
        }
        if !added {
            return;
        }
        let notify = active.queue.needs_notification(mem).unwrap_or_else(|e| {
            warn!("queue {i}: {e}");
            true
        });
        if notify {
            match nix::unistd::write(&self.calls[i], &1u64.to_ne_bytes()) {
                // EAGAIN: the counter is saturated, so an interrupt is pending anyway
                Ok(_) | Err(Errno::EAGAIN) => {}
                Err(e) => warn!("queue {i}: writing the call eventfd: {e}"),
            }
        }
    }

    fn fail(&self, reason: String) -> ExitCode {
        error!("{reason}");
        let _ = self.chan.send(&WorkerMsg::Failed { reason }, &[], true);
        ExitCode::FAILURE
    }
}

/// An activated queue and the chains a dead predecessor left to serve again.
struct Active {
    queue: Queue,
    again: VecDeque<u16>,
}

/// A queue as the driver configured it, checked against guest memory.
fn build_queue(cfg: &QueueConfig, event_idx: bool, mem: &GuestMemoryMmap) -> Result<Queue, String> {
    // The size is the maximum too: the broker already held the driver to QueueNumMax.
    let mut q = Queue::new(cfg.size).map_err(|e| format!("size {}: {e}", cfg.size))?;
    // The checked setters, so that a misaligned address is an error rather than ignored.
    q.try_set_desc_table_address(GuestAddress(cfg.desc))
        .map_err(|e| format!("descriptor table {:#x}: {e}", cfg.desc))?;
    q.try_set_avail_ring_address(GuestAddress(cfg.avail))
        .map_err(|e| format!("available ring {:#x}: {e}", cfg.avail))?;
    q.try_set_used_ring_address(GuestAddress(cfg.used))
        .map_err(|e| format!("used ring {:#x}: {e}", cfg.used))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err("rings outside guest memory".into());
    }
    Ok(q)
}

#[cfg(test)]
mod tests;
