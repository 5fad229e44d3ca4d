//! For device tests (feature `testing`): the driver's side of a split virtqueue laid out by
//! hand in guest memory, descriptors, available ring and used ring each on their own page.
//! virtio-queue's own mock places the used ring over the end of the available ring, so
//! EVENT_IDX tests cannot use it.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One descriptor: guest address, length, device-writable.
pub type Part = (u64, u32, bool);

/// The counters are public: hostile-ring tests set them by hand.
pub struct Ring {
    pub base: u64,
    pub size: u16,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
}

impl Ring {
    /// A ring of `size` entries at `base` (three pages from there).
    pub fn new(base: u64, size: u16) -> Ring {
        Ring {
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn desc(&self) -> u64 {
        self.base
    }

    pub fn avail(&self) -> u64 {
        self.base + 0x1000
    }

    pub fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// The device's view, as the event loop builds it at activation.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc()))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail()))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used()))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Writes descriptor {addr, len, flags, next} at guest address `at`.
    pub fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(at)).unwrap();
    }

    /// Offers one chain; returns its head.
    pub fn add(&mut self, mem: &GuestMemoryMmap, parts: &[Part]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in parts.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let at = self.desc() + 16 * u64::from(index);
            Self::write_desc(mem, at, addr, len, flags, self.next_desc);
        }
        self.publish(mem, head);
        head
    }

    /// Offers one chain through an indirect table at `table`.
    pub fn add_indirect(&mut self, mem: &GuestMemoryMmap, table: u64, parts: &[Part]) -> u16 {
        for (i, &(addr, len, write)) in parts.iter().enumerate() {
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < parts.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            Self::write_desc(mem, table + 16 * i as u64, addr, len, flags, i as u16 + 1);
        }
        let head = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        let len = 16 * parts.len() as u32;
        let at = self.desc() + 16 * u64::from(head);
        Self::write_desc(mem, at, table, len, VRING_DESC_F_INDIRECT as u16, 0);
        self.publish(mem, head);
        head
    }

    /// Makes chain `head` available.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .unwrap();
    }

    /// Used entries (head, length) published since the last call.
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used() + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used() + 4 + 8 * u64::from(self.used_seen % self.size);
            out.push((
                mem.read_obj(GuestAddress(at)).unwrap(),
                mem.read_obj(GuestAddress(at + 4)).unwrap(),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// The in-flight record a device test keeps for its queues, as the event loop does.
pub struct Records {
    record: crate::inflight::Record,
    again: Vec<std::collections::VecDeque<u16>>,
    recovery: Option<crate::inflight::Recovery>,
}

impl Records {
    pub fn new(num_queues: usize) -> Records {
        let record = crate::inflight::Record::in_memory(num_queues);
        record.begin(1);
        Records {
            record,
            again: vec![Default::default(); num_queues],
            recovery: None,
        }
    }

    /// What a replacement worker does at activation: `queue` (new) goes on where the dead
    /// worker's record says, and the chains it had taken are served again.
    pub fn resume(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) {
        let record = self.record.queue(index).expect("a queue of the record");
        self.again[index] = crate::inflight::resume(queue, record, mem);
        if self.recovery.is_none() {
            self.recovery = crate::inflight::Recovery::new(mem);
        }
    }

    /// The whole record, as the broker's memfd holds it.
    pub fn record(&self) -> &crate::inflight::Record {
        &self.record
    }

    /// Queue `index` as a device sees it.
    pub fn tracked<'m>(
        &'m mut self,
        index: usize,
        queue: &'m mut Queue,
    ) -> crate::inflight::TrackedQueue<'m> {
        crate::inflight::TrackedQueue::new(
            queue,
            self.record.queue(index).expect("a queue of the record"),
            &mut self.again[index],
            self.recovery.as_ref(),
        )
    }
}
