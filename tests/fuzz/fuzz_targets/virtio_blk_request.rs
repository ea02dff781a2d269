//! The guest as attacker: see `vmlab::devices::virtio::fuzzing::exercise_blk_request`
//! for the input format. Inputs that broke it live on in
//! tests/fuzz/regressions/virtio_blk_request/.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmlab::devices::virtio::fuzzing::{exercise_blk_request, scratch_disk_path};

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| scratch_disk_path("virtio_blk_request"))
}

fuzz_target!(|data: &[u8]| {
    let _ = exercise_blk_request(data, scratch());
});
