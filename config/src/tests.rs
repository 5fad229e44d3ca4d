use super::*;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::{chown, symlink, PermissionsExt};
use std::path::PathBuf;

/// The example from the hvisor-tool documentation, with `img` filled in by the test.
const SEED: &str = r#"{
    "zones": [
        {
            "id": 1,
            "memory_region": [
                {
                    "zone0_ipa": "0x50000000",
                    "zonex_ipa": "0x50000000",
                    "size": "0x30000000"
                }
            ],
            "devices": [
                {
                    "type": "net",
                    "addr": "0xa003600",
                    "len": "0x200",
                    "irq": 75,
                    "tap": "tap0",
                    "mac": [
                        "0x02",
                        "0x00",
                        "0x00",
                        "0x00",
                        "0x01",
                        "0x01"
                    ],
                    "status": "enable"
                },
                {
                    "type": "console",
                    "addr": "0xa003800",
                    "len": "0x200",
                    "irq": 76,
                    "status": "enable"
                },
                {
                    "type": "blk",
                    "addr": "0xa003c00",
                    "len": "0x200",
                    "irq": 78,
                    "img": "rootfs2.ext4",
                    "status": "enable"
                }
            ]
        }
    ]
}"#;

/// A 1 MiB image file that lives as long as the test, in a directory of its own (a file
/// directly in a sticky /tmp would be refused).
struct Image {
    dir: tempfile::TempDir,
}

impl Image {
    fn path(&self) -> PathBuf {
        self.dir.path().join("disk.img")
    }
}

fn image() -> Image {
    let img = Image {
        dir: tempfile::tempdir().unwrap(),
    };
    std::fs::write(img.path(), vec![0u8; 1 << 20]).unwrap();
    img
}

fn seed(img: &Image) -> Value {
    let mut v: Value = serde_json::from_str(SEED).unwrap();
    v["zones"][0]["devices"][2]["img"] = json!(img.path().to_str().unwrap());
    v
}

fn ok(v: &Value) -> Loaded {
    match parse(&v.to_string()) {
        Ok(l) => l,
        Err(e) => panic!("unexpected errors:\n{e}"),
    }
}

fn errors(v: &Value) -> Vec<ConfigError> {
    errors_text(&v.to_string())
}

fn errors_text(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.0,
    }
}

/// Asserts one of `errs` is at exactly `path` and its reason contains `needle`.
#[track_caller]
fn has(errs: &[ConfigError], path: &str, needle: &str) {
    assert!(
        errs.iter()
            .any(|e| e.path == path && e.reason.contains(needle)),
        "no error at {path} containing {needle:?} in:\n{}",
        ConfigErrors(errs.to_vec())
    );
}

/// Applies `edit` to the seed and returns the errors.
fn broken(edit: impl FnOnce(&mut Value)) -> Vec<ConfigError> {
    let img = image();
    let mut v = seed(&img);
    edit(&mut v);
    errors(&v)
}

fn dev(v: &mut Value, i: usize) -> &mut Value {
    &mut v["zones"][0]["devices"][i]
}

#[test]
fn seed_example_parses() {
    let img = image();
    let loaded = ok(&seed(&img));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = &loaded.config;
    assert_eq!(c.zones.len(), 1);
    let z = &c.zones[0];
    assert_eq!(z.id, 1);
    assert_eq!(
        z.memory,
        vec![MemRegion {
            zone0_ipa: 0x5000_0000,
            zonex_ipa: 0x5000_0000,
            size: 0x3000_0000
        }]
    );
    assert_eq!(z.devices.len(), 3, "{:#?}", z.devices);
    let net = &z.devices[0];
    assert_eq!(
        (net.zone, net.addr, net.len, net.irq),
        (1, 0xa003600, 0x200, 75)
    );
    assert_eq!(net.json_path, "zones[0].devices[0]");
    assert_eq!(
        net.kind,
        DeviceConfig::Net {
            tap: "tap0".into(),
            mac: [2, 0, 0, 0, 1, 1],
            mtu: 1500,
        }
    );
    assert_eq!(
        z.devices[1].kind,
        DeviceConfig::Console {
            pty_link: None,
            cols: 80,
            rows: 25
        }
    );
    assert_eq!(z.devices[1].kind.type_name(), "console");
    assert_eq!(
        z.devices[2].kind,
        DeviceConfig::Blk {
            img: img.path().to_path_buf(),
            readonly: false
        }
    );
    assert_eq!(z.devices[2].json_path, "zones[0].devices[2]");

    let text = c.describe();
    assert!(text.contains("zone 1"), "{text}");
    assert!(
        text.contains("0x50000000-0x7fffffff (768 MiB) at zone0 0x50000000"),
        "{text}"
    );
    assert!(
        text.contains("net     0xa003600+0x200 irq 75 tap tap0 mac 02:00:00:00:01:01"),
        "{text}"
    );
    assert!(text.contains("console 0xa003800+0x200 irq 76"), "{text}");
    assert!(text.contains("read-write (1048576 bytes, 1 MiB)"), "{text}");
}

