//! TCP listeners for the Linux guests' transfers: each takes one connection, within a
//! timeout, and reads or writes a given number of bytes.

#![allow(dead_code)] // each user takes what it needs

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Accepts one connection within `timeout` (the listener is polled, so a guest that never
/// comes leaves no thread blocked forever).
pub fn accept_one(l: &TcpListener, timeout: Duration) -> std::io::Result<TcpStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                s.set_write_timeout(Some(Duration::from_secs(60)))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "nobody connected",
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The most read or written at once.
pub const PIECE: usize = 1 << 20;

/// What one listener saw: the bytes read (kept if asked for) and its clock: from the first
/// byte read to the last, or from accept to the end of its writes.
pub struct Served {
    pub bytes: usize,
    pub data: Vec<u8>,
    pub seconds: f64,
}

/// One connection: reads exactly `read` bytes (keeping them if `keep`), or writes `write`
/// `repeat` times; then closes.
pub fn serve_one(
    l: TcpListener,
    read: usize,
    keep: bool,
    write: Vec<u8>,
    repeat: usize,
    timeout: Duration,
) -> JoinHandle<std::io::Result<Served>> {
    serve_paced(l, read, keep, write, repeat, timeout, |_| ())
}

/// [`serve_one`], calling `pace` with the bytes moved so far before each read or each write
/// of up to [`PIECE`] bytes: `pace` may hold the transfer back until something happened.
pub fn serve_paced(
    l: TcpListener,
    read: usize,
    keep: bool,
    write: Vec<u8>,
    repeat: usize,
    timeout: Duration,
    pace: impl Fn(usize) + Send + 'static,
) -> JoinHandle<std::io::Result<Served>> {
    std::thread::spawn(move || {
        let mut s = accept_one(&l, timeout)?;
        let mut t = Instant::now();
        let mut data = Vec::new();
        let mut got = 0;
        if read > 0 {
            let mut buf = vec![0u8; PIECE];
            while got < read {
                pace(got);
                let n = s.read(&mut buf[..(read - got).min(PIECE)])?;
                if n == 0 {
                    break;
                }
                if got == 0 {
                    t = Instant::now();
                }
                if keep {
                    data.extend_from_slice(&buf[..n]);
                }
                got += n;
            }
        } else {
            let mut sent = 0;
            for _ in 0..repeat {
                for piece in write.chunks(PIECE) {
                    pace(sent);
                    s.write_all(piece)?;
                    sent += piece.len();
                }
            }
        }
        drop(s);
        Ok(Served {
            bytes: got,
            data,
            seconds: t.elapsed().as_secs_f64(),
        })
    })
}

pub fn listen(addr: &str, port: u16) -> TcpListener {
    TcpListener::bind((addr, port)).unwrap_or_else(|e| panic!("binding {addr}:{port}: {e}"))
}
