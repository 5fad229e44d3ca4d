//! The record against deaths at each step: a "death" is dropping the queue and the tracker
//! (what a dead process loses) and resuming a new queue from the same record.

use super::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SIZE: u16 = 8;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

/// The driver's side: one single-descriptor chain per head.
struct Driver {
    mem: GuestMemoryMmap,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
        for i in 0..SIZE {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&(0x10000 + u64::from(i) * 0x100).to_le_bytes());
            d[8..12].copy_from_slice(&0x100u32.to_le_bytes());
            d[12..14].copy_from_slice(&2u16.to_le_bytes()); // WRITE
            mem.write_slice(&d, GuestAddress(DESC + 16 * u64::from(i)))
                .unwrap();
        }
        Driver { mem, avail_idx: 0 }
    }

    fn offer(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used(&self) -> Vec<(u32, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = USED + 4 + 8 * u64::from(i % SIZE);
                (
                    self.mem.read_obj(GuestAddress(at)).unwrap(),
                    self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        q
    }
}

/// A worker's life on queue 0: its queue and the heads it must serve again.
struct Life<'r> {
    queue: Queue,
    again: VecDeque<u16>,
    record: QueueRecord<'r>,
    recovery: Recovery,
}

impl<'r> Life<'r> {
    /// A worker starting on `record` (resuming if it holds anything).
    fn start(d: &Driver, record: &'r Record, resuming: bool) -> Life<'r> {
        let mut queue = d.queue();
        let q = record.queue(0).unwrap();
        let again = if resuming {
            resume(&mut queue, q, &d.mem)
        } else {
            VecDeque::new()
        };
        Life {
            queue,
            again,
            record: q,
            recovery: Recovery::new(&d.mem).unwrap(),
        }
    }

    fn tracked<'m>(&'m mut self) -> TrackedQueue<'m> {
        TrackedQueue::new(
            &mut self.queue,
            self.record,
            &mut self.again,
            Some(&self.recovery),
        )
    }

    fn pop(&mut self, mem: &GuestMemoryMmap) -> Option<u16> {
        self.tracked().pop(mem).map(|c| c.head_index())
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        assert!(self.tracked().publish(mem, head, len));
    }
}

fn record() -> Record {
    let r = Record::in_memory(1);
    assert!(!r.begin(1));
    assert!(r.begin(1), "the same activation resumes");
    r
}

#[test]
fn out_of_order_completions_survive_a_death_and_complete_once() {
    let mut d = Driver::new();
    let rec = record();
    for h in [3, 5, 1, 6] {
        d.offer(h);
    }
    let mut w = Life::start(&d, &rec, false);
    let taken: Vec<u16> = (0..3).map(|_| w.pop(&d.mem).unwrap()).collect();
    assert_eq!(taken, [3, 5, 1]);
    w.publish(&d.mem, 5, 50);
    drop(w);
    let mut w = Life::start(&d, &rec, true);
    // the two still in flight first, oldest first, then the one never taken
    assert_eq!(w.pop(&d.mem), Some(3));
    assert_eq!(w.pop(&d.mem), Some(1));
    assert_eq!(w.pop(&d.mem), Some(6));
    assert_eq!(w.pop(&d.mem), None);
    for h in [6, 3, 1] {
        w.publish(&d.mem, h, u32::from(h));
    }
    assert_eq!(d.used(), [(5, 50), (6, 6), (3, 3), (1, 1)]);
}

#[test]
fn a_death_between_the_used_ring_and_the_record_completes_nothing_twice() {
    let mut d = Driver::new();
    let rec = record();
    d.offer(2);
    d.offer(4);
    let mut w = Life::start(&d, &rec, false);
    assert_eq!(w.pop(&d.mem), Some(2));
    assert_eq!(w.pop(&d.mem), Some(4));
    // publish's first two steps, then death
    rec.queue(0).unwrap().words[QueueRecord::LAST].store(4, SeqCst);
    w.queue.add_used(&d.mem, 4, 9).unwrap();
    drop(w);
    let mut w = Life::start(&d, &rec, true);
    assert_eq!(w.pop(&d.mem), Some(2));
    assert_eq!(w.pop(&d.mem), None);
    w.publish(&d.mem, 2, 7);
    assert_eq!(d.used(), [(4, 9), (2, 7)]);
}

