//! A hostile guest's virtio-console queues and bytes from the host, through the console
//! worker's device code, a socket standing in for the pty.
#![no_main]

use hvisor_fuzz::{drive, host_pair};
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::SockType;
use protocol::DeviceSetup;

#[allow(dead_code)]
#[path = "../../worker-console/src/console.rs"]
mod console;

fuzz_target!(|data: &[u8]| {
    let (pty, host) = host_pair(SockType::Stream);
    let mut dev = console::Console::new(&DeviceSetup::Console, vec![pty]).expect("console");
    drive(&mut dev, &host, data);
});
