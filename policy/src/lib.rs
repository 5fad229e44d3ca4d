//! The worker sandbox: one recipe for every worker, and one seccomp allowlist per device kind.
//!
//! [`enter`] is the only way into the sandbox. It runs after the worker has received its fds and
//! mapped guest memory, and before it reads any guest data.

mod allowlist;
mod names;
mod sandbox;
pub mod sigsys;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use caps::{CapSet, Capability};
use protocol::DeviceKind;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use allowlist::{allowlist, refusals, Allowed, ArgCheck, Refused, REFUSED_ERRNO};
pub use names::syscall_name;
pub use protocol::msg::SandboxSpec;

/// What the filter does with a call outside the allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Report the call to the broker, then die by SIGSYS (`SECCOMP_RET_KILL_PROCESS`).
    #[default]
    Kill,
    /// Report the call, which fails with ENOSYS; the worker goes on. For finding out what a
    /// new C library needs.
    Trap,
    /// Allow the call and log it to the kernel audit log; for developing an allowlist only.
    Log,
}

impl From<protocol::msg::SeccompAction> for SeccompMode {
    fn from(a: protocol::msg::SeccompAction) -> Self {
        match a {
            protocol::msg::SeccompAction::Kill => SeccompMode::Kill,
            protocol::msg::SeccompAction::Trap => SeccompMode::Trap,
            protocol::msg::SeccompAction::Log => SeccompMode::Log,
        }
    }
}