#[test]
fn load_reads_a_file_and_names_it_on_errors() {
    let img = image();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(seed(&img).to_string().as_bytes()).unwrap();
    assert_eq!(load(file.path()).unwrap().config.zones[0].devices.len(), 3);

    let mut bad = tempfile::NamedTempFile::new().unwrap();
    bad.write_all(b"{\n  \"zones\": [\n    }\n").unwrap();
    let e = load(bad.path()).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].path, bad.path().display().to_string());
    assert!(e.0[0].reason.contains("not valid JSON"), "{e}");
    assert!(e.0[0].reason.contains("line 3"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let e = load(&missing).unwrap_err();
    assert_eq!(e.0[0].path, missing.display().to_string());
    assert!(e.0[0].reason.contains("cannot read"), "{e}");
}

#[test]
fn numbers_in_every_base() {
    let img = image();
    let mut v = seed(&img);
    v["zones"][0]["memory_region"][0] = json!({
        "zone0_ipa": "  0X50000000",
        "zonex_ipa": "012000000000",  // octal 0x50000000
        "size": 2415919104u64         // decimal 0x90000000
    });
    *dev(&mut v, 1) = json!({
        "type": "console", "status": "enable",
        "addr": "167786496", "len": "01000", "irq": "+0x4c"
    });
    dev(&mut v, 0)["mac"] = json!([2, "0", "00", "0x0", " 1", "0X1"]);
    let loaded = ok(&v);
    let z = &loaded.config.zones[0];
    assert_eq!(
        z.memory[0],
        MemRegion {
            zone0_ipa: 0x5000_0000,
            zonex_ipa: 0x5000_0000,
            size: 0x9000_0000
        }
    );
    let con = &z.devices[1];
    assert_eq!((con.addr, con.len, con.irq), (167786496, 0o1000, 0x4c));
    assert_eq!(
        z.devices[0].kind,
        DeviceConfig::Net {
            tap: "tap0".into(),
            mac: [2, 0, 0, 0, 1, 1],
            mtu: 1500,
        }
    );
    // A plain JSON number above i32::MAX works here but not in hvisor-tool: warn.
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.starts_with("zones[0].memory_region[0].size:") && w.contains("C int")),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn invalid_json_names_the_line() {
    let e = errors_text("{\n  \"zones\": [\n    { \"id\": 1,, }\n  ]\n}");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].path, "<input>");
    assert!(e[0].reason.contains("line 3"), "{}", e[0]);
    let e = errors_text("");
    assert!(e[0].reason.contains("not valid JSON"), "{}", e[0]);
}

