//! The emulated-SVM end-to-end test rig, shared by the `tests/e2e_*.rs` files
//! (`mod rig;`).
//!
//! This host's /dev/kvm cannot run Linux guests (it is PVM, see
//! shared/hosts-and-test-rig.md), so end-to-end tests run inside "L1": QEMU
//! TCG with `-cpu max` (an emulated AMD CPU with SVM) booting vmlab's own
//! guest kernel, which then offers an ordinary hardware-style /dev/kvm. L1
//! sees the host's root read-only and runs host-built programs
//! (target/release/vmlab) as they are; see `tests/rig/l1` for the machine.
//!
//! Booting L1 costs seconds, so a test file describes a [`Batch`] of bash
//! scenarios, boots L1 once for all of them, and its `#[test]`s then assert on
//! one scenario each:
//!
//! ```ignore
//! mod rig;
//! use std::sync::OnceLock;
//! use std::time::Duration;
//!
//! fn l1() -> &'static rig::Run {
//!     static RUN: OnceLock<rig::Run> = OnceLock::new();
//!     RUN.get_or_init(|| {
//!         rig::Batch::new("e2e_run")
//!             .scenario("nproc", Duration::from_secs(120), r#"
//!                 rig_console_start vm "$VMLAB" run --kernel "$VMLAB_VMLINUX" --cpus 2
//!                 rig_console_wait vm 'root@vmlab:.*# ' 90
//!                 rig_console_send vm 'echo "nproc=$(nproc)"'
//!                 rig_console_wait vm '^nproc=[0-9]'
//!                 rig_console_send vm poweroff
//!                 rig_console_exit vm 60
//!             "#)
//!             .run()
//!     })
//! }
//!
//! #[test]
//! fn guest_sees_two_cpus() {
//!     let s = l1().scenario("nproc").assert_success();
//!     assert!(s.file("vm.console").contains("nproc=2"), "{}", s.diagnostics());
//! }
//! ```
//!
//! Scenarios are bash scripts run in order inside L1 as `bash -euo pipefail`,
//! with the helpers of `tests/rig/lib.sh` (`rig_console_*`, `rig_ms`) and these
//! variables: `VMLAB` (the vmlab binary under test), `VMLAB_VMLINUX`,
//! `VMLAB_BZIMAGE`, `VMLAB_INITRAMFS` (the default guest), `RIG_REPO`,
//! `RIG_OUT` (files left there come back as [`Scenario::file`]) and `RIG_TMP`
//! (scratch on L1's tmpfs). See `tests/rig/batch.sh`.
//!
//! Environment knobs: `VMLAB_RIG_VERBOSE=1` copies L1's console to stderr as
//! it runs; `VMLAB_RIG_KEEP=1` keeps the run directory (its path is printed);
//! `VMLAB_RIG_MEM` sets L1's memory (default 2G).

// Each test file uses its own part of the rig.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// L1's init prints this first: the host timestamps it as "L1 reached init".
const INIT_MARKER: &str = "rig-l1: init started";
/// Time allowed for L1 to boot and power off, on top of its scenarios'.
const L1_ALLOWANCE: Duration = Duration::from_secs(120);
/// L1 kills a scenario at its time limit (timeout(1) in batch.sh); a scenario
/// still running this long after it means L1 itself stopped responding.
const L1_FROZEN_AFTER: Duration = Duration::from_secs(45);
/// L1 boots per batch: the second runs what a frozen first one left.
const L1_BOOTS: u32 = 2;
/// Lines of a scenario's output, and of L1's console, quoted in failure
/// messages.
const TAIL_LINES: usize = 40;
const CONSOLE_TAIL_LINES: usize = 25;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// What the rig and the scenarios boot: built by guest/'s recipes, cached.
#[derive(Debug)]
pub struct Artifacts {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    /// The default guest's initramfs.
    pub initramfs: PathBuf,
}

