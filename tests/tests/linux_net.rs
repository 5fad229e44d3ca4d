//! Linux's own virtio-net driver (User-Mode Linux, `--guest linux-net`) through the simulator's
//! vhost-user adapter, hvisor-broker and a sandboxed hvisor-worker-net, against the host end
//! of the tap in a network namespace of the test's own: ping, a checked 16 MiB TCP transfer
//! each way, the offloads Linux negotiated (checksums, TSO both ways, mergeable buffers), and
//! a 256 MiB timed transfer each way beside the same transfer over the host's loopback.
//!
//! Needs `user-mode-linux` and `busybox-static` (skipped where `/usr/bin/linux` is absent),
//! `/dev/net/tun` and iproute2.

#[path = "net/peer.rs"]
mod peer;
#[path = "net/tcp.rs"]
mod tcp;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hvisor_tests::*;
use serde_json::{json, Value};

use peer::{skip_reason, Netns};
use tcp::{listen, serve_one};

const KERNEL: &str = "/usr/bin/linux";
const MIB: u64 = 1 << 20;
/// UML's memory, as in `linux.rs`: one identity-mapped region from 1 MiB to 256 MiB.
const RAM: u64 = 0x10_0000;
const RAM_SIZE: u64 = 256 * MIB - RAM;
const TAP: &str = "hvltap0";
// As `sim/src/linux/net.rs` has them (the guest's script).
const HOST: &str = "192.0.2.1";
const HOST6: &str = "2001:db8::1";
const PORT6_UP: u16 = 7105;
const PORT6_DOWN: u16 = 7106;
const PORT_UP: u16 = 7101;
const PORT_DOWN: u16 = 7102;
const PORT_BENCH_UP: u16 = 7103;
const PORT_BENCH_DOWN: u16 = 7104;
const CHECK_BYTES: usize = 16 << 20;
const BENCH_BYTES: usize = 256 << 20;
/// The host writes in pieces of this size.
const CHUNK: usize = 1 << 20;
/// Feature bits (virtio 1.2, 5.1.3).
const FEATURES: [(usize, &str); 8] = [
    (0, "CSUM"),
    (1, "GUEST_CSUM"),
    (5, "MAC"),
    (7, "GUEST_TSO4"),
    (8, "GUEST_TSO6"),
    (11, "HOST_TSO4"),
    (12, "HOST_TSO6"),
    (15, "MRG_RXBUF"),
];

fn zone() -> Value {
    json!({ "zones": [{
        "id": 1,
        "memory_region": [{ "zone0_ipa": format!("{RAM:#x}"), "zonex_ipa": format!("{RAM:#x}"),
                            "size": format!("{RAM_SIZE:#x}") }],
        "devices": [{
            "type": "net", "addr": "0x20000000", "len": "0x200", "irq": 78,
            "tap": TAP, "mac": ["0x02", "0x00", "0x00", "0x00", "0x02", "0x02"], "mtu": 1500,
            "status": "enable"
        }]
    }]})
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn check_detail<'a>(report: &'a Value, name: &str) -> &'a str {
    report["linux"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["detail"].as_str())
        .unwrap_or_else(|| panic!("no {name} check in {report:#}"))
}

fn rate(report: &Value, op: &str) -> f64 {
    report["linux"]["rates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["op"] == op)
        .and_then(|r| r["mb_per_s"].as_f64())
        .unwrap_or_else(|| panic!("no {op} rate in {report:#}"))
}

/// MB/s of `bytes` in `seconds`.
fn mbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds
}

/// The guest's timed transfers, repeated on the host: the same busybox `nc -e dd` commands
/// over the namespace's loopback, to and from the same kind of listener. MB/s sending and
/// receiving, each by the command's clock and by the listener's; the best of three runs.
fn host_baseline() -> [f64; 4] {
    let mut best = [0f64; 4];
    for _ in 0..3 {
        let l = listen("127.0.0.1", 0);
        let port = l.local_addr().unwrap().port();
        let sink = serve_one(
            l,
            BENCH_BYTES,
            false,
            Vec::new(),
            0,
            Duration::from_secs(30),
        );
        let t = Instant::now();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "busybox nc 127.0.0.1 {port} -e busybox dd if=/dev/zero bs=65536 count={} 2>/dev/null",
                BENCH_BYTES / 65536
            ))
            .status()
            .unwrap();
        let send = mbps(BENCH_BYTES, t.elapsed().as_secs_f64());
        assert!(st.success());
        let sunk = sink.join().unwrap().unwrap();
        assert_eq!(sunk.bytes, BENCH_BYTES);

        let l = listen("127.0.0.1", 0);
        let port = l.local_addr().unwrap().port();
        let source = serve_one(
            l,
            0,
            false,
            vec![0u8; CHUNK],
            BENCH_BYTES / CHUNK,
            Duration::from_secs(30),
        );
        let t = Instant::now();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "busybox nc 127.0.0.1 {port} -e busybox dd of=/dev/null bs=65536 2>/dev/null"
            ))
            .status()
            .unwrap();
        let receive = mbps(BENCH_BYTES, t.elapsed().as_secs_f64());
        assert!(st.success());
        let sourced = source.join().unwrap().unwrap();
        let run = [
            send,
            mbps(BENCH_BYTES, sunk.seconds),
            receive,
            mbps(BENCH_BYTES, sourced.seconds),
        ];
        for (b, r) in best.iter_mut().zip(run) {
            *b = b.max(r);
        }
    }
    best
}

