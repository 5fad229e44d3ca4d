//! The console device driven through split queues in guest memory, as a driver would fill
//! them, over real pipes. The tests play the event loop: they wait on the worker's ends the way
//! `host_interest` asks and feed `host_ready`'s answer back into `process_queue`; and the
//! broker: they read and write the other ends, counting what they moved.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};
use worker::testing::{Part, Records, Ring};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::pipe2;
use protocol::DeviceSetup;
use std::cell::Cell;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use worker::{Device, Interest};

use crate::console::{Console, MAX_DESCRIPTORS, RXQ, TXQ};

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 256;
/// Guest buffers live from here on; the rings below.
const DATA: u64 = 0x10_0000;

struct Rig {
    mem: GuestMemoryMmap,
    console: Console,
    /// The broker's ends: the transmit pipe's read end and the receive pipe's write end.
    output: OwnedFd,
    input: OwnedFd,
    /// The worker's ends, as the broker keeps them for the next worker.
    worker_fds: [OwnedFd; 2],
    /// What the broker read from the transmit pipe and wrote into the receive pipe.
    took: Cell<u64>,
    gave: Cell<u64>,
    rx: Ring,
    tx: Ring,
    rxq: Queue,
    txq: Queue,
    records: Records,
}

fn rig() -> Rig {
    let (from_host, input) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
    let (output, to_host) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).unwrap();
    let worker_fds = [from_host, to_host];
    let console = Console::new(&DeviceSetup::Console, clone_fds(&worker_fds)).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let (rx, tx) = (Ring::new(0x1_0000, QSIZE), Ring::new(0x2_0000, QSIZE));
    let (rxq, txq) = (rx.queue(), tx.queue());
    Rig {
        mem,
        console,
        output,
        input,
        worker_fds,
        took: Cell::new(0),
        gave: Cell::new(0),
        rx,
        tx,
        rxq,
        txq,
        records: Records::new(2),
    }
}

fn clone_fds(fds: &[OwnedFd]) -> Vec<OwnedFd> {
    fds.iter().map(|f| f.try_clone().unwrap()).collect()
}

/// Bytes in a pipe, as the broker asks.
fn in_pipe(fd: &OwnedFd) -> u64 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given.
    assert_eq!(
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) },
        0
    );
    n as u64
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31).wrapping_add(i >> 9).wrapping_add(seed) % 253) as u8)
        .collect()
}

/// Waits until `fd` is ready for `events` (true) or `ms` passed (false).
fn wait_fd(fd: &OwnedFd, events: PollFlags, ms: u16) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), events)];
    poll(&mut fds, PollTimeout::from(ms)).unwrap() > 0
}

impl Rig {
    fn put(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn kick_tx(&mut self) -> bool {
        let mut q = self.records.tracked(TXQ, &mut self.txq);
        self.console.process_queue(TXQ, &mut q, &self.mem)
    }

    fn kick_rx(&mut self) -> bool {
        let mut q = self.records.tracked(RXQ, &mut self.rxq);
        self.console.process_queue(RXQ, &mut q, &self.mem)
    }

    /// What the device waits for on the host side, both pipes together.
    fn interest(&self) -> Interest {
        Interest {
            read: self.console.host_interest(0).read,
            write: self.console.host_interest(1).write,
        }
    }

    /// Waits until the typed input reached the worker's end.
    fn input_arrived(&self) -> bool {
        wait_fd(&self.worker_fds[0], PollFlags::POLLIN, 2000)
    }

    /// One round of the event loop over the worker's pipe ends: waits for what the device
    /// asked for, then processes the queues `host_ready` names. False if nothing became ready
    /// within `ms`.
    fn host_round(&mut self, ms: u16) -> bool {
        let events = |j| {
            let want = self.console.host_interest(j);
            let mut events = PollFlags::empty();
            if want.read {
                events |= PollFlags::POLLIN;
            }
            if want.write {
                events |= PollFlags::POLLOUT;
            }
            events
        };
        let (rx, tx) = (events(0), events(1));
        if rx.is_empty() && tx.is_empty() {
            return false;
        }
        let mut fds = [
            PollFd::new(self.worker_fds[0].as_fd(), rx),
            PollFd::new(self.worker_fds[1].as_fd(), tx),
        ];
        if poll(&mut fds, PollTimeout::from(ms)).unwrap() == 0 {
            return false;
        }
        let mut mask = 0;
        for (j, fd) in fds.iter().enumerate() {
            let got = fd.revents().unwrap();
            mask |= self.console.host_ready(
                j,
                got.contains(PollFlags::POLLIN),
                got.contains(PollFlags::POLLOUT),
            );
        }
        if mask & (1 << RXQ) != 0 {
            self.kick_rx();
        }
        if mask & (1 << TXQ) != 0 {
            self.kick_tx();
        }
        true
    }

    /// What the guest sent that the host gets now (non-blocking).
    fn read_output(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match nix::unistd::read(&self.output, &mut buf) {
                Ok(0) | Err(nix::errno::Errno::EAGAIN) => return out,
                Ok(n) => {
                    self.took.set(self.took.get() + n as u64);
                    out.extend_from_slice(&buf[..n]);
                }
                Err(e) => panic!("reading the output: {e}"),
            }
        }
    }

