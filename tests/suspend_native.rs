//! Suspend and resume of a whole VM on this machine's own /dev/kvm, with a
//! tiny hand-written guest that counts in a register and in memory and
//! prints the count's high bits on the UART: suspended to a state file and
//! resumed in a new VM, it goes on from where it was (registers, memory,
//! UART and the in-kernel chips came back), and a state that does not fit
//! the new VM is refused in one line.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::counter::counter;
use support::Capture;
use vmlab::vmm::{BootSource, ConsoleConfig, ConsoleInput, ExitReason, Vm, VmConfig};

const LOAD_ADDR: u64 = 0x10_0000;
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
        nets: Vec::new(),
        resume: resume.map(Path::to_path_buf),
        new_generation: None,
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
        let _ = self.vmlab(&["stop", "--timeout", "1", "c1", "c2"]);
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
        self.vm_dir("c1")
    }

    fn vm_dir(&self, name: &str) -> std::path::PathBuf {
        self.home.path().join("data/vmlab/vms").join(name)
    }

    /// The serial log once it holds `len` bytes.
    fn console(&self, len: usize) -> Vec<u8> {
        self.console_of("c1", len)
    }

    fn console_of(&self, name: &str, len: usize) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let bytes = std::fs::read(self.vm_dir(name).join("serial.log")).unwrap_or_default();
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
        self.state_of("c1")
    }

    fn state_of(&self, name: &str) -> String {
        let ps = self.ok(&["ps"]);
        let row = ps
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .expect("listed");
        row.split_whitespace().nth(1).unwrap().to_string()
    }

    /// A new lab whose VM c1 runs the counting guest, with a qcow2 disk in
    /// its directory when `disk`.
    fn new(prefix: &str, disk: bool) -> Named {
        let lab = Named {
            home: tempfile::Builder::new().prefix(prefix).tempdir().unwrap(),
        };
        let kernel = lab.home.path().join("counter.elf");
        counter().write_elf(&kernel);
        std::fs::create_dir_all(lab.dir()).unwrap();
        let mut conf = format!(
            "cpus = 1\nmem = 32M\nkernel = {}\nnet = none\n",
            kernel.display()
        );
        if disk {
            let path = lab.dir().join("disk.qcow2");
            vmlab::disk::create_image(&path, &vmlab::disk::CreateOptions::qcow2(4 << 20)).unwrap();
            conf.push_str(&format!("disk = {}\n", path.display()));
        }
        std::fs::write(lab.dir().join("vm.conf"), conf).unwrap();
        lab
    }
}

#[test]
fn a_named_vm_suspends_resumes_and_refuses_what_would_break_its_state() {
    let lab = Named::new("vmlab-suspend", true);
    // The guest never reads its disk: it is there for the refusals of
    // disk changes.
    let disk = lab.dir().join("disk.qcow2");
    let disk_arg = disk.to_str().unwrap();
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
    let err = lab.fails(&["disk", "resize", disk_arg, "8M"]);
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
    let err = lab.fails(&["disk", "resize", layer.to_str().unwrap(), "8M"]);
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
    lab.ok(&["disk", "resize", disk_arg, "8M"]);
    lab.ok(&["snapshot", "rm", "c1", "s0"]);
}

/// The VM generation ID page (`VMGENID_ADDR`) of the guest RAM saved in
/// `state`: the 16-byte ID and the identity note's text.
fn generation_page(state: &Path) -> ([u8; 16], String) {
    use std::os::unix::fs::FileExt;
    use vmlab::arch::x86_64::layout::{VMGENID_ADDR, VMGENID_NOTE_OFFSET};
    let file = std::fs::File::open(state).unwrap();
    let mut header = [0u8; 8];
    file.read_exact_at(&mut header, 24).unwrap();
    let page = u64::from_le_bytes(header) + VMGENID_ADDR;
    let mut id = [0u8; 16];
    file.read_exact_at(&mut id, page).unwrap();
    let mut note = [0u8; 10];
    file.read_exact_at(&mut note, page + VMGENID_NOTE_OFFSET)
        .unwrap();
    assert_eq!(&note[..8], b"VMLABID1");
    let mut text = vec![0u8; usize::from(u16::from_le_bytes([note[8], note[9]]))];
    file.read_exact_at(&mut text, page + VMGENID_NOTE_OFFSET + 10)
        .unwrap();
    (id, String::from_utf8(text).unwrap())
}

