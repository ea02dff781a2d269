//! Whatever reaches a VM's control socket: see
//! `vmlab::control::fuzzing::exercise_control` for the input format. Inputs
//! that broke it live on in tests/fuzz/regressions/control_protocol/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmlab::control::fuzzing::exercise_control(data);
});
