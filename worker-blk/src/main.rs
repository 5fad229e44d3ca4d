//! hvisor-worker-blk: the sandboxed virtio-blk backend of one device, started by hvisor-broker
//! with its socket at fd 3. The broker opens the image; this process only reads and writes it
//! on behalf of the guest.

mod blk;
mod pool;
mod request;

use std::process::ExitCode;

use protocol::DeviceKind;

fn main() -> ExitCode {
    worker::run(DeviceKind::Blk, |setup, fds| {
        Ok(Box::new(blk::Blk::new(setup, fds)?))
    })
}

#[cfg(test)]
mod tests;
