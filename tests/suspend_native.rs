//! Suspend and resume of a whole VM on this machine's own /dev/kvm, with a
//! tiny hand-written guest that counts in a register and in memory and
//! prints the count's high bits on the UART: suspended to a state file and
//! resumed in a new VM, it goes on from where it was (registers, memory,
//! UART and the in-kernel chips came back), and a state that does not fit
//! the new VM is refused in one line.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::tiny_guest::Program;
use support::Capture;
use vmlab::vmm::{BootSource, ConsoleConfig, ConsoleInput, ExitReason, Vm, VmConfig};

const LOAD_ADDR: u64 = 0x10_0000;
/// Where the guest keeps its count in memory.
const COUNT_ADDR: u32 = 0x30_0000;
/// The guest prints the count's bits above these, each time they change.
const SHIFT: u8 = 8;

impl Capture {
    fn wait_for(&self, len: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.bytes().len() < len {
            assert!(
                Instant::now() < deadline,
                "the guest printed {:?}",
                self.bytes()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Counts in ebx and at COUNT_ADDR, checks they agree (else prints X and
/// halts), and prints `count >> SHIFT` on the UART whenever the bits below
/// are zero.
fn counter() -> Program {
    let p = Program::new();
    let top = p.here();
    let p = p
        .inc_mem32(COUNT_ADDR)
        .inc_ebx()
        .load_eax(u64::from(COUNT_ADDR))
        .cmp_eax_ebx()
        .jne_over(17);
    let body = p.here();
    let p = p
        .test_eax((1 << SHIFT) - 1)
        .jne_back(top)
        .shr_eax(SHIFT)
        .mov_dx(0x3f8)
        .out_dx_al()
        .jmp_back(top);
    assert_eq!(p.here() - body, 17);
    p.print(b"X").halt_forever()
}

fn config(out: Capture, mem_size: u64, resume: Option<&Path>) -> VmConfig {
    VmConfig {
        name: "counter".into(),
        cpus: 1,
        mem_size,
        boot: BootSource::Flat {
            image: counter().code,
            load_addr: LOAD_ADDR,
        },
        console: ConsoleConfig {
            input: ConsoleInput::None,
            output: Box::new(out),
        },
        disks: Vec::new(),
        boot_timer: false,
        started: Instant::now(),
        net: None,
        resume: resume.map(Path::to_path_buf),
        backing_policy: vmlab::disk::BackingPolicy::vmlab(),
    }
}

/// Runs `vm` on a thread of its own, stopped after 30 s should the test
/// hang.
fn spawn(vm: Vm) -> std::thread::JoinHandle<ExitReason> {
    let stop = vm.exit_signal();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            stop.request(ExitReason::Signal(libc::SIGALRM));
        }
    });
    std::thread::spawn(move || {
        let reason = vm.run().expect("VM runs");
        let _ = done_tx.send(());
        reason
    })
}

/// Each byte is the one before plus one (mod 256): the count went on.
fn assert_consecutive(bytes: &[u8]) {
    for pair in bytes.windows(2) {
        assert_eq!(pair[1], pair[0].wrapping_add(1), "count jumped: {bytes:?}");
    }
}

#[test]
fn a_counting_guest_suspended_and_resumed_goes_on_from_its_count() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("vm.state");
    let mem_size = 32 << 20;

    let before = Capture::default();
    let vm = Vm::build(config(before.clone(), mem_size, None)).unwrap();
    let suspender = vm.suspender();
    let running = spawn(vm);
    before.wait_for(4);
    let mut announced = None;
    let report = suspender
        .suspend(&state, |r| announced = Some(r.took))
        .expect("suspends");
    assert_eq!(announced, Some(report.took), "announced before the end");
    assert_eq!(running.join().unwrap(), ExitReason::Suspended);
    let printed = before.bytes();
    assert_consecutive(&printed);
    assert!(suspender.suspend(&state, |_| ()).is_err(), "saved once");
    eprintln!(
        "suspend: {:?}, {} KiB of {} MiB RAM written, file {} KiB",
        report.took,
        report.written.memory.written >> 10,
        report.written.memory.ram >> 20,
        report.written.file_bytes >> 10
    );
    assert_eq!(report.written.memory.ram, mem_size);
    assert!(
        report.written.file_bytes < 1 << 20,
        "sparse: {} bytes on disk for a guest that touched a few pages",
        report.written.file_bytes
    );

    let after = Capture::default();
    let started = Instant::now();
    let vm = Vm::build(config(after.clone(), mem_size, Some(&state))).unwrap();
    let stop = vm.exit_signal();
    let resumed = spawn(vm);
    after.wait_for(3);
    eprintln!("resume to 3 more counts: {:?}", started.elapsed());
    stop.request(ExitReason::UserQuit);
    assert_eq!(resumed.join().unwrap(), ExitReason::UserQuit);
    let mut whole = printed.clone();
    whole.extend_from_slice(&after.bytes());
    assert_consecutive(&whole);

    // The state file is read, never changed: it resumes again, from the
    // same point.
    let again = Capture::default();
    let vm = Vm::build(config(again.clone(), mem_size, Some(&state))).unwrap();
    let stop = vm.exit_signal();
    let resumed = spawn(vm);
    again.wait_for(1);
    stop.request(ExitReason::UserQuit);
    resumed.join().unwrap();
    assert_eq!(again.bytes()[0], printed.last().unwrap().wrapping_add(1));
}

#[test]
fn a_state_that_does_not_fit_the_vm_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("vm.state");
    let out = Capture::default();
    let vm = Vm::build(config(out.clone(), 32 << 20, None)).unwrap();
    let suspender = vm.suspender();
    let running = spawn(vm);
    out.wait_for(1);
    suspender.suspend(&state, |_| ()).unwrap();
    running.join().unwrap();

