//! The `vmlab disk` and `vmlab clone` commands end to end: what they make
//! (checked with qemu-img), and that every user error is one line, a
//! non-zero exit, and leaves nothing on disk.

mod disk_support;

use std::path::Path;
use std::process::Output;

use disk_support::*;
use vmlab::disk::{open_image, ImageFormat, OpenOptions};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(dir: &Path, args: &[&str]) -> Output {
    vmlab().current_dir(dir).args(args).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "vmlab {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail with one line mentioning `needle`.
fn fails(dir: &Path, args: &[&str], needle: &str) {
    let out = run(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "vmlab {args:?} should fail");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "vmlab {args:?}: not one line: {err}"
    );
    assert!(
        err.contains(needle),
        "vmlab {args:?}: expected '{needle}' in: {err}"
    );
}

/// Names in `dir`, hidden temporaries included.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn create_info_resize() {
    let dir = tempdir();
    let d = dir.path();
    ok(d, &["disk", "create", "a.qcow2", "10G"]);
    let info = ok(d, &["disk", "info", "a.qcow2"]);
    assert!(info.contains("format: qcow2"), "{info}");
    assert!(info.contains("10737418240 bytes"), "{info}");
    let q = qemu_img_ok(&["info", "--output=json", s(&d.join("a.qcow2"))]);
    assert_eq!(json_number(&q, "virtual-size"), Some(10 << 30));
    assert_eq!(qemu_check(&d.join("a.qcow2")), 0);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("a.qcow2"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "a disk is its owner's only");

    ok(d, &["disk", "resize", "a.qcow2", "20G"]);
    let q = qemu_img_ok(&["info", "--output=json", s(&d.join("a.qcow2"))]);
    assert_eq!(json_number(&q, "virtual-size"), Some(20 << 30));
    fails(
        d,
        &["disk", "resize", "a.qcow2", "1G"],
        "smaller than the current",
    );
    let q = qemu_img_ok(&["info", "--output=json", s(&d.join("a.qcow2"))]);
    assert_eq!(json_number(&q, "virtual-size"), Some(20 << 30));

    ok(d, &["disk", "create", "--format", "raw", "r.img", "1M"]);
    assert_eq!(std::fs::metadata(d.join("r.img")).unwrap().len(), 1 << 20);
    ok(d, &["disk", "resize", "r.img", "2M"]);
    assert_eq!(std::fs::metadata(d.join("r.img")).unwrap().len(), 2 << 20);
    let info = ok(d, &["disk", "info", "r.img"]);
    assert!(info.contains("format: raw"), "{info}");
    assert_eq!(qemu_check(&d.join("a.qcow2")), 0);
}

#[test]
fn overlays_record_backing_files_qemu_can_follow() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir(d.join("base")).unwrap();
    std::fs::write(d.join("base/b.raw"), pattern(1, 0, 1 << 20)).unwrap();
    // Size taken from the backing file; path relative to the caller's cwd.
    ok(
        d,
        &["disk", "create", "top.qcow2", "--backing", "base/b.raw"],
    );
    let info = ok(d, &["disk", "info", "top.qcow2"]);
    assert!(
        info.contains("backing file:") && info.contains("backing image 1"),
        "{info}"
    );
    assert!(info.contains("format: raw"), "{info}");
    qemu_compare_identical(&d.join("top.qcow2"), &d.join("base/b.raw"));
    // Same directory: the bare name is stored, so the pair can move.
    ok(
        d,
        &[
            "disk",
            "create",
            "base/mid.qcow2",
            "--backing",
            "base/b.raw",
        ],
    );
    let q = qemu_img_ok(&["info", "--output=json", s(&d.join("base/mid.qcow2"))]);
    assert!(q.contains("\"backing-filename\": \"b.raw\""), "{q}");
    assert!(q.contains("\"backing-filename-format\": \"raw\""), "{q}");
}

