//! Interoperability with qemu-img: images QEMU makes (cluster sizes, backing
//! chains, compression, version 2, refcount widths) read correctly and take
//! writes; images vmlab writes pass `qemu-img check` and read back through
//! `qemu-img convert`.

mod disk_support;

use std::path::{Path, PathBuf};

use disk_support::*;
use vmlab::disk::{
    create_image, open_image, resize_image, BlockBackend, CreateOptions, OpenOptions,
};

/// A raw file of `size` bytes with patterned data in scattered extents and
/// holes elsewhere; returns its contents.
fn make_raw(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    let mut at = 4096u64;
    let mut step = 0u64;
    while at < size {
        let len = (8192 + (step * 37_000) % 200_000).min(size - at);
        data[at as usize..(at + len) as usize].copy_from_slice(&pattern(seed, at, len as usize));
        at += len + 150_000 + (step * 91_000) % 300_000;
        step += 1;
    }
    // Compressible runs too, so `convert -c` really compresses something.
    let run = (size / 3) as usize;
    data[run..run + 70_000].fill(0x5a);
    std::fs::write(path, &data).unwrap();
    data
}

fn read_all(img: &dyn BlockBackend) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    // Odd-sized chunks so reads cross cluster boundaries at every offset.
    let mut at = 0;
    while at < buf.len() {
        let n = 77_777.min(buf.len() - at);
        img.read_at(at as u64, &mut buf[at..at + n]).unwrap();
        at += n;
    }
    buf
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn convert_to_raw(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("converted.raw");
    qemu_img_ok(&["convert", "-O", "raw", s(img), s(&out)]);
    std::fs::read(out).unwrap()
}

#[test]
fn reads_qemu_images_of_every_cluster_size_plain_and_compressed() {
    let dir = tempdir();
    let raw = dir.path().join("src.raw");
    let size = 6 << 20;
    let data = make_raw(&raw, size, 1);
    for cluster in ["512", "4k", "64k", "512k", "2M"] {
        for compressed in [false, true] {
            let q = dir.path().join(format!("q-{cluster}-{compressed}.qcow2"));
            let opt = format!("cluster_size={cluster}");
            let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", &opt];
            if compressed {
                args.push("-c");
            }
            args.extend([s(&raw), s(&q)]);
            qemu_img_ok(&args);
            let img = open_image(&q, &OpenOptions::read_only()).unwrap();
            assert!(
                read_all(img.as_ref()) == data,
                "cluster {cluster} compressed {compressed}: contents differ"
            );
        }
    }
}

#[test]
fn reads_version_2_images_and_every_refcount_width() {
    let dir = tempdir();
    let raw = dir.path().join("src.raw");
    let data = make_raw(&raw, 3 << 20, 2);
    for opts in [
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=8",
        "refcount_bits=64",
    ] {
        let q = dir.path().join("q.qcow2");
        let _ = std::fs::remove_file(&q);
        qemu_img_ok(&["convert", "-O", "qcow2", "-o", opts, s(&raw), s(&q)]);
        let img = open_image(&q, &OpenOptions::read_write()).unwrap();
        assert!(read_all(img.as_ref()) == data, "{opts}: contents differ");
        // And take writes: overwrite, allocate, zero.
        let mut expect = data.clone();
        for (i, at) in [0u64, 70_000, 1 << 20, (3 << 20) - 5000]
            .into_iter()
            .enumerate()
        {
            let len = 5000usize.min((3 << 20) - at as usize);
            let bytes = pattern(100 + i as u64, at, len);
            img.write_at(at, &bytes).unwrap();
            expect[at as usize..at as usize + len].copy_from_slice(&bytes);
        }
        img.write_zeroes(1 << 21, 300_000).unwrap();
        expect[1 << 21..(1 << 21) + 300_000].fill(0);
        drop(img);
        assert_eq!(qemu_check(&q), 0, "{opts}: leaks");
        assert!(
            convert_to_raw(&q, dir.path()) == expect,
            "{opts}: qemu reads other data"
        );
    }
}

#[test]
fn writes_over_compressed_clusters_free_them() {
    let dir = tempdir();
    let raw = dir.path().join("src.raw");
    let size = 4u64 << 20;
    let mut data = make_raw(&raw, size, 3);
    let q = dir.path().join("c.qcow2");
    qemu_img_ok(&["convert", "-c", "-O", "qcow2", s(&raw), s(&q)]);
    let img = open_image(&q, &OpenOptions::read_write()).unwrap();
    // Partial writes into compressed clusters copy the rest of the cluster.
    for at in (0..size).step_by(300_000) {
        let bytes = pattern(at, at, 3000);
        img.write_at(at, &bytes).unwrap();
        data[at as usize..at as usize + 3000].copy_from_slice(&bytes);
    }
    img.discard(size / 3, 200_000).unwrap();
    data[(size / 3) as usize..(size / 3) as usize + 200_000].fill(0);
    drop(img);
    assert_eq!(qemu_check(&q), 0, "clusters leaked or corrupt");
    assert!(convert_to_raw(&q, dir.path()) == data);
}

