//! Zero-copy file I/O on guest buffers: `preadv`/`pwritev` straight into and out of the guest
//! memory slices that vm-memory has bounds-checked, without a bounce buffer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::VolatileSlice;

/// Linux's limit on iovecs per call (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Fills `bufs`, in order, from `fd` starting at byte `offset`. End of file before the buffers
/// are full is an `UnexpectedEof` error.
pub fn read_exact_at(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
) -> io::Result<()> {
    transfer(fd, bufs, offset, Direction::Read)
}

/// Writes all of `bufs`, in order, to `fd` starting at byte `offset`.
pub fn write_all_at(fd: BorrowedFd<'_>, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
    transfer(fd, bufs, offset, Direction::Write)
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Read,
    Write,
}

fn transfer(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_>],
    mut offset: u64,
    dir: Direction,
) -> io::Result<()> {
    // position: slice `first`, byte `skip` within it
    let mut first = 0;
    let mut skip = 0;
    loop {
        while first < bufs.len() && bufs[first].len() == skip {
            first += 1;
            skip = 0;
        }
        if first == bufs.len() {
            return Ok(());
        }
        let batch = &bufs[first..bufs.len().min(first + IOV_MAX)];
        // The guards keep the pointers valid for the call (they matter only for mappings made on
        // demand, which plain mmap regions are not).
        let guards: Vec<PtrGuardMut> = batch.iter().map(|b| b.ptr_guard_mut()).collect();
        let iov: Vec<libc::iovec> = guards
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let start = if i == 0 { skip } else { 0 };
                libc::iovec {
                    iov_base: g.as_ptr().wrapping_add(start).cast(),
                    iov_len: g.len() - start,
                }
            })
            .collect();
        let pos = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // The guest may touch these bytes concurrently: that is shared guest memory, and why no
        // Rust reference to them is ever formed.
        // SAFETY: every iovec lies inside a `VolatileSlice` that vm-memory bounds-checked against
        // a live guest mapping that outlives this call; the kernel accesses only those bytes.
        let n = unsafe {
            match dir {
                Direction::Read => libc::preadv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as _, pos),
                Direction::Write => {
                    libc::pwritev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as _, pos)
                }
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(match dir {
                Direction::Read => io::ErrorKind::UnexpectedEof,
                Direction::Write => io::ErrorKind::WriteZero,
            }));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let left = bufs[first].len() - skip;
            if n >= left {
                n -= left;
                first += 1;
                skip = 0;
            } else {
                skip += n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn slices<'m>(mem: &'m GuestMemoryMmap, parts: &[(u64, usize)]) -> Vec<VolatileSlice<'m>> {
        parts
            .iter()
            .flat_map(|&(a, l)| mem.get_slices(GuestAddress(a), l).map(Result::unwrap))
            .collect()
    }

    #[test]
    fn scatter_gather_round_trip() {
        // two adjacent regions, so one range yields two slices
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();

        let bufs = slices(&mem, &[(0xf00, 0x200), (0x1800, 0), (0x10, 100)]);
        assert!(bufs.len() >= 3, "the first range spans two regions");
        read_exact_at(file.as_fd(), &bufs, 7).unwrap();
        let mut got = vec![0u8; 0x200];
        mem.read_slice(&mut got, GuestAddress(0xf00)).unwrap();
        assert_eq!(got, data[7..7 + 0x200]);
        let mut got = vec![0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0x10)).unwrap();
        assert_eq!(got, data[7 + 0x200..7 + 0x200 + 100]);

        write_all_at(file.as_fd(), &bufs, 5000).unwrap();
        let mut back = vec![0u8; 0x200 + 100];
        file.read_exact_at(&mut back, 5000).unwrap();
        assert_eq!(back, data[7..7 + 0x200 + 100]);

        // past the end of the file
        assert_eq!(
            read_exact_at(file.as_fd(), &bufs, 5100).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        // nothing to do
        read_exact_at(file.as_fd(), &[], 0).unwrap();
    }

    #[test]
    fn more_than_iov_max_slices() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 13) as u8).collect();
        file.write_all(&data).unwrap();
        let parts: Vec<(u64, usize)> = (0..3000).map(|i| (i * 2, 1)).collect();
        let bufs = slices(&mem, &parts);
        read_exact_at(file.as_fd(), &bufs, 0).unwrap();
        for (i, &b) in data.iter().enumerate() {
            assert_eq!(mem.read_obj::<u8>(GuestAddress(i as u64 * 2)).unwrap(), b);
        }
    }
}
