//! The guest as attacker: see `vmlab::devices::virtio::fuzzing::exercise_mmio`
//! for the input format. Inputs that broke it live on in
//! tests/fuzz/regressions/virtio_mmio/.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmlab::devices::virtio::fuzzing::{exercise_mmio, scratch_disk_path};

fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| scratch_disk_path("virtio_mmio"))
}

fuzz_target!(|data: &[u8]| {
    let _ = exercise_mmio(data, scratch());
});
