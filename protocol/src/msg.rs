//! The broker<->worker messages and their codec.
//!
//! bincode is pinned to 1.3.3 (3.x is an empty placeholder and the crate is unmaintained), so
//! it stays behind [`encode`] and [`decode`]: swapping the codec touches only this file.
//! Messages avoid the serde features bincode cannot carry (flatten, untagged enums, `Value`).

use bincode::Options;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::channel::ChannelError;

/// Bumped on any incompatible change; the worker refuses a broker of another version.
pub const PROTOCOL_VERSION: u32 = 4;
/// The fd number at which a worker finds its socket to the broker.
pub const WORKER_SOCKET_FD: i32 = 3;
/// The largest encoded message either side accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_limit(MAX_MESSAGE as u64)
        .with_fixint_encoding()
        .reject_trailing_bytes()
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ChannelError> {
    options()
        .serialize(msg)
        .map_err(|e| ChannelError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ChannelError> {
    options()
        .deserialize(bytes)
        .map_err(|e| ChannelError::Decode(e.to_string()))
}

/// How many fds a message must carry; the receiver refuses any other count.
pub trait FdCount {
    fn fd_count(&self) -> usize;
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Blk,
    Net,
    Console,
}

impl DeviceKind {
    /// The name used in the JSON config, logs and binary names (`hvisor-worker-<name>`).
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Blk => "blk",
            DeviceKind::Net => "net",
            DeviceKind::Console => "console",
        }
    }

    /// The virtio device ID.
    pub fn virtio_id(self) -> u32 {
        match self {
            DeviceKind::Net => 1,
            DeviceKind::Blk => 2,
            DeviceKind::Console => 3,
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One zone RAM region: guest-physical `guest_addr` is at `file_offset` of the memory fd.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// A queue as the driver configured it, sent at DRIVER_OK.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// What a device kind needs besides memory and queues. Each variant's fds follow the queue
/// eventfds in [`BrokerMsg::Hello`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum DeviceSetup {
    /// fds: the image (opened read-only when `readonly`).
    Blk {
        readonly: bool,
        /// Image size in bytes (the broker asks the kernel; the worker needs no ioctl).
        size: u64,
        /// The GET_ID answer, at most 20 bytes.
        serial: String,
    },
    /// fds: the tap, opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and non-blocking. The broker
    /// keeps its control (header size, offloads); the worker only reads and writes frames.
    Net {
        /// Largest IP packet the guest may send (the MTU in the config space).
        mtu: u16,
    },
    /// fds: the receive pipe's read end and the transmit pipe's write end; the broker relays
    /// them to and from the pty.
    Console,
}

impl DeviceSetup {
    pub fn kind(&self) -> DeviceKind {
        match self {
            DeviceSetup::Blk { .. } => DeviceKind::Blk,
            DeviceSetup::Net { .. } => DeviceKind::Net,
            DeviceSetup::Console => DeviceKind::Console,
        }
    }

    fn fd_count(&self) -> usize {
        match self {
            DeviceSetup::Blk { .. } | DeviceSetup::Net { .. } => 1,
            DeviceSetup::Console => 2,
        }
    }
}

/// Broker -> worker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum BrokerMsg {
    /// The first message. fds, in order: the guest-memory fd, the in-flight record (a memfd of
    /// [`crate::inflight::bytes`] bytes, sealed), one kick eventfd per queue (the
    /// broker writes it on QueueNotify), one call eventfd per queue (the worker writes it when the
    /// guest should be interrupted), then the [`DeviceSetup`] fds.
    Hello {
        version: u32,
        zone: u32,
        /// For log records: `zone1 blk@0xa003c00`.
        label: String,
        regions: Vec<MemoryRegion>,
        num_queues: u16,
        setup: DeviceSetup,
        sandbox: SandboxSpec,
    },
    /// The driver set DRIVER_OK; or, with the same `epoch`, the replay of that for a worker
    /// that replaces a dead one (it resumes from the in-flight record of that epoch).
    Activate {
        features: u64,
        queues: Vec<QueueConfig>,
        /// Counts the driver's activations of this device.
        epoch: u64,
    },
    /// The driver wrote 0 to Status: forget the queues.
    Reset,
    /// The driver took this queue out of use: stop reading its rings.
    StopQueue { index: u16 },
    /// A driver write to the device config space.
    ConfigWrite { offset: u32, data: Vec<u8> },
    /// The rate limit of one of the device's flows from now on (sent after the Hello when
    /// one is set, and whenever it changes).
    RateLimit { flow: Flow, limit: Limit },
    /// Exit cleanly.
    Shutdown,
}

impl FdCount for BrokerMsg {
    fn fd_count(&self) -> usize {
        match self {
            BrokerMsg::Hello {
                num_queues, setup, ..
            } => 2 + 2 * *num_queues as usize + setup.fd_count(),
            _ => 0,
        }
    }
}

/// What a rate limit applies to.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flow {
    /// blk: every request, reads and writes alike.
    Io,
    /// net: frames to the guest.
    Rx,
    /// net: frames from the guest.
    Tx,
}

impl Flow {
    /// The flows of a device kind.
    pub fn of(kind: DeviceKind) -> &'static [Flow] {
        match kind {
            DeviceKind::Blk => &[Flow::Io],
            DeviceKind::Net => &[Flow::Rx, Flow::Tx],
            DeviceKind::Console => &[],
        }
    }

    /// The flow called `name` (see [`Flow::name`]).
    pub fn from_name(name: &str) -> Option<Flow> {
        [Flow::Io, Flow::Rx, Flow::Tx]
            .into_iter()
            .find(|f| f.name() == name)
    }

    /// The name in the JSON config and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Flow::Io => "io",
            Flow::Rx => "rx",
            Flow::Tx => "tx",
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up while idle.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub rate: u64,
    pub burst: u64,
}