/// Builds (or finds in the cache) the lean guest kernel and initramfs and
/// L1's initramfs, once per test process. The rig runs on vmlab's lean
/// kernel, L1 and guests alike (it boots faster than Debian's packaged one,
/// and the suite boots dozens of guests). A first build of the kernel takes
/// several minutes; its progress goes to stderr.
pub fn artifacts() -> Result<&'static Artifacts, String> {
    static ARTIFACTS: OnceLock<Result<Artifacts, String>> = OnceLock::new();
    ARTIFACTS
        .get_or_init(|| {
            // Through vmlab, which notes that the lean kernel is built: the
            // default guests in L1 boot it too.
            let vmlinux = PathBuf::from(vmlab(&["image", "kernel", "lean"])?);
            let kernel_dir = vmlinux.parent().map(Path::to_path_buf).unwrap_or_default();
            let initramfs = PathBuf::from(recipe(&["guest/build-initramfs.sh"])?);
            // L1's own initramfs, built now so that booting L1 is quick.
            recipe(&["guest/build-initramfs.sh", "tests/rig/initramfs"])?;
            Ok(Artifacts {
                vmlinux: kernel_dir.join("vmlinux"),
                bzimage: kernel_dir.join("bzImage"),
                initramfs,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Fetches (or finds in the cache) Debian's packaged kernel and the default
/// guest's initramfs for it, as `.ci/setup` does, so that
/// `VMLAB_GUEST_KERNEL=debian vmlab run` finds them in L1 (which has no
/// network); returns the kernel (the bzImage).
pub fn debian_guest() -> Result<&'static Path, String> {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KERNEL
        .get_or_init(|| vmlab(&["image", "kernel", "debian"]).map(PathBuf::from))
        .as_ref()
        .map(PathBuf::as_path)
        .map_err(Clone::clone)
}

/// Runs the vmlab under test on the host; returns the last line it printed.
fn vmlab(args: &[&str]) -> Result<String, String> {
    last_line(
        "vmlab",
        Command::new(env!("CARGO_BIN_EXE_vmlab")).args(args),
    )
}

/// Runs one of guest/'s build scripts; returns the last line it printed.
fn recipe(args: &[&str]) -> Result<String, String> {
    last_line("bash", Command::new("bash").args(args))
}

fn last_line(program: &str, command: &mut Command) -> Result<String, String> {
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let output = command
        .current_dir(repo())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {program} {}: {e}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().last() {
        Some(last) if output.status.success() => Ok(last.to_string()),
        _ => Err(format!(
            "{program} {} failed ({}); run .ci/setup to install what it needs",
            args.join(" "),
            output.status
        )),
    }
}

/// One scenario as declared.
struct ScenarioSpec {
    name: String,
    timeout: Duration,
    script: String,
}

/// The scenarios that one L1 boot runs, in order.
pub struct Batch {
    name: String,
    mem: String,
    kernel: L1Kernel,
    env: Vec<(String, String)>,
    writable: Vec<PathBuf>,
    scenarios: Vec<ScenarioSpec>,
}

/// The kernel L1 boots (tests/rig/l1 --kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L1Kernel {
    /// vmlab's lean kernel: the batches' default, it boots L1 in half the
    /// time of Debian's.
    Lean,
    /// Debian's packaged kernel with its modules in L1's initramfs: what
    /// `tests/rig/l1` boots for a new user, before the lean kernel is built.
    Debian,
}

impl L1Kernel {
    fn name(self) -> &'static str {
        match self {
            L1Kernel::Lean => "lean",
            L1Kernel::Debian => "debian",
        }
    }
}

impl Batch {
    /// `name` appears in the run directory's name and in messages.
    pub fn new(name: &str) -> Self {
        Batch {
            name: name.to_string(),
            mem: std::env::var("VMLAB_RIG_MEM").unwrap_or_else(|_| "2G".to_string()),
            kernel: L1Kernel::Lean,
            env: Vec::new(),
            writable: Vec::new(),
            scenarios: Vec::new(),
        }
    }

    /// L1's memory, in QEMU's syntax (`2G`, `3072M`).
    pub fn mem(mut self, size: &str) -> Self {
        self.mem = size.to_string();
        self
    }

    /// L1's kernel (default: the lean one).
    pub fn l1_kernel(mut self, kernel: L1Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// An extra environment variable for every scenario.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Shares an existing host directory writable with L1, at the same path
    /// (everything else of the host is read-only there).
    pub fn writable(mut self, dir: &Path) -> Self {
        self.writable.push(dir.to_path_buf());
        self
    }

    /// Adds a bash scenario that L1 kills after `timeout`. Names are
    /// identifiers (letters, digits, `_`, `-`), unique within the batch.
    pub fn scenario(mut self, name: &str, timeout: Duration, script: &str) -> Self {
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "rig: scenario name {name:?} must be letters, digits, '_' or '-'"
        );
        assert!(
            self.scenarios.iter().all(|s| s.name != name),
            "rig: scenario {name:?} declared twice"
        );
        self.scenarios.push(ScenarioSpec {
            name: name.to_string(),
            timeout,
            script: script.to_string(),
        });
        self
    }

    /// Boots L1, runs every scenario, powers L1 off and collects the results.
    /// Never panics: a failure to even start is kept in the [`Run`] and
    /// reported by the tests that look at it.
    pub fn run(self) -> Run {
        Run {
            batch: self.name.clone(),
            result: self.run_l1(),
        }
    }

    fn run_l1(self) -> Result<Report, String> {
        let artifacts = artifacts()?;
        let dir = RunDir::create(&self.name)?;
        self.write_inputs(&dir.path, artifacts)
            .map_err(|e| format!("cannot write the run directory {}: {e}", dir.path.display()))?;
        let scenario_path =
            |i: usize, spec: &ScenarioSpec| dir.path.join("scenarios").join(scenario_dir(i, spec));
        let mut consoles = Vec::new();
        let mut stderrs = Vec::new();
        let mut l1_init = None;
        let mut total = Duration::ZERO;
        let mut boots = 0;
        let failure = loop {
            boots += 1;
            // batch.sh skips scenarios that already have a status, so a new
            // L1 after a freeze runs only what the frozen one did not finish.
            let _ = std::fs::remove_file(dir.path.join("status"));
            let pending: BTreeMap<String, Duration> = self
                .scenarios
                .iter()
                .enumerate()
                .filter(|(i, spec)| !scenario_path(*i, spec).join("status").exists())
                .map(|(i, spec)| (scenario_dir(i, spec), spec.timeout))
                .collect();
            let limit = L1_ALLOWANCE
                + pending
                    .values()
                    .map(|t| *t + Duration::from_secs(10))
                    .sum::<Duration>();
            let l1 = L1::boot(&dir.path, &self.mem, self.kernel, &self.writable)?;
            let outcome = l1.wait(limit, &pending);
            l1_init = l1_init.or(outcome.init_at);
            total += outcome.total;
            consoles.push(outcome.console);
            if !outcome.stderr.trim().is_empty() {
                stderrs.push(outcome.stderr);
            }
            let status = std::fs::read_to_string(dir.path.join("status")).ok();
            match (outcome.end, status.as_deref().map(str::trim)) {
                (End::Froze(why), _) if boots < L1_BOOTS => {
                    // An L1 kernel must stay responsive whatever its KVM
                    // guests do; when it stops (nested SVM under TCG on a
                    // loaded host does, rarely), the emulator failed, not
                    // vmlab: say so and run the rest in a fresh L1.
                    eprintln!(
                        "rig: batch {}: L1 stopped responding ({why}); booting a new L1 for the unfinished scenarios",
                        self.name
                    );
                    continue;
                }
                (End::Froze(why), _) => {
                    break Some(format!("L1 stopped responding ({why}) and was killed"))
                }
                (End::TimedOut, _) => {
                    break Some(format!(
                        "L1 ran over its time limit of {limit:?} and was killed"
                    ))
                }
                (End::Exited(_), Some("0")) => break None,
                (End::Exited(_), Some(code)) => {
                    break Some(format!("the batch script exited with status {code} in L1"))
                }
                (End::Exited(exit), None) => {
                    break Some(format!("L1 stopped ({exit}) without finishing its batch"))
                }
            }
        };
        let console = consoles.join("\n--- rig: a new L1 boot, after the previous one froze ---\n");
        let mut console_tail = tail(&console, CONSOLE_TAIL_LINES);
        for stderr in &stderrs {
            let _ = write!(
                console_tail,
                "\n--- stderr of tests/rig/l1 ---\n{}",
                tail(stderr, TAIL_LINES)
            );
        }
        let scenarios = self
            .scenarios
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let mut s = Scenario::collect(&scenario_path(i, spec), spec);
                s.l1_failure = failure.clone();
                s.console_tail = console_tail.clone();
                s
            })
            .collect();
        Ok(Report {
            l1_init,
            total,
            l1_boots: boots,
            failure,
            console,
            scenarios,
        })
    }

    fn write_inputs(&self, dir: &Path, artifacts: &Artifacts) -> std::io::Result<()> {
        let vars = [
            ("VMLAB", PathBuf::from(env!("CARGO_BIN_EXE_vmlab"))),
            ("VMLAB_VMLINUX", artifacts.vmlinux.clone()),
            ("VMLAB_BZIMAGE", artifacts.bzimage.clone()),
            ("VMLAB_INITRAMFS", artifacts.initramfs.clone()),
            ("RIG_REPO", repo().to_path_buf()),
        ];
        // The default guests on the lean kernel too; a scenario booting
        // Debian's says VMLAB_GUEST_KERNEL=debian.
        let mut env = String::from("export HOME=/root LC_ALL=C.UTF-8 VMLAB_GUEST_KERNEL=lean\n");
        for (key, value) in vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .chain(self.env.iter().cloned())
        {
            let _ = writeln!(env, "export {key}={}", shell_quote(&value));
        }
        std::fs::write(dir.join("env.sh"), env)?;
        let batch = repo().join("tests/rig/batch.sh");
        std::fs::write(
            dir.join("run.sh"),
            format!(
                "exec bash {} /run/rig\n",
                shell_quote(&batch.display().to_string())
            ),
        )?;
        for (i, spec) in self.scenarios.iter().enumerate() {
            let sdir = dir.join("scenarios").join(scenario_dir(i, spec));
            std::fs::create_dir_all(&sdir)?;
            std::fs::write(sdir.join("script"), &spec.script)?;
            std::fs::write(
                sdir.join("timeout"),
                format!("{}\n", spec.timeout.as_secs().max(1)),
            )?;
        }
        Ok(())
    }
}

