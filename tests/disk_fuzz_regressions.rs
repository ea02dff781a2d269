//! Hostile images: every input the fuzzer ever broke vmlab with
//! (tests/fuzz/regressions/) and hand-made attacks on the header, tables and
//! backing chain must end in an error, never a panic, hang or huge allocation.

mod disk_support;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use disk_support::*;
use vmlab::disk::{
    checked_backing_chain, commit_image, create_image, fuzzing, open_image, open_overlay_over,
    overlay_onto, BackingPolicy, BackingRefusal, BlockBackend, CreateOptions, DiskError,
    OpenOptions,
};

/// Runs the fuzz target's exercise on `data`, failing if it takes minutes
/// (a hang) or panics.
fn exercise(name: &str, data: Vec<u8>, dir: &Path) {
    let scratch = dir.join(format!("{name}.scratch"));
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        fuzzing::open_and_exercise(&data, &scratch);
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => handle.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{name}: panicked"),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{name}: still running after 60 s"),
    }
}

#[test]
fn fuzzer_findings_stay_fixed() {
    let dir = tempdir();
    let regressions =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/regressions/qcow2_open");
    let mut count = 0;
    for entry in std::fs::read_dir(&regressions).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        exercise(&name, std::fs::read(&path).unwrap(), dir.path());
        count += 1;
    }
    assert!(
        count > 0,
        "no regression inputs found in {}",
        regressions.display()
    );
}

/// A valid small image (512-byte clusters) with some data, as bytes.
fn sample(dir: &Path) -> Vec<u8> {
    let p = dir.join("sample.qcow2");
    let mut opts = CreateOptions::qcow2(1 << 20);
    opts.cluster_size = 512;
    create_image(&p, &opts).unwrap();
    let img = open_image(&p, &OpenOptions::read_write()).unwrap();
    img.write_at(1000, &pattern(1, 0, 5000)).unwrap();
    drop(img);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_file(p).unwrap();
    bytes
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Opens `bytes` as an image and expects a clear error containing `needle`.
fn refused(dir: &Path, name: &str, bytes: &[u8], needle: &str) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    match open_image(&p, &OpenOptions::read_only()) {
        Ok(_) => panic!("{name}: hostile image was accepted"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "{name}: expected '{needle}' in: {e}"
        ),
    }
    exercise(name, bytes.to_vec(), dir);
}

#[test]
fn hostile_headers_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    let good = sample(d);
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    refused(
        d,
        "l1-huge",
        &patched(&|b| put32(b, 36, u32::MAX)),
        "L1 table",
    );
    refused(
        d,
        "l1-outside",
        &patched(&|b| put64(b, 40, 1 << 40)),
        "L1 table",
    );
    refused(
        d,
        "l1-too-small",
        &patched(&|b| put64(b, 24, 1 << 40)),
        "L1 table is too small",
    );
    refused(
        d,
        "size-huge",
        &patched(&|b| put64(b, 24, u64::MAX)),
        "too large",
    );
    refused(
        d,
        "reftable-huge",
        &patched(&|b| put32(b, 56, u32::MAX)),
        "refcount table",
    );
    refused(
        d,
        "reftable-outside",
        &patched(&|b| put64(b, 48, 1 << 50)),
        "refcount table",
    );
    refused(
        d,
        "cluster-bits",
        &patched(&|b| put32(b, 20, 30)),
        "cluster size",
    );
    refused(d, "version", &patched(&|b| put32(b, 4, 4)), "version 4");
    refused(
        d,
        "header-length",
        &patched(&|b| put32(b, 100, 1 << 30)),
        "header length",
    );
    refused(
        d,
        "refcount-order",
        &patched(&|b| put32(b, 96, 7)),
        "refcount order",
    );
    refused(d, "encrypted", &patched(&|b| put32(b, 32, 1)), "encrypted");
    refused(
        d,
        "extended-l2",
        &patched(&|b| put64(b, 72, 1 << 4)),
        "extended L2",
    );
    refused(
        d,
        "zstd",
        &patched(&|b| {
            put64(b, 72, 1 << 3);
            b[104] = 1;
        }),
        "zstd",
    );
    refused(
        d,
        "backing-name",
        &patched(&|b| {
            put64(b, 8, 400);
            put32(b, 16, 5000);
        }),
        "backing file name",
    );
    refused(d, "truncated", &good[..50], "truncated");
    // An unknown incompatible feature is named from the feature table when
    // the image has one; with 512-byte clusters ours has none, so by bit.
    refused(
        d,
        "unknown-feature",
        &patched(&|b| put64(b, 72, 1 << 40)),
        "bit 40",
    );
}

