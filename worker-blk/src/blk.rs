//! The virtio-blk device: requests served on the image fd, zero-copy on guest buffers, by a
//! few I/O threads (see [`crate::pool`]) so that as many requests are in flight on the host
//! as the guest submits; the event loop's thread alone touches the rings.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use protocol::{DeviceSetup, Flow, Limit};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use worker::guest_io::{read_exact_at, read_now_at, write_all_at};
use worker::rate_limit::Limiter;
use worker::{counters, Device, Interest, TrackedQueue};

use crate::pool::{Pool, THREADS};
use crate::request::{ParseError, Request};

pub const SECTOR_SIZE: u64 = 512;
/// The limits the broker advertises in the config space; a request beyond them is refused.
pub const SEG_MAX: usize = 254;
pub const SIZE_MAX: u64 = 1 << 20;
pub const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
pub const MAX_DISCARD_SEG: u64 = 1;
/// A DISCARD / WRITE_ZEROES segment: {sector u64, num_sectors u32, flags u32}.
const SEGMENT_LEN: u64 = 16;

const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Why a request failed: the status byte to answer with.
type Status = u8;
const IOERR: Status = VIRTIO_BLK_S_IOERR as Status;
const UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as Status;

/// The image and what is known of it: shared, read-only, by the I/O threads.
pub struct Disk {
    image: File,
    readonly: bool,
    /// In bytes; from the broker, so the worker needs no ioctl to learn it.
    size: u64,
    serial: [u8; ID_BYTES],
    /// Whether the image takes RWF_NOWAIT reads (FUSE, for one, refuses them).
    nowait: AtomicBool,
}

impl Disk {
    pub fn new(setup: &DeviceSetup, fds: Vec<OwnedFd>) -> Result<Self, String> {
        #[allow(unreachable_patterns)] // other device kinds will join DeviceSetup
        let (readonly, size, serial) = match setup {
            DeviceSetup::Blk {
                readonly,
                size,
                serial,
            } => (*readonly, *size, serial),
            _ => return Err("not a blk setup".into()),
        };
        let [image] = <[OwnedFd; 1]>::try_from(fds)
            .map_err(|fds| format!("expected one image fd, got {}", fds.len()))?;
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Ok(Disk {
            image: File::from(image),
            readonly,
            size,
            serial: id,
            nowait: AtomicBool::new(true),
        })
    }

    /// Serves a read at once, on the caller's thread, if the page cache holds all of it;
    /// `None` if it must wait for an I/O thread (which also answers any error).
    pub fn read_cached(&self, req: &Request, mem: &GuestMemoryMmap) -> Option<u32> {
        if req.kind != VIRTIO_BLK_T_IN
            || !req.readable.is_empty()
            || !self.nowait.load(Ordering::Relaxed)
        {
            return None;
        }
        let offset = self.data_range(req, &req.writable).ok()?;
        let bufs = req.writable.slices(mem)?;
        match read_now_at(self.image.as_fd(), &bufs, offset) {
            Ok(true) => {
                counters::add(counters::BYTES_READ, req.writable.len);
                let len = u32::try_from(req.writable.len).map_err(|_| IOERR);
                Some(answer(req.status, len, mem))
            }
            Ok(false) => None,
            Err(e) => {
                debug!("no RWF_NOWAIT reads: {e}");
                self.nowait.store(false, Ordering::Relaxed);
                None
            }
        }
    }

    /// Serves a parsed request; returns the used length (bytes written to the guest, status
    /// included).
    pub fn serve(&self, req: &Request, mem: &GuestMemoryMmap) -> u32 {
        let result = self.execute(req, mem);
        answer(req.status, result, mem)
    }

