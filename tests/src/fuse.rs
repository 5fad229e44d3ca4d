//! A tiny FUSE file system of our own, straight on `/dev/fuse` (root mounts it; no libfuse):
//! one file, `image`, whose bytes live in a backing file, opened for direct I/O so that every
//! read and write of a process reaches this server as its own request. Each READ or WRITE is
//! answered after a fixed delay, as a slow disk would (many can wait at once), or, with a
//! barrier, only once that many READs wait at the same time, which shows that a device
//! keeps them in flight together.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const ROOT: u64 = 1;
const IMAGE: u64 = 2;
const MAX_WRITE: u32 = 1 << 20;
const IN_HEADER: usize = 40;
/// Opcodes (linux/fuse.h).
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const BATCH_FORGET: u32 = 42;
const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
const FUSE_MAX_PAGES: u32 = 1 << 22;

/// When READs and WRITEs are answered.
#[derive(Debug, Clone, Copy)]
pub enum Timing {
    /// Each after this long.
    Delay(Duration),
    /// Held until this many READs wait at once, then all answered (and every later request
    /// at once); held no longer than the hang guard.
    Barrier { reads: usize, hang_guard: Duration },
}

/// Replies waiting for their time, and what was seen.
#[derive(Default)]
struct Pending {
    replies: VecDeque<(Instant, Vec<u8>, bool)>,
    /// Most READs waiting at once.
    most_reads: usize,
    barrier_met: bool,
}

/// A mounted file system; unmounted when dropped.
pub struct SlowFs {
    dir: PathBuf,
    pending: Arc<(Mutex<Pending>, Condvar)>,
}

