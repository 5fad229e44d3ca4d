//! The `linux-net` guest's part of `/init`: Linux's virtio-net driver against the host end of
//! the tap, in the test's network namespace.
//!
//! The guest is [`GUEST`] on eth0; the host end of the tap must be [`HOST`] (/24), with TCP
//! listeners on the ports below, each taking one connection:
//!
//! | port | the host | the guest |
//! |---|---|---|
//! | [`PORT_UP`] | reads [`CHECK_BYTES`] and closes | sends a file of random bytes, reports its SHA-256 |
//! | [`PORT_DOWN`] | sends [`CHECK_BYTES`] bytes and closes | saves them, reports their size and SHA-256 |
//! | [`PORT_BENCH_UP`] | reads [`BENCH_BYTES`] and closes | sends zeros, timed |
//! | [`PORT_BENCH_DOWN`] | sends [`BENCH_BYTES`] bytes and closes | throws them away, timed |
//! | [`PORT6_UP`] (on [`HOST6`]) | reads [`CHECK_BYTES`] and closes | sends zeros over IPv6 |
//! | [`PORT6_DOWN`] (on [`HOST6`]) | sends [`CHECK_BYTES`] bytes and closes | throws them away |
//!
//! Reported lines (besides `check` pass/fail lines):
//! - `HVSIM check net-features pass BITS`: `/sys/class/net/eth0/device/features`, one
//!   character per feature bit, bit 0 first
//! - `HVSIM check net-up-sha256 pass SUM` and `HVSIM check net-down-sha256 pass BYTES SUM`
//! - `HVSIM check net-stats-N pass RX_BYTES RX_PACKETS TX_BYTES TX_PACKETS`: eth0's counters
//!   before the timed send (0), between it and the timed receive (1) and after (2); then
//!   the same around the IPv6 transfers (3, 4, 5). Linux counts a TSO/GSO packet once, so
//!   a mean packet above the MTU in the direction of a transfer means segmentation offloads
//!   were used.
//! - `HVSIM rate eth0 send|receive BYTES SECONDS`

/// The guest's address on eth0 (RFC 5737 documentation range, inside the namespace only).
pub const GUEST: &str = "192.0.2.2";
/// The host end of the tap.
pub const HOST: &str = "192.0.2.1";
/// The same over IPv6 (RFC 3849 documentation prefix).
pub const GUEST6: &str = "2001:db8::2";
pub const HOST6: &str = "2001:db8::1";
pub const PORT_UP: u16 = 7101;
pub const PORT_DOWN: u16 = 7102;
pub const PORT_BENCH_UP: u16 = 7103;
pub const PORT_BENCH_DOWN: u16 = 7104;
/// IPv6: the host reads [`CHECK_BYTES`] on the first and sends as many on the second.
pub const PORT6_UP: u16 = 7105;
pub const PORT6_DOWN: u16 = 7106;
/// Bytes of each checked transfer.
pub const CHECK_BYTES: u64 = 16 << 20;
/// Bytes of each timed transfer.
pub const BENCH_BYTES: u64 = 256 << 20;

// The guest's end of each connection is `nc -e dd ... bs=65536`: dd reads and writes the
// socket 64 KiB at a time. (nc itself copies 1 KiB per read and write: each write would leave
// as one packet, so TSO would be used only by chance, and each UML system call is costly.)
const SCRIPT: &str = r#"
stats() {
    s=/sys/class/net/eth0/statistics
    echo "HVSIM check $1 pass $(cat $s/rx_bytes) $(cat $s/rx_packets) $(cat $s/tx_bytes) $(cat $s/tx_packets)"
}
net_test() {
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    check net-present [ -e /sys/class/net/eth0 ] || return
    echo "HVSIM check net-features pass $(cat /sys/class/net/eth0/device/features)"
    check net-link-up ip link set eth0 up || return
    check net-address ip addr add @GUEST@/24 dev eth0 || return
    # The test gives the tap its host side once the broker has made it: wait for it.
    i=0
    while ! ping -c 1 -W 1 @HOST@ >/dev/null 2>&1 && [ $i -lt 30 ]; do i=$((i + 1)); done
    check net-ping ping -c 3 @HOST@ || return
    dd if=/dev/urandom of=/tmp/up bs=1048576 count=@CHECK_MIB@ 2>/dev/null
    echo "HVSIM check net-up-sha256 pass $(sha256sum /tmp/up | cut -d' ' -f1)"
    check net-up nc @HOST@ @PORT_UP@ -e dd if=/tmp/up bs=65536
    rm -f /tmp/up
    check net-down nc @HOST@ @PORT_DOWN@ -e dd of=/tmp/down bs=65536
    echo "HVSIM check net-down-sha256 pass $(stat -c %s /tmp/down) $(sha256sum /tmp/down | cut -d' ' -f1)"
    rm -f /tmp/down
    stats net-stats-0
    t0=$(now)
    check net-bench-send nc @HOST@ @PORT_BENCH_UP@ -e dd if=/dev/zero bs=65536 count=@BENCH_BLOCKS@
    t1=$(now)
    echo "HVSIM rate eth0 send @BENCH_BYTES@ $(secs $t0 $t1)"
    stats net-stats-1
    t0=$(now)
    check net-bench-receive nc @HOST@ @PORT_BENCH_DOWN@ -e dd of=/dev/null bs=65536
    t1=$(now)
    echo "HVSIM rate eth0 receive @BENCH_BYTES@ $(secs $t0 $t1)"
    stats net-stats-2
    # IPv6 (TSO6): one untimed transfer each way.
    check net6-address ip -6 addr add @GUEST6@/64 dev eth0 || return
    i=0
    while ! ping -c 1 -W 1 @HOST6@ >/dev/null 2>&1 && [ $i -lt 10 ]; do i=$((i + 1)); done
    check net6-ping ping -c 3 @HOST6@ || return
    stats net-stats-3
    check net6-send nc @HOST6@ @PORT6_UP@ -e dd if=/dev/zero bs=65536 count=@CHECK_BLOCKS@
    stats net-stats-4
    check net6-receive nc @HOST6@ @PORT6_DOWN@ -e dd of=/dev/null bs=65536
    stats net-stats-5
    check net-link-down ip link set eth0 down
}
net_test
"#;

/// The shell lines of the `linux-net` workload.
pub fn script() -> String {
    SCRIPT
        .replace("@GUEST@", GUEST)
        .replace("@HOST@", HOST)
        .replace("@PORT_UP@", &PORT_UP.to_string())
        .replace("@PORT_DOWN@", &PORT_DOWN.to_string())
        .replace("@PORT_BENCH_UP@", &PORT_BENCH_UP.to_string())
        .replace("@PORT_BENCH_DOWN@", &PORT_BENCH_DOWN.to_string())
        .replace("@GUEST6@", GUEST6)
        .replace("@HOST6@", HOST6)
        .replace("@PORT6_UP@", &PORT6_UP.to_string())
        .replace("@PORT6_DOWN@", &PORT6_DOWN.to_string())
        .replace("@CHECK_BLOCKS@", &(CHECK_BYTES / 65536).to_string())
        .replace("@CHECK_MIB@", &(CHECK_BYTES >> 20).to_string())
        .replace("@BENCH_BLOCKS@", &(BENCH_BYTES / 65536).to_string())
        .replace("@BENCH_BYTES@", &BENCH_BYTES.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_placeholder_is_filled() {
        let s = super::script();
        assert!(!s.contains('@'), "{s}");
        assert!(s.contains("ping -c 3 192.0.2.1"));
        assert!(s.contains("count=4096"));
    }
}
