//! Opens fuzzer-made bytes as a disk image (qcow2 when they carry the magic),
//! reads from it, then writes to it: hostile headers, tables and compressed
//! clusters must give errors, never a panic, a hang or an unbounded
//! allocation. Inputs that broke it live on in
//! tests/fuzz/regressions/qcow2_open/.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let scratch = Path::new(dir).join(format!("vmlab-fuzz-{}.img", std::process::id()));
    vmlab::disk::fuzzing::open_and_exercise(data, &scratch);
});
