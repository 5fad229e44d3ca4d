use std::io::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use protocol::channel::wait_readable;
use protocol::{BrokerMsg, Channel, QueueConfig, WorkerMsg};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::EventLoop;
use crate::memory::map_regions;
use crate::{Device, TrackedQueue};

const QSIZE: u16 = 16;
const RING: GuestAddress = GuestAddress(0x1000);
/// The used ring, placed by hand: `MockSplitQueue::create` puts it over the tail of the
/// available ring (its ring `end()` adds the element count, not the byte length), so the
/// device's used elements would overwrite `used_event`.
const USED: GuestAddress = GuestAddress(0x4000);
const EVENT_IDX: u64 = 1 << 29;

/// Writes "pong" into every chain.
struct Echo {
    resets: Arc<AtomicUsize>,
}

impl Device for Echo {
    fn process_queue<'m>(
        &mut self,
        _index: usize,
        queue: &mut TrackedQueue<'m>,
        mem: &'m GuestMemoryMmap,
    ) -> bool {
        let mut added = false;
        while let Some(chain) = queue.pop(mem) {
            let head = chain.head_index();
            let len = match chain.writer(mem) {
                Ok(mut w) => w.write_all(b"pong").map_or(0, |_| 4),
                Err(_) => 0,
            };
            added |= queue.publish(mem, head, len);
        }
        added
    }

    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

struct Harness {
    broker: Channel,
    kick: EventFd,
    call: EventFd,
    mem: GuestMemoryMmap,
    resets: Arc<AtomicUsize>,
    worker: JoinHandle<ExitCode>,
}

fn eventfd() -> EventFd {
    EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).unwrap()
}

fn dup(fd: &EventFd) -> OwnedFd {
    fd.as_fd().try_clone_to_owned().unwrap()
}

fn start() -> Harness {
    let memfd =
        nix::sys::memfd::memfd_create("ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&memfd, 0x10_0000).unwrap();
    let regions = [protocol::MemoryRegion {
        guest_addr: 0,
        size: 0x10_0000,
        file_offset: 0,
    }];
    // the test plays the driver through its own mapping of the same memory
    let mem = map_regions(memfd.as_fd(), &regions).unwrap();
    let worker_mem = map_regions(memfd.as_fd(), &regions).unwrap();
    let (broker, worker) = Channel::pair().unwrap();
    let (kick, call) = (eventfd(), eventfd());
    let (kicks, calls) = (vec![dup(&kick)], vec![dup(&call)]);
    let resets = Arc::new(AtomicUsize::new(0));
    let device = Echo {
        resets: resets.clone(),
    };
    let worker = std::thread::spawn(move || {
        let record = crate::inflight::Record::in_memory(1);
        EventLoop::new(
            Arc::new(worker),
            worker_mem,
            kicks,
            calls,
            record,
            Box::new(device),
        )
        .unwrap()
        .run()
    });
    Harness {
        broker,
        kick,
        call,
        mem,
        resets,
        worker,
    }
}

/// The driver's view of the used ring at `USED`.
fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(USED.unchecked_add(2)).unwrap()
}

fn used_elem(mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
    let at = USED.unchecked_add(4 + 8 * u64::from(i % QSIZE));
    (
        mem.read_obj(at).unwrap(),
        mem.read_obj(at.unchecked_add(4)).unwrap(),
    )
}

impl Harness {
    fn send(&self, msg: BrokerMsg) {
        self.broker.send(&msg, &[], false).unwrap();
    }

    /// Whether the worker signalled the call eventfd within `timeout`.
    fn called(&self, timeout: Duration) -> bool {
        if wait_readable(self.call.as_fd(), timeout).is_err() {
            return false;
        }
        self.call.read().unwrap() > 0
    }

    fn activate(&self, q: &MockSplitQueue<GuestMemoryMmap>, features: u64) {
        self.send(BrokerMsg::Activate {
            features,
            queues: vec![QueueConfig {
                index: 0,
                size: QSIZE,
                desc: q.desc_table_addr().0,
                avail: q.avail_addr().0,
                used: USED.0,
            }],
            epoch: 1,
        });
    }
}

fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}