    let err = Vm::build(config(Capture::default(), 64 << 20, Some(&state)))
        .err()
        .expect("refused")
        .to_string();
    assert_eq!(
        err,
        "the saved state does not fit this VM: it has 32 MiB of memory, the VM now has 64 MiB"
    );

    let mut bytes = std::fs::read(&state).unwrap();
    bytes[8] = 7; // the format
    let other = dir.path().join("other.state");
    std::fs::write(&other, &bytes).unwrap();
    let err = Vm::build(config(Capture::default(), 32 << 20, Some(&other)))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("format 7, this vmlab reads format 1"), "{err}");
}

/// `vmlab suspend` / `resume` through the real binary, on a named VM that
/// runs the counting guest: ps, the refusals while suspended, stop
/// discarding the saved state.
struct Named {
    home: tempfile::TempDir,
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = self.vmlab(&["stop", "--timeout", "1", "c1"]);
    }
}

impl Named {
    fn vmlab(&self, args: &[&str]) -> std::process::Output {
        support::vmlab_in(self.home.path(), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmlab(args);
        assert!(out.status.success(), "vmlab {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.vmlab(args);
        assert!(!out.status.success(), "vmlab {args:?} should fail: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }

    fn dir(&self) -> std::path::PathBuf {
        self.home.path().join("data/vmlab/vms/c1")
    }

    /// The serial log once it holds `len` bytes.
    fn console(&self, len: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let bytes = std::fs::read(self.dir().join("serial.log")).unwrap_or_default();
            if bytes.len() >= len {
                return bytes;
            }
            assert!(Instant::now() < deadline, "the guest printed {bytes:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The VM process ended without its seccomp filter killing it (the
    /// run's record stays empty), so every syscall of a suspend and of
    /// the VM's end after it is on its thread's list.
    fn assert_no_seccomp_violation(&self) {
        let record = self.dir().join("seccomp.violation");
        let text = std::fs::read_to_string(record).unwrap_or_default();
        assert!(text.trim().is_empty(), "{text}");
    }

    fn state(&self) -> String {
        let ps = self.ok(&["ps"]);
        let row = ps.lines().find(|l| l.starts_with("c1 ")).expect("listed");
        row.split_whitespace().nth(1).unwrap().to_string()
    }
}

#[test]
fn a_named_vm_suspends_resumes_and_refuses_what_would_break_its_state() {
    let lab = Named {
        home: tempfile::Builder::new()
            .prefix("vmlab-suspend")
            .tempdir()
            .unwrap(),
    };
    let kernel = lab.home.path().join("counter.elf");
    counter().write_elf(&kernel);
    std::fs::create_dir_all(lab.dir()).unwrap();
    // A disk the guest never reads, for the refusals of disk changes.
    let disk = lab.dir().join("disk.qcow2");
    let disk_arg = disk.to_str().unwrap();
    lab.ok(&["disk", "create", disk_arg, "1M"]);
    std::fs::write(
        lab.dir().join("vm.conf"),
        format!(
            "cpus = 1\nmem = 32M\nkernel = {}\nnet = none\ndisk = {}\n",
            kernel.display(),
            disk.display()
        ),
    )
    .unwrap();
    lab.ok(&["run", "--name", "c1", "--detach"]);
    lab.console(3);
    lab.ok(&["snapshot", "create", "c1", "s0"]);
    let out = lab.ok(&["suspend", "c1"]);
    assert!(out.contains("c1 is suspended"), "{out}");
    let before = lab.console(3);
    assert_consecutive(&before);
    assert_eq!(lab.state(), "suspended");
    assert!(lab.dir().join("vm.state").exists());
    lab.assert_no_seccomp_violation();

    let err = lab.fails(&["run", "--name", "c1", "--detach"]);
    assert!(
        err.contains("vmlab resume c1") && err.contains("--discard-state"),
        "{err}"
    );
    let err = lab.fails(&["clone", "c1", "c2"]);
    assert!(err.contains("VM c1 is suspended: cloning it"), "{err}");
    let err = lab.fails(&["suspend", "c1"]);
    assert!(err.contains("already suspended"), "{err}");
    // Nothing may change the disks the saved memory expects.
    let refused = "would change the disks its saved memory expects";
    let err = lab.fails(&["snapshot", "create", "c1", "s1"]);
    assert!(
        err.contains("VM c1 is suspended: taking a snapshot") && err.contains(refused),
        "{err}"
    );
    let err = lab.fails(&["snapshot", "rm", "c1", "s0"]);
    assert!(
        err.contains("removing a snapshot") && err.contains(refused),
        "{err}"
    );
    let err = lab.fails(&["snapshot", "restore", "c1", "s0"]);
    assert!(err.contains(refused), "{err}");
    let err = lab.fails(&["disk", "resize", disk_arg, "2M"]);
    assert!(
        err.contains(&format!("resizing {disk_arg}")) && err.contains(refused),
        "{err}"
    );
    let err = lab.fails(&["disk", "create", "--force", disk_arg, "1M"]);
    assert!(err.contains(&format!("replacing {disk_arg}")), "{err}");
    let other = lab.home.path().join("other.qcow2");
    lab.ok(&["disk", "create", other.to_str().unwrap(), "1M"]);
    let err = lab.fails(&[
        "clone",
        "--full",
        "--force",
        other.to_str().unwrap(),
        disk_arg,
    ]);
    assert!(err.contains(&format!("replacing {disk_arg}")), "{err}");
    // The snapshot's layer, which the disk reads through, is refused too.
    let layer = std::fs::read_dir(lab.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p != &disk && p.extension().is_some_and(|e| e == "qcow2"))
        .expect("the snapshot's layer");
    let err = lab.fails(&["disk", "resize", layer.to_str().unwrap(), "2M"]);
    assert!(err.contains(refused), "{err}");

    let out = lab.ok(&["resume", "c1"]);
    assert!(out.contains("running in the background again"), "{out}");
    assert_eq!(lab.state(), "running");
    assert!(!lab.dir().join("vm.state").exists(), "the name is gone");
    let after = lab.console(3);
    assert_eq!(
        after[0],
        before.last().unwrap().wrapping_add(1),
        "{before:?} {after:?}"
    );
    assert_consecutive(&after);

    lab.ok(&["suspend", "c1"]);
    lab.assert_no_seccomp_violation();
    let out = lab.ok(&["stop", "c1"]);
    assert!(out.contains("saved state is discarded"), "{out}");
    assert_eq!(lab.state(), "stopped");
    assert!(!lab.dir().join("vm.state").exists());
    let err = lab.fails(&["resume", "c1"]);
    assert!(err.contains("is not suspended"), "{err}");
    // Stopped, the VM's disks are the user's again.
    lab.ok(&["disk", "resize", disk_arg, "2M"]);
    lab.ok(&["snapshot", "rm", "c1", "s0"]);
}