#[test]
fn unknown_features_are_named_from_the_feature_table() {
    let dir = tempdir();
    let p = dir.path().join("f.qcow2");
    create_image(&p, &CreateOptions::qcow2(1 << 20)).unwrap();
    let mut b = std::fs::read(&p).unwrap();
    put64(&mut b, 72, 1 << 1); // corrupt bit: readable, not writable
    std::fs::write(&p, &b).unwrap();
    open_image(&p, &OpenOptions::read_only()).expect("corrupt images stay readable");
    let err = open_image(&p, &OpenOptions::read_write())
        .err()
        .expect("corrupt image opened for writing");
    assert!(err.to_string().contains("marked corrupt"), "{err}");
    put64(&mut b, 72, 1 << 2);
    std::fs::write(&p, &b).unwrap();
    let err = open_image(&p, &OpenOptions::read_only()).err().unwrap();
    assert!(err.to_string().contains("external data file"), "{err}");
    // A dirty image (lazy refcounts, unclean shutdown) is not written to.
    put64(&mut b, 72, 1);
    std::fs::write(&p, &b).unwrap();
    let err = open_image(&p, &OpenOptions::read_write()).err().unwrap();
    assert!(err.to_string().contains("not closed cleanly"), "{err}");
}

#[test]
fn hostile_tables_give_errors_on_io() {
    let dir = tempdir();
    let d = dir.path();
    let good = sample(d);
    let l1_offset = u64::from_be_bytes(good[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_be_bytes(good[l1_offset..l1_offset + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    assert!(l2 != 0, "the sample has an L2 table");
    let l2 = l2 as usize;
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "l1-entry-outside",
            Box::new(move |b: &mut Vec<u8>| put64(b, l1_offset, (1 << 45) | (1 << 63))),
        ),
        (
            "l1-entry-unaligned",
            Box::new(move |b: &mut Vec<u8>| put64(b, l1_offset, 4100)),
        ),
        (
            "l2-entry-outside",
            Box::new(move |b: &mut Vec<u8>| put64(b, l2 + 8 * 3, (1 << 50) | (1 << 63))),
        ),
        (
            "compressed-outside",
            Box::new(move |b: &mut Vec<u8>| put64(b, l2 + 8 * 4, (1 << 62) | (1 << 40))),
        ),
        (
            "compressed-garbage",
            Box::new(move |b: &mut Vec<u8>| put64(b, l2 + 8 * 5, (1 << 62) | 512)),
        ),
        (
            "l2-is-header",
            Box::new(move |b: &mut Vec<u8>| put64(b, l1_offset, 1 << 63)),
        ),
    ];
    for (name, patch) in cases {
        let mut b = good.clone();
        patch(&mut b);
        let p = d.join(name);
        std::fs::write(&p, &b).unwrap();
        let img = open_image(&p, &OpenOptions::read_only()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let res = img.read_at(0, &mut buf);
        if name != "l2-entry-outside" && name != "l2-is-header" {
            let err = res
                .err()
                .unwrap_or_else(|| panic!("{name}: read succeeded"));
            assert!(matches!(err, DiskError::Corrupt { .. }), "{name}: {err}");
        }
        drop(img);
        exercise(name, b, d);
    }
}

fn overlay_naming(dir: &Path, name: &str, backing: &str) -> PathBuf {
    overlay_of(dir, name, backing, "qcow2")
}

/// A qcow2 image in `dir` naming `backing` (of `format`) unchecked, as a
/// downloaded image may.
fn overlay_of(dir: &Path, name: &str, backing: &str, format: &str) -> PathBuf {
    let p = dir.join(name);
    unchecked_overlay(&p, backing, format);
    p
}

#[test]
fn backing_chain_loops_and_odd_files_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    let me = overlay_naming(d, "self.qcow2", "self.qcow2");
    let err = open_image(&me, &OpenOptions::read_only()).err().unwrap();
    assert!(err.to_string().contains("loops"), "{err}");
    let a = overlay_naming(d, "a.qcow2", "b.qcow2");
    overlay_naming(d, "b.qcow2", "a.qcow2");
    let err = open_image(&a, &OpenOptions::read_only()).err().unwrap();
    assert!(err.to_string().contains("loops"), "{err}");
    // Devices and FIFOs that would block or never end are not images, even
    // where the backing policy allows them.
    let z = overlay_naming(d, "zero.qcow2", "/dev/zero");
    let err = open_image(&z, &OpenOptions::read_only()).err().unwrap();
    assert!(matches!(err, DiskError::BackingNotAllowed { .. }), "{err}");
    let allow_zero = OpenOptions::read_only()
        .with_backing_policy(BackingPolicy::vmlab().allowing(["/dev/zero"]));
    let err = open_image(&z, &allow_zero).err().unwrap();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    // A very deep chain stops at the limit.
    let mut prev = "leaf.qcow2".to_string();
    create_image(&d.join(&prev), &CreateOptions::qcow2(1 << 20)).unwrap();
    for i in 0..70 {
        let name = format!("level{i}.qcow2");
        overlay_naming(d, &name, &prev);
        prev = name;
    }
    let err = open_image(&d.join(&prev), &OpenOptions::read_only())
        .err()
        .unwrap();
    assert!(err.to_string().contains("deep"), "{err}");
}

/// The refusal `open_image` gives `image`, with the file it names.
fn refusal(image: &Path, opts: &OpenOptions) -> (BackingRefusal, PathBuf) {
    match open_image(image, opts) {
        Ok(_) => panic!("{}: a planted backing file was opened", image.display()),
        Err(DiskError::BackingNotAllowed {
            reason, backing, ..
        }) => (reason, backing),
        Err(e) => panic!("{}: expected a backing refusal, got: {e}", image.display()),
    }
}

#[test]
fn planted_backing_files_outside_the_image_directory_are_refused() {
    let dir = tempdir();
    let d = dir.path().canonicalize().unwrap();
    let lab = d.join("lab");
    std::fs::create_dir_all(lab.join(".ssh")).unwrap();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    let secret = d.join("secrets/id_ed25519");
    let mut key = b"-----BEGIN OPENSSH PRIVATE KEY-----".to_vec();
    key.resize(1 << 20, b'k');
    std::fs::write(&secret, &key).unwrap();
    std::fs::write(lab.join(".ssh/id_ed25519"), &key).unwrap();
    std::fs::write(lab.join("base.raw"), vec![7u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink(&secret, lab.join("innocent.raw")).unwrap();
    let ro = OpenOptions::read_only();

    // A sibling directory, by `..` or absolute name, or through a symlink
    // planted beside the image: all lead outside.
    for (name, backing) in [
        ("dotdot.qcow2", "../secrets/id_ed25519"),
        ("absolute.qcow2", secret.to_str().unwrap()),
        ("symlink.qcow2", "innocent.raw"),
    ] {
        let top = overlay_of(&lab, name, backing, "raw");
        assert_eq!(
            refusal(&top, &ro),
            (BackingRefusal::Outside, secret.clone()),
            "{name}"
        );
        let rw = OpenOptions::read_write();
        assert_eq!(refusal(&top, &rw).0, BackingRefusal::Outside, "{name}");
    }
    // Below the image's directory, but hidden: ~/disk.qcow2 naming .ssh/...
    let hidden = overlay_of(&lab, "hidden.qcow2", ".ssh/id_ed25519", "raw");
    assert_eq!(refusal(&hidden, &ro).0, BackingRefusal::Hidden);
    // Deeper in a chain, the top image's directory still decides.
    let mid = overlay_of(&lab, "mid.qcow2", "dotdot.qcow2", "qcow2");
    let err = open_image(&mid, &ro).err().unwrap();
    assert!(
        matches!(err, DiskError::BackingNotAllowed { ref image, .. } if image.ends_with("dotdot.qcow2")),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(secret.to_str().unwrap()) && msg.contains("--allow-backing"),
        "{msg}"
    );

    // The same images with the secret allowed open, and read it.
    let allowed =
        OpenOptions::read_only().with_backing_policy(BackingPolicy::vmlab().allowing([&secret]));
    for name in [
        "dotdot.qcow2",
        "absolute.qcow2",
        "symlink.qcow2",
        "mid.qcow2",
    ] {
        let img = open_image(&lab.join(name), &allowed).unwrap();
        let mut head = vec![0u8; 35];
        img.read_at(0, &mut head).unwrap();
        assert_eq!(head, key[..35], "{name}");
    }
    // A directory allows what lies below it.
    let by_dir = OpenOptions::read_only()
        .with_backing_policy(BackingPolicy::vmlab().allowing([d.join("secrets")]));
    open_image(&lab.join("dotdot.qcow2"), &by_dir).unwrap();
    // An ordinary backing file beside the image needs nothing.
    let plain = overlay_of(&lab, "plain.qcow2", "base.raw", "raw");
    open_image(&plain, &ro).unwrap();
}

/// Where the sample's metadata lies: L1 table, its first L2 table, the
/// refcount table and its first refcount block.
struct Layout {
    l1: usize,
    l2: usize,
    reftable: usize,
    refblock: usize,
}

fn be64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn layout(b: &[u8]) -> Layout {
    let l1 = be64_at(b, 40) as usize;
    let reftable = be64_at(b, 48) as usize;
    Layout {
        l1,
        l2: (be64_at(b, l1) & 0x00ff_ffff_ffff_fe00) as usize,
        reftable,
        refblock: (be64_at(b, reftable) & !511) as usize,
    }
}

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const CORRUPT_BIT: u64 = 1 << 1;

/// Opens the patched sample for writing and runs `attack`, then flushes and
/// closes it: it must fail with a corruption error, and the file must be
/// exactly as it was but for the corrupt bit in the header.
fn attack(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    attack: &dyn Fn(&dyn BlockBackend) -> Result<(), DiskError>,
) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let result = open_image(&p, &OpenOptions::read_write()).and_then(|img| {
        attack(img.as_ref())?;
        img.flush()
    });
    match result {
        Err(DiskError::Corrupt { .. }) => {}
        Err(e) => panic!("{name}: expected a corruption error, got: {e}"),
        Ok(()) => panic!("{name}: the attack went through"),
    }
    let after = std::fs::read(&p).unwrap();
    assert_eq!(after.len(), bytes.len(), "{name}: the file grew");
    let incompat = be64_at(&after, 72);
    assert_eq!(
        incompat,
        be64_at(bytes, 72) | CORRUPT_BIT,
        "{name}: not marked corrupt"
    );
    let mut expect = bytes.to_vec();
    expect[72..80].copy_from_slice(&incompat.to_be_bytes());
    if let Some(at) = (0..after.len()).find(|&i| after[i] != expect[i]) {
        panic!("{name}: the file changed at {at:#x}");
    }
    let err = open_image(&p, &OpenOptions::read_write()).err().unwrap();
    assert!(err.to_string().contains("marked corrupt"), "{name}: {err}");
    open_image(&p, &OpenOptions::read_only()).unwrap_or_else(|e| panic!("{name}: {e}"));
}

#[test]
fn guest_writes_and_frees_never_reach_metadata() {
    let dir = tempdir();
    let d = dir.path();
    let good = sample(d);
    let at = layout(&good);
    let cs = 512u64;
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    // Guest cluster 2 (bytes 1024..1536) is allocated in the sample.
    let entry2 = at.l2 + 2 * 8;
    let write = |img: &dyn BlockBackend| img.write_at(1024, &[0xee; 512]);
    for (name, target) in [
        ("data-at-l1", at.l1),
        ("data-at-l2", at.l2),
        ("data-at-reftable", at.reftable),
        ("data-at-refblock", at.refblock),
    ] {
        let copied = patched(&|b| put64(b, entry2, target as u64 | COPIED));
        attack(d, name, &copied, &write);
        // Without the flag the refcount (1) makes it look owned.
        let plain = patched(&|b| put64(b, entry2, target as u64));
        attack(d, &format!("{name}-not-copied"), &plain, &write);
    }
    // A compressed cluster whose offset rounds into the header: freeing it
    // (by a write over it, or a discard) would count the header down to 0
    // and punch it out of the file.
    let in_header = patched(&|b| put64(b, entry2, COMPRESSED | 100));
    attack(d, "compressed-in-header-write", &in_header, &write);
    attack(d, "compressed-in-header-discard", &in_header, &|img| {
        img.discard(1024, cs)
    });
    // Refcounts calling the header free: the next allocation would put guest
    // data over it.
    let header_free = patched(&|b| b[at.refblock..at.refblock + 2].fill(0));
    attack(d, "header-free", &header_free, &|img| {
        img.write_at(20 * cs, &[0xee; 512])
    });
    // Tables that overlap each other are found when the image is opened.
    let l2_on_reftable = patched(&|b| put64(b, at.l1, at.reftable as u64 | COPIED));
    attack(d, "l2-on-reftable", &l2_on_reftable, &write);
    let refblock_on_l1 = patched(&|b| put64(b, at.reftable, at.l1 as u64));
    attack(d, "refblock-on-l1", &refblock_on_l1, &write);

    // QEMU sees the mark too.
    let p = d.join("data-at-l1");
    let info = qemu_img_ok(&["info", "--output=json", p.to_str().unwrap()]);
    assert!(info.contains("\"corrupt\": true"), "{info}");
}

/// The snapshot operations that open chains themselves (commit and merge,
/// an overlay onto a layer for a restore, an overlay over a live image)
/// follow the same backing rule as opening an image does.
#[test]
fn chain_operations_refuse_planted_backing_files() {
    let dir = tempdir();
    let d = dir.path().canonicalize().unwrap();
    let lab = d.join("lab");
    std::fs::create_dir_all(&lab).unwrap();
    std::fs::create_dir_all(d.join("secrets")).unwrap();
    std::fs::create_dir_all(d.join("other")).unwrap();
    let secret = d.join("secrets/id_ed25519");
    let key = vec![b'k'; 1 << 20];
    std::fs::write(&secret, &key).unwrap();
    let vmlab_rule = BackingPolicy::vmlab();
    let refused_by = |err: DiskError, what: &str| {
        assert_eq!(err.to_string().lines().count(), 1, "{what}: {err}");
        match err {
            DiskError::BackingNotAllowed {
                backing,
                reason: BackingRefusal::Outside,
                ..
            } => assert!(backing.starts_with(&d), "{what}: {}", backing.display()),
            other => panic!("{what}: expected a backing refusal, got: {other}"),
        }
    };

    // A commit would write the overlay's data into the secret.
    let evil = overlay_of(&lab, "evil.qcow2", "../secrets/id_ed25519", "raw");
    let trusting = OpenOptions::read_write().with_backing_policy(anywhere());
    let img = open_image(&evil, &trusting).unwrap();
    img.write_at(0, &[0xee; 4096]).unwrap();
    drop(img);
    refused_by(commit_image(&evil, &vmlab_rule).unwrap_err(), "commit");
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        key,
        "the secret was written"
    );

    // A restore onto a layer whose chain leads to the secret.
    let top = lab.join("disk.qcow2");
    create_image(&top, &CreateOptions::qcow2(1 << 20)).unwrap();
    let before = std::fs::read(&top).unwrap();
    refused_by(
        overlay_onto(&top, &evil, &vmlab_rule).err().unwrap(),
        "overlay onto",
    );
    assert_eq!(std::fs::read(&top).unwrap(), before, "the disk changed");
    assert!(checked_backing_chain(&evil, &vmlab_rule).is_err());

    // A live overlay whose way down to the open image leaves the directory.
    let live_path = lab.join("live.qcow2");
    create_image(&live_path, &CreateOptions::qcow2(1 << 20)).unwrap();
    let live: std::sync::Arc<dyn BlockBackend> =
        std::sync::Arc::from(open_image(&live_path, &OpenOptions::read_write()).unwrap());
    overlay_of(
        &d.join("other"),
        "mid.qcow2",
        live_path.to_str().unwrap(),
        "qcow2",
    );
    let new = overlay_of(&lab, "new.qcow2", "../other/mid.qcow2", "qcow2");
    refused_by(
        open_overlay_over(&new, live.clone(), &vmlab_rule)
            .err()
            .unwrap(),
        "live overlay",
    );
    let allowing = vmlab_rule.clone().allowing([d.join("other")]);
    open_overlay_over(&new, live, &allowing).expect("allowed with --allow-backing");
}

/// A commit writes into its backing file through the same overlap checks
/// as a guest's writes: a backing file whose L2 table points a data
/// cluster at its L1 table is marked corrupt, its tables untouched.
#[test]
fn a_commit_never_writes_over_the_backing_files_metadata() {
    let dir = tempdir();
    let d = dir.path();
    let good = sample(d);
    let at = layout(&good);
    let mut base = good.clone();
    // Guest cluster 2 (bytes 1024..1536), allocated in the sample.
    put64(&mut base, at.l2 + 2 * 8, at.l1 as u64 | COPIED);
    std::fs::write(d.join("base.qcow2"), &base).unwrap();
    let top = d.join("top.qcow2");
    let mut opts = CreateOptions::qcow2(1 << 20);
    opts.cluster_size = 512;
    opts.backing = Some(d.join("base.qcow2"));
    create_image(&top, &opts).unwrap();
    let img = open_image(&top, &OpenOptions::read_write()).unwrap();
    img.write_at(1024, &[0xee; 512]).unwrap();
    drop(img);
    match commit_image(&top, &BackingPolicy::vmlab()) {
        Err(DiskError::Corrupt { .. }) => {}
        Err(e) => panic!("expected a corruption error, got: {e}"),
        Ok(done) => panic!("the commit went through: {done:?}"),
    }
    let after = std::fs::read(d.join("base.qcow2")).unwrap();
    let mut expect = base.clone();
    expect[72..80].copy_from_slice(&(be64_at(&base, 72) | CORRUPT_BIT).to_be_bytes());
    assert!(
        after == expect,
        "the backing file changed beyond its corrupt bit"
    );
}