    /// Carries out a well-formed request; returns the data bytes written into guest buffers.
    fn execute(&self, req: &Request, mem: &GuestMemoryMmap) -> Result<u32, Status> {
        match req.kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.data_range(req, &req.writable)?;
                if !req.readable.is_empty() {
                    return Err(IOERR);
                }
                let bufs = req.writable.slices(mem).ok_or(IOERR)?;
                read_exact_at(self.image.as_fd(), &bufs, offset)
                    .map_err(|e| io_error("read", req, e))?;
                counters::add(counters::BYTES_READ, req.writable.len);
                u32::try_from(req.writable.len).map_err(|_| IOERR)
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return Err(IOERR);
                }
                let offset = self.data_range(req, &req.readable)?;
                if !req.writable.is_empty() {
                    return Err(IOERR);
                }
                let bufs = req.readable.slices(mem).ok_or(IOERR)?;
                write_all_at(self.image.as_fd(), &bufs, offset)
                    .map_err(|e| io_error("write", req, e))?;
                counters::add(counters::BYTES_WRITTEN, req.readable.len);
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.readonly {
                    nix::unistd::fdatasync(&self.image).map_err(|e| {
                        warn!("flush: {e}");
                        IOERR
                    })?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => Ok(req.writable.write_from(mem, &self.serial) as u32),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.discard_or_zero(req, mem),
            other => {
                debug!("unsupported request type {other}");
                Err(UNSUPP)
            }
        }
    }

    /// Checks an IN/OUT data part against the limits and the image; returns the byte offset.
    fn data_range(&self, req: &Request, data: &crate::request::Data) -> Result<u64, Status> {
        if data.len % SECTOR_SIZE != 0 || data.segments > SEG_MAX || data.largest > SIZE_MAX {
            return Err(IOERR);
        }
        self.byte_range(req.sector, data.len)
    }

    /// `sector * 512 .. + len` if it lies inside the image.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, Status> {
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(IOERR)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset),
            _ => Err(IOERR),
        }
    }

    fn discard_or_zero(&self, req: &Request, mem: &GuestMemoryMmap) -> Result<u32, Status> {
        let discard = req.kind == VIRTIO_BLK_T_DISCARD;
        let segs = &req.readable;
        if self.readonly
            || !req.writable.is_empty()
            || segs.is_empty()
            || segs.len % SEGMENT_LEN != 0
            || segs.len / SEGMENT_LEN > MAX_DISCARD_SEG
        {
            return Err(IOERR);
        }
        let mut raw = [0u8; SEGMENT_LEN as usize];
        if segs.read_into(mem, &mut raw) != raw.len() {
            return Err(IOERR);
        }
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
        // 5.2.6.2: unknown flags, and UNMAP on a discard, are UNSUPP
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err(UNSUPP);
        }
        if sectors > MAX_DISCARD_SECTORS {
            return Err(IOERR);
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let offset = self.byte_range(sector, len)?;
        if len == 0 {
            return Ok(0);
        }
        let (off, n) = (offset as libc::off_t, len as libc::off_t);
        // The only fallocate mode the sandbox allows: it frees blocks and never grows the file.
        let punch = FallocateFlags::FALLOC_FL_KEEP_SIZE | FallocateFlags::FALLOC_FL_PUNCH_HOLE;
        if discard {
            // A discard is a hint: a file system that cannot punch holes may ignore it.
            return match fallocate(&self.image, punch, off, n) {
                Ok(()) | Err(Errno::EOPNOTSUPP) => Ok(0),
                Err(e) => Err(io_error("discard", req, e.into())),
            };
        }
        // A hole reads back as zeros; without UNMAP the blocks must stay allocated, so the
        // zeros are written.
        if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            match fallocate(&self.image, punch, off, n) {
                Ok(()) => return Ok(0),
                Err(Errno::EOPNOTSUPP) => {}
                Err(e) => return Err(io_error("write zeroes", req, e.into())),
            }
        }
        write_zeros(&self.image, offset, len).map_err(|e| io_error("write zeroes", req, e))?;
        Ok(0)
    }
}

/// Writes the status byte of a request; returns the used length.
fn answer(status: GuestAddress, result: Result<u32, Status>, mem: &GuestMemoryMmap) -> u32 {
    let (code, written) = match result {
        Ok(written) => (VIRTIO_BLK_S_OK as Status, written),
        Err(code) => {
            counters::add(counters::ERRORS, 1);
            (code, 0)
        }
    };
    // Checked in parse; should the guest remove that memory meanwhile, nothing is written.
    if mem.write_obj(code, status).is_err() {
        return 0;
    }
    written + 1
}

fn io_error(what: &str, req: &Request, e: std::io::Error) -> Status {
    warn!("{what} at sector {}: {e}", req.sector);
    IOERR
}

