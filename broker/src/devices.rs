//! What each device kind offers the guest (features, queues, config space) and the host
//! resources the broker opens for its worker.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use anyhow::{bail, Context, Result};
use config::{Device, DeviceConfig};
use protocol::{DeviceKind, DeviceSetup};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::transport::DeviceModel;

/// The GET_ID answer; hvisor-tool's, so guests see the same serial after the switch.
pub const BLK_SERIAL: &str = "hvisor-virblk";
pub const BLK_QUEUE_MAX: u16 = 256;
/// Data segments per request: the queue size minus header and status.
pub const BLK_SEG_MAX: u32 = BLK_QUEUE_MAX as u32 - 2;
/// Bytes per data segment (VIRTIO_BLK_F_SIZE_MAX means bytes, not sectors).
pub const BLK_SIZE_MAX: u32 = 1 << 20;
pub const BLK_MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
pub const SECTOR: u64 = 512;

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);

/// A device ready to be handed to its worker.
pub struct Prepared {
    pub kind: DeviceKind,
    pub model: DeviceModel,
    pub setup: DeviceSetup,
    /// Passed to the worker after the memory and queue fds.
    pub fds: Vec<OwnedFd>,
}

/// Whether this release has a worker for the device kind.
pub fn served(kind: &DeviceConfig) -> bool {
    matches!(kind, DeviceConfig::Blk { .. })
}

/// Opens the host side of `dev`. Net and console are served from the next release on.
pub fn prepare(dev: &Device) -> Result<Option<Prepared>> {
    match &dev.kind {
        DeviceConfig::Blk { img, readonly } => {
            let file = OpenOptions::new()
                .read(true)
                .write(!readonly)
                .custom_flags(libc::O_CLOEXEC)
                .open(img)
                .with_context(|| format!("{}.img: cannot open {}", dev.json_path, img.display()))?;
            lock(&file, *readonly).with_context(|| {
                format!(
                    "{}.img: {} is in use by another device or process",
                    dev.json_path,
                    img.display()
                )
            })?;
            let size = image_size(&file)
                .with_context(|| format!("{}.img: size of {}", dev.json_path, img.display()))?;
            if size < SECTOR {
                bail!(
                    "{}.img: {} is smaller than one sector",
                    dev.json_path,
                    img.display()
                );
            }
            if size % SECTOR != 0 {
                log::warn!(
                    "{}: {} is not a whole number of sectors; the last {} bytes are not served",
                    dev.json_path,
                    img.display(),
                    size % SECTOR
                );
            }
            Ok(Some(Prepared {
                kind: DeviceKind::Blk,
                model: blk_model(size, *readonly),
                setup: DeviceSetup::Blk {
                    readonly: *readonly,
                    size,
                    serial: BLK_SERIAL.into(),
                },
                fds: vec![file.into()],
            }))
        }
        DeviceConfig::Net { .. } | DeviceConfig::Console { .. } => Ok(None),
    }
}

/// Advisory lock so two devices (or two brokers) never write one image.
fn lock(file: &File, shared: bool) -> Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn image_size(file: &File) -> Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we pass.
        unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }?;
        Ok(size)
    } else if meta.is_file() {
        Ok(meta.len())
    } else {
        bail!("neither a regular file nor a block device")
    }
}

pub fn blk_model(size: u64, readonly: bool) -> DeviceModel {
    let mut features = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_BLK_F_SIZE_MAX
        | 1 << VIRTIO_BLK_F_SEG_MAX
        | 1 << VIRTIO_BLK_F_BLK_SIZE
        | 1 << VIRTIO_BLK_F_FLUSH
        | 1 << VIRTIO_BLK_F_DISCARD
        | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
    if readonly {
        features |= 1 << VIRTIO_BLK_F_RO;
    }
    // struct virtio_blk_config, little-endian, up to write_zeroes_may_unmap.
    let mut c = Vec::with_capacity(64);
    c.extend_from_slice(&(size / SECTOR).to_le_bytes()); // capacity
    c.extend_from_slice(&BLK_SIZE_MAX.to_le_bytes()); // size_max
    c.extend_from_slice(&BLK_SEG_MAX.to_le_bytes()); // seg_max
    c.extend_from_slice(&[0u8; 4]); // geometry
    c.extend_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
    c.extend_from_slice(&[0u8; 8]); // topology
    c.push(0); // writeback
    c.push(0); // unused0
    c.extend_from_slice(&1u16.to_le_bytes()); // num_queues
    c.extend_from_slice(&BLK_MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    c.extend_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c.extend_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment (sectors)
    c.extend_from_slice(&BLK_MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    c.extend_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
    c.push(1); // write_zeroes_may_unmap
    c.extend_from_slice(&[0u8; 3]);
    DeviceModel {
        device_id: DeviceKind::Blk.virtio_id(),
        features,
        queue_max: vec![BLK_QUEUE_MAX],
        config: c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_config_layout() {
        let m = blk_model(8 << 20, true);
        assert_eq!(m.config.len(), 60);
        assert_eq!(
            u64::from_le_bytes(m.config[0..8].try_into().unwrap()),
            16384
        );
        assert_eq!(
            u32::from_le_bytes(m.config[8..12].try_into().unwrap()),
            1 << 20
        );
        assert_eq!(
            u32::from_le_bytes(m.config[20..24].try_into().unwrap()),
            512
        );
        assert_eq!(
            u32::from_le_bytes(m.config[36..40].try_into().unwrap()),
            BLK_MAX_DISCARD_SECTORS
        );
        assert_eq!(m.config[56], 1);
        assert_ne!(m.features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(blk_model(512, false).features & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