#[test]
fn linked_clone_shares_and_diverges() {
    let dir = tempdir();
    let d = dir.path();
    ok(d, &["disk", "create", "src.qcow2", "64M"]);
    let data = pattern(3, 0, 3 << 20);
    {
        let img = open_image(&d.join("src.qcow2"), &OpenOptions::read_write()).unwrap();
        img.write_at(1 << 20, &data).unwrap();
    }
    ok(d, &["clone", "src.qcow2", "dst.qcow2"]);
    let q = qemu_img_ok(&["info", "--output=json", s(&d.join("dst.qcow2"))]);
    assert!(q.contains("\"backing-filename\": \"src.qcow2\""), "{q}");
    qemu_img_ok(&["compare", s(&d.join("src.qcow2")), s(&d.join("dst.qcow2"))]);
    {
        let img = open_image(&d.join("dst.qcow2"), &OpenOptions::read_write()).unwrap();
        img.write_at((1 << 20) + 100, b"diverged").unwrap();
        let mut back = vec![0u8; data.len()];
        img.read_at(1 << 20, &mut back).unwrap();
        assert_eq!(&back[100..108], b"diverged");
        assert_eq!(&back[..100], &data[..100]);
    }
    let src = open_image(&d.join("src.qcow2"), &OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; data.len()];
    src.read_at(1 << 20, &mut back).unwrap();
    assert!(back == data, "writing the clone changed its source");
    drop(src);
    assert_eq!(qemu_check(&d.join("dst.qcow2")), 0);
    fails(d, &["clone", "src.qcow2", "dst.qcow2"], "already exists");
    ok(d, &["clone", "--force", "src.qcow2", "dst.qcow2"]);
    fails(
        d,
        &["clone", "--format", "raw", "src.qcow2", "x.img"],
        "--full",
    );
    fails(
        d,
        &["clone", "src.qcow2", "src.qcow2", "--force"],
        "same file",
    );
    assert!(!d.join("x.img").exists());
}

#[test]
fn full_clone_copies_and_keeps_holes() {
    let dir = tempdir();
    let d = dir.path();
    ok(d, &["disk", "create", "base.qcow2", "256M"]);
    {
        let img = open_image(&d.join("base.qcow2"), &OpenOptions::read_write()).unwrap();
        img.write_at(5 << 20, &pattern(4, 0, 1 << 20)).unwrap();
        img.write_at(200 << 20, &pattern(5, 0, 70_000)).unwrap();
    }
    ok(d, &["clone", "base.qcow2", "top.qcow2"]);
    {
        let img = open_image(&d.join("top.qcow2"), &OpenOptions::read_write()).unwrap();
        img.write_at(100 << 20, &pattern(6, 0, 4096)).unwrap();
    }
    for (name, fmt) in [("full.img", "raw"), ("full.qcow2", "qcow2")] {
        ok(d, &["clone", "--full", "--format", fmt, "top.qcow2", name]);
        let out = d.join(name);
        let img = open_image(&out, &OpenOptions::read_only()).unwrap();
        assert_eq!(img.format(), ImageFormat::from_name(fmt).unwrap());
        assert!(img.backing().is_none(), "a full clone stands alone");
        drop(img);
        qemu_img_ok(&["compare", s(&d.join("top.qcow2")), s(&out)]);
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&out).unwrap().blocks() * 512
        };
        assert!(
            allocated < 8 << 20,
            "{name}: {allocated} bytes allocated, holes were filled"
        );
    }
    assert_eq!(qemu_check(&d.join("full.qcow2")), 0);
}

#[test]
fn user_errors_are_one_line_and_leave_nothing() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("bad.qcow2"), b"QFI\xfb\x00\x00\x00\x03garbage").unwrap();
    let before = listing(d);
    fails(d, &["disk", "info", "missing.qcow2"], "no such file");
    fails(d, &["clone", "missing.qcow2", "c.qcow2"], "no such file");
    fails(d, &["disk", "info", "bad.qcow2"], "corrupt");
    fails(d, &["clone", "bad.qcow2", "c.qcow2"], "corrupt");
    fails(d, &["clone", "--full", "bad.qcow2", "c.qcow2"], "corrupt");
    fails(d, &["disk", "create", "n.qcow2", "1000"], "multiple of 512");
    fails(
        d,
        &["disk", "create", "n.qcow2", "1G", "--cluster-size", "3K"],
        "power of two",
    );
    fails(
        d,
        &["disk", "create", "n.qcow2", "1G", "--cluster-size", "4M"],
        "between 512 bytes and 2 MiB",
    );
    fails(
        d,
        &["disk", "create", "n.qcow2", "--backing", "missing.raw"],
        "no such file",
    );
    fails(d, &["disk", "create", "n.qcow2"], "give a size");
    fails(
        d,
        &[
            "disk",
            "create",
            "--format",
            "raw",
            "n.img",
            "1G",
            "--backing",
            "bad.qcow2",
        ],
        "backing",
    );
    // Argument errors come from clap: the error line plus a pointer to --help.
    let out = run(d, &["disk", "create", "n.qcow2", "1G", "--format", "vmdk"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown image format 'vmdk'"));
    fails(
        d,
        &["disk", "resize", "missing.qcow2", "1G"],
        "no such file",
    );
    fails(d, &["disk", "create", "bad.qcow2", "1G"], "already exists");
    assert_eq!(listing(d), before, "a failed command left files behind");
    // --force replaces, and the result is a valid image.
    ok(d, &["disk", "create", "bad.qcow2", "1G", "--force"]);
    assert_eq!(qemu_check(&d.join("bad.qcow2")), 0);
}

#[test]
fn raw_images_are_never_reinterpreted() {
    let dir = tempdir();
    let d = dir.path();
    // A raw disk whose guest wrote a qcow2 header naming a host file.
    let mut evil = vec![0u8; 1 << 20];
    evil[..4].copy_from_slice(b"QFI\xfb");
    std::fs::write(d.join("guest.raw"), &evil).unwrap();
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "guest.raw",
        "-F",
        "raw",
        s(&d.join("top.qcow2")),
    ]);
    let img = open_image(&d.join("top.qcow2"), &OpenOptions::read_only()).unwrap();
    let backing = img.backing().expect("backing");
    assert_eq!(
        backing.format(),
        ImageFormat::Raw,
        "recorded format wins over content"
    );
    let mut head = [0u8; 8];
    img.read_at(0, &mut head).unwrap();
    assert_eq!(&head[..4], b"QFI\xfb");
    drop(img);
    // A raw image whose format was guessed refuses to become qcow2.
    std::fs::write(d.join("plain.raw"), vec![0u8; 1 << 20]).unwrap();
    let img = open_image(&d.join("plain.raw"), &OpenOptions::read_write()).unwrap();
    assert!(img.write_at(0, b"QFI\xfb\0\0\0\x03").is_err());
    img.write_at(0, b"ordinary").unwrap();
}