/// WRITE_ZEROES without UNMAP, or where the file system cannot punch holes.
fn write_zeros(file: &File, mut offset: u64, mut len: u64) -> std::io::Result<()> {
    const CHUNK: usize = 64 * 1024;
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let iov = [IoSlice::new(&ZEROS); 16];
    while len > 0 {
        let want = len.min((CHUNK * iov.len()) as u64) as usize;
        let parts = want.div_ceil(CHUNK);
        let mut bufs = iov[..parts].to_vec();
        if let Some(last) = bufs.last_mut() {
            *last = IoSlice::new(&ZEROS[..want - (parts - 1) * CHUNK]);
        }
        let pos = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        match nix::sys::uio::pwritev(file, &bufs, pos) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                offset += n as u64;
                len -= n as u64;
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The device as the event loop drives it.
pub struct Blk {
    pool: Pool,
    /// Per queue: requests taken from its available ring and not yet in its used ring. At
    /// most the queue size, so a guest that re-offers buffers cannot queue up work without end.
    in_flight: Vec<usize>,
    /// The device's rate limit, shared by its queues.
    limit: Limiter,
}

impl Blk {
    pub fn new(setup: &DeviceSetup, fds: Vec<OwnedFd>) -> Result<Self, String> {
        let disk = Arc::new(Disk::new(setup, fds)?);
        Ok(Blk {
            pool: Pool::new(disk)?,
            in_flight: Vec::new(),
            limit: Limiter::default(),
        })
    }

    fn in_flight(&mut self, index: usize) -> &mut usize {
        if self.in_flight.len() <= index {
            self.in_flight.resize(index + 1, 0);
        }
        &mut self.in_flight[index]
    }

    /// Puts the finished requests of queue `index` in its used ring; whether there were any.
    fn publish(
        &mut self,
        index: usize,
        queue: &mut TrackedQueue<'_>,
        mem: &GuestMemoryMmap,
    ) -> bool {
        let done = self.pool.take_finished(index);
        let n = self.in_flight(index);
        *n = n.saturating_sub(done.len());
        let mut added = false;
        for f in &done {
            added |= queue.publish(mem, f.head, f.len);
        }
        added
    }
}

impl Device for Blk {
    /// A request taken before a restart is simply carried out again: its data is still in
    /// guest memory, and reads and writes of the same sectors are idempotent.
    fn process_queue<'m>(
        &mut self,
        index: usize,
        queue: &mut TrackedQueue<'m>,
        mem: &'m GuestMemoryMmap,
    ) -> bool {
        let mut added = self.publish(index, queue, mem);
        let room = usize::from(queue.size()).saturating_sub(*self.in_flight(index));
        let mut reqs = Vec::new();
        let now = Instant::now();
        while reqs.len() < room {
            let Some(chain) = queue.pop(mem) else {
                break;
            };
            let head = chain.head_index();
            // A malformed request, or a read the page cache holds, is answered here; the rest
            // go to the pool. One the rate limit holds back goes back to the ring, and the
            // queue waits (see `throttled_until`).
            let len = match Request::parse(chain, mem) {
                Ok(req) if !self.limit.admit(1, req.data_len(), now) => {
                    queue.put_back(head);
                    break;
                }
                Ok(req) => match self.pool.disk().read_cached(&req, mem) {
                    Some(len) => len,
                    None => {
                        reqs.push((head, req));
                        continue;
                    }
                },
                Err(ParseError::NoStatus) => {
                    debug!("request without a writable status byte");
                    0
                }
                Err(ParseError::Malformed { status, why }) => {
                    debug!("malformed request: {why}");
                    answer(status, Err(IOERR), mem)
                }
            };
            added |= queue.publish(mem, head, len);
        }
        *self.in_flight(index) += reqs.len();
        if !reqs.is_empty() {
            self.pool.submit(index, reqs, mem);
            // Served already when there are no threads.
            added |= self.publish(index, queue, mem);
        }
        added
    }

    fn spawn_threads(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        self.pool.spawn(THREADS, mem);
        Ok(())
    }

    fn reset(&mut self) {
        self.pool.cancel(|_| true);
        self.in_flight.clear();
        self.limit.stop_waiting();
    }

    fn stop_queue(&mut self, index: usize) {
        self.pool.cancel(|q| q == index);
        *self.in_flight(index) = 0;
        self.limit.stop_waiting();
    }

    fn set_rate_limit(&mut self, flow: Flow, limit: Limit, now: Instant) {
        if flow == Flow::Io {
            self.limit.set(limit, now);
        }
    }

    /// (Its one queue.)
    fn throttled_until(&self, _index: usize) -> Option<Instant> {
        self.limit.until()
    }

    fn host_fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.pool.done_fd()]
    }

    fn host_interest(&self, _index: usize) -> Interest {
        Interest::READ
    }

    fn host_ready(&mut self, _index: usize, _readable: bool, _writable: bool) -> u64 {
        self.pool.acknowledge()
    }
}
