//! What each device kind offers the guest (features, queues, config space) and the host
//! resources the broker opens for its worker.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{bail, Context, Result};
use config::{Device, DeviceConfig};
use protocol::{DeviceKind, DeviceSetup};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::host::{Pty, Tap};
use crate::relay::Relay;
use crate::rundir::{self, RunDir};
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
    /// What the broker keeps of the host side.
    pub host: Host,
    /// A console's pipes to its pty, which the broker pumps.
    pub relay: Option<Relay>,
}

/// The host side the broker keeps controlling while a worker serves the device.
pub enum Host {
    None,
    /// The lock that keeps a second writer off the image.
    Image(File),
    Tap(Tap),
    Pty(Pty),
}

/// Opens the host side of `dev`.
pub fn prepare(dev: &Device, run: &RunDir) -> Result<Prepared> {
    match &dev.kind {
        DeviceConfig::Blk { img, readonly } => {
            // Checked again here: the path may have changed since the config was read.
            let file = config::paths::open_image(img, *readonly)
                .map_err(|e| anyhow::anyhow!("{}.img: {e}", dev.json_path))?;
            let what = format!("{}.img: {}", dev.json_path, img.display());
            let guard = guard_image(&file, *readonly, run, &what)?;
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
            Ok(Prepared {
                kind: DeviceKind::Blk,
                model: blk_model(size, *readonly),
                setup: DeviceSetup::Blk {
                    readonly: *readonly,
                    size,
                    serial: BLK_SERIAL.into(),
                },
                fds: vec![file.into()],
                host: Host::Image(guard),
                relay: None,
            })
        }
        DeviceConfig::Net { tap, mac, mtu } => {
            let tap = Tap::open(tap, *mtu).with_context(|| format!("{}.tap", dev.json_path))?;
            Ok(Prepared {
                kind: DeviceKind::Net,
                model: net_model(mac, *mtu),
                setup: DeviceSetup::Net { mtu: *mtu },
                fds: vec![tap.frames_fd()?],
                host: Host::Tap(tap),
                relay: None,
            })
        }
        DeviceConfig::Console {
            pty_link,
            cols,
            rows,
        } => {
            let pty = Pty::open(*cols, *rows, pty_link.as_deref())
                .with_context(|| format!("{}: console pty", dev.json_path))?;
            log::info!(
                "zone {} console: {}{}",
                dev.zone,
                pty.path.display(),
                pty.link()
                    .map(|l| format!(" (linked at {})", l.display()))
                    .unwrap_or_default()
            );
            let (relay, fds) = Relay::new(pty.master.try_clone()?)
                .with_context(|| format!("{}: console pipes", dev.json_path))?;
            Ok(Prepared {
                kind: DeviceKind::Console,
                model: console_model(*cols, *rows),
                setup: DeviceSetup::Console,
                fds,
                host: Host::Pty(pty),
                relay: Some(relay),
            })
        }
    }
}