#[test]
fn linux_virtio_net_negotiates_offloads_and_moves_checked_bulk_data_both_ways() {
    if !Path::new(KERNEL).exists() {
        eprintln!("skipping: {KERNEL} is absent (apt-get install user-mode-linux busybox-static)");
        return;
    }
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::create("linux-net").unwrap();
    ns.enter().unwrap();

    // The host's listeners, before the guest can come.
    let wait = Duration::from_secs(240);
    let down_data = {
        let mut v = vec![0u8; CHECK_BYTES];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut v)
            .unwrap();
        v
    };
    let down_sum = sha256(&down_data);
    let up = serve_one(
        listen("0.0.0.0", PORT_UP),
        CHECK_BYTES,
        true,
        Vec::new(),
        0,
        wait,
    );
    let down = serve_one(listen("0.0.0.0", PORT_DOWN), 0, false, down_data, 1, wait);
    let bench_up = serve_one(
        listen("0.0.0.0", PORT_BENCH_UP),
        BENCH_BYTES,
        false,
        Vec::new(),
        0,
        wait,
    );
    let up6 = serve_one(
        listen("::", PORT6_UP),
        CHECK_BYTES,
        false,
        Vec::new(),
        0,
        wait,
    );
    let down6 = serve_one(
        listen("::", PORT6_DOWN),
        0,
        false,
        vec![0u8; CHUNK],
        CHECK_BYTES / CHUNK,
        wait,
    );
    let bench_down = serve_one(
        listen("0.0.0.0", PORT_BENCH_DOWN),
        0,
        false,
        vec![0u8; CHUNK],
        BENCH_BYTES / CHUNK,
        wait,
    );

    let s = Scratch::new();
    let cfg = s.write_json("zone.json", &zone());
    let run = SimRun::new(&cfg, "linux-net").timeout(300);
    let mut stack = Stack::start(&s, run, &[]).unwrap();
    if let Err(e) = ns.wait_for_link(TAP, Duration::from_secs(20)) {
        panic!("{e:#}\n{}", stack.diagnostics());
    }
    ns.host_side(TAP, &format!("{HOST}/24")).unwrap();
    // IPv6 too (host_side turns it off), for TSO6.
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{TAP}/disable_ipv6"), "0").unwrap();
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{HOST6}/64"),
        "dev",
        TAP,
        "nodad",
    ])
    .unwrap();
    let report = match stack.wait_report(Duration::from_secs(320)) {
        Ok(r) => r,
        Err(e) => panic!("{e:#}\n{}", stack.diagnostics()),
    };
    for c in report["linux"]["checks"].as_array().into_iter().flatten() {
        eprintln!("check {} {}: {}", c["name"], c["pass"], c["detail"]);
    }
    assert_checks(
        &report,
        &[
            "insmod-virtio_net",
            "net-ping",
            "net-up",
            "net-down",
            "net-bench-send",
            "net-bench-receive",
            "insmod-ipv6",
            "net6-ping",
            "net6-send",
            "net6-receive",
        ],
        &stack.diagnostics(),
    );
    assert_eq!(report["linux"]["done"], true, "{report:#}");

    // What Linux negotiated, as it says itself.
    let bits = check_detail(&report, "net-features").as_bytes().to_vec();
    for (bit, name) in FEATURES {
        assert_eq!(
            bits.get(bit),
            Some(&b'1'),
            "{name} (bit {bit}) not negotiated: {}",
            String::from_utf8_lossy(&bits)
        );
    }
    // ... and as the adapter saw it on the bridge.
    let own = report["zones"][0]["devices"][0]["features"]["own"]
        .as_u64()
        .unwrap();
    for (bit, name) in FEATURES {
        assert_ne!(own & (1 << bit), 0, "{name}: driver features {own:#x}");
    }

    // The data, checked on both ends.
    let got = up.join().unwrap().expect("the guest's upload");
    assert_eq!(got.data.len(), CHECK_BYTES);
    let up_sum = check_detail(&report, "net-up-sha256");
    assert_eq!(sha256(&got.data), up_sum, "guest to host");
    down.join().unwrap().expect("the download");
    assert_eq!(
        check_detail(&report, "net-down-sha256"),
        format!("{CHECK_BYTES} {down_sum}"),
        "host to guest"
    );
    let bu = bench_up.join().unwrap().expect("the timed upload");
    assert_eq!(bu.bytes, BENCH_BYTES);
    let bd = bench_down.join().unwrap().expect("the timed download");

    // Segmentation offloads were used: in the direction of each timed transfer, eth0's mean
    // packet is above the largest unsegmented frame (Linux counts a TSO/GSO packet once).
    let stats = |name: &str| -> Vec<f64> {
        check_detail(&report, name)
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let (s0, s1, s2) = (
        stats("net-stats-0"),
        stats("net-stats-1"),
        stats("net-stats-2"),
    );
    let sent_mean = (s1[2] - s0[2]) / (s1[3] - s0[3]);
    let received_mean = (s2[0] - s1[0]) / (s2[1] - s1[1]);
    eprintln!(
        "eth0: timed send: {} packets of {sent_mean:.0} bytes on average; timed receive: {} \
         packets of {received_mean:.0} bytes on average",
        s1[3] - s0[3],
        s2[1] - s1[1]
    );
    let (s3, s4, s5) = (
        stats("net-stats-3"),
        stats("net-stats-4"),
        stats("net-stats-5"),
    );
    let sent6_mean = (s4[2] - s3[2]) / (s4[3] - s3[3]);
    let received6_mean = (s5[0] - s4[0]) / (s5[1] - s4[1]);
    eprintln!(
        "eth0 over IPv6: send: {sent6_mean:.0} bytes a packet on average; receive: \
         {received6_mean:.0}"
    );
    assert_eq!(up6.join().unwrap().expect("IPv6 upload").bytes, CHECK_BYTES);
    down6.join().unwrap().expect("IPv6 download");
    assert!(sent6_mean > 1514.0, "IPv6: HOST_TSO6 unused");
    assert!(received6_mean > 1514.0, "IPv6: GUEST_TSO6 unused");
    assert!(
        sent_mean > 1514.0,
        "no packet larger than a frame sent: HOST_TSO unused"
    );
    assert!(
        received_mean > 1514.0,
        "no packet larger than a frame received: GUEST_TSO unused"
    );

    let st = stack.sim.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(st.success(), "simulator: {st}\n{}", stack.diagnostics());
    let st = stack.broker.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(st.success(), "broker: {st}\n{}", stack.diagnostics());
    let log = stack.broker.text();
    for bad in ["dropped", "refused", "killed", "SIGSYS", "no frame"] {
        assert!(!log.contains(bad), "{bad:?} in the broker's log:\n{log}");
    }

    // The benchmark: the same nc transfers on the host, in the same run.
    // The guest's clock (/proc/uptime, 10 ms steps) runs around its whole command; the
    // listener's from the first byte read to the last, or from accept to its last write.
    let [host_send, host_send_l, host_receive, host_receive_l] = host_baseline();
    let (guest_send, guest_receive) = (rate(&report, "send"), rate(&report, "receive"));
    let (guest_send_l, guest_receive_l) =
        (mbps(BENCH_BYTES, bu.seconds), mbps(BENCH_BYTES, bd.seconds));
    eprintln!(
        "\n{} MiB over TCP, each end `busybox nc -e dd bs=65536`, MB/s by the command's clock / \
         by the host listener's clock (host: best of 3)",
        BENCH_BYTES >> 20
    );
    eprintln!("| direction | Linux guest through the stack | host loopback | ratio |");
    eprintln!("|---|---|---|---|");
    for (what, g, gl, h, hl) in [
        ("sending", guest_send, guest_send_l, host_send, host_send_l),
        (
            "receiving",
            guest_receive,
            guest_receive_l,
            host_receive,
            host_receive_l,
        ),
    ] {
        eprintln!(
            "| {what} | {g:.0} / {gl:.0} | {h:.0} / {hl:.0} | {:.2} / {:.2} |",
            g / h,
            gl / hl
        );
    }
}