#[test]
fn top_level_must_be_an_object_with_zones() {
    has(&errors_text("[]"), "(top level)", "must be an object");
    has(&errors_text("{}"), "zones", "is required");
    has(
        &errors_text(r#"{"zones": {}}"#),
        "zones",
        "must be an array",
    );
    has(
        &errors_text(r#"{"zones": []}"#),
        "zones",
        "at least one zone",
    );
}

#[test]
fn zone_id_32_is_refused() {
    let e = broken(|v| v["zones"][0]["id"] = json!(32));
    has(&e, "zones[0].id", "not below 32");
    let e = broken(|v| v["zones"][0]["id"] = json!("0x100000000"));
    has(&e, "zones[0].id", "32 bits");
}

#[test]
fn zone_id_missing() {
    let e = broken(|v| {
        v["zones"][0].as_object_mut().unwrap().remove("id");
    });
    has(&e, "zones[0].id", "is required");
}

#[test]
fn duplicate_zone_id() {
    let e = broken(|v| {
        let mut z2 = v["zones"][0].clone();
        z2["devices"] = json!([]);
        v["zones"].as_array_mut().unwrap().push(z2);
    });
    has(&e, "zones[1].id", "duplicate zone id 1 (also zones[0])");
}

#[test]
fn too_many_zones() {
    let e = broken(|v| {
        let zones = v["zones"].as_array_mut().unwrap();
        for id in 2..34 {
            zones.push(json!({"id": id % 32, "memory_region": [], "devices": []}));
        }
    });
    has(&e, "zones", "33 zones; at most 32");
}

#[test]
fn sixty_five_regions() {
    let e = broken(|v| {
        let regions: Vec<Value> = (0..65u64)
            .map(|i| {
                let a = format!("{:#x}", 0x1_0000_0000u64 + i * 0x1000);
                json!({"zone0_ipa": a, "zonex_ipa": a, "size": "0x1000"})
            })
            .collect();
        v["zones"][0]["memory_region"] = Value::Array(regions);
    });
    has(&e, "zones[0].memory_region", "65 regions; at most 64");
    assert_eq!(e.len(), 1, "{}", ConfigErrors(e));
}

#[test]
fn overlapping_regions_in_either_space() {
    let e = broken(|v| {
        v["zones"][0]["memory_region"]
            .as_array_mut()
            .unwrap()
            .push(json!({"zone0_ipa": "0x90000000", "zonex_ipa": "0x7ffff000", "size": "0x2000"}));
    });
    has(
        &e,
        "zones[0].memory_region[1]",
        "overlaps zones[0].memory_region[0] in zonex_ipa space",
    );
    let e = broken(|v| {
        v["zones"][0]["memory_region"]
            .as_array_mut()
            .unwrap()
            .insert(
                0,
                json!({"zone0_ipa": "0x60000000", "zonex_ipa": "0x90000000", "size": "0x1000"}),
            );
    });
    has(
        &e,
        "zones[0].memory_region[1]",
        "overlaps zones[0].memory_region[0] in zone0_ipa space",
    );
    // Touching regions do not overlap.
    let img = image();
    let mut v = seed(&img);
    v["zones"][0]["memory_region"]
        .as_array_mut()
        .unwrap()
        .push(json!({"zone0_ipa": "0x80000000", "zonex_ipa": "0x80000000", "size": "0x1000"}));
    ok(&v);
}

#[test]
fn zone0_ipa_zero_is_the_bridge_page() {
    let e = broken(|v| v["zones"][0]["memory_region"][0]["zone0_ipa"] = json!("0"));
    has(
        &e,
        "zones[0].memory_region[0].zone0_ipa",
        "offset 0 is the bridge page",
    );
}

#[test]
fn unaligned_addresses() {
    let e = broken(|v| v["zones"][0]["memory_region"][0]["zone0_ipa"] = json!("0x50000010"));
    has(
        &e,
        "zones[0].memory_region[0].zone0_ipa",
        "0x50000010 is not page aligned",
    );
    let e = broken(|v| v["zones"][0]["memory_region"][0]["zonex_ipa"] = json!("0x50000800"));
    has(
        &e,
        "zones[0].memory_region[0].zonex_ipa",
        "not page aligned",
    );
}

#[test]
fn region_size_zero_and_overflow() {
    let e = broken(|v| v["zones"][0]["memory_region"][0]["size"] = json!(0));
    has(&e, "zones[0].memory_region[0].size", "must not be 0");
    let e = broken(|v| v["zones"][0]["memory_region"][0]["size"] = json!("0xffffffffffff0000"));
    has(&e, "zones[0].memory_region[0]", "overflows 64 bits");
}

#[test]
fn region_fields_required() {
    let e = broken(|v| v["zones"][0]["memory_region"][0] = json!({"size": "0x1000"}));
    has(&e, "zones[0].memory_region[0].zone0_ipa", "is required");
    has(&e, "zones[0].memory_region[0].zonex_ipa", "is required");
    let e = broken(|v| {
        v["zones"][0]
            .as_object_mut()
            .unwrap()
            .remove("memory_region");
    });
    has(&e, "zones[0].memory_region", "is required");
    let e = broken(|v| v["zones"][0]["memory_region"] = json!([]));
    has(&e, "zones[0].memory_region", "is empty");
}

#[test]
fn zero_addr_len_irq() {
    let e = broken(|v| {
        dev(v, 1)["addr"] = json!(0);
        dev(v, 1)["len"] = json!("0");
        dev(v, 1)["irq"] = json!("0x0");
    });
    has(&e, "zones[0].devices[1].addr", "must not be 0");
    has(&e, "zones[0].devices[1].len", "must not be 0");
    has(&e, "zones[0].devices[1].irq", "must not be 0");
}

#[test]
fn missing_addr() {
    let e = broken(|v| {
        dev(v, 0).as_object_mut().unwrap().remove("addr");
    });
    has(&e, "zones[0].devices[0].addr", "is required");
}

#[test]
fn len_smaller_than_the_register_block() {
    let e = broken(|v| dev(v, 1)["len"] = json!("0x10"));
    has(
        &e,
        "zones[0].devices[1].len",
        "0x10 is smaller than the 0x100-byte",
    );
}

#[test]
fn irq_must_fit_32_bits() {
    let e = broken(|v| dev(v, 1)["irq"] = json!("4294967296"));
    has(&e, "zones[0].devices[1].irq", "does not fit in 32 bits");
}

#[test]
fn device_range_overflow() {
    let e = broken(|v| dev(v, 1)["addr"] = json!("0xffffffffffffff00"));
    has(&e, "zones[0].devices[1]", "overflows 64 bits");
}

#[test]
fn overlapping_devices() {
    let e = broken(|v| dev(v, 2)["addr"] = json!("0xa003700"));
    has(
        &e,
        "zones[0].devices[2]",
        "MMIO range 0xa003700-0xa0038ff overlaps zones[0].devices[0] (0xa003600-0xa0037ff)",
    );
    has(&e, "zones[0].devices[2]", "overlaps zones[0].devices[1]");
}

#[test]
fn device_inside_ram() {
    let e = broken(|v| dev(v, 1)["addr"] = json!("0x7fffff00"));
    has(
        &e,
        "zones[0].devices[1]",
        "overlaps RAM zones[0].memory_region[0] (0x50000000-0x7fffffff)",
    );
}

#[test]
fn blk_img_missing_or_empty() {
    let e = broken(|v| {
        dev(v, 2).as_object_mut().unwrap().remove("img");
    });
    has(&e, "zones[0].devices[2].img", "is required");
    let e = broken(|v| dev(v, 2)["img"] = json!(""));
    has(&e, "zones[0].devices[2].img", "must not be empty");
    let e = broken(|v| dev(v, 2)["img"] = json!(7));
    has(&e, "zones[0].devices[2].img", "must be a string");
}

#[test]
fn blk_img_that_cannot_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let e = broken(|v| dev(v, 2)["img"] = json!(missing.to_str().unwrap()));
    has(&e, "zones[0].devices[2].img", "cannot open");
    has(
        &e,
        "zones[0].devices[2].img",
        "read-write: No such file or directory",
    );
    let e = broken(|v| {
        dev(v, 2)["img"] = json!(missing.to_str().unwrap());
        dev(v, 2)["readonly"] = json!(true);
    });
    has(
        &e,
        "zones[0].devices[2].img",
        "read-only: No such file or directory",
    );

    let e = broken(|v| dev(v, 2)["img"] = json!(dir.path().to_str().unwrap()));
    has(&e, "zones[0].devices[2].img", "is a directory");

    // Character devices (and FIFOs, whose open would block) are not disks.
    let e = broken(|v| dev(v, 2)["img"] = json!("/dev/null"));
    has(
        &e,
        "zones[0].devices[2].img",
        "neither a regular file nor a block device",
    );
}

#[test]
fn blk_readonly_mode_is_checked_by_opening() {
    let img = image();
    std::fs::set_permissions(img.path(), std::fs::Permissions::from_mode(0o444)).unwrap();
    // Root may write to anything; only check refusal where permissions apply.
    let writable = std::fs::OpenOptions::new()
        .write(true)
        .open(img.path())
        .is_ok();
    let mut v = seed(&img);
    if !writable {
        let e = errors(&v);
        has(&e, "zones[0].devices[2].img", "read-write");
        has(&e, "zones[0].devices[2].img", "Permission denied");
    }
    dev(&mut v, 2)["readonly"] = json!(true);
    let loaded = ok(&v);
    assert_eq!(
        loaded.config.zones[0].devices[2].kind,
        DeviceConfig::Blk {
            img: img.path().to_path_buf(),
            readonly: true
        }
    );
    assert!(loaded.config.describe().contains("read-only"));
}

#[test]
fn readonly_must_be_a_boolean() {
    let e = broken(|v| dev(v, 2)["readonly"] = json!("true"));
    has(
        &e,
        "zones[0].devices[2].readonly",
        "must be true or false, not a string",
    );
}

#[test]
fn mac_of_five_bytes() {
    let e = broken(|v| dev(v, 0)["mac"] = json!([2, 0, 0, 0, 1]));
    has(&e, "zones[0].devices[0].mac", "has 5 items");
    let e = broken(|v| dev(v, 0)["mac"] = json!("02:00:00:00:01:01"));
    has(&e, "zones[0].devices[0].mac", "must be an array");
}

#[test]
fn mac_byte_256() {
    let e = broken(|v| dev(v, 0)["mac"][5] = json!("256"));
    has(
        &e,
        "zones[0].devices[0].mac[5]",
        "256 does not fit in 8 bits",
    );
}

#[test]
fn multicast_mac() {
    let e = broken(|v| dev(v, 0)["mac"][0] = json!("0x03"));
    has(
        &e,
        "zones[0].devices[0].mac",
        "03:00:00:00:01:01 is a multicast address",
    );
}

#[test]
fn bad_tap_names() {
    for (tap, reason) in [
        ("", "must not be empty"),
        ("tap-name-too-long", "at most 15"),
        ("tap/0", "must not contain"),
        ("tap 0", "must not contain"),
        ("tap\u{0}", "must not contain"),
        ("..", "not a valid interface name"),
        // The kernel would replace "%d" by a number: another interface than configured.
        ("tap%d", "must not contain"),
        ("tap:1", "must not contain"),
        ("tap\t", "must not contain"),
    ] {
        let e = broken(|v| dev(v, 0)["tap"] = json!(tap));
        has(&e, "zones[0].devices[0].tap", reason);
    }
    let e = broken(|v| {
        dev(v, 0).as_object_mut().unwrap().remove("tap");
    });
    has(&e, "zones[0].devices[0].tap", "is required");
}

#[test]
fn gpu_and_scmi_enabled_are_refused() {
    for ty in ["gpu", "scmi"] {
        let e = broken(|v| dev(v, 1)["type"] = json!(ty));
        has(
            &e,
            "zones[0].devices[1].type",
            &format!("\"{ty}\" is not supported by hvisor-broker"),
        );
    }
}

#[test]
fn disabled_gpu_is_accepted() {
    let img = image();
    let mut v = seed(&img);
    v["zones"][0]["devices"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "type": "gpu", "status": "disable", "addr": "0xa004000", "len": "0x200",
            "irq": 79, "width": 1280, "height": 800
        }));
    let loaded = ok(&v);
    assert_eq!(loaded.config.zones[0].devices.len(), 3);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn disabled_device_is_not_validated() {
    let img = image();
    let mut v = seed(&img);
    *dev(&mut v, 2) = json!({"type": "blk", "status": "disable", "addr": "junk"});
    let loaded = ok(&v);
    assert_eq!(loaded.config.zones[0].devices.len(), 2);
}

