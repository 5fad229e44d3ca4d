//! The part of the backend configuration the simulator needs: each zone's RAM and the trapped
//! virtio regions. Kept separate from `hvisor_config` so the handshake and vCPU tests can build
//! a machine without a JSON file.

use std::path::PathBuf;

/// One guest RAM region, as in the JSON `memory_region` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Where the root zone (and so the physical-memory fd) sees the region.
    pub zone0_ipa: u64,
    /// Where the guest sees it: descriptor and queue addresses are in this space.
    pub zonex_ipa: u64,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevKind {
    Blk { img: PathBuf, readonly: bool },
    Net { tap: String, mac: [u8; 6], mtu: u16 },
    Console { cols: u16, rows: u16 },
}

/// A trapped virtio-mmio region of a zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevSpec {
    pub addr: u64,
    pub len: u64,
    pub irq: u32,
    pub kind: DevKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneSpec {
    pub id: u32,
    pub ram: Vec<RamRegion>,
    pub devices: Vec<DevSpec>,
}

/// The whole simulated machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Machine {
    pub zones: Vec<ZoneSpec>,
}

impl Machine {
    pub fn from_config(cfg: &config::Config) -> Self {
        use config::DeviceConfig;
        let zones = cfg
            .zones
            .iter()
            .map(|z| ZoneSpec {
                id: z.id,
                ram: z
                    .memory
                    .iter()
                    .map(|m| RamRegion {
                        zone0_ipa: m.zone0_ipa,
                        zonex_ipa: m.zonex_ipa,
                        size: m.size,
                    })
                    .collect(),
                devices: z
                    .devices
                    .iter()
                    .map(|d| DevSpec {
                        addr: d.addr,
                        len: d.len,
                        irq: d.irq,
                        kind: match &d.kind {
                            DeviceConfig::Blk { img, readonly } => DevKind::Blk {
                                img: img.clone(),
                                readonly: *readonly,
                            },
                            DeviceConfig::Net { tap, mac, mtu } => DevKind::Net {
                                tap: tap.clone(),
                                mac: *mac,
                                mtu: *mtu,
                            },
                            DeviceConfig::Console { cols, rows, .. } => DevKind::Console {
                                cols: *cols,
                                rows: *rows,
                            },
                        },
                    })
                    .collect(),
            })
            .collect();
        Machine { zones }
    }

    /// Bytes of the physical-memory fd: it must reach the end of every region.
    pub fn phys_size(&self) -> u64 {
        self.zones
            .iter()
            .flat_map(|z| z.ram.iter())
            .map(|r| r.zone0_ipa.saturating_add(r.size))
            .max()
            .unwrap_or(0)
    }

    /// The virtio region of `zone` that contains `addr`, as the hypervisor's trap table would
    /// find it.
    pub fn device_at(&self, zone: u32, addr: u64) -> Option<&DevSpec> {
        self.zones
            .iter()
            .find(|z| z.id == zone)?
            .devices
            .iter()
            .find(|d| addr >= d.addr && addr - d.addr < d.len)
    }
}
