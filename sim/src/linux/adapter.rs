//! The adapter: plays Linux's virtio-mmio layer for a UML guest whose virtio transport is
//! vhost-user. Each vhost-user message from UML becomes the register accesses a Linux
//! virtio-mmio driver makes at the same step (through the zone's trapped vCPU, so the broker
//! answers them from its register file); each kick becomes a QueueNotify; each interrupt the
//! broker raises becomes the InterruptStatus read and InterruptACK write of Linux's
//! `vm_interrupt`, then a signal on the call fd of every queue whose used ring moved.
//!
//! | UML (virtio_uml)                      | adapter: register accesses                        |
//! |---------------------------------------|---------------------------------------------------|
//! | SET_OWNER (device probe)              | MagicValue, Version, DeviceID, VendorID; Status 0 (reset, read back until 0); Status \|= ACKNOWLEDGE |
//! | GET_FEATURES (first)                  | Status \|= DRIVER; DeviceFeaturesSel 1, DeviceFeatures; Sel 0, DeviceFeatures |
//! | SET_FEATURES                          | DriverFeaturesSel 1, DriverFeatures; Sel 0, DriverFeatures; Status \|= FEATURES_OK; Status read |
//! | GET_CONFIG (offset 0, size n)         | ConfigGeneration; config space in 4-byte reads; ConfigGeneration again |
//! | SET_CONFIG                            | config space writes of the field's width          |
//! | SET_VRING_NUM                         | QueueSel, QueueReady (must be 0), QueueNumMax      |
//! | SET_VRING_ENABLE 1                    | QueueSel, QueueNum, QueueDesc/Driver/Device Low+High, QueueReady 1; once every queue set up is enabled: Status \|= DRIVER_OK |
//! | kick (eventfd)                        | QueueNotify = queue index                          |
//! | SET_VRING_ENABLE 0 (driver removal)   | Status 0 (reset) while DRIVER_OK; QueueSel, QueueReady 0, QueueReady read |
//!
//! SET_MEM_TABLE, SET_VRING_BASE/ADDR/CALL/KICK touch no register: they are checked (the
//! memory must be the file the broker maps, inside the zone's RAM; the base must be 0) and
//! remembered.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::vhost_user::{self as vu, req, Msg, WireError};
use crate::hv::{Vcpu, VcpuError};
use crate::layout::{DevKind, DevSpec, RamRegion};
use crate::transport::reg;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;
/// virtio-mmio's register block ends at 0x100; config space follows.
const CONFIG_MAX: u32 = 0x100;

/// The zone's one vCPU (UML is a uniprocessor): accesses from the adapter's threads are
/// serialised, as they would be on the guest's CPU.
pub struct ZoneCpu(Mutex<Vcpu>);

impl ZoneCpu {
    pub fn new(vcpu: Vcpu) -> Self {
        ZoneCpu(Mutex::new(vcpu))
    }

    fn read(&self, addr: u64, size: u64) -> Result<u64, VcpuError> {
        self.0.lock().unwrap().read(addr, size)
    }

    fn write(&self, addr: u64, size: u64, value: u64) -> Result<(), VcpuError> {
        self.0.lock().unwrap().write(addr, size, value)
    }

    fn zone(&self) -> u32 {
        self.0.lock().unwrap().zone()
    }

    fn hypervisor(&self) -> Arc<crate::hv::Hypervisor> {
        self.0.lock().unwrap().hypervisor().clone()
    }
}

/// UML's memory as the guest kernel sees it: read here only for the used rings' `idx`, which
/// Linux's interrupt handler reads too.
pub struct GuestRam {
    file: File,
    base: *const u8,
    size: u64,
}