#[test]
fn unknown_type() {
    let e = broken(|v| dev(v, 1)["type"] = json!("sound"));
    has(
        &e,
        "zones[0].devices[1].type",
        "unknown device type \"sound\"",
    );
    let e = broken(|v| {
        dev(v, 1).as_object_mut().unwrap().remove("type");
    });
    has(&e, "zones[0].devices[1].type", "is required");
}

#[test]
fn missing_or_bad_status() {
    let e = broken(|v| {
        dev(v, 1).as_object_mut().unwrap().remove("status");
    });
    has(&e, "zones[0].devices[1].status", "is required");
    let e = broken(|v| dev(v, 1)["status"] = json!("on"));
    has(
        &e,
        "zones[0].devices[1].status",
        "must be \"enable\" or \"disable\"",
    );
}

#[test]
fn nine_devices() {
    let e = broken(|v| {
        let devs = v["zones"][0]["devices"].as_array_mut().unwrap();
        for i in 0..6u64 {
            devs.push(json!({
                "type": "console", "status": "enable",
                "addr": format!("{:#x}", 0xb000000 + i * 0x200), "len": "0x200", "irq": 80 + i
            }));
        }
    });
    has(&e, "zones[0].devices[8]", "more than 8 enabled devices");
    assert_eq!(e.len(), 1, "{}", ConfigErrors(e));
}

#[test]
fn eight_devices_across_zones_are_fine() {
    let img = image();
    let mut v = seed(&img);
    let mut z2 = v["zones"][0].clone();
    z2["id"] = json!(2);
    z2["memory_region"][0]["zone0_ipa"] = json!("0x80000000");
    z2["devices"].as_array_mut().unwrap().truncate(2);
    z2["devices"][0]["type"] = json!("console");
    z2["devices"][0].as_object_mut().unwrap().remove("tap");
    z2["devices"][0].as_object_mut().unwrap().remove("mac");
    let mut z3 = z2.clone();
    z3["id"] = json!(3);
    z3["memory_region"][0]["zone0_ipa"] = json!("0xb0000000");
    z3["devices"].as_array_mut().unwrap().pop();
    v["zones"].as_array_mut().unwrap().extend([z2, z3]);
    // 3 + 2 + 1 = 6 enabled.
    ok(&v);
}

