//! Malformed configs are refused by the real binary with a message naming the field, and
//! nothing is started.

use std::time::Duration;

use hvisor_tests::*;
use serde_json::{json, Value};

fn good(img: &str) -> Value {
    json!({ "zones": [{
        "id": 1,
        "memory_region": [{ "zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000", "size": "0x30000000" }],
        "devices": [
            { "type": "net", "addr": "0xa003600", "len": "0x200", "irq": 75, "tap": "tap0",
              "mac": ["0x02", "0x00", "0x00", "0x00", "0x01", "0x01"], "status": "enable" },
            { "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76, "status": "enable" },
            { "type": "blk", "addr": "0xa003c00", "len": "0x200", "irq": 78, "img": img, "status": "enable" }
        ]
    }]})
}

#[test]
fn the_seed_example_checks_and_describes_every_device() {
    let s = Scratch::new();
    let img = s.image("rootfs2.ext4", 1 << 20);
    let cfg = s.write_json("virtio_cfg.json", &good(img.to_str().unwrap()));
    let (ok, out) = broker_cmd(&["check", cfg.to_str().unwrap()]);
    assert!(ok, "{out}");
    for want in [
        "0xa003c00",
        "0xa003600",
        "0xa003800",
        "tap0",
        "02:00:00:00:01:01",
        "rootfs2.ext4",
    ] {
        assert!(out.contains(want), "check output lacks {want}:\n{out}");
    }
}

#[test]
fn malformed_configs_are_refused_naming_the_field() {
    let s = Scratch::new();
    let img = s.image("disk.img", 1 << 20);
    let img = img.to_str().unwrap().to_string();
    type Edit = fn(&mut Value, &str);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "zero addr",
            |v, _| v["zones"][0]["devices"][2]["addr"] = json!(0),
            "zones[0].devices[2].addr",
        ),
        (
            "zero len",
            |v, _| v["zones"][0]["devices"][2]["len"] = json!("0"),
            "zones[0].devices[2].len",
        ),
        (
            "zero irq",
            |v, _| v["zones"][0]["devices"][1]["irq"] = json!(0),
            "zones[0].devices[1].irq",
        ),
        (
            "bad number",
            |v, _| v["zones"][0]["devices"][2]["addr"] = json!("0xa00zz"),
            "zones[0].devices[2].addr",
        ),
        (
            "negative",
            |v, _| v["zones"][0]["devices"][2]["irq"] = json!(-3),
            "zones[0].devices[2].irq",
        ),
        (
            "missing img",
            |v, _| v["zones"][0]["devices"][2]["img"] = json!("/nonexistent/disk.img"),
            "zones[0].devices[2].img",
        ),
        (
            "no img key",
            |v, _| {
                v["zones"][0]["devices"][2]
                    .as_object_mut()
                    .unwrap()
                    .remove("img");
            },
            "zones[0].devices[2].img",
        ),
        (
            "short mac",
            |v, _| v["zones"][0]["devices"][0]["mac"] = json!([2, 0, 0, 0, 1]),
            "zones[0].devices[0].mac",
        ),
        (
            "mac byte 256",
            |v, _| v["zones"][0]["devices"][0]["mac"] = json!([2, 0, 0, 0, 1, 256]),
            "zones[0].devices[0].mac",
        ),
        (
            "zone id 32",
            |v, _| v["zones"][0]["id"] = json!(32),
            "zones[0].id",
        ),
        (
            "zone0_ipa 0",
            |v, _| v["zones"][0]["memory_region"][0]["zone0_ipa"] = json!("0"),
            "zones[0].memory_region[0].zone0_ipa",
        ),
        (
            "unaligned zone0_ipa",
            |v, _| v["zones"][0]["memory_region"][0]["zone0_ipa"] = json!("0x50000010"),
            "zones[0].memory_region[0].zone0_ipa",
        ),
        (
            "mmio inside RAM",
            |v, _| v["zones"][0]["devices"][2]["addr"] = json!("0x50001000"),
            "zones[0].devices[2]",
        ),
        (
            "overlapping devices",
            |v, _| v["zones"][0]["devices"][1]["addr"] = json!("0xa003700"),
            "zones[0].devices[1]",
        ),
        (
            "overlapping regions",
            |v, _| {
                let r = v["zones"][0]["memory_region"][0].clone();
                v["zones"][0]["memory_region"]
                    .as_array_mut()
                    .unwrap()
                    .push(r);
            },
            "zones[0].memory_region[1]",
        ),
        (
            "65 regions",
            |v, _| {
                let regions: Vec<Value> = (0..65u64).map(|i| json!({ "zone0_ipa": format!("{:#x}", 0x1_0000_0000u64 + i * 0x10000), "zonex_ipa": format!("{:#x}", 0x1_0000_0000u64 + i * 0x10000), "size": "0x1000" })).collect();
                v["zones"][0]["memory_region"] = json!(regions);
            },
            "zones[0].memory_region",
        ),
        (
            "gpu enabled",
            |v, _| v["zones"][0]["devices"][1]["type"] = json!("gpu"),
            "zones[0].devices[1]",
        ),
        (
            "unknown type",
            |v, _| v["zones"][0]["devices"][1]["type"] = json!("sound"),
            "zones[0].devices[1].type",
        ),
        (
            "readonly not a bool",
            |v, _| v["zones"][0]["devices"][2]["readonly"] = json!("yes"),
            "zones[0].devices[2].readonly",
        ),
        ("no zones", |v, _| *v = json!({}), "zones"),
        (
            "RAM of two zones overlapping",
            |v, _| {
                let mut z = v["zones"][0].clone();
                z["id"] = json!(2);
                z["memory_region"][0]["zone0_ipa"] = json!("0x7ffff000");
                z["devices"] = json!([]);
                v["zones"].as_array_mut().unwrap().push(z);
            },
            "zones[1].memory_region[0]",
        ),
        (
            "region size not whole pages",
            |v, _| v["zones"][0]["memory_region"][0]["size"] = json!("0x30000800"),
            "zones[0].memory_region[0].size",
        ),
        (
            "RAM beyond 52 bits",
            |v, _| v["zones"][0]["memory_region"][0]["size"] = json!("0x10000000000000"),
            "zones[0].memory_region[0]",
        ),
        (
            "MMIO beyond 52 bits",
            |v, _| v["zones"][0]["devices"][1]["addr"] = json!("0xfffffffffff00"),
            "zones[0].devices[1]",
        ),
        (
            "all-zero mac",
            |v, _| v["zones"][0]["devices"][0]["mac"] = json!([0, 0, 0, 0, 0, 0]),
            "zones[0].devices[0].mac",
        ),
        (
            "tap name the kernel rewrites",
            |v, _| v["zones"][0]["devices"][0]["tap"] = json!("tap%d"),
            "zones[0].devices[0].tap",
        ),
        (
            "one pty_link for two consoles",
            |v, img| {
                let link = json!(format!("{img}.console"));
                v["zones"][0]["devices"][1]["pty_link"] = link.clone();
                let mut z = v["zones"][0].clone();
                z["id"] = json!(2);
                z["memory_region"][0]["zone0_ipa"] = json!("0x80000000");
                z["devices"] = json!([z["devices"][1].clone()]);
                v["zones"].as_array_mut().unwrap().push(z);
            },
            "zones[1].devices[0].pty_link",
        ),
    ];
    assert!(cases.len() >= 15);
    for (what, edit, path) in cases {
        let mut v = good(&img);
        edit(&mut v, &img);
        let cfg = s.write_json("bad.json", &v);
        let (ok, out) = broker_cmd(&["check", cfg.to_str().unwrap()]);
        assert!(!ok, "{what}: accepted:\n{out}");
        assert!(
            out.contains(path),
            "{what}: error does not name {path}:\n{out}"
        );
    }
    // not JSON at all: the position is named
    std::fs::write(s.path("bad.json"), "{ \"zones\": [ }").unwrap();
    let (ok, out) = broker_cmd(&["check", s.path("bad.json").to_str().unwrap()]);
    assert!(!ok && out.contains("line 1"), "{out}");
}

