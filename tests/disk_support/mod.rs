//! Helpers shared by the disk integration tests: qemu-img as the referee,
//! deterministic data patterns, temporary directories.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs a QEMU tool; a missing tool fails the test with what to install.
///
/// Tests run in parallel threads that spawn processes: a child forked by one
/// thread briefly shares every open file of the others (until its exec
/// closes them), and with them their OFD locks. So an image another thread
/// just closed may still look locked for a moment; such a run is retried.
pub fn qemu(tool: &str, args: &[&str]) -> Output {
    for _ in 0..50 {
        let out = qemu_once(tool, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !stderr.contains("Is another process using the image") {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{tool} {args:?}: the image stayed locked")
}

/// Runs a QEMU tool once, for tests that expect it to meet a lock.
pub fn qemu_once(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install qemu-utils (see .ci/setup)"))
}

/// Runs qemu-img and requires success.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu("qemu-img", args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes `path`, a 1 MiB qcow2 image naming `backing` (of `format`)
/// unchecked, as a downloaded image may.
pub fn unchecked_overlay(path: &Path, backing: &str, format: &str) {
    let p = path.to_str().unwrap();
    qemu_img_ok(&[
        "create", "-f", "qcow2", "-u", "-b", backing, "-F", format, p, "1M",
    ]);
}

/// `qemu-img check`: panics on corruption; returns the number of leaked
/// clusters (exit status 3 means leaks only).
pub fn qemu_check(path: &Path) -> u64 {
    let p = path.to_str().unwrap();
    let out = qemu("qemu-img", &["check", "-f", "qcow2", "--output=json", p]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "qemu-img check {p} found corruption (exit {code}): {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_number(&text, "leaks").unwrap_or(0)
}

/// Extracts `"key": N` from qemu-img's JSON output.
pub fn json_number(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = text[at..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// `qemu-img compare` of a qcow2 image against a raw file: must be identical.
pub fn qemu_compare_identical(qcow2: &Path, raw: &Path) {
    let out = qemu(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            qcow2.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare says {} and {} differ: {}{}",
        qcow2.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic bytes for (seed, absolute position): any range can be
/// regenerated to check it.
pub fn pattern_byte(seed: u64, pos: u64) -> u8 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ pos.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 29;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 32;
    (x as u8) | 1
}

pub fn pattern(seed: u64, pos: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(seed, pos + i))
        .collect()
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmlab-disk-test")
        .tempdir()
        .expect("temp dir")
}

pub fn vmlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmlab"))
}

/// A backing policy for the tests' own images, which are trusted: their
/// chains may lead anywhere (but vmlab's ssh directory).
pub fn anywhere() -> vmlab::disk::BackingPolicy {
    vmlab::disk::BackingPolicy::vmlab().allowing(["/"])
}

/// Options that open an image to read it whatever else holds it, and
/// wherever its chain leads.
pub fn unlocked() -> vmlab::disk::OpenOptions {
    vmlab::disk::OpenOptions {
        lock: vmlab::disk::LockMode::None,
        ..vmlab::disk::OpenOptions::read_only().with_backing_policy(anywhere())
    }
}

/// Everything the image at `path` (and its chain) reads, taking no lock.
pub fn read_image(path: &Path) -> Vec<u8> {
    let img = vmlab::disk::open_image(path, &unlocked())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}

/// Every image of the chains behind the qcow2 files in `dir` passes
/// `qemu-img check`.
pub fn check_chains_in(dir: &Path) {
    let mut images = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "qcow2") {
            images.extend(vmlab::disk::backing_chain(&path).unwrap());
        }
    }
    images.sort();
    images.dedup();
    for image in &images {
        qemu_check(image);
    }
}