fn scenario_dir(index: usize, spec: &ScenarioSpec) -> String {
    format!("{:03}-{}", index + 1, spec.name)
}

/// The outcome of one L1 boot: what it measured and each scenario's result.
pub struct Run {
    batch: String,
    result: Result<Report, String>,
}

/// What L1 did, when it got that far.
pub struct Report {
    /// From starting QEMU to L1's init printing its first line.
    pub l1_init: Option<Duration>,
    /// From starting QEMU to its exit (summed over L1 boots).
    pub total: Duration,
    /// How many times L1 was booted: 2 when the first one froze and a new
    /// one ran the scenarios it had not finished.
    pub l1_boots: u32,
    /// Why L1 itself failed, if it did (time limit, batch script status).
    pub failure: Option<String>,
    /// L1's whole serial console.
    pub console: String,
    pub scenarios: Vec<Scenario>,
}

impl Run {
    /// The report, or panics saying why L1 could not run at all.
    pub fn report(&self) -> &Report {
        match &self.result {
            Ok(report) => report,
            Err(e) => panic!("rig: batch {}: L1 could not run: {e}", self.batch),
        }
    }

    /// One scenario's result, or panics saying why there is none.
    pub fn scenario(&self, name: &str) -> &Scenario {
        let report = self.report();
        match report.scenarios.iter().find(|s| s.name == name) {
            Some(s) => s,
            None => panic!("rig: batch {} has no scenario {name:?}", self.batch),
        }
    }

