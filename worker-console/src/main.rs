//! hvisor-worker-console: the sandboxed virtio-console backend of one device, started by hvisor-broker
//! with its socket at fd 3.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("hvisor-worker-console: not written yet");
    ExitCode::FAILURE
}
