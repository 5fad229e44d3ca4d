//! The SIGSYS reporter: names a refused system call before the worker dies.
//!
//! The allowlist answers a refused call with SECCOMP_RET_TRAP; this handler then sends the
//! call's number to the broker (a fixed-size message built without allocating) and, in kill
//! mode, makes the one call a third filter kills the process for. Only async-signal-safe
//! system calls are made: sendmsg and that last one. Nothing goes to stderr, which is
//! /dev/null in a worker.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use protocol::msg::encode_violation;

/// The call whose only purpose, once the filters are in, is to end the process by SIGSYS.
pub const DEATH_CALL: i64 = libc::SYS_getppid;

static SOCKET: AtomicI32 = AtomicI32::new(-1);
static DIE: AtomicBool = AtomicBool::new(true);

/// Installs the handler; `socket` is the worker's socket to the broker. In trap mode
/// (`die == false`) the refused call fails with ENOSYS and the worker goes on.
pub fn install(socket: RawFd, die: bool) -> std::io::Result<()> {
    SOCKET.store(socket, Ordering::Relaxed);
    DIE.store(die, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature and only
    // makes async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn handler(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS: after the three ints of the header
    // (padded to 16 bytes) come `_call_addr` (8 bytes), `_syscall` (int) and `_arch` (uint).
    let (nr, arch) = unsafe {
        let base = info.cast::<u8>();
        (
            base.add(24).cast::<i32>().read_unaligned(),
            base.add(28).cast::<u32>().read_unaligned(),
        )
    };
    report(nr, arch);
    if DIE.load(Ordering::Relaxed) {
        // SAFETY: a raw system call with no arguments; the death filter kills the process here.
        unsafe { libc::syscall(DEATH_CALL) };
    }
    set_return(ctx, -(libc::ENOSYS as i64));
}

fn report(nr: i32, arch: u32) {
    let msg = encode_violation(i64::from(nr), arch);
    // SAFETY: plain system calls on buffers that live on this stack frame.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        libc::sendmsg(
            SOCKET.load(Ordering::Relaxed),
            &hdr,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

/// Makes the trapped call return `value`, by writing the return register of the saved context.
fn set_return(ctx: *mut libc::c_void, value: i64) {
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes the interrupted context of this thread; the return register is
    // restored from it by rt_sigreturn.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        {
            (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = value;
        }
        #[cfg(target_arch = "aarch64")]
        {
            (*uc).uc_mcontext.regs[0] = value as u64;
        }
        #[cfg(target_arch = "riscv64")]
        {
            (*uc).uc_mcontext.__gregs[10] = value as u64;
        }
    }
}