    /// Panics unless L1 booted, ran its whole batch and powered off in time.
    pub fn assert_l1_ok(&self) -> &Report {
        let report = self.report();
        if let Some(failure) = &report.failure {
            panic!(
                "rig: batch {}: {failure}\n--- L1 console (last {CONSOLE_TAIL_LINES} lines) ---\n{}",
                self.batch,
                tail(&report.console, CONSOLE_TAIL_LINES)
            );
        }
        report
    }
}

/// The result of one scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    /// Exit status; `None` when it never finished (L1 died or was killed).
    pub status: Option<i32>,
    /// Its stdout and stderr, interleaved.
    pub output: String,
    /// Wall time inside L1.
    pub elapsed: Option<Duration>,
    /// Files it left in `$RIG_OUT`, by name (read as UTF-8, lossily).
    pub files: BTreeMap<String, String>,
    timeout: Duration,
    l1_failure: Option<String>,
    console_tail: String,
}

impl Scenario {
    fn collect(dir: &Path, spec: &ScenarioSpec) -> Scenario {
        let read = |name: &str| std::fs::read(dir.join(name)).ok();
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        let mut files = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(dir.join("out")) {
            for entry in entries.flatten() {
                if let Ok(bytes) = std::fs::read(entry.path()) {
                    files.insert(
                        entry.file_name().to_string_lossy().into_owned(),
                        text(bytes),
                    );
                }
            }
        }
        Scenario {
            name: spec.name.clone(),
            status: read("status").and_then(|b| text(b).trim().parse().ok()),
            output: read("output").map(text).unwrap_or_default(),
            elapsed: read("elapsed_ms")
                .and_then(|b| text(b).trim().parse().ok())
                .map(Duration::from_millis),
            files,
            timeout: spec.timeout,
            l1_failure: None,
            console_tail: String::new(),
        }
    }

