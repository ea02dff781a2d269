//! `vmlab run` refuses bad input with one clear line and a non-zero exit,
//! before it creates anything.

use std::path::PathBuf;
use std::process::{Command, Output};

fn vmlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmlab"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("vmlab runs")
}

/// Asserts failure with exactly one stderr line containing all of `needles`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "should fail: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "'{needle}' missing from: {}",
            lines[0]
        );
    }
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:?}");
}

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmlab-cli-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    // Tests run in parallel and share these files: write them whole, then
    // rename, so a vmlab started by another test never reads a half file.
    let tmp = dir.join(format!("{name}.{:?}", std::thread::current().id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Just enough of a bzImage for vmlab to recognise the format.
fn fake_bzimage() -> PathBuf {
    let mut image = vec![0u8; 0x400];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    scratch("bzImage", &image)
}

#[test]
fn missing_kernel() {
    let out = vmlab(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&out, &["/nonexistent/vmlinux", "does not exist"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    let path = scratch("notes.txt", b"this is not a kernel, just text");
    let out = vmlab(&["run", "--kernel", path.to_str().unwrap()]);
    assert_one_line_error(&out, &["notes.txt", "is not a Linux kernel"]);
}

#[test]
fn missing_initrd() {
    let kernel = fake_bzimage();
    let out = vmlab(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        "/nonexistent/rootfs.cpio",
    ]);
    assert_one_line_error(&out, &["/nonexistent/rootfs.cpio", "does not exist"]);
}

#[test]
fn zero_cpus() {
    let out = vmlab(&["run", "--kernel", "/nonexistent", "--cpus", "0"]);
    assert_one_line_error(&out, &["--cpus", "0"]);
}

#[test]
fn unparseable_memory_size() {
    let out = vmlab(&["run", "--mem", "lots"]);
    assert_one_line_error(&out, &["--mem", "lots"]);
}

#[test]
fn memory_larger_than_the_host_can_give() {
    let kernel = fake_bzimage();
    let out = vmlab(&["run", "--kernel", kernel.to_str().unwrap(), "--mem", "64T"]);
    assert_one_line_error(&out, &["--mem", "more than this host can give"]);
}

/// Runs vmlab in a private mount namespace where /dev has no kvm node.
#[test]
fn no_dev_kvm() {
    let kernel = fake_bzimage();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {}",
        env!("CARGO_BIN_EXE_vmlab"),
        kernel.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unshare (util-linux) runs; the test needs root");
    assert_one_line_error(&out, &["/dev/kvm does not exist"]);
}

/// An unprivileged user cannot open a root-only /dev/kvm (made in a private
/// /dev so the test does not depend on this host's permissions).
#[test]
fn no_permission_on_dev_kvm() {
    let kernel = fake_bzimage();
    let script = format!(
        "mount -t tmpfs none /dev && mknod -m 600 /dev/kvm c 10 232 && \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups {} run --kernel {}",
        env!("CARGO_BIN_EXE_vmlab"),
        kernel.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("unshare and setpriv (util-linux) run; the test needs root");
    assert_one_line_error(&out, &["permission denied", "/dev/kvm", "kvm"]);
}

#[test]
fn missing_disk_image() {
    let kernel = fake_bzimage();
    let out = vmlab(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        "/nonexistent/data.qcow2",
    ]);
    assert_one_line_error(&out, &["/nonexistent/data.qcow2", "no such file"]);
}

#[test]
fn unknown_disk_option() {
    let out = vmlab(&["run", "--disk", "data.qcow2,cache=none"]);
    assert_one_line_error(
        &out,
        &["data.qcow2,cache=none", "unknown option", "PATH,ro"],
    );
}

/// A disk that QEMU holds open for writing fails `vmlab run` at once.
#[test]
fn disk_in_use_by_qemu() {
    let kernel = fake_bzimage();
    let image = scratch("busy.qcow2", b"");
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", image.to_str().unwrap(), "1M"])
        .status()
        .expect("qemu-img is needed (apt-get install qemu-utils, see .ci/setup)");
    assert!(created.success());
    // qemu-io holds the image (write lock) while it sleeps.
    let mut holder = Command::new("qemu-io")
        .args(["-c", "sleep 20000", image.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io is needed (apt-get install qemu-utils, see .ci/setup)");
    std::thread::sleep(std::time::Duration::from_millis(700));
    let out = vmlab(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        image.to_str().unwrap(),
    ]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_one_line_error(&out, &["busy.qcow2", "in use by", "qemu-io"]);
}