    /// Reads the output until `len` bytes came or nothing arrives for a while.
    fn read_output_exact(&self, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < len && wait_fd(&self.output, PollFlags::POLLIN, 2000) {
            out.extend(self.read_output());
        }
        out
    }

    /// Types as much of `data` as the receive pipe takes now.
    fn type_some(&self, data: &[u8]) -> usize {
        match nix::unistd::write(&self.input, data) {
            Ok(n) => {
                self.gave.set(self.gave.get() + n as u64);
                n
            }
            Err(nix::errno::Errno::EAGAIN) => 0,
            Err(e) => panic!("typing: {e}"),
        }
    }

    /// The worker dies the moment the host read or write in `kick` returns; a new one takes
    /// over the same host side and record, as the broker starts it after a kill.
    fn die_after_host_io(&mut self, kick: fn(&mut Rig) -> bool) {
        self.console.die_after_host_io = true;
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kick(self)));
        assert!(died.is_err(), "no host I/O to die after");
        // The broker's counts: what the pipes hold belongs to the dead worker's side.
        let rx_total = self.gave.get() - in_pipe(&self.input);
        let tx_total = self.took.get() + in_pipe(&self.output);
        self.records
            .record()
            .set_stream_totals([rx_total, tx_total]);
        let fds = clone_fds(&self.worker_fds);
        self.console = Console::new(&DeviceSetup::Console, fds).unwrap();
        (self.rxq, self.txq) = (self.rx.queue(), self.tx.queue());
        self.records.resume(RXQ, &mut self.rxq, &self.mem);
        self.records.resume(TXQ, &mut self.txq, &self.mem);
    }

    fn type_all(&self, data: &[u8]) {
        let mut at = 0;
        while at < data.len() {
            at += self.type_some(&data[at..]);
            if at < data.len() {
                assert!(wait_fd(&self.input, PollFlags::POLLOUT, 2000));
            }
        }
    }
}

#[test]
fn transmit_sends_each_chains_readable_bytes_in_order() {
    let mut r = rig();
    let (a, b) = (pattern(1, 700), pattern(2, 300));
    r.put(DATA, &a);
    r.put(DATA + 0x1000, &b);
    r.put(DATA + 0x2000, b"!");
    // a writable descriptor in a transmit chain is not the guest's output: skipped
    r.tx.add(
        &r.mem,
        &[
            (DATA, 700, false),
            (DATA + 0x5000, 64, true),
            (DATA + 0x1000, 300, false),
        ],
    );
    r.tx.add(&r.mem, &[(DATA + 0x2000, 1, false)]);
    // through an indirect table too
    r.tx.add_indirect(&r.mem, DATA + 0x8000, &[(DATA + 0x1000, 10, false)]);
    assert!(r.kick_tx());
    assert_eq!(r.tx.take_used(&r.mem), [(0, 0), (3, 0), (4, 0)]);
    let mut want = a.clone();
    want.extend_from_slice(&b);
    want.push(b'!');
    want.extend_from_slice(&b[..10]);
    assert_eq!(r.read_output_exact(want.len()), want);
    assert_eq!(r.interest(), Interest::NONE);
    // nothing new: no work, no interrupt
    assert!(!r.kick_tx());
}

#[test]
fn a_worker_killed_as_its_host_write_returns_sends_no_byte_twice() {
    let mut r = rig();
    r.put(DATA, b"ECHO line-0343\r\n");
    r.tx.add(&r.mem, &[(DATA, 16, false)]);
    r.put(DATA + 0x1000, b"next");
    r.tx.add(&r.mem, &[(DATA + 0x1000, 4, false)]);
    r.die_after_host_io(Rig::kick_tx);
    assert!(r.kick_tx());
    assert_eq!(r.tx.take_used(&r.mem), [(0, 0), (1, 0)]);
    let got = r.read_output_exact(20);
    assert!(r.read_output().is_empty());
    assert_eq!(String::from_utf8_lossy(&got), "ECHO line-0343\r\nnext");
}

