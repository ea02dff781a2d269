//! The chain operations behind snapshots, natively, with qemu-img as the
//! referee: commit against `qemu-img commit`, merge, freeze and its undo,
//! an overlay over a layer (restore), stacking over an open image (live
//! snapshot), and kill -9 in the middle of a commit and of a merge.

mod disk_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use disk_support::*;
use vmlab::disk::{
    backing_chain, commit_image, create_image, freeze_top, merge_into_backing, open_image,
    open_overlay_over, overlay_onto, unfreeze_top, BackingPolicy, BlockBackend, CreateOptions,
    DiskError, ImageFormat, OpenOptions,
};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qcow2(path: &Path, size: u64, cluster: u64, backing: Option<&Path>) {
    let opts = CreateOptions {
        size: Some(size),
        format: ImageFormat::Qcow2,
        cluster_size: cluster,
        backing: backing.map(Path::to_path_buf),
        ..CreateOptions::qcow2(size)
    };
    create_image(path, &opts).unwrap();
}

/// Patterned writes and a discard through vmlab, at offsets that straddle
/// clusters of every size used here.
fn scribble(path: &Path, seed: u64) {
    let img = open_image(path, &OpenOptions::read_write()).unwrap();
    let size = img.size();
    for i in 0..12u64 {
        let at = (i * 700_001 + seed * 13_313) % (size - 300_000);
        let len = 1 + (i * 51_234 + seed) % 200_000;
        img.write_at(at, &pattern(seed ^ i, at, len as usize))
            .unwrap();
    }
    img.discard(size / 2, 3 * 65536 + 4096).unwrap();
    img.flush().unwrap();
}

/// Writes of QEMU's own: plain, zeroed and compressed clusters, at
/// cluster-aligned places spread over an image of `size` bytes.
fn qemu_scribble(path: &Path, size: u64, cluster: u64) {
    let c = cluster;
    let at = |eighths: u64| size * eighths / 8 / c * c;
    let cmds = [
        format!("write -P 0x41 {} {}", at(1), c + c / 2),
        format!("write -z {} {}", at(3), c),
        format!("write -c -P 0x42 {} {}", at(5), c),
        format!("write -P 0x43 {} 1000", at(7) + 17),
    ];
    let mut args = vec!["-f", "qcow2"];
    for cmd in &cmds {
        args.push("-c");
        args.push(cmd);
    }
    args.push(s(path));
    let out = qemu("qemu-io", &args);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !said.contains("error") && !said.contains("failed"),
        "qemu-io: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
}

