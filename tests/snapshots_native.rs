//! `vmlab snapshot` on this machine, through the real binary: create, ls,
//! restore and rm in random order over a VM with two disks (one over a base
//! image, as the Debian VMs are), with clones sharing its layers, checked
//! against a model of what every disk and every snapshot must read, and
//! with `qemu-img check` / `info --backing-chain`; live snapshots of a
//! running VM (a tiny guest on this host's KVM, spinning or halted); the
//! one-line errors, a full host disk included.

mod disk_support;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use disk_support::{anywhere, check_chains_in, pattern, qemu_img_ok, read_image, unlocked};
use support::tiny_guest::Program;
use support::wait_for;
use vmlab::disk::{backing_chain, create_image, open_image, CreateOptions, OpenOptions};

const DISK_SIZE: u64 = 4 << 20;
const DISKS: [&str; 2] = ["disk.qcow2", "data.qcow2"];

struct Lab {
    dir: tempfile::TempDir,
    /// A guest that prints, then halts for good.
    halting: PathBuf,
    /// A guest that spins in guest mode (no exits to kick it out but a signal).
    spinning: PathBuf,
    /// VMs started, stopped on drop should the test fail first.
    started: std::cell::RefCell<Vec<String>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let names = self.started.borrow().clone();
        if !names.is_empty() {
            let mut args = vec!["stop", "--timeout", "1"];
            args.extend(names.iter().map(String::as_str));
            let _ = self.vmlab(&args);
        }
    }
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("vmlab-snap")
            .tempdir()
            .unwrap();
        let halting = dir.path().join("halting.elf");
        Program::new()
            .print(b"tiny guest up\n")
            .out(0xe9, b'U')
            .halt_forever()
            .write_elf(&halting);
        let spinning = dir.path().join("spinning.elf");
        Program::new()
            .print(b"tiny guest up\n")
            .out(0xe9, b'U')
            .spin()
            .write_elf(&spinning);
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        std::fs::create_dir_all(dir.path().join("cache/vmlab/images")).unwrap();
        Lab {
            dir,
            halting,
            spinning,
            started: Default::default(),
        }
    }

    fn vmlab(&self, args: &[&str]) -> Output {
        support::vmlab_in(self.dir.path(), args)
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

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("data/vmlab/vms").join(name)
    }

    fn disk(&self, vm: &str, index: usize) -> PathBuf {
        self.vm_dir(vm).join(DISKS[index])
    }

    /// A stopped VM with two disks, as `vmlab run --name` would leave one:
    /// disk.qcow2 over a base image in vmlab's image cache, data.qcow2 on
    /// its own.
    fn make_vm(&self, name: &str, kernel: &Path) {
        let dir = self.vm_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let base = self.dir.path().join("cache/vmlab/images/base.qcow2");
        if !base.exists() {
            create_image(&base, &CreateOptions::qcow2(DISK_SIZE)).unwrap();
            write(&base, 0, &pattern(1, 0, DISK_SIZE as usize));
        }
        let overlay = CreateOptions {
            backing: Some(base),
            ..CreateOptions::qcow2(DISK_SIZE)
        };
        create_image(&dir.join(DISKS[0]), &overlay).unwrap();
        create_image(&dir.join(DISKS[1]), &CreateOptions::qcow2(DISK_SIZE)).unwrap();
        std::fs::write(
            dir.join("vm.conf"),
            format!(
                "cpus = 1\nmem = 32M\ndisk = {}\ndisk = {}\nkernel = {}\nnet = none\n",
                dir.join(DISKS[0]).display(),
                dir.join(DISKS[1]).display(),
                kernel.display()
            ),
        )
        .unwrap();
    }

    fn start(&self, name: &str) {
        self.started.borrow_mut().push(name.to_string());
        let out = self.ok(&["run", "--name", name, "--detach"]);
        assert!(out.contains("running in the background"), "{out}");
    }

    /// The tiny guest ignores the power button: stop kills it after 1 s.
    fn stop(&self, names: &[&str]) {
        let mut args = vec!["stop", "--timeout", "1"];
        args.extend_from_slice(names);
        self.ok(&args);
    }

    fn layers(&self, vm: &str) -> usize {
        std::fs::read_dir(self.vm_dir(vm))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".frozen-")
            })
            .count()
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