#[test]
fn a_worker_killed_as_its_host_read_returns_loses_no_byte() {
    let mut r = rig();
    r.type_all(b"line-0343");
    assert!(r.input_arrived());
    r.rx.add(&r.mem, &[(DATA, 64, true)]);
    r.die_after_host_io(Rig::kick_rx);
    assert!(r.kick_rx());
    assert_eq!(r.rx.take_used(&r.mem), [(0, 9)]);
    assert_eq!(r.get(DATA, 9), b"line-0343");
}

#[test]
fn a_worker_killed_while_a_long_chain_drains_sends_each_byte_once() {
    let mut r = rig();
    let data = pattern(9, 300_000);
    r.put(DATA, &data);
    r.tx.add(
        &r.mem,
        &[(DATA, 150_000, false), (DATA + 150_000, 150_000, false)],
    );
    // the pipe takes part of it and the chain waits
    assert!(!r.kick_tx());
    assert_eq!(r.interest(), Interest::WRITE);
    let mut got = r.read_output();
    // room again: the worker dies as its next write returns
    r.die_after_host_io(|r| r.host_round(2000));
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < data.len() {
        assert!(Instant::now() < deadline, "stalled at {} bytes", got.len());
        r.kick_tx();
        got.extend(r.read_output());
        r.host_round(10);
    }
    assert_eq!(r.tx.take_used(&r.mem), [(0, 0)]);
    assert!(r.read_output().is_empty());
    assert!(
        got == data,
        "first difference at {:?}",
        first_diff(&got, &data)
    );
}

#[test]
fn a_full_pipe_holds_the_chains_and_nothing_is_lost_or_reordered() {
    let mut r = rig();
    // far more than a pty buffers, in chains of several sizes
    let sizes = [65536usize, 1, 4096, 100_000, 7, 65536, 30_000, 200_000];
    let mut want = Vec::new();
    let mut at = DATA;
    for (i, &n) in sizes.iter().enumerate() {
        let data = pattern(i as u64 + 10, n);
        r.put(at, &data);
        // split in two descriptors, so a stop may fall in either
        let half = (n / 2) as u32;
        r.tx.add(
            &r.mem,
            &[
                (at, half, false),
                (at + u64::from(half), n as u32 - half, false),
            ],
        );
        want.extend_from_slice(&data);
        at += n as u64 + 0x1000;
    }
    r.kick_tx();
    let done = r.tx.take_used(&r.mem).len();
    assert!(done < sizes.len(), "a pty cannot take {} bytes", want.len());
    assert_eq!(r.interest(), Interest::WRITE);
    // a kick while blocked changes nothing and costs no write
    assert!(!r.kick_tx());
    assert!(r.tx.take_used(&r.mem).is_empty());

    // a slow reader drains it; the device follows writability only
    let mut got = Vec::new();
    let mut used = done;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < want.len() {
        assert!(Instant::now() < deadline, "stalled at {} bytes", got.len());
        got.extend(r.read_output());
        r.host_round(10);
        used += r.tx.take_used(&r.mem).len();
    }
    assert_eq!(used, sizes.len());
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "first difference at {:?}",
        first_diff(&got, &want)
    );
    assert_eq!(r.interest(), Interest::NONE);
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn receive_waits_for_buffers_and_input_stays_in_the_pipe() {
    let mut r = rig();
    let input = pattern(7, 3000);
    r.type_all(&input);
    assert!(r.input_arrived());
    // no receive buffers: the pty is not read, not even watched
    assert!(!r.kick_rx());
    assert_eq!(r.interest(), Interest::NONE);

    // buffers arrive: two descriptors, a readable one among them ignored
    r.rx.add(
        &r.mem,
        &[
            (DATA, 1000, true),
            (DATA + 0x8000, 16, false),
            (DATA + 0x1000, 1000, true),
        ],
    );
    r.rx.add(&r.mem, &[(DATA + 0x2000, 4096, true)]);
    let mut got = Vec::new();
    assert!(r.kick_rx());
    for (head, len) in r.rx.take_used(&r.mem) {
        let len = len as usize;
        let parts: &[(u64, usize)] = if head == 0 {
            &[(DATA, 1000), (DATA + 0x1000, 1000)]
        } else {
            &[(DATA + 0x2000, 4096)]
        };
        let mut left = len;
        for &(addr, cap) in parts {
            let n = left.min(cap);
            got.extend(r.get(addr, n));
            left -= n;
        }
    }
    // what is left comes in the buffer still posted once the pty has it again
    while got.len() < input.len() {
        if r.interest().read {
            assert!(
                r.host_round(2000),
                "no more input after {} bytes",
                got.len()
            );
        }
        for (_, len) in r.rx.take_used(&r.mem) {
            got.extend(r.get(DATA + 0x2000, len as usize));
        }
    }
    assert!(
        got == input,
        "first difference at {:?}",
        first_diff(&got, &input)
    );
    // a buffer is posted and the pty is empty: watch it for input
    r.rx.add(&r.mem, &[(DATA + 0x4000, 4096, true)]);
    assert!(!r.kick_rx());
    assert_eq!(r.interest(), Interest::READ);
    r.type_all(b"late");
    assert!(r.host_round(2000));
    let used = r.rx.take_used(&r.mem);
    assert_eq!(used.len(), 1);
    assert_eq!(r.get(DATA + 0x4000, used[0].1 as usize), b"late");
    assert_eq!(r.interest(), Interest::NONE);
}