// SAFETY: a read-only shared mapping that lives as long as the value; reads are volatile.
unsafe impl Send for GuestRam {}
// SAFETY: as above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps all of `file` (UML physical address X at offset X) read-only.
    pub fn map(file: File) -> anyhow::Result<Self> {
        let size = file.metadata()?.len();
        let len = std::num::NonZeroUsize::new(size as usize)
            .ok_or_else(|| anyhow::anyhow!("UML's memory file is empty"))?;
        // SAFETY: a fresh read-only shared mapping of the whole file; no Rust reference to it
        // is ever made, every read is volatile and bounds-checked.
        let p = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &file,
                0,
            )
        }?;
        Ok(GuestRam {
            file,
            base: p.as_ptr() as *const u8,
            size,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn read_u16(&self, gpa: u64) -> Option<u16> {
        if gpa.checked_add(2)? > self.size || gpa % 2 != 0 {
            return None;
        }
        // SAFETY: inside the mapping (checked above) and aligned.
        Some(unsafe { std::ptr::read_volatile(self.base.add(gpa as usize) as *const u16) })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        let _ = unsafe {
            nix::sys::mman::munmap(
                std::ptr::NonNull::new(self.base as *mut libc::c_void).unwrap(),
                self.size as usize,
            )
        };
    }
}

#[derive(Debug, Default, Clone)]
struct Vq {
    num: u32,
    desc: u64,
    avail: u64,
    used: u64,
    call: Option<Arc<OwnedFd>>,
    configured: bool,
    enabled: bool,
    last_used: u16,
}

#[derive(Debug, Default)]
struct LinkState {
    probed: bool,
    device_features: Option<u64>,
    driver_features: u64,
    protocol_features: u64,
    driver_ok: bool,
    mem_ok: bool,
    queues: Vec<Vq>,
    /// Where config-change notices go (SET_BACKEND_REQ_FD).
    backend_req: Option<Arc<OwnedFd>>,
}

/// Counters for the report.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub messages: AtomicU64,
    pub kicks: AtomicU64,
    pub interrupts: AtomicU64,
    pub spurious_interrupts: AtomicU64,
    pub calls: AtomicU64,
    pub config_changes: AtomicU64,
    pub config_reads: AtomicU64,
    /// The most requests the driver had outstanding on one queue at a kick.
    pub max_in_flight: AtomicU64,
}

/// What the report says about one device's link.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LinkSummary {
    pub connected: bool,
    pub probed: bool,
    pub device_features: u64,
    pub driver_features: u64,
    pub protocol_features: u64,
    pub features_ok: bool,
    pub driver_ok_reached: bool,
    pub queues_enabled: u32,
    pub messages: u64,
    pub kicks: u64,
    pub interrupts: u64,
    pub spurious_interrupts: u64,
    pub calls: u64,
    pub config_changes: u64,
    pub config_reads: u64,
    /// The most requests Linux had outstanding on one queue when it kicked.
    pub max_in_flight: u64,
    pub errors: Vec<String>,
    /// The vhost-user messages in the order UML sent them (first 64).
    pub message_order: Vec<String>,
}

/// One device: the vhost-user socket UML connects to, and the device's register block.
pub struct DeviceLink {
    pub spec: DevSpec,
    cpu: Arc<ZoneCpu>,
    ram: Arc<GuestRam>,
    zone_ram: Vec<RamRegion>,
    state: Mutex<LinkState>,
    pub stats: LinkStats,
    summary: Mutex<LinkSummary>,
    stop: AtomicBool,
    trace: bool,
}

type Res<T> = Result<T, String>;

fn vcpu_err(e: VcpuError) -> String {
    e.to_string()
}

impl DeviceLink {
    pub fn new(
        spec: DevSpec,
        cpu: Arc<ZoneCpu>,
        ram: Arc<GuestRam>,
        zone_ram: Vec<RamRegion>,
        trace: bool,
    ) -> Arc<Self> {
        Arc::new(DeviceLink {
            spec,
            cpu,
            ram,
            zone_ram,
            state: Mutex::new(LinkState::default()),
            stats: LinkStats::default(),
            summary: Mutex::new(LinkSummary::default()),
            stop: AtomicBool::new(false),
            trace,
        })
    }

    fn tag(&self) -> String {
        let kind = match self.spec.kind {
            DevKind::Blk { .. } => "blk",
            DevKind::Net { .. } => "net",
            DevKind::Console { .. } => "console",
        };
        format!("{kind}@0x{:x}", self.spec.addr)
    }

