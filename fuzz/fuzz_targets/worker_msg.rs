//! Worker -> broker: any datagram a worker may send (bytes, and how many fds came with
//! it), decoded as the broker decodes it, then what the broker does with its text.
#![no_main]

use broker::budget::{escape, LogBudget, MAX_TEXT};
use hvisor_fuzz::take_u8;
use libfuzzer_sys::fuzz_target;
use protocol::channel::{decode_checked, MAX_FDS};
use protocol::WorkerMsg;

/// Escaped worker text: no control or bidi character left, and bounded.
fn check(text: &str) {
    let out = escape(text);
    assert!(!out.chars().any(|c| c.is_control()), "{out:?}");
    assert!(!out.contains(['\u{202e}', '\u{2066}']), "{out:?}");
    // Each character becomes at most `\u{10ffff}`.
    assert!(out.chars().count() <= MAX_TEXT * 10 + 3, "{}", out.len());
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let fds = usize::from(take_u8(&mut data)) % (MAX_FDS + 2);
    let Ok(msg) = decode_checked::<WorkerMsg>(data, fds) else {
        return;
    };
    let mut budget = LogBudget::worker();
    match msg {
        WorkerMsg::Ready { .. } => {}
        WorkerMsg::Log { message, .. } => check(&message),
        WorkerMsg::Failed { reason } => check(&reason),
        WorkerMsg::Violation { nr, .. } => {
            let label = broker::lifecycle::syscall_label(nr);
            budget.log(log::Level::Error, "fuzz", format_args!("{label}"));
        }
        WorkerMsg::Confined { root, notes } => {
            check(&root);
            notes.iter().for_each(|n| check(n));
        }
    }
});
