//! The VMM on this machine's own /dev/kvm with tiny hand-written guests
//! that only do port I/O and MMIO: the exit loop, bus dispatch, the UART in
//! both directions and the platform devices that end a VM.

mod support;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use support::tiny_guest::Program;
use support::Capture;
use vmlab::vmm::{BootSource, ConsoleConfig, ConsoleInput, ExitReason, Vm, VmConfig};

const LOAD_ADDR: u64 = 0x10_0000;

fn config(program: Program, input: ConsoleInput, out: Capture) -> VmConfig {
    VmConfig {
        name: "tiny".into(),
        cpus: 1,
        mem_size: 32 << 20,
        boot: BootSource::Flat {
            image: program.code,
            load_addr: LOAD_ADDR,
        },
        console: ConsoleConfig {
            input,
            output: Box::new(out),
        },
        disks: Vec::new(),
        boot_timer: false,
        started: Instant::now(),
        nets: Vec::new(),
        resume: None,
        new_generation: None,
        backing_policy: vmlab::disk::BackingPolicy::vmlab(),
    }
}

/// Runs a guest with a deadline so a broken exit path fails the test
/// instead of hanging it.
fn run_with_deadline(vm: Vm) -> ExitReason {
    let stop = vm.exit_signal();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            stop.request(ExitReason::Signal(libc::SIGALRM));
        }
    });
    let reason = vm.run().expect("VM runs");
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    reason
}

fn run(program: Program) -> (ExitReason, Vec<u8>) {
    let out = Capture::default();
    let vm = Vm::build(config(program, ConsoleInput::None, out.clone())).expect("VM builds");
    (run_with_deadline(vm), out.bytes())
}

fn pipe() -> (OwnedFd, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array we pass.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe {
        (
            OwnedFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

#[test]
fn guest_output_reaches_the_console_and_poweroff_ends_the_vm() {
    let (reason, out) = run(Program::new()
        .print(b"hello from a tiny guest\n")
        .poweroff());
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(out, b"hello from a tiny guest\n");
}

#[test]
fn console_input_reaches_the_guest_receive_register() {
    // Echo loop: wait for data ready (LSR bit 0), read RBR, flip the case
    // bit, write it back; stop after a newline.
    let p = Program::new();
    let top = p.here();
    let program = p
        .mov_dx(0x3fd)
        .in_al_dx()
        .test_al(1)
        .jz_back(top)
        .mov_dx(0x3f8)
        .in_al_dx()
        .mov_bl_al()
        .xor_al(0x20)
        .out_dx_al()
        .cmp_bl(b'\n')
        .jne_back(top)
        .poweroff();
    let (read_end, mut write_end) = pipe();
    // More than the UART's 64-byte FIFO, so input must be held back and
    // delivered as the guest drains it.
    let mut input = b"abcdefghijklmnopqrstuvwxyz".repeat(4);
    input.push(b'\n');
    write_end.write_all(&input).unwrap();
    drop(write_end);
    let out = Capture::default();
    let vm = Vm::build(config(program, ConsoleInput::Fd(read_end), out.clone())).unwrap();
    assert_eq!(run_with_deadline(vm), ExitReason::PowerOff);
    let expected: Vec<u8> = input.iter().map(|b| b ^ 0x20).collect();
    assert_eq!(out.bytes(), expected);
}

#[test]
fn unclaimed_mmio_reads_all_ones_and_writes_are_ignored() {
    let program = Program::new()
        .mov_al(0x42)
        .store_al(0xd800_0000)
        .load_al(0xd800_0000)
        .mov_dx(0x3f8)
        .out_dx_al()
        .poweroff();
    let (reason, out) = run(program);
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(out, [0xff]);
}

#[test]
fn virtio_mmio_registers_answer_on_the_mmio_bus() {
    // The first virtio-mmio window holds the entropy device: its magic
    // register reads "virt", one 32-bit load, printed byte by byte.
    let mut program = Program::new().load_eax(0xd000_0000).mov_dx(0x3f8);
    for _ in 0..4 {
        program = program.out_dx_al().shr_eax(8);
    }
    let (reason, out) = run(program.poweroff());
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(out, b"virt");
}

#[test]
fn unclaimed_ports_read_all_ones() {
    let program = Program::new()
        .mov_dx(0xcfc)
        .in_al_dx()
        .mov_dx(0x3f8)
        .out_dx_al()
        .poweroff();
    assert_eq!(run(program).1, [0xff]);
}

#[test]
fn acpi_reset_register_ends_the_vm_as_a_reboot() {
    let (reason, _) = run(Program::new().out(0x602, 1).spin());
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(reason.exit_code(), 0);
}

#[test]
fn i8042_reset_line_ends_the_vm_as_a_reboot() {
    let (reason, _) = run(Program::new().out(0x64, 0xfe).spin());
    assert_eq!(reason, ExitReason::Reset);
}

#[test]
fn a_jump_to_the_bios_reset_entry_resets_the_vm() {
    // Where Linux's BIOS reboot ends, and the path a kernel with EFI
    // support takes on vmlab's firmware-less, hardware-reduced machine:
    // vmlab's code at f000:fff0 turns it into a reset.
    let program = Program::new()
        .print(b"real mode next\n")
        .jump_to_bios_reset_entry(LOAD_ADDR);
    let (reason, out) = run(program);
    assert_eq!(
        reason,
        ExitReason::Reset,
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(out, b"real mode next\n");
}

#[test]
fn pvpanic_ends_the_vm_with_an_error() {
    let (reason, _) = run(Program::new().print(b"oops").out(0x505, 1).spin());
    assert_eq!(reason, ExitReason::GuestPanic);
    assert_ne!(reason.exit_code(), 0);
}

#[test]
fn boot_timer_port_records_userspace_start() {
    let out = Capture::default();
    let program = Program::new().out(0xe9, b'U').poweroff();
    let vm = Vm::build(config(program, ConsoleInput::None, out)).unwrap();
    let timeline = vm.timeline();
    assert_eq!(run_with_deadline(vm), ExitReason::PowerOff);
    let entry = timeline.first_vcpu_entry().expect("first entry recorded");
    let started = timeline.userspace_started().expect("signal recorded");
    assert!(started >= entry);
    assert!(timeline.vmm_cpu_before_entry().is_some());
}

#[test]
fn stop_request_ends_a_spinning_guest() {
    let out = Capture::default();
    let vm = Vm::build(config(
        Program::new().print(b"x").spin(),
        ConsoleInput::None,
        out,
    ))
    .unwrap();
    let stop = vm.exit_signal();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        stop.request(ExitReason::Signal(libc::SIGTERM));
    });
    assert_eq!(vm.run().unwrap(), ExitReason::Signal(libc::SIGTERM));
    stopper.join().unwrap();
}

#[test]
fn several_vcpus_are_created_and_the_boot_vcpu_runs() {
    let out = Capture::default();
    let mut cfg = config(
        Program::new().print(b"smp").poweroff(),
        ConsoleInput::None,
        out.clone(),
    );
    cfg.cpus = 4;
    let vm = Vm::build(cfg).unwrap();
    assert_eq!(run_with_deadline(vm), ExitReason::PowerOff);
    assert_eq!(out.bytes(), b"smp");
}
