//! A device's interrupt as the broker drives it: the InterruptStatus bits the guest reads and
//! acknowledges, and when to inject. hvisor drops an injection that meets the interrupt active
//! in the guest (taken, not yet EOIed; hvisor-abi 2.7), so no injection can be trusted to
//! arrive: while status bits stay unacknowledged, the bridge loop injects again on a timer
//! ([`IrqLine::retry`], with the delays of [`retry_delay`]). See docs/interrupts.md.

use std::time::Duration;

/// When the broker injects the device's interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Inject {
    /// On every used-buffer or config report, and again on a timer while unacknowledged.
    #[default]
    Every,
    /// When the line was clear, and again on a timer while unacknowledged.
    Retry,
    /// When the line was clear, never again until the guest acknowledges (the broker before
    /// it knew of dropped injections; it stalls on hvisor). For comparison only.
    Once,
}

/// InterruptStatus and whether the guest has been told of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IrqLine {
    policy: Inject,
    status: u32,
    /// Injected since the guest last cleared every status bit.
    asserted: bool,
}

impl IrqLine {
    pub fn new(policy: Inject) -> Self {
        IrqLine {
            policy,
            status: 0,
            asserted: false,
        }
    }

    /// InterruptStatus as the guest reads it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Sets `bits` in InterruptStatus; returns whether to inject now.
    pub fn raise(&mut self, bits: u32) -> bool {
        self.status |= bits;
        let inject = self.policy == Inject::Every || !self.asserted;
        self.asserted = true;
        inject
    }

    /// The guest's InterruptACK write. Returns true when it cleared the last status bit of an
    /// injected interrupt: the line drops (LoongArch's hvisor must be told, hvisor-abi 1.6).
    pub fn ack(&mut self, bits: u32) -> bool {
        self.status &= !bits;
        let dropped = self.status == 0 && self.asserted;
        if self.status == 0 {
            self.asserted = false;
        }
        dropped
    }

    /// The retry timer of the last injection expired: whether to inject again. True while
    /// the guest has not acknowledged what it was told, since the injection may have been
    /// dropped; a pending interrupt merges with the new one, so a needless retry costs only
    /// the hypercall.
    pub fn retry(&self) -> bool {
        self.policy != Inject::Once && self.status != 0
    }

    /// Device reset: nothing to tell.
    pub fn clear(&mut self) {
        self.status = 0;
        self.asserted = false;
    }
}

/// The first retry comes this long after an injection by default (`--irq-retry-us`): about
/// when a guest that took the interrupt has acknowledged it and ended its handler, so that a
/// dropped injection costs little. A retry finds nothing to do once the guest acknowledged,
/// and one that meets the interrupt still pending merges with it: short is cheap.
pub const FIRST_RETRY: Duration = Duration::from_micros(50);
/// Retries back off to this: a guest that never acknowledges (it polls, or it stopped) costs
/// at most 50 hypercalls a second per device.
pub const MAX_RETRY: Duration = Duration::from_millis(20);

/// How long after an injection to retry, when `retries` retries came before it and the first
/// comes `first` after the injection.
pub fn retry_delay(first: Duration, retries: u32) -> Duration {
    first
        .saturating_mul(1u32 << retries.min(16))
        .min(MAX_RETRY.max(first))
}

#[cfg(test)]
mod model;

#[cfg(test)]
mod tests {
    use super::*;

    const VRING: u32 = 1;
    const CONFIG: u32 = 2;

    #[test]
    fn once_injects_only_when_the_line_was_clear() {
        let mut l = IrqLine::new(Inject::Once);
        assert!(l.raise(VRING));
        assert!(!l.raise(VRING), "merged");
        assert!(!l.retry(), "never again before the ACK");
        l.ack(VRING);
        assert!(l.raise(CONFIG), "clear again after the ACK");
    }

    #[test]
    fn every_injects_on_each_report_and_retries_until_acknowledged() {
        let mut l = IrqLine::new(Inject::Every);
        assert!(l.raise(VRING));
        assert!(l.raise(VRING));
        assert!(l.retry());
        assert!(l.ack(VRING), "the line drops");
        assert_eq!(l.status(), 0);
        assert!(!l.retry(), "nothing left to tell");
        assert!(!l.ack(VRING), "it was down already");
    }

    #[test]
    fn retry_merges_reports_but_retries_until_acknowledged() {
        let mut l = IrqLine::new(Inject::Retry);
        assert!(l.raise(VRING));
        assert!(!l.raise(CONFIG));
        assert!(!l.ack(VRING), "a partial ACK keeps the line up");
        assert_eq!(l.status(), CONFIG);
        assert!(l.retry(), "a partial ACK leaves the config bit untold");
        l.ack(CONFIG);
        assert!(!l.retry());
        assert!(l.raise(VRING));
        l.clear();
        assert!(!l.retry());
    }

    #[test]
    fn retry_delays_double_up_to_the_cap() {
        let delay = |n| retry_delay(FIRST_RETRY, n);
        assert_eq!(delay(0), FIRST_RETRY);
        assert_eq!(delay(1), FIRST_RETRY * 2);
        assert_eq!(delay(40), MAX_RETRY);
        assert!((0..40).all(|n| delay(n) <= delay(n + 1)));
        let slow = Duration::from_millis(50);
        assert_eq!(
            retry_delay(slow, 3),
            slow,
            "a first delay above the cap is kept"
        );
    }
}
