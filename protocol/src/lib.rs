//! Wire formats shared by the broker, the workers and the simulator.
//!
//! - [`bridge`]: the hvisor `struct virtio_bridge` page, byte for byte, with the ring rules.
//! - [`channel`]: one message per `SOCK_SEQPACKET` datagram, with fds over `SCM_RIGHTS`.
//! - [`inflight`]: the layout of the in-flight record a dead worker leaves its successor.
//! - [`msg`]: the typed broker<->worker messages and their bincode codec.
//! - [`sim`]: the handshake of the simulated `/dev/hvisor` (sim-protocol v1).

pub mod bridge;
pub mod channel;
pub mod inflight;
pub mod msg;
pub mod sim;

pub use channel::{Channel, ChannelError};
pub use msg::{
    BrokerMsg, Bucket, DeviceKind, DeviceSetup, Flow, Limit, MemoryRegion, QueueConfig, WorkerMsg,
};
