//! Log records go to syslog (tag `hvisor-broker`, facility daemon) where a syslog socket
//! exists, and to stderr otherwise. `syslog::init` is never used: with no daemon it "succeeds"
//! by sending every record to a UDP port nobody listens on.

use std::io::Write;
use std::path::Path;

use log::{LevelFilter, Log, Metadata, Record};
use syslog::{BasicLogger, Facility, Formatter3164};

pub const TAG: &str = "hvisor-broker";

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }
    fn log(&self, record: &Record) {
        // One write per record so lines from several processes sharing stderr do not interleave.
        let line = format!(
            "{TAG}[{}]: {:<5} {}\n",
            std::process::id(),
            record.level(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
    fn flush(&self) {}
}

/// Where records go, for the startup line.
pub enum Sink {
    Syslog,
    Stderr,
}

/// Installs the logger. `syslog_socket` overrides the usual `/dev/log` search.
pub fn init(level: LevelFilter, syslog_socket: Option<&Path>) -> Sink {
    let formatter = Formatter3164 {
        facility: Facility::LOG_DAEMON,
        hostname: None,
        process: TAG.into(),
        pid: std::process::id(),
    };
    let syslog = match syslog_socket {
        Some(p) => syslog::unix_custom(formatter, p),
        None => syslog::unix(formatter),
    };
    let (logger, sink): (Box<dyn Log>, Sink) = match syslog {
        Ok(l) => (Box::new(BasicLogger::new(l)), Sink::Syslog),
        Err(_) => (Box::new(StderrLogger), Sink::Stderr),
    };
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
    sink
}
