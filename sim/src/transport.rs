//! A virtio-drivers [`Transport`] whose every register access is a trapped guest access
//! through a [`Vcpu`]: 4-byte accesses for the registers, the field's natural size for
//! config space, as a guest kernel's `readl`/`readb` would do.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::hv::{Vcpu, VcpuError};

/// virtio-mmio v2 register offsets.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;

    pub const MAGIC: u32 = 0x7472_6976;
}

/// Prefix of the panic that ends a guest thread whose vCPU access failed.
pub const GUEST_FAULT: &str = "guest vCPU fault";

/// Guest-physical addresses of queue 0's rings, as the driver gave them to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    pub size: u32,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The transport of one device: a vCPU of its zone plus the device's MMIO base.
pub struct SimTransport<'a> {
    vcpu: &'a Vcpu,
    base: u64,
    len: u64,
    device_type: DeviceType,
    /// Kept outside the transport's owner (a driver that does not give it back) so the
    /// guest can still find the rings, e.g. to give up on a request.
    rings: Arc<Mutex<Option<RingAddrs>>>,
    /// The first failed access: the methods of [`Transport`] cannot return it.
    error: RefCell<Option<VcpuError>>,
}

/// The status after a successful negotiation.
const NEGOTIATED: DeviceStatus = DeviceStatus::ACKNOWLEDGE
    .union(DeviceStatus::DRIVER)
    .union(DeviceStatus::FEATURES_OK);

impl<'a> SimTransport<'a> {
    /// For our own drivers: resets the device (Status 0) and negotiates `wanted` from scratch
    /// (virtio 3.1.1) up to FEATURES_OK; returns the device's features and the negotiated ones.
    pub fn negotiate(&mut self, wanted: u64) -> anyhow::Result<(u64, u64)> {
        self.set_status(DeviceStatus::empty());
        anyhow::ensure!(
            self.get_status().is_empty(),
            "device status is not 0 after reset"
        );
        self.set_status(DeviceStatus::ACKNOWLEDGE);
        self.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let device_features = self.read_device_features();
        let negotiated = device_features & wanted;
        self.write_driver_features(negotiated);
        self.set_status(NEGOTIATED);
        anyhow::ensure!(
            self.get_status().contains(DeviceStatus::FEATURES_OK),
            "device refused features 0x{negotiated:x} (FEATURES_OK cleared)"
        );
        Ok((device_features, negotiated))
    }

    /// For our own drivers, after [`Self::negotiate`] and the queues: DRIVER_OK.
    pub fn driver_ok(&mut self) {
        self.set_status(NEGOTIATED | DeviceStatus::DRIVER_OK);
    }

    /// Probes the device as a guest would (magic, version 2, device ID).
    pub fn new(vcpu: &'a Vcpu, base: u64, len: u64) -> anyhow::Result<Self> {
        let magic = vcpu.read(base + reg::MAGIC_VALUE, 4)?;
        anyhow::ensure!(
            magic == reg::MAGIC as u64,
            "no virtio device at 0x{base:x}: magic 0x{magic:x}"
        );
        let version = vcpu.read(base + reg::VERSION, 4)?;
        anyhow::ensure!(
            version == 2,
            "device at 0x{base:x} reports virtio-mmio version {version}, expected 2"
        );
        let id = vcpu.read(base + reg::DEVICE_ID, 4)? as u32;
        let device_type = DeviceType::try_from(id)
            .map_err(|_| anyhow::anyhow!("device at 0x{base:x} has unknown device ID {id}"))?;
        Ok(SimTransport {
            vcpu,
            base,
            len,
            device_type,
            rings: Arc::new(Mutex::new(None)),
            error: RefCell::new(None),
        })
    }