    fn error(&self, e: String) {
        println!("hvisor-sim: linux {}: {e}", self.tag());
        self.summary.lock().unwrap().errors.push(e);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn summary(&self) -> LinkSummary {
        let st = self.state.lock().unwrap();
        let mut s = self.summary.lock().unwrap().clone();
        s.probed = st.probed;
        s.device_features = st.device_features.unwrap_or(0);
        s.driver_features = st.driver_features;
        s.protocol_features = st.protocol_features;
        s.queues_enabled = st.queues.iter().filter(|q| q.enabled).count() as u32;
        let ld = |c: &AtomicU64| c.load(Ordering::Relaxed);
        s.messages = ld(&self.stats.messages);
        s.kicks = ld(&self.stats.kicks);
        s.max_in_flight = ld(&self.stats.max_in_flight);
        s.interrupts = ld(&self.stats.interrupts);
        s.spurious_interrupts = ld(&self.stats.spurious_interrupts);
        s.calls = ld(&self.stats.calls);
        s.config_changes = ld(&self.stats.config_changes);
        s.config_reads = ld(&self.stats.config_reads);
        s
    }

    // --- register accesses, as Linux's readl/writel ---

    fn r32(&self, off: u64) -> Res<u32> {
        self.cpu
            .read(self.spec.addr + off, 4)
            .map(|v| v as u32)
            .map_err(vcpu_err)
    }

    fn w32(&self, off: u64, v: u32) -> Res<()> {
        self.cpu
            .write(self.spec.addr + off, 4, v as u64)
            .map_err(vcpu_err)
    }

    /// `virtio_add_status`: read Status, write it back with `bits` added.
    fn add_status(&self, bits: u32) -> Res<()> {
        let s = self.r32(reg::STATUS)? & 0xff;
        self.w32(reg::STATUS, s | bits)
    }

    /// `vm_reset`: Status 0, then wait until the device reads back 0.
    fn reset(&self) -> Res<()> {
        self.w32(reg::STATUS, 0)?;
        for _ in 0..1000 {
            if self.r32(reg::STATUS)? == 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Err("the device did not complete a reset (Status stayed nonzero)".into())
    }

    fn expected_device_id(&self) -> u32 {
        match self.spec.kind {
            DevKind::Net { .. } => 1,
            DevKind::Blk { .. } => 2,
            DevKind::Console { .. } => 3,
        }
    }

    /// `virtio_mmio_probe` and `register_virtio_device`.
    fn probe(&self) -> Res<()> {
        let magic = self.r32(reg::MAGIC_VALUE)?;
        if magic != reg::MAGIC {
            return Err(format!("wrong magic value 0x{magic:x}"));
        }
        let version = self.r32(reg::VERSION)?;
        if version != 2 {
            return Err(format!("virtio-mmio version {version}, expected 2"));
        }
        let id = self.r32(reg::DEVICE_ID)?;
        if id != self.expected_device_id() {
            return Err(format!(
                "device ID {id}, but the configuration names a device of ID {}",
                self.expected_device_id()
            ));
        }
        let _vendor = self.r32(reg::VENDOR_ID)?;
        self.reset()?;
        self.add_status(STATUS_ACKNOWLEDGE)?;
        self.state.lock().unwrap().probed = true;
        Ok(())
    }

    /// `vm_get_features` (after the driver core's Status |= DRIVER).
    fn device_features(&self) -> Res<u64> {
        if let Some(f) = self.state.lock().unwrap().device_features {
            return Ok(f);
        }
        self.add_status(STATUS_DRIVER)?;
        self.w32(reg::DEVICE_FEATURES_SEL, 1)?;
        let hi = self.r32(reg::DEVICE_FEATURES)? as u64;
        self.w32(reg::DEVICE_FEATURES_SEL, 0)?;
        let lo = self.r32(reg::DEVICE_FEATURES)? as u64;
        let f = hi << 32 | lo;
        self.state.lock().unwrap().device_features = Some(f);
        Ok(f)
    }

    /// `vm_finalize_features` and `virtio_features_ok`.
    fn set_features(&self, f: u64) -> Res<()> {
        let offered = self.device_features()?;
        // Bit 30 is vhost-user's own (PROTOCOL_FEATURES), not the device's.
        let f = f & !vu::F_PROTOCOL_FEATURES;
        if f & !offered != 0 {
            return Err(format!(
                "the driver accepts features 0x{:x} the device does not offer",
                f & !offered
            ));
        }
        self.w32(reg::DRIVER_FEATURES_SEL, 1)?;
        self.w32(reg::DRIVER_FEATURES, (f >> 32) as u32)?;
        self.w32(reg::DRIVER_FEATURES_SEL, 0)?;
        self.w32(reg::DRIVER_FEATURES, f as u32)?;
        self.add_status(STATUS_FEATURES_OK)?;
        if self.r32(reg::STATUS)? & STATUS_FEATURES_OK == 0 {
            return Err(format!("the device refused features 0x{f:x}"));
        }
        self.state.lock().unwrap().driver_features = f;
        self.summary.lock().unwrap().features_ok = true;
        Ok(())
    }

    /// Config space `[0x100 + off, + len)`, in 4-byte reads where whole words fit (as Linux
    /// reads 4- and 8-byte fields), bracketed by ConfigGeneration as `virtio_cread` does.
    fn read_config(&self, off: u32, len: u32) -> Res<Vec<u8>> {
        if off.checked_add(len).is_none_or(|e| e > CONFIG_MAX) {
            return Err(format!(
                "config read of {len} bytes at {off} is out of range"
            ));
        }
        for _ in 0..4 {
            let gen = self.r32(reg::CONFIG_GENERATION)?;
            let mut out = Vec::with_capacity(len as usize);
            let mut at = off;
            while at < off + len {
                let left = off + len - at;
                let addr = reg::CONFIG + at as u64;
                if at % 4 == 0 && left >= 4 {
                    out.extend_from_slice(&self.r32(addr)?.to_le_bytes());
                    at += 4;
                } else if at % 2 == 0 && left >= 2 {
                    let v = self.cpu.read(self.spec.addr + addr, 2).map_err(vcpu_err)?;
                    out.extend_from_slice(&(v as u16).to_le_bytes());
                    at += 2;
                } else {
                    let v = self.cpu.read(self.spec.addr + addr, 1).map_err(vcpu_err)?;
                    out.push(v as u8);
                    at += 1;
                }
            }
            self.stats.config_reads.fetch_add(1, Ordering::Relaxed);
            if self.r32(reg::CONFIG_GENERATION)? == gen {
                return Ok(out);
            }
        }
        Err("config space kept changing while read".into())
    }

    /// `vm_set`: one write of the field's width (1, 2, 4; 8 as two 4-byte writes).
    fn write_config(&self, off: u32, data: &[u8]) -> Res<()> {
        let len = data.len() as u32;
        if off.checked_add(len).is_none_or(|e| e > CONFIG_MAX) {
            return Err(format!(
                "config write of {len} bytes at {off} is out of range"
            ));
        }
        let base = self.spec.addr + reg::CONFIG + off as u64;
        let w = |a: u64, size: u64, bytes: &[u8]| {
            let mut v = [0u8; 8];
            v[..bytes.len()].copy_from_slice(bytes);
            self.cpu
                .write(a, size, u64::from_le_bytes(v))
                .map_err(vcpu_err)
        };
        match data.len() {
            1 | 2 | 4 => w(base, len as u64, data),
            8 => {
                w(base, 4, &data[..4])?;
                w(base + 4, 4, &data[4..])
            }
            _ => data
                .iter()
                .enumerate()
                .try_for_each(|(i, b)| w(base + i as u64, 1, std::slice::from_ref(b))),
        }
    }

    fn queue(st: &mut LinkState, idx: u32) -> Res<&mut Vq> {
        if idx >= 64 {
            return Err(format!("queue index {idx} out of range"));
        }
        if st.queues.len() <= idx as usize {
            st.queues.resize(idx as usize + 1, Vq::default());
        }
        Ok(&mut st.queues[idx as usize])
    }

    /// The first part of `vm_setup_vq`: is the queue there and free, and how large may it be.
    fn set_vring_num(&self, idx: u32, num: u32) -> Res<()> {
        self.w32(reg::QUEUE_SEL, idx)?;
        if self.r32(reg::QUEUE_READY)? != 0 {
            return Err(format!("queue {idx} is already in use"));
        }
        let max = self.r32(reg::QUEUE_NUM_MAX)?;
        if max == 0 {
            return Err(format!("the device has no queue {idx}"));
        }
        if num == 0 || num > max || !num.is_power_of_two() {
            return Err(format!(
                "queue {idx}: size {num} (the device allows up to {max})"
            ));
        }
        let mut st = self.state.lock().unwrap();
        let q = Self::queue(&mut st, idx)?;
        q.num = num;
        q.configured = true;
        Ok(())
    }

    fn in_ram(&self, gpa: u64, len: u64) -> bool {
        self.zone_ram.iter().any(|r| {
            gpa >= r.zonex_ipa
                && gpa
                    .checked_add(len)
                    .is_some_and(|e| e <= r.zonex_ipa + r.size)
        })
    }

    fn set_vring_addr(&self, a: vu::VringAddr) -> Res<()> {
        let mut st = self.state.lock().unwrap();
        if !st.mem_ok {
            return Err("SET_VRING_ADDR before a valid SET_MEM_TABLE".into());
        }
        let q = Self::queue(&mut st, a.index)?;
        // UML gives user addresses equal to its physical ones (checked at SET_MEM_TABLE).
        let n = q.num.max(1) as u64;
        for (what, gpa, len) in [
            ("descriptor table", a.desc, 16 * n),
            ("available ring", a.avail, 6 + 2 * n),
            ("used ring", a.used, 6 + 8 * n),
        ] {
            if !self.in_ram(gpa, len) {
                return Err(format!(
                    "queue {}: {what} at 0x{gpa:x} is outside the zone's RAM",
                    a.index
                ));
            }
        }
        q.desc = a.desc;
        q.avail = a.avail;
        q.used = a.used;
        Ok(())
    }

    /// The rest of `vm_setup_vq`: hand the rings to the device and mark the queue ready.
    fn enable(&self, idx: u32) -> Res<()> {
        let q = {
            let mut st = self.state.lock().unwrap();
            Self::queue(&mut st, idx)?.clone()
        };
        if !q.configured || q.desc == 0 {
            return Err(format!("queue {idx} enabled before it was set up"));
        }
        self.w32(reg::QUEUE_SEL, idx)?;
        self.w32(reg::QUEUE_NUM, q.num)?;
        self.w32(reg::QUEUE_DESC_LOW, q.desc as u32)?;
        self.w32(reg::QUEUE_DESC_HIGH, (q.desc >> 32) as u32)?;
        self.w32(reg::QUEUE_DRIVER_LOW, q.avail as u32)?;
        self.w32(reg::QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32)?;
        self.w32(reg::QUEUE_DEVICE_LOW, q.used as u32)?;
        self.w32(reg::QUEUE_DEVICE_HIGH, (q.used >> 32) as u32)?;
        self.w32(reg::QUEUE_READY, 1)?;
        let all_enabled = {
            let mut st = self.state.lock().unwrap();
            let q = Self::queue(&mut st, idx)?;
            q.enabled = true;
            q.last_used = 0;
            !st.driver_ok && st.queues.iter().all(|q| q.enabled || !q.configured)
        };
        if all_enabled {
            // `virtio_device_ready` after the driver's find_vqs.
            self.driver_ok()?;
        }
        Ok(())
    }

    fn driver_ok(&self) -> Res<()> {
        self.add_status(STATUS_DRIVER_OK)?;
        self.state.lock().unwrap().driver_ok = true;
        self.summary.lock().unwrap().driver_ok_reached = true;
        Ok(())
    }

    /// Driver removal (`virtio_reset_device`, then `vm_del_vq`).
    fn disable(&self, idx: u32) -> Res<()> {
        let was_ok = std::mem::take(&mut self.state.lock().unwrap().driver_ok);
        if was_ok {
            self.reset()?;
        }
        self.w32(reg::QUEUE_SEL, idx)?;
        self.w32(reg::QUEUE_READY, 0)?;
        let _ = self.r32(reg::QUEUE_READY)?;
        let mut st = self.state.lock().unwrap();
        let q = Self::queue(&mut st, idx)?;
        q.enabled = false;
        q.configured = false;
        Ok(())
    }

    fn set_mem_table(&self, m: &Msg) -> Res<()> {
        let regions = m.mem_regions().map_err(|e| e.to_string())?;
        if m.fds.len() != regions.len() {
            return Err(format!(
                "SET_MEM_TABLE: {} regions with {} fds",
                regions.len(),
                m.fds.len()
            ));
        }
        for (r, fd) in regions.iter().zip(&m.fds) {
            if !super::uml::same_file(self.ram.file(), fd) {
                return Err(format!(
                    "SET_MEM_TABLE: region 0x{:x} is not in the memory file given to the broker",
                    r.guest_addr
                ));
            }
            if r.user_addr != r.guest_addr || r.mmap_offset != r.guest_addr {
                return Err(format!(
                    "SET_MEM_TABLE: region {r:?} is not identity-mapped (UML maps physical address X at file offset X)"
                ));
            }
            if !self.in_ram(r.guest_addr, r.size) {
                return Err(format!(
                    "UML's memory [0x{:x}, 0x{:x}) is not inside the zone's memory_region list: \
                     give the zone one region with zone0_ipa = zonex_ipa <= 0x{:x} ending at 0x{:x}",
                    r.guest_addr,
                    r.guest_addr + r.size,
                    r.guest_addr,
                    r.guest_addr + r.size
                ));
            }
        }
        self.state.lock().unwrap().mem_ok = true;
        Ok(())
    }

    /// Handles one message; `Some(payload)` is the reply of a request that has one.
    fn handle(&self, m: &Msg, kicks: &mut Kicks) -> Res<Option<Vec<u8>>> {
        match m.request {
            req::SET_OWNER => self.probe().map(|_| None),
            req::RESET_OWNER | req::RESET_DEVICE => self.reset().map(|_| None),
            req::GET_FEATURES => {
                let f = self.device_features()?;
                Ok(Some((f | vu::F_PROTOCOL_FEATURES).to_le_bytes().to_vec()))
            }
            req::SET_FEATURES => {
                let f = m.u64().map_err(|e| e.to_string())?;
                self.set_features(f).map(|_| None)
            }
            req::GET_PROTOCOL_FEATURES => Ok(Some(
                (vu::proto::REPLY_ACK | vu::proto::CONFIG | vu::proto::BACKEND_REQ)
                    .to_le_bytes()
                    .to_vec(),
            )),
            req::SET_BACKEND_REQ_FD => {
                let fd = m
                    .fds
                    .first()
                    .ok_or("SET_BACKEND_REQ_FD without its fd")?
                    .try_clone()
                    .map_err(|e| e.to_string())?;
                self.state.lock().unwrap().backend_req = Some(Arc::new(fd));
                Ok(None)
            }
            req::SET_PROTOCOL_FEATURES => {
                let f = m.u64().map_err(|e| e.to_string())?;
                self.state.lock().unwrap().protocol_features = f;
                Ok(None)
            }
            req::GET_CONFIG => {
                let (off, size, flags, _) = m.config().map_err(|e| e.to_string())?;
                let data = self.read_config(off, size)?;
                let mut out = Vec::with_capacity(12 + data.len());
                out.extend_from_slice(&off.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&flags.to_le_bytes());
                out.extend_from_slice(&data);
                Ok(Some(out))
            }
            req::SET_CONFIG => {
                let (off, size, _, data) = m.config().map_err(|e| e.to_string())?;
                if data.len() < size as usize {
                    return Err("SET_CONFIG shorter than it says".into());
                }
                self.write_config(off, &data[..size as usize]).map(|_| None)
            }
            req::SET_MEM_TABLE => self.set_mem_table(m).map(|_| None),
            req::SET_VRING_NUM => {
                let (idx, num) = m.vring_state().map_err(|e| e.to_string())?;
                self.set_vring_num(idx, num).map(|_| None)
            }
            req::SET_VRING_BASE => {
                let (idx, base) = m.vring_state().map_err(|e| e.to_string())?;
                if base != 0 {
                    return Err(format!(
                        "queue {idx}: base {base}, but a virtio-mmio queue starts at 0"
                    ));
                }
                Ok(None)
            }
            req::GET_VRING_BASE => {
                let (idx, _) = m.vring_state().map_err(|e| e.to_string())?;
                let mut out = idx.to_le_bytes().to_vec();
                out.extend_from_slice(&0u32.to_le_bytes());
                Ok(Some(out))
            }
            req::SET_VRING_ADDR => {
                let a = m.vring_addr().map_err(|e| e.to_string())?;
                self.set_vring_addr(a).map(|_| None)
            }
            req::SET_VRING_CALL | req::SET_VRING_KICK | req::SET_VRING_ERR => {
                let v = m.u64().map_err(|e| e.to_string())?;
                let idx = (v & 0xff) as u32;
                let fd = if v & vu::VRING_NOFD != 0 {
                    None
                } else {
                    Some(
                        m.fds
                            .first()
                            .ok_or("vring fd message without its fd")?
                            .try_clone()
                            .map_err(|e| e.to_string())?,
                    )
                };
                match m.request {
                    req::SET_VRING_CALL => {
                        if let Some(fd) = &fd {
                            // Never block the interrupt thread on a full pipe.
                            let fl = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| e.to_string())?;
                            fcntl(
                                fd,
                                FcntlArg::F_SETFL(
                                    OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK,
                                ),
                            )
                            .map_err(|e| e.to_string())?;
                        }
                        let mut st = self.state.lock().unwrap();
                        Self::queue(&mut st, idx)?.call = fd.map(Arc::new);
                    }
                    req::SET_VRING_KICK => kicks.set(idx, fd)?,
                    _ => {}
                }
                Ok(None)
            }
            req::SET_VRING_ENABLE => {
                let (idx, on) = m.vring_state().map_err(|e| e.to_string())?;
                match on {
                    1 => self.enable(idx).map(|_| None),
                    0 => self.disable(idx).map(|_| None),
                    _ => Err(format!("SET_VRING_ENABLE {idx} with {on}")),
                }
            }
            other => Err(format!(
                "request {other} ({}) is not supported",
                req::name(other)
            )),
        }
    }

    /// A kick: `vm_notify`.
    fn kick(&self, idx: u32) -> Res<()> {
        self.stats.kicks.fetch_add(1, Ordering::Relaxed);
        let (enabled, ok) = {
            let st = self.state.lock().unwrap();
            if let Some(q) = st.queues.get(idx as usize).filter(|q| q.enabled) {
                // Outstanding: what the driver made available and the device has not used.
                if let (Some(avail), Some(used)) = (
                    self.ram.read_u16(q.avail + 2),
                    self.ram.read_u16(q.used + 2),
                ) {
                    let n = u64::from(avail.wrapping_sub(used));
                    self.stats.max_in_flight.fetch_max(n, Ordering::Relaxed);
                }
            }
            (
                st.queues.get(idx as usize).is_some_and(|q| q.enabled),
                st.driver_ok,
            )
        };
        if !enabled {
            return Ok(());
        }
        if !ok {
            self.driver_ok()?;
        }
        self.w32(reg::QUEUE_NOTIFY, idx)
    }

    /// Serves UML's connection until it closes; kicks are handled on the same thread.
    pub fn serve(self: &Arc<Self>, sock: UnixStream) {
        self.summary.lock().unwrap().connected = true;
        let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
            Ok(e) => e,
            Err(e) => return self.error(format!("epoll: {e}")),
        };
        const SOCK: u64 = u64::MAX;
        if let Err(e) = epoll.add(&sock, EpollEvent::new(EpollFlags::EPOLLIN, SOCK)) {
            return self.error(format!("epoll: {e}"));
        }
        let mut kicks = Kicks {
            epoll: &epoll,
            fds: Vec::new(),
        };
        let mut events = [EpollEvent::empty(); 8];
        while !self.stop.load(Ordering::Acquire) {
            let n = match epoll.wait(&mut events, EpollTimeout::from(100u16)) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return self.error(format!("epoll_wait: {e}")),
            };
            for ev in &events[..n] {
                if ev.data() == SOCK {
                    match self.one_message(sock.as_fd(), &mut kicks) {
                        Ok(()) => {}
                        Err(WireError::Eof) => return,
                        Err(e) => {
                            self.error(format!("vhost-user: {e}; closing the connection"));
                            return;
                        }
                    }
                } else {
                    let idx = ev.data() as u32;
                    if kicks.drain(idx) {
                        if let Err(e) = self.kick(idx) {
                            self.error(format!("kick of queue {idx}: {e}"));
                        }
                    }
                }
            }
        }
    }

    fn one_message(&self, sock: BorrowedFd<'_>, kicks: &mut Kicks) -> Result<(), WireError> {
        let m = vu::recv(sock)?;
        let n = self.stats.messages.fetch_add(1, Ordering::Relaxed);
        let what = match m.request {
            req::SET_VRING_NUM | req::SET_VRING_BASE | req::SET_VRING_ENABLE => m
                .vring_state()
                .map(|(i, v)| format!("{} {i} {v}", m.name()))
                .unwrap_or_else(|_| m.name().into()),
            req::SET_VRING_ADDR | req::SET_VRING_KICK | req::SET_VRING_CALL => {
                let i = m.payload.first().copied().unwrap_or(0);
                format!("{} {i}", m.name())
            }
            req::GET_CONFIG => m
                .config()
                .map(|(o, s, _, _)| format!("GET_CONFIG {o}+{s}"))
                .unwrap_or_else(|_| m.name().into()),
            _ => m.name().into(),
        };
        if n < 64 {
            self.summary
                .lock()
                .unwrap()
                .message_order
                .push(what.clone());
        }
        if self.trace {
            println!("hvisor-sim: linux {}: <- {what}", self.tag());
        }
        match self.handle(&m, kicks) {
            Ok(Some(payload)) => vu::reply(sock, &m, &payload),
            Ok(None) => vu::ack(sock, &m, true),
            Err(e) => {
                self.error(format!("{what}: {e}"));
                match m.request {
                    // A reply UML waits for: an empty config tells it the read failed.
                    req::GET_CONFIG => {
                        let mut out = m.payload.get(..8).unwrap_or(&[0; 8]).to_vec();
                        out[4..8].copy_from_slice(&0u32.to_le_bytes());
                        out.extend_from_slice(&0u32.to_le_bytes());
                        vu::reply(sock, &m, &out)
                    }
                    req::GET_FEATURES | req::GET_PROTOCOL_FEATURES | req::GET_VRING_BASE => {
                        Err(WireError::Malformed(format!("cannot answer {what}")))
                    }
                    _ => vu::ack(sock, &m, false),
                }
            }
        }
    }

    /// Interrupts of this device, as Linux's `vm_interrupt` takes them, until stopped. The
    /// EOI follows the handler, so an injection meanwhile meets an active interrupt.
    pub fn interrupts(self: &Arc<Self>) {
        let hv = self.cpu.hypervisor();
        let zone = self.cpu.zone();
        while !self.stop.load(Ordering::Acquire) {
            if !hv.take_irq(zone, self.spec.irq, Duration::from_millis(100)) {
                if hv.broker_gone() {
                    return;
                }
                continue;
            }
            self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
            let handled = self.take_interrupt();
            hv.eoi(zone, self.spec.irq);
            if let Err(e) = handled {
                self.error(format!("interrupt: {e}"));
                if hv.broker_gone() {
                    return;
                }
            }
        }
    }

    fn take_interrupt(&self) -> Res<()> {
        let isr = self.r32(reg::INTERRUPT_STATUS)?;
        if isr == 0 {
            self.stats
                .spurious_interrupts
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.w32(reg::INTERRUPT_ACK, isr)?;
        if isr & INT_CONFIG != 0 {
            // `virtio_config_changed`, through UML's back-end request channel.
            self.stats.config_changes.fetch_add(1, Ordering::Relaxed);
            let ch = self.state.lock().unwrap().backend_req.clone();
            if let Some(ch) = ch {
                vu::send_request(ch.as_fd(), vu::backend_req::CONFIG_CHANGE_MSG)
                    .map_err(|e| format!("config change notice: {e}"))?;
            }
        }
        if isr & INT_VRING == 0 {
            return Ok(());
        }
        // `vring_interrupt` for every queue: signal those whose used ring moved.
        let mut calls = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            for q in st.queues.iter_mut().filter(|q| q.enabled) {
                let Some(idx) = self.ram.read_u16(q.used + 2) else {
                    continue;
                };
                if idx != q.last_used {
                    q.last_used = idx;
                    if let Some(c) = &q.call {
                        calls.push(c.clone());
                    }
                }
            }
        }
        for c in calls {
            match nix::unistd::write(c.as_fd(), &1u64.to_ne_bytes()) {
                Ok(_) | Err(Errno::EAGAIN) => {
                    self.stats.calls.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(format!("call fd: {e}")),
            }
        }
        Ok(())
    }
}