#[test]
fn trailing_garbage_in_a_number() {
    let e = broken(|v| dev(v, 1)["addr"] = json!("0x5000zz"));
    has(
        &e,
        "zones[0].devices[1].addr",
        "\"0x5000zz\" is not a number",
    );
    let e = broken(|v| dev(v, 1)["addr"] = json!(""));
    has(
        &e,
        "zones[0].devices[1].addr",
        "empty string is not a number",
    );
    let e = broken(|v| dev(v, 1)["irq"] = json!(76.5));
    has(&e, "zones[0].devices[1].irq", "76.5 is not an integer");
    let e = broken(|v| dev(v, 1)["irq"] = json!([76]));
    has(&e, "zones[0].devices[1].irq", "not an array");
}

#[test]
fn negative_numbers() {
    let e = broken(|v| dev(v, 1)["irq"] = json!(-76));
    has(&e, "zones[0].devices[1].irq", "-76 is negative");
    let e = broken(|v| v["zones"][0]["memory_region"][0]["size"] = json!("-0x1000"));
    has(&e, "zones[0].memory_region[0].size", "is negative");
}

#[test]
fn nothing_to_serve() {
    let e = broken(|v| {
        for i in 0..3 {
            dev(v, i)["status"] = json!("disable");
        }
    });
    has(&e, "zones", "nothing to serve: no enabled device");
    let e = broken(|v| v["zones"][0]["devices"] = json!([]));
    has(&e, "zones", "nothing to serve");
}

#[test]
fn all_errors_are_collected() {
    let e = broken(|v| {
        v["zones"][0]["id"] = json!(40);
        dev(v, 0)["mac"] = json!([1, 2]);
        dev(v, 1)["len"] = json!(1);
        dev(v, 2)["img"] = json!("");
    });
    assert_eq!(e.len(), 4, "{}", ConfigErrors(e));
    let shown = ConfigErrors(e).to_string();
    assert_eq!(shown.lines().count(), 4);
    assert!(
        shown.starts_with("zones[0].id: zone id 40 is not below 32\n"),
        "{shown}"
    );
}

#[test]
fn zones_may_reuse_addr_and_irq() {
    let img = image();
    let img2 = image();
    let mut v = seed(&img);
    let mut z2 = v["zones"][0].clone();
    z2["id"] = json!(2);
    z2["memory_region"][0]["zone0_ipa"] = json!("0x80000000");
    z2["devices"] = json!([v["zones"][0]["devices"][2].clone()]);
    z2["devices"][0]["img"] = json!(img2.path().to_str().unwrap());
    v["zones"].as_array_mut().unwrap().push(z2);
    let c = ok(&v).config;
    assert_eq!(c.zones[1].id, 2);
    assert_eq!(c.zones[1].devices[0].addr, c.zones[0].devices[2].addr);
    assert_eq!(c.zones[1].devices[0].irq, 78);
    assert_eq!(c.zones[1].devices[0].zone, 2);
    assert_eq!(c.zones[1].devices[0].json_path, "zones[1].devices[0]");
}

#[test]
fn unknown_keys_warn() {
    let img = image();
    let mut v = seed(&img);
    v["comment"] = json!("x");
    v["zones"][0]["name"] = json!("linux2");
    v["zones"][0]["memory_region"][0]["flags"] = json!(0);
    dev(&mut v, 1)["foo"] = json!(1);
    dev(&mut v, 1)["img"] = json!("x");
    dev(&mut v, 0)["width"] = json!(1);
    dev(&mut v, 0)["readonly"] = json!(true);
    let w = ok(&v).warnings;
    for expected in [
        "comment: unknown key, ignored",
        "zones[0].name: unknown key, ignored",
        "zones[0].memory_region[0].flags: unknown key, ignored",
        "zones[0].devices[1].foo: unknown key, ignored",
        "zones[0].devices[1].img: unknown key for a console device, ignored",
        "zones[0].devices[0].width: unknown key for a net device, ignored",
        "zones[0].devices[0].readonly: unknown key for a net device, ignored",
    ] {
        assert!(
            w.iter().any(|x| x == expected),
            "missing {expected:?} in {w:?}"
        );
    }
    assert_eq!(w.len(), 7, "{w:?}");
}

#[test]
fn wrong_json_types() {
    let e = broken(|v| v["zones"][0] = json!(1));
    has(&e, "zones[0]", "must be an object, not a number");
    let e = broken(|v| v["zones"][0]["devices"] = json!({}));
    has(&e, "zones[0].devices", "must be an array, not an object");
    let e = broken(|v| *dev(v, 1) = json!("console"));
    has(&e, "zones[0].devices[1]", "must be an object, not a string");
    let e = broken(|v| dev(v, 1)["type"] = json!(null));
    has(&e, "zones[0].devices[1].type", "must be a string, not null");
}

#[test]
fn hostile_inputs_do_not_panic() {
    for text in [
        "null",
        "1",
        "\"zones\"",
        r#"{"zones": [null, 1, "x", [], {}]}"#,
        r#"{"zones": [{"id": 1e400}]}"#,
        r#"{"zones": [{"id": -0.0, "memory_region": [{}], "devices": [{}, {"type": 1}]}]}"#,
        r#"{"zones": [{"id": "0x", "memory_region": [null], "devices": [null]}]}"#,
        r#"{"zones": [{"id": 1, "memory_region": [], "devices": [{"type": "net", "status": "enable", "mac": [null, {}, [], true, "x", -1]}]}]}"#,
        &"[".repeat(10_000),
    ] {
        let _ = parse(text);
    }
}