#[test]
fn a_death_between_taking_and_recording_takes_the_chain_again() {
    let mut d = Driver::new();
    let rec = record();
    d.offer(1);
    d.offer(2);
    let mut w = Life::start(&d, &rec, false);
    assert_eq!(w.pop(&d.mem), Some(1));
    // the ring moved on, the record was not written: death
    assert_eq!(
        w.queue.pop_descriptor_chain(&d.mem).unwrap().head_index(),
        2
    );
    drop(w);
    let mut w = Life::start(&d, &rec, true);
    assert_eq!(w.pop(&d.mem), Some(1));
    assert_eq!(w.pop(&d.mem), Some(2));
    assert_eq!(w.pop(&d.mem), None);
}

#[test]
fn a_chain_is_taken_again_by_its_head_after_the_driver_reused_its_slot() {
    let mut d = Driver::new();
    let rec = record();
    d.offer(0);
    let mut w = Life::start(&d, &rec, false);
    assert_eq!(w.pop(&d.mem), Some(0));
    // the driver cycles the other heads through the ring many times meanwhile
    for round in 0..3u32 {
        for h in 1..SIZE {
            d.offer(h);
            let got = w.pop(&d.mem).unwrap();
            w.publish(&d.mem, got, round);
        }
    }
    drop(w);
    let mut w = Life::start(&d, &rec, true);
    assert_eq!(w.pop(&d.mem), Some(0));
    assert_eq!(w.pop(&d.mem), None);
}

#[test]
fn progress_survives_a_put_back_and_a_death_but_not_a_new_taking() {
    let mut d = Driver::new();
    let rec = record();
    d.offer(3);
    let mut w = Life::start(&d, &rec, false);
    assert_eq!(w.pop(&d.mem), Some(3));
    w.tracked().set_progress(3, 100);
    w.tracked().put_back(3);
    assert_eq!(w.pop(&d.mem), Some(3));
    assert_eq!(w.tracked().progress(3), 100);
    w.tracked().set_progress(3, 150);
    drop(w);
    let mut w = Life::start(&d, &rec, true);
    assert_eq!(w.pop(&d.mem), Some(3));
    assert_eq!(w.tracked().progress(3), 150);
    w.publish(&d.mem, 3, 150);
    // the same head offered again starts from nothing
    d.offer(3);
    assert_eq!(w.pop(&d.mem), Some(3));
    assert_eq!(w.tracked().progress(3), 0);
}

#[test]
fn a_record_of_nonsense_is_bounded_by_the_queue() {
    let mut d = Driver::new();
    let rec = record();
    let q = rec.queue(0).unwrap();
    // heads the queue cannot have, and a used index from nowhere
    for h in [SIZE, 500, 1023] {
        q.take(h, 7);
    }
    q.words[QueueRecord::USED].store(9, SeqCst);
    q.words[QueueRecord::LAST].store(u64::MAX, SeqCst);
    d.offer(1);
    let mut w = Life::start(&d, &rec, true);
    assert_eq!(w.queue.next_avail(), 0);
    assert_eq!(w.pop(&d.mem), Some(1));
    assert_eq!(w.pop(&d.mem), None);
    assert!((SIZE..1024).all(|h| q.position(h).is_none()));
}

#[test]
fn a_new_activation_empties_the_record() {
    let rec = record();
    rec.queue(0).unwrap().take(1, 1);
    assert!(!rec.begin(2));
    assert_eq!(rec.queue(0).unwrap().position(1), None);
}

/// Found by the `inflight_resume` fuzz target: an available ring entry naming a head beyond
/// the queue was handed to the device as a chain, and recorded as taken over the entry of
/// another head (the record keeps heads modulo its largest queue).
#[test]
fn a_head_beyond_the_queue_is_no_chain() {
    let mut d = Driver::new();
    let rec = record();
    let mut w = Life::start(&d, &rec, false);
    d.offer(3);
    d.offer(1024 + 3);
    d.offer(SIZE);
    d.offer(5);
    assert_eq!(w.pop(&d.mem), Some(3));
    assert_eq!(w.pop(&d.mem), Some(5), "heads beyond the queue are skipped");
    assert_eq!(w.pop(&d.mem), None);
    let q = rec.queue(0).unwrap();
    assert_eq!(q.position(3), Some(0), "head 3's record is its own");
    assert_eq!(q.position(5), Some(3));
    w.publish(&d.mem, 3, 0);
    w.publish(&d.mem, 5, 0);
    assert_eq!(d.used(), vec![(3, 0), (5, 0)]);
}
