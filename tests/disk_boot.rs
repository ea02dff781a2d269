//! Reading a VM's kernel and initrd out of its own disk (the full flavor's
//! boot): ext4 filesystems made with e2fsprogs' `mkfs.ext4 -d`, as qcow2
//! images and chains made with `qemu-img`, the links followed as Debian's
//! kernel packages lay them out; then missing and corrupt ones, each a
//! one-line error naming the disk and the file. Needs e2fsprogs and
//! qemu-utils (.ci/setup).

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vmlab::arch::x86_64::kernel::check_images;
use vmlab::disk::BackingPolicy;
use vmlab::image::{read_disk_boot, DiskBootError};

const VERSION: &str = "6.1.0-50-cloud-amd64";

fn tool(name: &str, args: &[&str]) {
    let out = Command::new(name)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("{name} cannot run ({e}): run .ci/setup (e2fsprogs, qemu-utils)")
        });
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request, image.to_str().unwrap()])
        .output()
        .expect("debugfs runs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kernel-like file: a bzImage header where the loader looks for one,
/// then bytes that differ by `seed`.
fn fake_kernel(seed: u8, len: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    bytes[0x202..0x206].copy_from_slice(b"HdrS");
    bytes
}

struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    /// /boot as Debian's kernel packages leave it with `link_in_boot`.
    fn debian(kernel: &[u8], initrd: &[u8]) -> Tree {
        let tree = Tree::empty();
        tree.kernel(VERSION, kernel, initrd);
        tree.link("vmlinuz", &format!("vmlinuz-{VERSION}"));
        tree.link("initrd.img", &format!("initrd.img-{VERSION}"));
        tree
    }

    fn empty() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/boot")).unwrap();
        std::fs::create_dir_all(dir.path().join("root/etc")).unwrap();
        std::fs::write(dir.path().join("root/etc/hostname"), "vmlab\n").unwrap();
        Tree { dir }
    }

    fn boot(&self) -> PathBuf {
        self.dir.path().join("root/boot")
    }

    fn kernel(&self, version: &str, kernel: &[u8], initrd: &[u8]) {
        std::fs::write(self.boot().join(format!("vmlinuz-{version}")), kernel).unwrap();
        std::fs::write(self.boot().join(format!("initrd.img-{version}")), initrd).unwrap();
    }

    fn link(&self, name: &str, to: &str) {
        let path = self.boot().join(name);
        let _ = std::fs::remove_file(&path);
        symlink(to, path).unwrap();
    }

    /// The tree as a raw ext4 image (`mkfs.ext4 -d`, as the recipes make it).
    fn ext4(&self, name: &str) -> PathBuf {
        let image = self.dir.path().join(name);
        tool("truncate", &["-s", "64M", image.to_str().unwrap()]);
        tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-b",
                "4096",
                "-d",
                self.dir.path().join("root").to_str().unwrap(),
                image.to_str().unwrap(),
            ],
        );
        image
    }

    /// The tree as a qcow2 image (`qemu-img convert`).
    fn qcow2(&self, name: &str) -> PathBuf {
        let raw = self.ext4(&format!("{name}.raw"));
        let image = self.dir.path().join(name);
        convert(&raw, &image, None);
        image
    }
}

/// `qemu-img convert` to qcow2; over `backing`, only what differs from it.
fn convert(raw: &Path, image: &Path, backing: Option<&Path>) {
    let mut args = vec!["convert", "-O", "qcow2"];
    if let Some(backing) = backing {
        args.extend(["-F", "qcow2", "-B", backing.to_str().unwrap()]);
    }
    args.extend([raw.to_str().unwrap(), image.to_str().unwrap()]);
    tool("qemu-img", &args);
}

/// vmlab's own backing rule, as a VM without --allow-backing has it.
fn policy() -> BackingPolicy {
    BackingPolicy::vmlab()
}

fn one_line(err: &DiskBootError) -> String {
    let text = err.to_string();
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    text
}

