//! Root-zone physical memory: one sparse memfd, offset X = physical address X, exactly what
//! `mmap(/dev/hvisor, offset = X)` gives the real backend.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use anyhow::{bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::layout::Machine;

const PAGE: u64 = 4096;

/// One guest RAM region mapped into this process (at its zone0_ipa offset of the memfd).
#[derive(Debug)]
pub struct Mapping {
    pub zone: u32,
    pub zone0_ipa: u64,
    pub zonex_ipa: u64,
    pub size: u64,
    host: NonNull<u8>,
}

// SAFETY: the mapping is plain shared memory that lives as long as `PhysMem`; every access to
// it goes through raw pointers, as the guest's and the broker's accesses do.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub fn host_base(&self) -> *mut u8 {
        self.host.as_ptr()
    }
}

/// The physical-memory memfd and this process's view of every zone's RAM.
#[derive(Debug)]
pub struct PhysMem {
    fd: OwnedFd,
    size: u64,
    maps: Vec<Mapping>,
}

impl PhysMem {
    /// Creates the sealed, sparse memfd covering every region and maps each region.
    pub fn new(machine: &Machine) -> Result<Self> {
        let size = machine.phys_size();
        if size == 0 {
            bail!("the configuration has no guest RAM");
        }
        let fd = memfd_create(
            "hvisor-sim-phys",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .context("memfd_create")?;
        nix::unistd::ftruncate(&fd, size as i64).context("sizing the physical memory")?;
        // The broker may map any offset; it must never see the file change size under it.
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .context("sealing the physical memory")?;
        let mut mem = PhysMem {
            fd,
            size,
            maps: Vec::new(),
        };
        for z in &machine.zones {
            for r in &z.ram {
                if r.size == 0 || r.zone0_ipa % PAGE != 0 || r.size % PAGE != 0 {
                    bail!(
                        "zone {}: RAM region at 0x{:x} (size 0x{:x}) is not page-aligned",
                        z.id,
                        r.zone0_ipa,
                        r.size
                    );
                }
                let len = NonZeroUsize::new(r.size as usize).unwrap();
                // SAFETY: a fresh shared mapping of our own memfd inside its sealed size;
                // nothing in this process aliases it as a Rust reference.
                let p = unsafe {
                    mmap(
                        None,
                        len,
                        ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                        MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
                        &mem.fd,
                        r.zone0_ipa as i64,
                    )
                }
                .with_context(|| format!("mapping zone {} RAM at 0x{:x}", z.id, r.zone0_ipa))?;
                mem.maps.push(Mapping {
                    zone: z.id,
                    zone0_ipa: r.zone0_ipa,
                    zonex_ipa: r.zonex_ipa,
                    size: r.size,
                    host: p.cast(),
                });
            }
        }
        Ok(mem)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.maps
    }

    /// The largest RAM region of `zone`: the guest's DMA arena.
    pub fn largest_region(&self, zone: u32) -> Option<&Mapping> {
        self.maps
            .iter()
            .filter(|m| m.zone == zone)
            .max_by_key(|m| m.size)
    }

    /// Host address of guest-physical `[gpa, gpa + len)` of `zone`, if the whole range is RAM.
    pub fn translate(&self, zone: u32, gpa: u64, len: u64) -> Option<*mut u8> {
        self.maps.iter().find_map(|m| {
            let off = gpa.checked_sub(m.zonex_ipa)?;
            (m.zone == zone && off.checked_add(len)? <= m.size)
                // SAFETY: `off + len <= size`, so the result stays inside the mapping.
                .then(|| unsafe { m.host.as_ptr().add(off as usize) })
        })
    }
}

impl Drop for PhysMem {
    fn drop(&mut self) {
        for m in &self.maps {
            // SAFETY: unmaps exactly what `new` mapped; callers hold no pointer past `self`.
            let _ = unsafe { munmap(m.host.cast(), m.size as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{RamRegion, ZoneSpec};

    #[test]
    fn memfd_is_sparse_sealed_and_offsets_are_physical() {
        let machine = Machine {
            zones: vec![ZoneSpec {
                id: 1,
                ram: vec![RamRegion {
                    zone0_ipa: 0x10_0000,
                    zonex_ipa: 0x4000_0000,
                    size: 0x10_0000,
                }],
                devices: vec![],
            }],
        };
        let mem = PhysMem::new(&machine).unwrap();
        assert_eq!(mem.size(), 0x20_0000);
        let seals = fcntl(mem.fd(), FcntlArg::F_GET_SEALS).unwrap();
        let want = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        assert_eq!(seals & want.bits(), want.bits());
        assert!(nix::unistd::ftruncate(mem.fd(), 0).is_err());

        let p = mem.translate(1, 0x4000_0010, 4).unwrap();
        // SAFETY: inside the zone's mapping.
        unsafe { p.cast::<u32>().write_unaligned(0xfeed_beef) };
        let mut buf = [0u8; 4];
        nix::sys::uio::pread(mem.fd(), &mut buf, 0x10_0010).unwrap();
        assert_eq!(u32::from_ne_bytes(buf), 0xfeed_beef);

        assert!(mem.translate(1, 0x4000_0000 + 0x10_0000 - 2, 4).is_none());
        assert!(mem.translate(2, 0x4000_0000, 4).is_none());
        assert!(mem.translate(1, 0x3fff_ffff, 1).is_none());
    }
}
