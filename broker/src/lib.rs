//! hvisor-broker: the privileged half of the virtio backend.
//!
//! It owns `/dev/hvisor` (or the simulator socket), answers every trapped register access from
//! a per-device virtio-mmio register file, and hands the guest-facing work to one sandboxed
//! worker process per device.

pub mod audit;
pub mod budget;
pub mod cgroup;
pub mod control;
pub mod devices;
pub mod driver;
pub mod generate;
pub mod host;
pub mod irq;
pub mod lifecycle;
pub mod logging;
pub mod notify;
pub mod outbox;
pub mod poll;
pub mod relay;
pub mod rundir;
pub mod serve;
pub mod startup;
pub mod status;
pub mod supervisor;
pub mod transport;
pub mod zones;