impl Bucket {
    /// The largest rate or burst accepted: far beyond any device, small enough that the
    /// bucket's arithmetic cannot overflow.
    pub const MAX: u64 = 1 << 48;

    /// `burst` defaults to a tenth of a second's worth (at least one token).
    pub fn new(rate: u64, burst: Option<u64>) -> Result<Bucket, String> {
        if rate == 0 || rate > Self::MAX {
            return Err(format!("a rate of {rate} is outside 1..={}", Self::MAX));
        }
        let burst = burst.unwrap_or((rate / 10).max(1));
        if burst == 0 || burst > Self::MAX {
            return Err(format!("a burst of {burst} is outside 1..={}", Self::MAX));
        }
        Ok(Bucket { rate, burst })
    }
}

/// A flow's limit: bytes and operations (requests, frames) a second; `None` is unlimited.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limit {
    pub bytes: Option<Bucket>,
    pub ops: Option<Bucket>,
}

impl Limit {
    pub fn is_off(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }
}

/// `20971520 bytes/s (burst 1048576), 1000 ops/s (burst 100)`, or `off`.
impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts = [(self.bytes, "bytes"), (self.ops, "ops")];
        let mut parts = parts.iter().filter_map(|(b, unit)| b.map(|b| (b, unit)));
        let Some((b, unit)) = parts.next() else {
            return f.write_str("off");
        };
        write!(f, "{} {unit}/s (burst {})", b.rate, b.burst)?;
        parts.try_for_each(|(b, unit)| write!(f, ", {} {unit}/s (burst {})", b.rate, b.burst))
    }
}

/// Worker -> broker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WorkerMsg {
    /// Sent once the sandbox is in place, before any guest data is read.
    Ready { version: u32, pid: u32 },
    /// A log record; the broker logs it tagged with the worker's zone and device.
    Log { level: u8, message: String },
    /// The device cannot go on; the worker exits after sending this.
    Failed { reason: String },
    /// Sent by the SIGSYS handler, which cannot allocate: fixed size on the wire (see
    /// [`encode_violation`]). `nr` is the refused system call, `arch` the `AUDIT_ARCH_*` value.
    Violation { nr: i64, arch: u32 },
    /// How the sandbox was entered, for the broker's log and audits.
    Confined { root: String, notes: Vec<String> },
}

/// The bincode bytes of `WorkerMsg::Violation`, built without allocating (for a signal
/// handler): the variant index, then the fields, little-endian and fixed-width.
pub fn encode_violation(nr: i64, arch: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&3u32.to_le_bytes());
    b[4..12].copy_from_slice(&nr.to_le_bytes());
    b[12..16].copy_from_slice(&arch.to_le_bytes());
    b
}

/// What the broker set up around a worker, and what the worker must finish inside.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The worker was started in new pid, mount, net, ipc and uts namespaces.
    pub namespaces: bool,
    /// ... and a new user namespace whose root is `uid`/`gid` outside.
    pub user_namespace: bool,
    /// The unprivileged ids the worker runs as (seen from the broker).
    pub uid: u32,
    pub gid: u32,
    /// What a seccomp violation does.
    pub seccomp: SeccompAction,
    /// RLIMIT_FSIZE: the largest file offset the worker may write to (its image's size for a
    /// writable disk, else 0), so it cannot grow any file it holds.
    pub file_size_limit: u64,
}

/// `--seccomp=kill|trap|log`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompAction {
    /// Report the call, then die by SIGSYS.
    #[default]
    Kill,
    /// Report the call, which then fails with ENOSYS; the worker goes on.
    Trap,
    /// Let the call through; the kernel logs it.
    Log,
}

impl FdCount for WorkerMsg {
    fn fd_count(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fd_counts() {
        let hello = BrokerMsg::Hello {
            version: PROTOCOL_VERSION,
            zone: 1,
            label: "zone1 blk@0xa003c00".into(),
            regions: vec![MemoryRegion {
                guest_addr: 0x5000_0000,
                size: 1 << 20,
                file_offset: 0x5000_0000,
            }],
            num_queues: 1,
            setup: DeviceSetup::Blk {
                readonly: false,
                size: 4096,
                serial: "x".into(),
            },
            sandbox: SandboxSpec {
                namespaces: true,
                user_namespace: true,
                uid: 65534,
                gid: 65534,
                seccomp: SeccompAction::Kill,
                file_size_limit: 0,
            },
        };
        assert_eq!(hello.fd_count(), 5);
        let back: BrokerMsg = decode(&encode(&hello).unwrap()).unwrap();
        assert_eq!(back, hello);
        assert_eq!(BrokerMsg::Reset.fd_count(), 0);
    }

    #[test]
    fn violation_encoding_matches_bincode() {
        let v = WorkerMsg::Violation {
            nr: 257,
            arch: 0xc000_003e,
        };
        assert_eq!(encode(&v).unwrap(), encode_violation(257, 0xc000_003e));
        assert_eq!(
            decode::<WorkerMsg>(&encode_violation(-1, 7)).unwrap(),
            WorkerMsg::Violation { nr: -1, arch: 7 }
        );
    }

    #[test]
    fn trailing_bytes_and_forged_lengths_are_rejected() {
        let mut bytes = encode(&WorkerMsg::Ready { version: 1, pid: 2 }).unwrap();
        bytes.push(0);
        assert!(decode::<WorkerMsg>(&bytes).is_err());
        // Log variant (index 1) with a forged 2^60-byte string length
        let mut forged = 1u32.to_le_bytes().to_vec();
        forged.push(3);
        forged.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<WorkerMsg>(&forged).is_err());
    }
}
