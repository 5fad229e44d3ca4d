//! `hostile`: register accesses no well-behaved driver makes. Every one must be answered (a
//! vCPU that is never answered hangs in EL2 for ever) and none may break the device: a short
//! blk-verify run follows.

use anyhow::{Context, Result};
use virtio_drivers::Hal;

use super::GuestDev;
use crate::report::DeviceReport;
use crate::transport::reg;

/// ACKNOWLEDGE | DRIVER.
const ACK_DRIVER: u64 = 3;

struct Probe<'g, 'a> {
    g: &'g GuestDev<'a>,
    base: u64,
}

impl Probe<'_, '_> {
    fn rd(&self, off: u64, size: u64) -> Result<u64> {
        self.g
            .vcpu
            .read(self.base + off, size)
            .with_context(|| format!("{size}-byte read of offset 0x{off:03x}"))
    }

    fn wr(&self, off: u64, size: u64, v: u64) -> Result<()> {
        self.g
            .vcpu
            .write(self.base + off, size, v)
            .with_context(|| format!("{size}-byte write of 0x{v:x} to offset 0x{off:03x}"))
    }
}

pub fn run<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    probes(g, rep)?;
    let failed = rep.checks.iter().filter(|c| !c.pass).count();
    println!(
        "hvisor-sim: zone {} blk@0x{:x}: {} hostile probes answered, {failed} unexpected",
        g.zone(),
        g.spec.addr,
        rep.checks.len()
    );
    super::verify::run::<H>(g, rep, false)
}