#[test]
fn net_and_console_extensions() {
    let v = serde_json::json!({ "zones": [{ "id": 1,
        "memory_region": [{ "zone0_ipa": "0x50000000", "zonex_ipa": "0x50000000", "size": "0x1000000" }],
        "devices": [
            { "type": "net", "addr": "0xa003600", "len": "0x200", "irq": 75, "tap": "tap0",
              "mac": [2, 0, 0, 0, 1, 1], "mtu": 9000, "status": "enable" },
            { "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76, "status": "enable",
              "pty_link": "/run/hvisor/zone1-console", "cols": "132", "rows": 43 }
        ] }] });
    let loaded = parse(&v.to_string()).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let d = &loaded.config.zones[0].devices;
    assert_eq!(
        d[0].kind,
        DeviceConfig::Net {
            tap: "tap0".into(),
            mac: [2, 0, 0, 0, 1, 1],
            mtu: 9000
        }
    );
    assert_eq!(
        d[1].kind,
        DeviceConfig::Console {
            pty_link: Some("/run/hvisor/zone1-console".into()),
            cols: 132,
            rows: 43
        }
    );
    for mtu in [67, 70000] {
        let mut bad = v.clone();
        bad["zones"][0]["devices"][0]["mtu"] = serde_json::json!(mtu);
        let e = parse(&bad.to_string()).unwrap_err().to_string();
        assert!(e.contains("zones[0].devices[0].mtu"), "{e}");
    }
    let mut bad = v.clone();
    bad["zones"][0]["devices"][1]["pty_link"] = serde_json::json!("console");
    let e = parse(&bad.to_string()).unwrap_err().to_string();
    assert!(
        e.contains("zones[0].devices[1].pty_link: must be an absolute path"),
        "{e}"
    );
    let mut bad = v.clone();
    bad["zones"][0]["devices"][1]["cols"] = serde_json::json!(0);
    let e = parse(&bad.to_string()).unwrap_err().to_string();
    assert!(e.contains("zones[0].devices[1].cols"), "{e}");
}

/// A second zone with one region and, optionally, one device.
fn add_zone(v: &mut Value, id: u32, zone0_ipa: &str, device: Option<Value>) {
    let devices: Vec<Value> = device.into_iter().collect();
    v["zones"].as_array_mut().unwrap().push(json!({
        "id": id,
        "memory_region": [{ "zone0_ipa": zone0_ipa, "zonex_ipa": "0x50000000", "size": "0x10000000" }],
        "devices": devices
    }));
}

#[test]
fn ram_of_two_zones_must_not_overlap_in_zone0_space() {
    // Zone 2's RAM starts inside zone 1's (0x50000000-0x7fffffff as the root zone sees it):
    // zone 2's workers would map zone 1's memory.
    let e = broken(|v| add_zone(v, 2, "0x7ffff000", None));
    has(
        &e,
        "zones[1].memory_region[0]",
        "overlaps zones[0].memory_region[0] in zone0_ipa space",
    );
    // The same zonex_ipa in two zones is normal: each zone has its own address space.
    let img = image();
    let mut v = seed(&img);
    add_zone(&mut v, 2, "0x80000000", None);
    ok(&v);
}

#[test]
fn region_size_must_be_whole_pages() {
    let e = broken(|v| v["zones"][0]["memory_region"][0]["size"] = json!("0x30000001"));
    has(
        &e,
        "zones[0].memory_region[0].size",
        "0x30000001 is not a whole number of pages",
    );
    let e = broken(|v| v["zones"][0]["memory_region"][0]["size"] = json!("0x800"));
    has(&e, "zones[0].memory_region[0].size", "not a whole number");
}

#[test]
fn ranges_beyond_the_physical_address_width() {
    let e = broken(|v| {
        v["zones"][0]["memory_region"][0] = json!({
            "zone0_ipa": "0xffffffff0000", "zonex_ipa": "0x50000000", "size": "0x10000000000000"
        })
    });
    has(
        &e,
        "zones[0].memory_region[0]",
        "zone0_ipa 0xffffffff0000 + size 0x10000000000000 ends beyond the 52-bit",
    );
    let e = broken(|v| v["zones"][0]["memory_region"][0]["zonex_ipa"] = json!("0xfffffff000000"));
    has(&e, "zones[0].memory_region[0]", "zonex_ipa 0xfffffff000000");
    let e = broken(|v| dev(v, 1)["addr"] = json!("0xfffffffffff00"));
    has(&e, "zones[0].devices[1]", "ends beyond the 52-bit");
    // Up to the last byte below 2^52 is fine.
    let img = image();
    let mut v = seed(&img);
    dev(&mut v, 1)["addr"] = json!("0xffffffffffe00");
    ok(&v);
}

