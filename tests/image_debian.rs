//! `vmlab image build`: the Debian base image is built (or found in the
//! cache, as `.ci/setup` leaves it), is a clean qcow2 holding a clean ext4
//! filesystem with vmlab's init and no per-VM identity, and a second build
//! is a cache hit. Needs root (debootstrap), e2fsprogs and qemu-img; a
//! missing one fails the test with its name.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn vmlab(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmlab"));
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("vmlab runs")
}

fn tool(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("{name} cannot run ({e}): run .ci/setup (e2fsprogs, qemu-utils)")
        })
}

/// The base image, built once for this test binary (or the cached one).
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let out = vmlab(&["image", "build"], &[]);
        assert!(
            out.status.success(),
            "vmlab image build failed (it needs root and debootstrap: run .ci/setup as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(path.is_file(), "{} printed but missing", path.display());
        path
    })
}

/// A raw copy of the base's filesystem, for e2fsprogs.
fn raw() -> &'static Path {
    static RAW: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = RAW.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("rootfs.raw");
        let out = tool(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                base().to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "qemu-img convert: {out:?}");
        (dir, raw)
    });
    path
}

/// Runs one debugfs request against the raw copy; stdout, and stderr
/// without the version banner.
fn debugfs(request: &str) -> (String, String) {
    let out = tool("debugfs", &["-R", request, raw().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("debugfs "))
        .collect::<Vec<_>>()
        .join("\n");
    (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
}

fn cat(path: &str) -> String {
    let (stdout, stderr) = debugfs(&format!("cat {path}"));
    assert!(stderr.is_empty(), "{path}: {stderr}");
    stdout
}

/// (mode, uid) of `path` in the image, or None if missing.
fn stat(path: &str) -> Option<(u32, u32)> {
    let (stdout, stderr) = debugfs(&format!("stat {path}"));
    if stderr.contains("not found") {
        return None;
    }
    let mode = stdout.split("Mode:").nth(1)?.split_whitespace().next()?;
    let uid = stdout.split("User:").nth(1)?.split_whitespace().next()?;
    Some((u32::from_str_radix(mode, 8).ok()?, uid.parse().ok()?))
}

fn ls(dir: &str) -> Vec<String> {
    let (stdout, stderr) = debugfs(&format!("ls -p {dir}"));
    assert!(stderr.is_empty(), "{dir}: {stderr}");
    // -p: /inode/mode/uid/gid/name/size/
    stdout
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

#[test]
fn base_is_a_clean_qcow2_with_a_clean_filesystem() {
    let out = tool("qemu-img", &["check", base().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("No errors were found"));
    let out = tool("e2fsck", &["-f", "-n", raw().to_str().unwrap()]);
    assert!(out.status.success(), "e2fsck: {out:?}");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base().with_file_name("image.json")).unwrap(),
    )
    .unwrap();
    let dir = base()
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy();
    assert_eq!(dir, format!("debian-{}", index["recipe"].as_str().unwrap()));
    assert_eq!(index["suite"], "bookworm");
    assert!(index["virtual_size"].as_u64().unwrap() >= 1 << 30);
}

#[test]
fn base_boots_vmlab_init_with_sshd_and_dhcp() {
    let (mode, uid) = stat("/sbin/vmlab-init").expect("/sbin/vmlab-init exists");
    assert_eq!((mode & 0o777, uid), (0o755, 0), "executable, root's");
    assert!(cat("/sbin/vmlab-init").starts_with("#!/bin/sh"));
    for exe in [
        "/usr/sbin/sshd",
        "/usr/bin/busybox",
        "/etc/vmlab/udhcpc.script",
        "/usr/bin/ssh-keygen",
        "/usr/bin/ip",
        "/usr/bin/curl",
        "/usr/bin/nano",
        "/usr/bin/base64",
        "/usr/bin/setsid",
    ] {
        let (mode, _) = stat(exe).unwrap_or_else(|| panic!("{exe} missing"));
        assert_eq!(mode & 0o111, 0o111, "{exe} executable");
    }
    assert!(stat("/etc/ssl/certs/ca-certificates.crt").is_some());
    let conf = cat("/etc/ssh/sshd_config.d/vmlab.conf");
    assert!(conf.contains("PermitRootLogin prohibit-password"));
    assert!(conf.contains("PasswordAuthentication no"));
    let fstab = cat("/etc/fstab");
    assert!(
        fstab
            .lines()
            .any(|l| l.split_whitespace().take(3).eq(["/dev/vda", "/", "ext4"])),
        "{fstab}"
    );
    assert_eq!(cat("/etc/hostname").trim(), "vmlab");
    // root: no password, not locked (sshd refuses keys for '!').
    assert!(cat("/etc/shadow").lines().any(|l| l.starts_with("root:*:")));
}

#[test]
fn base_holds_no_identity_and_was_trimmed() {
    let ssh = ls("/etc/ssh");
    assert!(ssh.contains(&"sshd_config".to_string()), "{ssh:?}");
    let keys: Vec<_> = ssh.iter().filter(|n| n.starts_with("ssh_host_")).collect();
    assert!(keys.is_empty(), "host keys baked into the base: {keys:?}");
    assert_eq!(cat("/etc/machine-id"), "", "machine-id is made per VM");
    assert!(stat("/var/lib/dbus/machine-id").is_none());
    assert!(stat("/root/.ssh/authorized_keys").is_none());
    assert!(stat("/etc/vmlab/instance").is_none());
    assert_eq!(ls("/usr/share/man"), Vec::<String>::new());
    assert_eq!(ls("/usr/share/locale"), Vec::<String>::new());
    let lists: Vec<_> = ls("/var/lib/apt/lists")
        .into_iter()
        .filter(|n| n != "partial" && n != "lock")
        .collect();
    assert!(lists.is_empty(), "apt lists left: {lists:?}");
}

#[test]
fn second_build_is_a_cache_hit() {
    let before = std::fs::metadata(base()).unwrap();
    let out = vmlab(&["image", "build"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        base().to_str().unwrap()
    );
    assert!(
        out.stderr.is_empty(),
        "a cache hit builds nothing and says nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = std::fs::metadata(base()).unwrap();
    assert_eq!((before.ino(), before.mtime()), (after.ino(), after.mtime()));
}

#[test]
fn without_root_the_build_fails_in_one_line_writing_nothing() {
    let cache = tempfile::tempdir().unwrap();
    // World-searchable, so `nobody` can reach it and fail for the right reason.
    std::fs::set_permissions(
        cache.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vmlab"))
        .args(["image", "build"])
        .env("XDG_CACHE_HOME", cache.path())
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs; this test runs as root");
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("needs root"), "{stderr}");
    assert!(
        std::fs::read_dir(cache.path()).unwrap().next().is_none(),
        "nothing written to the cache"
    );
}

#[test]
fn force_rebuild_is_refused_while_a_vm_uses_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let overlay = dir.path().join("vm.qcow2");
    let out = vmlab(
        &["clone", base().to_str().unwrap(), overlay.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    // qemu-io stands for a running VM: the overlay open for writing, its
    // backing file (the base) shared read-only with writers forbidden.
    let mut vm = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            overlay.to_str().unwrap(),
            "-c",
            "sleep 60000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io (qemu-utils) runs: run .ci/setup");
    // Until qemu-io holds its locks, the refusal cannot be seen. The probe
    // must take no lock itself: `qemu-img info` would, and an instant when
    // both hold their bytes makes each refuse the other (qemu-io exits).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let held = loop {
        let probe = vmlab(&["disk", "info", overlay.to_str().unwrap()], &[]);
        let held = String::from_utf8_lossy(&probe.stdout).contains("in use: open for writing");
        if held || std::time::Instant::now() > deadline {
            break held;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let before = std::fs::metadata(base()).unwrap().ino();
    let out = vmlab(&["image", "build", "--force"], &[]);
    let alive = vm.try_wait().unwrap().is_none();
    vm.kill().unwrap();
    vm.wait().unwrap();
    assert!(held, "qemu-io never locked the overlay");
    assert!(alive, "qemu-io exited before the rebuild was tried");
    assert!(!out.status.success(), "rebuilt under a running VM: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert_eq!(
        std::fs::metadata(base()).unwrap().ino(),
        before,
        "base untouched"
    );
}