    /// Panics with [`Scenario::diagnostics`] unless the scenario exited 0.
    pub fn assert_success(&self) -> &Self {
        if self.status != Some(0) {
            panic!("{}", self.diagnostics());
        }
        self
    }

    /// A file the scenario left in `$RIG_OUT`; panics with diagnostics when
    /// there is none.
    pub fn file(&self, name: &str) -> &str {
        match self.files.get(name) {
            Some(text) => text,
            None => panic!("rig: no file {name:?} in $RIG_OUT\n{}", self.diagnostics()),
        }
    }

    /// The value of the last `KEY=VALUE` line of the output; panics with
    /// diagnostics when there is none.
    pub fn value(&self, key: &str) -> &str {
        match self.get(key) {
            Some(value) => value,
            None => panic!(
                "rig: no line {key}=... in the output\n{}",
                self.diagnostics()
            ),
        }
    }

    /// The last `key=...` line of its output, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        let prefix = format!("{key}=");
        self.output
            .lines()
            .rev()
            .find_map(|l| l.trim_end().strip_prefix(&prefix))
    }

    /// [`Scenario::value`] parsed as a number of milliseconds.
    pub fn millis(&self, key: &str) -> Duration {
        match self.value(key).parse() {
            Ok(ms) => Duration::from_millis(ms),
            Err(_) => panic!(
                "rig: {key}={} is not milliseconds\n{}",
                self.value(key),
                self.diagnostics()
            ),
        }
    }

    /// What went wrong, for failure messages: status, output tail, files it
    /// left, and L1's console tail.
    pub fn diagnostics(&self) -> String {
        let mut d = String::new();
        let _ = match (self.status, &self.l1_failure) {
            (Some(0), _) => writeln!(d, "rig: scenario {} exited 0", self.name),
            // 124 and 137 are also what a `timeout` inside the script
            // returns: only a run as long as the limit was the limit's.
            (Some(124 | 137), _) if self.elapsed.is_none_or(|e| e >= self.timeout) => writeln!(
                d,
                "rig: scenario {} ran over its time limit of {:?} and was killed",
                self.name, self.timeout
            ),
            (Some(code), _) => writeln!(
                d,
                "rig: scenario {} failed with exit status {code}",
                self.name
            ),
            (None, Some(why)) => writeln!(d, "rig: scenario {} did not finish: {why}", self.name),
            (None, None) => writeln!(d, "rig: scenario {} did not finish", self.name),
        };
        let _ = writeln!(
            d,
            "--- its output (last {TAIL_LINES} lines) ---\n{}",
            tail(&self.output, TAIL_LINES)
        );
        if !self.files.is_empty() {
            let names: Vec<_> = self.files.keys().map(String::as_str).collect();
            let _ = writeln!(d, "--- files in $RIG_OUT: {}", names.join(", "));
        }
        let _ = write!(
            d,
            "--- L1 console (last {CONSOLE_TAIL_LINES} lines) ---\n{}",
            self.console_tail
        );
        d
    }
}

