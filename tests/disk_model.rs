//! Property test: random writes (any size and alignment, across cluster
//! boundaries, over backing data), zeroing, reads, flushes and reopens on a
//! qcow2 overlay must match a flat in-memory model; afterwards qemu-img
//! check finds nothing wrong and qemu-img compare finds the image identical
//! to the model written out raw.

mod disk_support;

use std::path::Path;

use disk_support::*;
use proptest::prelude::*;
use vmlab::disk::{
    create_image, open_image, BlockBackend, CreateOptions, ImageFormat, OpenOptions,
};

#[derive(Clone, Debug)]
enum Op {
    Write { at: u64, len: u64, seed: u64 },
    Zero { at: u64, len: u64, discard: bool },
    Read { at: u64, len: u64 },
    Flush,
    Reopen,
}

#[derive(Clone, Debug)]
enum Base {
    None,
    Raw,
    Qcow2 { cluster: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u64>(), 1u64..200_000, any::<u64>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        4 => (any::<u64>(), 1u64..4096, any::<u64>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        2 => (any::<u64>(), 1u64..300_000, any::<bool>()).prop_map(|(at, len, discard)| Op::Zero { at, len, discard }),
        3 => (any::<u64>(), 1u64..300_000).prop_map(|(at, len)| Op::Read { at, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn base() -> impl Strategy<Value = Base> {
    prop_oneof![
        Just(Base::None),
        Just(Base::Raw),
        prop_oneof![Just(4096u64), Just(65536)].prop_map(|cluster| Base::Qcow2 { cluster }),
    ]
}

/// Clamps a generated request into a disk of `size` bytes.
fn clamp(at: u64, len: u64, size: u64) -> (u64, u64) {
    let at = at % size;
    (at, len.min(size - at))
}

/// Opens read-write; a tiny metadata cache makes every few requests evict
/// (and write back) L2 tables and refcount blocks.
fn open_rw(path: &Path, tiny_cache: bool) -> Box<dyn BlockBackend> {
    let mut opts = OpenOptions::read_write();
    if tiny_cache {
        opts.cache_bytes = Some(1);
    }
    open_image(path, &opts).expect("open overlay")
}

fn run_case(base: Base, cluster: u64, size: u64, tiny_cache: bool, ops: Vec<Op>) {
    let dir = tempdir();
    let top = dir.path().join("top.qcow2");
    let mut model = vec![0u8; size as usize];
    // The base is a bit smaller than the overlay: reads past its end are zero.
    let base_size = size - 8192;
    let base_path = match base {
        Base::None => None,
        Base::Raw => {
            let p = dir.path().join("base.raw");
            let data = pattern(7, 0, base_size as usize);
            std::fs::write(&p, &data).unwrap();
            model[..base_size as usize].copy_from_slice(&data);
            Some(p)
        }
        Base::Qcow2 { cluster } => {
            let p = dir.path().join("base.qcow2");
            let mut opts = CreateOptions::qcow2(base_size);
            opts.cluster_size = cluster;
            create_image(&p, &opts).unwrap();
            let img = open_rw(&p, tiny_cache);
            // Every third 48 KiB stripe holds data; the rest stays unallocated.
            let stripe = 48 << 10;
            let mut at = 0;
            while at < base_size {
                let len = stripe.min(base_size - at);
                let data = pattern(11, at, len as usize);
                img.write_at(at, &data).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&data);
                at += 3 * stripe;
            }
            drop(img);
            Some(p)
        }
    };
    let opts = CreateOptions {
        size: Some(size),
        format: ImageFormat::Qcow2,
        cluster_size: cluster,
        backing: base_path,
        force: false,
        backing_policy: vmlab::disk::BackingPolicy::vmlab(),
    };
    create_image(&top, &opts).unwrap();
    let mut img = open_rw(&top, tiny_cache);
    for (i, stretch) in ops.split(|o| matches!(o, Op::Reopen)).enumerate() {
        if i > 0 {
            drop(img);
            img = open_rw(&top, tiny_cache);
        }
        apply_ops(img.as_ref(), &mut model, stretch);
    }
    let mut whole = vec![0u8; size as usize];
    img.read_at(0, &mut whole).unwrap();
    assert!(whole == model, "final contents differ from the model");
    drop(img);
    let leaks = qemu_check(&top);
    assert_eq!(leaks, 0, "a cleanly closed image must not leak clusters");
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    qemu_compare_identical(&top, &raw);
}

/// Applies `ops` to `img` and to a flat model; every read must agree.
fn apply_ops(img: &dyn BlockBackend, model: &mut [u8], ops: &[Op]) {
    let size = model.len() as u64;
    for op in ops {
        match *op {
            Op::Write { at, len, seed } => {
                let (at, len) = clamp(at, len, size);
                let data = pattern(seed, at, len as usize);
                // Split into a few buffers, as a descriptor chain would be.
                let cut1 = (len / 3) as usize;
                let cut2 = ((len / 2) as usize + 1).min(len as usize).max(cut1);
                let bufs = [
                    std::io::IoSlice::new(&data[..cut1]),
                    std::io::IoSlice::new(&data[cut1..cut2]),
                    std::io::IoSlice::new(&data[cut2..]),
                ];
                img.write_vectored_at(at, &bufs).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { at, len, discard } => {
                let (at, len) = clamp(at, len, size);
                if discard {
                    img.discard(at, len).unwrap();
                } else {
                    img.write_zeroes(at, len).unwrap();
                }
                model[at as usize..(at + len) as usize].fill(0);
            }
            Op::Read { at, len } => {
                let (at, len) = clamp(at, len, size);
                let mut buf = vec![0xaau8; len as usize];
                img.read_at(at, &mut buf).unwrap();
                assert!(
                    buf == model[at as usize..(at + len) as usize],
                    "read at {at} differs"
                );
            }
            Op::Flush | Op::Reopen => img.flush().unwrap(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn qcow2_overlay_matches_flat_model(
        base in base(),
        cluster in prop_oneof![Just(512u64), Just(4096), Just(65536)],
        extra in 0u64..64,
        tiny_cache in any::<bool>(),
        ops in prop::collection::vec(op(), 1..30),
    ) {
        // A size that is not a multiple of the cluster size.
        let size = (1 << 20) + extra * 512 + 8192;
        run_case(base, cluster, size, tiny_cache, ops);
    }

    #[test]
    fn raw_image_matches_flat_model(ops in prop::collection::vec(op(), 1..30)) {
        let dir = tempdir();
        let path = dir.path().join("disk.raw");
        let size = (1u64 << 20) + 4096;
        std::fs::write(&path, pattern(3, 0, size as usize)).unwrap();
        let mut model = pattern(3, 0, size as usize);
        let img = open_image(&path, &OpenOptions::read_write()).unwrap();
        apply_ops(img.as_ref(), &mut model, &ops);
        drop(img);
        assert!(std::fs::read(&path).unwrap() == model);
    }
}