impl SlowFs {
    /// Mounts on `dir` (an empty directory) a file `image` of `backing`'s size and bytes.
    pub fn mount(dir: &Path, backing: File, timing: Timing) -> Result<Self> {
        let size = backing.metadata()?.len();
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .context("opening /dev/fuse")?;
        let opts = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            dev.as_raw_fd()
        );
        nix::mount::mount(
            Some("hvisor-slowfs"),
            dir,
            Some("fuse.hvisor-slowfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .with_context(|| format!("mounting FUSE on {}", dir.display()))?;
        let pending = Arc::new((Mutex::new(Pending::default()), Condvar::new()));
        let dev = Arc::new(dev);
        let server = Server {
            dev: dev.clone(),
            backing,
            size,
            timing,
            pending: pending.clone(),
        };
        std::thread::spawn(move || server.run());
        let answers = pending.clone();
        std::thread::spawn(move || answer(&dev, &answers));
        Ok(SlowFs {
            dir: dir.to_owned(),
            pending,
        })
    }

    pub fn image(&self) -> PathBuf {
        self.dir.join("image")
    }

    /// The most READs that waited for their answer at the same time.
    pub fn most_reads_at_once(&self) -> usize {
        self.pending.0.lock().unwrap().most_reads
    }

    /// Whether the barrier was met (rather than given up on).
    pub fn barrier_met(&self) -> bool {
        self.pending.0.lock().unwrap().barrier_met
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        // Lazily: whoever still has the image open gets errors from then on.
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

struct Server {
    dev: Arc<File>,
    backing: File,
    size: u64,
    timing: Timing,
    pending: Arc<(Mutex<Pending>, Condvar)>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// `struct fuse_out_header` and the body.
fn reply(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(&(-error).to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// `struct fuse_attr` (88 bytes).
fn attr(ino: u64, size: u64) -> Vec<u8> {
    let mode = if ino == ROOT {
        libc::S_IFDIR | 0o755
    } else {
        libc::S_IFREG | 0o644
    };
    let mut a = Vec::with_capacity(88);
    for v in [ino, size, size.div_ceil(512), 0, 0, 0] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    for v in [0, 0, 0, mode, 1, 0, 0, 0, 4096, 0u32] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    a
}

impl Server {
    fn run(self) {
        let mut buf = vec![0u8; MAX_WRITE as usize + 4096];
        loop {
            let n = match (&*self.dev).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                // ENODEV: unmounted
                Err(_) => return,
            };
            if n >= IN_HEADER {
                self.handle(&buf[..n]);
            }
        }
    }

    fn handle(&self, req: &[u8]) {
        let (opcode, unique, node) = (u32_at(req, 4), u64_at(req, 8), u64_at(req, 16));
        let arg = &req[IN_HEADER..];
        let out = match opcode {
            INIT => {
                let mut o = Vec::with_capacity(64);
                for v in [7u32, 31, 0, FUSE_MAX_PAGES] {
                    o.extend_from_slice(&v.to_le_bytes());
                }
                o.extend_from_slice(&16u16.to_le_bytes()); // max_background
                o.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
                o.extend_from_slice(&MAX_WRITE.to_le_bytes());
                o.extend_from_slice(&1u32.to_le_bytes()); // time_gran
                o.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_le_bytes());
                o.resize(64, 0);
                reply(unique, 0, &o)
            }
            LOOKUP if node == ROOT && arg.starts_with(b"image\0") => {
                let mut o = Vec::with_capacity(128);
                for v in [IMAGE, 0, 0, 0] {
                    o.extend_from_slice(&v.to_le_bytes());
                }
                o.extend_from_slice(&[0; 8]);
                o.extend_from_slice(&attr(IMAGE, self.size));
                reply(unique, 0, &o)
            }
            LOOKUP => reply(unique, libc::ENOENT, &[]),
            GETATTR => {
                let mut o = vec![0u8; 16];
                o.extend_from_slice(&attr(node, if node == IMAGE { self.size } else { 0 }));
                reply(unique, 0, &o)
            }
            OPEN => {
                let mut o = vec![0u8; 16];
                o[8..12].copy_from_slice(
                    &(FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES).to_le_bytes(),
                );
                reply(unique, 0, &o)
            }
            READ => {
                let (offset, size) = (u64_at(arg, 8), u32_at(arg, 16) as u64);
                let len = size.min(self.size.saturating_sub(offset)) as usize;
                let mut data = vec![0u8; len];
                let error = match self.backing.read_exact_at(&mut data, offset) {
                    Ok(()) => 0,
                    Err(_) => libc::EIO,
                };
                return self.later(reply(unique, error, &data), true);
            }
            WRITE => {
                let (offset, size) = (u64_at(arg, 8), u32_at(arg, 16) as usize);
                let data = &arg[40..(40 + size).min(arg.len())];
                let (error, n) = match self.backing.write_all_at(data, offset) {
                    Ok(()) => (0, data.len() as u32),
                    Err(_) => (libc::EIO, 0),
                };
                let mut o = n.to_le_bytes().to_vec();
                o.extend_from_slice(&[0; 4]);
                return self.later(reply(unique, error, &o), false);
            }
            STATFS => reply(unique, 0, &[0u8; 80]),
            FSYNC | FLUSH | RELEASE => reply(unique, 0, &[]),
            FORGET | BATCH_FORGET => return,
            _ => reply(unique, libc::ENOSYS, &[]),
        };
        let _ = (&*self.dev).write(&out);
    }

    /// Queues a READ or WRITE answer for its time.
    fn later(&self, out: Vec<u8>, read: bool) {
        let (lock, cv) = &*self.pending;
        let mut p = lock.lock().unwrap();
        let now = Instant::now();
        let due = match self.timing {
            Timing::Delay(d) => now + d,
            Timing::Barrier { .. } if p.barrier_met => now,
            Timing::Barrier { hang_guard, .. } => now + hang_guard,
        };
        p.replies.push_back((due, out, read));
        let reads = p.replies.iter().filter(|r| r.2).count();
        p.most_reads = p.most_reads.max(reads);
        if let Timing::Barrier { reads: want, .. } = self.timing {
            if reads >= want && !p.barrier_met {
                p.barrier_met = true;
                p.replies.iter_mut().for_each(|r| r.0 = now);
            }
        }
        cv.notify_one();
    }
}

/// Sends each queued answer at its time (replies are queued in order of their time, but for
/// those a met barrier moved up, which are due at once).
fn answer(dev: &File, pending: &(Mutex<Pending>, Condvar)) {
    // Sleeps end when asked, not up to 50 us later.
    // SAFETY: PR_SET_TIMERSLACK takes an integer; no memory is passed.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
    let (lock, cv) = pending;
    let mut p = lock.lock().unwrap();
    loop {
        let now = Instant::now();
        let Some(i) = p
            .replies
            .iter()
            .position(|r| r.0 <= now)
            .or_else(|| (!p.replies.is_empty()).then_some(usize::MAX))
        else {
            p = cv.wait(p).unwrap();
            continue;
        };
        if i == usize::MAX {
            let next = p.replies.iter().map(|r| r.0).min().unwrap_or(now);
            p = cv.wait_timeout(p, next - now).unwrap().0;
            continue;
        }
        let (_, out, _) = p.replies.remove(i).unwrap();
        drop(p);
        // ENOENT: the request was interrupted; ENODEV: unmounted.
        let _ = (&*dev).write(&out);
        p = lock.lock().unwrap();
    }
}