/// The kick eventfds UML gave, watched by the serving thread's epoll (tag = queue index).
struct Kicks<'a> {
    epoll: &'a Epoll,
    fds: Vec<Option<OwnedFd>>,
}

impl Kicks<'_> {
    fn set(&mut self, idx: u32, fd: Option<OwnedFd>) -> Res<()> {
        let i = idx as usize;
        if self.fds.len() <= i {
            self.fds.resize_with(i + 1, || None);
        }
        if let Some(old) = self.fds[i].take() {
            let _ = self.epoll.delete(&old);
        }
        if let Some(fd) = &fd {
            self.epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, idx as u64))
                .map_err(|e| format!("epoll: {e}"))?;
        }
        self.fds[i] = fd;
        Ok(())
    }

    /// Reads the eventfd counter; true if there was a kick.
    fn drain(&mut self, idx: u32) -> bool {
        let Some(Some(fd)) = self.fds.get(idx as usize) else {
            return false;
        };
        let mut b = [0u8; 8];
        matches!(nix::unistd::read(fd, &mut b), Ok(8))
    }
}

/// Accepts UML's connection on `listener` (polling, so a stop is noticed), then serves it.
pub fn accept_and_serve(link: Arc<DeviceLink>, listener: UnixListener) {
    if let Err(e) = listener.set_nonblocking(true) {
        return link.error(format!("listener: {e}"));
    }
    let sock = loop {
        if link.stop.load(Ordering::Acquire) {
            return;
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return link.error(format!("accept: {e}")),
        }
    };
    drop(listener);
    if let Err(e) = sock.set_nonblocking(false) {
        return link.error(format!("socket: {e}"));
    }
    link.serve(sock);
}
