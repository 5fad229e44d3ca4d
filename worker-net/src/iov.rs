//! One frame per system call between the tap and guest buffers: `writev` straight out of the
//! guest memory slices vm-memory has bounds-checked, and `readv` straight into them, with a
//! local tail buffer for whatever does not fit.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::VolatileSlice;

/// Linux's limit on iovecs per call (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// Writes `head` and then `bufs` as one frame; returns the bytes the tap took (a tap takes all
/// or nothing).
pub fn write_frame(
    fd: BorrowedFd<'_>,
    head: &[u8],
    bufs: &[VolatileSlice<'_>],
) -> io::Result<usize> {
    if bufs.len() >= IOV_MAX {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // The guards keep the pointers valid for the call (they matter only for mappings made on
    // demand, which plain mmap regions are not).
    let guards: Vec<PtrGuardMut> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let mut iov = Vec::with_capacity(bufs.len() + 1);
    iov.push(libc::iovec {
        iov_base: head.as_ptr().cast_mut().cast(),
        iov_len: head.len(),
    });
    iov.extend(guards.iter().map(|g| libc::iovec {
        iov_base: g.as_ptr().cast(),
        iov_len: g.len(),
    }));
    loop {
        // The guest may change its bytes meanwhile: they are its frame, and the kernel copies
        // them once, so it sends what it read.
        // SAFETY: the first iovec is `head`, borrowed for the call; every other lies inside a
        // `VolatileSlice` that vm-memory bounds-checked against a live guest mapping that
        // outlives this call. The kernel only reads them.
        let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads one frame into `bufs`, then into `tail` once they are full; returns the bytes read
/// (a tap cuts a longer frame to the space given).
pub fn read_frame(
    fd: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_>],
    tail: &mut [u8],
) -> io::Result<usize> {
    if bufs.len() >= IOV_MAX {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    let guards: Vec<PtrGuardMut> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
    let mut iov: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect();
    iov.push(libc::iovec {
        iov_base: tail.as_mut_ptr().cast(),
        iov_len: tail.len(),
    });
    loop {
        // SAFETY: the guest iovecs lie inside bounds-checked `VolatileSlice`s of a live guest
        // mapping (no Rust reference to those bytes exists, so the kernel writing them is fine),
        // and the last one is `tail`, borrowed mutably for the call.
        let n = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
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
