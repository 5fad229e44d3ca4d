//! virtio-net end to end: hvisor-sim (guests on virtio-drivers' `VirtIONetRaw` and on a driver
//! of our own), hvisor-broker and hvisor-worker-net as separate processes, inside a network
//! namespace of the test's own where the tap's host side and the guest's UDP peer live.
//!
//! The test thread enters the namespace before it starts anything, so the simulator, the
//! broker (which creates the tap there) and the peer thread all live in it.

#[path = "net/peer.rs"]
mod peer;

use std::net::SocketAddrV4;
use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

use peer::{cpu_seconds, skip_reason, Netns, Peer};

const RAM: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x0400_0000;
const ADDR: u64 = 0xa00_3600;
const TAP: &str = "hvtap0";
// Documentation addresses (RFC 5737), and only ever inside the test's namespace.
const HOST: &str = "192.0.2.1";
const GUEST: &str = "192.0.2.2";
const PORT: u16 = 7777;

fn net_zone(mtu: u16) -> Value {
    json!({ "zones": [{
        "id": 1,
        "memory_region": [{ "zone0_ipa": format!("{RAM:#x}"), "zonex_ipa": format!("{RAM:#x}"), "size": format!("{RAM_SIZE:#x}") }],
        "devices": [{
            "type": "net", "addr": format!("{ADDR:#x}"), "len": "0x200", "irq": 75,
            "tap": TAP, "mac": ["0x02", "0x00", "0x00", "0x00", "0x01", "0x01"], "mtu": mtu,
            "status": "enable"
        }]
    }]})
}

/// Everything one net run needs, dropped in the right order: peer, processes, namespace.
struct NetRun {
    peer: Option<Peer>,
    stack: Stack,
    _scratch: Scratch,
    _ns: Netns,
}

/// Starts the simulator (guests held back) and the broker in a fresh namespace, gives the
/// tap its host side once the broker has made it, starts the peer, then lets the guests go.
fn start(guest: &str, mtu: u16) -> NetRun {
    start_with(guest, net_zone(mtu), &[])
}

/// [`start`] with this configuration (one net device) and extra simulator arguments.
fn start_with(guest: &str, config: Value, extra: &[&str]) -> NetRun {
    let mtu = config["zones"][0]["devices"][0]["mtu"].as_u64().unwrap();
    let ns = Netns::create("net").unwrap();
    ns.enter().unwrap();
    let scratch = Scratch::new();
    let cfg = scratch.write_json("net.json", &config);
    let go = scratch.path("go");
    let run = SimRun::new(&cfg, guest)
        .staying()
        .wait_for(&go)
        .timeout(240)
        .net(HOST, GUEST, PORT)
        .args(extra);
    let mut stack = Stack::start(&scratch, run, &[]).unwrap();
    if let Err(e) = ns.wait_for_link(TAP, Duration::from_secs(10)) {
        panic!("{e:#}\n{}", stack.diagnostics());
    }
    ns.host_side(TAP, &format!("{HOST}/24")).unwrap();
    // the broker created the tap with the configured MTU
    let link = ns.ip(&["link", "show", TAP]).unwrap();
    assert!(link.contains(&format!("mtu {mtu} ")), "{link}");
    let peer = Peer::start(SocketAddrV4::new(HOST.parse().unwrap(), PORT)).unwrap();
    std::fs::write(&go, b"").unwrap();
    NetRun {
        peer: Some(peer),
        stack,
        _scratch: scratch,
        _ns: ns,
    }
}

impl NetRun {
    fn report(&mut self) -> Value {
        let report = match self.stack.wait_report(Duration::from_secs(240)) {
            Ok(r) => r,
            Err(e) => panic!("{e:#}\npeer: {:?}", self.peer_log()),
        };
        // Shown with --nocapture: what each check saw.
        for d in report["zones"].as_array().into_iter().flatten() {
            for c in d["devices"].as_array().into_iter().flatten() {
                for c in c["checks"].as_array().into_iter().flatten() {
                    eprintln!("check {}: {}", c["name"], c["detail"]);
                }
            }
        }
        let failed = failed_checks(&report);
        assert!(
            failed.is_empty(),
            "failed checks: {failed:#?}\nreport: {report:#}\n{}\npeer: {:#?}",
            self.stack.diagnostics(),
            self.peer_log()
        );
        report
    }

    fn peer_log(&self) -> Vec<String> {
        self.peer
            .as_ref()
            .map(|p| p.log.lock().unwrap().clone())
            .unwrap_or_default()
    }

    fn finish(mut self) {
        let st = self.stack.stop_broker().unwrap();
        assert!(st.success(), "broker: {st}\n{}", self.stack.diagnostics());
        if let Some(p) = self.peer.take() {
            p.stop().unwrap();
        }
    }
}

