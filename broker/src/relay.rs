//! A console's bytes between its pty and its worker, through two pipes the broker keeps.
//!
//! Why not hand the worker the pty: a worker killed inside the system call that moved bytes
//! to or from a pty leaves no trace of how many moved (the kernel moved them; the worker's
//! record does not say so yet), so the next worker would send them again or lose them. A pipe
//! the broker keeps survives the worker, and the broker counts what it moves through each: what
//! workers gave the transmit pipe is what the broker read from it plus what it still holds;
//! what they took from the receive pipe is what the broker wrote into it minus what it still
//! holds. Written into the in-flight record before each worker starts ([`Relay::totals`]),
//! these tell the next worker exactly how much of the chain in flight moved
//! (`docs/console.md`).
//!
//! The relay never looks at the bytes, and moves at most one chunk each way per call: a busy
//! console costs the loop a bounded step per wakeup.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::epoll::EpollFlags;

/// Bytes moved each way per call.
const CHUNK: usize = 16384;

/// The relay's fds, in [`Relay::fds`] order.
pub const PTY: usize = 0;
pub const FROM_WORKER: usize = 1;
pub const TO_WORKER: usize = 2;

/// Bytes read and not yet written on.
struct Chunk {
    buf: Box<[u8; CHUNK]>,
    start: usize,
    end: usize,
}

