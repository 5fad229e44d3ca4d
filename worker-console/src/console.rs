//! The virtio-console device with one port (virtio 1.2, 5.3): the transmit queue's bytes go to
//! the host in order, and what the host sends fills the receive queue's buffers. The host side
//! is a pair of pipes the broker keeps and relays to and from the pty (see `docs/console.md`).
//!
//! Neither direction drops a byte. A full pipe (no reader on the pty, or a slow one) holds the
//! transmit chain where it stopped, and every chain behind it, until it drains; while the
//! guest has no receive buffers the pipe is not read, so input waits in the kernel.
//! Nothing runs while nothing moves: the loop sleeps in `epoll_wait`, watching the pipes only
//! for what is pending.
//!
//! Nor does a restart lose or repeat a byte, even when the worker dies inside the system call
//! that moved them: before a chain's first byte moves, the in-flight record notes where in the
//! queue's host stream the chain starts; the broker counts each stream (what its pipes hold
//! included) and tells the next worker, which so knows how much of the chain moved.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use log::{debug, warn};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, SFlag};
use protocol::DeviceSetup;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use worker::{counters, Device, Interest, TrackedQueue};

use worker::guest_io;

/// receiveq0: host to guest.
pub const RXQ: usize = 0;
/// transmitq0: guest to host.
pub const TXQ: usize = 1;
/// Host fd 0 is the receive pipe's read end, host fd 1 the transmit pipe's write end.
const FROM_HOST: usize = 0;
const TO_HOST: usize = 1;
/// More descriptors than this in one chain is not something a console driver sends.
pub const MAX_DESCRIPTORS: usize = 1024;

pub struct Console {
    from_host: OwnedFd,
    to_host: OwnedFd,
    /// Where each queue's host stream stands (bytes taken from the receive pipe, given to the
    /// transmit pipe, by every worker of the device): from the record at first use.
    streams: [Option<u64>; 2],
    /// The transmit pipe took no more: transmit waits for writability.
    tx_blocked: bool,
    /// The guest has receive buffers and the pipe had nothing for them: wait for readability.
    rx_waiting: bool,
    /// An unexpected host error is logged once as a warning, then at debug level.
    warned: bool,
    /// Tests: die (panic) the moment a host read or write returns, as a SIGKILL that lands
    /// in that system call does: the kernel moved the bytes, nothing of ours runs after.
    #[cfg(test)]
    pub die_after_host_io: bool,
}

/// Why a chain cannot be served.
type Malformed = &'static str;

impl Console {
    /// `fds`: the receive pipe's read end, then the transmit pipe's write end.
    pub fn new(setup: &DeviceSetup, fds: Vec<OwnedFd>) -> Result<Self, String> {
        if *setup != DeviceSetup::Console {
            return Err("not a console setup".into());
        }
        let [from_host, to_host] = <[OwnedFd; 2]>::try_from(fds)
            .map_err(|fds| format!("expected two pipe fds, got {}", fds.len()))?;
        for fd in [&from_host, &to_host] {
            nonblocking_pipe(fd)?;
        }
        Ok(Console {
            from_host,
            to_host,
            streams: [None; 2],
            tx_blocked: false,
            rx_waiting: false,
            warned: false,
            #[cfg(test)]
            die_after_host_io: false,
        })
    }

    fn forget(&mut self) {
        self.tx_blocked = false;
        self.rx_waiting = false;
    }

    /// Where queue `index`'s host stream stands; the broker's count at the first call.
    fn stream(&mut self, index: usize, queue: &TrackedQueue<'_>) -> &mut u64 {
        self.streams[index].get_or_insert_with(|| queue.stream_total())
    }

    /// The bytes of chain `head` (the one just popped) that already moved, by this worker or a
    /// dead one; notes where it starts if it has no start yet.
    fn moved(&mut self, index: usize, queue: &mut TrackedQueue<'_>, head: u16) -> u64 {
        let at = *self.stream(index, queue);
        match queue.stream_start(head) {
            // A start past the stream is no start a worker of ours wrote: count nothing moved.
            Some(start) => at.saturating_sub(start),
            None => {
                queue.set_stream_start(head, at);
                0
            }
        }
    }

    #[cfg(test)]
    fn maybe_die(&self, what: &str, n: usize) {
        assert!(!self.die_after_host_io, "killed after {what} {n} bytes");
    }

    #[cfg(not(test))]
    fn maybe_die(&self, _what: &str, _n: usize) {}

