//! Named VMs end to end on this machine's own /dev/kvm: the real `vmlab`
//! binary runs a tiny hand-written guest (prints a line, then halts for
//! good) detached, and `ps`, `stop`, `rm` and the state files are checked.
//! Each test has its own HOME and XDG directories.
//!
//! The tiny guest cannot take the power button's interrupt on this PVM host,
//! so `stop` here always ends in its kill path; the rig (tests/e2e_vms.rs)
//! checks the power button with a real Linux guest.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::tiny_guest::Program;
use support::wait_for;

struct Lab {
    dir: tempfile::TempDir,
    kernel: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("vmlab-vms")
            .tempdir()
            .unwrap();
        let kernel = dir.path().join("tiny.elf");
        Program::new()
            .print(b"tiny guest up\n")
            // The boot-timer write: userspace "started", so the PVM stall
            // watchdog leaves the halted guest alone.
            .out(0xe9, b'U')
            .halt_forever()
            .write_elf(&kernel);
        Lab { dir, kernel }
    }

    fn vmlab(&self, args: &[&str]) -> Output {
        let home = self.dir.path();
        Command::new(env!("CARGO_BIN_EXE_vmlab"))
            .args(args)
            .env("HOME", home)
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vmlab(args);
        assert!(
            out.status.success(),
            "vmlab {args:?} failed: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.vmlab(args);
        assert!(
            !out.status.success(),
            "vmlab {args:?} should fail: {}",
            text(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }

    fn start(&self, name: &str) -> u32 {
        let kernel = self.kernel.to_str().unwrap();
        let out = self.ok(&[
            "run", "--name", name, "--detach", "--kernel", kernel, "--mem", "32M",
        ]);
        assert!(out.contains(&format!("vmlab console {name}")), "{out}");
        self.pid(name).expect("a running VM has a pid file")
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("data/vmlab/vms").join(name)
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("run/vmlab")
            .join(format!("{name}.sock"))
    }

    fn pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(self.vm_dir(name).join("vmlab.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn ps_line(&self, name: &str) -> String {
        let ps = self.ok(&["ps"]);
        ps.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not in ps:\n{ps}"))
            .to_string()
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state letter says it is gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn serial_log(lab: &Lab, name: &str) -> String {
    std::fs::read_to_string(lab.vm_dir(name).join("serial.log")).unwrap_or_default()
}

#[test]
fn detach_ps_stop_rm_leave_nothing_behind() {
    let lab = Lab::new();
    let pid = lab.start("vm1");
    assert!(alive(pid));
    assert!(lab.socket("vm1").exists());
    wait_for("the guest's line in the serial log", || {
        serial_log(&lab, "vm1").contains("tiny guest up")
    });

    let row = lab.ps_line("vm1");
    assert!(row.contains("running"), "{row}");
    assert!(row.contains(&pid.to_string()), "{row}");

    let settings = std::fs::read_to_string(lab.vm_dir("vm1").join("vm.conf")).unwrap();
    assert!(settings.contains("mem = 32M"), "{settings}");
    assert!(settings.contains("tiny.elf"), "{settings}");

    let err = lab.fails(&["rm", "vm1"]);
    assert!(err.contains("is running: stop it first"), "{err}");

    let out = lab.vmlab(&["stop", "--timeout", "1", "vm1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("vm1: killed"),
        "{}",
        text(&out)
    );
    assert!(!alive(pid), "the VM's process is gone");
    assert!(!lab.socket("vm1").exists(), "no socket left");
    assert!(lab.pid("vm1").is_none(), "no pid file left");
    assert!(lab.ps_line("vm1").contains("stopped"));

    // Stopping a stopped VM is fine; removing it deletes its directory.
    assert!(lab.vmlab(&["stop", "vm1"]).status.success());
    lab.ok(&["rm", "vm1"]);
    assert!(!lab.vm_dir("vm1").exists());
    assert_eq!(lab.ok(&["ps"]).lines().count(), 1, "only the header");
    let err = lab.fails(&["stop", "vm1"]);
    assert!(err.contains("no VM named vm1"), "{err}");
}

#[test]
fn a_name_in_use_is_refused_and_two_vms_run_at_once() {
    let lab = Lab::new();
    let pid1 = lab.start("vm1");
    let kernel = lab.kernel.to_str().unwrap();
    let err = lab.fails(&["run", "--name", "vm1", "--detach", "--kernel", kernel]);
    assert!(err.contains("VM vm1 is already running"), "{err}");
    assert!(alive(pid1), "the running VM is untouched");

    let pid2 = lab.start("vm2");
    assert_ne!(pid1, pid2);
    assert!(lab.ps_line("vm1").contains("running"));
    assert!(lab.ps_line("vm2").contains("running"));

    let out = lab.vmlab(&["stop", "--timeout", "1", "vm1", "vm2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!alive(pid1) && !alive(pid2));
    assert!(!lab.socket("vm1").exists() && !lab.socket("vm2").exists());
}

#[test]
fn a_crashed_vm_leaves_a_stale_socket_that_is_cleaned_not_fatal() {
    let lab = Lab::new();
    let pid = lab.start("vm1");
    // Crash: the process dies without cleaning up.
    assert!(Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    wait_for("the killed VM to die", || !alive(pid));
    assert!(lab.socket("vm1").exists(), "a crash leaves the socket");
    assert!(lab.pid("vm1").is_some(), "and the pid file");

    // The process shows as a zombie once its main thread is gone, but its
    // lock is only released when its last thread (a vCPU leaving KVM) exits.
    wait_for("ps to see the crashed VM stopped", || {
        lab.ps_line("vm1").contains("stopped")
    });
    assert!(!lab.socket("vm1").exists(), "ps cleaned the stale socket");
    assert!(lab.pid("vm1").is_none(), "and the pid file");

    // The name is free again.
    let pid2 = lab.start("vm1");
    assert!(lab.ps_line("vm1").contains("running"));
    assert!(lab
        .vmlab(&["stop", "--timeout", "1", "vm1"])
        .status
        .success());
    assert!(!alive(pid2));
}

#[test]
fn a_vm_that_cannot_start_says_why_and_leaves_nothing() {
    let lab = Lab::new();
    let missing = lab.dir.path().join("no-such-kernel");
    let err = lab.fails(&[
        "run",
        "--name",
        "vm1",
        "--detach",
        "--kernel",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("no-such-kernel"), "{err}");
    assert!(!lab.vm_dir("vm1").exists(), "no half-made VM");

    // An error only the VM process sees (too little memory) comes back too.
    let kernel = lab.kernel.to_str().unwrap();
    let err = lab.fails(&[
        "run", "--name", "vm1", "--detach", "--kernel", kernel, "--mem", "1M",
    ]);
    assert!(err.contains("vm1") && err.contains("too small"), "{err}");
    assert!(!lab.vm_dir("vm1").exists(), "no half-made VM");

    let err = lab.fails(&["run", "--name", "Vm/1", "--detach"]);
    assert!(err.contains("invalid VM name"), "{err}");
    let err = lab.fails(&["console", "nope"]);
    assert!(err.contains("no VM named nope"), "{err}");
}

#[test]
fn ssh_config_uses_the_forward_to_22_and_clone_by_name_needs_a_stopped_vm() {
    let lab = Lab::new();
    let kernel = lab.kernel.to_str().unwrap();
    lab.ok(&[
        "run",
        "--name",
        "vm1",
        "--detach",
        "--kernel",
        kernel,
        "--mem",
        "32M",
        "--forward",
        "tcp:2222:22",
    ]);
    let config = lab.ok(&["ssh-config", "vm1"]);
    assert!(
        config.starts_with("Host vm1\n  HostName 127.0.0.1\n  Port 2222\n"),
        "{config}"
    );
    let key = lab.dir.path().join("data/vmlab/ssh/id_ed25519");
    assert!(
        config.contains(&format!("IdentityFile {}", key.display())),
        "{config}"
    );
    assert!(lab.ps_line("vm1").contains("tcp:127.0.0.1:2222:22"));

    let err = lab.fails(&["clone", "vm1", "vm2"]);
    assert!(err.contains("is running: stop it before cloning"), "{err}");
    assert!(lab
        .vmlab(&["stop", "--timeout", "1", "vm1"])
        .status
        .success());
    lab.ok(&["clone", "vm1", "vm2"]);
    let conf = std::fs::read_to_string(lab.vm_dir("vm2").join("vm.conf")).unwrap();
    assert!(conf.contains("forward = tcp:127.0.0.1:2222:22"), "{conf}");
    assert!(
        !conf.contains("mac ="),
        "the clone's MAC is derived from its name"
    );

    // A path keeps today's disk-image clone.
    let image = lab.dir.path().join("base.qcow2");
    lab.ok(&["disk", "create", image.to_str().unwrap(), "1M"]);
    let copy = lab.dir.path().join("vm1");
    lab.ok(&["clone", image.to_str().unwrap(), copy.to_str().unwrap()]);
    assert!(Path::new(&copy).is_file());
}

/// A guest that prints `line` and reboots at once (a pause would be a
/// loop, and loops crawl on this PVM host), about 20 boots a second.
fn rebooting_guest(path: &Path, line: &[u8]) {
    Program::new()
        .print(line)
        .out(0xe9, b'U')
        .reset()
        .write_elf(path);
}

#[test]
fn a_named_vm_restarts_in_place_on_reboot_and_reads_its_kernel_again() {
    let lab = Lab::new();
    let kernel = lab.dir.path().join("rebooting.elf");
    rebooting_guest(&kernel, b"boot one\n");
    let args = [
        "run", "--name", "vm1", "--detach", "--mem", "32M", "--kernel",
    ];
    lab.ok(&[&args[..], &[kernel.to_str().unwrap()]].concat());
    let pid = lab.pid("vm1").unwrap();
    wait_for("a second boot in the serial log", || {
        serial_log(&lab, "vm1").matches("boot one").count() >= 2
    });
    assert!(alive(pid), "the same process runs the second boot");
    assert_eq!(lab.pid("vm1"), Some(pid));
    assert!(lab.ps_line("vm1").contains("running"));

    // A new kernel in place of the old one boots at the next reboot.
    let next = lab.dir.path().join("next.elf");
    rebooting_guest(&next, b"boot two\n");
    std::fs::rename(&next, &kernel).unwrap();
    wait_for("the new kernel's line", || {
        serial_log(&lab, "vm1").contains("boot two")
    });
    assert_eq!(lab.pid("vm1"), Some(pid));

    // Once stopped, the next reboot ends the VM rather than restarting it
    // (the tiny guest never takes the power button).
    let out = lab.vmlab(&["stop", "--timeout", "20", "vm1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("vm1: powered off"),
        "{}",
        text(&out)
    );
    assert!(!alive(pid));
    let log = std::fs::read_to_string(lab.vm_dir("vm1").join("vmm.log")).unwrap();
    assert!(log.contains("guest rebooted: starting it again"), "{log}");
    assert!(
        log.trim_end()
            .ends_with("guest rebooted (vmlab ends the VM on reset)"),
        "{log}"
    );
}

#[test]
fn on_reboot_exit_ends_a_named_vm_at_its_first_reboot_and_is_saved() {
    let lab = Lab::new();
    let kernel = lab.dir.path().join("rebooting.elf");
    rebooting_guest(&kernel, b"boot once\n");
    let k = kernel.to_str().unwrap();
    let args = [
        "run",
        "--name",
        "vm1",
        "--detach",
        "--mem",
        "32M",
        "--on-reboot",
        "exit",
    ];
    lab.ok(&[&args[..], &["--kernel", k]].concat());
    wait_for("the VM to end at its reboot", || {
        lab.ps_line("vm1").contains("stopped")
    });
    assert_eq!(serial_log(&lab, "vm1").matches("boot once").count(), 1);
    let conf = std::fs::read_to_string(lab.vm_dir("vm1").join("vm.conf")).unwrap();
    assert!(conf.contains("on-reboot = exit"), "{conf}");

    // An unnamed VM ends at a reboot by default, with status 0.
    let out = Command::new(env!("CARGO_BIN_EXE_vmlab"))
        .args(["run", "--mem", "32M", "--kernel", k])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("boot once")
            .count(),
        1
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest rebooted"));
}

/// A raw ext4 disk made from `tree` (paths and contents) with mkfs.ext4.
fn ext4_disk(dir: &Path, name: &str, tree: &[(&str, &[u8])]) -> PathBuf {
    let root = dir.join(format!("{name}.tree"));
    for (path, bytes) in tree {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    }
    std::fs::create_dir_all(&root).unwrap();
    let image = dir.join(name);
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-d",
            root.to_str().unwrap(),
            image.to_str().unwrap(),
        ])
        .output()
        .expect("mkfs.ext4 runs (e2fsprogs)");
    assert!(out.status.success(), "{}", text(&out));
    image
}

#[test]
fn a_vms_flavor_is_kept_and_a_full_vm_without_a_kernel_says_so() {
    let lab = Lab::new();
    let disk = ext4_disk(lab.dir.path(), "nokernel.raw", &[("etc/hostname", b"x\n")]);
    let dir = lab.vm_dir("node1");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = format!(
        "cpus = 1\nmem = 64M\ndisk = {}\nguest = debian\nflavor = full\n",
        disk.display()
    );
    std::fs::write(dir.join("vm.conf"), &conf).unwrap();

    let err = lab.fails(&["run", "--name", "node1", "--flavor", "lean"]);
    assert!(err.contains("VM node1 is a full Debian VM"), "{err}");
    let err = lab.fails(&["run", "--name", "node1", "--packages", "docker.io"]);
    assert!(err.contains("VM node1 is a full Debian VM"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("vm.conf")).unwrap(),
        conf,
        "unchanged"
    );

    // The same choice again is fine; the disk has no kernel to boot.
    let err = lab.fails(&["run", "--name", "node1", "--flavor", "full"]);
    assert!(err.contains("has no kernel at /boot/vmlinuz"), "{err}");
    assert!(err.contains("nokernel.raw"), "{err}");

    // Links to something that is not a kernel.
    let text_kernel = ext4_disk(
        lab.dir.path(),
        "text.raw",
        &[
            ("boot/vmlinuz", b"not a kernel, just text\n"),
            ("boot/initrd.img", b"initrd"),
        ],
    );
    let conf = conf.replace(disk.to_str().unwrap(), text_kernel.to_str().unwrap());
    std::fs::write(dir.join("vm.conf"), &conf).unwrap();
    let err = lab.fails(&["run", "--name", "node1"]);
    assert!(
        err.contains("text.raw:/boot/vmlinuz' is not a Linux kernel"),
        "{err}"
    );

    let err = lab.fails(&["run", "--flavor", "full"]);
    assert!(err.contains("need --name"), "{err}");
    let kernel = lab.kernel.to_str().unwrap();
    let err = lab.fails(&[
        "run", "--name", "vm2", "--flavor", "full", "--kernel", kernel,
    ]);
    assert!(err.contains("drop one of them"), "{err}");
    let err = lab.fails(&["run", "--name", "vm3", "--packages", "docker.io"]);
    assert!(err.contains("--packages needs --flavor full"), "{err}");
    let err = lab.fails(&[
        "run",
        "--name",
        "vm3",
        "--flavor",
        "full",
        "--packages",
        "Bad!",
    ]);
    assert!(err.contains("not a Debian package name"), "{err}");
    for name in ["vm2", "vm3"] {
        assert!(!lab.vm_dir(name).exists(), "{name}: nothing left behind");
    }
}
