//! A `log` backend that sends each record to the broker as `WorkerMsg::Log`.
//!
//! The worker has no syslog socket and no files; the broker tags the records with the zone and
//! device. A record that cannot be sent (the socket is full or gone) goes to stderr instead, so
//! logging never blocks the event loop.

use std::io::Write;
use std::sync::Arc;

use log::{LevelFilter, Log, Metadata, Record};
use protocol::{Channel, WorkerMsg};

/// Longer messages are cut, so a record always fits in one datagram.
const MAX_MESSAGE: usize = 4096;

struct SocketLogger {
    chan: Arc<Channel>,
    /// For stderr lines; taken before the sandbox, which forbids getpid.
    tag: String,
}

/// Installs the logger for the rest of the process. Levels travel as `log::Level as u8`
/// (1 = error ... 5 = trace).
pub fn install(chan: Arc<Channel>, tag: String, level: LevelFilter) {
    if log::set_boxed_logger(Box::new(SocketLogger { chan, tag })).is_ok() {
        log::set_max_level(level);
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
        let mut message = record.args().to_string();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let msg = WorkerMsg::Log {
            level: record.level() as u8,
            message,
        };
        if self.chan.send(&msg, &[], true).is_err() {
            if let WorkerMsg::Log { message, .. } = msg {
                let _ = writeln!(
                    std::io::stderr(),
                    "{}: {}: {}",
                    self.tag,
                    record.level(),
                    message
                );
            }
        }
    }

    fn flush(&self) {}
}
