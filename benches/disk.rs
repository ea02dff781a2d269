//! Disk benchmarks, reported not asserted: vmlab's block layer against
//! `qemu-img bench` on the same images in the same run, and `vmlab clone`
//! against `cp --sparse=always` and `qemu-img create -b`.
//!
//! Run: `nice cargo bench --bench disk` (VMLAB_BENCH_QUICK=1 for a short run).
//!
//! I/O patterns (same on both sides): "rand 4K" strides through the image by
//! 7919 × 4 KiB modulo its size (qemu-img bench has no random mode; this
//! stride touches every 4 KiB slot once, each far from the last), "seq 64K"
//! walks it in 64 KiB steps. qemu-img bench runs with its defaults (64
//! requests in flight, thread-pool AIO, writeback cache); vmlab issues one
//! synchronous request at a time, as a device thread does; so qemu-img bench
//! also runs with `-d 1` (one request in flight) for a like-for-like column.
//! Neither side's time includes opening or the final flush at close. Each
//! figure is the best of five alternating runs: the machine is shared, and a
//! single-threaded writer suffers most from other load.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmlab::disk::{clone_image, open_image, CloneOptions, OpenOptions};

const IMAGE_SIZE: u64 = 1 << 30;
const RAND_STEP_SLOTS: u64 = 7919;
const RUNS: usize = 5;

#[derive(Clone, Copy)]
struct Pattern {
    name: &'static str,
    bufsize: u64,
    step: u64,
    count: u64,
    write: bool,
}

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (install qemu-utils)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Seconds qemu-img bench reports for the pattern on `img`, with `depth`
/// requests in flight.
fn qemu_bench(img: &Path, p: Pattern, depth: u32) -> f64 {
    let depth = depth.to_string();
    let (count, size, step) = (
        p.count.to_string(),
        p.bufsize.to_string(),
        p.step.to_string(),
    );
    let mut args = vec![
        "bench",
        "-f",
        "qcow2",
        "-c",
        &count,
        "-s",
        &size,
        "-S",
        &step,
        "-t",
        "writeback",
        "-d",
        &depth,
    ];
    if p.write {
        args.push("-w");
    }
    args.push(s(img));
    let out = sh("qemu-img", &args);
    let secs = out
        .split("Run completed in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("unexpected qemu-img bench output: {out}"));
    secs
}

/// Seconds vmlab takes for the same requests on `img`.
fn vmlab_bench(img: &Path, p: Pattern) -> f64 {
    let disk = open_image(img, &OpenOptions::read_write()).unwrap();
    let size = disk.size();
    let mut buf = vec![0xa5u8; p.bufsize as usize];
    let mut offset = 0u64;
    let start = Instant::now();
    for _ in 0..p.count {
        if p.write {
            disk.write_at(offset, &buf).unwrap();
        } else {
            disk.read_at(offset, &mut buf).unwrap();
        }
        offset = (offset + p.step) % size;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(disk);
    secs
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Runs one pattern on images made by `prepare` (a fresh one per run and
/// tool for writes, one shared by all for reads); returns MB/s of qemu-img
/// bench at its default depth (64), at depth 1, and of vmlab.
fn compare(p: Pattern, prepare: &dyn Fn(&str) -> PathBuf) -> (f64, f64, f64) {
    let (mut q64, mut q1, mut v) = (Vec::new(), Vec::new(), Vec::new());
    let shared = (!p.write).then(|| prepare("read"));
    let image = |tag: String| shared.clone().unwrap_or_else(|| prepare(&tag));
    let done = |img: PathBuf| {
        if shared.is_none() {
            let _ = std::fs::remove_file(img);
        }
    };
    for run in 0..RUNS {
        let img = image(format!("q64-{run}"));
        q64.push(qemu_bench(&img, p, 64));
        done(img);
        let img = image(format!("q1-{run}"));
        q1.push(qemu_bench(&img, p, 1));
        done(img);
        let img = image(format!("v-{run}"));
        v.push(vmlab_bench(&img, p));
        done(img);
        if std::env::var_os("VMLAB_BENCH_VERBOSE").is_some() {
            eprintln!(
                "  {} run {run}: qemu -d64 {:.3} s, -d1 {:.3} s, vmlab {:.3} s",
                p.name, q64[run], q1[run], v[run]
            );
        }
    }
    let mb = (p.count * p.bufsize) as f64 / 1e6;
    (mb / best(&q64), mb / best(&q1), mb / best(&v))
}

fn io_benchmarks(dir: &Path, quick: bool) {
    let scale = if quick { 4 } else { 1 };
    let patterns = [
        Pattern {
            name: "rand 4K read",
            bufsize: 4096,
            step: 4096 * RAND_STEP_SLOTS,
            count: 40_000 / scale,
            write: false,
        },
        Pattern {
            name: "rand 4K write",
            bufsize: 4096,
            step: 4096 * RAND_STEP_SLOTS,
            count: 10_000 / scale,
            write: true,
        },
        Pattern {
            name: "seq 64K read",
            bufsize: 65536,
            step: 65536,
            count: 8192 / scale,
            write: false,
        },
        Pattern {
            name: "seq 64K write",
            bufsize: 65536,
            step: 65536,
            count: 8192 / scale,
            write: true,
        },
    ];
    // A fully written base, shared by the read tests and as backing file.
    let base = dir.join("base.qcow2");
    let size = IMAGE_SIZE.to_string();
    sh(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&base), &size],
    );
    sh(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 0x5a 0 {size}"),
            s(&base),
        ],
    );
    // Let writeback of the base finish before anything is timed.
    sh("sync", &[]);

    let fresh = |tag: &str| {
        let p = dir.join(format!("fresh-{tag}.qcow2"));
        let _ = std::fs::remove_file(&p);
        sh("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), &size]);
        p
    };
    let populated = |_: &str| base.clone();
    let overlay = |tag: &str| {
        let p = dir.join(format!("overlay-{tag}.qcow2"));
        let _ = std::fs::remove_file(&p);
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                s(&base),
                "-F",
                "qcow2",
                s(&p),
            ],
        );
        p
    };

    println!(
        "\n{:<34} {:>11} {:>11} {:>11} {:>9} {:>9}",
        "I/O pattern (1 GiB image), MB/s", "qemu -d64", "qemu -d1", "vmlab", "vs -d64", "vs -d1"
    );
    let row = |name: String, (q64, q1, v): (f64, f64, f64)| {
        println!(
            "{name:<34} {q64:>11.1} {q1:>11.1} {v:>11.1} {:>8.2}x {:>8.2}x",
            v / q64,
            v / q1
        );
    };
    let only = std::env::var("VMLAB_BENCH_PATTERN").ok();
    let patterns: Vec<Pattern> = patterns
        .into_iter()
        .filter(|p| only.as_deref().is_none_or(|o| p.name == o))
        .collect();
    for &p in &patterns {
        let (label, prep): (&str, &dyn Fn(&str) -> PathBuf) = if p.write {
            ("fresh qcow2", &fresh)
        } else {
            ("populated qcow2", &populated)
        };
        row(format!("{} ({label})", p.name), compare(p, prep));
    }
    for &p in &patterns {
        row(
            format!("{} (overlay over base)", p.name),
            compare(p, &overlay),
        );
    }
}