#[test]
fn duplicate_keys_are_refused_wherever_they_are() {
    let img = image();
    let text = seed(&img).to_string();
    // hvisor-tool's parser takes the first "img", a JSON library may take the last.
    let dup = text.replacen("\"img\":", "\"img\":\"/nonexistent\",\"img\":", 1);
    assert_ne!(dup, text);
    has(
        &errors_text(&dup),
        "zones[0].devices[2].img",
        "duplicate key",
    );
    let dup = text.replacen('{', "{\"zones\":[],", 1);
    has(&errors_text(&dup), "zones", "duplicate key");
    let dup = text.replacen("\"size\":", "\"size\":\"0x1000\",\"size\":", 1);
    has(
        &errors_text(&dup),
        "zones[0].memory_region[0].size",
        "duplicate key",
    );
    // Even under keys we ignore.
    let dup = text.replacen("\"irq\":", "\"x\":{\"a\":[{\"b\":1,\"b\":1}]},\"irq\":", 1);
    has(
        &errors_text(&dup),
        "zones[0].devices[0].x.a[0].b",
        "duplicate key",
    );
}

#[test]
fn all_zero_mac() {
    let e = broken(|v| dev(v, 0)["mac"] = json!([0, 0, 0, 0, 0, 0]));
    has(&e, "zones[0].devices[0].mac", "all zero");
}

#[test]
fn one_pty_link_for_two_consoles() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("console");
    // The same place through "." and a symlinked directory.
    symlink(dir.path(), dir.path().join("alias")).unwrap();
    let same = format!("{}/./alias/console", dir.path().display());
    let console = json!({ "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76,
                          "status": "enable", "pty_link": same });
    let e = broken(|v| {
        dev(v, 1)["pty_link"] = json!(link.to_str().unwrap());
        add_zone(v, 2, "0x80000000", Some(console));
    });
    has(
        &e,
        "zones[1].devices[0].pty_link",
        "same link as zones[0].devices[1].pty_link",
    );
}

/// A directory owned by an unprivileged user, below a fresh root-owned one.
fn user_dir() -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let user = top.path().join("user");
    std::fs::create_dir(&user).unwrap();
    chown(&user, Some(65534), Some(65534)).unwrap();
    (top, user)
}

fn img_errors(path: &std::path::Path) -> Vec<ConfigError> {
    broken(|v| dev(v, 2)["img"] = json!(path.to_str().unwrap()))
}

#[test]
fn img_below_a_directory_another_user_controls() {
    let (_top, user) = user_dir();
    let img = user.join("disk.img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    has(
        &img_errors(&img),
        "zones[0].devices[2].img",
        "owned by uid 65534",
    );

    // Root's, but writable by its group.
    chown(&user, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o775)).unwrap();
    has(
        &img_errors(&img),
        "zones[0].devices[2].img",
        "writable by group or others",
    );

    // Sticky like /tmp: fine on the way to a directory of root's, not as the last one.
    std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o1777)).unwrap();
    has(&img_errors(&img), "zones[0].devices[2].img", "sticky");
    let inner = user.join("root");
    std::fs::create_dir(&inner).unwrap();
    std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(inner.join("disk.img"), [0u8; 4096]).unwrap();
    let img = image();
    let mut v = seed(&img);
    dev(&mut v, 2)["img"] = json!(inner.join("disk.img").to_str().unwrap());
    ok(&v);
}