/// Keeps two devices (or two brokers) from writing one image. The guard is a lock in the run
/// directory, keyed by what the image is (its device and inode, or the block device's number),
/// which no other user can take. The image's own `flock` is taken too where it is free, for
/// other programs that honour it; anyone who can read the image can hold that one, so it being
/// taken only earns a warning.
fn guard_image(file: &File, readonly: bool, run: &RunDir, what: &str) -> Result<File> {
    let meta = file.metadata().with_context(|| what.to_owned())?;
    let key = if meta.file_type().is_block_device() {
        format!("blockdev-{:x}.lock", meta.rdev())
    } else {
        format!("image-{:x}-{:x}.lock", meta.dev(), meta.ino())
    };
    let Some(guard) = run.lock(&key, readonly)? else {
        bail!("{what} is in use by another hvisor-broker (or another device of this one)");
    };
    if let Err(e) = rundir::flock(file, readonly) {
        log::warn!("{what}: another process holds a lock on it ({e}); serving it anyway");
    }
    Ok(guard)
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

pub const NET_QUEUE_MAX: u16 = 256;
pub const CONSOLE_QUEUE_MAX: u16 = 256;
/// VIRTIO_CONSOLE_F_SIZE (virtio-bindings has no console module).
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;

/// virtio-net: receive queue 0, transmit queue 1. No offloads yet: each is offered once a
/// guest that negotiates it proves it end to end.
pub fn net_model(mac: &[u8; 6], mtu: u16) -> DeviceModel {
    use virtio_bindings::virtio_net::*;
    let features = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_NET_F_MAC
        | 1 << VIRTIO_NET_F_STATUS
        | 1 << VIRTIO_NET_F_MTU
        | 1 << VIRTIO_NET_F_MRG_RXBUF
        // Checksum and TCP segmentation offloads both ways: the tap does the work (the broker
        // sets its offloads from what the guest accepts; the worker passes headers through).
        | 1 << VIRTIO_NET_F_CSUM
        | 1 << VIRTIO_NET_F_GUEST_CSUM
        | 1 << VIRTIO_NET_F_HOST_TSO4
        | 1 << VIRTIO_NET_F_HOST_TSO6
        | 1 << VIRTIO_NET_F_GUEST_TSO4
        | 1 << VIRTIO_NET_F_GUEST_TSO6;
    // struct virtio_net_config up to mtu: mac, status, max_virtqueue_pairs, mtu.
    let mut c = Vec::with_capacity(12);
    c.extend_from_slice(mac);
    c.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    c.extend_from_slice(&1u16.to_le_bytes());
    c.extend_from_slice(&mtu.to_le_bytes());
    DeviceModel {
        device_id: DeviceKind::Net.virtio_id(),
        features,
        queue_max: vec![NET_QUEUE_MAX; 2],
        config: c,
    }
}

/// virtio-console, one port: receive queue 0, transmit queue 1.
pub fn console_model(cols: u16, rows: u16) -> DeviceModel {
    let features = 1u64 << VIRTIO_F_VERSION_1
        | 1 << VIRTIO_RING_F_INDIRECT_DESC
        | 1 << VIRTIO_RING_F_EVENT_IDX
        | 1 << VIRTIO_CONSOLE_F_SIZE;
    // struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr.
    let mut c = Vec::with_capacity(12);
    c.extend_from_slice(&cols.to_le_bytes());
    c.extend_from_slice(&rows.to_le_bytes());
    c.extend_from_slice(&1u32.to_le_bytes());
    c.extend_from_slice(&0u32.to_le_bytes());
    DeviceModel {
        device_id: DeviceKind::Console.virtio_id(),
        features,
        queue_max: vec![CONSOLE_QUEUE_MAX; 2],
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

    #[test]
    fn net_and_console_config_layout() {
        let n = net_model(&[2, 0, 0, 0, 1, 1], 1500);
        assert_eq!(n.config, [2, 0, 0, 0, 1, 1, 1, 0, 1, 0, 0xdc, 0x05]);
        assert_eq!(n.queue_max.len(), 2);
        {
            use virtio_bindings::virtio_net::*;
            for bit in [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_MRG_RXBUF,
            ] {
                assert_ne!(n.features & (1 << bit), 0, "net feature bit {bit}");
            }
            // Not offered: no control queue, no UFO, no ECN.
            for bit in [
                VIRTIO_NET_F_CTRL_VQ,
                VIRTIO_NET_F_HOST_UFO,
                VIRTIO_NET_F_GUEST_UFO,
                VIRTIO_NET_F_HOST_ECN,
                VIRTIO_NET_F_GUEST_ECN,
            ] {
                assert_eq!(n.features & (1 << bit), 0, "net feature bit {bit}");
            }
        }
        let c = console_model(80, 25);
        assert_eq!(c.config, [80, 0, 25, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_ne!(c.features & 1, 0, "CONSOLE_F_SIZE");
    }
}
