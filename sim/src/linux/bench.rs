//! The `linux-bench` guest: sequential disk throughput from inside Linux, and the same
//! operations on the host, on the same image file, in the same run.
//!
//! The guest writes up to [`BENCH_MIB`] MiB to its first disk in 1 MiB blocks with `dd
//! oflag=direct conv=fsync` (the final FLUSH is the worker's `fdatasync`), then reads them
//! back [`READ_PASSES`] times with `iflag=direct` (the guest clock ticks in 10 ms steps, so
//! the transfers are large), then once more with [`PARALLEL_READERS`] readers at once,
//! which keeps many requests in flight. After UML exits, [`host_rates`] does the same on the image:
//! once with `O_DIRECT` (no page cache at all) and once through the page cache with a final
//! `fdatasync`, which is what the worker itself does for the guest.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use super::script::Rate;

/// Bytes moved per pass, in MiB (less when the disk is smaller).
pub const BENCH_MIB: u64 = 256;
/// Read passes over the written range.
pub const READ_PASSES: u64 = 4;
/// Readers at once in the last phase, each over its own part of the written range.
pub const PARALLEL_READERS: u64 = 16;
const BLOCK: usize = 1 << 20;

/// The shell lines of the `linux-bench` workload.
pub fn script(disks: &[String]) -> String {
    let Some(d) = disks.first() else {
        return "echo \"HVSIM check bench-disk fail no blk device\"\n".into();
    };
    format!(
        r#"
bench() {{
    d=$1
    mib=$(( $(cat /sys/block/$d/size) / 2048 ))
    [ $mib -gt {BENCH_MIB} ] && mib={BENCH_MIB}
    bytes=$((mib * 1048576))
    t0=$(now)
    check "$d-bench-write" dd if=/dev/zero of=/dev/$d bs=1048576 count=$mib oflag=direct conv=fsync
    t1=$(now)
    echo "HVSIM rate $d write $bytes $(secs $t0 $t1)"
    t0=$(now)
    for pass in $(seq {READ_PASSES}); do
        check "$d-bench-read-$pass" dd if=/dev/$d of=/dev/null bs=1048576 count=$mib iflag=direct
    done
    t1=$(now)
    echo "HVSIM rate $d read $(({READ_PASSES} * bytes)) $(secs $t0 $t1)"
    # {PARALLEL_READERS} readers of their own part at once: many requests in flight.
    part=$((mib / {PARALLEL_READERS}))
    t0=$(now)
    i=0
    while [ $i -lt {PARALLEL_READERS} ]; do
        dd if=/dev/$d of=/dev/null bs=1048576 count=$part skip=$((i * part)) iflag=direct 2>/dev/null &
        i=$((i + 1))
    done
    wait
    t1=$(now)
    echo "HVSIM rate $d parallel-read $(({PARALLEL_READERS} * part * 1048576)) $(secs $t0 $t1)"
}}
bench {d}
"#
    )
}

/// The bytes each pass moves on a disk of `disk_bytes`, as the guest script computes it.
pub fn pass_bytes(disk_bytes: u64) -> u64 {
    (disk_bytes / BLOCK as u64).min(BENCH_MIB) * BLOCK as u64
}

fn rate(dev: &str, op: &str, bytes: u64, t: Instant) -> Rate {
    let seconds = t.elapsed().as_secs_f64();
    println!(
        "hvisor-sim: linux-bench {dev} {op}: {bytes} bytes in {seconds:.3} s ({:.0} MB/s)",
        bytes as f64 / 1e6 / seconds.max(1e-9)
    );
    Rate {
        dev: dev.into(),
        op: op.into(),
        bytes,
        seconds,
        mb_per_s: if seconds > 0.0 {
            bytes as f64 / 1e6 / seconds
        } else {
            0.0
        },
    }
}

/// The guest's operations on the host, on `img`: `dev` is `host-direct` (`O_DIRECT`, falls
/// back to nothing when the file system refuses it) and `host-cached` (page cache, then
/// `fdatasync` after the writes; reads from a warm cache).
pub fn host_rates(img: &Path) -> Result<Vec<Rate>> {
    let size = std::fs::metadata(img)
        .with_context(|| format!("reading {}", img.display()))?
        .len();
    let bytes = pass_bytes(size);
    let mut out = Vec::new();
    if bytes == 0 {
        return Ok(out);
    }
    // An aligned 1 MiB window of a bigger buffer: O_DIRECT wants aligned memory.
    let mut backing = vec![0u8; 2 * BLOCK];
    let off = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[off..off + BLOCK];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[0];
    }
    for (dev, flags) in [("host-direct", libc::O_DIRECT), ("host-cached", 0)] {
        let open = || -> std::io::Result<File> {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(img)
        };
        let f = match open() {
            Ok(f) => f,
            Err(e) if flags != 0 => {
                eprintln!(
                    "hvisor-sim: bench: {} refuses O_DIRECT ({e})",
                    img.display()
                );
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", img.display())),
        };
        let t = Instant::now();
        let mut pos = 0;
        while pos < bytes {
            f.write_all_at(buf, pos)
                .with_context(|| format!("{dev}: writing {}", img.display()))?;
            pos += BLOCK as u64;
        }
        f.sync_data()?;
        out.push(rate(dev, "write", bytes, t));
        let t = Instant::now();
        for _ in 0..READ_PASSES {
            let mut pos = 0;
            while pos < bytes {
                f.read_exact_at(buf, pos)
                    .with_context(|| format!("{dev}: reading {}", img.display()))?;
                pos += BLOCK as u64;
            }
        }
        out.push(rate(dev, "read", READ_PASSES * bytes, t));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_benches_the_first_disk() {
        let s = script(&["vda".into(), "vdb".into()]);
        assert!(s.contains("bench vda\n"));
        assert!(s.contains("oflag=direct conv=fsync"));
        assert!(s.contains("HVSIM rate $d parallel-read"));
        assert!(script(&[]).contains("fail"));
        assert_eq!(pass_bytes(80 << 20), 80 << 20);
        assert_eq!(pass_bytes(1 << 30), BENCH_MIB << 20);
    }

    #[test]
    fn host_rates_cover_both_modes_or_the_cached_one() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.img");
        File::create(&img).unwrap().set_len(4 << 20).unwrap();
        let r = host_rates(&img).unwrap();
        assert!(r.iter().any(|r| r.dev == "host-cached" && r.op == "read"));
        assert!(r.iter().all(|r| r.bytes > 0 && r.mb_per_s > 0.0), "{r:?}");
    }
}
