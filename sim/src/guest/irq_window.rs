//! `irq-window`: completions that land while the guest handles the device's interrupt, the
//! window in which hvisor drops an injection (hvisor-abi 2.7). Each round leaves a used buffer
//! whose injection was dropped; the round passes only if the backend injects again after the
//! guest's EOI. A backend that trusts every injection to arrive stalls in the first round.

use std::time::Duration;

use anyhow::Result;
use virtio_drivers::Hal;

use super::rawblk::{RawBlk, WANTED};
use super::GuestDev;
use crate::report::DeviceReport;
use crate::transport::SimTransport;

const ROUNDS: u32 = 20;
/// How long a round waits for the interrupt after the EOI: far beyond any re-injection delay
/// of the broker, short enough that a stalled device fails the run quickly.
const STALL: Duration = Duration::from_secs(5);

pub fn run<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    let t = SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?;
    let mut blk = RawBlk::<H>::init(t, WANTED)?;
    let mut signalled = 0;
    for round in 0..ROUNDS {
        if !blk.completion_inside_handler(&mut g.irq, STALL)? {
            break;
        }
        signalled = round + 1;
    }
    rep.check(
        "interrupt_after_a_dropped_injection",
        signalled == ROUNDS,
        format!(
            "{signalled} of {ROUNDS} rounds got an interrupt after the EOI{}",
            if signalled < ROUNDS {
                format!("; round {} stalled for {STALL:?}", signalled + 1)
            } else {
                String::new()
            }
        ),
    );
    Ok(())
}
