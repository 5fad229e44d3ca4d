//! The virtio-blk device: requests served on the image fd, zero-copy on guest buffers.

use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};

use log::{debug, warn};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use protocol::DeviceSetup;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryMmap};
use worker::guest_io::{read_exact_at, write_all_at};
use worker::{Device, TrackedQueue};

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

pub struct Blk {
    image: File,
    readonly: bool,
    /// In bytes; from the broker, so the worker needs no ioctl to learn it.
    size: u64,
    serial: [u8; ID_BYTES],
}

impl Blk {
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
        Ok(Blk {
            image: File::from(image),
            readonly,
            size,
            serial: id,
        })
    }

    /// Serves one chain; returns the used length (bytes written to the guest, status included).
    fn handle(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let (status, result) = match Request::parse(chain, mem) {
            Ok(req) => {
                let result = self.execute(&req);
                (req.status, result)
            }
            Err(ParseError::NoStatus) => {
                debug!("request without a writable status byte");
                return 0;
            }
            Err(ParseError::Malformed { status, why }) => {
                debug!("malformed request: {why}");
                (status, Err(IOERR))
            }
        };
        let (code, written) = match result {
            Ok(written) => (VIRTIO_BLK_S_OK as Status, written),
            Err(code) => (code, 0),
        };
        // Checked in parse; should the guest remove that memory meanwhile, nothing is written.
        if mem.write_obj(code, status).is_err() {
            return 0;
        }
        written + 1
    }

    /// Carries out a well-formed request; returns the data bytes written into guest buffers.
    fn execute(&mut self, req: &Request) -> Result<u32, Status> {
        match req.kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.data_range(req, &req.writable)?;
                if !req.readable.is_empty() {
                    return Err(IOERR);
                }
                read_exact_at(self.image.as_fd(), &req.writable.slices, offset)
                    .map_err(|e| io_error("read", req, e))?;
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
                write_all_at(self.image.as_fd(), &req.readable.slices, offset)
                    .map_err(|e| io_error("write", req, e))?;
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
            VIRTIO_BLK_T_GET_ID => Ok(req.writable.write_from(&self.serial) as u32),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => self.discard_or_zero(req),
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

    fn discard_or_zero(&mut self, req: &Request) -> Result<u32, Status> {
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
        if segs.read_into(&mut raw) != raw.len() {
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

impl Device for Blk {
    /// A request taken before a restart is simply carried out again: its data is still in
    /// guest memory, and reads and writes of the same sectors are idempotent.
    fn process_queue<'m>(
        &mut self,
        _index: usize,
        queue: &mut TrackedQueue<'m>,
        mem: &'m GuestMemoryMmap,
    ) -> bool {
        let mut added = false;
        while let Some(chain) = queue.pop(mem) {
            let head = chain.head_index();
            let len = self.handle(chain, mem);
            added |= queue.publish(mem, head, len);
        }
        added
    }
}