#[test]
fn a_malformed_config_starts_nothing() {
    use nix::sys::socket::*;
    use std::os::fd::AsRawFd;
    let s = Scratch::new();
    let img = s.image("disk.img", 1 << 20);
    let mut bad = good(img.to_str().unwrap());
    bad["zones"][0]["devices"][2]["len"] = json!("0x10");
    let bad = s.write_json("bad.json", &bad);
    // a driver socket that must never see a connection
    let sock_path = s.path("driver.sock");
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK,
        None,
    )
    .unwrap();
    bind(listener.as_raw_fd(), &UnixAddr::new(&sock_path).unwrap()).unwrap();
    listen(&listener, Backlog::new(4).unwrap()).unwrap();
    let mut broker = start_broker(&bad, &sock_path, &[]).unwrap();
    let st = broker.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!st.success());
    let text = broker.text();
    assert!(text.contains("zones[0].devices[2].len"), "{text}");
    assert!(
        !text.contains("worker pid"),
        "a worker was started:\n{text}"
    );
    assert_eq!(
        accept(&listener).err(),
        Some(nix::errno::Errno::EAGAIN),
        "the broker connected to the driver"
    );
}

#[test]
fn duplicate_keys_are_refused_naming_the_key() {
    let s = Scratch::new();
    let img = s.image("disk.img", 1 << 20);
    let text = serde_json::to_string_pretty(&good(img.to_str().unwrap())).unwrap();
    // hvisor-tool would serve the first image, a last-wins parser the second.
    let other = s.image("other.img", 1 << 20);
    let dup = text.replacen(
        "\"img\":",
        &format!("\"img\": {:?},\n \"img\":", other.to_str().unwrap()),
        1,
    );
    assert_ne!(dup, text);
    std::fs::write(s.path("dup.json"), dup).unwrap();
    let (ok, out) = broker_cmd(&["check", s.path("dup.json").to_str().unwrap()]);
    assert!(!ok, "accepted:\n{out}");
    assert!(
        out.contains("zones[0].devices[2].img: duplicate key"),
        "{out}"
    );
}

