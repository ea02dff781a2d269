//! The boot benchmark as a cargo bench: `cargo bench --bench boot`.
//!
//! Runs the same measurements as `vmlab bench boot` (vmlab, QEMU microvm and
//! runc to the guest's init, interleaved; vmlab's CPU and memory cost; the
//! same three to ssh-ready when the Debian image is built) and prints the
//! table, the ratios and the targets. Results are written to
//! `target/tmp/boot.json` and `target/tmp/boot.svg`.
//!
//! Where /dev/kvm is hardware-style it runs here. On a PVM host (which cannot
//! boot the guest) it does two things instead:
//! - measures vmlab's own start-up natively, up to the first vCPU entry
//!   (which does not need the guest to boot): `boot-first-entry.json`;
//! - runs `vmlab bench boot` inside the emulated-SVM rig (tests/rig), where
//!   only the ratios mean anything.
//!
//! `VMLAB_BENCH_RUNS` sets the rounds (default 10), `VMLAB_BENCH_WARMUP`
//! the unmeasured ones before them (default 1). In the rig the ssh-ready
//! contenders take minutes per round, so they run there only with
//! `VMLAB_BENCH_SSH=1`; `VMLAB_BENCH_FULL=1` adds, in the same L1 boot,
//! `vmlab bench boot --flavor full` (vmlab and QEMU microvm to init and
//! ssh-ready on the full image, and vmlab resume), as `boot-full.json` and
//! `boot-full.svg`. The images they boot are built on the host first (L1
//! reads the cache, read-only, and has no network).

#[path = "../tests/rig/mod.rs"]
mod rig;

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmlab::bench::{table, BootBench, HostInfo, HostKind, Progress, RunOptions, SshPeers};

fn runs() -> usize {
    std::env::var("VMLAB_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(10)
}

fn warmup() -> usize {
    std::env::var("VMLAB_BENCH_WARMUP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn save(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    match vmlab::fsutil::write_atomically(&path, text.as_bytes()) {
        Ok(()) => println!("bench: wrote {}", path.display()),
        Err(e) => eprintln!("bench: cannot write {}: {e}", path.display()),
    }
}

fn main() {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let host = HostInfo::detect();
    println!("bench: host: {}", host.describe());
    let artifacts = rig::artifacts().unwrap_or_else(|e| panic!("bench: {e}"));
    let bench = BootBench {
        vmlab: PathBuf::from(env!("CARGO_BIN_EXE_vmlab")),
        kernel: artifacts.vmlinux.clone(),
        initrd: artifacts.initramfs.clone(),
        mem_mib: 256,
        options: RunOptions {
            runs: runs(),
            warmup: warmup(),
        },
        ssh: SshPeers::Auto,
        flavor: vmlab::image::Flavor::Lean,
    };

    if host.kind != HostKind::Pvm {
        let report = bench
            .run(&Progress::stderr())
            .unwrap_or_else(|e| panic!("bench: {e}"));
        print!("{}", table::render(&report));
        save(&out, "boot.json", &report.to_json());
        save(&out, "boot.svg", &vmlab::bench::chart::render(&report));
        return;
    }

    println!("\nbench: vmlab's start-up to the first vCPU entry, natively on this PVM host");
    let native = bench
        .run_first_entry(&Progress::stderr())
        .unwrap_or_else(|e| panic!("bench: {e}"));
    print!("{}", table::render(&native));
    save(&out, "boot-first-entry.json", &native.to_json());

    println!("\nbench: the whole boot benchmark in the emulated-SVM rig (ratios only)");
    // About 25 s per round in the rig (vmlab ~10 s, QEMU ~12 s, runc ~1 s);
    // the ssh-ready ones add minutes (two Debian boots, the container's
    // root filesystem unpacked once).
    let flag_set = |name: &str| std::env::var_os(name).is_some_and(|v| v == "1");
    let (ssh, full) = (flag_set("VMLAB_BENCH_SSH"), flag_set("VMLAB_BENCH_FULL"));
    if ssh {
        build_image(&[]);
    }
    if full {
        build_image(&["--flavor", "full"]);
    }
    let (per_round, flag) = if ssh {
        (400, "--ssh")
    } else {
        (40, "--no-ssh")
    };
    let (runs, warmup) = (bench.options.runs, bench.options.warmup);
    let rounds = (runs + warmup) as u64;
    let limit = Duration::from_secs(300 + per_round * rounds);
    let script = format!(
        r#""$VMLAB" bench boot --kernel "$VMLAB_VMLINUX" --initrd "$VMLAB_INITRAMFS" --runs {runs} --warmup {warmup} {flag} --json "$RIG_OUT/boot.json" --plot "$RIG_OUT/boot.svg""#
    );
    let mut batch = rig::Batch::new("bench_boot").scenario("bench_boot", limit, &script);
    if full {
        // Three full boots a round (vmlab, QEMU, the resume contender's
        // first), each minutes under the rig's emulation.
        let script = format!(
            r#""$VMLAB" bench boot --flavor full --mem 512M --runs {runs} --warmup {warmup} --ssh --json "$RIG_OUT/boot-full.json" --plot "$RIG_OUT/boot-full.svg""#
        );
        let limit = Duration::from_secs(600 + 1200 * rounds);
        // The suspended resume VM's state lies on L1's tmpfs beside the
        // running one.
        batch = batch.mem("3G").scenario("bench_boot_full", limit, &script);
    }
    let run = batch.run();
    let mut scenarios = vec![("bench_boot", "boot")];
    if full {
        scenarios.push(("bench_boot_full", "boot-full"));
    }
    for (name, file) in scenarios {
        let s = run.scenario(name);
        println!("{}", s.output);
        let s = s.assert_success();
        save(
            &out,
            &format!("{file}.json"),
            s.file(&format!("{file}.json")),
        );
        save(&out, &format!("{file}.svg"), s.file(&format!("{file}.svg")));
    }
}

/// `vmlab image build ARGS` on the host, for L1 to find the image cached.
fn build_image(args: &[&str]) {
    println!("bench: vmlab image build {}", args.join(" "));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_vmlab"))
        .args(["image", "build"])
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("bench: cannot run vmlab: {e}"));
    assert!(
        status.success(),
        "bench: vmlab image build {} failed (needs root, debootstrap and the Debian mirror: run .ci/setup)",
        args.join(" ")
    );
}
