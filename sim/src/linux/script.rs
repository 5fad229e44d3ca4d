//! The guest's `/init`: a busybox shell script per workload. It reports to the simulator with
//! lines on the console that start with `HVSIM ` (parsed by [`parse`]):
//!
//! - `HVSIM init <uptime>`: `/init` started (seconds since the kernel booted)
//! - `HVSIM check <name> pass|fail [detail]`
//! - `HVSIM disk <dev> <sectors> <ro>`: what the driver found
//! - `HVSIM file <dev> <path> <bytes> <sha256>`: a file written on `<dev>`'s file system
//! - `HVSIM raw <dev> <bytes> <sha256>`: bytes written at offset 0 of the raw disk
//! - `HVSIM rate <dev> <write|read> <bytes> <seconds>`
//! - `HVSIM done`: the workload finished; the guest powers off next

use serde::Serialize;

/// What the guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestJob {
    /// Boot, load the drivers of every device, list what was found, power off.
    Boot,
    /// On the first disk and any after the second: its ext4 file system if the host made
    /// one, otherwise ext2 made by the guest; files (one of 8 MiB), sync, umount, remount and
    /// verify. On the second (if any): a raw `dd` round trip of up to 64 MiB, then 8 MiB
    /// after it written, discarded and read back as zeros.
    Blk,
    /// eth0 against the host end of the tap (see `super::net`).
    Net,
    /// A shell on hvc0, driven from the host through the broker's pty (see `super::console`).
    Console,
    /// Disk throughput from inside Linux (see `super::bench`).
    Bench,
}

/// Bytes of the raw round trip on the second disk (less if the disk is smaller).
pub const RAW_BYTES: u64 = 64 << 20;

const PREAMBLE: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
/bin/busybox --install -s /bin
export PATH=/bin
echo "HVSIM init $(cut -d' ' -f1 /proc/uptime)"
check() {
    name=$1; shift
    out=$("$@" 2>&1); rc=$?
    if [ $rc -eq 0 ]; then
        echo "HVSIM check $name pass"
    else
        echo "HVSIM check $name fail (status $rc) $(echo "$out" | tr '\n' ' ' | head -c 300)"
    fi
    return $rc
}
now() { cut -d' ' -f1 /proc/uptime; }
secs() { echo "$2 $1" | awk '{ printf "%.2f", $1 - $2 }'; }
for m in $(cat /modules.order); do
    check "insmod-$(basename $m .ko)" insmod /lib/modules/$m
