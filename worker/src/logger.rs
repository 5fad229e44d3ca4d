//! A `log` backend that sends each record to the broker as `WorkerMsg::Log`.
//!
//! The worker has no syslog socket and no files; the broker tags the records with the zone and
//! device and logs them under a budget. A record that cannot be sent (the socket is full or
//! gone) is dropped and counted, so logging never blocks the event loop; the count goes out
//! with the next record that can be sent. Nothing is written to stderr: that would get around
//! the broker's budget.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::{Level, LevelFilter, Log, Metadata, Record};
use protocol::{Channel, WorkerMsg};

/// Longer messages are cut, so a record always fits in one datagram.
const MAX_MESSAGE: usize = 4096;

pub(crate) struct SocketLogger {
    chan: Arc<Channel>,
    /// Records dropped since the last one sent.
    dropped: AtomicU64,
}

/// Exit code of a worker that panicked (as Rust's own for a panic in `main`).
const EXIT_PANIC: i32 = 101;

/// Installs the logger for the rest of the process, and a panic hook that reports through it.
/// Levels travel as `log::Level as u8` (1 = error ... 5 = trace).
///
/// A panic on any thread then ends the whole worker, which the broker sees and reports: a
/// device thread that died alone would leave its requests unanswered. Exiting here also spares
/// a build with `panic = "abort"` its `abort()`, whose signal to itself the sandbox refuses.
pub fn install(chan: Arc<Channel>, level: LevelFilter) {
    if log::set_boxed_logger(Box::new(SocketLogger::new(chan))).is_ok() {
        log::set_max_level(level);
        std::panic::set_hook(Box::new(|info| {
            log::error!("{info}");
            std::process::exit(EXIT_PANIC);
        }));
    }
}

impl SocketLogger {
    pub(crate) fn new(chan: Arc<Channel>) -> Self {
        SocketLogger {
            chan,
            dropped: AtomicU64::new(0),
        }
    }

    /// Sends one record without waiting; false if it could not be sent.
    fn send(&self, level: Level, mut message: String) -> bool {
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let msg = WorkerMsg::Log {
            level: level as u8,
            message,
        };
        self.chan.send(&msg, &[], true).is_ok()
    }
}

impl Log for SocketLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note =
                format!("{dropped} log record(s) dropped: the socket to the broker was full");
            if !self.send(Level::Warn, note) {
                self.dropped.fetch_add(dropped + 1, Ordering::Relaxed);
                return;
            }
        }
        if !self.send(record.level(), record.args().to_string()) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full socket drops records (nothing goes anywhere else) and counts them; the count is
    /// reported with the first record sent once there is room again.
    #[test]
    fn a_full_socket_drops_and_counts_records() {
        let (ours, broker) = Channel::pair().unwrap();
        let logger = SocketLogger::new(Arc::new(ours));
        log::set_max_level(LevelFilter::Info);
        let record = |text: &str| {
            logger.log(
                &Record::builder()
                    .level(Level::Info)
                    .args(format_args!("{text}"))
                    .build(),
            )
        };
        let mut sent = 0;
        while logger.dropped.load(Ordering::Relaxed) == 0 {
            record("filler");
            sent += 1;
            assert!(sent < 1_000_000, "the socket never filled");
        }
        for _ in 0..9 {
            record("lost");
        }
        let mut received = 0;
        while let Ok(Some((msg, _))) = broker.try_recv::<WorkerMsg>() {
            assert!(matches!(msg, WorkerMsg::Log { ref message, .. } if message == "filler"));
            received += 1;
        }
        assert_eq!(received, sent - 1);
        record("after");
        let got: Vec<String> = std::iter::from_fn(|| broker.try_recv::<WorkerMsg>().ok()?)
            .map(|(m, _)| match m {
                WorkerMsg::Log { message, .. } => message,
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                "10 log record(s) dropped: the socket to the broker was full",
                "after"
            ]
        );
    }
}
