//! The run directory (`/run/hvisor-broker` unless `--run-dir` says otherwise): the broker's
//! locks and its control socket. Only root can create anything in it, so no other user can
//! take a lock first (and stop the broker) or put a socket there (and pose as the broker).
//! The broker creates it 0700 if missing; anything else found there (another owner, group or
//! other permissions, a symlink, a parent other users may replace) is refused, never repaired.
//!
//! Locks are `flock`s on files that stay in the directory: deleting a lock file while another
//! broker may have it open would let two brokers each hold "the" lock. They are tiny, and /run
//! is emptied at boot.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;

pub const DEFAULT: &str = "/run/hvisor-broker";

pub struct RunDir {
    path: PathBuf,
    dir: File,
}

impl RunDir {
    /// The broker's: made (0700) if missing.
    pub fn create(path: &Path) -> Result<RunDir> {
        let path = trusted_parent(path)?;
        match nix::unistd::mkdir(&path, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => bail!(
                "cannot create the run directory {}: {e} (the broker keeps its locks and \
                 control socket there; give a writable place with --run-dir)",
                path.display()
            ),
        }
        Self::open_checked(path)
    }

    /// A client's: it must exist.
    pub fn open(path: &Path) -> Result<RunDir> {
        Self::open_checked(trusted_parent(path)?)
    }

    fn open_checked(path: PathBuf) -> Result<RunDir> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let dir = match nix::fcntl::open(&path, flags, Mode::empty()) {
            Ok(fd) => File::from(fd),
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => bail!(
                "the run directory {} is a symlink or not a directory; refusing it",
                path.display()
            ),
            Err(e) => bail!("the run directory {}: {e}", path.display()),
        };
        let meta = dir.metadata()?;
        if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            bail!(
                "the run directory {} must be owned by root with mode 0700 (it is owned by \
                 uid {}, mode {:o}); refusing it",
                path.display(),
                meta.uid(),
                meta.mode() & 0o7777
            );
        }
        Ok(RunDir { path, dir })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes an exclusive (or `shared`) lock on the file `name`; `None` if someone holds a
    /// conflicting one. The lock lasts as long as the returned file.
    pub fn lock(&self, name: &str, shared: bool) -> Result<Option<File>> {
        let flags = OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let file = File::from(
            openat(&self.dir, name, flags, Mode::S_IRUSR | Mode::S_IWUSR)
                .with_context(|| format!("{}/{name}", self.path.display()))?,
        );
        match flock(&file, shared) {
            Ok(()) => Ok(Some(file)),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("locking {}/{name}", self.path.display())),
        }
    }

    /// Removes `name` if it is there (a socket left by a broker that died).
    pub fn remove(&self, name: &str) {
        let _ = nix::unistd::unlinkat(&self.dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir);
    }
}

/// `flock(LOCK_EX or LOCK_SH | LOCK_NB)`.
pub fn flock(file: &File, shared: bool) -> io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `path` with its parent resolved, once every directory above it is known to be one that only
/// root may change: otherwise another user could swap the run directory after it was checked.
fn trusted_parent(path: &Path) -> Result<PathBuf> {
    let path = std::path::absolute(path)?;
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        bail!("{} cannot be the run directory", path.display());
    };
    let parent = config::paths::trusted_dir(parent).map_err(|e| {
        anyhow::anyhow!(
            "the run directory {} is in a place users other than root may change: {e} \
             (give another place with --run-dir)",
            path.display()
        )
    })?;
    Ok(parent.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("hvb").tempdir().unwrap()
    }

    #[test]
    fn made_0700_and_locks_are_exclusive() {
        let t = scratch();
        let run = RunDir::create(&t.path().join("run")).unwrap();
        let meta = std::fs::metadata(run.path()).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);
        let held = run.lock("a.lock", false).unwrap();
        assert!(held.is_some());
        assert!(run.lock("a.lock", false).unwrap().is_none());
        assert!(run.lock("a.lock", true).unwrap().is_none());
        drop(held);
        let r1 = run.lock("a.lock", true).unwrap();
        assert!(r1.is_some() && run.lock("a.lock", true).unwrap().is_some());
        // the same directory again, as a second broker or the audit client finds it
        assert!(RunDir::create(run.path()).is_ok() && RunDir::open(run.path()).is_ok());
    }

    #[test]
    fn refuses_what_it_did_not_make() {
        let t = scratch();
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = RunDir::create(&open).err().unwrap().to_string();
        assert!(e.contains("mode 0700") && e.contains("755"), "{e}");

        let link = t.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let e = RunDir::open(&link).err().unwrap().to_string();
        assert!(e.contains("symlink"), "{e}");

        let shared = t.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = RunDir::create(&shared.join("run"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("users other than root may change"), "{e}");

        let e = RunDir::open(&t.path().join("missing"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
