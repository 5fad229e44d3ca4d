//! Guest memory: the zone RAM regions mapped from the fd the broker passed.
//!
//! The worker maps the regions itself and keeps no reference to the fd (vm-memory's `FileOffset`
//! would keep it open), so the caller can close it before entering the sandbox. On real hvisor
//! that fd maps all of physical memory; once it is closed, only these mappings remain.

use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;

use nix::sys::mman::{mmap, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, SFlag};
use protocol::MemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("no memory regions")]
    Empty,
    #[error("region at {guest_addr:#x}: {reason}")]
    Region { guest_addr: u64, reason: String },
    #[error("memory layout: {0}")]
    Layout(String),
}

/// Maps every region of `fd` shared and read-write. The mappings live as long as the process:
/// dropping the returned memory does not unmap them (and a failure part-way leaves the earlier
/// ones mapped, which is fine for a worker that then exits).
pub fn map_regions(
    fd: BorrowedFd<'_>,
    regions: &[MemoryRegion],
) -> Result<GuestMemoryMmap, MemoryError> {
    if regions.is_empty() {
        return Err(MemoryError::Empty);
    }
    // A regular file (the simulator's memfd) must cover every region, or touching the tail
    // would raise SIGBUS; a device (/dev/hvisor) reports no size.
    let file_size = match fstat(fd) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG => {
            Some(st.st_size as u64)
        }
        Ok(_) => None,
        Err(e) => {
            return Err(MemoryError::Layout(format!("memory fd: {e}")));
        }
    };
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.guest_addr);
    let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    let flags = MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE;
    let mut mapped = Vec::with_capacity(sorted.len());
    for r in sorted {
        let fail = |reason: String| MemoryError::Region {
            guest_addr: r.guest_addr,
            reason,
        };
        let size = usize::try_from(r.size)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| fail(format!("bad size {:#x}", r.size)))?;
        let offset = libc::off_t::try_from(r.file_offset)
            .map_err(|_| fail(format!("bad file offset {:#x}", r.file_offset)))?;
        let end = r
            .file_offset
            .checked_add(r.size)
            .ok_or_else(|| fail("file range overflows".into()))?;
        if let Some(file_size) = file_size.filter(|&s| end > s) {
            return Err(fail(format!(
                "ends at file offset {end:#x}, beyond the memory file ({file_size:#x} bytes)"
            )));
        }
        // SAFETY: a new shared mapping chosen by the kernel: it overlaps no existing mapping and
        // no Rust object refers to it yet. Nothing ever unmaps it.
        let ptr = unsafe { mmap(None, size, prot, flags, fd, offset) }
            .map_err(|e| fail(format!("mmap: {e}")))?;
        // SAFETY: `ptr..ptr + size` is exactly the mapping made above, with these prot and flags,
        // and it stays mapped for the life of the process.
        let region = unsafe {
            MmapRegion::build_raw(ptr.as_ptr().cast(), size.get(), prot.bits(), flags.bits())
        }
        .map_err(|e| fail(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| fail("guest range overflows".into()))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend};

    pub(crate) fn memfd(size: u64) -> OwnedFd {
        let fd = memfd_create("guest-ram", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, size as i64).unwrap();
        fd
    }

    #[test]
    fn regions_are_shared_with_the_fd_and_bounds_checked() {
        let fd = memfd(0x3000);
        let mem = map_regions(
            fd.as_fd(),
            &[
                MemoryRegion {
                    guest_addr: 0x9000_0000,
                    size: 0x1000,
                    file_offset: 0x2000,
                },
                MemoryRegion {
                    guest_addr: 0x8000_0000,
                    size: 0x2000,
                    file_offset: 0,
                },
            ],
        )
        .unwrap();
        assert_eq!(mem.num_regions(), 2);
        let file = std::fs::File::from(fd);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x9000_0010))
            .unwrap();
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 0x2010).unwrap();
        assert_eq!(u32::from_ne_bytes(buf), 0xdead_beef);
        file.write_all_at(b"hi", 0x1ffe).unwrap();
        assert_eq!(
            mem.read_obj::<[u8; 2]>(GuestAddress(0x8000_1ffe)).unwrap(),
            *b"hi"
        );
        // the fd is closed; the mapping stays
        drop(file);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x9000_0010)).unwrap(),
            0xdead_beef
        );
        assert!(mem.read_obj::<u32>(GuestAddress(0x9000_0ffe)).is_err());
        assert!(mem.read_obj::<u8>(GuestAddress(0x8000_2000)).is_err());
    }

    #[test]
    fn bad_layouts_are_errors() {
        let fd = memfd(0x2000);
        let region = |guest_addr, size, file_offset| MemoryRegion {
            guest_addr,
            size,
            file_offset,
        };
        assert!(matches!(
            map_regions(fd.as_fd(), &[]),
            Err(MemoryError::Empty)
        ));
        // beyond the end of the file
        assert!(map_regions(fd.as_fd(), &[region(0, 0x3000, 0)]).is_err());
        assert!(map_regions(fd.as_fd(), &[region(0, 0x1000, 0x1800)]).is_err());
        // zero size, unaligned offset, overflow, overlap
        assert!(map_regions(fd.as_fd(), &[region(0, 0, 0)]).is_err());
        assert!(map_regions(fd.as_fd(), &[region(0, 0x1000, 0x10)]).is_err());
        assert!(map_regions(fd.as_fd(), &[region(u64::MAX - 0xfff, 0x1000, 0)]).is_err());
        assert!(map_regions(fd.as_fd(), &[region(0, 0x1000, u64::MAX)]).is_err());
        assert!(map_regions(
            fd.as_fd(),
            &[region(0, 0x2000, 0), region(0x1000, 0x1000, 0)]
        )
        .is_err());
    }
}