fn write(path: &Path, at: u64, data: &[u8]) {
    let img = open_image(
        path,
        &OpenOptions::read_write().with_backing_policy(anywhere()),
    )
    .unwrap();
    img.write_at(at, data).unwrap();
    img.flush().unwrap();
}

/// Every image of every chain of `vm`'s disks and snapshot layers passes
/// `qemu-img check`, and QEMU follows each disk's chain.
fn check_chains(lab: &Lab, vm: &str) {
    let dir = lab.vm_dir(vm);
    check_chains_in(&dir);
    for disk in DISKS {
        qemu_img_ok(&["info", "--backing-chain", dir.join(disk).to_str().unwrap()]);
    }
}

/// What every disk and snapshot must read.
#[derive(Default)]
struct Model {
    current: Vec<Vec<u8>>,
    snapshots: BTreeMap<String, Vec<Vec<u8>>>,
    /// Clone name -> what its disks read when it was made.
    clones: BTreeMap<String, Vec<Vec<u8>>>,
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The layer holding snapshot `name`'s part of disk `disk`, from ls and
/// the records.
fn snapshot_layer(lab: &Lab, vm: &str, name: &str, disk: &str) -> PathBuf {
    let text = std::fs::read_to_string(lab.vm_dir(vm).join("snapshots.json")).unwrap();
    let book: serde_json::Value = serde_json::from_str(&text).unwrap();
    let snapshot = book["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no record of {name}: {text}"));
    let part = snapshot["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == disk)
        .unwrap();
    lab.vm_dir(vm).join(part["layer"].as_str().unwrap())
}

fn verify(lab: &Lab, model: &Model, step: usize) {
    for (i, expected) in model.current.iter().enumerate() {
        assert!(
            read_image(&lab.disk("vm1", i)) == *expected,
            "step {step}: disk {i} of vm1"
        );
    }
    for (name, disks) in &model.snapshots {
        for (i, expected) in disks.iter().enumerate() {
            let layer = snapshot_layer(lab, "vm1", name, DISKS[i]);
            assert!(
                read_image(&layer) == *expected,
                "step {step}: snapshot {name}, disk {i}"
            );
        }
    }
    for (clone, disks) in &model.clones {
        for (i, expected) in disks.iter().enumerate() {
            assert!(
                read_image(&lab.disk(clone, i)) == *expected,
                "step {step}: clone {clone}"
            );
        }
    }
    let listed = lab.ok(&["snapshot", "ls", "vm1"]);
    let names: Vec<&str> = listed
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut expected: Vec<&str> = model.snapshots.keys().map(String::as_str).collect();
    expected.sort();
    let mut names_sorted = names.clone();
    names_sorted.sort();
    assert_eq!(names_sorted, expected, "step {step}: {listed}");
}

#[test]
fn snapshots_in_every_order_with_clones_keep_every_disk_and_point() {
    let lab = Lab::new();
    lab.make_vm("vm1", &lab.halting);
    let mut model = Model {
        current: (0..2).map(|i| read_image(&lab.disk("vm1", i))).collect(),
        ..Model::default()
    };
    let mut rng = Rng(0x5eed_0000_0015);
    let (mut next_snapshot, mut next_write) = (0, 0u64);
    let mut counts = BTreeMap::new();
    for step in 0..70 {
        let pick = rng.below(100);
        let op = match pick {
            0..=29 => "write",
            30..=54 => "create",
            55..=69 if !model.snapshots.is_empty() => "restore",
            70..=92 if !model.snapshots.is_empty() => "rm",
            93..=99 if model.clones.len() < 2 => "clone",
            _ => "write",
        };
        *counts.entry(op).or_insert(0) += 1;
        let pick_snapshot = |rng: &mut Rng, model: &Model| {
            let names: Vec<String> = model.snapshots.keys().cloned().collect();
            names[rng.below(names.len() as u64) as usize].clone()
        };
        match op {
            "write" => {
                next_write += 1;
                let disk = rng.below(2) as usize;
                let at = rng.below(DISK_SIZE - 300_000);
                let len = 1 + rng.below(300_000) as usize;
                let data = pattern(next_write, at, len);
                write(&lab.disk("vm1", disk), at, &data);
                model.current[disk][at as usize..at as usize + len].copy_from_slice(&data);
            }
            "create" => {
                next_snapshot += 1;
                let name = format!("s{next_snapshot}");
                let out = lab.ok(&["snapshot", "create", "vm1", &name]);
                assert!(
                    out.contains(&format!("snapshot {name} of 2 disks")),
                    "{out}"
                );
                model.snapshots.insert(name, model.current.clone());
            }
            "restore" => {
                let name = pick_snapshot(&mut rng, &model);
                lab.ok(&["snapshot", "restore", "vm1", &name]);
                model.current = model.snapshots[&name].clone();
            }
            "rm" => {
                let name = pick_snapshot(&mut rng, &model);
                lab.ok(&["snapshot", "rm", "vm1", &name]);
                model.snapshots.remove(&name);
            }
            _ => {
                let clone = format!("vm{}", model.clones.len() + 2);
                lab.ok(&["clone", "vm1", &clone]);
                model.clones.insert(clone, model.current.clone());
            }
        }
        verify(&lab, &model, step);
        if step % 10 == 9 {
            check_chains(&lab, "vm1");
        }
    }
    eprintln!("operations: {counts:?}");
    assert!(
        counts.len() == 5 && counts.values().all(|&n| n >= 2),
        "every operation ran: {counts:?}"
    );
    check_chains(&lab, "vm1");
    for clone in model.clones.keys() {
        check_chains(&lab, clone);
    }

    // The VM and its clones boot (their chains open, locked) side by side.
    let mut vms = vec!["vm1".to_string()];
    vms.extend(model.clones.keys().cloned());
    for vm in &vms {
        lab.start(vm);
    }
    let names: Vec<&str> = vms.iter().map(String::as_str).collect();
    lab.stop(&names);
    verify(&lab, &model, 1000);

    // With every snapshot and clone gone, everything merges back down to
    // one overlay over the base (and one image for the data disk).
    for clone in model.clones.keys() {
        lab.ok(&["rm", clone]);
    }
    for name in model.snapshots.keys() {
        lab.ok(&["snapshot", "rm", "vm1", name]);
    }
    lab.ok(&["snapshot", "create", "vm1", "last"]);
    lab.ok(&["snapshot", "rm", "vm1", "last"]);
    assert_eq!(lab.layers("vm1"), 0, "every layer merged away");
    assert_eq!(backing_chain(&lab.disk("vm1", 0)).unwrap().len(), 2);
    assert_eq!(backing_chain(&lab.disk("vm1", 1)).unwrap().len(), 1);
    model.snapshots.clear();
    model.clones.clear();
    verify(&lab, &model, 2000);
    check_chains(&lab, "vm1");
}

#[test]
fn a_clone_made_before_a_snapshot_survives_its_rm_and_both_boot() {
    let lab = Lab::new();
    lab.make_vm("vm1", &lab.halting);
    write(&lab.disk("vm1", 0), 4096, b"before the clone");
    lab.ok(&["clone", "vm1", "vm2"]);
    let shared = read_image(&lab.disk("vm2", 0));
    write(&lab.disk("vm1", 0), 8192, b"after the clone");
    lab.ok(&["snapshot", "create", "vm1", "s1"]);
    write(&lab.disk("vm1", 0), 12288, b"after the snapshot");
    let vm1 = read_image(&lab.disk("vm1", 0));
    let out = lab.ok(&["snapshot", "rm", "vm1", "s1"]);
    assert!(out.contains("merged"), "{out}");
    assert_eq!(read_image(&lab.disk("vm1", 0)), vm1);
    assert_eq!(read_image(&lab.disk("vm2", 0)), shared);
    check_chains(&lab, "vm1");
    check_chains(&lab, "vm2");
    lab.start("vm1");
    lab.start("vm2");
    lab.stop(&["vm1", "vm2"]);
    // vm1 cannot go while vm2 reads through its frozen layer.
    let err = lab.fails(&["rm", "vm1"]);
    assert!(err.contains("is the base of vm2"), "{err}");
}

#[test]
fn live_snapshots_of_a_running_vm() {
    let lab = Lab::new();
    for (vm, kernel) in [("spin", &lab.spinning), ("halt", &lab.halting)] {
        lab.make_vm(vm, kernel);
        write(&lab.disk(vm, 0), 0, b"first");
        let before: Vec<Vec<u8>> = (0..2).map(|i| read_image(&lab.disk(vm, i))).collect();
        lab.start(vm);
        let started = Instant::now();
        let out = lab.ok(&["snapshot", "create", vm, "live1"]);
        let wall = started.elapsed();
        assert!(out.contains("taken live (guest paused"), "{out}");
        eprintln!("{vm}: {} (whole command {wall:?})", out.trim());
        lab.ok(&["snapshot", "create", vm, "live2"]);
        let ps = lab.ok(&["ps"]);
        assert!(
            ps.lines()
                .any(|l| l.starts_with(vm) && l.contains("running")),
            "{ps}"
        );

        let err = lab.fails(&["snapshot", "restore", vm, "live1"]);
        assert!(
            err.contains("is running: stop it before restoring"),
            "{err}"
        );
        // Removed while running: the name goes, its layers (in use) stay.
        let out = lab.ok(&["snapshot", "rm", vm, "live1"]);
        assert!(out.contains("merge at a later snapshot command"), "{out}");
        assert_eq!(
            lab.layers(vm),
            4,
            "two layers per disk, still read by the VM"
        );
        lab.stop(&[vm]);

        for (i, expected) in before.iter().enumerate() {
            assert!(read_image(&lab.disk(vm, i)) == *expected, "{vm}: disk {i}");
            let layer = snapshot_layer(&lab, vm, "live2", DISKS[i]);
            assert!(read_image(&layer) == *expected, "{vm}: live2, disk {i}");
            let chain = backing_chain(&lab.disk(vm, i)).unwrap();
            assert_eq!(chain.len(), 3 + usize::from(i == 0), "{vm}: {chain:?}");
        }
        check_chains(&lab, vm);
        lab.ok(&["snapshot", "rm", vm, "live2"]);
        assert_eq!(lab.layers(vm), 0, "stopped, everything merges");
        for (i, expected) in before.iter().enumerate() {
            assert!(read_image(&lab.disk(vm, i)) == *expected, "{vm}: disk {i}");
        }
        check_chains(&lab, vm);
    }
}

/// A named VM restarts in place when its guest reboots: each boot opens
/// the disks again (the ended boot's are closed first, or their locks would
/// refuse it), and a live snapshot switches the boot that runs now.
#[test]
fn a_live_snapshot_after_a_reboot_in_place_switches_the_new_boot() {
    let lab = Lab::new();
    let kernel = lab.dir.path().join("rebooting.elf");
    Program::new()
        .print(b"rebooting\n")
        .out(0xe9, b'U')
        .reset()
        .write_elf(&kernel);
    lab.make_vm("vm1", &kernel);
    write(&lab.disk("vm1", 0), 0, b"first");
    let before: Vec<Vec<u8>> = (0..2).map(|i| read_image(&lab.disk("vm1", i))).collect();
    lab.start("vm1");
    let log = lab.vm_dir("vm1").join("serial.log");
    let serial = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("a few boots in the serial log", || {
        serial().matches("rebooting").count() >= 3
    });
    // The next boot runs a guest that stays up.
    std::fs::copy(&lab.halting, lab.dir.path().join("halting.tmp")).unwrap();
    std::fs::rename(lab.dir.path().join("halting.tmp"), &kernel).unwrap();
    wait_for("the guest that stays up", || {
        serial().contains("tiny guest up")
    });

    let out = lab.ok(&["snapshot", "create", "vm1", "after-reboots"]);
    assert!(out.contains("taken live (guest paused"), "{out}");
    let ps = lab.ok(&["ps"]);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("vm1") && l.contains("running")),
        "{ps}"
    );
    lab.stop(&["vm1"]);
    for (i, expected) in before.iter().enumerate() {
        let layer = snapshot_layer(&lab, "vm1", "after-reboots", DISKS[i]);
        assert!(read_image(&layer) == *expected, "disk {i}");
        assert!(read_image(&lab.disk("vm1", i)) == *expected, "disk {i}");
    }
    check_chains(&lab, "vm1");
}