#[test]
fn commit_writes_what_qemu_img_commit_writes() {
    let dir = tempdir();
    let d = dir.path();
    for (cluster, raw_base, grow) in [
        (65536u64, false, false),
        (4096, false, true),
        (512, false, false),
        (2 << 20, false, false),
        (65536, true, true),
    ] {
        let tag = format!("c{cluster}-{}-{}", raw_base as u8, grow as u8);
        let base = d.join(format!("{tag}-base"));
        let size = 12 * MIB;
        if raw_base {
            std::fs::write(&base, pattern(7, 0, size as usize)).unwrap();
        } else {
            qcow2(&base, size, cluster, None);
            scribble(&base, 1);
        }
        let top = d.join(format!("{tag}-top.qcow2"));
        qcow2(&top, size, cluster.max(4096), Some(&base));
        // QEMU compresses only clusters not allocated yet: its writes first.
        qemu_scribble(&top, size, cluster.max(4096));
        scribble(&top, 2);
        if grow {
            vmlab::disk::resize_image(&top, size + 5 * MIB, &BackingPolicy::vmlab()).unwrap();
            let img = open_image(&top, &OpenOptions::read_write()).unwrap();
            img.write_at(size + MIB, &pattern(3, 0, 70_000)).unwrap();
        }
        let expected = read_image(&top);

        // The same pair, twice: one for vmlab, one for qemu-img.
        let (qbase, qtop) = (
            d.join(format!("{tag}-qbase")),
            d.join(format!("{tag}-qtop")),
        );
        copy(&base, &qbase);
        copy(&top, &qtop);
        let fmt = if raw_base { "raw" } else { "qcow2" };
        qemu_img_ok(&[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            fmt,
            "-b",
            s(&qbase),
            s(&qtop),
        ]);

        let outcome = commit_image(&top, &BackingPolicy::vmlab()).unwrap();
        assert_eq!(outcome.backing, base, "{tag}");
        // (2 MiB clusters: every zeroing here is partial, written as data.)
        let zeroed = outcome.bytes_zeroed > 0 || cluster == 2 << 20;
        assert!(outcome.bytes_copied > 0 && zeroed, "{tag}: {outcome:?}");
        qemu_img_ok(&["commit", "-d", "-f", "qcow2", s(&qtop)]);

        assert_eq!(
            read_image(&base),
            expected,
            "{tag}: the base reads as the top did"
        );
        assert_eq!(read_image(&top), expected, "{tag}: the top is untouched");
        if !raw_base {
            qemu_check(&base);
        }
        let out = qemu(
            "qemu-img",
            &["compare", "-f", fmt, "-F", fmt, s(&base), s(&qbase)],
        );
        assert!(
            out.status.success(),
            "{tag}: vmlab's and qemu-img's commits differ: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn merge_leaves_one_image_under_the_top_name() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qcow2(&base, 8 * MIB, 65536, None);
    scribble(&base, 4);
    let mid = d.join("mid.qcow2");
    qcow2(&mid, 8 * MIB, 65536, Some(&base));
    scribble(&mid, 5);
    let top = d.join("top.qcow2");
    qcow2(&top, 8 * MIB, 65536, Some(&mid));
    scribble(&top, 6);
    std::fs::set_permissions(&mid, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    let expected = read_image(&top);

    assert_eq!(
        merge_into_backing(&top, &BackingPolicy::vmlab()).unwrap(),
        mid
    );
    assert!(!mid.exists(), "the middle layer is gone");
    assert_eq!(
        backing_chain(&top).unwrap(),
        vec![top.clone(), base.clone()]
    );
    assert_eq!(read_image(&top), expected);
    qemu_check(&top);
    let mode = std::fs::metadata(&top).unwrap().permissions();
    assert!(
        !mode.readonly(),
        "the merged image keeps the top's permissions"
    );
    let info = qemu_img_ok(&["info", "--backing-chain", s(&top)]);
    assert!(info.contains("base.qcow2"), "{info}");

    // Nothing to merge with, or a layer elsewhere: one clear error each.
    let err = merge_into_backing(&base, &BackingPolicy::vmlab())
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no backing file"), "{err}");
    let other = tempdir();
    let far = other.path().join("far.qcow2");
    qcow2(&far, 8 * MIB, 65536, Some(&top));
    let err = merge_into_backing(&far, &BackingPolicy::vmlab())
        .unwrap_err()
        .to_string();
    assert!(err.contains("another directory"), "{err}");
}

#[test]
fn merge_refuses_a_backing_file_another_process_reads() {
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qcow2(&base, 4 * MIB, 65536, None);
    let top = d.join("top.qcow2");
    qcow2(&top, 4 * MIB, 65536, Some(&base));
    scribble(&top, 1);
    let sibling = d.join("sibling.qcow2");
    qcow2(&sibling, 4 * MIB, 65536, Some(&base));
    let before = read_image(&base);
    // A reader of the shared base (as a running clone would be).
    let reader = open_image(&sibling, &OpenOptions::read_only()).unwrap();
    let err = merge_into_backing(&top, &BackingPolicy::vmlab()).unwrap_err();
    assert!(matches!(err, DiskError::Locked { .. }), "{err}");
    drop(reader);
    assert_eq!(read_image(&base), before, "nothing written");
    assert!(base.exists());
}

#[test]
fn freeze_puts_an_empty_overlay_on_top_and_unfreeze_undoes_it() {
    let dir = tempdir();
    let d = dir.path();
    let top = d.join("disk.qcow2");
    qcow2(&top, 6 * MIB, 65536, None);
    scribble(&top, 9);
    let expected = read_image(&top);
    let layer = d.join("disk.frozen-1.qcow2");

    let frozen = freeze_top(&top, &layer).unwrap();
    assert_eq!(
        backing_chain(&top).unwrap(),
        vec![top.clone(), layer.clone()]
    );
    assert_eq!(read_image(&top), expected);
    assert!(std::fs::metadata(&layer).unwrap().permissions().readonly());
    qemu_check(&top);
    qemu_check(&layer);
    // The name is taken: a second freeze to it fails and changes nothing.
    let err = freeze_top(&top, &layer).unwrap_err();
    assert!(matches!(err, DiskError::Exists { .. }), "{err}");
    assert_eq!(backing_chain(&top).unwrap().len(), 2);

    unfreeze_top(&frozen).unwrap();
    assert!(!layer.exists());
    assert_eq!(backing_chain(&top).unwrap(), vec![top.clone()]);
    assert_eq!(read_image(&top), expected);
    assert!(!std::fs::metadata(&top).unwrap().permissions().readonly());
    // A layer must be a name beside the top.
    let err = freeze_top(&top, &d.join("sub/x.qcow2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("directory of"), "{err}");
}

#[test]
fn an_overlay_onto_a_layer_restores_it_and_replaces_the_top() {
    let dir = tempdir();
    let d = dir.path();
    let top = d.join("disk.qcow2");
    qcow2(&top, 6 * MIB, 65536, None);
    scribble(&top, 1);
    let layer = d.join("disk.frozen-1.qcow2");
    freeze_top(&top, &layer).unwrap();
    let at_snapshot = read_image(&top);
    scribble(&top, 2);
    assert_ne!(read_image(&top), at_snapshot);

    overlay_onto(&top, &layer, &BackingPolicy::vmlab()).unwrap();
    assert_eq!(read_image(&top), at_snapshot);
    assert_eq!(
        backing_chain(&top).unwrap(),
        vec![top.clone(), layer.clone()]
    );
    qemu_check(&top);
    // Not while a process writes the top.
    let writer = open_image(&top, &OpenOptions::read_write()).unwrap();
    let err = overlay_onto(&top, &layer, &BackingPolicy::vmlab()).unwrap_err();
    assert!(matches!(err, DiskError::Locked { .. }), "{err}");
    drop(writer);
}

#[test]
fn a_live_image_is_stacked_under_a_new_overlay_without_closing_it() {
    let dir = tempdir();
    let d = dir.path();
    let top = d.join("disk.qcow2");
    qcow2(&top, 6 * MIB, 65536, None);
    let live: Arc<dyn BlockBackend> =
        Arc::from(open_image(&top, &OpenOptions::read_write()).unwrap());
    live.write_at(MIB, &pattern(1, MIB, 300_000)).unwrap();
    let layer = d.join("disk.frozen-1.qcow2");
    freeze_top(&top, &layer).unwrap();
    // Until the switch, writes still go to the (renamed) old image.
    live.write_at(3 * MIB, &pattern(2, 3 * MIB, 5000)).unwrap();

    // An overlay over some other file is refused.
    let stranger = d.join("stranger.qcow2");
    qcow2(&stranger, 6 * MIB, 65536, None);
    let wrong = d.join("wrong.qcow2");
    qcow2(&wrong, 6 * MIB, 65536, Some(&stranger));
    let err = open_overlay_over(&wrong, live.clone(), &BackingPolicy::vmlab())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not lead to the open image"), "{err}");

    // A freeze the VM was never switched to (its command was killed), then
    // another: the new overlay reaches the open image through the first.
    let unswitched = d.join("disk.frozen-2.qcow2");
    freeze_top(&top, &unswitched).unwrap();
    let new = open_overlay_over(&top, live.clone(), &BackingPolicy::vmlab()).unwrap();
    assert_eq!(
        backing_chain(&top).unwrap(),
        vec![top.clone(), unswitched.clone(), layer.clone()]
    );
    let writing = qemu_once("qemu-img", &["info", s(&layer)]);
    assert!(!writing.status.success(), "QEMU sees the layer written to");
    live.freeze().unwrap();
    // Frozen, the layer is a backing file QEMU may read beside us.
    qemu_img_ok(&["info", s(&layer)]);
    assert!(live.is_read_only());
    assert!(
        live.write_at(0, b"x").is_err(),
        "a frozen image takes no writes"
    );
    new.write_at(MIB, &pattern(3, MIB, 4096)).unwrap();
    new.flush().unwrap();

    // The layer holds everything written before the switch, the top the rest;
    // others may now read the layer, but not write it.
    let mut expected_layer = vec![0u8; 6 * MIB as usize];
    expected_layer[MIB as usize..MIB as usize + 300_000].copy_from_slice(&pattern(1, MIB, 300_000));
    expected_layer[3 * MIB as usize..3 * MIB as usize + 5000].copy_from_slice(&pattern(
        2,
        3 * MIB,
        5000,
    ));
    let reader = open_image(&layer, &OpenOptions::read_only()).unwrap();
    let mut got = vec![0u8; 6 * MIB as usize];
    reader.read_at(0, &mut got).unwrap();
    assert_eq!(got, expected_layer);
    drop(reader);
    let err = open_image(&layer, &OpenOptions::read_write())
        .err()
        .unwrap();
    assert!(matches!(err, DiskError::Locked { .. }), "{err}");
    drop(new);
    drop(live);
    qemu_check(&layer);
    qemu_check(&top);
    let mut expected_top = expected_layer;
    expected_top[MIB as usize..MIB as usize + 4096].copy_from_slice(&pattern(3, MIB, 4096));
    assert_eq!(read_image(&top), expected_top);
}

// --- kill -9 in the middle of a commit and of a merge ------------------------

const CHILD_TOP: &str = "VMLAB_CHAIN_CRASH_TOP";
const CHILD_MERGE: &str = "VMLAB_CHAIN_CRASH_MERGE";
const CHILD_STARTED: &str = "VMLAB_CHAIN_CRASH_STARTED";

#[test]
#[ignore = "child process of kill_during_commit_or_merge_loses_nothing, which runs it"]
fn chain_crash_child() {
    let top = PathBuf::from(std::env::var(CHILD_TOP).expect("run by the crash test"));
    std::fs::write(std::env::var(CHILD_STARTED).unwrap(), b"").unwrap();
    if std::env::var(CHILD_MERGE).is_ok() {
        merge_into_backing(&top, &BackingPolicy::vmlab()).unwrap();
    } else {
        commit_image(&top, &BackingPolicy::vmlab()).unwrap();
    }
    // Done: wait to be killed like the others.
    std::thread::sleep(Duration::from_secs(60));
}

/// A base, and an overlay holding 24 MiB of its own over it.
fn crash_pair(d: &Path, round: u64) -> (PathBuf, PathBuf) {
    let base = d.join(format!("base-{round}.qcow2"));
    qcow2(&base, 32 * MIB, 65536, None);
    scribble(&base, round);
    let top = d.join(format!("top-{round}.qcow2"));
    qcow2(&top, 32 * MIB, 65536, Some(&base));
    let img = open_image(&top, &OpenOptions::read_write()).unwrap();
    for i in 0..24u64 {
        // Every other MiB, so that runs end and start again.
        let at = (i * 2 * MIB + round * 4096) % (31 * MIB);
        img.write_at(at, &pattern(round ^ i, at, MIB as usize))
            .unwrap();
    }
    img.discard(MIB / 2, 3 * 65536).unwrap();
    drop(img);
    (base, top)
}

#[test]
fn kill_during_commit_or_merge_loses_nothing() {
    let dir = tempdir();
    let d = dir.path();
    // How long one takes here, so that the kills land inside it.
    let (_, top) = crash_pair(d, 99);
    let started = std::time::Instant::now();
    commit_image(&top, &BackingPolicy::vmlab()).unwrap();
    let span = started.elapsed().as_millis().max(1) as u64;
    let (mut partial, mut whole) = (0, 0);
    for round in 0..16u64 {
        let merge = round % 2 == 1;
        let (base, top) = crash_pair(d, round);
        let expected = read_image(&top);
        let flag = d.join(format!("started-{round}"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "chain_crash_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_TOP, &top)
            .env(CHILD_STARTED, &flag)
            .envs(merge.then_some((CHILD_MERGE, "1")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while !flag.exists() {
            assert!(child.try_wait().unwrap().is_none(), "the child died");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis((round * 7919) % (2 * span + 1)));
        child.kill().unwrap();
        child.wait().unwrap();
        // The top path always reads as before; whatever is left is clean.
        assert_eq!(read_image(&top), expected, "round {round}: content changed");
        qemu_check(&top);
        let done = if merge {
            !base.exists()
        } else {
            read_image(&base) == expected
        };
        if base.exists() {
            qemu_check(&base);
        }
        if done {
            whole += 1;
        } else {
            partial += 1;
        }
        if !merge && !done {
            // An interrupted commit can be run again to the end.
            commit_image(&top, &BackingPolicy::vmlab()).unwrap();
            assert_eq!(read_image(&base), expected, "round {round}");
        }
    }
    eprintln!("commit takes {span} ms here; {partial} kills landed mid-way, {whole} after the end");
    assert!(partial > 0, "no kill landed in the middle of an operation");
}
