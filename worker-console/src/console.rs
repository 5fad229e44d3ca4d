//! The virtio-console device with one port (virtio 1.2, 5.3): the transmit queue's bytes go to
//! the pty master in order, and what the pty yields fills the receive queue's buffers.
//!
//! Neither direction drops a byte. A full pty (no reader attached, or a slow one) holds the
//! transmit chain where it stopped, and every chain behind it, until the pty drains; while the
//! guest has no receive buffers the pty is not read, so input waits in the kernel.
//! Nothing runs while nothing moves: the loop sleeps in `epoll_wait`, watching the pty only
//! for what is pending.
//!
//! Nor does a restart lose or repeat a byte: each chain's progress (bytes written from it, or
//! read into it) is recorded before its used entry is published, and the next worker goes on
//! from there. Only a death inside the very system call that moved the bytes can (the kernel
//! has moved them, the record does not say so yet).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use log::{debug, warn};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use protocol::DeviceSetup;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use worker::{counters, Device, Interest, TrackedQueue};

use worker::guest_io;

/// receiveq0: host to guest.
pub const RXQ: usize = 0;
/// transmitq0: guest to host.
pub const TXQ: usize = 1;
/// The pty is host fd 0.
const PTY: usize = 0;
/// More descriptors than this in one chain is not something a console driver sends.
pub const MAX_DESCRIPTORS: usize = 1024;

pub struct Console {
    pty: OwnedFd,
    /// The pty took no more: transmit waits for writability.
    tx_blocked: bool,
    /// The guest has receive buffers and the pty had nothing for them: wait for readability.
    rx_waiting: bool,
    /// An unexpected pty error is logged once as a warning, then at debug level.
    warned: bool,
}

/// Why a chain cannot be served.
type Malformed = &'static str;

impl Console {
    pub fn new(setup: &DeviceSetup, fds: Vec<OwnedFd>) -> Result<Self, String> {
        if *setup != DeviceSetup::Console {
            return Err("not a console setup".into());
        }
        let [pty] = <[OwnedFd; 1]>::try_from(fds)
            .map_err(|fds| format!("expected one pty fd, got {}", fds.len()))?;
        // The broker opens it non-blocking; a blocking one would stall the whole loop on a full
        // pty, so make sure (this runs before the sandbox, which forbids F_SETFL).
        let flags = fcntl(&pty, FcntlArg::F_GETFL).map_err(|e| format!("pty flags: {e}"))?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&pty, FcntlArg::F_SETFL(flags)).map_err(|e| format!("pty flags: {e}"))?;
        Ok(Console {
            pty,
            tx_blocked: false,
            rx_waiting: false,
            warned: false,
        })
    }

    fn forget(&mut self) {
        self.tx_blocked = false;
        self.rx_waiting = false;
    }

    /// Writes transmit chains to the pty in order until the queue is empty or the pty is full.
    /// A partly written chain is put back in the available ring (the queue steps back) with
    /// its progress recorded, until the rest is written.
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
                    if self.write_chain(queue, head, &bufs).is_some() {
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

    /// Writes `bufs` of chain `head` from its recorded progress on, recording each step.
    /// `None` when the chain is finished (written, or dropped on a pty error); `Some(done)`
    /// when the pty is full after `done` bytes.
    fn write_chain(
        &mut self,
        queue: &mut TrackedQueue<'_>,
        head: u16,
        bufs: &[VolatileSlice<'_>],
    ) -> Option<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = queue.progress(head) as usize;
        while done < total {
            match guest_io::writev(self.pty.as_fd(), &[], bufs, done) {
                Ok(n) if n > 0 => {
                    counters::add(counters::BYTES_WRITTEN, n as u64);
                    done += n;
                    queue.set_progress(head, u32::try_from(done).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(done),
                other => {
                    // With the broker holding the slave this does not happen; dropping the
                    // chain beats stalling the guest's output for ever.
                    let why = other
                        .err()
                        .map_or("it took nothing".into(), |e| e.to_string());
                    self.pty_error(&format!("writing to the pty: {why}; output dropped"));
                    return None;
                }
            }
        }
        None
    }

    /// Fills receive chains from the pty until it has nothing more or the guest has no buffers.
    /// A chain filled before a restart (it has progress) is completed with what it got.
    fn receive<'m>(&mut self, queue: &mut TrackedQueue<'m>, mem: &'m GuestMemoryMmap) -> bool {
        self.rx_waiting = false;
        let mut added = false;
        while let Some(chain) = queue.pop(mem) {
            let head = chain.head_index();
            let got = queue.progress(head);
            if got > 0 {
                added |= queue.publish(mem, head, got);
                continue;
            }
            let len = match gather(chain, mem, true) {
                Ok(bufs) if !bufs.is_empty() => {
                    match guest_io::readv(self.pty.as_fd(), &bufs, &mut []) {
                        Ok(n) if n > 0 => {
                            counters::add(counters::BYTES_READ, n as u64);
                            n
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            queue.put_back(head);
                            self.rx_waiting = true;
                            break;
                        }
                        other => {
                            // EIO: no slave is open (the broker holds one, so not expected). The
                            // buffer stays with us; the next kick tries again.
                            let why = other.err().map_or("end of file".into(), |e| e.to_string());
                            self.pty_error(&format!("reading the pty: {why}"));
                            queue.put_back(head);
                            break;
                        }
                    }
                }
                Ok(_) => 0,
                Err(why) => {
                    debug!("receive chain {head}: {why}; returned empty");
                    0
                }
            };
            // At most the chain's length, which the chain iterator holds under 2^32.
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            queue.set_progress(head, len);
            added |= queue.publish(mem, head, len);
        }
        added
    }

    fn pty_error(&mut self, what: &str) {
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
        vec![self.pty.as_fd()]
    }

    fn host_interest(&self, index: usize) -> Interest {
        if index != PTY {
            return Interest::NONE;
        }
        Interest {
            read: self.rx_waiting,
            write: self.tx_blocked,
        }
    }

    fn host_ready(&mut self, index: usize, readable: bool, writable: bool) -> u64 {
        if index != PTY {
            return 0;
        }
        let mut queues = 0;
        if writable && self.tx_blocked {
            self.tx_blocked = false;
            queues |= 1 << TXQ;
        }
        if readable && self.rx_waiting {
            queues |= 1 << RXQ;
        }
        queues
    }
}