#[test]
fn errors_are_one_line_and_change_nothing() {
    let lab = Lab::new();
    lab.make_vm("vm1", &lab.halting);
    let chain = |lab: &Lab| backing_chain(&lab.disk("vm1", 0)).unwrap();
    let before = chain(&lab);
    for (args, needle) in [
        (
            &["snapshot", "create", "nope", "s1"][..],
            "no VM named nope",
        ),
        (
            &["snapshot", "create", "vm1", ".x"],
            "invalid snapshot name '.x'",
        ),
        (
            &["snapshot", "create", "vm1", "a/b"],
            "invalid snapshot name 'a/b'",
        ),
        (
            &["snapshot", "restore", "vm1", "s9"],
            "VM vm1 has no snapshot named s9",
        ),
        (
            &["snapshot", "rm", "vm1", "s9"],
            "VM vm1 has no snapshot named s9",
        ),
        (&["snapshot", "ls", "nope"], "no VM named nope"),
    ] {
        let err = lab.fails(args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    lab.ok(&["snapshot", "create", "vm1", "s1"]);
    let err = lab.fails(&["snapshot", "create", "vm1", "s1"]);
    assert!(err.contains("already has a snapshot named s1"), "{err}");
    assert_eq!(chain(&lab).len(), before.len() + 1);

    // A raw disk, a disk elsewhere, no writable disk: refused, nothing made.
    let conf = lab.vm_dir("vm1").join("vm.conf");
    let original = std::fs::read_to_string(&conf).unwrap();
    let raw = lab.vm_dir("vm1").join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let elsewhere = lab.dir.path().join("images/elsewhere.qcow2");
    create_image(&elsewhere, &CreateOptions::qcow2(1 << 20)).unwrap();
    for (extra, needle) in [
        (
            format!("disk = {}\n", raw.display()),
            "is raw: snapshots need qcow2",
        ),
        (
            format!("disk = {}\n", elsewhere.display()),
            "is not in its directory",
        ),
    ] {
        std::fs::write(&conf, format!("{original}{extra}")).unwrap();
        let err = lab.fails(&["snapshot", "create", "vm1", "s2"]);
        assert!(err.contains(needle), "{err}");
    }
    let ro = original.replace(".qcow2\n", ".qcow2,ro\n");
    std::fs::write(&conf, ro).unwrap();
    let err = lab.fails(&["snapshot", "create", "vm1", "s2"]);
    assert!(err.contains("no writable disk to snapshot"), "{err}");
    std::fs::write(&conf, &original).unwrap();
    assert_eq!(lab.layers("vm1"), 2, "only s1's layers");
    let listed = lab.ok(&["snapshot", "ls", "vm1"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
}

/// In a mount namespace of its own, the VM's directory on a 3 MiB tmpfs
/// that is then filled: create and restore fail in one line each and leave
/// the disks, the records and the directory as they were.
#[test]
fn a_full_host_disk_fails_a_snapshot_cleanly() {
    let lab = Lab::new();
    let data = lab.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let vmlab = env!("CARGO_BIN_EXE_vmlab");
    let script = format!(
        r#"set -eu
mount -t tmpfs -o size=3M vmlab-full "{data}"
vm="{data}/vmlab/vms/vm1"
mkdir -p "$vm"
"{vmlab}" disk create "$vm/disk.qcow2" 64M
printf 'mem = 32M\ndisk = %s\nkernel = /nonexistent\nnet = none\n' "$vm/disk.qcow2" >"$vm/vm.conf"
"{vmlab}" snapshot create vm1 s1
listing() {{ ls -A "$vm" | sort | tr '\n' ' '; }}
# Fill what is left, then try again.
dd if=/dev/zero of="{data}/filler" bs=64k 2>/dev/null || true
before=$(listing)
status=0; "{vmlab}" snapshot create vm1 s2 2>"{out}/create.err" || status=$?
echo "create_status=$status"
echo "create_lines=$(wc -l <"{out}/create.err")"
echo "create_err=$(cat "{out}/create.err")"
status=0; "{vmlab}" snapshot restore vm1 s1 2>"{out}/restore.err" || status=$?
echo "restore_status=$status"
echo "restore_err=$(cat "{out}/restore.err")"
[ "$(listing)" = "$before" ] && echo same_files=yes || echo "same_files=no: $before / $(listing)"
echo "chain=$("{vmlab}" disk info "$vm/disk.qcow2" | grep -c '^image:')"
echo "listed=$("{vmlab}" snapshot ls vm1 | tail -n +2 | cut -d' ' -f1 | tr '\n' ' ')"
rm "{data}/filler"
"{vmlab}" snapshot create vm1 s2 >/dev/null && echo "after_space=created"
"#,
        data = data.display(),
        out = lab.dir.path().display(),
    );
    let out = Command::new("unshare")
        .args(["-rm", "bash", "-c", &script])
        .env("XDG_DATA_HOME", &data)
        .env("XDG_RUNTIME_DIR", lab.dir.path().join("run"))
        .output()
        .expect("unshare (util-linux) runs");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    let value = |key: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in {said}"))
            .to_string()
    };
    assert_ne!(value("create_status"), "0", "{said}");
    assert_eq!(value("create_lines"), "1", "{said}");
    assert!(
        value("create_err").contains("No space left on device"),
        "{said}"
    );
    assert_eq!(
        value("create_err").matches("No space left").count(),
        1,
        "said once: {said}"
    );
    assert_ne!(value("restore_status"), "0", "{said}");
    assert!(
        value("restore_err").contains("No space left on device"),
        "{said}"
    );
    assert_eq!(value("same_files"), "yes", "{said}");
    assert_eq!(value("chain"), "2", "{said}");
    assert_eq!(value("listed").trim(), "s1", "{said}");
    assert_eq!(value("after_space"), "created", "{said}");
}

#[test]
fn disk_size_grows_the_first_disk_and_refuses_to_shrink() {
    let lab = Lab::new();
    lab.make_vm("vm1", &lab.halting);
    let size = |lab: &Lab| open_image(&lab.disk("vm1", 0), &unlocked()).unwrap().size();
    lab.started.borrow_mut().push("vm1".into());
    lab.ok(&["run", "--name", "vm1", "--detach", "--disk-size", "8M"]);
    lab.stop(&["vm1"]);
    assert_eq!(size(&lab), 8 << 20);
    let err = lab.fails(&["run", "--name", "vm1", "--detach", "--disk-size", "6M"]);
    assert!(err.contains("would shrink it"), "{err}");
    assert_eq!(size(&lab), 8 << 20);
    let err = lab.fails(&["run", "--disk-size", "6M", "--kernel", "x"]);
    assert!(err.contains("--disk-size needs --name"), "{err}");
    // The same size again is no change; the second disk never grows.
    lab.ok(&["run", "--name", "vm1", "--detach", "--disk-size", "8M"]);
    lab.stop(&["vm1"]);
    assert_eq!(size(&lab), 8 << 20);
    let data = open_image(&lab.disk("vm1", 1), &unlocked()).unwrap().size();
    assert_eq!(data, DISK_SIZE);
}

/// Mode bits of `path`.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn snapshot_files_are_their_owners_only() {
    let lab = Lab::new();
    lab.make_vm("vm1", &lab.halting);
    lab.ok(&["snapshot", "create", "vm1", "s1"]);
    lab.ok(&["snapshot", "create", "vm1", "s2"]);
    lab.ok(&["snapshot", "restore", "vm1", "s1"]);
    lab.ok(&["snapshot", "rm", "vm1", "s2"]);
    let dir = lab.vm_dir("vm1");
    for disk in DISKS {
        assert_eq!(mode(&dir.join(disk)), 0o600, "{disk}");
        let layer = snapshot_layer(&lab, "vm1", "s1", disk);
        assert_eq!(mode(&layer), 0o400, "{}", layer.display());
    }
    assert_eq!(mode(&dir.join("snapshots.json")), 0o600);
    assert_eq!(mode(&dir.join("snapshots.lock")), 0o600);
    lab.ok(&["clone", "vm1", "vm2"]);
    assert_eq!(mode(&lab.vm_dir("vm2")), 0o700);
    assert_eq!(mode(&lab.disk("vm2", 0)), 0o600);
}

/// A chain that leads outside what the VM may name (vmlab's directories,
/// the disk's own directory, its allow-backing paths) is refused by every
/// snapshot command, in one line, before anything changes.
#[test]
fn snapshot_commands_refuse_a_chain_leading_outside_the_allowed_places() {
    let lab = Lab::new();
    lab.make_vm("vm1", &lab.halting);
    let secret = lab.dir.path().join("secret.raw");
    std::fs::write(&secret, vec![b's'; DISK_SIZE as usize]).unwrap();
    lab.ok(&["snapshot", "create", "vm1", "s1"]);
    // s1's layer of disk.qcow2 replaced by one naming the secret.
    let layer = snapshot_layer(&lab, "vm1", "s1", DISKS[0]);
    std::fs::remove_file(&layer).unwrap();
    let planted = |path: &Path| {
        let size = DISK_SIZE.to_string();
        qemu_img_ok(&[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            secret.to_str().unwrap(),
            "-F",
            "raw",
            path.to_str().unwrap(),
            &size,
        ]);
    };
    planted(&layer);
    let names = |lab: &Lab| {
        let mut n: Vec<_> = std::fs::read_dir(lab.vm_dir("vm1"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        n.sort();
        n
    };
    let before = names(&lab);
    let disk0 = std::fs::read(lab.disk("vm1", 0)).unwrap();
    let err = lab.fails(&["snapshot", "restore", "vm1", "s1"]);
    assert!(
        err.contains("secret.raw") && err.contains("--allow-backing"),
        "{err}"
    );
    assert_eq!(names(&lab), before, "restore left something");
    assert_eq!(std::fs::read(lab.disk("vm1", 0)).unwrap(), disk0);

    // A disk that itself leads there: create and clone refuse it.
    std::fs::remove_file(lab.disk("vm1", 0)).unwrap();
    planted(&lab.disk("vm1", 0));
    let before = names(&lab);
    let err = lab.fails(&["snapshot", "create", "vm1", "s2"]);
    assert!(err.contains("secret.raw"), "{err}");
    let err = lab.fails(&["clone", "vm1", "vm2"]);
    assert!(err.contains("secret.raw"), "{err}");
    assert_eq!(names(&lab), before, "create or clone left something");
    assert!(!lab.vm_dir("vm2").exists());
    assert_eq!(
        backing_chain(&lab.disk("vm1", 0)).unwrap(),
        [lab.disk("vm1", 0), secret.clone()]
    );
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        vec![b's'; DISK_SIZE as usize]
    );
}
