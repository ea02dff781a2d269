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

    fn command(&self, args: &[&str]) -> Command {
        let home = self.dir.path();
        let mut command = Command::new(env!("CARGO_BIN_EXE_vmlab"));
        command
            .args(args)
            .env("HOME", home)
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env("XDG_CACHE_HOME", home.join("cache"));
        command
    }

    fn vmlab(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs with stdout a pipe nobody reads (`vmlab ... | head -0`).
    fn vmlab_closed_stdout(&self, args: &[&str]) -> Output {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        self.command(args).stdout(writer).output().unwrap()
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

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
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
    // Other local users can read nothing of a VM.
    assert_eq!(mode(&lab.vm_dir("vm1")), 0o700);
    for file in ["vm.conf", "serial.log", "vmm.log", "vmlab.pid", "lock"] {
        assert_eq!(mode(&lab.vm_dir("vm1").join(file)), 0o600, "{file}");
    }
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
fn run_detach_ps_and_stop_end_quietly_when_nobody_reads_their_output() {
    let lab = Lab::new();
    let kernel = lab.kernel.to_str().unwrap();
    let quiet = |args: &[&str]| {
        let out = lab.vmlab_closed_stdout(args);
        assert_eq!(out.status.code(), Some(0), "vmlab {args:?}: {}", text(&out));
        assert!(out.stderr.is_empty(), "vmlab {args:?}: {}", text(&out));
    };
    quiet(&[
        "run", "--name", "vm1", "--detach", "--kernel", kernel, "--mem", "32M",
    ]);
    let pid = lab
        .pid("vm1")
        .expect("the VM runs although its banner was lost");
    assert!(alive(pid));
    quiet(&["ps"]);
    quiet(&["stop", "--timeout", "1", "vm1"]);
    assert!(!alive(pid));
}

#[test]
fn a_detached_vms_log_is_capped_and_keeps_one_previous_file() {
    let lab = Lab::new();
    // Port I/O in a loop: at -vvv every exit is a trace line in vmm.log.
    let p = Program::new().out(0xe9, b'U');
    let top = p.here();
    p.print(b"x\n").jmp_back(top).write_elf(&lab.kernel);
    let kernel = lab.kernel.to_str().unwrap();
    lab.ok(&[
        "-vvv", "run", "--name", "vm1", "--detach", "--kernel", kernel, "--mem", "32M",
    ]);
    let dir = lab.vm_dir("vm1");
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    wait_for("vmm.log to rotate", || size("vmm.log.1") > 0);
    let limit = 4 << 20;
    assert!(size("vmm.log.1") <= limit, "{}", size("vmm.log.1"));
    assert!(size("vmm.log") <= limit, "{}", size("vmm.log"));
    let out = lab.vmlab(&["stop", "--timeout", "1", "vm1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(size("vmm.log") <= limit && size("vmm.log.1") <= limit);
    let logs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".log"))
        .collect();
    assert_eq!(logs.len(), 3, "serial.log, vmm.log, vmm.log.1: {logs:?}");
}

#[test]
fn reach_policies_are_saved_with_the_vm() {
    let lab = Lab::new();
    let kernel = lab.kernel.to_str().unwrap();
    let err = lab.fails(&[
        "run",
        "--name",
        "vm1",
        "--kernel",
        kernel,
        "--outbound",
        "mars",
    ]);
    assert!(err.contains("outbound 'mars'"), "{err}");
    lab.ok(&[
        "run",
        "--name",
        "vm1",
        "--detach",
        "--kernel",
        kernel,
        "--mem",
        "32M",
        "--host-loopback",
        "22,5432",
        "--outbound",
        "host",
    ]);
    let _ = lab.vmlab(&["stop", "--timeout", "1", "vm1"]);
    let conf = std::fs::read_to_string(lab.vm_dir("vm1").join("vm.conf")).unwrap();
    assert!(conf.contains("host_loopback = 22,5432\n"), "{conf}");
    assert!(conf.contains("outbound = host\n"), "{conf}");
    // Kept on the next run, replaced when given again.
    lab.ok(&["run", "--name", "vm1", "--detach", "--host-loopback", "all"]);
    let _ = lab.vmlab(&["stop", "--timeout", "1", "vm1"]);
    let conf = std::fs::read_to_string(lab.vm_dir("vm1").join("vm.conf")).unwrap();
    assert!(!conf.contains("host_loopback"), "{conf}");
    assert!(conf.contains("outbound = host\n"), "{conf}");
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

#[test]
fn a_disk_naming_a_host_file_is_refused_before_the_guest_starts_unless_allowed() {
    let lab = Lab::new();
    let home = lab.dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(home.join("downloads")).unwrap();
    std::fs::create_dir_all(home.join("secrets")).unwrap();
    let secret = home.join("secrets/key");
    std::fs::write(&secret, vec![b'k'; 1 << 20]).unwrap();
    let evil = home.join("downloads/lab.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-u", "-F", "raw", "-b"])
        .args(["../secrets/key", evil.to_str().unwrap(), "1M"])
        .output()
        .expect("qemu-img (qemu-utils) is installed");
    assert!(made.status.success(), "{}", text(&made));
    let kernel = lab.kernel.to_str().unwrap();
    let disk = evil.to_str().unwrap();
    // A throwaway VM's guest powers off, so that a broken check fails the
    // test instead of hanging it.
    let off = home.join("off.elf");
    Program::new().poweroff().write_elf(&off);
    let throwaway = [
        "run",
        "--kernel",
        off.to_str().unwrap(),
        "--mem",
        "32M",
        "--disk",
        disk,
    ];
    let err = lab.fails(&throwaway);
    assert!(
        err.contains(&format!("--allow-backing {}", secret.display())),
        "{err}"
    );
    let mut allowed = throwaway.to_vec();
    allowed.extend(["--allow-backing", secret.to_str().unwrap()]);
    lab.ok(&allowed);
    let run = |extra: &[&str]| -> Vec<String> {
        ["run", "--kernel", kernel, "--mem", "32M", "--disk", disk]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let flag = format!("--allow-backing {}", secret.display());
    let err = lab.fails(&as_strs(&run(&["--name", "vm1", "--detach"])));
    assert!(
        err.contains(&format!("backing file {}", secret.display())),
        "{err}"
    );
    assert!(err.contains(&flag), "{err}");
    assert!(!lab.vm_dir("vm1").exists(), "no half-made VM");

    // Allowed on the command line: it runs, and the VM keeps the allowance.
    let secret_arg = secret.to_str().unwrap();
    let named = run(&["--name", "vm1", "--detach", "--allow-backing", secret_arg]);
    let out = lab.ok(&as_strs(&named));
    assert!(out.contains("vmlab console vm1"), "{out}");
    let conf = std::fs::read_to_string(lab.vm_dir("vm1").join("vm.conf")).unwrap();
    assert!(
        conf.contains(&format!("allow-backing = {secret_arg}")),
        "{conf}"
    );
    assert!(lab
        .vmlab(&["stop", "--timeout", "1", "vm1"])
        .status
        .success());
    lab.ok(&["run", "--name", "vm1", "--detach"]);
    assert!(lab
        .vmlab(&["stop", "--timeout", "1", "vm1"])
        .status
        .success());
}

/// Descriptors of `pid` above stderr that a program it started would
/// inherit (no O_CLOEXEC in /proc/PID/fdinfo), with what they point at.
fn inheritable_descriptors(pid: u32) -> Vec<String> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut leaked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Ok(fd) = name.parse::<u32>() else {
            continue;
        };
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if fd > 2 && flags & libc::O_CLOEXEC as u32 == 0 {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            leaked.push(format!("{fd} -> {target}"));
        }
    }
    leaked
}

/// The soft and hard open-file limits of `pid`.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[3].to_string(), words[4].to_string())
}

