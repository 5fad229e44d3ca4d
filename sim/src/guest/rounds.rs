//! `rounds`: a zone that is started, stopped and started again, as `hvisor zone start` and
//! `hvisor zone shutdown` do, while a test adds and removes it at the broker.
//!
//! Round N begins once the file `zone<Z>-go<N>` exists in `--rounds-dir` (the run ends when
//! `zone<Z>-end` does). Like a freshly booted driver, it resets the device (Status 0) and
//! initialises it from scratch; it checks that the sector written by the last round that
//! passed still holds its pattern, writes round N's pattern to another sector and reads it
//! back. It leaves the
//! device running, as a zone shut down without a driver reset would, and writes
//! `zone<Z>-done<N>`: `ok`, or `error: WHY`. A failed round is reported and the next one may
//! still pass; the run fails if any did.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use virtio_drivers::Hal;

use super::rawblk::{self, RawBlk};
use super::{GuestDev, Rng};
use crate::report::DeviceReport;
use crate::transport::SimTransport;

const SECTOR: usize = 512;

pub fn run<H: Hal>(g: &mut GuestDev<'_>, rep: &mut DeviceReport) -> Result<()> {
    let dir = g
        .opts
        .rounds_dir
        .clone()
        .context("rounds needs --rounds-dir")?;
    let zone = g.zone();
    let (mut passed, mut failed) = (0u64, 0u64);
    let mut last_ok = None;
    for n in 1.. {
        let Some(()) = wait_go(&dir, zone, n) else {
            break;
        };
        let outcome = round::<H>(g, n, last_ok);
        let text = match &outcome {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e:#}"),
        };
        if outcome.is_ok() {
            passed += 1;
            last_ok = Some(n);
        } else {
            failed += 1;
            println!("hvisor-sim: zone {zone} round {n}: {text}");
        }
        write_marker(&dir.join(format!("zone{zone}-done{n}")), &text)?;
    }
    rep.check(
        "rounds",
        failed == 0,
        format!("{passed} round(s) passed, {failed} failed"),
    );
    Ok(())
}

/// Waits for round `n`'s go file; None once the end file exists. The run's `--timeout`
/// bounds the wait.
fn wait_go(dir: &Path, zone: u32, n: u64) -> Option<()> {
    let go = dir.join(format!("zone{zone}-go{n}"));
    let end = dir.join(format!("zone{zone}-end"));
    loop {
        if go.exists() {
            return Some(());
        }
        if end.exists() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Round `n`'s pattern.
fn pattern(zone: u32, n: u64) -> Vec<u8> {
    let mut buf = vec![0u8; SECTOR];
    Rng::new(u64::from(zone) << 32 | n).fill(&mut buf);
    buf
}

fn round<H: Hal>(g: &mut GuestDev<'_>, n: u64, last_ok: Option<u64>) -> Result<()> {
    let t = SimTransport::new(g.vcpu, g.spec.addr, g.spec.len)?;
    let mut blk = RawBlk::<H>::init(t, rawblk::WANTED).context("initialisation")?;
    let sectors = blk.config.capacity;
    if sectors < 2 {
        bail!("a disk of {sectors} sector(s)");
    }
    let sector_of = |n: u64| n % sectors;
    let zone = g.zone();
    if let Some(last) = last_ok {
        let mut old = vec![0u8; SECTOR];
        let st = blk.request(&mut g.irq, rawblk::req::IN, sector_of(last), &[], &mut old)?;
        if st != rawblk::status::OK || old != pattern(zone, last) {
            bail!(
                "round {last}'s sector reads back wrong (status {})",
                rawblk::status::name(st)
            );
        }
    }
    let data = pattern(zone, n);
    let st = blk.request(&mut g.irq, rawblk::req::OUT, sector_of(n), &data, &mut [])?;
    if st != rawblk::status::OK {
        bail!("write: {}", rawblk::status::name(st));
    }
    let mut back = vec![0u8; SECTOR];
    let st = blk.request(&mut g.irq, rawblk::req::IN, sector_of(n), &[], &mut back)?;
    if st != rawblk::status::OK || back != data {
        bail!(
            "read-back: status {}, data equal: {}",
            rawblk::status::name(st),
            back == data
        );
    }
    Ok(())
}

/// Written whole (a rename), so a reader never sees half of it.
fn write_marker(path: &PathBuf, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