#[test]
fn a_megabyte_each_way_with_few_buffers() {
    let mut r = rig();
    let out = pattern(3, 1 << 20);
    let inp = pattern(4, 1 << 20);
    let (mut got_out, mut got_in) = (Vec::new(), Vec::new());
    let (mut sent, mut fed) = (0usize, 0usize);
    // transmit slots in flight, oldest first (chains complete in order)
    let mut tx_busy = std::collections::VecDeque::new();
    let mut tx_next = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got_out.len() < out.len() || got_in.len() < inp.len() {
        assert!(Instant::now() < deadline, "stalled");
        // keep 8 transmit chains of 16 KiB and 4 receive buffers of 4 KiB offered
        while tx_busy.len() < 8 && sent < out.len() {
            let n = (out.len() - sent).min(16 << 10);
            let addr = DATA + (tx_next % 8) * 0x4000;
            tx_next += 1;
            r.put(addr, &out[sent..sent + n]);
            r.tx.add(&r.mem, &[(addr, n as u32, false)]);
            tx_busy.push_back(addr);
            sent += n;
        }
        let posted = r.rx.avail_idx.wrapping_sub(r.rx.used_seen);
        for _ in posted..4 {
            let slot = u64::from(r.rx.avail_idx % 4);
            r.rx.add(&r.mem, &[(DATA + 0x10_0000 + slot * 0x1000, 4096, true)]);
        }
        r.kick_tx();
        r.kick_rx();
        if fed < inp.len() {
            fed += r.type_some(&inp[fed..]);
        }
        got_out.extend(r.read_output());
        r.host_round(1);
        for _ in r.tx.take_used(&r.mem) {
            tx_busy.pop_front();
        }
        for (head, len) in r.rx.take_used(&r.mem) {
            // receive chains are single descriptors, so head % 4 is the slot they were posted in
            let slot = u64::from(head) % 4;
            got_in.extend(r.get(DATA + 0x10_0000 + slot * 0x1000, len as usize));
        }
    }
    assert!(
        got_out == out,
        "output differs at {:?}",
        first_diff(&got_out, &out)
    );
    assert!(
        got_in == inp,
        "input differs at {:?}",
        first_diff(&got_in, &inp)
    );
}