#[test]
fn a_running_vm_raised_its_fd_limit_and_would_pass_no_descriptor_on() {
    let lab = Lab::new();
    let kernel = lab.kernel.to_str().unwrap();
    let home = lab.dir.path();
    // Started from a shell with the usual low soft limit.
    let out = Command::new("sh")
        .args(["-c", "ulimit -Sn 512 && exec \"$@\"", "sh"])
        .arg(env!("CARGO_BIN_EXE_vmlab"))
        .args(["run", "--name", "vm1", "--detach", "--kernel", kernel])
        .args(["--mem", "32M"])
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let pid = lab.pid("vm1").unwrap();
    wait_for("the guest's line in the serial log", || {
        serial_log(&lab, "vm1").contains("tiny guest up")
    });
    let (soft, hard) = open_file_limits(pid);
    assert_eq!(soft, hard, "soft limit raised to the hard one");
    let leaked = inheritable_descriptors(pid);
    let _ = lab.vmlab(&["stop", "--timeout", "1", "vm1"]);
    assert!(
        leaked.is_empty(),
        "descriptors a helper would inherit: {leaked:?}"
    );
}

/// The seccomp filters, checked through the test hook: a thread of the
/// named class makes one syscall outside its list (personality, 135)
/// right after installing its filter, as a vmlab bug or a compromised
/// device would.
fn with_forbidden_syscall_on(lab: &Lab, class: &str, args: &[&str]) -> Output {
    lab.command(args)
        .env("VMLAB_SECCOMP_SELFTEST", class)
        .output()
        .unwrap()
}

