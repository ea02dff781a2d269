//! A reader that stops early (`vmlab disk info IMG | head -1`) ends vmlab
//! quietly, as it ends any Unix tool: no panic (Rust's `print!` panics on
//! EPIPE and exits 101), no error line, exit status 0.

use std::path::Path;
use std::process::{Command, Stdio};

/// A pipe whose reading end is already closed: every write fails with EPIPE.
fn closed_stdout() -> Stdio {
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

fn assert_quiet(home: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmlab"))
        .args(args)
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .stdout(closed_stdout())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "vmlab {args:?}: {err}");
    assert!(err.is_empty(), "vmlab {args:?} said: {err}");
}

#[test]
fn printing_commands_stop_quietly_on_a_closed_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let base = home.join("base.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let overlay = home.join("overlay.qcow2");
    let (base_arg, overlay_arg) = (base.to_str().unwrap(), overlay.to_str().unwrap());
    let created = Command::new(env!("CARGO_BIN_EXE_vmlab"))
        .args(["disk", "create", overlay_arg, "--backing", base_arg])
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");

    assert_quiet(home, &["disk", "info", overlay_arg]);
    assert_quiet(home, &["ps"]);
    assert_quiet(home, &["--version"]);
    assert_quiet(home, &["--help"]);
    assert_quiet(home, &["disk", "--help"]);
}

#[test]
fn other_write_errors_are_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmlab"))
        .arg("ps")
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("cannot write to standard output"), "{err}");
}