/// `snapshot create --full` of the running counting guest: it runs on; a
/// VM started `--from` the snapshot resumes at the snapshot's count with a
/// disk overlay of its own over the snapshot's layer, as does the source
/// once the snapshot is restored onto it; and what cannot work is refused
/// in one line.
#[test]
fn a_full_snapshot_goes_on_in_its_vm_and_starts_new_vms_at_its_count() {
    let lab = Named::new("vmlab-fromsnap", true);
    let err = lab.fails(&["snapshot", "create", "c1", "warm", "--full"]);
    assert!(err.contains("VM c1 is not running"), "{err}");
    lab.ok(&["run", "--name", "c1", "--detach"]);
    lab.console(3);
    lab.ok(&["snapshot", "create", "c1", "cold"]);
    let out = lab.ok(&["snapshot", "create", "c1", "warm", "--full"]);
    assert!(out.contains("full snapshot warm of 1 disk"), "{out}");
    assert!(out.contains("guest paused"), "{out}");
    eprintln!("{}", out.trim());
    // The source runs on from where it was.
    let len = lab.console(3).len();
    let on = lab.console(len + 3);
    assert_eq!(lab.state(), "running");
    assert_consecutive(&on[on.len().saturating_sub(64)..]);
    let ls = lab.ok(&["snapshot", "ls", "c1"]);
    let full_of = |name: &str| {
        let row = ls
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap();
        row.split_whitespace().nth(4).unwrap().to_string()
    };
    assert_eq!(
        (full_of("warm"), full_of("cold")),
        ("yes".into(), "no".into()),
        "{ls}"
    );

    for (args, expected) in [
        (
            vec!["--from", "c1@nope"],
            "VM c1 has no snapshot named nope",
        ),
        (vec!["--from", "c1@cold"], "holds its disks only"),
        (
            vec!["--from", "c1@warm", "--mem", "64M"],
            "saved at 32 MiB, not 64 MiB",
        ),
        (
            vec!["--from", "c1@warm", "--cpus", "2"],
            "saved with 1 vCPU(s), not 2",
        ),
        (
            vec!["--from", "c1@warm", "--net", "user"],
            "saved without a network card",
        ),
    ] {
        let mut run = vec!["run", "--name", "c2"];
        run.extend(args);
        let err = lab.fails(&run);
        assert!(err.contains(expected), "{err}");
        assert!(!lab.vm_dir("c2").exists(), "nothing made by {run:?}");
    }
    let err = lab.fails(&["run", "--name", "c1", "--from", "c1@warm"]);
    assert!(err.contains("a VM named c1 already exists"), "{err}");

    let out = lab.ok(&["run", "--name", "c2", "--from", "c1@warm"]);
    assert!(out.contains("resumed from c1@warm"), "{out}");
    assert_eq!(lab.state_of("c2"), "running");
    let from = lab.console_of("c2", 3);
    assert_consecutive(&from);
    // Its own overlay, over the snapshot's frozen layer, which c1's own
    // overlay sits on too.
    let chain = |vm: &str| {
        vmlab::disk::backing_chain(&lab.vm_dir(vm).join("disk.qcow2"))
            .unwrap()
            .into_iter()
            .map(|p| p.canonicalize().unwrap())
            .collect::<Vec<_>>()
    };
    let (c1, c2) = (chain("c1"), chain("c2"));
    assert!(
        c2[0].starts_with(lab.vm_dir("c2").canonicalize().unwrap()),
        "{c2:?}"
    );
    assert!(
        c2[1].starts_with(lab.dir().canonicalize().unwrap()),
        "{c2:?}"
    );
    assert!(c1.contains(&c2[1]), "c1 {c1:?} c2 {c2:?}");
    lab.assert_no_seccomp_violation();

    // c2 is a new generation: a new VM generation ID and its own identity
    // note in the page the DSDT's VGEN points to; a plain resume keeps both.
    let snapshot_state = std::fs::read_dir(lab.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "state"))
        .unwrap();
    let (id1, note1) = generation_page(&snapshot_state);
    assert!(note1.starts_with("hostname=c1\n"), "{note1}");
    lab.ok(&["suspend", "c2"]);
    let (id2, note2) = generation_page(&lab.vm_dir("c2").join("vm.state"));
    assert_ne!(id1, id2, "a new generation ID");
    assert!(
        note2.starts_with("hostname=c2\ninstance=c2\nmac=52:54:00:"),
        "{note2}"
    );
    lab.ok(&["resume", "c2"]);
    lab.ok(&["suspend", "c2"]);
    assert_eq!(generation_page(&lab.vm_dir("c2").join("vm.state")).0, id2);
    lab.ok(&["resume", "c2"]);

    // Restored onto c1, the snapshot leaves it suspended there: resumed,
    // it prints what c2 printed first.
    lab.ok(&["stop", "--timeout", "1", "c1"]);
    let out = lab.ok(&["snapshot", "restore", "c1", "warm"]);
    assert!(out.contains("suspended there"), "{out}");
    assert_eq!(lab.state(), "suspended");
    lab.ok(&["resume", "c1"]);
    let again = lab.console(3);
    assert_eq!(again[0], from[0], "c1 {again:?} c2 {from:?}");
    assert_consecutive(&again);

    // rm deletes the snapshot's state; c2, started from it, runs on.
    lab.ok(&["stop", "--timeout", "1", "c1"]);
    let states = || {
        std::fs::read_dir(lab.dir())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".state")
            })
            .count()
    };
    assert_eq!(states(), 1);
    // What a `snapshot create --full` killed between the VM's write and
    // the record leaves (a state no record names, or the VM's unfinished
    // temporary of one) goes with the next snapshot command; other files
    // stay.
    let plant = |name: &str| std::fs::write(lab.dir().join(name), b"left by a kill").unwrap();
    plant("full-17.state");
    plant(".full-18.state.tmp4242-0");
    plant("full-notes.txt");
    assert_eq!(states(), 2);
    lab.ok(&["snapshot", "rm", "c1", "warm"]);
    assert_eq!(states(), 0);
    assert!(!lab.dir().join(".full-18.state.tmp4242-0").exists());
    assert!(lab.dir().join("full-notes.txt").exists());
    plant("full-19.state");
    lab.ok(&["snapshot", "create", "c1", "disks"]);
    assert_eq!(states(), 0, "a snapshot create removes it too");
    lab.ok(&["snapshot", "rm", "c1", "disks"]);
    let len = lab.console_of("c2", 3).len();
    lab.console_of("c2", len + 1);
    lab.ok(&["stop", "--timeout", "1", "c2"]);
    lab.ok(&["run", "--name", "c1", "--detach"]);
    lab.ok(&["stop", "--timeout", "1", "c1"]);
}