const KILLED: &str = "killed by its seccomp filter (SIGSYS): syscall 135";

/// A guest that prints a line and powers off: a run of it ends by itself.
fn powering_off_guest(lab: &Lab) -> String {
    let path = lab.dir.path().join("poweroff.elf");
    Program::new()
        .print(b"tiny guest up\n")
        .poweroff()
        .write_elf(&path);
    path.to_str().unwrap().to_string()
}

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_kills_the_vm_and_ps_and_stop_say_so() {
    let lab = Lab::new();
    let kernel = lab.kernel.to_str().unwrap();
    // In the foreground: the one line and the SIGSYS status (a guest that
    // powers off at once, so that a missing filter fails, never hangs).
    let powers_off = powering_off_guest(&lab);
    let out = with_forbidden_syscall_on(
        &lab,
        "vcpu",
        &["run", "--kernel", &powers_off, "--mem", "32M"],
    );
    assert_eq!(out.status.code(), Some(128 + 31), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("vmlab: error: {KILLED} on a vcpu thread")),
        "{err}"
    );
    // Detached: the VM is started, then killed; ps and stop tell why.
    let args = [
        "run", "--name", "vm1", "--detach", "--kernel", kernel, "--mem", "32M",
    ];
    let out = with_forbidden_syscall_on(&lab, "vcpu", &args);
    assert!(out.status.success(), "{}", text(&out));
    wait_for("the VM to be killed", || {
        lab.ps_line("vm1").contains("killed")
    });
    let ps = lab.ok(&["ps"]);
    assert!(
        ps.contains(&format!("vm1: {KILLED} on a vcpu thread")),
        "{ps}"
    );
    let stop = lab.ok(&["stop", "vm1"]);
    assert!(stop.contains(&format!("vm1: {KILLED}")), "{stop}");
    // The next run is a new one: the violation is history.
    lab.start("vm1");
    assert!(lab.ps_line("vm1").contains("running"));
    lab.ok(&["stop", "--timeout", "1", "vm1"]);
    assert!(lab.ps_line("vm1").contains("stopped"));
}

#[test]
fn a_forbidden_syscall_while_starting_fails_run_detach_with_the_reason() {
    let lab = Lab::new();
    let kernel = lab.kernel.to_str().unwrap();
    let args = [
        "run", "--name", "vm1", "--detach", "--kernel", kernel, "--mem", "32M",
    ];
    let out = with_forbidden_syscall_on(&lab, "control", &args);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{KILLED} on a control thread")),
        "{err}"
    );
    // --no-seccomp: the same hook finds no filter and the VM runs.
    let mut no_filters = args.to_vec();
    no_filters.push("--no-seccomp");
    let out = with_forbidden_syscall_on(&lab, "control", &no_filters);
    assert!(out.status.success(), "{}", text(&out));
    assert!(lab.ps_line("vm1").contains("running"));
    lab.ok(&["stop", "--timeout", "1", "vm1"]);
}

#[test]
fn every_thread_class_is_filtered() {
    let lab = Lab::new();
    let kernel = powering_off_guest(&lab);
    let kernel = kernel.as_str();
    let disk = lab.dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = disk.to_str().unwrap();
    for class in ["vcpu", "event-loop", "disk-io", "control"] {
        let args = [
            "run", "--name", "vm1", "--kernel", kernel, "--mem", "32M", "--disk", disk_arg,
        ];
        let out = with_forbidden_syscall_on(&lab, class, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(128 + 31), "{class}: {}", text(&out));
        assert!(
            err.contains(&format!("{KILLED} on a {class} thread")),
            "{class}: {err}"
        );
    }
}

#[test]
fn a_whole_run_under_the_filters_ends_cleanly() {
    // Start, guest output, power-off, then everything after the guest:
    // threads joined, disk closed, footprint read, report written, the
    // name freed; with a disk and a forward, so every thread class runs.
    let lab = Lab::new();
    let kernel = powering_off_guest(&lab);
    let disk = lab.dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let report = lab.dir.path().join("report.json");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forward = format!("tcp:{}:22", free.local_addr().unwrap().port());
    drop(free);
    let out = lab.vmlab(&[
        "run",
        "--name",
        "vm1",
        "--kernel",
        &kernel,
        "--mem",
        "32M",
        "--disk",
        disk.to_str().unwrap(),
        "--forward",
        &forward,
        "--report-json",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("tiny guest up"));
    assert!(std::fs::read_to_string(&report).unwrap().contains("power"));
    assert!(lab.ps_line("vm1").contains("stopped"));
    assert!(lab.pid("vm1").is_none(), "the name is freed");
}
