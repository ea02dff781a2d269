//! kill -9 during snapshot operations: a child process creates, restores
//! and removes snapshots of a VM (two disks, a clone sharing its layers) in
//! a loop, and is killed at random moments, many times over the same VM.
//! After each kill every chain passes `qemu-img check`, every disk reads as
//! one whole state (never a mix), every recorded snapshot reads exactly as
//! when it was taken, an interrupted restore finishes to that snapshot on
//! every disk, and the clone never changes. The same for live snapshots of
//! a running VM, killing the command mid-way: the VM keeps running and the
//! records and chains stay whole.

mod disk_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use disk_support::{check_chains_in, pattern, tempdir, unlocked};
use support::tiny_guest::Program;
use vmlab::control::snapshot::{self, book::Book};
use vmlab::control::VmDir;
use vmlab::disk::{backing_chain, create_image, open_image, CreateOptions, OpenOptions};

const DISK_SIZE: u64 = 8 << 20;
/// Each generation rewrites this much of every disk.
const WRITTEN: usize = 3 << 20;
const DISKS: [&str; 2] = ["disk.qcow2", "data.qcow2"];
const CHILD_HOME: &str = "VMLAB_SNAP_CRASH_HOME";
const CHILD_STARTED: &str = "VMLAB_SNAP_CRASH_STARTED";
const CHILD_LIVE: &str = "VMLAB_SNAP_CRASH_LIVE";
const CHILD_RESTORES: &str = "VMLAB_SNAP_CRASH_RESTORES";
/// The child's own disk writes are no snapshot operation and a kill may
/// tear them: it notes each one here before it starts.
const WRITING: &str = "writing";

/// Points this process's XDG directories into `home`.
fn use_home(home: &Path) {
    std::env::set_var("HOME", home);
    std::env::set_var("XDG_DATA_HOME", home.join("data"));
    std::env::set_var("XDG_RUNTIME_DIR", home.join("run"));
    std::env::set_var("XDG_CACHE_HOME", home.join("cache"));
}

fn vm_dir(home: &Path, vm: &str) -> PathBuf {
    home.join("data/vmlab/vms").join(vm)
}

/// What a disk written with generation `gen` holds in its first `WRITTEN`
/// bytes: the generation, then its pattern.
fn generation_bytes(gen: u64, disk: usize) -> Vec<u8> {
    let mut bytes = pattern(gen * 10 + disk as u64, 0, WRITTEN);
    bytes[..8].copy_from_slice(&gen.to_le_bytes());
    bytes
}