/// `check` and `start` both refuse `v`, naming `path` and `reason`; `start` opens nothing.
fn refused_by_check_and_start(s: &Scratch, v: &Value, path: &str, reason: &str) {
    let cfg = s.write_json("cfg.json", v);
    let (ok, out) = broker_cmd(&["check", cfg.to_str().unwrap()]);
    assert!(!ok, "check accepted:\n{out}");
    assert!(
        out.contains(path) && out.contains(reason),
        "check does not name {path} ({reason}):\n{out}"
    );
    let mut broker = start_broker(&cfg, &s.path("no-driver.sock"), &[]).unwrap();
    let st = broker.wait_exit(Duration::from_secs(10)).unwrap();
    let text = broker.text();
    assert!(!st.success(), "start accepted:\n{text}");
    assert!(
        text.contains(path) && text.contains(reason),
        "start does not name {path} ({reason}):\n{text}"
    );
}

/// `good` without the net device (nothing here needs a tap).
fn good_without_net(img: &std::path::Path) -> Value {
    let mut v = good(img.to_str().unwrap());
    v["zones"][0]["devices"][0]["status"] = json!("disable");
    v
}

#[test]
fn a_disk_a_user_swapped_in_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let home = s.user_dir("home", NOBODY);
    let secret = s.image("secret.img", 1 << 20);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The user links a root-only file into their own directory, as the guest's disk.
    let swapped = home.join("disk.img");
    run_as(
        NOBODY,
        &format!("ln -s {} {}", secret.display(), swapped.display()),
    );
    let uid = format!("{:?} is owned by uid {NOBODY}", home.display().to_string());
    refused_by_check_and_start(
        &s,
        &good_without_net(&swapped),
        "zones[0].devices[2].img",
        &uid,
    );
    // The user's own file in their directory: they could swap it at any time.
    let own = home.join("own.img");
    run_as(
        NOBODY,
        &format!("head -c 4096 /dev/zero > {}", own.display()),
    );
    refused_by_check_and_start(&s, &good_without_net(&own), "zones[0].devices[2].img", &uid);
    // Root's link, in root's directory, to a target on a path only root controls: accepted.
    let link = s.path("disk-link.img");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let cfg = s.write_json("ok.json", &good_without_net(&link));
    let (ok, out) = broker_cmd(&["check", cfg.to_str().unwrap()]);
    assert!(ok, "{out}");
}

#[test]
fn a_pty_link_never_replaces_what_is_not_ours() {
    let s = Scratch::new();
    let img = s.image("disk.img", 1 << 20);
    let home = s.user_dir("home", NOBODY);
    let notes = s.path("notes");
    std::fs::write(&notes, "keep").unwrap();
    let other = s.path("other");
    std::os::unix::fs::symlink("/etc/passwd", &other).unwrap();
    let in_home = format!("{:?} is owned by uid {NOBODY}", home.display().to_string());
    for (link, reason) in [
        (notes.clone(), "exists and is not a symlink"),
        (other.clone(), "is not a pty link"),
        (home.join("console"), in_home.as_str()),
        (home.join("run/hvisor/console"), in_home.as_str()),
    ] {
        let mut v = good_without_net(&img);
        v["zones"][0]["devices"][1]["pty_link"] = json!(link.to_str().unwrap());
        refused_by_check_and_start(&s, &v, "zones[0].devices[1].pty_link", reason);
    }
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "keep");
    assert_eq!(
        std::fs::read_link(&other).unwrap(),
        std::path::Path::new("/etc/passwd")
    );
    assert!(
        !home.join("run").exists(),
        "a directory was made for the user"
    );
}
