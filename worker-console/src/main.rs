//! hvisor-worker-console: the sandboxed virtio-console backend of one device, started by
//! hvisor-broker with its socket at fd 3. The broker opens the pty pair and relays it through
//! two pipes; this process only moves bytes between the guest's buffers and those pipes.

mod console;

use std::process::ExitCode;

use protocol::DeviceKind;

fn main() -> ExitCode {
    worker::run(DeviceKind::Console, |setup, fds| {
        Ok(Box::new(console::Console::new(setup, fds)?))
    })
}

#[cfg(test)]
mod tests;