fn qemu_io(img: &Path, fmt: &str, cmd: &str) {
    let out = qemu("qemu-io", &["-f", fmt, "-c", cmd, s(img)]);
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn reads_and_writes_backing_chains_made_by_qemu_img() {
    let dir = tempdir();
    let sub = dir.path().join("images");
    std::fs::create_dir(&sub).unwrap();
    let base = sub.join("base.raw");
    make_raw(&base, 5 << 20, 4);
    let mid = sub.join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    // Relative names: mid names its backing relative to its own directory.
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
    ]);
    qemu_io(&mid, "qcow2", "write -P 0x11 60k 10k");
    qemu_io(&mid, "qcow2", "write -z 1M 128k");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "images/mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "6M",
    ]);
    qemu_io(&top, "qcow2", "write -P 0x22 100k 70k");
    let expect = convert_to_raw(&top, dir.path());
    let img = open_image(&top, &OpenOptions::read_write()).unwrap();
    assert_eq!(img.size(), 6 << 20);
    assert!(
        read_all(img.as_ref()) == expect,
        "chain reads differ from qemu-img's"
    );
    // Copy-on-write over the chain: partial writes keep the rest of each cluster.
    let mut expect = expect;
    for at in [1000u64, 65_000, (1 << 20) + 4097, (5 << 20) - 100] {
        let bytes = pattern(at, at, 777);
        img.write_at(at, &bytes).unwrap();
        expect[at as usize..at as usize + 777].copy_from_slice(&bytes);
    }
    drop(img);
    assert_eq!(qemu_check(&top), 0);
    assert!(convert_to_raw(&top, dir.path()) == expect);
}

#[test]
fn images_vmlab_writes_pass_check_at_every_cluster_size() {
    let dir = tempdir();
    for cluster in [512u64, 4096, 65536, 1 << 21] {
        let q: PathBuf = dir.path().join(format!("v-{cluster}.qcow2"));
        let size = 8u64 << 20;
        let mut opts = CreateOptions::qcow2(size);
        opts.cluster_size = cluster;
        create_image(&q, &opts).unwrap();
        let mut expect = vec![0u8; size as usize];
        let img = open_image(&q, &OpenOptions::read_write()).unwrap();
        let mut at = 123u64;
        let mut i = 0;
        while at < size {
            let len = (1000 + (i * 7919) % 150_000).min(size - at);
            let bytes = pattern(i, at, len as usize);
            img.write_at(at, &bytes).unwrap();
            expect[at as usize..(at + len) as usize].copy_from_slice(&bytes);
            at += len + (i * 104_729) % 400_000;
            i += 1;
        }
        img.flush().unwrap();
        drop(img);
        assert_eq!(qemu_check(&q), 0, "cluster {cluster}");
        assert!(
            convert_to_raw(&q, dir.path()) == expect,
            "cluster {cluster}: qemu reads other data"
        );
    }
}

#[test]
fn refcount_table_grows_and_stays_consistent() {
    // 512-byte clusters: one refcount block covers 128 KiB and a one-cluster
    // table 8 MiB, so 12 MiB of data forces new blocks and a new table.
    let dir = tempdir();
    let q = dir.path().join("grow.qcow2");
    let size = 16u64 << 20;
    let mut opts = CreateOptions::qcow2(size);
    opts.cluster_size = 512;
    create_image(&q, &opts).unwrap();
    let img = open_image(&q, &OpenOptions::read_write()).unwrap();
    let mut expect = vec![0u8; size as usize];
    let chunk = 256 << 10;
    for at in (0..12u64 << 20).step_by(chunk) {
        let bytes = pattern(at, at, chunk);
        img.write_at(at, &bytes).unwrap();
        expect[at as usize..at as usize + chunk].copy_from_slice(&bytes);
    }
    drop(img);
    let header = std::fs::read(&q).unwrap();
    let table_clusters = u32::from_be_bytes(header[56..60].try_into().unwrap());
    assert!(table_clusters > 1, "the refcount table did not grow");
    assert_eq!(qemu_check(&q), 0);
    assert!(convert_to_raw(&q, dir.path()) == expect);
}

#[test]
fn resize_grows_the_l1_table_and_keeps_data() {
    let dir = tempdir();
    let q = dir.path().join("r.qcow2");
    let mut opts = CreateOptions::qcow2(1 << 20);
    opts.cluster_size = 512; // one L2 table covers 32 KiB: growth moves L1
    create_image(&q, &opts).unwrap();
    let img = open_image(&q, &OpenOptions::read_write()).unwrap();
    let bytes = pattern(5, 0, 100_000);
    img.write_at(900_000, &bytes).unwrap();
    drop(img);
    resize_image(&q, 64 << 20, &vmlab::disk::BackingPolicy::vmlab()).unwrap();
    let info = qemu_img_ok(&["info", "--output=json", s(&q)]);
    assert_eq!(json_number(&info, "virtual-size"), Some(64 << 20));
    assert_eq!(qemu_check(&q), 0);
    let img = open_image(&q, &OpenOptions::read_write()).unwrap();
    let mut back = vec![0u8; 100_000];
    img.read_at(900_000, &mut back).unwrap();
    assert!(back == bytes);
    img.write_at((64 << 20) - 4096, &[9u8; 4096]).unwrap();
    drop(img);
    assert_eq!(qemu_check(&q), 0);
    let raw = convert_to_raw(&q, dir.path());
    assert!(raw[(64 << 20) - 4096..].iter().all(|&b| b == 9));
    assert!(raw[900_000..1_000_000] == bytes[..]);
}
