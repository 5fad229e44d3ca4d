//! The in-flight record a dead worker left (anything at all) read back by the next worker of
//! the same activation, against a hostile guest's rings; then chains taken and completed.
#![no_main]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use hvisor_fuzz::{guest_memory, queue, take_le, take_u8};
use libfuzzer_sys::fuzz_target;
use protocol::inflight as layout;
use virtio_queue::QueueT;
use worker::inflight::{resume, Record, Recovery, TrackedQueue};

const EPOCH: u64 = 7;

/// A record of the current activation whose queue 0 words come from the input: its two
/// header words, then up to 16 (head, state, progress) entries.
fn record(data: &mut &[u8]) -> Record {
    let words: Box<[AtomicU64]> = (0..layout::words(1)).map(|_| AtomicU64::new(0)).collect();
    words[0].store(layout::MAGIC, SeqCst);
    words[1].store(EPOCH, SeqCst);
    let queue = layout::HEADER_WORDS;
    words[queue].store(take_le::<8>(data), SeqCst);
    words[queue + 1].store(take_le::<8>(data), SeqCst);
    for _ in 0..usize::from(take_u8(data) % 17) {
        let head = take_le::<2>(data) as usize % layout::MAX_QUEUE_SIZE;
        let at = queue + layout::QUEUE_HEADER_WORDS + 2 * head;
        words[at].store(take_le::<8>(data), SeqCst);
        words[at + 1].store(take_le::<8>(data), SeqCst);
    }
    Record::Owned(words)
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let size_bits = take_u8(&mut data);
    let record = record(&mut data);
    let script = take_le::<8>(&mut data);
    let mem = guest_memory(data);
    let mut q = queue(size_bits, false, &mem);
    assert!(
        record.begin(EPOCH),
        "the record of this activation is resumed"
    );
    let qr = record.queue(0).expect("queue 0");
    let mut again = resume(&mut q, qr, &mem);
    let size = q.size();
    assert!(again.len() <= usize::from(size), "{} > {size}", again.len());
    assert!(again.iter().all(|&h| h < size));
    assert_eq!(again.iter().collect::<BTreeSet<_>>().len(), again.len());

    let recovery = Recovery::new(&mem);
    let mut tq = TrackedQueue::new(&mut q, qr, &mut again, recovery.as_ref());
    for round in 0..3 * usize::from(size) {
        let Some(chain) = tq.pop(&mem) else { break };
        let head = chain.head_index();
        assert!(head < size);
        let _ = tq.progress(head);
        match (script >> (2 * (round % 32))) & 3 {
            0 => tq.put_back(head),
            1 => tq.set_progress(head, round as u32),
            _ => {
                tq.publish(&mem, head, 0);
            }
        }
    }
});
