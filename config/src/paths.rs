//! Host paths the broker opens or creates as root (`img`, `pty_link`), resolved so that no
//! unprivileged user can redirect them, in the spirit of sshd's StrictModes.
//!
//! A path is walked one name at a time from `/`, following symlinks as the kernel would. Every
//! directory a name is looked up in must be owned by root (or the broker's own user) and not
//! writable by group or others. A sticky directory writable by others (like `/tmp`) is passed
//! only on the way to a directory owned by root: a file, a symlink or a missing name in it could
//! be someone else's. A symlink is thus trusted exactly when its target path passes the same
//! rules. The result is a path without symlinks whose every step only root can change; it is
//! opened with `O_NOFOLLOW` all the same.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::libc;

/// Linux's MAXSYMLINKS.
const MAX_LINKS: u32 = 40;
const GROUP_OR_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// Why a path was not resolved.
enum WalkError {
    /// The system said no (a name is missing, no permission, ...).
    Io(PathBuf, io::Error),
    /// A user other than root could change where the path leads.
    Unsafe(String),
}

/// Where a walk ended.
struct Walked {
    /// Without symlinks, `.` or `..`; the last name that exists.
    path: PathBuf,
    meta: Metadata,
    /// `path` is a sticky directory others can write to.
    shared: bool,
    /// Names after `path` that do not exist (only when missing names are allowed).
    missing: Vec<OsString>,
}

fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Checks a directory the walk goes through; `Ok(true)` for a sticky one others can write.
fn check_dir(path: &Path, meta: &Metadata) -> Result<bool, WalkError> {
    if !trusted_owner(meta.uid()) {
        return Err(WalkError::Unsafe(format!(
            "{path:?} is owned by uid {}; only root or the broker's user may own a directory on the path",
            meta.uid()
        )));
    }
    if meta.mode() & GROUP_OR_OTHER_WRITE == 0 {
        Ok(false)
    } else if meta.mode() & STICKY != 0 {
        Ok(true)
    } else {
        Err(WalkError::Unsafe(format!(
            "{path:?} is writable by group or others"
        )))
    }
}

fn lstat(path: &Path) -> Result<Metadata, WalkError> {
    std::fs::symlink_metadata(path).map_err(|e| WalkError::Io(path.to_owned(), e))
}

/// The names of `path` (`..` kept, `.` dropped), and whether it is absolute.
fn names(path: &Path) -> (bool, Vec<OsString>) {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_owned()),
            Component::ParentDir => out.push("..".into()),
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
        }
    }
    (path.has_root(), out)
}

/// Walks `path` (relative to the current directory) following every symlink, checking each
/// directory on the way. With `missing_ok`, a missing name ends the walk and it and the rest are
/// returned as `missing`.
fn walk(path: &Path, missing_ok: bool) -> Result<Walked, WalkError> {
    let path = if path.is_absolute() {
        path.to_owned()
    } else {
        let cwd = std::env::current_dir().map_err(|e| WalkError::Io(".".into(), e))?;
        cwd.join(path)
    };
    let root = Path::new("/");
    let root_meta = lstat(root)?;
    // The directories walked into, each with its metadata and whether it is shared.
    let mut dirs = vec![(root.to_path_buf(), check_dir(root, &root_meta)?, root_meta)];
    let mut pending: VecDeque<OsString> = names(&path).1.into();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        let (dir, shared, _) = dirs.last().expect("the root is never popped");
        if name == ".." {
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        let here = dir.join(&name);
        let meta = match std::fs::symlink_metadata(&here) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && missing_ok => {
                if *shared {
                    return Err(in_shared_dir(&here, dir));
                }
                let missing: Vec<OsString> = std::iter::once(name).chain(pending).collect();
                if missing.iter().any(|n| n == "..") {
                    return Err(WalkError::Unsafe(format!(
                        "'..' below the missing {here:?}"
                    )));
                }
                let (path, shared, meta) = dirs.pop().expect("the root is never popped");
                return Ok(Walked {
                    path,
                    meta,
                    shared,
                    missing,
                });
            }
            other => other.map_err(|e| WalkError::Io(here.clone(), e))?,
        };
        let ft = meta.file_type();
        if *shared && !(ft.is_dir() && trusted_owner(meta.uid())) {
            return Err(in_shared_dir(&here, dir));
        }
        if ft.is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(WalkError::Io(
                    here,
                    io::Error::from_raw_os_error(libc::ELOOP),
                ));
            }
            let target = std::fs::read_link(&here).map_err(|e| WalkError::Io(here.clone(), e))?;
            let (absolute, target_names) = names(&target);
            if absolute {
                dirs.truncate(1);
            }
            for n in target_names.into_iter().rev() {
                pending.push_front(n);
            }
        } else if ft.is_dir() {
            let shared = check_dir(&here, &meta)?;
            dirs.push((here, shared, meta));
        } else if pending.is_empty() {
            return Ok(Walked {
                path: here,
                meta,
                shared: false,
                missing: Vec::new(),
            });
        } else {
            return Err(WalkError::Io(
                here,
                io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }
    }
    let (path, shared, meta) = dirs.pop().expect("the root is never popped");
    Ok(Walked {
        path,
        meta,
        shared,
        missing: Vec::new(),
    })
}

