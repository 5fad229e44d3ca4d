//! Interrupts that hvisor drops: an injection while the guest handles the same interrupt (taken,
//! ACKed, no EOI yet) is lost on the real hypervisor (hvisor-abi 2.7), and the simulator drops
//! it too. The broker must inject again until the guest acknowledges.

use std::time::Duration;

use hvisor_tests::*;
use serde_json::json;

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3c00;

/// Runs `irq-window` against a broker started with `broker_args`; returns the report.
fn irq_window(broker_args: &[&str]) -> serde_json::Value {
    let s = Scratch::new();
    let img = s.image("disk.img", 1 << 20);
    let cfg = s.write_json(
        "zone.json",
        &json!({ "zones": [zone_json(1, RAM, RAM_SIZE, &[BlkSpec { img: &img, addr: ADDR, irq: 78, readonly: false }])] }),
    );
    let mut stack = Stack::start(&s, SimRun::new(&cfg, "irq-window"), broker_args).unwrap();
    let report = stack.wait_report(Duration::from_secs(120)).unwrap();
    let dropped = report["hypervisor"]["dropped_interrupts"].as_u64().unwrap();
    assert!(
        dropped > 0,
        "no injection met an active interrupt: {report:#}"
    );
    report
}

#[test]
fn a_used_buffer_whose_injection_was_dropped_is_signalled_again() {
    let report = irq_window(&[]);
    assert!(
        failed_checks(&report).is_empty(),
        "{:#?}",
        failed_checks(&report)
    );
}

#[test]
fn the_retry_policy_signals_it_again_too() {
    let report = irq_window(&["--irq-inject", "retry"]);
    assert!(
        failed_checks(&report).is_empty(),
        "{:#?}",
        failed_checks(&report)
    );
}

/// The broker as it was: it injects only when its line is clear and clears the line only on
/// the guest's ACK, so one dropped injection silences the device for good.
#[test]
fn a_broker_that_injects_once_stalls_on_the_first_dropped_injection() {
    let report = irq_window(&["--irq-inject", "once"]);
    let failed = failed_checks(&report);
    assert!(
        failed.len() == 1 && failed[0].contains("0 of 20 rounds"),
        "{failed:#?}"
    );
}
