//! The virtio-mmio version 2 register file of one device, as a pure state machine.
//!
//! The broker answers every trapped register access from here, without a round trip to the
//! worker, because hvisor holds the guest vCPU in EL2 until the answer is back. Nothing here
//! does I/O or touches guest memory: what the worker must learn comes out as an [`Effect`].
//!
//! Unlike hvisor-tool, every queue access is bounds-checked against `QueueSel`, features are
//! negotiated per 32-bit word and cleared on reset, `FEATURES_OK` and `DRIVER_OK` are only
//! accepted when valid, and config-space reads are zero-extended to the access size.

use crate::irq::{Inject, IrqLine};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;

pub use protocol::QueueConfig;

/// "virt", little-endian.
pub const MAGIC: u32 = 0x7472_6976;
pub const VERSION: u32 = 2;
/// "HVIS", hvisor-tool's vendor id, so guests see the same device.
pub const VENDOR_ID: u32 = 0x4856_4953;
pub const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// Status bits the driver may set; NEEDS_RESET is the device's to set.
const DRIVER_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;
const INT_BITS: u32 = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;
/// Read value of the SHM length and base registers when there is no shared memory region.
const NO_SHM: u64 = 0xffff_ffff;
/// Split-ring alignment (virtio 1.2, 2.7): descriptor table, driver area, device area.
const DESC_ALIGN: u64 = 16;
const AVAIL_ALIGN: u64 = 2;
const USED_ALIGN: u64 = 4;

/// What the device offers, fixed for the life of the transport (the config bytes may change).
#[derive(Clone, Debug)]
pub struct DeviceModel {
    pub device_id: u32,
    pub features: u64,
    /// QueueNumMax per queue; its length is the number of queues.
    pub queue_max: Vec<u16>,
    /// The device-specific config space, little-endian.
    pub config: Vec<u8>,
}

/// What a register write means for the worker.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// The driver kicked this (ready) queue of an active device.
    Notify(u16),
    /// The driver set DRIVER_OK: the negotiated features and every ready queue.
    Activate {
        features: u64,
        queues: Vec<QueueConfig>,
    },
    /// The driver wrote 0 to Status.
    Reset,
    /// A driver write to config space; the bytes are unchanged until the device says so.
    ConfigWrite { offset: u32, data: Vec<u8> },
    /// The driver took a queue of the active device out of use (QueueReady 0): its memory may
    /// be reused for anything, so the worker must stop reading it.
    StopQueue(u16),
    /// The driver's ACK cleared the last InterruptStatus bit of an injected interrupt.
    Deassert,
}

#[derive(Clone, Copy, Debug, Default)]
struct Queue {
    num: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Queue {
    fn addresses_valid(&self) -> bool {
        let ok = |a: u64, align: u64| a != 0 && a % align == 0;
        ok(self.desc, DESC_ALIGN) && ok(self.avail, AVAIL_ALIGN) && ok(self.used, USED_ALIGN)
    }
}

pub struct MmioTransport {
    model: DeviceModel,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    /// Status as the driver wrote it (driver bits only).
    status: u32,
    /// DRIVER_OK was accepted and Activate sent since the last reset.
    activated: bool,
    /// The device can no longer work until the driver resets it.
    failed: bool,
    irq: IrqLine,
    config_generation: u32,
}

/// Replaces the low or high 32 bits of `word`.
fn set_half(word: &mut u64, high: bool, v: u32) {
    let v = u64::from(v);
    *word = if high {
        (*word & 0xffff_ffff) | v << 32
    } else {
        (*word & !0xffff_ffff) | v
    };
}

fn half(word: u64, high: bool) -> u64 {
    if high {
        word >> 32
    } else {
        word & 0xffff_ffff
    }
}

impl MmioTransport {
    pub fn new(model: DeviceModel) -> Self {
        if model.features & (1 << VIRTIO_F_VERSION_1) == 0 {
            log::debug!(
                "device model {} lacks VERSION_1; no driver can use it",
                model.device_id
            );
        }
        let queues = vec![Queue::default(); model.queue_max.len()];
        MmioTransport {
            model,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            activated: false,
            failed: false,
            irq: IrqLine::new(Inject::default()),
            config_generation: 0,
        }
    }