#[test]
fn serves_kicks_with_event_idx_and_obeys_reset_and_shutdown() {
    let h = start();
    let q = MockSplitQueue::create(&h.mem, RING, QSIZE);
    let used_event = q.avail_addr().unchecked_add(4 + 2 * QSIZE as u64);
    let avail_event = USED.unchecked_add(4 + 8 * QSIZE as u64);

    // a buffer and a kick before activation: nothing happens yet
    q.add_desc_chains(&[writable(0x8000, 16)], 0).unwrap();
    h.kick.write(1).unwrap();
    assert!(!h.called(Duration::from_millis(100)));

    // activation looks at the queue at once
    h.activate(&q, EVENT_IDX);
    assert!(h.called(Duration::from_secs(5)));
    assert_eq!(used_idx(&h.mem), 1);
    assert_eq!(used_elem(&h.mem, 0), (0, 4));
    assert_eq!(
        &h.mem.read_obj::<[u8; 4]>(GuestAddress(0x8000)).unwrap(),
        b"pong"
    );
    // the device published how far it got, so the driver knows when to kick again
    assert_eq!(h.mem.read_obj::<u16>(avail_event).unwrap(), 1);

    // the driver does not want an interrupt for the next buffer (used_event 0 is behind)
    q.add_desc_chains(&[writable(0x9000, 16)], 1).unwrap();
    h.kick.write(1).unwrap();
    assert!(!h.called(Duration::from_millis(200)));
    assert_eq!(used_idx(&h.mem), 2);

    // ... but wants one after the third
    h.mem.write_obj(2u16, used_event).unwrap();
    q.add_desc_chains(&[writable(0xa000, 16)], 2).unwrap();
    h.kick.write(1).unwrap();
    assert!(h.called(Duration::from_secs(5)));
    assert_eq!(used_idx(&h.mem), 3);

    // after a reset kicks are ignored
    h.send(BrokerMsg::Reset);
    q.add_desc_chains(&[writable(0xb000, 16)], 3).unwrap();
    h.kick.write(1).unwrap();
    assert!(!h.called(Duration::from_millis(200)));
    assert_eq!(used_idx(&h.mem), 3);
    assert_eq!(h.resets.load(Ordering::SeqCst), 1);

    // config writes are accepted and ignored
    h.send(BrokerMsg::ConfigWrite {
        offset: 0,
        data: vec![1, 2],
    });
    h.send(BrokerMsg::Shutdown);
    assert_eq!(h.worker.join().unwrap(), ExitCode::SUCCESS);
}

#[test]
fn bad_queues_are_left_unused_without_crashing() {
    let h = start();
    let q = MockSplitQueue::create(&h.mem, RING, QSIZE);
    q.add_desc_chains(&[writable(0x8000, 16)], 0).unwrap();
    let bad = |desc: u64, avail: u64, used: u64, size: u16, index: u16| BrokerMsg::Activate {
        features: 0,
        queues: vec![QueueConfig {
            index,
            size,
            desc,
            avail,
            used,
        }],
        epoch: 1,
    };
    let (d, a, u) = (q.desc_table_addr().0, q.avail_addr().0, USED.0);
    for msg in [
        bad(0x20_0000, a, u, QSIZE, 0), // outside guest memory
        bad(d + 8, a, u, QSIZE, 0),     // misaligned
        bad(d, a, 0xf_fff0, QSIZE, 0),  // used ring runs off the end
        bad(d, a, u, 12, 0),            // not a power of two
        bad(d, a, u, 0, 0),             // zero
        bad(d, a, u, QSIZE, 7),         // no such queue
    ] {
        h.send(msg);
        h.kick.write(1).unwrap();
        assert!(!h.called(Duration::from_millis(50)));
    }
    assert_eq!(used_idx(&h.mem), 0);

    // a bogus available index: the worker neither spins nor dies
    h.activate(&q, 0);
    assert!(h.called(Duration::from_secs(5)));
    q.avail().idx().store(1000);
    h.kick.write(1).unwrap();
    assert!(!h.called(Duration::from_millis(100)));

    // still alive: a good activation works
    q.avail().idx().store(1);
    h.activate(&q, 0);
    drop(h.broker);
    assert_eq!(h.worker.join().unwrap(), ExitCode::SUCCESS);
}

#[test]
fn malformed_message_ends_the_worker_with_a_reason() {
    let h = start();
    protocol::channel::send_raw(
        h.broker.as_fd(),
        &[0xff; 7],
        &[],
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    assert_eq!(h.worker.join().unwrap(), ExitCode::FAILURE);
    let (msg, _) = h
        .broker
        .recv::<WorkerMsg>(Some(Duration::from_secs(1)))
        .unwrap();
    assert!(matches!(msg, WorkerMsg::Failed { .. }), "{msg:?}");
}
