//! hvisor-worker-net: the sandboxed virtio-net backend of one device, started by hvisor-broker
//! with its socket at fd 3.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("hvisor-worker-net: not written yet");
    ExitCode::FAILURE
}
