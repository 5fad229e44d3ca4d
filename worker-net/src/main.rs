//! hvisor-worker-net: the sandboxed virtio-net backend of one device, started by hvisor-broker
//! with its socket at fd 3. The broker opens the tap and keeps its control (header size,
//! offloads); this process only moves frames between the tap and the guest's rings.

mod net;

use std::process::ExitCode;

use protocol::DeviceKind;

fn main() -> ExitCode {
    worker::run(DeviceKind::Net, |setup, fds| {
        Ok(Box::new(net::Net::new(setup, fds)?))
    })
}

#[cfg(test)]
mod tests;
