//! Locking interoperates with QEMU: a vmlab writer and a QEMU writer exclude
//! each other, backing files are locked shared, and a clone of an image that
//! is open for writing is refused.

mod disk_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disk_support::*;
use vmlab::disk::{
    clone_image, create_image, image_info, open_image, CloneOptions, CreateOptions, DiskError,
    OpenOptions,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn new_image(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    create_image(&p, &CreateOptions::qcow2(4 << 20)).unwrap();
    p
}

/// qemu-io opening `img` read-write and running `cmd`; returns its stderr.
/// Only a run expected to succeed is retried past a passing lock.
fn qemu_io_rw(img: &Path, cmd: &str, expect_ok: bool) -> (bool, String) {
    let args = ["-f", "qcow2", "-c", cmd, s(img)];
    let out = if expect_ok {
        qemu("qemu-io", &args)
    } else {
        qemu_once("qemu-io", &args)
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A qemu-io that holds `img` open for writing until killed.
struct QemuWriter(Child);

impl QemuWriter {
    fn start(img: &Path) -> Self {
        let child = Command::new("qemu-io")
            .args(["-f", "qcow2", s(img)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io (install qemu-utils, see .ci/setup)");
        // Wait until its write lock is visible, without taking locks that
        // would make qemu-io itself fail.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !image_info(img, &vmlab::disk::BackingPolicy::vmlab()).unwrap()[0].in_use {
            assert!(
                Instant::now() < deadline,
                "qemu-io never locked {}",
                img.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuWriter(child)
    }
}

impl Drop for QemuWriter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn second_vmlab_writer_is_refused() {
    let dir = tempdir();
    let img = new_image(dir.path(), "a.qcow2");
    let first = open_image(&img, &OpenOptions::read_write()).unwrap();
    let err = open_image(&img, &OpenOptions::read_write())
        .err()
        .expect("second writer must fail");
    assert!(matches!(err, DiskError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(first);
    open_image(&img, &OpenOptions::read_write()).expect("free again once closed");
}

#[test]
fn qemu_writer_is_refused_while_vmlab_writes_and_vice_versa() {
    let dir = tempdir();
    let img = new_image(dir.path(), "a.qcow2");
    let ours = open_image(&img, &OpenOptions::read_write()).unwrap();
    let (ok, err) = qemu_io_rw(&img, "write 0 4k", false);
    assert!(!ok, "qemu-io wrote to an image vmlab has open");
    assert!(err.contains("lock"), "unexpected qemu-io error: {err}");
    drop(ours);
    let (ok, err) = qemu_io_rw(&img, "write 0 4k", true);
    assert!(ok, "qemu-io should work once vmlab closed the image: {err}");

    let writer = QemuWriter::start(&img);
    let err = open_image(&img, &OpenOptions::read_write())
        .err()
        .expect("vmlab must be refused");
    let text = err.to_string();
    assert!(matches!(err, DiskError::Locked { .. }), "{text}");
    assert!(
        text.contains("qemu-io"),
        "the message should name the holder: {text}"
    );
    drop(writer);
    open_image(&img, &OpenOptions::read_write()).unwrap();
}

#[test]
fn backing_files_are_locked_shared() {
    let dir = tempdir();
    let base = new_image(dir.path(), "base.qcow2");
    let top = dir.path().join("top.qcow2");
    let mut opts = CreateOptions::qcow2(4 << 20);
    opts.backing = Some(base.clone());
    create_image(&top, &opts).unwrap();
    let running = open_image(&top, &OpenOptions::read_write()).unwrap();
    // Readers of the base are welcome, writers are not.
    qemu_img_ok(&["info", s(&base)]);
    let reader = open_image(&base, &OpenOptions::read_only()).unwrap();
    let (ok, err) = qemu_io_rw(&base, "write 0 4k", false);
    assert!(
        !ok && err.contains("lock"),
        "qemu-io wrote to a backing file in use: {err}"
    );
    let err = open_image(&base, &OpenOptions::read_write())
        .err()
        .expect("vmlab writer on a backing file");
    assert!(matches!(err, DiskError::Locked { .. }), "{err}");
    drop((reader, running));
    let (ok, err) = qemu_io_rw(&base, "write 0 4k", true);
    assert!(ok, "{err}");
}

#[test]
fn clone_of_an_image_open_for_writing_is_refused() {
    let dir = tempdir();
    let img = new_image(dir.path(), "busy.qcow2");
    let dst = dir.path().join("copy.qcow2");
    let writer = QemuWriter::start(&img);
    for full in [false, true] {
        let opts = CloneOptions {
            mode: if full {
                vmlab::disk::CloneMode::Full
            } else {
                vmlab::disk::CloneMode::Linked
            },
            ..CloneOptions::default()
        };
        let err = clone_image(&img, &dst, &opts).expect_err("clone must be refused");
        assert!(matches!(err, DiskError::Locked { .. }), "{err}");
        assert!(!dst.exists(), "a refused clone left a file behind");
    }
    // The CLI says so in one line and exits non-zero.
    let out = vmlab().args(["clone", s(&img), s(&dst)]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("busy.qcow2") && stderr.contains("qemu-io"),
        "{stderr}"
    );
    assert!(!dst.exists());
    drop(writer);
    clone_image(&img, &dst, &CloneOptions::default()).unwrap();
}

/// A process that forks shares every open file with the child until the
/// child's exec, so an image closed meanwhile keeps its lock for that
/// instant. A writer opening it then must not be refused for a lock that is
/// about to vanish (CI once saw exactly this between two tests of one binary).
#[test]
fn a_lock_kept_only_by_a_fork_in_flight_does_not_refuse_a_writer() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let dir = tempdir();
    let img = new_image(dir.path(), "a.qcow2");
    let reader = open_image(&img, &OpenOptions::read_only()).unwrap();
    let (mut forked, tell) = std::io::pipe().unwrap();
    let spawner = std::thread::spawn(move || {
        let fd = tell.as_raw_fd();
        let mut cmd = Command::new("true");
        // SAFETY: the hook runs in the forked child before exec and makes only
        // async-signal-safe calls (write, nanosleep) on memory it owns.
        unsafe {
            cmd.pre_exec(move || {
                libc::write(fd, b"x".as_ptr().cast(), 1);
                let pause = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                libc::nanosleep(&pause, std::ptr::null_mut());
                Ok(())
            })
        };
        let status = cmd.status();
        drop(tell);
        status
    });
    // Once this byte arrives the child exists and shares `reader`'s file.
    forked.read_exact(&mut [0u8; 1]).unwrap();
    drop(reader);
    let writer = open_image(&img, &OpenOptions::read_write());
    assert!(spawner.join().unwrap().unwrap().success());
    let writer = writer.unwrap_or_else(|e| panic!("writer refused: {e}"));
    writer.write_at(0, b"after").unwrap();
}