    /// DRIVER_OK was accepted, the device has not failed, and the driver has not given up.
    pub fn is_active(&self) -> bool {
        self.activated && !self.failed && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Reads `size` bytes at `offset` in the device window, zero-extended.
    pub fn read(&mut self, offset: u64, size: u64) -> u64 {
        if offset >= CONFIG_OFFSET {
            return self.read_config(offset - CONFIG_OFFSET, size);
        }
        if size != 4 {
            log::debug!("register read at {offset:#x} of size {size}: reads 0");
            return 0;
        }
        let Ok(reg) = u32::try_from(offset) else {
            return 0;
        };
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => u64::from(MAGIC),
            VIRTIO_MMIO_VERSION => u64::from(VERSION),
            VIRTIO_MMIO_DEVICE_ID => u64::from(self.model.device_id),
            VIRTIO_MMIO_VENDOR_ID => u64::from(VENDOR_ID),
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 | 1 => half(self.model.features, self.device_features_sel == 1),
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queue_index()
                .and_then(|q| self.model.queue_max.get(q))
                .map_or(0, |&max| u64::from(max)),
            VIRTIO_MMIO_QUEUE_READY => self.queue().map_or(0, |q| u64::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => u64::from(self.irq.status()),
            VIRTIO_MMIO_STATUS => u64::from(self.read_status()),
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => NO_SHM,
            VIRTIO_MMIO_CONFIG_GENERATION => u64::from(self.config_generation),
            _ => {
                log::debug!("read of write-only or unknown register {offset:#x}: reads 0");
                0
            }
        }
    }

    /// Writes `value` (`size` bytes) at `offset` in the device window.
    pub fn write(&mut self, offset: u64, size: u64, value: u64) -> Option<Effect> {
        if offset >= CONFIG_OFFSET {
            return self.write_config(offset - CONFIG_OFFSET, size, value);
        }
        if size != 4 {
            log::debug!("register write at {offset:#x} of size {size}: ignored");
            return None;
        }
        let reg = u32::try_from(offset).ok()?;
        // A 4-byte access carries 32 bits; anything above is not part of the write.
        let v = (value & 0xffff_ffff) as u32;
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue_num(v),
            VIRTIO_MMIO_QUEUE_READY => return self.write_queue_ready(v),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.write_queue_addr(v, false, |q| &mut q.desc),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.write_queue_addr(v, true, |q| &mut q.desc),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.write_queue_addr(v, false, |q| &mut q.avail),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.write_queue_addr(v, true, |q| &mut q.avail),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.write_queue_addr(v, false, |q| &mut q.used),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_addr(v, true, |q| &mut q.used),
            VIRTIO_MMIO_QUEUE_NOTIFY => return self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => return self.ack(v),
            VIRTIO_MMIO_STATUS => return self.write_status(v),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => {
                log::debug!("write of {v:#x} to read-only or unknown register {offset:#x}: ignored")
            }
        }
        None
    }

    /// The used ring of some queue moved: sets the VRING bit. Returns true when the interrupt
    /// must be injected now ([`IrqLine::raise`]), false when the device is not active.
    pub fn raise_used(&mut self) -> bool {
        if !self.activated {
            log::debug!("used-buffer interrupt before DRIVER_OK or after reset: dropped");
            return false;
        }
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    /// The config space changed: bumps ConfigGeneration and sets the CONFIG bit. The
    /// interrupt is only sent once the driver set DRIVER_OK (virtio 1.2, 2.1.2).
    pub fn raise_config(&mut self) -> bool {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return false;
        }
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }

    /// The device can no longer work (its worker keeps dying, past its restart budget): the
    /// driver sees DEVICE_NEEDS_RESET, for good, and gets a config interrupt. Returns whether to
    /// inject it now.
    pub fn fail(&mut self) -> bool {
        self.failed = true;
        self.raise_config()
    }

    /// What a worker that replaces a dead one must be activated with: the features and ready
    /// queues of the current activation, if the device is active.
    pub fn replay(&self) -> Option<(u64, Vec<QueueConfig>)> {
        self.is_active()
            .then(|| (self.driver_features, self.ready_queues()))
    }

    /// A worker serves a failed device again (the operator restarted it): the driver may reset
    /// the device and use it.
    pub fn revive(&mut self) {
        self.failed = false;
    }

    /// Replaces the config bytes after a device-side change and tells the driver.
    pub fn set_config(&mut self, config: Vec<u8>) -> bool {
        self.model.config = config;
        self.raise_config()
    }

    fn raise(&mut self, bit: u32) -> bool {
        self.irq.raise(bit)
    }

    fn ack(&mut self, v: u32) -> Option<Effect> {
        self.irq.ack(v & INT_BITS).then_some(Effect::Deassert)
    }

    /// The retry timer of the last injection expired: whether to inject again (the guest has
    /// not acknowledged; the injection may have been dropped).
    pub fn retry_interrupt(&self) -> bool {
        self.irq.retry()
    }

    /// When to inject (the default suits hvisor; see [`Inject`]).
    pub fn set_inject(&mut self, policy: Inject) {
        self.irq = IrqLine::new(policy);
    }

    fn read_status(&self) -> u32 {
        if self.failed {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            log::debug!("DriverFeatures write after FEATURES_OK: ignored");
            return;
        }
        match self.driver_features_sel {
            0 | 1 => set_half(&mut self.driver_features, self.driver_features_sel == 1, v),
            sel => log::debug!("DriverFeatures write with DriverFeaturesSel {sel}: ignored"),
        }
    }

    fn queue_index(&self) -> Option<usize> {
        let q = usize::try_from(self.queue_sel).ok()?;
        (q < self.queues.len()).then_some(q)
    }