/// The generation the image at `path` holds, checking every byte of it.
fn generation(path: &Path, disk: usize) -> u64 {
    let img = open_image(path, &unlocked()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut head = vec![0u8; WRITTEN];
    img.read_at(0, &mut head).unwrap();
    let gen = u64::from_le_bytes(head[..8].try_into().unwrap());
    assert!(
        head == generation_bytes(gen, disk),
        "{}: not one whole generation (marker {gen})",
        path.display()
    );
    let mut tail = vec![0u8; DISK_SIZE as usize - WRITTEN];
    img.read_at(WRITTEN as u64, &mut tail).unwrap();
    let expected = if disk == 0 {
        pattern(1, WRITTEN as u64, tail.len())
    } else {
        vec![0u8; tail.len()]
    };
    assert!(
        tail == expected,
        "{}: the unwritten part changed",
        path.display()
    );
    gen
}

fn write_generation(dir: &Path, gen: u64) {
    for (i, disk) in DISKS.iter().enumerate() {
        let img = open_image(&dir.join(disk), &OpenOptions::read_write()).unwrap();
        img.write_at(0, &generation_bytes(gen, i)).unwrap();
        img.flush().unwrap();
    }
}

/// A stopped VM vm1 with two disks (disk.qcow2 over a base elsewhere) at
/// generation 0, and its clone vm2.
fn make_vms(home: &Path, kernel: &Path) {
    let dir = vm_dir(home, "vm1");
    std::fs::create_dir_all(&dir).unwrap();
    // Where vmlab's own base images are (its backing policy trusts them).
    let images = home.join("cache/vmlab/images");
    std::fs::create_dir_all(&images).unwrap();
    let base = images.join("base.qcow2");
    create_image(&base, &CreateOptions::qcow2(DISK_SIZE)).unwrap();
    let img = open_image(&base, &OpenOptions::read_write()).unwrap();
    img.write_at(0, &pattern(1, 0, DISK_SIZE as usize)).unwrap();
    drop(img);
    let overlay = CreateOptions {
        backing: Some(base),
        ..CreateOptions::qcow2(DISK_SIZE)
    };
    create_image(&dir.join(DISKS[0]), &overlay).unwrap();
    create_image(&dir.join(DISKS[1]), &CreateOptions::qcow2(DISK_SIZE)).unwrap();
    write_generation(&dir, 0);
    std::fs::write(
        dir.join("vm.conf"),
        format!(
            "mem = 32M\ndisk = {}\ndisk = {}\nkernel = {}\nnet = none\n",
            dir.join(DISKS[0]).display(),
            dir.join(DISKS[1]).display(),
            kernel.display()
        ),
    )
    .unwrap();
    vmlab::control::clone_vm("vm1", "vm2").unwrap();
}

fn gen_of(name: &str) -> u64 {
    name.trim_start_matches('s').parse().unwrap()
}

/// The child: snapshot operations on vm1, forever (until killed).
#[test]
#[ignore = "child process of the kill tests in this file, which run it"]
fn snapshot_crash_child() {
    let home = PathBuf::from(std::env::var(CHILD_HOME).expect("run by a kill test"));
    use_home(&home);
    let dir = vm_dir(&home, "vm1");
    let vm = VmDir::existing("vm1").unwrap();
    let progress = PathBuf::from(std::env::var(CHILD_STARTED).unwrap());
    let mut ops = 0u64;
    // Tells the parent how many operations are done so far.
    let mut done = move || {
        std::fs::write(&progress, ops.to_string()).unwrap();
        ops += 1;
    };
    done();
    if std::env::var(CHILD_LIVE).is_ok() {
        // The VM runs: create and remove live snapshots.
        for i in 0u64.. {
            let name = format!("l{}-{i}", std::process::id());
            snapshot::create("vm1", &name).unwrap();
            done();
            for old in Book::load(&vm).unwrap().snapshots.iter().rev().skip(2) {
                snapshot::remove("vm1", &old.name).unwrap();
                done();
            }
        }
    }
    if std::env::var(CHILD_RESTORES).is_ok() {
        // Nothing but restores, back and forth between the last two.
        let names: Vec<String> = Book::load(&vm)
            .unwrap()
            .snapshots
            .iter()
            .rev()
            .take(2)
            .map(|s| s.name.clone())
            .collect();
        for i in 0usize.. {
            snapshot::restore("vm1", &names[i % names.len()]).unwrap();
            done();
        }
    }
    let book = Book::load(&vm).unwrap();
    let mut gen = book
        .snapshots
        .iter()
        .map(|s| gen_of(&s.name))
        .chain([
            generation(&dir.join(DISKS[0]), 0),
            generation(&dir.join(DISKS[1]), 1),
        ])
        .max()
        .unwrap();
    for step in 0u64.. {
        gen += 1;
        std::fs::write(home.join(WRITING), gen.to_string()).unwrap();
        write_generation(&dir, gen);
        std::fs::remove_file(home.join(WRITING)).unwrap();
        snapshot::create("vm1", &format!("s{gen}")).unwrap();
        done();
        let names: Vec<String> = Book::load(&vm)
            .unwrap()
            .snapshots
            .iter()
            .map(|s| s.name.clone())
            .collect();
        if step % 3 == 2 && names.len() > 1 {
            snapshot::restore("vm1", &names[(step as usize / 3) % (names.len() - 1)]).unwrap();
            done();
        }
        if names.len() > 3 {
            snapshot::remove("vm1", &names[(step as usize) % names.len()]).unwrap();
            done();
        }
    }
}

/// Runs the child and kills it `delay` after it has done `after_ops`
/// operations (counting from the start of its run, whatever the load).
fn run_child(home: &Path, round: u64, mode: Option<&str>, after_ops: u64, delay: Duration) {
    let flag = home.join(format!("progress-{round}"));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "snapshot_crash_child",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_HOME, home)
        .env(CHILD_STARTED, &flag)
        .envs(mode.map(|m| (m, "1")))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let done = || {
        std::fs::read_to_string(&flag)
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
            .is_some_and(|n| n >= after_ops)
    };
    while !done() {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!("the child died: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(delay);
    let finished = child.try_wait().unwrap().is_some();
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        !finished,
        "round {round}: the child stopped by itself: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check_chains(home: &Path, vm: &str) {
    check_chains_in(&vm_dir(home, vm));
}

fn layer_files(home: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(vm_dir(home, "vm1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".frozen-") || n.ends_with(".tmp") || n.contains(".vmlab-"))
        .collect();
    names.sort();
    names
}

#[test]
fn kill_during_create_restore_and_rm_leaves_old_or_new_state() {
    let home_dir = tempdir();
    let home = home_dir.path();
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    use_home(home);
    let kernel = home.join("tiny.elf");
    Program::new().halt_forever().write_elf(&kernel);
    make_vms(home, &kernel);
    let vm = VmDir::existing("vm1").unwrap();
    let dir = vm_dir(home, "vm1");
    let clone_gens = [
        generation(&vm_dir(home, "vm2").join(DISKS[0]), 0),
        generation(&vm_dir(home, "vm2").join(DISKS[1]), 1),
    ];
    let (mut restores_finished, mut taken) = (0, 0);
    for round in 0..24u64 {
        // The last rounds restore and nothing else, to land in restores.
        let mode = (round >= 16).then_some(CHILD_RESTORES);
        run_child(
            home,
            round,
            mode,
            round % 3,
            Duration::from_millis((round * 7919) % 60),
        );
        // Before anything finishes what was interrupted: every chain whole.
        check_chains(home, "vm1");
        if let Ok(torn) = std::fs::read_to_string(home.join(WRITING)) {
            // Killed while writing its disks: finish that write, as a guest
            // would after a crash, so that they hold one generation again.
            // (Empty: killed before the disks were touched.)
            if let Ok(gen) = torn.parse() {
                write_generation(&dir, gen);
            }
            std::fs::remove_file(home.join(WRITING)).unwrap();
        }
        let book = Book::load(&vm).unwrap();
        let restoring = book.restoring.clone();
        snapshot::finish_restore(&vm).unwrap();
        let gens = [
            generation(&dir.join(DISKS[0]), 0),
            generation(&dir.join(DISKS[1]), 1),
        ];
        assert_eq!(
            gens[0], gens[1],
            "round {round}: the disks are at one point"
        );
        if let Some(name) = restoring {
            assert_eq!(
                gens,
                [gen_of(&name); 2],
                "round {round}: restore of {name} finished"
            );
            restores_finished += 1;
        }
        let book = Book::load(&vm).unwrap();
        assert!(book.restoring.is_none());
        for s in &book.snapshots {
            for (i, part) in s.disks.iter().enumerate() {
                assert_eq!(part.disk, DISKS[i]);
                let got = generation(&dir.join(&part.layer), i);
                assert_eq!(got, gen_of(&s.name), "round {round}: snapshot {}", s.name);
            }
        }
        taken = taken.max(
            book.snapshots
                .iter()
                .map(|s| gen_of(&s.name))
                .max()
                .unwrap_or(0),
        );
        for (i, disk) in DISKS.iter().enumerate() {
            assert_eq!(
                generation(&vm_dir(home, "vm2").join(disk), i),
                clone_gens[i],
                "round {round}: the clone changed"
            );
        }
    }
    check_chains(home, "vm1");
    check_chains(home, "vm2");
    eprintln!("{taken} snapshots taken, {restores_finished} interrupted restores finished");
    assert!(
        taken >= 5,
        "the children got little done ({taken} snapshots)"
    );
    assert!(restores_finished > 0, "no kill landed inside a restore");

    // Everything left by the kills merges or goes: once no snapshot is
    // left, only the layer the clone shares remains (one per disk).
    for s in Book::load(&vm).unwrap().snapshots {
        snapshot::remove("vm1", &s.name).unwrap();
    }
    snapshot::create("vm1", "last").unwrap();
    snapshot::remove("vm1", "last").unwrap();
    let left = layer_files(home);
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(backing_chain(&dir.join(DISKS[0])).unwrap().len(), 3);
    check_chains(home, "vm1");
}

#[test]
fn kill_during_live_snapshots_leaves_the_vm_running_and_the_chains_whole() {
    let home_dir = tempdir();
    let home = home_dir.path();
    let kernel = home.join("tiny.elf");
    Program::new().out(0xe9, b'U').spin().write_elf(&kernel);
    // Its own VM, away from the other test's environment.
    let vmlab = |args: &[&str]| support::vmlab_in(home, args);
    // make_vms uses the library, which reads the environment: set it for
    // this process too (the other test sets its own the same way).
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    use_home(home);
    make_vms(home, &kernel);
    let _stop = StopOnDrop(home.to_path_buf());
    let out = vmlab(&["run", "--name", "vm1", "--detach"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = vm_dir(home, "vm1");
    for round in 0..12u64 {
        run_child(
            home,
            round,
            Some(CHILD_LIVE),
            round % 2,
            Duration::from_millis((round * 7919) % 30),
        );
        let ps = String::from_utf8_lossy(&vmlab(&["ps"]).stdout).into_owned();
        assert!(
            ps.lines()
                .any(|l| l.starts_with("vm1 ") && l.contains("running")),
            "{ps}"
        );
        // The records parse and name layers that exist.
        let vm = VmDir::existing("vm1").unwrap();
        for s in Book::load(&vm).unwrap().snapshots {
            for part in &s.disks {
                assert!(
                    dir.join(&part.layer).exists(),
                    "round {round}: {}",
                    part.layer
                );
            }
        }
    }
    // The VM still takes a live snapshot, then stops.
    let out = vmlab(&["snapshot", "create", "vm1", "after"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vmlab(&["stop", "--timeout", "1", "vm1"]);
    assert!(out.status.success());
    check_chains(home, "vm1");
    let vm = VmDir::existing("vm1").unwrap();
    for s in Book::load(&vm).unwrap().snapshots {
        for (i, part) in s.disks.iter().enumerate() {
            assert_eq!(generation(&dir.join(&part.layer), i), 0, "{}", s.name);
        }
    }
    for (i, disk) in DISKS.iter().enumerate() {
        assert_eq!(generation(&dir.join(disk), i), 0);
    }
}

/// The two tests set this process's environment in turn.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Stops the test's VM however the test ends (a spinning guest would
/// otherwise burn a CPU for good).
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = support::vmlab_in(&self.0, &["stop", "--timeout", "1", "vm1"]);
    }
}
