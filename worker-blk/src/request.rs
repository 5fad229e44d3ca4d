//! One virtio-blk request taken apart (virtio 1.2, 5.2.6): a 16-byte header at the start of the
//! device-readable part, a status byte at the very end of the device-writable part, and data in
//! between. Everything here is guest-controlled; it is copied out before it is trusted, and every
//! buffer is checked against guest memory over its whole length. A parsed request is plain data
//! (guest addresses, no pointers), so it can travel to an I/O thread, which takes its slices
//! again, bounds-checked, from its own handle on guest memory.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

pub const HEADER_LEN: u64 = 16;
/// More descriptors than this in one chain is not a request any driver sends (seg_max is 254).
const MAX_DESCRIPTORS: usize = 512;

/// A request whose status byte can be written.
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Device-readable bytes after the header: OUT data, DISCARD/WRITE_ZEROES segments.
    pub readable: Data,
    /// Device-writable bytes before the status byte: IN data, the GET_ID answer.
    pub writable: Data,
    pub status: GuestAddress,
}

/// Guest buffers, checked against guest memory, with the shape the guest gave them.
#[derive(Default)]
pub struct Data {
    ranges: Vec<Range>,
    pub len: u64,
    /// Descriptors that carry bytes, and the most one of them carries: the request's segments.
    pub segments: usize,
    pub largest: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No writable byte in guest memory for the status: complete with used length 0.
    NoStatus,
    /// Malformed, but the status byte can be written: answer IOERR.
    Malformed {
        status: GuestAddress,
        why: &'static str,
    },
}

/// A piece of guest memory as a descriptor (or part of one) names it.
#[derive(Clone, Copy, Debug)]
struct Range {
    addr: GuestAddress,
    len: u64,
}

impl Request {
    /// The bytes a rate limit counts: the data moved (for DISCARD and WRITE_ZEROES, their
    /// segments).
    pub fn data_len(&self) -> u64 {
        self.readable.len + self.writable.len
    }

    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> Result<Self, ParseError> {
        // The chain stops by itself at a descriptor outside the table or a loop (its length is
        // bounded by the queue size); what was seen up to there is the request.
        let descs: Vec<Descriptor> = chain.take(MAX_DESCRIPTORS + 1).collect();
        let status_index = descs
            .iter()
            .rposition(|d| d.is_write_only() && d.len() > 0)
            .ok_or(ParseError::NoStatus)?;
        let last = &descs[status_index];
        let status = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .filter(|&a| mem.check_range(a, 1))
            .ok_or(ParseError::NoStatus)?;
        let bad = |why| ParseError::Malformed { status, why };

        if descs.len() > MAX_DESCRIPTORS {
            return Err(bad("chain too long"));
        }
        let first_writable = descs
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(status_index);
        if descs[first_writable..].iter().any(|d| !d.is_write_only()) {
            return Err(bad("readable descriptor after a writable one"));
        }
        let range = |d: &Descriptor| Range {
            addr: d.addr(),
            len: u64::from(d.len()),
        };
        let readable: Vec<Range> = descs[..first_writable].iter().map(range).collect();
        let mut writable: Vec<Range> = descs[first_writable..=status_index]
            .iter()
            .map(range)
            .collect();
        if let Some(r) = writable.last_mut() {
            r.len -= 1; // the status byte
        }

        let (header, rest) =
            split_front(&readable, HEADER_LEN).ok_or(bad("header shorter than 16 bytes"))?;
        let mut hdr = [0u8; HEADER_LEN as usize];
        let mut at = 0;
        for r in header {
            let end = at + r.len as usize;
            mem.read_slice(&mut hdr[at..end], r.addr)
                .map_err(|_| bad("header outside guest memory"))?;
            at = end;
        }
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());

        Ok(Request {
            kind,
            sector,
            readable: Data::gather(mem, &rest).ok_or(bad("buffer outside guest memory"))?,
            writable: Data::gather(mem, &writable).ok_or(bad("buffer outside guest memory"))?,
            status,
        })
    }
}

impl Data {
    fn gather(mem: &GuestMemoryMmap, ranges: &[Range]) -> Option<Self> {
        let mut data = Data::default();
        for r in ranges.iter().filter(|r| r.len > 0) {
            if !mem.check_range(r.addr, usize::try_from(r.len).ok()?) {
                return None;
            }
            data.ranges.push(*r);
            data.len += r.len;
            data.segments += 1;
            data.largest = data.largest.max(r.len);
        }
        Some(data)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers as bounds-checked slices of `mem`; `None` if any lies outside it.
    pub fn slices<'m>(&self, mem: &'m GuestMemoryMmap) -> Option<Vec<VolatileSlice<'m>>> {
        let mut slices = Vec::with_capacity(self.ranges.len());
        for r in &self.ranges {
            // A range may span two adjacent regions, hence possibly several slices.
            for slice in mem.get_slices(r.addr, usize::try_from(r.len).ok()?) {
                slices.push(slice.ok()?);
            }
        }
        Some(slices)
    }

    /// Copies the first `buf.len()` bytes out; returns how many there were.
    pub fn read_into(&self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> usize {
        self.slices(mem)
            .map_or(0, |s| worker::guest_io::copy_out(&s, buf))
    }

    /// Copies `buf` to the start of the buffers, as far as they go; returns how much fit.
    pub fn write_from(&self, mem: &GuestMemoryMmap, buf: &[u8]) -> usize {
        self.slices(mem)
            .map_or(0, |s| worker::guest_io::copy_in(&s, buf))
    }
}

/// The first `n` bytes of `ranges` and the rest, or `None` if there are fewer than `n`.
fn split_front(ranges: &[Range], n: u64) -> Option<(Vec<Range>, Vec<Range>)> {
    let mut head = Vec::new();
    let mut need = n;
    for (i, r) in ranges.iter().enumerate() {
        if need == 0 {
            return Some((head, ranges[i..].to_vec()));
        }
        let take = r.len.min(need);
        head.push(Range {
            addr: r.addr,
            len: take,
        });
        need -= take;
        if take < r.len {
            let mut rest = vec![Range {
                addr: r.addr.checked_add(take)?,
                len: r.len - take,
            }];
            rest.extend_from_slice(&ranges[i + 1..]);
            return Some((head, rest));
        }
    }
    (need == 0).then_some((head, Vec::new()))
}
