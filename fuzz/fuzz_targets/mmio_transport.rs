//! A hostile guest's register accesses (offset, size, value) to a device's virtio-mmio
//! window, mixed with the device side's events; the transport must keep its promises.
#![no_main]

use broker::transport::{DeviceModel, Effect, MmioTransport, CONFIG_OFFSET};
use hvisor_fuzz::{take_le, take_u8};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INTERRUPT_STATUS;

const QUEUE_MAX: [u16; 3] = [256, 128, 1];
const FEATURES: u64 = 1 << 32 | 1 << 29 | 1 << 28 | 1 << 5;

fn model() -> DeviceModel {
    DeviceModel {
        device_id: 2,
        features: FEATURES,
        queue_max: QUEUE_MAX.to_vec(),
        config: (0..24).collect(),
    }
}

/// An offset mostly among the registers, sometimes anywhere.
fn offset(data: &mut &[u8]) -> u64 {
    match take_u8(data) {
        b @ 0..=0xbf => u64::from(b) * 4 % CONFIG_OFFSET,
        0xc0..=0xef => CONFIG_OFFSET + u64::from(take_u8(data)),
        _ => take_le::<8>(data),
    }
}

fn check_effect(effect: &Effect, t: &MmioTransport, config_len: usize) {
    match effect {
        Effect::Activate { features, queues } => {
            assert_eq!(features & !FEATURES, 0);
            assert!(t.is_active());
            for q in queues {
                let max = QUEUE_MAX[usize::from(q.index)];
                assert!(q.size.is_power_of_two() && q.size <= max, "{q:?}");
                assert!(q.desc != 0 && q.desc % 16 == 0, "{q:?}");
                assert!(q.avail != 0 && q.avail % 2 == 0, "{q:?}");
                assert!(q.used != 0 && q.used % 4 == 0, "{q:?}");
            }
            assert_eq!(t.replay(), Some((*features, queues.clone())));
        }
        Effect::Notify(q) => {
            assert!(usize::from(*q) < QUEUE_MAX.len());
            assert!(t.is_active());
        }
        Effect::ConfigWrite { offset, data } => {
            assert!([1, 2, 4, 8].contains(&data.len()));
            assert!(*offset as usize + data.len() <= config_len);
        }
        Effect::StopQueue(q) => assert!(usize::from(*q) < QUEUE_MAX.len()),
        Effect::Reset | Effect::Deassert => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let mut t = MmioTransport::new(model());
    let mut config_len = model().config.len();
    while !data.is_empty() {
        match take_u8(&mut data) % 8 {
            0..=1 => {
                let (off, size) = (offset(&mut data), u64::from(take_u8(&mut data) % 9));
                let v = t.read(off, size);
                if (1..8).contains(&size) {
                    assert!(v < 1 << (8 * size), "read {off:#x}/{size}: {v:#x}");
                }
                if off == u64::from(VIRTIO_MMIO_INTERRUPT_STATUS) {
                    assert_eq!(v & !3, 0);
                }
            }
            2..=4 => {
                let off = offset(&mut data);
                let size = if take_u8(&mut data) & 7 == 0 { 1 } else { 4 };
                let v = take_le::<4>(&mut data);
                if let Some(e) = t.write(off, size, v) {
                    check_effect(&e, &t, config_len);
                }
            }
            5 => {
                t.raise_used();
                t.retry_interrupt();
            }
            6 => {
                config_len = usize::from(take_u8(&mut data) % 40);
                t.set_config(vec![0xa5; config_len]);
            }
            _ => {
                if take_u8(&mut data) & 1 == 0 {
                    t.fail();
                } else {
                    t.revive();
                }
            }
        }
    }
});
