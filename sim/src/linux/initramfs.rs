//! A small initramfs, built at run time: an uncompressed `newc` cpio archive (the format the
//! kernel unpacks into its root file system) holding busybox, the kernel modules the guest
//! needs, and an `/init` script.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A `newc` archive being written.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFDIR == S_IFDIR { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    /// A directory and its parents (names without a leading slash).
    pub fn dir(&mut self, name: &str) {
        let mut path = String::new();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(part);
            if self.dirs.insert(path.clone()) {
                let p = path.clone();
                self.entry(&p, S_IFDIR | 0o755, (0, 0), &[]);
            }
        }
    }

    fn parent(&mut self, name: &str) {
        if let Some((dir, _)) = name.rsplit_once('/') {
            self.dir(dir);
        }
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.parent(name);
        self.entry(name, S_IFREG | mode, (0, 0), data);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.parent(name);
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.parent(name);
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // The kernel reads the archive in 512-byte blocks.
        while self.out.len() % 512 != 0 {
            self.out.push(0);
        }
        self.out
    }
}

/// The modules to load for `wanted` (file names without `.ko`, e.g. `virtio_blk`), with their
/// dependencies first, as paths relative to `modules_dir`. Built-in modules are left out.
pub fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let dep = std::fs::read_to_string(modules_dir.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", modules_dir.display()))?;
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let stem = |p: &str| {
        Path::new(p)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .map(|s| s.replace('-', "_"))
            .unwrap_or_default()
    };
    let mut order: Vec<PathBuf> = Vec::new();
    for want in wanted {
        let want = want.replace('-', "_");
        if builtin.lines().any(|l| stem(l) == want) {
            continue;
        }
        let Some(line) = dep
            .lines()
            .find(|l| l.split(':').next().is_some_and(|m| stem(m) == want))
        else {
            bail!(
                "module {want} is neither built in nor in {}",
                modules_dir.display()
            );
        };
        let (module, deps) = line.split_once(':').unwrap();
        // modules.dep lists what a module needs with the most basic last: load in reverse.
        for m in deps
            .split_whitespace()
            .rev()
            .chain(std::iter::once(module.trim()))
        {
            let p = PathBuf::from(m);
            if !order.contains(&p) {
                order.push(p);
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut c = Cpio::new();
        c.file("bin/busybox", 0o755, b"abc");
        c.symlink("bin/sh", "busybox");
        c.char_dev("dev/console", 5, 1);
        let out = c.finish();
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        // "bin" directory first, then the file, each header 110 bytes.
        assert!(out.starts_with(b"070701"));
        assert_eq!(&out[110..114], b"bin\0");
        let file = text.find("bin/busybox").unwrap();
        let hdr = &text[file - 110..file];
        assert_eq!(&hdr[14..22], "000081ed", "regular file, 0755");
        assert_eq!(&hdr[54..62], "00000003", "file size");
        assert_eq!(&hdr[94..102], "0000000c", "name size with NUL");
        assert!(text.contains("TRAILER!!!"));
        let dev = text.find("dev/console").unwrap();
        let hdr = &text[dev - 110..dev];
        assert_eq!(&hdr[14..22], "00002180");
        assert_eq!(&hdr[78..86], "00000005");
        assert_eq!(&hdr[86..94], "00000001");
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/drivers/block/virtio_blk.ko:\n\
             kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n\
             kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/net/core/failover.ko:\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        let order = module_load_order(dir.path(), &["virtio", "virtio_net", "virtio-blk"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/core/failover.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
                "kernel/drivers/block/virtio_blk.ko"
            ]
            .map(PathBuf::from)
        );
        assert!(module_load_order(dir.path(), &["nothere"]).is_err());
    }
}