/// The per-run host directory shared with L1 (9p tag `rig`, /run/rig in L1).
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn create(batch: &str) -> Result<RunDir, String> {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmlab-rig-{}-{}-{batch}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover of an earlier process with the same pid is stale.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(path.join("scenarios"))
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    /// Removes the directory, unless VMLAB_RIG_KEEP asks to keep it.
    fn drop(&mut self) {
        if std::env::var_os("VMLAB_RIG_KEEP").is_some() {
            eprintln!("rig: run directory kept: {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A running L1 machine (QEMU, started by `tests/rig/l1 --batch`).
struct L1 {
    child: Child,
    started: Instant,
    console: Arc<Mutex<Console>>,
    reader: JoinHandle<()>,
    stderr: JoinHandle<String>,
}

/// L1's console as read so far.
#[derive(Default)]
struct Console {
    bytes: Vec<u8>,
    init_at: Option<Duration>,
}

/// How an L1 run ended.
enum End {
    Exited(String),
    TimedOut,
    /// L1 stopped making progress; why we think so.
    Froze(String),
}

struct Outcome {
    end: End,
    init_at: Option<Duration>,
    total: Duration,
    console: String,
    stderr: String,
}

impl L1 {
    fn boot(dir: &Path, mem: &str, kernel: L1Kernel, writable: &[PathBuf]) -> Result<L1, String> {
        let l1 = repo().join("tests/rig/l1");
        let started = Instant::now();
        // `l1 --batch` execs QEMU, so killing the child kills QEMU.
        let mut child = Command::new("bash")
            .arg(&l1)
            .arg("--batch")
            .arg(dir)
            .args(["--kernel", kernel.name()])
            .args(["--mem", mem])
            .args(writable.iter().flat_map(|d| [Path::new("--rw"), d]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start bash {}: {e}", l1.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let console = Arc::new(Mutex::new(Console::default()));
        let reader = {
            let console = console.clone();
            thread::spawn(move || read_console(stdout, started, &console))
        };
        let stderr = thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        });
        Ok(L1 {
            child,
            started,
            console,
            reader,
            stderr,
        })
    }

    /// Waits for QEMU to exit, killing it at `limit`, or as soon as a
    /// scenario of `pending` (directory name → time limit) runs well past its
    /// own limit, which L1 enforces itself unless it has stopped responding.
    fn wait(mut self, limit: Duration, pending: &BTreeMap<String, Duration>) -> Outcome {
        let mut watch = Watchdog::default();
        let end = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break End::Exited(status.to_string()),
                Ok(None) => {}
                Err(e) => break End::Exited(format!("wait failed: {e}")),
            }
            let frozen = {
                let console = self.console.lock().unwrap_or_else(|e| e.into_inner());
                watch.check(&console.bytes, pending)
            };
            let end = if self.started.elapsed() >= limit {
                End::TimedOut
            } else if let Some(why) = frozen {
                End::Froze(why)
            } else {
                thread::sleep(Duration::from_millis(50));
                continue;
            };
            let _ = self.child.kill();
            let _ = self.child.wait();
            break end;
        };
        let total = self.started.elapsed();
        let _ = self.reader.join();
        let stderr = self.stderr.join().unwrap_or_default();
        let console = std::mem::take(&mut *self.console.lock().unwrap_or_else(|e| e.into_inner()));
        Outcome {
            end,
            init_at: console.init_at,
            total,
            console: String::from_utf8_lossy(&console.bytes).into_owned(),
            stderr,
        }
    }
}

/// Follows batch.sh's progress lines on L1's console.
#[derive(Default)]
struct Watchdog {
    /// How much of the console has been read, up to the last full line.
    scanned: usize,
    /// The scenario running now, and since when.
    running: Option<(String, Instant)>,
    /// The last L1 kernel complaint about itself (RCU stall, lockup), quoted
    /// as evidence.
    complaint: Option<String>,
}

impl Watchdog {
    fn check(&mut self, console: &[u8], pending: &BTreeMap<String, Duration>) -> Option<String> {
        while let Some(len) = console[self.scanned..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&console[self.scanned..self.scanned + len]);
            self.scanned += len + 1;
            if let Some(rest) = line.trim().strip_prefix("rig: [") {
                let mut words = rest.split_whitespace().skip(1);
                let name = words.next().unwrap_or("").trim_end_matches(':');
                self.running = match words.next() {
                    Some("running") => Some((name.to_string(), Instant::now())),
                    _ => None,
                };
            } else if [
                "rcu_sched detected stalls",
                "self-detected stall",
                "soft lockup",
                "hard LOCKUP",
            ]
            .iter()
            .any(|sign| line.contains(sign))
            {
                self.complaint = Some(line.trim().to_string());
            }
        }
        let (name, since) = self.running.as_ref()?;
        let own_limit = *pending.get(name)?;
        if since.elapsed() < own_limit + L1_FROZEN_AFTER {
            return None;
        }
        let mut why = format!(
            "scenario {name} ran {:?} past its own time limit of {own_limit:?}",
            L1_FROZEN_AFTER
        );
        if let Some(complaint) = &self.complaint {
            let _ = write!(why, "; L1's kernel said: {complaint}");
        }
        Some(why)
    }
}

/// Reads L1's console to its end into `console`, noting when the init
/// marker arrived and, with VMLAB_RIG_VERBOSE, copying it to stderr as it
/// comes.
fn read_console(mut stdout: impl Read, started: Instant, console: &Mutex<Console>) {
    let verbose = std::env::var_os("VMLAB_RIG_VERBOSE").is_some();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if verbose {
            let _ = std::io::stderr().lock().write_all(&buf[..n]);
        }
        let mut console = console.lock().unwrap_or_else(|e| e.into_inner());
        console.bytes.extend_from_slice(&buf[..n]);
        if console.init_at.is_none()
            && console
                .bytes
                .windows(INIT_MARKER.len())
                .any(|w| w == INIT_MARKER.as_bytes())
        {
            console.init_at = Some(started.elapsed());
        }
    }
}

/// The last `n` lines of `text`, without carriage returns.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.trim_end_matches('\r'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `s` as one bash word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