    /// Where queue 0's rings are, while it is set up.
    pub fn rings(&self) -> Arc<Mutex<Option<RingAddrs>>> {
        self.rings.clone()
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn vcpu(&self) -> &Vcpu {
        self.vcpu
    }

    /// A failed access leaves the guest driver with nothing sensible to do: like a vCPU that
    /// never returns from EL2, it ends the guest thread (the workload reports the message).
    /// While already unwinding, 0 is returned so drop code can finish.
    fn fail(&self, e: VcpuError) -> u64 {
        self.error.borrow_mut().get_or_insert(e.clone());
        if std::thread::panicking() {
            return 0;
        }
        panic!("{GUEST_FAULT}: {e}");
    }

    pub fn read(&self, off: u64, size: u64) -> u64 {
        self.vcpu
            .read(self.base + off, size)
            .unwrap_or_else(|e| self.fail(e))
    }

    pub fn write(&self, off: u64, size: u64, value: u64) {
        if let Err(e) = self.vcpu.write(self.base + off, size, value) {
            self.fail(e);
        }
    }

    fn r32(&self, off: u64) -> u32 {
        self.read(off, 4) as u32
    }

    fn w32(&self, off: u64, v: u32) {
        self.write(off, 4, v as u64)
    }

    /// Reads InterruptStatus and acknowledges what it found, as Linux's vm_interrupt does.
    pub fn read_isr_and_ack(&mut self) -> u32 {
        let isr = self.r32(reg::INTERRUPT_STATUS);
        if isr != 0 {
            self.w32(reg::INTERRUPT_ACK, isr);
        }
        isr
    }

    fn config_len(&self) -> u64 {
        self.len.saturating_sub(reg::CONFIG)
    }
}

impl Transport for SimTransport<'_> {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.w32(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.r32(reg::DEVICE_FEATURES) as u64;
        self.w32(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.r32(reg::DEVICE_FEATURES) as u64;
        low | high << 32
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, driver_features as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (driver_features >> 32) as u32);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.w32(reg::QUEUE_SEL, queue.into());
        self.r32(reg::QUEUE_NUM_MAX)
    }

    fn notify(&mut self, queue: u16) {
        self.w32(reg::QUEUE_NOTIFY, queue.into());
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.r32(reg::STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.w32(reg::STATUS, status.bits());
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {
        // Modern (v2) devices have no GuestPageSize register.
    }

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.w32(reg::QUEUE_SEL, queue.into());
        self.w32(reg::QUEUE_NUM, size);
        self.w32(reg::QUEUE_DESC_LOW, descriptors as u32);
        self.w32(reg::QUEUE_DESC_HIGH, (descriptors >> 32) as u32);
        self.w32(reg::QUEUE_DRIVER_LOW, driver_area as u32);
        self.w32(reg::QUEUE_DRIVER_HIGH, (driver_area >> 32) as u32);
        self.w32(reg::QUEUE_DEVICE_LOW, device_area as u32);
        self.w32(reg::QUEUE_DEVICE_HIGH, (device_area >> 32) as u32);
        self.w32(reg::QUEUE_READY, 1);
        if queue == 0 {
            *self.rings.lock().unwrap() = Some(RingAddrs {
                size,
                desc: descriptors,
                avail: driver_area,
                used: device_area,
            });
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        if queue == 0 {
            *self.rings.lock().unwrap() = None;
        }
        self.w32(reg::QUEUE_SEL, queue.into());
        self.w32(reg::QUEUE_READY, 0);
        // Spec 4.2.2.2: wait until the device agrees, but not forever.
        for _ in 0..1000 {
            if self.r32(reg::QUEUE_READY) == 0 {
                break;
            }
            std::thread::yield_now();
        }
        self.w32(reg::QUEUE_NUM, 0);
        for off in [
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DESC_HIGH,
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            reg::QUEUE_DEVICE_LOW,
            reg::QUEUE_DEVICE_HIGH,
        ] {
            self.w32(off, 0);
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.w32(reg::QUEUE_SEL, queue.into());
        self.r32(reg::QUEUE_READY) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::from_bits_truncate(self.read_isr_and_ack())
    }

    fn read_config_generation(&self) -> u32 {
        self.r32(reg::CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let size = size_of::<T>();
        if offset as u64 + size as u64 > self.config_len() {
            return Err(Error::ConfigSpaceTooSmall);
        }
        let mut bytes = vec![0u8; size];
        if matches!(size, 1 | 2 | 4 | 8) {
            let v = self.read(reg::CONFIG + offset as u64, size as u64);
            bytes.copy_from_slice(&v.to_le_bytes()[..size]);
        } else {
            // Composite values: byte by byte, so no access crosses a field of unknown width.
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = self.read(reg::CONFIG + (offset + i) as u64, 1) as u8;
            }
        }
        T::read_from_bytes(&bytes).map_err(|_| Error::InvalidParam)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), Error> {
        let bytes = value.as_bytes();
        if offset as u64 + bytes.len() as u64 > self.config_len() {
            return Err(Error::ConfigSpaceTooSmall);
        }
        if matches!(bytes.len(), 1 | 2 | 4 | 8) {
            let mut v = [0u8; 8];
            v[..bytes.len()].copy_from_slice(bytes);
            self.write(
                reg::CONFIG + offset as u64,
                bytes.len() as u64,
                u64::from_le_bytes(v),
            );
        } else {
            for (i, b) in bytes.iter().enumerate() {
                self.write(reg::CONFIG + (offset + i) as u64, 1, *b as u64);
            }
        }
        Ok(())
    }
}