fn time_it(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn median_dur(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn clone_benchmarks(dir: &Path) {
    println!(
        "\n{:<22} {:>14} {:>14} {:>16} {:>16}",
        "clone of sparse base", "vmlab (lib)", "vmlab (CLI)", "qemu-img -b", "cp --sparse"
    );
    let vmlab_bin = env!("CARGO_BIN_EXE_vmlab");
    for gib in [1u64, 10, 100] {
        let base = dir.join(format!("base-{gib}g.raw"));
        let f = std::fs::File::create(&base).unwrap();
        f.set_len(gib << 30).unwrap();
        // A little data at both ends, so the base is not all hole.
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[1u8; 1 << 20], 0).unwrap();
        f.write_all_at(&[2u8; 1 << 20], (gib << 30) - (1 << 20))
            .unwrap();
        drop(f);
        let dst = dir.join("clone.qcow2");
        let (mut lib, mut cli, mut qemu, mut cp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let _ = std::fs::remove_file(&dst);
            lib.push(time_it(|| {
                clone_image(&base, &dst, &CloneOptions::default()).unwrap();
            }));
            let _ = std::fs::remove_file(&dst);
            cli.push(time_it(|| {
                sh(vmlab_bin, &["clone", s(&base), s(&dst)]);
            }));
            let _ = std::fs::remove_file(&dst);
            qemu.push(time_it(|| {
                sh(
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-b",
                        s(&base),
                        "-F",
                        "raw",
                        s(&dst),
                    ],
                );
            }));
            let copy = dir.join("copy.raw");
            let _ = std::fs::remove_file(&copy);
            cp.push(time_it(|| {
                sh("cp", &["--sparse=always", s(&base), s(&copy)]);
            }));
            let _ = std::fs::remove_file(&copy);
        }
        println!(
            "{:<22} {:>14} {:>14} {:>16} {:>16}",
            format!("{gib} GiB"),
            ms(median_dur(lib)),
            ms(median_dur(cli)),
            ms(median_dur(qemu)),
            ms(median_dur(cp))
        );
        let _ = std::fs::remove_file(&dst);
        let _ = std::fs::remove_file(&base);
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects one part.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let quick = std::env::var_os("VMLAB_BENCH_QUICK").is_some();
    let dir = tempfile::Builder::new()
        .prefix("vmlab-disk-bench")
        .tempdir()
        .unwrap();
    println!("vmlab disk benchmarks (workdir {})", dir.path().display());
    if filter.as_deref().is_none_or(|f| "io".contains(f)) {
        io_benchmarks(dir.path(), quick);
    }
    if filter.as_deref().is_none_or(|f| "clone".contains(f)) {
        clone_benchmarks(dir.path());
    }
}
