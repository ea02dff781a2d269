//! The VMM side of a resume, natively on this machine's /dev/kvm, reported
//! not asserted: a named VM runs a tiny guest that counts and prints on
//! the UART (tests/support/counter.rs); each round boots it cold with
//! `vmlab run --name c1 --detach`, suspends it, and resumes it with
//! `vmlab resume c1`. Timed from spawning the command to the guest's first
//! byte in the VM's serial log (the counter prints within microseconds of
//! running, so this is the VMM's start to the guest's first instruction,
//! plus the detach handshake both have), cold boot and resume in the same
//! run, with their ratio. The guest has 256 MiB, as the rig's boot
//! benchmark gives its guests; it touches a few pages, so the state file
//! is mostly holes.
//!
//! Run: `cargo bench --bench resume` (VMLAB_BENCH_QUICK=1 for 3 rounds).

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 10;
const WAIT_LIMIT: Duration = Duration::from_secs(20);

struct Lab {
    home: tempfile::TempDir,
}

impl Lab {
    fn command(&self, args: &[&str]) -> Command {
        let home = self.home.path();
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmlab"));
        c.args(args)
            .env("HOME", home)
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) {
        let out = self.command(args).stderr(Stdio::piped()).output().unwrap();
        assert!(
            out.status.success(),
            "vmlab {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn vm_dir(&self) -> PathBuf {
        self.home.path().join("data/vmlab/vms/c1")
    }

    fn serial_log(&self) -> PathBuf {
        self.vm_dir().join("serial.log")
    }

    /// Spawns `vmlab ARGS` with an empty serial log and returns the time
    /// to the guest's first byte in it, and to the command's exit.
    fn time_to_first_byte(&self, args: &[&str]) -> (Duration, Duration) {
        let _ = std::fs::remove_file(self.serial_log());
        let start = Instant::now();
        let mut child = self.command(args).spawn().unwrap();
        let first = wait_for_bytes(&self.serial_log(), start);
        let status = child.wait().unwrap();
        let exited = start.elapsed();
        assert!(status.success(), "vmlab {args:?}: {status}");
        (first, exited)
    }

    fn state_size(&self) -> (u64, u64) {
        let meta = std::fs::metadata(self.vm_dir().join("vm.state")).unwrap();
        (meta.blocks() * 512, meta.len())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.command(&["stop", "--timeout", "2", "c1"]).status();
    }
}

/// Polls `path` until it holds a byte (a fine poll: the figure is ms).
fn wait_for_bytes(path: &Path, start: Instant) -> Duration {
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "the guest printed nothing in {WAIT_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn main() {
    let rounds = if std::env::var_os("VMLAB_BENCH_QUICK").is_some() {
        3
    } else {
        ROUNDS
    };
    let lab = Lab {
        home: tempfile::Builder::new()
            .prefix("vmlab-bench-resume")
            .tempdir()
            .unwrap(),
    };
    let kernel = lab.home.path().join("counter.elf");
    support::counter::counter().write_elf(&kernel);
    let kernel = kernel.to_str().unwrap();
    let first_run = [
        "run", "--name", "c1", "--kernel", kernel, "--mem", "256M", "--net", "none", "--detach",
    ];
    let (mut cold, mut resume, mut resume_cmd) = (Vec::new(), Vec::new(), Vec::new());
    let mut state = (0, 0);
    for round in 0..rounds {
        let args: &[&str] = if round == 0 {
            &first_run
        } else {
            &["run", "--name", "c1", "--detach"]
        };
        let (first, _) = lab.time_to_first_byte(args);
        cold.push(ms(first));
        lab.ok(&["suspend", "c1"]);
        state = lab.state_size();
        let (first, exited) = lab.time_to_first_byte(&["resume", "c1"]);
        resume.push(ms(first));
        resume_cmd.push(ms(exited));
        lab.ok(&["stop", "--timeout", "2", "c1"]);
    }
    println!("vmlab resume, native /dev/kvm, {rounds} rounds, counting guest with 256 MiB");
    println!("{:<44} {:>10} {:>10}", "", "median ms", "min ms");
    for (what, v) in [
        ("vmlab run --detach → guest's first output", &cold),
        ("vmlab resume → guest's first output", &resume),
        ("vmlab resume → the command's exit", &resume_cmd),
    ] {
        println!("{what:<44} {:>10.2} {:>10.2}", median(v.clone()), min(v));
    }
    println!(
        "ratio resume / cold boot (median): {:.2}x",
        median(resume.clone()) / median(cold.clone())
    );
    println!(
        "state file: {:.1} MiB on disk of {:.1} MiB",
        state.0 as f64 / (1 << 20) as f64,
        state.1 as f64 / (1 << 20) as f64
    );
}
