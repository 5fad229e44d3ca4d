//! `readv`/`writev` between the pty and guest buffers, straight from and into the guest memory
//! slices vm-memory has bounds-checked: no bounce buffer, and no Rust reference to bytes the
//! guest may change at any time.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::VolatileSlice;

/// Linux's limit on iovecs per call (`UIO_MAXIOV`); longer chains take several calls.
const IOV_MAX: usize = 1024;

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

/// One `writev` of `bufs` from byte `skip` on; returns how much the fd took (0 only when
/// nothing is left). EAGAIN and other errors are returned as they are.
pub fn write_from(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_>],
    skip: usize,
) -> io::Result<usize> {
    transfer(fd, bufs, skip, Direction::Write)
}

/// One `readv` into `bufs` from their start; returns how much was read (0: end of file, or
/// no room at all).
pub fn read_into(fd: BorrowedFd<'_>, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
    transfer(fd, bufs, 0, Direction::Read)
}

fn transfer(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_>],
    mut skip: usize,
    dir: Direction,
) -> io::Result<usize> {
    let mut first = 0;
    while first < bufs.len() && bufs[first].len() <= skip {
        skip -= bufs[first].len();
        first += 1;
    }
    let batch = &bufs[first..bufs.len().min(first + IOV_MAX)];
    if batch.is_empty() {
        return Ok(0);
    }
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
    loop {
        // SAFETY: every iovec lies inside a `VolatileSlice` that vm-memory bounds-checked against
        // a live guest mapping that outlives this call; the kernel touches only those bytes.
        let n = unsafe {
            match dir {
                Direction::Read => libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as _),
                Direction::Write => libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as _),
            }
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
