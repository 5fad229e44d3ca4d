//! A hostile guest's virtio-blk queue: descriptor chains of any shape over guest memory
//! built from the input, parsed as the blk worker parses them and served on a small image.
#![no_main]

use std::os::fd::OwnedFd;

use hvisor_fuzz::{guest_memory, queue, take_u8};
use libfuzzer_sys::fuzz_target;
use nix::sys::memfd::{memfd_create, MFdFlags};
use protocol::DeviceSetup;
use vm_memory::{Bytes, GuestMemoryBackend};
use worker::testing::Records;

#[allow(dead_code)]
#[path = "../../worker-blk/src/blk.rs"]
mod blk;
#[allow(dead_code)]
#[path = "../../worker-blk/src/pool.rs"]
mod pool;
#[allow(dead_code)]
#[path = "../../worker-blk/src/request.rs"]
mod request;

use request::{ParseError, Request};

const IMAGE: u64 = 64 * 1024;

fn disk(readonly: bool) -> blk::Disk {
    let fd: OwnedFd = memfd_create("fuzz-image", MFdFlags::MFD_CLOEXEC).expect("memfd");
    nix::unistd::ftruncate(&fd, IMAGE as i64).expect("image size");
    let setup = DeviceSetup::Blk {
        readonly,
        size: IMAGE,
        serial: "fuzz".into(),
    };
    blk::Disk::new(&setup, vec![fd]).expect("disk")
}

/// What the parser promised: the status byte and every data byte lie in guest memory.
fn check(req: &Request, mem: &vm_memory::GuestMemoryMmap) {
    assert!(mem.check_address(req.status).is_some());
    for data in [&req.readable, &req.writable] {
        let slices = data
            .slices(mem)
            .expect("parsed buffers inside guest memory");
        let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
        assert_eq!(total, data.len);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let size_bits = take_u8(&mut data);
    let flags = take_u8(&mut data);
    let mem = guest_memory(data);
    let mut q = queue(size_bits, flags & 1 != 0, &mem);
    let disk = disk(flags & 2 != 0);
    let mut records = Records::new(1);
    let mut tq = records.tracked(0, &mut q);
    // Each round takes a chain or stops: a ring of nonsense ends, bounded by its size.
    for _ in 0..2 * usize::from(tq.size()) {
        let Some(chain) = tq.pop(&mem) else { break };
        let head = chain.head_index();
        let len = match Request::parse(chain, &mem) {
            Ok(req) => {
                check(&req, &mem);
                disk.read_cached(&req, &mem)
                    .unwrap_or_else(|| disk.serve(&req, &mem))
            }
            Err(ParseError::NoStatus) => 0,
            Err(ParseError::Malformed { status, .. }) => {
                mem.write_obj(1u8, status).expect("a checked status byte");
                1
            }
        };
        tq.publish(&mem, head, len);
    }
});