impl From<SeccompMode> for protocol::msg::SeccompAction {
    fn from(m: SeccompMode) -> Self {
        match m {
            SeccompMode::Kill => protocol::msg::SeccompAction::Kill,
            SeccompMode::Trap => protocol::msg::SeccompAction::Trap,
            SeccompMode::Log => protocol::msg::SeccompAction::Log,
        }
    }
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "trap" => Ok(SeccompMode::Trap),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("unknown seccomp mode {s:?} (kill, trap or log)")),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Trap => "trap",
            SeccompMode::Log => "log",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("no sandbox policy for {0} workers yet")]
    NoAllowlist(DeviceKind),
    #[error("seccomp does not support this architecture ({0})")]
    Arch(&'static str),
    #[error("seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
    #[error("dropping capabilities ({set}): {reason}")]
    Caps { set: &'static str, reason: String },
    #[error("PR_SET_NO_NEW_PRIVS: {0}")]
    NoNewPrivs(nix::errno::Errno),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
    #[error("{what}: {errno}")]
    Step {
        what: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("installing the SIGSYS reporter: {0}")]
    Reporter(std::io::Error),
    #[error("starting the worker's threads: {0}")]
    Threads(String),
}

/// Compiles the allowlist of `kind` into a BPF program for the architecture being built.
pub fn compile(kind: DeviceKind, mode: SeccompMode) -> Result<BpfProgram, PolicyError> {
    let list = allowlist(kind).ok_or(PolicyError::NoAllowlist(kind))?;
    let arch = target_arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allowed in list {
        let alternatives = allowed
            .when
            .iter()
            .map(|alt| {
                let conds = alt
                    .iter()
                    .map(|c| {
                        SeccompCondition::new(
                            c.index,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::MaskedEq(u64::from(c.mask)),
                            u64::from(c.value),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                SeccompRule::new(conds)
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(allowed.nr, alternatives);
    }
    // Kill mode traps too: the SIGSYS reporter names the call, then makes DEATH_CALL, which
    // the death filter (see `compile_death`) answers with SECCOMP_RET_KILL_PROCESS.
    let mismatch = match mode {
        SeccompMode::Kill | SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    Ok(filter.try_into()?)
}

/// Compiles [`refusals`] into filters (one per errno) that fail those calls and allow
/// everything else; stacked on the allowlist, the kernel applies the stricter answer.
pub fn compile_refusals() -> Result<Vec<BpfProgram>, PolicyError> {
    let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for r in refusals() {
        by_errno
            .entry(r.errno)
            .or_default()
            .insert(r.nr, Vec::new());
    }
    by_errno
        .into_iter()
        .map(|(errno, rules)| {
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno as u32),
                target_arch()?,
            )?;
            Ok(filter.try_into()?)
        })
        .collect()
}

/// The filter that kills the process when the SIGSYS reporter makes [`sigsys::DEATH_CALL`].
fn compile_death() -> Result<BpfProgram, PolicyError> {
    let rules = BTreeMap::from([(sigsys::DEATH_CALL, Vec::new())]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

/// Every filter a worker of `kind` installs, in order: refusals first (once the allowlist is
/// in, `seccomp()` itself is no longer allowed), then the death filter, the allowlist last.
pub fn filters(kind: DeviceKind, mode: SeccompMode) -> Result<Vec<BpfProgram>, PolicyError> {
    let mut all = compile_refusals()?;
    if mode == SeccompMode::Kill {
        all.push(compile_death()?);
    }
    all.push(compile(kind, mode)?);
    Ok(all)
}

/// How a worker was confined, as reported to the broker and shown by audits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// What became of the file system root.
    pub root: String,
    /// Anything weaker than the full recipe, said plainly.
    pub notes: Vec<String>,
}

fn target_arch() -> Result<TargetArch, PolicyError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| PolicyError::Arch(std::env::consts::ARCH))
}

/// Confines the calling process for good, in the order of the recipe: (the broker already
/// started it in new user, pid, mount, net, ipc and uts namespaces) an empty read-only root,
/// resource limits, locked securebits, the unprivileged ids, every capability dropped,
/// no_new_privs, and the seccomp filters last, so they never have to allow `capset`, `prctl`,
/// `mount` or `setresuid`. Each step needs a privilege that a later step takes away.
///
/// `socket` is where the SIGSYS reporter sends refused calls. Must run before any thread is
/// started (capabilities are per thread); the filters are installed on every thread (TSYNC).
pub fn enter(
    kind: DeviceKind,
    spec: &SandboxSpec,
    socket: std::os::fd::RawFd,
) -> Result<Confinement, PolicyError> {
    enter_with(kind, spec, socket, || Ok(()))
}

/// [`enter`], with `spawn` run once the process has no privilege left and before it may start
/// no more threads (RLIMIT_NPROC 0) and the filters go in: the only place a worker starts its
/// threads, which inherit all of that. `spawn` must return only once every thread it started
/// runs, since the filters do not allow a thread's startup calls.
pub fn enter_with(
    kind: DeviceKind,
    spec: &SandboxSpec,
    socket: std::os::fd::RawFd,
    spawn: impl FnOnce() -> Result<(), String>,
) -> Result<Confinement, PolicyError> {
    let mode = SeccompMode::from(spec.seccomp);
    // Compiled first: a kind without a policy must fail before anything is dropped.
    let programs = filters(kind, mode)?;
    let mut notes = Vec::new();
    if !spec.namespaces {
        notes.push(
            "no namespaces: the kernel refused them, so the worker shares the host's pid, \
             mount and network namespaces (it still has no capabilities and its own filter)"
                .to_string(),
        );
    } else if !spec.user_namespace {
        notes.push(format!(
            "no user namespace (the kernel refused it): the worker runs as uid {} in the \
             host's user namespace",
            spec.uid
        ));
    }
    let highest_fd = sandbox::highest_fd();
    let root = sandbox::empty_root(spec.namespaces)?;
    sandbox::limit_resources(highest_fd, spec.file_size_limit)?;
    sandbox::lock_securebits()?;
    if !spec.user_namespace {
        sandbox::become_user(spec.uid, spec.gid)?;
    }
    drop_capabilities()?;
    nix::sys::prctl::set_no_new_privs().map_err(PolicyError::NoNewPrivs)?;
    spawn().map_err(PolicyError::Threads)?;
    sandbox::forbid_new_processes()?;
    if mode != SeccompMode::Log {
        sigsys::install(socket, mode == SeccompMode::Kill).map_err(PolicyError::Reporter)?;
    }
    for program in &programs {
        seccompiler::apply_filter_all_threads(program)?;
    }
    Ok(Confinement { root, notes })
}

/// Only the capability and seccomp steps, for a process that cannot or need not change its
/// root and ids (the policy's own tests).
pub fn enter_filters_only(kind: DeviceKind, mode: SeccompMode) -> Result<(), PolicyError> {
    let programs = filters(kind, mode)?;
    drop_capabilities()?;
    nix::sys::prctl::set_no_new_privs().map_err(PolicyError::NoNewPrivs)?;
    for program in &programs {
        seccompiler::apply_filter_all_threads(program)?;
    }
    Ok(())
}

/// Empties every capability set of the calling thread.
fn drop_capabilities() -> Result<(), PolicyError> {
    let fail = |set: &'static str| {
        move |e: caps::errors::CapsError| PolicyError::Caps {
            set,
            reason: e.to_string(),
        }
    };
    // Bounding first, while CAP_SETPCAP is still effective. Without CAP_SETPCAP (a worker started
    // unprivileged) the bounding set cannot be changed; it only limits what execve could grant,
    // and no_new_privs plus the filter rule out execve.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).map_err(fail("read"))? {
        caps::clear(None, CapSet::Bounding).map_err(fail("bounding"))?;
    }
    caps::clear(None, CapSet::Ambient).map_err(fail("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(fail("inheritable"))?;
    caps::clear(None, CapSet::Effective).map_err(fail("effective"))?;
    caps::clear(None, CapSet::Permitted).map_err(fail("permitted"))?;
    Ok(())
}

#[cfg(test)]
mod tests;