#[test]
fn a_backing_file_outside_the_image_directory_needs_allow_backing() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir_all(d.join("lab")).unwrap();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    std::fs::write(d.join("secrets/id_ed25519"), vec![b'k'; 1 << 20]).unwrap();
    let secret = d.join("secrets/id_ed25519").canonicalize().unwrap();
    unchecked_overlay(&d.join("lab/evil.qcow2"), "../secrets/id_ed25519", "raw");
    let before = listing(d);
    let refused = format!("backing file {}", secret.display());
    let allow = format!("--allow-backing {}", secret.display());
    for args in [
        &["disk", "info", "lab/evil.qcow2"][..],
        &["disk", "resize", "lab/evil.qcow2", "2M"],
        &["clone", "lab/evil.qcow2", "copy.qcow2"],
        &["clone", "--full", "lab/evil.qcow2", "copy.qcow2"],
        &[
            "disk",
            "create",
            "over.qcow2",
            "--backing",
            "lab/evil.qcow2",
        ],
    ] {
        fails(d, args, &refused);
        fails(d, args, &allow);
    }
    assert_eq!(listing(d), before, "a refused command left files behind");
    fails(
        d,
        &["disk", "info", "lab/evil.qcow2", "--allow-backing", "nope"],
        "--allow-backing nope: no such file",
    );

    let allowing = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--allow-backing", "secrets"]);
        ok(d, &all)
    };
    let info = allowing(&["disk", "info", "lab/evil.qcow2"]);
    assert!(
        info.contains("backing file: ../secrets/id_ed25519"),
        "{info}"
    );
    allowing(&["disk", "resize", "lab/evil.qcow2", "2M"]);
    allowing(&["clone", "--full", "lab/evil.qcow2", "copy.qcow2"]);
    allowing(&[
        "disk",
        "create",
        "over.qcow2",
        "--backing",
        "lab/evil.qcow2",
    ]);
    assert!(d.join("copy.qcow2").is_file() && d.join("over.qcow2").is_file());
}

#[test]
fn names_an_image_chose_are_shown_escaped() {
    let dir = tempdir();
    let d = dir.path();
    // A backing file whose name would retitle the terminal and clear it.
    let name = "base\u{1b}]0;pwned\u{7}\u{1b}[2J.raw";
    std::fs::write(d.join(name), vec![0u8; 1 << 20]).unwrap();
    for (top, backing) in [("top.qcow2", name), ("gone.qcow2", "gone\u{1b}[2J\u{9b}1A")] {
        unchecked_overlay(&d.join(top), backing, "raw");
    }
    let raw = |text: &str| text.chars().any(|c| c.is_control() && c != '\n');
    let info = ok(d, &["disk", "info", "top.qcow2"]);
    assert!(
        !raw(&info),
        "control characters reached the terminal: {info:?}"
    );
    assert!(
        info.contains("backing file: base\\x1b]0;pwned\\x07\\x1b[2J.raw\n"),
        "{info}"
    );
    assert!(info.contains("image: base\\x1b]0;pwned"), "{info}");
    // An error quoting a name the image chose.
    let out = run(d, &["disk", "info", "gone.qcow2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        !raw(&err),
        "control characters reached the terminal: {err:?}"
    );
    assert!(err.contains("gone\\x1b[2J\\x9b1A"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