done
waitdev() {
    i=0
    while [ ! -b /dev/$1 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    [ -b /dev/$1 ]
}
"#;

const BLK_FS: &str = r#"
# A disk that holds an ext4 file system (made on the host) is used as it is: journal,
# extents and metadata checksums. Any other disk gets an ext2 file system made here.
fs_test() {
    d=$1
    mkdir -p /mnt/$d
    if mount -t ext4 -o ro /dev/$d /mnt/$d 2>/dev/null; then
        umount /mnt/$d
        fs=ext4
    else
        check "$d-mke2fs" mke2fs -F /dev/$d || return
        fs=ext2
    fi
    check "$d-mount-$fs" mount -t $fs /dev/$d /mnt/$d || return
    [ $fs = ext4 ] && check "$d-journal" sh -c "ls /proc/fs/jbd2 | grep -q '^$d-'"
    mkdir -p /mnt/$d/dir/sub
    echo "hello from a Linux guest" > /mnt/$d/hello.txt
    dd if=/dev/urandom of=/mnt/$d/small.bin bs=1024 count=1 2>/dev/null
    dd if=/dev/urandom of=/mnt/$d/dir/medium.bin bs=4096 count=25 2>/dev/null
    dd if=/dev/urandom of=/mnt/$d/dir/sub/large.bin bs=65536 count=48 2>/dev/null
    dd if=/dev/urandom of=/mnt/$d/dir/big.bin bs=1048576 count=8 2>/dev/null
    head -c 777 /dev/urandom > /mnt/$d/dir/sub/odd.bin
    files="hello.txt small.bin dir/medium.bin dir/sub/large.bin dir/big.bin dir/sub/odd.bin"
    for f in $files; do
        echo "HVSIM file $d /$f $(stat -c %s /mnt/$d/$f) $(sha256sum /mnt/$d/$f | cut -d' ' -f1)"
    done
    (cd /mnt/$d && sha256sum $files > /tmp/$d.sums)
    check "$d-sync" sync
    check "$d-umount" umount /mnt/$d
    echo 3 > /proc/sys/vm/drop_caches
    check "$d-remount" mount -t $fs -o ro /dev/$d /mnt/$d || return
    check "$d-reread" sh -c "cd /mnt/$d && sha256sum -c /tmp/$d.sums"
    check "$d-final-umount" umount /mnt/$d
}

raw_test() {
    d=$1
    sectors=$(cat /sys/block/$d/size)
    mib=$((sectors / 2048))
    [ $mib -gt 64 ] && mib=64
    bytes=$((mib * 1048576))
    dd if=/dev/urandom of=/tmp/raw bs=1048576 count=$mib 2>/dev/null
    sum=$(sha256sum /tmp/raw | cut -d' ' -f1)
    t0=$(now)
    check "$d-raw-write" dd if=/tmp/raw of=/dev/$d bs=1048576 oflag=direct conv=fsync
    t1=$(now)
    echo "HVSIM rate $d write $bytes $(secs $t0 $t1)"
    rm /tmp/raw
    echo 3 > /proc/sys/vm/drop_caches
    # Four passes: /proc/uptime counts in 10 ms steps.
    t0=$(now)
    for pass in 1 2 3 4; do
        check "$d-raw-read-$pass" dd if=/dev/$d of=/dev/null bs=1048576 count=$mib iflag=direct
    done
    t1=$(now)
    echo "HVSIM rate $d read $((4 * bytes)) $(secs $t0 $t1)"
    back=$(dd if=/dev/$d bs=1048576 count=$mib iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    echo "HVSIM raw $d $bytes $sum"
    check "$d-raw-readback" [ "$sum" = "$back" ]
    # Many requests in flight at once: 16 readers of their own MiB each, at the same time;
    # together they must read exactly what one reader does.
    i=0
    while [ $i -lt 16 ]; do
        dd if=/dev/$d bs=65536 count=16 skip=$((i * 16)) iflag=direct 2>/dev/null > /tmp/part$i &
        i=$((i + 1))
    done
    wait
    par=$(i=0; while [ $i -lt 16 ]; do cat /tmp/part$i; i=$((i + 1)); done | sha256sum | cut -d' ' -f1)
    one=$(dd if=/dev/$d bs=1048576 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    check "$d-parallel-reads" [ "$par" = "$one" ]
    rm -f /tmp/part*
    # DISCARD: 8 MiB of random data after the round trip, discarded, must read back as zeros.
    if [ $sectors -ge $(( (mib + 8) * 2048 )) ]; then
        dd if=/dev/urandom of=/dev/$d bs=1048576 seek=$mib count=8 oflag=direct conv=fsync 2>/dev/null
        check "$d-discard-offered" [ "$(cat /sys/block/$d/queue/discard_max_bytes)" -gt 0 ]
        check "$d-discard" blkdiscard -o $bytes -l 8388608 /dev/$d
        nz=$(dd if=/dev/$d bs=1048576 skip=$mib count=8 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)
        check "$d-discard-reads-zeros" [ "$nz" -eq 0 ]
    fi
}
"#;

const FINISH: &str = r#"
echo "HVSIM done"
sync
poweroff -f
"#;

/// The `/init` for `job` with `disks` (blk device names in probe order: vda, vdb, ...).
pub fn init_script(job: GuestJob, disks: &[String]) -> String {
    let mut s = String::from(PREAMBLE);
    for d in disks {
        s.push_str(&format!(
            "check {d}-present waitdev {d}\n\
             [ -b /dev/{d} ] && echo \"HVSIM disk {d} $(cat /sys/block/{d}/size) $(cat /sys/block/{d}/ro)\"\n"
        ));
    }
    match job {
        GuestJob::Boot => {
            s.push_str("echo \"HVSIM check boot pass $(uname -r)\"\n");
        }
        GuestJob::Blk => {
            s.push_str(BLK_FS);
            match disks {
                [] => s.push_str("echo \"HVSIM check blk-disks fail no blk device\"\n"),
                [fs] => s.push_str(&format!("fs_test {fs}\n")),
                [fs, raw, more @ ..] => {
                    s.push_str(&format!("fs_test {fs}\nraw_test {raw}\n"));
                    for d in more {
                        s.push_str(&format!("fs_test {d}\n"));
                    }
                }
            }
        }
        GuestJob::Net => s.push_str(&super::net::script()),
        GuestJob::Console => s.push_str(&super::console::script()),
        GuestJob::Bench => s.push_str(&super::bench::script(disks)),
    }
    s.push_str(FINISH);
    s
}

/// One `HVSIM` line.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Init {
        uptime_s: f64,
    },
    Check {
        name: String,
        pass: bool,
        detail: String,
    },
    Disk {
        dev: String,
        sectors: u64,
        ro: bool,
    },
    File(FileSum),
    Raw(RawSum),
    Rate(Rate),
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileSum {
    pub dev: String,
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawSum {
    pub dev: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub dev: String,
    pub op: String,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
}

/// Parses a console line; None for anything that is not an `HVSIM` line.
pub fn parse(line: &str) -> Option<Event> {
    let rest = line.trim().strip_prefix("HVSIM ")?;
    let mut w = rest.split_whitespace();
    let kind = w.next()?;
    let num = |s: Option<&str>| s.and_then(|v| v.parse::<u64>().ok());
    Some(match kind {
        "init" => Event::Init {
            uptime_s: w.next()?.parse().ok()?,
        },
        "check" => {
            let name = w.next()?.to_string();
            let pass = match w.next()? {
                "pass" => true,
                "fail" => false,
                _ => return None,
            };
            Event::Check {
                name,
                pass,
                detail: w.collect::<Vec<_>>().join(" "),
            }
        }
        "disk" => Event::Disk {
            dev: w.next()?.into(),
            sectors: num(w.next())?,
            ro: w.next()? == "1",
        },
        "file" => Event::File(FileSum {
            dev: w.next()?.into(),
            path: w.next()?.into(),
            bytes: num(w.next())?,
            sha256: w.next()?.into(),
        }),
        "raw" => Event::Raw(RawSum {
            dev: w.next()?.into(),
            bytes: num(w.next())?,
            sha256: w.next()?.into(),
        }),
        "rate" => {
            let dev = w.next()?.to_string();
            let op = w.next()?.to_string();
            let bytes = num(w.next())?;
            let seconds: f64 = w.next()?.parse().ok()?;
            Event::Rate(Rate {
                dev,
                op,
                bytes,
                seconds,
                mb_per_s: if seconds > 0.0 {
                    bytes as f64 / 1e6 / seconds
                } else {
                    0.0
                },
            })
        }
        "done" => Event::Done,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        assert_eq!(
            parse("HVSIM init 1.23"),
            Some(Event::Init { uptime_s: 1.23 })
        );
        assert_eq!(
            parse("HVSIM check vda-mount fail mount: no such device"),
            Some(Event::Check {
                name: "vda-mount".into(),
                pass: false,
                detail: "mount: no such device".into()
            })
        );
        assert_eq!(
            parse("HVSIM file vda /dir/a.bin 1024 abcd"),
            Some(Event::File(FileSum {
                dev: "vda".into(),
                path: "/dir/a.bin".into(),
                bytes: 1024,
                sha256: "abcd".into()
            }))
        );
        let Some(Event::Rate(r)) = parse("HVSIM rate vdb write 67108864 2.00") else {
            panic!()
        };
        assert!((r.mb_per_s - 33.554432).abs() < 1e-6);
        assert_eq!(parse("HVSIM done"), Some(Event::Done));
        assert_eq!(parse("random kernel line"), None);
        assert_eq!(parse("HVSIM check x maybe"), None);
    }

    #[test]
    fn scripts_name_the_disks() {
        let s = init_script(GuestJob::Blk, &["vda".into(), "vdb".into(), "vdc".into()]);
        assert!(s.contains("fs_test vda\nraw_test vdb\nfs_test vdc\n"));
        assert!(s.contains("waitdev vda"));
        assert!(s.ends_with("poweroff -f\n"));
        let s = init_script(GuestJob::Boot, &[]);
        assert!(!s.contains("fs_test"));
    }
}