fn probes(g: &GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    let p = Probe {
        g,
        base: g.spec.addr,
    };
    let hex = |v: u64| format!("0x{v:x}");
    p.wr(reg::STATUS, 4, 0)?;
    p.wr(reg::STATUS, 4, ACK_DRIVER)?;
    p.wr(reg::QUEUE_SEL, 4, 0)?;
    let max0 = p.rd(reg::QUEUE_NUM_MAX, 4)?;
    rep.check("queue0_num_max", max0 > 0, hex(max0));

    // QueueSel beyond the device's queues: no queue, no state to touch.
    for sel in [1u64, 7, 0xffff_ffff] {
        p.wr(reg::QUEUE_SEL, 4, sel)?;
        let max = p.rd(reg::QUEUE_NUM_MAX, 4)?;
        rep.check(
            &format!("queue_sel_{sel:#x}_num_max_zero"),
            max == 0,
            hex(max),
        );
        p.wr(reg::QUEUE_NUM, 4, 16)?;
        p.wr(reg::QUEUE_DESC_LOW, 4, 0xdead_0000)?;
        p.wr(reg::QUEUE_DESC_HIGH, 4, 0xffff)?;
        p.wr(reg::QUEUE_DRIVER_LOW, 4, 0xdead_1000)?;
        p.wr(reg::QUEUE_DEVICE_LOW, 4, 0xdead_2000)?;
        p.wr(reg::QUEUE_READY, 4, 1)?;
        let ready = p.rd(reg::QUEUE_READY, 4)?;
        rep.check(
            &format!("queue_sel_{sel:#x}_ready_ignored"),
            ready == 0,
            format!("QueueReady reads {ready}"),
        );
    }
    p.wr(reg::QUEUE_SEL, 4, 0)?;
    let ready0 = p.rd(reg::QUEUE_READY, 4)?;
    let max0_again = p.rd(reg::QUEUE_NUM_MAX, 4)?;
    rep.check(
        "queue0_untouched_by_bad_sel",
        ready0 == 0 && max0_again == max0,
        format!("ready {ready0}, num_max {max0_again}"),
    );

    // QueueNum above QueueNumMax, and not a power of two: the device must not take it.
    let mut seen = Vec::new();
    for num in [max0 * 2, max0 + 1, 3] {
        p.wr(reg::QUEUE_NUM, 4, num)?;
        p.wr(reg::QUEUE_READY, 4, 1)?;
        let ready = p.rd(reg::QUEUE_READY, 4)?;
        seen.push(format!("num {num}: ready {ready}"));
        p.wr(reg::QUEUE_READY, 4, 0)?;
    }
    rep.check("bad_queue_num_answered", true, seen.join(", "));

    // Read-only registers keep their value whatever is written.
    p.wr(reg::DEVICE_FEATURES_SEL, 4, 0)?;
    for (name, off) in [
        ("magic", reg::MAGIC_VALUE),
        ("version", reg::VERSION),
        ("device_id", reg::DEVICE_ID),
        ("vendor_id", reg::VENDOR_ID),
        ("device_features", reg::DEVICE_FEATURES),
        ("interrupt_status", reg::INTERRUPT_STATUS),
        ("queue_num_max", reg::QUEUE_NUM_MAX),
    ] {
        let before = p.rd(off, 4)?;
        p.wr(off, 4, !before & 0xffff_ffff)?;
        let after = p.rd(off, 4)?;
        rep.check(
            &format!("readonly_{name}_unchanged"),
            before == after,
            format!("{} -> {}", hex(before), hex(after)),
        );
    }

    // Registers are 32-bit: other widths read 0 and writes are dropped.
    for off in [reg::MAGIC_VALUE, reg::STATUS] {
        for size in [1u64, 2, 8] {
            let v = p.rd(off, size)?;
            rep.check(
                &format!("read_{size}b_at_{off:#05x}_is_zero"),
                v == 0,
                hex(v),
            );
            p.wr(off, size, 0xff)?;
        }
    }
    let st = p.rd(reg::STATUS, 4)?;
    rep.check(
        "odd_size_writes_ignored",
        st == ACK_DRIVER,
        format!("Status reads {}", hex(st)),
    );

    // Offsets no register lives at (0x0a8 and 0x0c8 lie between the v2 registers, 0x0f0
    // just before ConfigGeneration, 0x1fc past virtio_blk_config): read 0, writes dropped.
    for off in [0x0a8u64, 0x0c8, 0x0f0, 0x1fc] {
        let v = p.rd(off, 4)?;
        p.wr(off, 4, 0x1234_5678)?;
        let again = p.rd(off, 4)?;
        rep.check(
            &format!("unknown_{off:#05x}_reads_zero"),
            v == 0 && again == 0,
            format!("{} then {}", hex(v), hex(again)),
        );
    }
    let gen1 = p.rd(reg::CONFIG_GENERATION, 4)?;
    p.wr(reg::CONFIG_GENERATION, 4, gen1 + 7)?;
    let gen2 = p.rd(reg::CONFIG_GENERATION, 4)?;
    rep.check(
        "config_generation_stable",
        gen1 == gen2,
        format!("{gen1} then {gen2}"),
    );

    // Config space at natural widths: zero-extended slices of the 64-bit capacity.
    let cap = p.rd(reg::CONFIG, 4)? | p.rd(reg::CONFIG + 4, 4)? << 32;
    for size in [1u64, 2, 4, 8] {
        let v = p.rd(reg::CONFIG, size)?;
        let want = if size == 8 {
            cap
        } else {
            cap & ((1 << (size * 8)) - 1)
        };
        rep.check(
            &format!("config_read_{size}b"),
            v == want,
            format!("{} (capacity {})", hex(v), hex(cap)),
        );
    }
    let b1 = p.rd(reg::CONFIG + 1, 1)?;
    rep.check("config_read_byte_1", b1 == (cap >> 8) & 0xff, hex(b1));

    // Kicks the device cannot act on: a queue that does not exist, and one before DRIVER_OK.
    p.wr(reg::QUEUE_NOTIFY, 4, 5)?;
    p.wr(reg::QUEUE_NOTIFY, 4, 0)?;
    // A *read* of QueueNotify also has need_interrupt set: the vCPU does not wait, and the
    // broker must not answer it, or the next access on this CPU would return early.
    p.rd(reg::QUEUE_NOTIFY, 4)?;
    let mut bad = 0;
    for _ in 0..64 {
        if p.rd(reg::MAGIC_VALUE, 4)? != reg::MAGIC as u64 {
            bad += 1;
        }
    }
    rep.check(
        "alive_after_bad_notify",
        bad == 0,
        format!("{bad} of 64 MagicValue reads were wrong"),
    );
    p.wr(reg::STATUS, 4, 0)?;
    let st = p.rd(reg::STATUS, 4)?;
    rep.check(
        "reset_after_probes",
        st == 0,
        format!("Status reads {}", hex(st)),
    );
    Ok(())
}
