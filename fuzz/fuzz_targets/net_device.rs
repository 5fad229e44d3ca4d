//! A hostile guest's virtio-net queues (any chains, any header, any negotiated features) and
//! frames from the host, through the net worker's device code, a socket standing in for the tap.
#![no_main]

use hvisor_fuzz::{drive, host_pair};
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::SockType;
use protocol::DeviceSetup;

#[allow(dead_code)]
#[path = "../../worker-net/src/net.rs"]
mod net;

fuzz_target!(|data: &[u8]| {
    let (tap, host) = host_pair(SockType::SeqPacket);
    let mut dev = net::Net::new(&DeviceSetup::Net { mtu: 1500 }, vec![tap]).expect("net");
    drive(&mut dev, &host, data);
});