#[test]
fn reads_the_linked_kernel_and_initrd_from_qcow2_and_raw() {
    let kernel = fake_kernel(1, 3 << 20);
    let initrd = fake_kernel(2, 700_000);
    let tree = Tree::debian(&kernel, &initrd);
    // An older kernel beside it, as after an upgrade: the links decide.
    tree.kernel("6.1.0-49-cloud-amd64", &fake_kernel(9, 5000), b"old");
    for image in [tree.qcow2("disk.qcow2"), tree.ext4("disk.raw")] {
        let boot = read_disk_boot(&image, 1 << 30, &policy()).unwrap();
        assert_eq!(boot.kernel_path, format!("/boot/vmlinuz-{VERSION}"));
        assert_eq!(boot.initrd_path, format!("/boot/initrd.img-{VERSION}"));
        assert!(boot.kernel.read_all().unwrap() == kernel, "kernel bytes");
        assert!(boot.initrd.read_all().unwrap() == initrd, "initrd bytes");
        // What the loader will say about it names the disk and the file.
        assert!(boot
            .kernel
            .name()
            .display()
            .to_string()
            .ends_with(&format!("{}:/boot/vmlinuz-{VERSION}", image.display())));
        check_images(&boot.kernel, Some(&boot.initrd)).expect("a bzImage by content");
    }
}

#[test]
fn absolute_links_resolve_inside_the_guest_filesystem() {
    let tree = Tree::debian(&fake_kernel(3, 9000), b"initrd");
    tree.link("vmlinuz", &format!("/boot/vmlinuz-{VERSION}"));
    let boot = read_disk_boot(&tree.qcow2("abs.qcow2"), 1 << 30, &policy()).unwrap();
    assert_eq!(boot.kernel_path, format!("/boot/vmlinuz-{VERSION}"));
    assert_eq!(boot.kernel.read_all().unwrap(), fake_kernel(3, 9000));
}

#[test]
fn an_overlay_reads_the_kernel_the_guest_switched_to() {
    let tree = Tree::debian(&fake_kernel(4, 40_000), b"cloud initrd");
    let base_raw = tree.ext4("base.raw");
    let base = tree.dir.path().join("base.qcow2");
    convert(&base_raw, &base, None);
    // The guest installs the generic kernel and points the links at it:
    // only what differs from the base lands in the overlay.
    tree.kernel("6.1.0-50-amd64", &fake_kernel(5, 30_000), b"generic initrd");
    tree.link("vmlinuz", "vmlinuz-6.1.0-50-amd64");
    tree.link("initrd.img", "initrd.img-6.1.0-50-amd64");
    let new_raw = tree.ext4("new.raw");
    let overlay = tree.dir.path().join("overlay.qcow2");
    convert(&new_raw, &overlay, Some(&base));
    let boot = read_disk_boot(&overlay, 1 << 30, &policy()).unwrap();
    assert_eq!(boot.kernel_path, "/boot/vmlinuz-6.1.0-50-amd64");
    assert_eq!(boot.kernel.read_all().unwrap(), fake_kernel(5, 30_000));
    assert_eq!(boot.initrd.read_all().unwrap(), b"generic initrd");
    let boot = read_disk_boot(&base, 1 << 30, &policy()).unwrap();
    assert_eq!(boot.kernel_path, format!("/boot/vmlinuz-{VERSION}"));
}

#[test]
fn a_backing_file_the_vms_policy_refuses_is_not_read() {
    let tree = Tree::debian(&fake_kernel(6, 40_000), b"initrd");
    let base = tree.qcow2("base.qcow2");
    // The overlay in another directory names the base by its absolute
    // path: outside the overlay's directory and vmlab's.
    let elsewhere = tempfile::tempdir().unwrap();
    let overlay = elsewhere.path().join("overlay.qcow2");
    convert(&tree.ext4("same.raw"), &overlay, Some(&base));
    let err = read_disk_boot(&overlay, 1 << 30, &policy()).unwrap_err();
    assert!(matches!(err, DiskBootError::Open(_)), "{err:?}");
    let text = one_line(&err);
    assert!(text.contains("base.qcow2"), "{text}");
    // --allow-backing of the base's directory lets it through.
    let allowing = policy().allowing([tree.dir.path().to_path_buf()]);
    let boot = read_disk_boot(&overlay, 1 << 30, &allowing).unwrap();
    assert_eq!(boot.kernel.read_all().unwrap(), fake_kernel(6, 40_000));
}