#[test]
fn img_symlinks() {
    let (top, user) = user_dir();
    let secret = top.path().join("secret");
    std::fs::write(&secret, [0u8; 4096]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The attack: a link in a directory a user owns, pointing at a root-only file.
    let swapped = user.join("disk.img");
    symlink(&secret, &swapped).unwrap();
    has(
        &img_errors(&swapped),
        "zones[0].devices[2].img",
        "owned by uid 65534",
    );
    // A link to the user's directory from a safe place is no better.
    let via = top.path().join("via");
    symlink(&user, &via).unwrap();
    has(
        &img_errors(&via.join("disk.img")),
        "zones[0].devices[2].img",
        "owned by uid 65534",
    );
    // A safe link to a target on a safe path is accepted (relative targets too).
    let good = top.path().join("good.img");
    symlink("secret", &good).unwrap();
    let img = image();
    let mut v = seed(&img);
    dev(&mut v, 2)["img"] = json!(good.to_str().unwrap());
    ok(&v);
    // ... but not one whose target lies below the user's directory.
    std::fs::write(user.join("own.img"), [0u8; 4096]).unwrap();
    let bad = top.path().join("bad.img");
    symlink(user.join("own.img"), &bad).unwrap();
    has(
        &img_errors(&bad),
        "zones[0].devices[2].img",
        "owned by uid 65534",
    );
}

fn link_errors(link: &std::path::Path) -> Vec<ConfigError> {
    broken(|v| dev(v, 1)["pty_link"] = json!(link.to_str().unwrap()))
}

#[test]
fn pty_link_places() {
    let (top, user) = user_dir();
    has(
        &link_errors(&user.join("console")),
        "zones[0].devices[1].pty_link",
        "owned by uid 65534",
    );
    // Below a missing directory of the user's directory: we would create it there.
    has(
        &link_errors(&user.join("run/console")),
        "zones[0].devices[1].pty_link",
        "owned by uid 65534",
    );
    // Something that is not a link of ours is never replaced.
    let file = top.path().join("file");
    std::fs::write(&file, "x").unwrap();
    has(
        &link_errors(&file),
        "zones[0].devices[1].pty_link",
        "exists and is not a symlink",
    );
    let other = top.path().join("other");
    symlink("/etc/passwd", &other).unwrap();
    has(
        &link_errors(&other),
        "zones[0].devices[1].pty_link",
        "not a pty link",
    );
    has(
        &link_errors(&top.path().join("a/../console")),
        "zones[0].devices[1].pty_link",
        "'..'",
    );
    // A stale link to a pty is ours to replace; missing directories are ours to make.
    let stale = top.path().join("stale");
    symlink("/dev/pts/4242", &stale).unwrap();
    for link in [stale, top.path().join("new/dir/console")] {
        let img = image();
        let mut v = seed(&img);
        dev(&mut v, 1)["pty_link"] = json!(link.to_str().unwrap());
        ok(&v);
    }
}

#[test]
fn rate_limits_are_read_per_flow() {
    let img = image();
    let mut v = seed(&img);
    dev(&mut v, 2)["rate_limit"] = json!({ "bytes_per_sec": 20971520, "burst_bytes": "0x100000" });
    dev(&mut v, 0)["rx_rate_limit"] = json!({ "ops_per_sec": 1000 });
    dev(&mut v, 0)["tx_rate_limit"] =
        json!({ "bytes_per_sec": 1000000, "ops_per_sec": 500, "burst_ops": 50 });
    let loaded = ok(&v);
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let d = &loaded.config.zones[0].devices;
    assert_eq!(
        d[2].rate_limits,
        [(
            Flow::Io,
            Limit {
                bytes: Some(Bucket {
                    rate: 20971520,
                    burst: 1 << 20
                }),
                ops: None
            }
        )]
    );
    let rx = Limit {
        bytes: None,
        ops: Some(Bucket {
            rate: 1000,
            burst: 100,
        }),
    };
    let tx = Limit {
        bytes: Some(Bucket {
            rate: 1_000_000,
            burst: 100_000,
        }),
        ops: Some(Bucket {
            rate: 500,
            burst: 50,
        }),
    };
    assert_eq!(d[0].rate_limits, [(Flow::Rx, rx), (Flow::Tx, tx)]);
    assert!(d[1].rate_limits.is_empty());
    assert!(loaded
        .config
        .describe()
        .contains("rate limit io: 20971520 bytes/s (burst 1048576)"));
}

#[test]
fn bad_rate_limits_name_the_device_and_key() {
    let p = "zones[0].devices[2].rate_limit";
    let set = |limit: Value| move |v: &mut Value| dev(v, 2)["rate_limit"] = limit;
    has(&broken(set(json!(5))), p, "must be an object");
    has(&broken(set(json!({}))), p, "sets no limit");
    has(
        &broken(set(json!({ "bytes_per_sec": 0 }))),
        &format!("{p}.bytes_per_sec"),
        "outside 1..=",
    );
    has(
        &broken(set(json!({ "ops_per_sec": "1e9" }))),
        &format!("{p}.ops_per_sec"),
        "",
    );
    has(
        &broken(set(json!({ "bytes_per_sec": 1u64 << 50 }))),
        &format!("{p}.bytes_per_sec"),
        "outside",
    );
    has(
        &broken(set(json!({ "bytes_per_sec": 1000, "burst_bytes": 0 }))),
        &format!("{p}.burst_bytes"),
        "outside",
    );
    has(
        &broken(set(json!({ "burst_ops": 10 }))),
        &format!("{p}.burst_ops"),
        "needs ops_per_sec",
    );
    has(
        &broken(set(json!({ "bytes_per_sec": 1000, "bytes_per_second": 1 }))),
        &format!("{p}.bytes_per_second"),
        "unknown rate limit key",
    );
    // A net device's limits are per direction; `rate_limit` there is no key of ours.
    let img = image();
    let mut v = seed(&img);
    dev(&mut v, 0)["rate_limit"] = json!({ "bytes_per_sec": 1000 });
    let loaded = ok(&v);
    assert!(loaded.config.zones[0].devices[0].rate_limits.is_empty());
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("devices[0].rate_limit: unknown key for a net device")),
        "{:?}",
        loaded.warnings
    );
    has(
        &broken(|v| dev(v, 0)["tx_rate_limit"] = json!({ "ops_per_sec": -1 })),
        "zones[0].devices[0].tx_rate_limit.ops_per_sec",
        "",
    );
}

/// Zones added beside running ones share ids, RAM, pty links and the bridge's device slots.
#[test]
fn additions_are_checked_against_the_running_zones() {
    let img = image();
    let running = ok(&seed(&img)).config;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("add.json");
    let addition = |edit: &dyn Fn(&mut Value)| {
        let mut z = json!({
            "id": 2,
            "memory_region": [{ "zone0_ipa": "0x90000000", "zonex_ipa": "0x50000000", "size": "0x1000000" }],
            "devices": [{ "type": "console", "addr": "0xa003800", "len": "0x200", "irq": 76, "status": "enable" }]
        });
        edit(&mut z);
        std::fs::write(&file, json!({ "zones": [z] }).to_string()).unwrap();
        load_addition(&file, &running)
    };
    let added = addition(&|_| {}).expect("a zone apart from the running one");
    assert_eq!(added.config.zones[0].id, 2);
    let e = addition(&|z| z["id"] = json!(1)).unwrap_err().0;
    has(
        &e,
        "zones[0].id",
        "duplicate zone id 1 (also running zone 1)",
    );
    let e = addition(&|z| z["memory_region"][0]["zone0_ipa"] = json!("0x60000000"))
        .unwrap_err()
        .0;
    has(
        &e,
        "zones[0].memory_region[0]",
        "overlaps running zone 1 memory_region[0] in zone0_ipa space",
    );
    let e = addition(&|z| {
        let one = z["devices"][0].clone();
        z["devices"] = json!((0..6)
            .map(|i| {
                let mut d = one.clone();
                d["addr"] = json!(format!("{:#x}", 0xa00_0000 + i * 0x200));
                d
            })
            .collect::<Vec<_>>());
    })
    .unwrap_err()
    .0;
    has(
        &e,
        "zones[0].devices[5]",
        "more than 8 enabled devices in total",
    );
}
