//! Broker -> worker: any datagram, decoded as a worker decodes it, then its checks of the
//! Hello and of the queues an Activate names.
#![no_main]

use hvisor_fuzz::{guest_memory, take_u8};
use libfuzzer_sys::fuzz_target;
use protocol::channel::decode_checked;
use protocol::{BrokerMsg, DeviceKind};

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let fds = usize::from(take_u8(&mut data));
    let Ok(msg) = decode_checked::<BrokerMsg>(data, fds) else {
        return;
    };
    match msg {
        BrokerMsg::Activate {
            features, queues, ..
        } => {
            let mem = guest_memory(&[]);
            for q in queues.iter().take(8) {
                let _ = worker::fuzzing::build_queue(q, features & 1 << 29 != 0, &mem);
            }
        }
        hello @ BrokerMsg::Hello { .. } => {
            for kind in [DeviceKind::Blk, DeviceKind::Net, DeviceKind::Console] {
                let _ = worker::fuzzing::check_hello(kind, hello.clone());
            }
        }
        _ => {}
    }
});
