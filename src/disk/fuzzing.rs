//! The exercise the `qcow2_open` fuzz target runs on each input, kept in the
//! library so that the regression tests replay exactly what the fuzzer did.

use std::path::Path;

use super::backend::BlockBackend;
use super::lock::LockMode;
use super::open::{open_image, OpenOptions};

/// Writes `data` to `scratch`, opens it read-only and reads around, then
/// read-write and writes, zeroes and flushes. Errors are expected; panics,
/// hangs and huge allocations are bugs.
pub fn open_and_exercise(data: &[u8], scratch: &Path) {
    if std::fs::write(scratch, data).is_err() {
        return;
    }
    let mut opts = OpenOptions {
        lock: LockMode::None,
        ..OpenOptions::read_only()
    };
    if let Ok(img) = open_image(scratch, &opts) {
        read_around(img.as_ref());
    }
    opts.read_only = false;
    if let Ok(img) = open_image(scratch, &opts) {
        write_around(img.as_ref());
    }
    let _ = std::fs::remove_file(scratch);
}

/// Offsets spread over the disk (a bounded number).
fn offsets(size: u64) -> impl Iterator<Item = u64> {
    (0..16u64).map(move |i| ((size / 16).saturating_mul(i) + (i * 4093) % size).min(size - 1))
}

fn read_around(img: &dyn BlockBackend) {
    let size = img.size();
    if size == 0 {
        return;
    }
    let mut buf = vec![0u8; 128 << 10];
    for at in offsets(size) {
        let len = (buf.len() as u64).min(size - at) as usize;
        let _ = img.read_at(at, &mut buf[..len]);
    }
    let mut pos = 0;
    for _ in 0..64 {
        match img.block_status(pos, size - pos) {
            Ok((_, n)) if n > 0 => pos += n,
            _ => break,
        }
        if pos >= size {
            break;
        }
    }
}

fn write_around(img: &dyn BlockBackend) {
    let size = img.size();
    if size == 0 {
        return;
    }
    let buf = vec![0x5au8; 70_000];
    for (i, at) in offsets(size).enumerate() {
        let len = (buf.len() as u64).min(size - at) as usize;
        let _ = match i % 3 {
            0 => img.write_at(at, &buf[..len]),
            1 => img.discard(at, len as u64),
            _ => img.write_zeroes(at, len as u64),
        };
    }
    let _ = img.flush();
    read_around(img);
}