fn in_shared_dir(here: &Path, dir: &Path) -> WalkError {
    WalkError::Unsafe(format!(
        "{here:?} is in {dir:?}, a sticky directory others can write to \
         (only a directory of root's may be used below one)"
    ))
}

/// Opens the disk image `img`, read-only or read-write, once the path is safe: a regular file
/// or a block device, reached only through directories root controls (a symlink is followed
/// when its target passes the same checks). The error names `img` and what is wrong.
pub fn open_image(img: &Path, readonly: bool) -> Result<File, String> {
    let mode = if readonly { "read-only" } else { "read-write" };
    let cannot = |e: io::Error| format!("cannot open {img:?} {mode}: {e}");
    let walked = match walk(img, false) {
        Ok(w) => w,
        Err(WalkError::Io(_, e)) => return Err(cannot(e)),
        Err(WalkError::Unsafe(why)) => return Err(format!("{img:?} is not safe to open: {why}")),
    };
    let ft = walked.meta.file_type();
    if ft.is_dir() {
        return Err(format!("{img:?} is a directory"));
    }
    // Anything else is refused before opening, since opening a FIFO would block.
    if !ft.is_file() && !ft.is_block_device() {
        return Err(format!(
            "{img:?} is neither a regular file nor a block device"
        ));
    }
    OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&walked.path)
        .map_err(cannot)
}

/// The directory `dir` without symlinks, once it is safe: reached only through directories
/// root controls, and itself one no other user may write to (not even a sticky one).
pub fn trusted_dir(dir: &Path) -> Result<PathBuf, String> {
    let walked = walk(dir, false).map_err(|e| match e {
        WalkError::Io(p, e) => format!("{p:?}: {e}"),
        WalkError::Unsafe(why) => format!("{dir:?} is not safe: {why}"),
    })?;
    if !walked.meta.is_dir() {
        return Err(format!("{:?} is not a directory", walked.path));
    }
    if walked.shared {
        return Err(format!(
            "{:?} is a sticky directory others can write to",
            walked.path
        ));
    }
    Ok(walked.path)
}

/// Where a `pty_link` goes: `missing` directories to make below `dir`, then the link `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPlace {
    /// The deepest directory that exists, without symlinks.
    pub dir: PathBuf,
    pub missing: Vec<OsString>,
    pub name: OsString,
}

impl LinkPlace {
    /// The link's path without symlinks: two configured paths name one link exactly when
    /// their places' paths are equal.
    pub fn path(&self) -> PathBuf {
        let mut p = self.dir.clone();
        p.extend(&self.missing);
        p.push(&self.name);
        p
    }
}

/// A symlink target that is a pty slave (`/dev/pts/N`): a link made by an earlier run of ours.
fn is_pty_target(target: &Path) -> bool {
    target
        .to_str()
        .and_then(|t| t.strip_prefix("/dev/pts/"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks where `link` (absolute, without `..`) would be made: its directories are safe (or
/// missing below a safe one), and nothing is there but, at most, a link to a pty.
pub fn link_place(link: &Path) -> Result<LinkPlace, String> {
    let (absolute, parts) = names(link);
    let name = match parts.last() {
        Some(n) if absolute && !parts.iter().any(|p| p == "..") => n.clone(),
        _ => return Err(format!("{link:?} must be an absolute path without '..'")),
    };
    let parent = link.parent().unwrap_or(Path::new("/"));
    let walked = walk(parent, true).map_err(|e| match e {
        WalkError::Io(p, e) => format!("{p:?}: {e}"),
        WalkError::Unsafe(why) => format!("{link:?} is not a safe place for a link: {why}"),
    })?;
    if !walked.meta.is_dir() {
        return Err(format!("{:?} is not a directory", walked.path));
    }
    if walked.shared {
        return Err(format!(
            "{link:?} is not a safe place for a link: {:?} is a sticky directory others can write to",
            walked.path
        ));
    }
    let place = LinkPlace {
        dir: walked.path,
        missing: walked.missing,
        name,
    };
    if place.missing.is_empty() {
        check_existing(&place.path())?;
    }
    Ok(place)
}

/// Nothing at `path`, or a link of ours to a pty.
fn check_existing(path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other.map_err(|e| format!("{path:?}: {e}"))?,
    };
    if !meta.file_type().is_symlink() {
        return Err(format!("{path:?} exists and is not a symlink"));
    }
    let target = std::fs::read_link(path).map_err(|e| format!("{path:?}: {e}"))?;
    if !is_pty_target(&target) {
        return Err(format!(
            "{path:?} exists and is not a pty link (it points to {target:?})"
        ));
    }
    Ok(())
}