    /// Writes transmit chains to the host in order until the queue is empty or the pipe is
    /// full. A partly written chain is put back in the available ring (the queue steps back)
    /// until the rest is written.
    fn transmit<'m>(&mut self, queue: &mut TrackedQueue<'m>, mem: &'m GuestMemoryMmap) -> bool {
        if self.tx_blocked {
            // Writability wakes the loop; trying now would only meet EAGAIN again.
            return false;
        }
        let mut added = false;
        while let Some(chain) = queue.pop(mem) {
            let head = chain.head_index();
            match gather(chain, mem, false) {
                Ok(bufs) => {
                    if !self.write_chain(queue, head, &bufs) {
                        self.tx_blocked = true;
                        queue.put_back(head);
                        break;
                    }
                }
                Err(why) => debug!("transmit chain {head}: {why}; dropped"),
            }
            added |= queue.publish(mem, head, 0);
        }
        added
    }

    /// Writes what is left of `bufs` of chain `head`. True when the chain is finished
    /// (written, or dropped on a host error); false when the pipe is full.
    fn write_chain(
        &mut self,
        queue: &mut TrackedQueue<'_>,
        head: u16,
        bufs: &[VolatileSlice<'_>],
    ) -> bool {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let moved = self.moved(TXQ, queue, head);
        let mut done = usize::try_from(moved).map_or(total, |m| m.min(total));
        while done < total {
            match guest_io::writev(self.to_host.as_fd(), &[], bufs, done) {
                Ok(n) if n > 0 => {
                    self.maybe_die("writing", n);
                    counters::add(counters::BYTES_WRITTEN, n as u64);
                    *self.stream(TXQ, queue) += n as u64;
                    done += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                other => {
                    // With the broker holding the read end this does not happen; dropping the
                    // chain beats stalling the guest's output for ever.
                    let why = other
                        .err()
                        .map_or("it took nothing".into(), |e| e.to_string());
                    self.host_error(&format!("writing to the host: {why}; output dropped"));
                    return true;
                }
            }
        }
        true
    }

    /// Fills receive chains from the host until it has nothing more or the guest has no
    /// buffers. A chain filled before a restart is completed with what it got.
    fn receive<'m>(&mut self, queue: &mut TrackedQueue<'m>, mem: &'m GuestMemoryMmap) -> bool {
        self.rx_waiting = false;
        let mut added = false;
        while let Some(chain) = queue.pop(mem) {
            let head = chain.head_index();
            let len = match gather(chain, mem, true) {
                Ok(bufs) if !bufs.is_empty() => match self.read_chain(queue, head, &bufs) {
                    Some(n) => n,
                    None => {
                        queue.put_back(head);
                        break;
                    }
                },
                Ok(_) => 0,
                Err(why) => {
                    debug!("receive chain {head}: {why}; returned empty");
                    0
                }
            };
            // At most the chain's length, which the chain iterator holds under 2^32.
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            added |= queue.publish(mem, head, len);
        }
        added
    }

    /// The bytes chain `head` holds: those a dead worker read into it, else what one read
    /// from the host gives. `None` when the host has nothing now (the chain waits).
    fn read_chain(
        &mut self,
        queue: &mut TrackedQueue<'_>,
        head: u16,
        bufs: &[VolatileSlice<'_>],
    ) -> Option<usize> {
        let room: usize = bufs.iter().map(|b| b.len()).sum();
        let moved = self.moved(RXQ, queue, head);
        if moved > 0 {
            return Some(usize::try_from(moved).map_or(room, |m| m.min(room)));
        }
        match guest_io::readv(self.from_host.as_fd(), bufs, &mut []) {
            Ok(n) if n > 0 => {
                self.maybe_die("reading", n);
                counters::add(counters::BYTES_READ, n as u64);
                *self.stream(RXQ, queue) += n as u64;
                Some(n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.rx_waiting = true;
                None
            }
            other => {
                // End of file: the broker closed its end (not expected). The buffer stays
                // with us; the next kick tries again.
                let why = other.err().map_or("end of file".into(), |e| e.to_string());
                self.host_error(&format!("reading from the host: {why}"));
                None
            }
        }
    }

    fn host_error(&mut self, what: &str) {
        if self.warned {
            debug!("{what}");
        } else {
            warn!("{what}");
            self.warned = true;
        }
    }
}

/// The chain's buffers of one direction (device-writable ones for receive), checked against
/// guest memory over their whole length. Buffers of the other direction are ignored.
fn gather<'m>(
    chain: DescriptorChain<&'m GuestMemoryMmap>,
    mem: &'m GuestMemoryMmap,
    writable: bool,
) -> Result<Vec<VolatileSlice<'m>>, Malformed> {
    let mut bufs = Vec::new();
    for (i, d) in chain.enumerate() {
        if i == MAX_DESCRIPTORS {
            return Err("too many descriptors");
        }
        if d.is_write_only() != writable || d.len() == 0 {
            continue;
        }
        let len = usize::try_from(d.len()).map_err(|_| "buffer too large")?;
        // A range may span two adjacent regions, hence possibly several slices.
        for slice in mem.get_slices(d.addr(), len) {
            bufs.push(slice.map_err(|_| "buffer outside guest memory")?);
        }
    }
    Ok(bufs)
}

impl Device for Console {
    fn process_queue<'m>(
        &mut self,
        index: usize,
        queue: &mut TrackedQueue<'m>,
        mem: &'m GuestMemoryMmap,
    ) -> bool {
        match index {
            RXQ => self.receive(queue, mem),
            TXQ => self.transmit(queue, mem),
            _ => false,
        }
    }

    fn activate(&mut self, _features: u64) {
        self.forget();
    }

    fn reset(&mut self) {
        self.forget();
    }

    fn stop_queue(&mut self, index: usize) {
        match index {
            RXQ => self.rx_waiting = false,
            TXQ => self.tx_blocked = false,
            _ => {}
        }
    }

    fn host_fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.from_host.as_fd(), self.to_host.as_fd()]
    }

    fn host_interest(&self, index: usize) -> Interest {
        match index {
            FROM_HOST if self.rx_waiting => Interest::READ,
            TO_HOST if self.tx_blocked => Interest::WRITE,
            _ => Interest::NONE,
        }
    }

    fn host_ready(&mut self, index: usize, readable: bool, writable: bool) -> u64 {
        match index {
            FROM_HOST if readable && self.rx_waiting => 1 << RXQ,
            TO_HOST if writable && self.tx_blocked => {
                self.tx_blocked = false;
                1 << TXQ
            }
            _ => 0,
        }
    }
}

/// Checks that `fd` is a pipe and makes it non-blocking: a blocking one would stall the whole
/// loop (this runs before the sandbox, which forbids F_SETFL).
fn nonblocking_pipe(fd: &OwnedFd) -> Result<(), String> {
    let st = fstat(fd).map_err(|e| format!("host fd: {e}"))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFIFO {
        return Err("a host fd is not a pipe".into());
    }
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| format!("pipe flags: {e}"))?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| format!("pipe flags: {e}"))?;
    Ok(())
}
