//! The Debian packages of scripts/package.sh, installed with `dpkg -i` into a scratch root:
//! their binaries are static executables of their architecture that run (under qemu-user),
//! the unit file passes `systemd-analyze verify` there, the example config is valid, and the
//! man pages render with `man -l`. Run with HVISOR_DEB_DIR naming the packages' directory
//! (`.ci/run` does, after building them); skipped without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use hvisor_tests::Scratch;

const PROGRAMS: [&str; 4] = [
    "hvisor-broker",
    "hvisor-worker-blk",
    "hvisor-worker-net",
    "hvisor-worker-console",
];

/// (architecture, package) for each .deb in HVISOR_DEB_DIR.
fn packages() -> Option<Vec<(String, PathBuf)>> {
    let Some(dir) = std::env::var_os("HVISOR_DEB_DIR") else {
        eprintln!("skipped: set HVISOR_DEB_DIR to the directory of scripts/package.sh's output");
        return None;
    };
    let mut debs = Vec::new();
    for e in std::fs::read_dir(&dir).expect("HVISOR_DEB_DIR").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(arch) = name
            .strip_prefix("hvisor-broker_")
            .and_then(|n| n.strip_suffix(".deb"))
            .and_then(|n| n.rsplit_once('_'))
            .map(|(_, a)| a.to_string())
        {
            debs.push((arch, e.path()));
        }
    }
    debs.sort();
    assert!(!debs.is_empty(), "no hvisor-broker_*.deb in {dir:?}");
    Some(debs)
}

/// Runs `cmd`; returns stdout + stderr, asserting success.
fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {}\n{text}", out.status);
    text
}

/// An empty root with a dpkg database, and `deb` installed into it.
fn install(s: &Scratch, deb: &Path) -> PathBuf {
    let root = s.path("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    ok(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-architecture", "--force-not-root", "-i"])
        .arg(deb));
    root
}

fn qemu(arch: &str) -> &'static str {
    match arch {
        "arm64" => "qemu-aarch64-static",
        "riscv64" => "qemu-riscv64-static",
        other => panic!("unexpected architecture {other}"),
    }
}

#[test]
fn packages_install_with_static_binaries_that_run() {
    let Some(debs) = packages() else { return };
    for (arch, deb) in debs {
        let s = Scratch::new();
        let root = install(&s, &deb);
        let elf = if arch == "arm64" {
            "ARM aarch64"
        } else {
            "RISC-V"
        };
        for p in PROGRAMS {
            let f = root.join("usr/lib/hvisor-broker").join(p);
            let info = ok(Command::new("file").arg("-b").arg(&f));
            assert!(
                info.contains(elf) && info.contains("statically linked"),
                "{arch} {p}: {info}"
            );
        }
        // The command on PATH is the broker, whose workers are found beside its target.
        let link = std::fs::read_link(root.join("usr/sbin/hvisor-broker")).unwrap();
        assert_eq!(link, Path::new("../lib/hvisor-broker/hvisor-broker"));
        let broker = root.join("usr/sbin/hvisor-broker");
        let version = ok(Command::new(qemu(&arch)).arg(&broker).arg("--version"));
        assert!(version.starts_with("hvisor-broker "), "{version}");
        // The example config is valid (its image made where a relative path points).
        std::fs::write(s.path("rootfs2.ext4"), vec![0u8; 1 << 20]).unwrap();
        let said = ok(Command::new(qemu(&arch))
            .arg(&broker)
            .arg("check")
            .arg(root.join("etc/hvisor-broker/virtio_cfg.json"))
            .current_dir(s.dir.path()));
        assert!(said.contains("blk"), "{said}");
        // dpkg knows the config and the init script as the admin's files.
        let status = ok(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["--status", "hvisor-broker"]));
        for f in [
            "/etc/hvisor-broker/virtio_cfg.json",
            "/etc/init.d/hvisor-broker",
        ] {
            assert!(
                status.contains(&format!(" {f} ")),
                "{f} not a conffile:\n{status}"
            );
        }
        assert!(
            status.contains(&format!("Architecture: {arch}")),
            "{status}"
        );
        for f in [
            "usr/share/bash-completion/completions/hvisor-broker",
            "usr/share/zsh/vendor-completions/_hvisor-broker",
            "usr/share/fish/vendor_completions.d/hvisor-broker.fish",
            "usr/share/doc/hvisor-broker/copyright",
            "usr/share/doc/hvisor-broker/migrating-from-hvisor-tool.md",
        ] {
            assert!(root.join(f).is_file(), "{arch}: no {f}");
        }
        let init = root.join("etc/init.d/hvisor-broker");
        ok(Command::new("sh").arg("-n").arg(&init));
    }
}

#[test]
fn the_packaged_man_pages_render() {
    let Some(debs) = packages() else { return };
    for (arch, deb) in debs {
        let s = Scratch::new();
        let root = install(&s, &deb);
        let dir = root.join("usr/share/man/man8");
        let mut pages: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        pages.sort();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in ["hvisor-broker.8.gz", "hvisor-broker-start.8.gz"] {
            assert!(names.iter().any(|n| n == want), "{arch}: {names:?}");
        }
        for page in &pages {
            // groff's warnings (bad requests, unknown escapes) go to stderr: none allowed
            let out = Command::new("man")
                .args(["--warnings", "-l"])
                .arg(page)
                .env("MANWIDTH", "80")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let warnings = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{page:?}: {warnings}");
            assert!(warnings.trim().is_empty(), "{page:?}: {warnings}");
            assert!(
                text.contains("NAME") && text.contains("SYNOPSIS"),
                "{page:?}:\n{text}"
            );
        }
        let start = ok(Command::new("man")
            .arg("-l")
            .arg(dir.join("hvisor-broker-start.8.gz"))
            .env("MANWIDTH", "200"));
        assert!(start.contains("--ready-file"), "{start}");
    }
}

#[test]
fn the_packaged_unit_passes_systemd_analyze_verify() {
    let Some(debs) = packages() else { return };
    for (arch, deb) in debs {
        let s = Scratch::new();
        let root = install(&s, &deb);
        // the system's own units, for the targets the unit names
        let units = root.join("usr/lib/systemd");
        ok(Command::new("cp")
            .args(["-rn", "/lib/systemd/system"])
            .arg(&units));
        // ExecReload's kill, which the package does not ship
        let kill = root.join("bin/kill");
        std::fs::create_dir_all(kill.parent().unwrap()).unwrap();
        std::fs::write(&kill, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&kill, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // `man:` links are looked up in the packaged pages
        let out = ok(Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(units.join("system/hvisor-broker.service"))
            .env("MANPATH", root.join("usr/share/man")));
        assert!(out.trim().is_empty(), "{arch}: {out}");
    }
}
