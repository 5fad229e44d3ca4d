//! The worker sandbox: one recipe for every worker, and one seccomp allowlist per device kind.
//!
//! [`enter`] is the only way into the sandbox. It runs after the worker has received its fds and
//! mapped guest memory, and before it reads any guest data.

mod allowlist;

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

/// What the filter does with a call outside the allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Kill the whole worker (`SECCOMP_RET_KILL_PROCESS`); it shows as killed by SIGSYS.
    #[default]
    Kill,
    /// Deliver SIGSYS, which names the call; for finding a missing syscall under a debugger.
    Trap,
    /// Allow the call and log it to the kernel audit log; for developing an allowlist only.
    Log,
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
    let mismatch = match mode {
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    Ok(filter.try_into()?)
}

/// Compiles [`refusals`] into a filter that fails those calls with [`REFUSED_ERRNO`] and
/// allows everything else; stacked on the allowlist, the kernel applies the stricter answer.
pub fn compile_refusals() -> Result<BpfProgram, PolicyError> {
    let rules = refusals()
        .iter()
        .map(|r| (r.nr, Vec::new()))
        .collect::<BTreeMap<i64, Vec<SeccompRule>>>();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(REFUSED_ERRNO as u32),
        target_arch()?,
    )?;
    Ok(filter.try_into()?)
}

fn target_arch() -> Result<TargetArch, PolicyError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| PolicyError::Arch(std::env::consts::ARCH))
}

/// Confines the calling process for good. The order matters: each step needs a privilege that
/// a later step takes away, and the filter comes last so it never has to allow `capset` or
/// `prctl`.
///
/// Must run before any thread is started (capabilities are per thread); the filter itself is
/// installed on every thread (TSYNC) as a safety net.
pub fn enter(kind: DeviceKind, mode: SeccompMode) -> Result<(), PolicyError> {
    // Compiled first: a kind without a policy must fail before anything is dropped.
    let program = compile(kind, mode)?;
    let refusals = compile_refusals()?;

    // Namespaces (user, pid, mount, net, ipc), pivot_root into an empty root, the uid/gid change
    // and rlimits go here, before capabilities are dropped: they need them.

    drop_capabilities()?;
    nix::sys::prctl::set_no_new_privs().map_err(PolicyError::NoNewPrivs)?;
    // The refusals first: once the allowlist is in, seccomp() itself is no longer allowed.
    seccompiler::apply_filter_all_threads(&refusals)?;
    seccompiler::apply_filter_all_threads(&program)?;
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
