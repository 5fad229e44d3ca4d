//! What one source may cost the broker: log bytes (per worker, and per device for lines a
//! guest causes) and messages (per worker). Each source has its own budget, so one that
//! exceeds it loses its own log lines, or its own worker, and nothing of anyone else's.

use std::fmt::{Arguments, Write};
use std::time::{Duration, Instant};

/// The most characters of worker text one record carries; the rest is cut.
pub const MAX_TEXT: usize = 512;
/// How often a source's suppressed records are reported.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// `text` safe for a log line: control characters (newlines, terminal escapes) and bidi
/// overrides written out as `\n`, `\x1b`, `\u{202e}`, and cut after [`MAX_TEXT`] characters.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT));
    for (n, c) in text.chars().enumerate() {
        if n == MAX_TEXT {
            out.push_str("...");
            break;
        }
        let _ = match c {
            '\n' => out.write_str("\\n"),
            '\r' => out.write_str("\\r"),
            '\t' => out.write_str("\\t"),
            c if c.is_ascii_control() => write!(out, "\\x{:02x}", u32::from(c)),
            c if c.is_control()
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                write!(out, "\\u{{{:x}}}", u32::from(c))
            }
            c => out.write_char(c),
        };
    }
    out
}

/// A token bucket of log bytes: `rate` a second, up to `burst` at once. Records that do not
/// fit are counted, and the count is logged at most once a second.
pub struct LogBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    suppressed_bytes: usize,
    reported: Instant,
}

impl LogBudget {
    /// Everything a worker makes the broker log: its records, failures, violations.
    pub fn worker() -> Self {
        Self::new(16 * 1024, 64 * 1024)
    }

    /// What a guest makes the broker log about its device (driver ready, ...).
    pub fn guest() -> Self {
        Self::new(4 * 1024, 16 * 1024)
    }

    /// Refusals on the control socket, which any local user can cause: about five lines a
    /// second.
    pub fn control() -> Self {
        Self::new(320, 320)
    }

    fn new(rate: u32, burst: u32) -> Self {
        let now = Instant::now();
        LogBudget {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            refilled: now,
            suppressed: 0,
            suppressed_bytes: 0,
            reported: now,
        }
    }

    /// Logs `label: args` at `level` if the budget has room for it; counts it otherwise.
    /// Text from a worker must already be [`escape`]d.
    pub fn log(&mut self, level: log::Level, label: &str, args: Arguments<'_>) {
        if level > log::max_level() {
            return;
        }
        self.report(label);
        let line = format!("{label}: {args}");
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.refilled = now;
        let cost = line.len() as f64;
        if self.tokens >= cost {
            self.tokens -= cost;
            log::log!(level, "{line}");
        } else {
            self.suppressed += 1;
            self.suppressed_bytes += line.len();
        }
    }

    /// Logs how much was suppressed since the last report, at most once a second.
    pub fn report(&mut self, label: &str) {
        if self.reported.elapsed() >= REPORT_EVERY {
            self.flush(label);
        }
    }

    /// Logs how much was suppressed since the last report, now (the source goes away).
    pub fn flush(&mut self, label: &str) {
        if self.suppressed == 0 {
            return;
        }
        log::warn!(
            "{label}: {} log records ({} bytes) suppressed: more than {} bytes a second",
            self.suppressed,
            self.suppressed_bytes,
            self.rate
        );
        self.suppressed = 0;
        self.suppressed_bytes = 0;
        self.reported = Instant::now();
    }
}

/// Messages a worker may send in one second. A worker's own logger sends one message per
/// record, so this bounds its records too; a worker over it is stopped.
pub struct MessageBudget {
    window: Instant,
    count: u32,
}

impl MessageBudget {
    pub const PER_SECOND: u32 = 2000;

    pub fn new() -> Self {
        MessageBudget {
            window: Instant::now(),
            count: 0,
        }
    }

    /// Counts one message; false once more than [`Self::PER_SECOND`] came within a second.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count <= Self::PER_SECOND
    }
}

impl Default for MessageBudget {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_writes_out_controls_and_cuts() {
        assert_eq!(escape("a\nb\r\t\x1b[2J\x07"), "a\\nb\\r\\t\\x1b[2J\\x07");
        assert_eq!(escape("\u{9b}31m \u{202e}x é"), "\\u{9b}31m \\u{202e}x é");
        let long = escape(&"x".repeat(10_000));
        assert_eq!(long.len(), MAX_TEXT + 3);
        assert!(!escape(&"\n".repeat(10_000)).contains('\n'));
    }

    #[test]
    fn log_budget_takes_the_burst_then_the_rate() {
        log::set_max_level(log::LevelFilter::Trace);
        let mut b = LogBudget::new(1, 4000);
        let line = "x".repeat(990);
        for _ in 0..4 {
            b.log(log::Level::Error, "l", format_args!("{line}"));
        }
        assert_eq!(b.suppressed, 0);
        b.log(log::Level::Error, "l", format_args!("{line}"));
        assert_eq!(b.suppressed, 1);
        assert_eq!(b.suppressed_bytes, 993);
    }

    #[test]
    fn message_budget_refuses_past_the_limit() {
        let mut m = MessageBudget::new();
        for _ in 0..MessageBudget::PER_SECOND {
            assert!(m.take());
        }
        assert!(!m.take());
    }
}
