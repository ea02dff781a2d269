//! Crash safety: a child process writes, zeroes and flushes at random and is
//! killed with SIGKILL at a random moment, many times over the same images.
//! After each kill `qemu-img check` must find no corruption (leaks are fine)
//! and everything acknowledged before the last completed flush must read back.

mod disk_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use disk_support::*;
use vmlab::disk::{create_image, open_image, CreateOptions, ImageFormat, OpenOptions};

const CHILD_IMAGE: &str = "VMLAB_CRASH_IMAGE";
const CHILD_LOG: &str = "VMLAB_CRASH_LOG";
const CHILD_SEED: &str = "VMLAB_CRASH_SEED";
const IMAGE_SIZE: u64 = 8 << 20;

/// A tiny deterministic generator (xorshift), so the child needs no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The child half: runs until killed, logging each operation before it
/// starts and each flush after it completes.
#[test]
#[ignore = "child process of crash_leaves_images_consistent, which runs it"]
fn crash_child() {
    let image = std::env::var(CHILD_IMAGE).expect("run by crash_leaves_images_consistent");
    let log_path = std::env::var(CHILD_LOG).unwrap();
    let seed: u64 = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
    let mut opts = OpenOptions::read_write();
    if image.contains("tiny-cache") {
        // Evict metadata all the time: write-back order under pressure.
        opts.cache_bytes = Some(1);
    }
    let img = open_image(Path::new(&image), &opts).unwrap();
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(log_path)
        .unwrap();
    let mut rng = Rng(seed | 1);
    let size = img.size();
    for seq in 0u64.. {
        let pick = rng.below(10);
        let at = rng.below(size);
        let len = (1 + rng.below(200_000)).min(size - at);
        if pick < 7 {
            log.write_all(format!("W {seq} {at} {len}\n").as_bytes())
                .unwrap();
            img.write_at(at, &pattern(seed ^ seq, at, len as usize))
                .unwrap();
        } else if pick < 8 {
            log.write_all(format!("Z {seq} {at} {len}\n").as_bytes())
                .unwrap();
            img.discard(at, len).unwrap();
        } else {
            img.flush().unwrap();
            log.write_all(format!("F {seq}\n").as_bytes()).unwrap();
        }
    }
}

enum Logged {
    Write { seq: u64, at: u64, len: u64 },
    Zero { at: u64, len: u64 },
    Flush,
}

fn parse_log(text: &str) -> Vec<Logged> {
    let mut ops = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        match (f[0], num(1), num(2), num(3)) {
            ("W", Some(seq), Some(at), Some(len)) => ops.push(Logged::Write { seq, at, len }),
            ("Z", Some(_), Some(at), Some(len)) => ops.push(Logged::Zero { at, len }),
            ("F", Some(_), _, _) => ops.push(Logged::Flush),
            _ => {} // a line cut by the kill
        }
    }
    ops
}

fn read_all(path: &Path) -> Vec<u8> {
    let img = open_image(path, &OpenOptions::read_write()).expect("reopen after the crash");
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}

struct Scenario {
    image: PathBuf,
    contents: Vec<u8>,
}

fn scenario(dir: &Path, name: &str, cluster: u64, backing: Option<PathBuf>) -> Scenario {
    let image = dir.join(name);
    let opts = CreateOptions {
        size: Some(IMAGE_SIZE),
        format: ImageFormat::Qcow2,
        cluster_size: cluster,
        backing,
        force: false,
        backing_policy: vmlab::disk::BackingPolicy::vmlab(),
    };
    create_image(&image, &opts).unwrap();
    let contents = read_all(&image);
    Scenario { image, contents }
}

/// One child run, killed after `delay`; checks the image afterwards.
fn crash_once(sc: &mut Scenario, dir: &Path, seed: u64, delay: Duration) -> (usize, bool) {
    let log = dir.join("ops.log");
    std::fs::write(&log, b"").unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_IMAGE, &sc.image)
        .env(CHILD_LOG, &log)
        .env(CHILD_SEED, seed.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let finished_early = child.try_wait().unwrap().is_some();
    child.kill().unwrap(); // SIGKILL
    let out = child.wait_with_output().unwrap();
    assert!(
        !finished_early,
        "the child stopped by itself: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    qemu_check(&sc.image);

    let ops = parse_log(&std::fs::read_to_string(&log).unwrap());
    let last_flush = ops.iter().rposition(|o| matches!(o, Logged::Flush));
    let mut expect = sc.contents.clone();
    let mut uncertain = vec![false; expect.len()];
    for (i, op) in ops.iter().enumerate() {
        let durable = last_flush.is_some_and(|f| i < f);
        match *op {
            Logged::Write { seq, at, len } if durable => {
                expect[at as usize..(at + len) as usize].copy_from_slice(&pattern(
                    seed ^ seq,
                    at,
                    len as usize,
                ));
            }
            Logged::Zero { at, len } if durable => expect[at as usize..(at + len) as usize].fill(0),
            Logged::Write { at, len, .. } | Logged::Zero { at, len } => {
                uncertain[at as usize..(at + len) as usize].fill(true)
            }
            Logged::Flush => {}
        }
    }
    let actual = read_all(&sc.image);
    if let Some(bad) = (0..actual.len()).find(|&i| !uncertain[i] && actual[i] != expect[i]) {
        panic!(
            "{}: byte {bad} is {} but {} was acknowledged by a flush (seed {seed}, {} ops logged)",
            sc.image.display(),
            actual[bad],
            expect[bad],
            ops.len()
        );
    }
    sc.contents = actual;
    (ops.len(), last_flush.is_some())
}

#[test]
fn crash_leaves_images_consistent() {
    let dir = tempdir();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(99, 0, IMAGE_SIZE as usize)).unwrap();
    let mut scenarios = [
        scenario(dir.path(), "plain-4k.qcow2", 4096, None),
        scenario(dir.path(), "overlay-64k.qcow2", 65536, Some(base.clone())),
        scenario(dir.path(), "overlay-512-tiny-cache.qcow2", 512, Some(base)),
    ];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let rounds = 40;
    let (mut total_ops, mut with_flush) = (0, 0);
    for _ in 0..rounds {
        for sc in scenarios.iter_mut() {
            let delay = Duration::from_millis(5 + rng.below(80));
            let (n, flushed) = crash_once(sc, dir.path(), rng.next(), delay);
            total_ops += n;
            with_flush += flushed as usize;
        }
    }
    eprintln!(
        "{} kills, {total_ops} operations logged, {with_flush} runs reached a flush",
        rounds * 3
    );
    // The test means little unless children got work done before dying.
    assert!(
        with_flush >= rounds,
        "too few runs got as far as a flush ({with_flush})"
    );
}