#[test]
fn malformed_chains_are_returned_and_never_crash() {
    let mut r = rig();
    let outside = MEM_SIZE as u64 + 0x1000;
    r.put(DATA, b"ok");
    // transmit: outside guest memory, running off its end, too many descriptors: dropped
    r.tx.add(&r.mem, &[(outside, 16, false)]);
    r.tx.add(&r.mem, &[(MEM_SIZE as u64 - 8, 16, false)]);
    let many: Vec<Part> = (0..MAX_DESCRIPTORS + 1).map(|_| (DATA, 1, false)).collect();
    r.tx.add_indirect(&r.mem, DATA + 0x10_0000, &many);
    // an indirect table of a length that is no multiple of 16 ends the chain at once
    let head = r.tx.next_desc;
    r.tx.next_desc += 1;
    Ring::write_desc(
        &r.mem,
        r.tx.desc() + 16 * u64::from(head),
        DATA + 0x20_0000,
        24,
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    r.tx.publish(&r.mem, head);
    // a loop: the chain ends when the queue size is used up
    let head = r.tx.next_desc;
    r.tx.next_desc += 1;
    Ring::write_desc(
        &r.mem,
        r.tx.desc() + 16 * u64::from(head),
        DATA,
        1,
        VRING_DESC_F_NEXT as u16,
        head,
    );
    r.tx.publish(&r.mem, head);
    r.tx.add(&r.mem, &[(DATA, 2, false)]);
    assert!(r.kick_tx());
    let used = r.tx.take_used(&r.mem);
    assert_eq!(used.len(), 6);
    assert!(used.iter().all(|&(_, len)| len == 0));
    // only the well-formed output reached the pty (the loop's bytes included: it is bounded)
    let got = r.read_output_exact(2);
    assert!(got.ends_with(b"ok"), "{got:?}");
    assert!(got.len() <= 2 + usize::from(QSIZE), "{}", got.len());

    // receive: outside memory, no writable room: returned empty, the input kept for later
    r.type_all(b"input");
    assert!(r.input_arrived());
    r.rx.add(&r.mem, &[(outside, 64, true)]);
    r.rx.add(&r.mem, &[(DATA, 64, false)]);
    r.rx.add(&r.mem, &[(DATA + 0x1000, 0, true)]);
    r.rx.add(&r.mem, &[(DATA + 0x3000, 64, true)]);
    assert!(r.kick_rx());
    let used = r.rx.take_used(&r.mem);
    assert_eq!(&used[..3], &[(0, 0), (1, 0), (2, 0)]);
    assert_eq!(used[3].0, 3);
    assert_eq!(r.get(DATA + 0x3000, used[3].1 as usize), b"input");

    // a queue whose available index jumps past its size: nothing taken, no spin
    r.tx.avail_idx = r.tx.avail_idx.wrapping_add(1000);
    r.mem
        .write_obj(r.tx.avail_idx, GuestAddress(r.tx.avail() + 2))
        .unwrap();
    assert!(!r.kick_tx());
}

#[test]
fn reset_forgets_a_blocked_chain_and_interest() {
    let mut r = rig();
    let big = pattern(5, 1 << 20);
    r.put(DATA, &big);
    r.tx.add(&r.mem, &[(DATA, big.len() as u32, false)]);
    r.rx.add(&r.mem, &[(DATA + 0x20_0000, 64, true)]);
    r.kick_tx();
    r.kick_rx();
    assert_eq!(r.interest(), Interest::BOTH);
    assert!(r.tx.take_used(&r.mem).is_empty());
    r.console.reset();
    assert_eq!(r.interest(), Interest::NONE);
    assert_eq!(r.console.host_ready(0, true, true), 0);
    // a new driver, new rings: its first chain starts from its first byte
    r.read_output();
    let mut tx = Ring::new(0x3_0000, QSIZE);
    r.txq = tx.queue();
    // its activation starts a new in-flight record, as the event loop's does
    r.records = Records::new(2);
    r.put(DATA + 0x30_0000, b"fresh");
    tx.add(&r.mem, &[(DATA + 0x30_0000, 5, false)]);
    // the pty still holds the old chain's head (the reader drained only some of it)
    let mut got = Vec::new();
    while !got.ends_with(b"fresh") {
        r.kick_tx();
        got.extend(r.read_output_exact(1));
        r.host_round(10);
    }
    assert_eq!(tx.take_used(&r.mem), [(0, 0)]);
}

#[test]
fn setup_and_fds_are_checked() {
    let (a, b) = nix::unistd::pipe().unwrap();
    let blk = DeviceSetup::Blk {
        readonly: false,
        size: 512,
        serial: String::new(),
    };
    let both = || clone_fds(&[a.try_clone().unwrap(), b.try_clone().unwrap()]);
    assert!(Console::new(&blk, both()).is_err());
    assert!(Console::new(&DeviceSetup::Console, vec![]).is_err());
    assert!(Console::new(&DeviceSetup::Console, clone_fds(&[a.try_clone().unwrap()])).is_err());
    // a pty is no pipe
    let pair = nix::pty::openpty(None, None).unwrap();
    assert!(Console::new(&DeviceSetup::Console, vec![pair.master, pair.slave]).is_err());
    // blocking pipe ends are made non-blocking
    let fl = OFlag::from_bits_truncate(fcntl(&a, FcntlArg::F_GETFL).unwrap());
    assert!(!fl.contains(OFlag::O_NONBLOCK));
    let c = Console::new(&DeviceSetup::Console, both()).unwrap();
    for fd in [&a, &b] {
        let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        assert!(fl.contains(OFlag::O_NONBLOCK));
    }
    assert_eq!(c.host_fds().len(), 2);
    assert_eq!(c.host_interest(2), Interest::NONE);
}
