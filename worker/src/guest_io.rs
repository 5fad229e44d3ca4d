//! Zero-copy I/O on guest buffers: `preadv`/`pwritev` (disk images) and `readv`/`writev`
//! (taps, ptys) straight into and out of the guest memory slices that vm-memory has
//! bounds-checked, without a bounce buffer and without a Rust reference to bytes the guest may
//! change at any time; plus small copies between such slices and local buffers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::VolatileSlice;

/// Linux's limit on iovecs per call (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// Fills `bufs`, in order, from `fd` starting at byte `offset`. End of file before the buffers
/// are full is an `UnexpectedEof` error.
pub fn read_exact_at(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
) -> io::Result<()> {
    transfer_at(fd, bufs, offset, Direction::Read)
}

/// Writes all of `bufs`, in order, to `fd` starting at byte `offset`.
pub fn write_all_at(fd: BorrowedFd<'_>, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
    transfer_at(fd, bufs, offset, Direction::Write)
}

/// Fills `bufs` from `fd` at byte `offset` only if that needs no waiting (the page cache holds
/// it all: one `preadv2` with `RWF_NOWAIT`); whether it did. An error is the file's refusal of
/// RWF_NOWAIT (EOPNOTSUPP) or of reading.
pub fn read_now_at(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
) -> io::Result<bool> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let guards: Vec<PtrGuardMut> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let iov = guest_iovecs(&guards, 0);
    if iov.len() > IOV_MAX {
        return Ok(false);
    }
    // SAFETY: every iovec lies inside a `VolatileSlice` that vm-memory bounds-checked against
    // a live guest mapping that outlives this call. The offset goes whole in the low half; the
    // high half adds nothing on 64-bit kernels.
    let n = retry(|| unsafe {
        libc::syscall(
            libc::SYS_preadv2,
            fd.as_raw_fd(),
            iov.as_ptr(),
            iov.len(),
            offset,
            0u64,
            libc::RWF_NOWAIT,
        ) as isize
    });
    match n {
        Ok(n) => Ok(n == total),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// One `writev` of local `head` bytes, then `bufs` from byte `skip` on (a frame on a tap, the
/// rest of a chain on a pty); returns what the fd took. More than [`IOV_MAX`] pieces is an
/// `InvalidInput` error: the caller must not cut a frame in two.
pub fn writev(
    fd: BorrowedFd<'_>,
    head: &[u8],
    bufs: &[VolatileSlice<'_>],
    skip: usize,
) -> io::Result<usize> {
    let guards: Vec<PtrGuardMut> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let mut iov = Vec::with_capacity(bufs.len() + 1);
    if !head.is_empty() {
        iov.push(libc::iovec {
            iov_base: head.as_ptr().cast_mut().cast(),
            iov_len: head.len(),
        });
    }
    iov.extend(guest_iovecs(&guards, skip));
    if iov.len() > IOV_MAX {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    if iov.is_empty() {
        return Ok(0);
    }
    // The guest may change its bytes meanwhile; the kernel copies them once.
    // SAFETY: `head` is borrowed for the call; every other iovec lies inside a bounds-checked
    // `VolatileSlice` of a live guest mapping. The kernel only reads them.
    retry(|| unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) })
}

/// One `readv` into `bufs`, then into local `tail` once they are full (a frame longer than the
/// guest's buffers, on a tap); returns the bytes read (0: end of file or no room).
pub fn readv(fd: BorrowedFd<'_>, bufs: &[VolatileSlice<'_>], tail: &mut [u8]) -> io::Result<usize> {
    let guards: Vec<PtrGuardMut> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let mut iov = guest_iovecs(&guards, 0);
    if !tail.is_empty() {
        iov.push(libc::iovec {
            iov_base: tail.as_mut_ptr().cast(),
            iov_len: tail.len(),
        });
    }
    if iov.len() > IOV_MAX {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    if iov.is_empty() {
        return Ok(0);
    }
    // SAFETY: the guest iovecs lie inside bounds-checked `VolatileSlice`s of a live guest
    // mapping (no Rust reference to those bytes exists); the last may be `tail`, borrowed
    // mutably for the call.
    retry(|| unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) })
}

/// The iovecs of `guards` from byte `skip` of their concatenation on (empty pieces left out).
/// The guards keep the pointers valid for the call (they matter only for mappings made on
/// demand, which plain mmap regions are not).
fn guest_iovecs(guards: &[PtrGuardMut], mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(guards.len());
    for g in guards {
        if skip >= g.len() {
            skip -= g.len();
            continue;
        }
        out.push(libc::iovec {
            iov_base: g.as_ptr().wrapping_add(skip).cast(),
            iov_len: g.len() - skip,
        });
        skip = 0;
    }
    out
}

/// Runs a system call until it is not interrupted.
fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Read,
    Write,
}

fn transfer_at(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_>],
    mut offset: u64,
    dir: Direction,
) -> io::Result<()> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    let guards: Vec<PtrGuardMut> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let mut done = 0;
    while done < total {
        let iov = guest_iovecs(&guards, done);
        let iov = &iov[..iov.len().min(IOV_MAX)];
        let pos = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: every iovec lies inside a `VolatileSlice` that vm-memory bounds-checked against
        // a live guest mapping that outlives this call; the kernel accesses only those bytes.
        let n = retry(|| unsafe {
            match dir {
                Direction::Read => libc::preadv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as _, pos),
                Direction::Write => {
                    libc::pwritev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as _, pos)
                }
            }
        })?;
        if n == 0 {
            return Err(io::Error::from(match dir {
                Direction::Read => io::ErrorKind::UnexpectedEof,
                Direction::Write => io::ErrorKind::WriteZero,
            }));
        }
        done += n;
        offset += n as u64;
    }
    Ok(())
}

/// Writes `data` at byte `offset` of the concatenation of `bufs`; false if it does not fit.
pub fn write_at(bufs: &[VolatileSlice<'_>], mut offset: usize, mut data: &[u8]) -> bool {
    for b in bufs {
        if data.is_empty() {
            break;
        }
        if offset >= b.len() {
            offset -= b.len();
            continue;
        }
        let Ok(part) = b.offset(offset) else {
            return false;
        };
        let n = part.len().min(data.len());
        part.copy_from(&data[..n]);
        data = &data[n..];
        offset = 0;
    }
    data.is_empty()
}

/// `bufs` without their first `n` bytes (fewer if they are shorter).
pub fn skip<'m>(bufs: &[VolatileSlice<'m>], mut n: usize) -> Vec<VolatileSlice<'m>> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        if n >= b.len() {
            n -= b.len();
            continue;
        }
        if let Ok(rest) = b.offset(n) {
            out.push(rest);
        }
        n = 0;
    }
    out
}

/// Copies `bufs` from their start into `out`, as far as either goes; returns the bytes copied.
pub fn copy_out(bufs: &[VolatileSlice<'_>], out: &mut [u8]) -> usize {
    let mut at = 0;
    for b in bufs {
        if at == out.len() {
            break;
        }
        at += b.copy_to(&mut out[at..]);
    }
    at
}

/// Copies `data` into `bufs` from their start, as far as either goes; returns the bytes copied.
pub fn copy_in(bufs: &[VolatileSlice<'_>], data: &[u8]) -> usize {
    let mut at = 0;
    for b in bufs {
        if at == data.len() {
            break;
        }
        let n = b.len().min(data.len() - at);
        b.copy_from(&data[at..at + n]);
        at += n;
    }
    at
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
