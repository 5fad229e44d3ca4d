//! System call names, so that a refused call is reported as `openat`, not as a number.

macro_rules! table {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name as i64, stringify!($name)),)*]
    };
}

/// Calls every supported architecture has.
const COMMON: &[(i64, &str)] = table![
    SYS_read, SYS_write, SYS_close, SYS_fstat, SYS_lseek, SYS_mmap, SYS_mprotect, SYS_munmap,
    SYS_brk, SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_ioctl, SYS_pread64,
    SYS_pwrite64, SYS_readv, SYS_writev, SYS_sched_yield, SYS_mremap, SYS_msync, SYS_mincore,
    SYS_madvise, SYS_dup, SYS_dup3, SYS_nanosleep, SYS_getpid, SYS_sendfile, SYS_socket,
    SYS_connect, SYS_accept, SYS_accept4, SYS_sendto, SYS_recvfrom, SYS_sendmsg, SYS_recvmsg,
    SYS_shutdown, SYS_bind, SYS_listen, SYS_getsockname, SYS_getpeername, SYS_socketpair,
    SYS_setsockopt, SYS_getsockopt, SYS_clone, SYS_clone3, SYS_execve, SYS_execveat, SYS_exit,
    SYS_exit_group, SYS_wait4, SYS_waitid, SYS_kill, SYS_tkill, SYS_tgkill, SYS_uname,
    SYS_fcntl, SYS_flock, SYS_fsync, SYS_fdatasync, SYS_truncate, SYS_ftruncate, SYS_getcwd,
    SYS_chdir, SYS_fchdir, SYS_fchmod, SYS_fchown, SYS_umask, SYS_gettimeofday, SYS_getrlimit,
    SYS_setrlimit, SYS_prlimit64, SYS_getrusage, SYS_sysinfo, SYS_times, SYS_ptrace, SYS_getuid,
    SYS_getgid, SYS_setuid, SYS_setgid, SYS_geteuid, SYS_getegid, SYS_setpgid, SYS_getppid,
    SYS_setsid, SYS_setreuid, SYS_setregid, SYS_getgroups, SYS_setgroups, SYS_setresuid,
    SYS_getresuid, SYS_setresgid, SYS_getresgid, SYS_capget, SYS_capset, SYS_personality,
    SYS_statfs, SYS_fstatfs, SYS_getpriority, SYS_setpriority, SYS_mlock, SYS_munlock,
    SYS_mlockall, SYS_munlockall, SYS_prctl, SYS_chroot, SYS_sync, SYS_acct, SYS_mount,
    SYS_umount2, SYS_pivot_root, SYS_swapon, SYS_swapoff, SYS_reboot, SYS_sethostname,
    SYS_setdomainname, SYS_init_module, SYS_delete_module, SYS_finit_module, SYS_gettid,
    SYS_futex, SYS_sched_setaffinity, SYS_sched_getaffinity, SYS_io_setup, SYS_io_submit,
    SYS_epoll_ctl, SYS_epoll_pwait, SYS_epoll_create1, SYS_set_tid_address, SYS_clock_gettime,
    SYS_clock_nanosleep, SYS_openat, SYS_mkdirat, SYS_mknodat, SYS_fchownat, SYS_unlinkat,
    SYS_renameat2, SYS_linkat, SYS_symlinkat, SYS_readlinkat, SYS_fchmodat, SYS_faccessat,
    SYS_pselect6, SYS_ppoll, SYS_unshare, SYS_set_robust_list, SYS_splice, SYS_tee,
    SYS_vmsplice, SYS_utimensat, SYS_timerfd_create, SYS_fallocate, SYS_eventfd2,
    SYS_signalfd4, SYS_pipe2, SYS_inotify_init1, SYS_preadv, SYS_pwritev, SYS_perf_event_open,
    SYS_recvmmsg, SYS_sendmmsg, SYS_name_to_handle_at, SYS_open_by_handle_at, SYS_setns,
    SYS_process_vm_readv, SYS_process_vm_writev, SYS_kcmp, SYS_seccomp, SYS_getrandom,
    SYS_memfd_create, SYS_bpf, SYS_userfaultfd, SYS_membarrier, SYS_copy_file_range,
    SYS_preadv2, SYS_pwritev2, SYS_statx, SYS_io_uring_setup, SYS_io_uring_enter,
    SYS_io_uring_register, SYS_open_tree, SYS_move_mount, SYS_fsopen, SYS_fsmount,
    SYS_pidfd_open, SYS_pidfd_send_signal, SYS_close_range, SYS_openat2, SYS_pidfd_getfd,
    SYS_faccessat2, SYS_restart_syscall, SYS_sigaltstack, SYS_getdents64, SYS_kexec_load,
    SYS_add_key, SYS_keyctl, SYS_landlock_create_ruleset, SYS_landlock_restrict_self,
];

#[cfg(target_arch = "x86_64")]
const ARCH: &[(i64, &str)] = table![
    SYS_open, SYS_stat, SYS_lstat, SYS_poll, SYS_access, SYS_pipe, SYS_select, SYS_dup2,
    SYS_pause, SYS_alarm, SYS_fork, SYS_vfork, SYS_creat, SYS_link, SYS_unlink, SYS_symlink,
    SYS_readlink, SYS_chmod, SYS_chown, SYS_lchown, SYS_mkdir, SYS_rmdir, SYS_rename,
    SYS_epoll_wait, SYS_epoll_create, SYS_arch_prctl, SYS_iopl, SYS_ioperm, SYS_modify_ldt,
    SYS_getdents, SYS_time, SYS_signalfd, SYS_eventfd, SYS_inotify_init, SYS_newfstatat,
];

#[cfg(not(target_arch = "x86_64"))]
const ARCH: &[(i64, &str)] = &[];

/// The name of system call `nr` on this architecture, if known.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    COMMON
        .iter()
        .chain(ARCH)
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::syscall_name;

    #[test]
    fn names() {
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(libc::SYS_getppid), Some("getppid"));
        assert_eq!(syscall_name(-5), None);
    }
}