#[test]
fn a_missing_kernel_or_initrd_is_one_line_naming_the_link() {
    let empty = Tree::empty();
    let image = empty.qcow2("nokernel.qcow2");
    let err = read_disk_boot(&image, 1 << 30, &policy()).unwrap_err();
    assert!(matches!(err, DiskBootError::Missing { .. }), "{err:?}");
    let text = one_line(&err);
    assert!(text.contains("no kernel at /boot/vmlinuz"), "{text}");
    assert!(text.contains(&image.display().to_string()), "{text}");
    assert!(text.contains("apt install"), "{text}");

    let dangling = Tree::debian(&fake_kernel(6, 5000), b"i");
    dangling.link("vmlinuz", "vmlinuz-9.9.9");
    let text = one_line(
        &read_disk_boot(&dangling.qcow2("dangling.qcow2"), 1 << 30, &policy()).unwrap_err(),
    );
    assert!(
        text.contains("links to vmlinuz-9.9.9, which does not exist"),
        "{text}"
    );

    let no_initrd = Tree::debian(&fake_kernel(7, 5000), b"i");
    std::fs::remove_file(no_initrd.boot().join("initrd.img")).unwrap();
    let text = one_line(
        &read_disk_boot(&no_initrd.qcow2("noinitrd.qcow2"), 1 << 30, &policy()).unwrap_err(),
    );
    assert!(text.contains("no initrd at /boot/initrd.img"), "{text}");
}

#[test]
fn not_a_filesystem_not_a_kernel_and_no_image_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = dir.path().join("zeros.raw");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    let err = read_disk_boot(&zeros, 1 << 30, &policy()).unwrap_err();
    assert!(matches!(err, DiskBootError::NoFilesystem { .. }), "{err:?}");
    assert!(one_line(&err).contains("holds no ext4 filesystem"));

    let err = read_disk_boot(&dir.path().join("absent.qcow2"), 1 << 30, &policy()).unwrap_err();
    assert!(one_line(&err).contains("absent.qcow2"), "{err}");

    // The links lead to a file, but not to a kernel: the loader says so
    // and names where on which disk.
    let tree = Tree::debian(b"#!/bin/sh\necho I am not a kernel\n", b"i");
    let image = tree.qcow2("text.qcow2");
    let boot = read_disk_boot(&image, 1 << 30, &policy()).unwrap();
    let err = check_images(&boot.kernel, Some(&boot.initrd))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "text.qcow2:/boot/vmlinuz-{VERSION}' is not a Linux kernel"
        )),
        "{err}"
    );
}

#[test]
fn a_link_loop_and_an_oversized_initrd_are_refused() {
    let tree = Tree::debian(&fake_kernel(8, 5000), &vec![7u8; 200_000]);
    tree.link("vmlinuz", "vmlinuz.a");
    tree.link("vmlinuz.a", "vmlinuz");
    let err = read_disk_boot(&tree.qcow2("loop.qcow2"), 1 << 30, &policy()).unwrap_err();
    assert!(matches!(err, DiskBootError::Unreadable { .. }), "{err:?}");
    one_line(&err);

    let tree = Tree::debian(&fake_kernel(8, 5000), &vec![7u8; 200_000]);
    let err = read_disk_boot(&tree.qcow2("big.qcow2"), 100_000, &policy()).unwrap_err();
    assert!(matches!(err, DiskBootError::TooLarge { .. }), "{err:?}");
    let text = one_line(&err);
    assert!(
        text.contains(&format!("/boot/initrd.img-{VERSION}")),
        "{text}"
    );
}

#[test]
fn corrupt_metadata_is_an_error_not_a_panic_or_garbage() {
    let kernel = fake_kernel(10, 1 << 20);
    let tree = Tree::debian(&kernel, b"initrd");
    let raw = tree.ext4("corrupt.raw");
    // Where the kernel's inode lies: "Inode N is part of block group G
    // located at block B, offset 0xO".
    let imap = debugfs(&raw, &format!("imap /boot/vmlinuz-{VERSION}"));
    let located = imap
        .split("located at block ")
        .nth(1)
        .unwrap_or_else(|| panic!("debugfs imap: {imap}"));
    let (block, offset) = located.split_once(", offset 0x").unwrap();
    let block: u64 = block.trim().parse().unwrap();
    let offset = u64::from_str_radix(offset.trim(), 16).unwrap();
    // Scribble over the inode's extent tree (i_block, 40 bytes in).
    let at = block * 4096 + offset + 40;
    let mut bytes = std::fs::read(&raw).unwrap();
    for (i, b) in bytes[at as usize..at as usize + 60].iter_mut().enumerate() {
        *b = 0xa5 ^ i as u8;
    }
    std::fs::write(&raw, &bytes).unwrap();
    match read_disk_boot(&raw, 1 << 30, &policy()) {
        Err(err) => {
            assert!(matches!(err, DiskBootError::Unreadable { .. }), "{err:?}");
            one_line(&err);
        }
        Ok(boot) => panic!(
            "a corrupt inode read as {} bytes",
            boot.kernel.read_all().unwrap().len()
        ),
    }
}