#[test]
fn a_guest_talks_to_the_host_through_a_sandboxed_worker_and_loses_nothing() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut run = start("net-verify", 1500);
    let report = run.report();
    let names = check_names(&report);
    for want in [
        "arp_resolves_host",
        "arp_answers_host",
        "icmp_echo_to_host",
        "icmp_echo_from_host",
        "no_rx_buffers",
        "bulk_guest_to_host",
        "bulk_host_to_guest",
        "mtu_guest_to_host",
        "mtu_host_to_guest",
        "rx_headers",
        "own_features",
        "own_config_space",
        "own_bulk_guest_to_host",
        "own_bulk_host_to_guest",
        "own_mtu_host_to_guest",
        "own_no_rx_buffers",
        "own_mergeable_rx",
        "legacy_guest_to_host",
        "legacy_host_to_guest",
        "legacy_header",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} check: {names:?}"
        );
    }

    // The worker: one, sandboxed, logging through the broker, and it dropped nothing.
    let workers = children(run.stack.broker.pid());
    assert_eq!(workers.len(), 1, "{}", run.stack.diagnostics());
    let w = workers[0];
    assert_eq!(proc_status(w, "Seccomp").as_deref(), Some("2"));
    assert_eq!(proc_status(w, "NoNewPrivs").as_deref(), Some("1"));
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            proc_status(w, set).as_deref(),
            Some("0000000000000000"),
            "{set}"
        );
    }
    let log = run.stack.broker.text();
    assert!(log.contains("zone1 net@0xa003600"), "{log}");

    // Idle with frames waiting for a guest that has no buffers (its driver reset the device
    // when it finished): the worker leaves the tap alone and sleeps.
    let sock = std::net::UdpSocket::bind((HOST, 0)).unwrap();
    for _ in 0..50 {
        sock.send_to(b"for nobody", (GUEST, 9)).unwrap();
    }
    let before = cpu_seconds(w).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(w).unwrap() - before;
    assert!(
        used <= 0.02,
        "the idle worker used {used:.2} s of CPU in 1 s"
    );
    for bad in ["dropped", "refused", "killed", "SIGSYS"] {
        assert!(!log.contains(bad), "{bad:?} in the broker's log:\n{log}");
    }
    run.finish();
}

#[test]
fn jumbo_frames_pass_whole_and_span_receive_buffers() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut run = start("net-verify", 9000);
    let report = run.report();
    let text = report.to_string();
    assert!(
        text.contains("mtu 9000") && text.contains("a 9000-byte IP packet"),
        "{report:#}"
    );
    // jumbo frames both ways, as the worker counted them at the tap
    let (ok, out) = run.stack.ask(&["status", "--json"]);
    assert!(ok, "{out}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let counted = &status["devices"][0]["worker_reported"];
    for key in ["bytes_read", "bytes_written"] {
        assert!(counted[key].as_u64().unwrap() > 9000, "{status:#}");
    }
    assert!(counted["requests"].as_u64().unwrap() > 0, "{status:#}");
    run.finish();
}

/// Each direction limited to 200 kB/s: over the whole run (the test's own clock, which spans
/// every frame), the frames each way came to at most that plus the burst and one frame, and
/// the guest's bench, windowed, lost nothing to the limit.
#[test]
fn a_net_device_limited_each_way_moves_no_more_than_its_limits() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let (rate, burst) = (200_000u64, 64 * 1024u64);
    let mut config = net_zone(1500);
    let limit = json!({ "bytes_per_sec": rate, "burst_bytes": burst });
    config["zones"][0]["devices"][0]["rx_rate_limit"] = limit.clone();
    config["zones"][0]["devices"][0]["tx_rate_limit"] = limit;
    let started = std::time::Instant::now();
    let mut run = start_with("net-bench", config, &["--net-bench-secs", "1"]);
    run.report();
    let (ok, out) = run.stack.ask(&["status", "--json"]);
    let secs = started.elapsed().as_secs_f64();
    assert!(ok, "{out}");
    let status: Value = serde_json::from_str(&out).unwrap();
    let dev = &status["devices"][0];
    for flow in ["rx", "tx"] {
        assert_eq!(
            dev["rate_limits"][flow]["bytes"]["rate"], rate,
            "{status:#}"
        );
    }
    let counted = &dev["worker_reported"];
    // The tap's counts include each frame's 12-byte header, which the limit does not count.
    let headers = 12 * counted["requests"].as_u64().unwrap();
    let bound = rate as f64 * secs + (burst + 1514 + headers) as f64;
    for key in ["bytes_read", "bytes_written"] {
        let bytes = counted[key].as_u64().unwrap();
        println!("{key}: {bytes} in at most {secs:.2} s, bound {bound:.0}");
        assert!(
            bytes as f64 <= bound,
            "{key}: {bytes} > {bound:.0}\n{status:#}"
        );
    }
    assert!(counted["rate_limited"].as_u64().unwrap() > 0, "{status:#}");
    run.finish();
}