    fn queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_index()?)
    }

    /// The selected queue, if it exists and may be reconfigured (it is not ready).
    fn queue_for_setup(&mut self, what: &str) -> Option<&mut Queue> {
        let Some(i) = self.queue_index() else {
            log::debug!(
                "{what} write with QueueSel {} out of range: ignored",
                self.queue_sel
            );
            return None;
        };
        let q = self.queues.get_mut(i)?;
        if q.ready {
            log::debug!("{what} write to ready queue {i}: ignored");
            return None;
        }
        Some(q)
    }

    fn write_queue_num(&mut self, v: u32) {
        let Some(&max) = self.queue_index().and_then(|i| self.model.queue_max.get(i)) else {
            log::debug!(
                "QueueNum write with QueueSel {} out of range: ignored",
                self.queue_sel
            );
            return;
        };
        let num = u16::try_from(v)
            .ok()
            .filter(|&n| n != 0 && n <= max && n.is_power_of_two());
        let Some(num) = num else {
            log::debug!("QueueNum {v} is not a power of two in 1..={max}: ignored");
            return;
        };
        if let Some(q) = self.queue_for_setup("QueueNum") {
            q.num = num;
        }
    }

    fn write_queue_addr(&mut self, v: u32, high: bool, field: fn(&mut Queue) -> &mut u64) {
        if let Some(q) = self.queue_for_setup("queue address") {
            set_half(field(q), high, v);
        }
    }

    fn write_queue_ready(&mut self, v: u32) -> Option<Effect> {
        let activated = self.activated;
        let Some((i, q)) = self
            .queue_index()
            .and_then(|i| Some((i, self.queues.get_mut(i)?)))
        else {
            log::debug!(
                "QueueReady write with QueueSel {} out of range: ignored",
                self.queue_sel
            );
            return None;
        };
        match v {
            0 if q.ready && activated => {
                q.ready = false;
                return Some(Effect::StopQueue(i as u16));
            }
            0 => q.ready = false,
            1 if q.ready => {}
            // The worker learns the queues at DRIVER_OK only, and rings cannot be reset
            // (VIRTIO_F_RING_RESET is not offered), so a queue cannot start later.
            1 if activated => log::debug!("QueueReady 1 for queue {i} after DRIVER_OK: ignored"),
            1 if q.num == 0 => log::debug!("QueueReady 1 for queue {i} without QueueNum: ignored"),
            1 => q.ready = true,
            _ => log::debug!("QueueReady {v:#x} for queue {i}: ignored"),
        }
        None
    }

    fn notify(&mut self, v: u32) -> Option<Effect> {
        let q = u16::try_from(v).ok();
        let ready = q
            .and_then(|q| self.queues.get(usize::from(q)))
            .is_some_and(|q| q.ready);
        if !self.is_active() || !ready {
            log::debug!("QueueNotify {v:#x} while inactive or for a queue not in use: ignored");
            return None;
        }
        q.map(Effect::Notify)
    }

    fn write_status(&mut self, v: u32) -> Option<Effect> {
        if v == 0 {
            self.reset();
            return Some(Effect::Reset);
        }
        let new = v & DRIVER_STATUS_BITS;
        if new & self.status != self.status {
            log::debug!(
                "Status {v:#x} clears bits of {:#x} without a reset: ignored",
                self.status
            );
            return None;
        }
        let mut added = new & !self.status;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            log::debug!(
                "FEATURES_OK refused for driver features {:#x}",
                self.driver_features
            );
            added &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        let mut effect = None;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let features_ok = (self.status | added) & VIRTIO_CONFIG_S_FEATURES_OK != 0;
            // A driver that gave up (FAILED) must reset before it may use the device.
            let gave_up = (self.status | added) & VIRTIO_CONFIG_S_FAILED != 0;
            let bad_queue = self
                .queues
                .iter()
                .position(|q| q.ready && !q.addresses_valid());
            if !features_ok || gave_up || self.failed || bad_queue.is_some() {
                log::debug!(
                    "DRIVER_OK refused: features_ok {features_ok}, driver failed {gave_up}, \
                     failed {}, bad queue {bad_queue:?}",
                    self.failed
                );
                added &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else if !self.activated {
                self.activated = true;
                effect = Some(Effect::Activate {
                    features: self.driver_features,
                    queues: self.ready_queues(),
                });
            }
        }
        self.status |= added;
        effect
    }

    /// A subset of the offered features. VERSION_1 is not required: hvisor-tool accepts
    /// drivers without it (RuxOS, which then uses the 10-byte legacy net header), and on the
    /// little-endian machines hvisor runs on nothing else differs for our devices.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.model.features == 0
    }

    fn ready_queues(&self) -> Vec<QueueConfig> {
        (0u16..)
            .zip(&self.queues)
            .filter(|(_, q)| q.ready)
            .map(|(index, q)| QueueConfig {
                index,
                size: q.num,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
            })
            .collect()
    }

    fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues.fill(Queue::default());
        self.status = 0;
        self.activated = false;
        // `failed` stays: nothing serves the device any more (its worker is gone for good), so
        // a reset cannot make it work, and DRIVER_OK stays refused.
        self.irq.clear();
    }

    fn config_access(&self, offset: u64, size: u64) -> Option<(usize, usize)> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            log::debug!("config access at {offset:#x} of size {size}: not 1, 2, 4 or 8");
            return None;
        }
        Some((usize::try_from(offset).ok()?, usize::try_from(size).ok()?))
    }

    fn read_config(&self, offset: u64, size: u64) -> u64 {
        let Some((start, len)) = self.config_access(offset, size) else {
            return 0;
        };
        let mut bytes = [0u8; 8];
        for (i, b) in bytes.iter_mut().take(len).enumerate() {
            // Past the end of the config reads as 0.
            *b = start
                .checked_add(i)
                .and_then(|at| self.model.config.get(at))
                .copied()
                .unwrap_or(0);
        }
        u64::from_le_bytes(bytes)
    }

    fn write_config(&self, offset: u64, size: u64, value: u64) -> Option<Effect> {
        let (start, len) = self.config_access(offset, size)?;
        if start
            .checked_add(len)
            .is_none_or(|end| end > self.model.config.len())
        {
            log::debug!("config write at {offset:#x} of size {size} outside the config: ignored");
            return None;
        }
        Some(Effect::ConfigWrite {
            offset: u32::try_from(start).ok()?,
            data: value.to_le_bytes().get(..len)?.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEATURES_OK: u64 = VIRTIO_CONFIG_S_FEATURES_OK as u64;
    const DRIVER_OK: u64 = VIRTIO_CONFIG_S_DRIVER_OK as u64;
    const ACK_DRIVER: u64 = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER) as u64;
    const V1: u64 = 1 << VIRTIO_F_VERSION_1;
    /// Device features of the test model: VERSION_1 and two device bits.
    const DEV_FEATURES: u64 = V1 | 1 << 1 | 1 << 9;

    fn r(off: u32) -> u64 {
        u64::from(off)
    }

    fn model() -> DeviceModel {
        DeviceModel {
            device_id: 2,
            features: DEV_FEATURES,
            queue_max: vec![256, 64],
            config: (1u8..=12).collect(),
        }
    }

    fn t() -> MmioTransport {
        MmioTransport::new(model())
    }

    fn w(t: &mut MmioTransport, off: u32, v: u64) -> Option<Effect> {
        t.write(r(off), 4, v)
    }

    fn rd(t: &mut MmioTransport, off: u32) -> u64 {
        t.read(r(off), 4)
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        assert_eq!(w(t, VIRTIO_MMIO_STATUS, 0), Some(Effect::Reset));
        w(t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, features & 0xffff_ffff);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, features >> 32);
        w(t, VIRTIO_MMIO_STATUS, ACK_DRIVER | FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, q: u32, num: u64, base: u64) {
        w(t, VIRTIO_MMIO_QUEUE_SEL, u64::from(q));
        w(t, VIRTIO_MMIO_QUEUE_NUM, num);
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, base),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000),
            (VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000),
        ] {
            w(t, low, addr & 0xffff_ffff);
            w(t, low + 4, addr >> 32);
        }
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// A negotiated device with both queues set up and DRIVER_OK accepted.
    fn active() -> MmioTransport {
        let mut t = t();
        negotiate(&mut t, V1 | 1 << 1);
        setup_queue(&mut t, 0, 256, 0x1_5000_0000);
        setup_queue(&mut t, 1, 16, 0x5001_0000);
        assert!(matches!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | FEATURES_OK | DRIVER_OK
            ),
            Some(Effect::Activate { .. })
        ));
        assert!(t.is_active());
        t
    }

    #[test]
    fn identification_registers() {
        let mut t = t();
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VENDOR_ID), 0x4856_4953);
        // Read-only: writes change nothing.
        for reg in [
            VIRTIO_MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID,
            VIRTIO_MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES,
            VIRTIO_MMIO_QUEUE_NUM_MAX,
            VIRTIO_MMIO_INTERRUPT_STATUS,
            VIRTIO_MMIO_CONFIG_GENERATION,
        ] {
            assert_eq!(w(&mut t, reg, 0x1234), None);
        }
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), u64::from(MAGIC));
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            DEV_FEATURES & 0xffff_ffff
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        assert_eq!(CONFIG_OFFSET, 0x100);
    }

    #[test]
    fn registers_need_size_4() {
        let mut t = t();
        for size in [0, 1, 2, 3, 8, 16, u64::MAX] {
            assert_eq!(t.read(0, size), 0, "size {size}");
            assert_eq!(t.write(r(VIRTIO_MMIO_STATUS), size, 1), None);
            assert_eq!(
                t.write(r(VIRTIO_MMIO_STATUS), size, 0),
                None,
                "no reset at size {size}"
            );
        }
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        w(&mut t, VIRTIO_MMIO_STATUS, 1);
        assert_eq!(t.write(r(VIRTIO_MMIO_STATUS), 2, 0), None);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 1);
    }

    #[test]
    fn device_features_by_selector() {
        let mut t = t();
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0x202);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        for sel in [2, 0xffff_ffff, u64::MAX] {
            w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0, "sel {sel:#x}");
        }
        // The selector itself is write-only.
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL), 0);
    }

    #[test]
    fn driver_features_replace_the_selected_word() {
        let mut t = t();
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0x2);
        assert_eq!(t.driver_features(), 0x2, "not OR-accumulated");
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0x1);
        assert_eq!(t.driver_features(), V1 | 0x2);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.driver_features(), V1 | 0x2, "sel 2 ignored");
        // Upper bits of a 4-byte write's value are not part of it.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0xdead_0000_0000_0200);
        assert_eq!(t.driver_features(), V1 | 0x200);
        // Write-only.
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DRIVER_FEATURES), 0);
    }

    #[test]
    fn driver_features_frozen_after_features_ok() {
        let mut t = t();
        negotiate(&mut t, V1 | 1 << 9);
        assert_ne!(rd(&mut t, VIRTIO_MMIO_STATUS) & FEATURES_OK, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.driver_features(), V1 | 1 << 9);
    }

    #[test]
    fn a_replacement_worker_is_activated_as_the_driver_left_the_device() {
        let mut t = active();
        let (features, queues) = t.replay().unwrap();
        assert_eq!(features, V1 | 1 << 1);
        assert_eq!(queues.iter().map(|q| q.index).collect::<Vec<_>>(), [0, 1]);
        // a worker killed during a queue stop: its replacement never sees that queue
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        let (_, queues) = t.replay().unwrap();
        assert_eq!(queues.len(), 1);
        assert_eq!((queues[0].index, queues[0].size), (0, 256));
        // ... during a driver reset: it is not activated until the next DRIVER_OK
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.replay(), None);
        // a failed device replays nothing; revived, it works after a reset
        let mut t = active();
        t.fail();
        assert_eq!(t.replay(), None);
        t.revive();
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0x5000_0000);
        let st = ACK_DRIVER | FEATURES_OK | DRIVER_OK;
        assert!(matches!(
            w(&mut t, VIRTIO_MMIO_STATUS, st),
            Some(Effect::Activate { .. })
        ));
    }

    #[test]
    fn a_queue_taken_out_of_use_after_driver_ok_stops_the_worker_reading_it() {
        let mut t = active();
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0),
            Some(Effect::StopQueue(1))
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        // once only, and notifies for it are ignored from now on
        assert_eq!(w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0), None);
        assert_eq!(w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1), None);
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            Some(Effect::Notify(0))
        );
    }

    #[test]
    fn features_ok_accepted_without_version_1_like_hvisor_tool() {
        let mut t = t();
        negotiate(&mut t, 1 << 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK_DRIVER | FEATURES_OK);
        assert_eq!(t.driver_features(), 1 << 1);
    }

    #[test]
    fn features_ok_refused_for_unoffered_features() {
        let mut t = t();
        negotiate(&mut t, V1 | 1 << 5);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS) & FEATURES_OK, 0);
        negotiate(&mut t, V1 | 1 << 40);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS) & FEATURES_OK, 0);
        negotiate(&mut t, DEV_FEATURES);
        assert_ne!(rd(&mut t, VIRTIO_MMIO_STATUS) & FEATURES_OK, 0);
    }

    #[test]
    fn queue_sel_bounds() {
        let mut t = t();
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 64);
        for sel in [2, 0xffff, 0xffff_ffff, u64::MAX] {
            w(&mut t, VIRTIO_MMIO_QUEUE_SEL, sel);
            assert_eq!(
                rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX),
                0,
                "drivers count queues by this"
            );
            assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
            // Writes to a missing queue are ignored and touch no other queue.
            w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
            w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
            w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
            w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
            w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
            assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        }
        assert!(t
            .queues
            .iter()
            .all(|q| q.num == 0 && q.desc == 0 && !q.ready));
        // QueueSel reads back as 0 (write-only), but is stored as written.
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_SEL), 0);
        assert_eq!(t.queue_sel, 0xffff_ffff);
    }

    #[test]
    fn queue_num_checks() {
        let mut t = t();
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        for bad in [0, 3, 48, 65, 128, 0x1_0000, 0x1_0040, u64::MAX] {
            w(&mut t, VIRTIO_MMIO_QUEUE_NUM, bad);
            assert_eq!(t.queues[1].num, 0, "QueueNum {bad:#x}");
        }
        for good in [1, 2, 32, 64] {
            w(&mut t, VIRTIO_MMIO_QUEUE_NUM, good);
            assert_eq!(u64::from(t.queues[1].num), good);
        }
        assert_eq!(t.queues[0].num, 0);
        // Write-only.
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM), 0);
    }

    #[test]
    fn queue_addresses_low_then_high_replace() {
        let mut t = t();
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_f000);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1234_5000);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x1);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0x2);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x8000);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x9000);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0xffff_ffff);
        let q = t.queues[0];
        assert_eq!(q.desc, 0x1_1234_5000, "not OR-ed");
        assert_eq!(q.avail, 0x2_0000_8000);
        assert_eq!(q.used, 0xffff_ffff_0000_9000);
        // Address registers are write-only.
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH), 0);
    }

    #[test]
    fn ready_queue_is_locked_until_ready_0() {
        let mut t = t();
        setup_queue(&mut t, 0, 128, 0x5000_0000);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x7000);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0x7);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x7000);
        let q = t.queues[0];
        assert_eq!(
            (q.num, q.desc, q.avail, q.used),
            (128, 0x5000_0000, 0x5000_1000, 0x5000_2000)
        );
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        assert_eq!(t.queues[0].num, 16);
        // Only 0 and 1 are meaningful.
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 3);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn ready_needs_a_queue_size() {
        let mut t = t();
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn status_only_adds_bits() {
        let mut t = t();
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 1), None);
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 3), None);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 3);
        // Clearing ACKNOWLEDGE without a reset is ignored as a whole.
        w(&mut t, VIRTIO_MMIO_STATUS, 2 | 0x80);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 3);
        // The same value again is harmless.
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 3), None);
        // FAILED is the driver's to set; NEEDS_RESET and unknown bits are not stored.
        w(&mut t, VIRTIO_MMIO_STATUS, 3 | 0x80 | 0x40 | 0x30 | 0xff00);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0x83);
    }

    #[test]
    fn driver_ok_needs_features_ok() {
        let mut t = t();
        w(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
        setup_queue(&mut t, 0, 16, 0x5000_0000);
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER | DRIVER_OK), None);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK_DRIVER);
        assert!(!t.is_active());
        // FEATURES_OK refused (an unoffered bit) in the same write refuses DRIVER_OK too.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        assert_eq!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | FEATURES_OK | DRIVER_OK
            ),
            None
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK_DRIVER);
    }

    #[test]
    fn driver_ok_refused_for_a_ready_queue_without_addresses() {
        let mut t = t();
        negotiate(&mut t, V1);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000_0000);
        w(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x5000_1000);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | FEATURES_OK | DRIVER_OK
            ),
            None
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), ACK_DRIVER | FEATURES_OK);
        // A misaligned ring is refused the same way.
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x5000_2002);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | FEATURES_OK | DRIVER_OK
            ),
            None
        );
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x5000_2000);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert!(w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | FEATURES_OK | DRIVER_OK
        )
        .is_some());
    }

    #[test]
    fn driver_ok_activates_with_ready_queues() {
        let mut t = t();
        negotiate(&mut t, V1 | 1 << 9);
        setup_queue(&mut t, 1, 32, 0x2_0000_0000);
        let e = w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            e,
            Some(Effect::Activate {
                features: V1 | 1 << 9,
                queues: vec![QueueConfig {
                    index: 1,
                    size: 32,
                    desc: 0x2_0000_0000,
                    avail: 0x2_0000_1000,
                    used: 0x2_0000_2000
                }],
            })
        );
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS),
            ACK_DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert!(t.is_active());
        // Only the first time.
        assert_eq!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | FEATURES_OK | DRIVER_OK
            ),
            None
        );
        assert_eq!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | FEATURES_OK | DRIVER_OK | 0x80
            ),
            None
        );
        assert!(!t.is_active(), "the driver gave up");
    }

    #[test]
    fn no_queue_starts_after_driver_ok() {
        let mut t = active();
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1), None);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            Some(Effect::Notify(0))
        );
    }

    #[test]
    fn reset_clears_everything() {
        let mut t = active();
        t.set_inject(Inject::Once);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert!(t.raise_used());
        assert!(!t.raise_config());
        let generation = rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION);
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), Some(Effect::Reset));
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert!(!t.is_active());
        assert_eq!(t.driver_features(), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            DEV_FEATURES & 0xffff_ffff,
            "sel back to 0"
        );
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX),
            256,
            "QueueSel back to 0"
        );
        assert!(t.queues.iter().all(|q| q.num == 0
            && !q.ready
            && q.desc == 0
            && q.avail == 0
            && q.used == 0));
        // The generation counts config changes; it survives a reset.
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), generation);
        assert_eq!(w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0), None);
        // The line was deasserted: after a new activation the next raise injects.
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0x5000_0000);
        assert!(w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | FEATURES_OK | DRIVER_OK
        )
        .is_some());
        assert!(t.raise_used());
        // A reset from the start state also reports Reset.
        let mut fresh = MmioTransport::new(model());
        assert_eq!(w(&mut fresh, VIRTIO_MMIO_STATUS, 0), Some(Effect::Reset));
    }

    #[test]
    fn notify_only_when_active_and_valid() {
        let mut t = t();
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0x5000_0000);
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            None,
            "before DRIVER_OK"
        );
        let mut t = active();
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            Some(Effect::Notify(0))
        );
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1),
            Some(Effect::Notify(1))
        );
        for bad in [2, 0xffff, 0x1_0000, 0xffff_ffff, u64::MAX] {
            assert_eq!(
                w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, bad),
                None,
                "queue {bad:#x}"
            );
        }
        assert_eq!(t.write(r(VIRTIO_MMIO_QUEUE_NOTIFY), 2, 0), None, "size 2");
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY), 0, "write-only");
        t.fail();
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            None,
            "after failure"
        );
    }

    #[test]
    fn interrupt_merge_and_ack_cycle_of_the_once_policy() {
        let mut t = active();
        t.set_inject(Inject::Once);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert!(t.raise_used(), "first raise injects");
        assert!(!t.raise_used(), "merged while unacknowledged");
        // Reading has no side effect.
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        assert!(!t.raise_used());
        assert!(!t.raise_config(), "merged too");
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 3);
        // A partial ACK keeps the line asserted.
        assert_eq!(w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1), None);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        assert!(!t.raise_used());
        // ACK of unknown bits is masked; the full ACK deasserts.
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 0xffff_ffff),
            Some(Effect::Deassert)
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert!(t.raise_used(), "injects again after the ACK");
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert!(t.raise_config());
        // The ACK register is write-only.
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_ACK), 0);
    }

    #[test]
    fn by_default_every_report_injects_and_an_unacknowledged_one_is_retried() {
        let mut t = active();
        assert!(t.raise_used());
        assert!(t.raise_used(), "the first injection may have been dropped");
        assert!(t.raise_config());
        assert!(t.retry_interrupt());
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert!(t.retry_interrupt(), "the config bit is still untold");
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 2);
        assert!(!t.retry_interrupt());
        assert!(t.raise_used());
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), Some(Effect::Reset));
        assert!(!t.retry_interrupt(), "a reset leaves nothing to tell");
    }

    #[test]
    fn no_interrupts_before_driver_ok() {
        let mut t = t();
        assert!(!t.raise_used());
        assert!(!t.raise_config());
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION),
            1,
            "the change still counts"
        );
    }

    #[test]
    fn config_generation_and_set_config() {
        let mut t = active();
        t.set_inject(Inject::Once);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0);
        assert!(t.set_config(vec![9, 8, 7]));
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        assert_eq!(t.read(CONFIG_OFFSET, 4), 0x0007_0809);
        assert!(!t.set_config(vec![1]));
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 2);
        t.config_generation = u32::MAX;
        t.raise_config();
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 0, "wraps");
    }

    #[test]
    fn fail_sets_needs_reset() {
        let mut t = active();
        assert!(t.fail());
        assert!(!t.is_active());
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS),
            ACK_DRIVER | FEATURES_OK | DRIVER_OK | 0x40
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        // Writing the status back with NEEDS_RESET does not store it as a driver bit.
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | FEATURES_OK | DRIVER_OK | 0x40,
        );
        assert_eq!(t.status & 0x40, 0);
        // Not even a reset clears the failure: nothing serves the device.
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), Some(Effect::Reset));
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0x40);
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0x5000_0000);
        assert_eq!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | FEATURES_OK | DRIVER_OK
            ),
            None
        );
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS),
            ACK_DRIVER | FEATURES_OK | 0x40
        );
    }

    #[test]
    fn failed_before_driver_ok_refuses_it() {
        let mut t = t();
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0x5000_0000);
        assert!(!t.fail(), "no interrupt before DRIVER_OK");
        assert_eq!(
            w(
                &mut t,
                VIRTIO_MMIO_STATUS,
                ACK_DRIVER | FEATURES_OK | DRIVER_OK
            ),
            None
        );
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS),
            ACK_DRIVER | FEATURES_OK | 0x40
        );
    }

    /// Found by the `mmio_transport` fuzz target: DRIVER_OK together with (or after) the
    /// driver's own FAILED activated the worker of a device the transport calls inactive.
    #[test]
    fn driver_ok_from_a_driver_that_failed_is_refused() {
        const DRIVER_FAILED: u64 = VIRTIO_CONFIG_S_FAILED as u64;
        let mut t = t();
        // The minimised input: one Status write of 0xde, features never negotiated.
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0xde), None);
        assert!(!t.is_active());
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS) & DRIVER_OK, 0);
        // FAILED first, DRIVER_OK in a later write.
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0x5000_0000);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | FEATURES_OK | DRIVER_FAILED,
        );
        let all = ACK_DRIVER | FEATURES_OK | DRIVER_FAILED | DRIVER_OK;
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, all), None);
        assert_eq!(t.replay(), None);
        // A reset lets the driver start over.
        negotiate(&mut t, V1);
        setup_queue(&mut t, 0, 16, 0x5000_0000);
        let ok = w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(matches!(ok, Some(Effect::Activate { .. })));
    }

    #[test]
    fn shm_registers_say_no_region() {
        let mut t = t();
        for reg in [
            VIRTIO_MMIO_SHM_LEN_LOW,
            VIRTIO_MMIO_SHM_LEN_HIGH,
            VIRTIO_MMIO_SHM_BASE_LOW,
            VIRTIO_MMIO_SHM_BASE_HIGH,
        ] {
            assert_eq!(rd(&mut t, reg), 0xffff_ffff);
        }
        assert_eq!(w(&mut t, VIRTIO_MMIO_SHM_SEL, 3), None);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_SHM_SEL), 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), 0xffff_ffff);
    }

    #[test]
    fn unknown_offsets() {
        let mut t = active();
        // Legacy registers, gaps and unaligned offsets.
        for off in [
            VIRTIO_MMIO_GUEST_PAGE_SIZE,
            VIRTIO_MMIO_QUEUE_ALIGN,
            VIRTIO_MMIO_QUEUE_PFN,
            0x18,
            0x48,
            0x74,
            0xc0,
            0xf8,
            0x01,
            0x71,
            0xff,
        ] {
            assert_eq!(rd(&mut t, off), 0, "read {off:#x}");
            assert_eq!(w(&mut t, off, u64::MAX), None, "write {off:#x}");
        }
        // Nothing changed.
        assert!(t.is_active());
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_STATUS),
            ACK_DRIVER | FEATURES_OK | DRIVER_OK
        );
    }

    #[test]
    fn config_reads_are_zero_extended() {
        let mut t = t();
        let base = CONFIG_OFFSET;
        assert_eq!(t.read(base, 1), 0x01);
        assert_eq!(t.read(base + 1, 1), 0x02);
        assert_eq!(t.read(base, 2), 0x0201);
        assert_eq!(t.read(base + 3, 2), 0x0504);
        assert_eq!(t.read(base, 4), 0x0403_0201);
        assert_eq!(t.read(base + 2, 4), 0x0605_0403);
        assert_eq!(t.read(base, 8), 0x0807_0605_0403_0201);
        assert_eq!(t.read(base + 4, 8), 0x0c0b_0a09_0807_0605);
        // Past the end of the 12 bytes.
        assert_eq!(t.read(base + 8, 8), 0x0c0b_0a09);
        assert_eq!(t.read(base + 11, 2), 0x0c);
        assert_eq!(t.read(base + 12, 4), 0);
        assert_eq!(t.read(base + 0x1000, 8), 0);
        assert_eq!(t.read(u64::MAX, 8), 0);
        assert_eq!(t.read(u64::MAX - 3, 4), 0);
    }

    #[test]
    fn config_odd_sizes_read_0() {
        let mut t = t();
        for size in [0, 3, 5, 6, 7, 16, u64::MAX] {
            assert_eq!(t.read(CONFIG_OFFSET, size), 0, "size {size}");
            assert_eq!(t.write(CONFIG_OFFSET, size, 1), None, "size {size}");
        }
    }

    #[test]
    fn config_writes_are_forwarded_not_applied() {
        let mut t = t();
        assert_eq!(
            t.write(CONFIG_OFFSET + 2, 2, 0xffff_abcd),
            Some(Effect::ConfigWrite {
                offset: 2,
                data: vec![0xcd, 0xab]
            })
        );
        assert_eq!(
            t.write(CONFIG_OFFSET + 4, 8, 0x1122_3344_5566_7788),
            Some(Effect::ConfigWrite {
                offset: 4,
                data: vec![0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
            })
        );
        assert_eq!(
            t.write(CONFIG_OFFSET + 11, 1, 0),
            Some(Effect::ConfigWrite {
                offset: 11,
                data: vec![0]
            })
        );
        assert_eq!(t.read(CONFIG_OFFSET, 4), 0x0403_0201, "bytes unchanged");
        // Outside the config.
        assert_eq!(t.write(CONFIG_OFFSET + 11, 2, 0), None);
        assert_eq!(t.write(CONFIG_OFFSET + 12, 1, 0), None);
        assert_eq!(t.write(u64::MAX, 8, u64::MAX), None);
        assert_eq!(t.write(u64::MAX - 7, 8, u64::MAX), None);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let mut t = active();
        let offsets = [
            0,
            1,
            0x4c,
            0x50,
            0x70,
            0xfc,
            0xff,
            0x100,
            0x1ff,
            0x1000,
            u64::MAX / 2,
            u64::MAX - 1,
            u64::MAX,
        ];
        let sizes = [0, 1, 2, 3, 4, 8, 16, u64::MAX];
        let values = [0, 1, 0xffff_ffff, 0x1_0000_0000, u64::MAX];
        for &off in &offsets {
            for &size in &sizes {
                let _ = t.read(off, size);
                for &v in &values {
                    let _ = t.write(off, size, v);
                    w(&mut t, VIRTIO_MMIO_QUEUE_SEL, v);
                }
            }
        }
        for reg in (0..0x100).step_by(4) {
            for &v in &values {
                let _ = w(&mut t, reg, v);
                let _ = rd(&mut t, reg);
            }
        }
        let _ = t.raise_used();
        let _ = t.raise_config();
        let _ = t.fail();
        // An empty model (no queues, no config) is just as safe.
        let mut e = MmioTransport::new(DeviceModel {
            device_id: 0,
            features: 0,
            queue_max: vec![],
            config: vec![],
        });
        for reg in (0..0x100).step_by(4) {
            let _ = w(&mut e, reg, 1);
            assert_eq!(w(&mut e, VIRTIO_MMIO_QUEUE_NOTIFY, 0), None);
        }
        assert_eq!(e.read(CONFIG_OFFSET, 8), 0);
        assert_eq!(rd(&mut e, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    }

    /// The probe sequence of Linux's virtio_mmio.c and virtio.c for a two-queue device.
    #[test]
    fn linux_like_init_sequence() {
        let mut t = t();
        // vm_probe
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), u64::from(MAGIC));
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VENDOR_ID), u64::from(VENDOR_ID));
        // register_virtio_device: reset, then ACKNOWLEDGE
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), Some(Effect::Reset));
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            u64::from(VIRTIO_CONFIG_S_ACKNOWLEDGE),
        );
        // virtio_dev_probe: DRIVER, read features
        w(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let mut features = rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        features |= rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
        assert_eq!(features, DEV_FEATURES);
        // The driver takes what it knows.
        let wanted = features & (V1 | 1 << 9);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, wanted >> 32);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, wanted & 0xffff_ffff);
        w(&mut t, VIRTIO_MMIO_STATUS, ACK_DRIVER | FEATURES_OK);
        assert_ne!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & FEATURES_OK,
            0,
            "re-read as Linux does"
        );
        // Config read with the generation loop.
        let g = rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION);
        let capacity = t.read(CONFIG_OFFSET, 8);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), g);
        assert_eq!(capacity, 0x0807_0605_0403_0201);
        // vm_find_vqs -> vm_setup_vq for each queue
        let mut queues = Vec::new();
        for q in 0u32.. {
            w(&mut t, VIRTIO_MMIO_QUEUE_SEL, u64::from(q));
            assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
            let max = rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX);
            if max == 0 {
                break;
            }
            let num = max.min(128);
            let base = 0x5000_0000 + u64::from(q) * 0x1_0000;
            setup_queue(&mut t, q, num, base);
            assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
            queues.push(QueueConfig {
                index: q as u16,
                size: num as u16,
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
            });
        }
        assert_eq!(queues.len(), 2);
        // virtio_device_ready
        let effect = w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACK_DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            effect,
            Some(Effect::Activate {
                features: V1 | 1 << 9,
                queues
            })
        );
        // I/O: kick, used buffers, vm_interrupt reads and ACKs.
        assert_eq!(
            w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            Some(Effect::Notify(0))
        );
        assert!(t.raise_used());
        let isr = rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS);
        assert_eq!(isr, 1);
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, isr);
        assert!(t.raise_used());
        // Removal: reset.
        assert_eq!(w(&mut t, VIRTIO_MMIO_STATUS, 0), Some(Effect::Reset));
        assert!(!t.is_active());
        assert_eq!(rd(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }
}