impl Chunk {
    fn new() -> Chunk {
        Chunk {
            buf: Box::new([0; CHUNK]),
            start: 0,
            end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Reads from `fd` into the empty chunk; the bytes read.
    fn fill(&mut self, fd: BorrowedFd<'_>) -> nix::Result<usize> {
        let n = nix::unistd::read(fd, &mut self.buf[..])?;
        (self.start, self.end) = (0, n);
        Ok(n)
    }

    /// Writes what the chunk holds to `fd`; the bytes written.
    fn drain(&mut self, fd: BorrowedFd<'_>) -> nix::Result<usize> {
        let n = nix::unistd::write(fd, &self.buf[self.start..self.end])?;
        self.start += n;
        Ok(n)
    }
}

pub struct Relay {
    pty: OwnedFd,
    from_worker: OwnedFd,
    to_worker: OwnedFd,
    /// The guest's output on its way to the pty, and the user's input on its way to the guest.
    output: Chunk,
    input: Chunk,
    /// Bytes read from the transmit pipe, and written into the receive pipe, ever.
    took: u64,
    gave: u64,
    /// The events each fd is registered for now.
    pub registered: [EpollFlags; 3],
    /// An unexpected error is logged once as a warning, then at debug level.
    warned: bool,
}

impl Relay {
    /// A relay for the pty master `pty`, and the worker's ends of its pipes (the receive
    /// pipe's read end, then the transmit pipe's write end), which every worker gets.
    pub fn new(pty: OwnedFd) -> Result<(Relay, Vec<OwnedFd>)> {
        let flags = OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let (worker_rx, to_worker) = nix::unistd::pipe2(flags).context("console pipe")?;
        let (from_worker, worker_tx) = nix::unistd::pipe2(flags).context("console pipe")?;
        let relay = Relay {
            pty,
            from_worker,
            to_worker,
            output: Chunk::new(),
            input: Chunk::new(),
            took: 0,
            gave: 0,
            registered: [EpollFlags::empty(); 3],
            warned: false,
        };
        Ok((relay, vec![worker_rx, worker_tx]))
    }

    pub fn fds(&self) -> [BorrowedFd<'_>; 3] {
        [
            self.pty.as_fd(),
            self.from_worker.as_fd(),
            self.to_worker.as_fd(),
        ]
    }

    /// What each fd should wake the loop for: reading only into an empty chunk, writing only
    /// while one holds bytes.
    pub fn interest(&self) -> [EpollFlags; 3] {
        let mut pty = EpollFlags::empty();
        if self.input.is_empty() {
            pty |= EpollFlags::EPOLLIN;
        }
        if !self.output.is_empty() {
            pty |= EpollFlags::EPOLLOUT;
        }
        let when = |yes, flag| if yes { flag } else { EpollFlags::empty() };
        [
            pty,
            when(self.output.is_empty(), EpollFlags::EPOLLIN),
            when(!self.input.is_empty(), EpollFlags::EPOLLOUT),
        ]
    }

    /// Moves at most a chunk each way, as far as the fds let it now.
    pub fn pump(&mut self) {
        if self.output.is_empty() {
            match self.output.fill(self.from_worker.as_fd()) {
                Ok(n) => self.took += n as u64,
                Err(e) => self.error("reading the console's output", e),
            }
        }
        if !self.output.is_empty() {
            if let Err(e) = self.output.drain(self.pty.as_fd()) {
                self.error("writing to the pty", e);
                if e != Errno::EAGAIN {
                    // With the broker holding the slave this does not happen; dropping the
                    // chunk beats stalling the guest's output for ever.
                    self.output.start = self.output.end;
                }
            }
        }
        if self.input.is_empty() {
            if let Err(e) = self.input.fill(self.pty.as_fd()) {
                self.error("reading the pty", e);
            }
        }
        if !self.input.is_empty() {
            match self.input.drain(self.to_worker.as_fd()) {
                Ok(n) => self.gave += n as u64,
                Err(e) => self.error("passing input to the console", e),
            }
        }
    }

    fn error(&mut self, what: &str, e: Errno) {
        if e == Errno::EAGAIN || e == Errno::EINTR {
            return;
        }
        if self.warned {
            log::debug!("{what}: {e}");
        } else {
            log::warn!("{what}: {e}");
            self.warned = true;
        }
    }

    /// The bytes workers took from the receive pipe and gave the transmit pipe, all of them
    /// together. Exact while no worker runs: then nobody else touches the pipes.
    pub fn totals(&self) -> [u64; 2] {
        let taken = self.gave.saturating_sub(in_pipe(&self.to_worker));
        let given = self.took.saturating_add(in_pipe(&self.from_worker));
        [taken, given]
    }
}

/// The bytes a pipe holds (either end asks the same pipe).
fn in_pipe(fd: &OwnedFd) -> u64 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD stores one int through the pointer, which points at `n`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        u64::try_from(n).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_all(fd: &OwnedFd, data: &[u8]) {
        assert_eq!(nix::unistd::write(fd, data).unwrap(), data.len());
    }

    fn read_some(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = [0u8; 2 * CHUNK];
        match nix::unistd::read(fd, &mut buf) {
            Ok(n) => buf[..n].to_vec(),
            Err(Errno::EAGAIN) => Vec::new(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn bytes_pass_both_ways_and_the_totals_count_what_workers_moved() {
        // a pipe stands in for the pty: the relay writes its output into the same fd it reads
        let (pty_far, pty) = nix::unistd::pipe2(OFlag::O_NONBLOCK).unwrap();
        let (mut relay, worker) = Relay::new(pty.try_clone().unwrap()).unwrap();
        let [worker_rx, worker_tx] = <[OwnedFd; 2]>::try_from(worker).unwrap();
        assert_eq!(relay.totals(), [0, 0]);
        // the worker gives 10 bytes; the relay takes them and writes them to the "pty"
        write_all(&worker_tx, b"0123456789");
        assert_eq!(relay.totals(), [0, 10]);
        relay.pump();
        assert_eq!(read_some(&pty_far), b"0123456789");
        assert_eq!(relay.totals(), [0, 10]);
        // input: what the relay passes on counts only once a worker took it
        drop(pty_far);
        let (pty_in, user) = nix::unistd::pipe2(OFlag::O_NONBLOCK).unwrap();
        relay.pty = pty_in;
        write_all(&user, b"typed");
        relay.pump();
        assert_eq!(relay.totals(), [0, 10]);
        let mut two = [0u8; 2];
        assert_eq!(nix::unistd::read(&worker_rx, &mut two).unwrap(), 2);
        assert_eq!(relay.totals(), [2, 10]);
        assert_eq!(read_some(&worker_rx), b"ped");
        assert_eq!(relay.totals(), [5, 10]);
    }

    #[test]
    fn nothing_is_watched_that_cannot_move() {
        let (_far, pty) = nix::unistd::pipe2(OFlag::O_NONBLOCK).unwrap();
        let (relay, _worker) = Relay::new(pty).unwrap();
        assert_eq!(
            relay.interest(),
            [
                EpollFlags::EPOLLIN,
                EpollFlags::EPOLLIN,
                EpollFlags::empty()
            ]
        );
    }
}
