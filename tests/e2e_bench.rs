//! `vmlab bench boot` end to end, in the emulated-SVM rig (tests/rig):
//! - two interleaved rounds of vmlab, QEMU microvm and runc booting the
//!   default guest (the container: its initramfs) to the init's boot-timer
//!   write, the ssh-ready contenders left out (`--no-ssh`);
//! - one round of all seven, the ssh-ready ones booting the cached Debian
//!   image (the container: its root filesystem) to the first `ssh true`,
//!   and a named VM of it suspended at ssh-ready and resumed to it.
//!
//! Checked from the JSON reports and the charts: only the harness is checked
//! here, the figures are reported (printed), never asserted.

mod rig;

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

fn l1() -> &'static rig::Run {
    static RUN: OnceLock<rig::Run> = OnceLock::new();
    RUN.get_or_init(|| {
        // The ssh-ready contenders need the Debian image in the host's
        // cache, which L1 sees read-only: built here if missing (a cache hit
        // in a second).
        let built = Command::new(env!("CARGO_BIN_EXE_vmlab"))
            .args(["image", "build"])
            .stdout(Stdio::null())
            .status()
            .expect("vmlab runs");
        assert!(
            built.success(),
            "vmlab image build failed, see above (it needs root and debootstrap: run .ci/setup)"
        );
        rig::Batch::new("e2e_bench")
            .scenario(
                "bench_boot",
                Duration::from_secs(10 * 60),
                r#"
                "$VMLAB" bench boot --kernel "$VMLAB_VMLINUX" --initrd "$VMLAB_INITRAMFS" \
                    --runs 2 --warmup 0 --no-ssh --json "$RIG_OUT/boot.json" --plot "$RIG_OUT/boot.svg"
                "#,
            )
            // About 1.5 min on a quiet machine: the init contenders, two
            // Debian boots of 20-40 s each under emulation, and the
            // container's root filesystem unpacked once.
            .scenario(
                "bench_ssh",
                Duration::from_secs(10 * 60),
                r#"
                "$VMLAB" bench boot --kernel "$VMLAB_VMLINUX" --initrd "$VMLAB_INITRAMFS" \
                    --runs 1 --warmup 0 --ssh --json "$RIG_OUT/ssh.json" --plot "$RIG_OUT/ssh.svg"
                "#,
            )
            .run()
    })
}

/// A scenario's JSON report.
fn json_of(scenario: &str, file: &str) -> (Value, &'static rig::Scenario) {
    let s = l1().scenario(scenario).assert_success();
    let json: Value = serde_json::from_str(s.file(file))
        .unwrap_or_else(|e| panic!("{file} is not JSON: {e}\n{}", s.diagnostics()));
    (json, s)
}

fn report() -> (Value, &'static rig::Scenario) {
    json_of("bench_boot", "boot.json")
}

fn contender<'a>(json: &'a Value, id: &str) -> &'a Value {
    json["contenders"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["id"] == id))
        .unwrap_or_else(|| panic!("no contender {id} in {json:#}"))
}

#[test]
fn l1_runs_the_batch() {
    l1().assert_l1_ok();
}

#[test]
fn measures_vmlab_qemu_and_runc_to_init() {
    let (json, s) = report();
    println!("{}", s.output);
    assert_eq!(json["schema"], "vmlab.bench.boot/1");
    assert_eq!(json["host"]["kind"], "emulated", "{}", s.diagnostics());
    assert_eq!(json["runs"], 2);
    for id in ["vmlab-init", "qemu-microvm-init", "runc-init"] {
        let c = contender(&json, id);
        assert_eq!(c["status"], "measured", "{id}: {c:#}\n{}", s.diagnostics());
        let samples = c["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 2, "{id}");
        for sample in samples {
            let total = sample["total_ms"].as_f64().unwrap();
            assert!(total > 0.0, "{id}: {sample}");
        }
    }
    let order: Vec<&str> = json["order"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(order, ["vmlab-init", "qemu-microvm-init", "runc-init"]);
    // Interleaved: vmlab's second sample comes after every first one.
    let vmlab = contender(&json, "vmlab-init");
    assert_eq!(vmlab["samples"][1]["seq"], 3);
}

#[test]
fn reports_vmlab_phases_and_cost() {
    let (json, s) = report();
    let vmlab = contender(&json, "vmlab-init");
    assert_eq!(
        vmlab["phases"],
        serde_json::json!(["VMM ready", "first vCPU entry", "kernel to init"])
    );
    let sample = &vmlab["samples"][0];
    let phases: Vec<f64> = sample["phases_ms"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(phases.len(), 3);
    assert!(phases.iter().all(|&p| p >= 0.0), "{sample}");
    for metric in [
        "vmm_cpu_before_entry_ms",
        "vmm_overhead_mib",
        "guest_touched_mib",
    ] {
        assert!(
            sample["metrics"][metric].as_f64().is_some_and(|v| v > 0.0),
            "no {metric} in {sample}\n{}",
            s.diagnostics()
        );
    }
    let ratios = json["ratios"].as_array().unwrap();
    for peer in ["qemu", "container"] {
        assert!(
            ratios.iter().any(|r| r["peer_role"] == peer),
            "no ratio to the {peer} in {json:#}"
        );
    }
    assert!(s.output.contains("ratios:"), "{}", s.diagnostics());
    assert!(s.output.contains("targets (reported, not asserted)"));
}

#[test]
fn lists_the_ssh_ready_peers_left_out_as_missing() {
    let (json, s) = report();
    for id in [
        "vmlab-ssh",
        "qemu-microvm-ssh",
        "runc-sshd",
        "vmlab-resume-ssh",
    ] {
        let c = contender(&json, id);
        assert_eq!(c["status"], "missing", "{c:#}");
        assert_eq!(c["reason"], "left out (--no-ssh)", "{c:#}");
        assert!(c["samples"].as_array().unwrap().is_empty());
    }
    assert!(
        s.output.contains("missing: left out (--no-ssh)"),
        "{}",
        s.diagnostics()
    );
}

#[test]
fn measures_vmlab_qemu_and_runc_to_ssh_ready() {
    let (json, s) = json_of("bench_ssh", "ssh.json");
    println!("{}", s.output);
    assert_eq!(json["runs"], 1);
    for (id, phases) in [
        ("vmlab-ssh", 4),
        ("qemu-microvm-ssh", 2),
        ("runc-sshd", 2),
        ("vmlab-resume-ssh", 2),
    ] {
        let c = contender(&json, id);
        assert_eq!(c["status"], "measured", "{id}: {c:#}\n{}", s.diagnostics());
        assert_eq!(c["goal"], "ssh-ready");
        let samples = c["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 1, "{id}");
        let sample = &samples[0];
        let parts: Vec<f64> = sample["phases_ms"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        assert_eq!(parts.len(), phases, "{id}: {sample}");
        assert!(parts.iter().all(|&p| p >= 0.0), "{id}: {sample}");
        let total = sample["total_ms"].as_f64().unwrap();
        assert!(total > 0.0, "{id}: {sample}");
        assert!(
            (parts.iter().sum::<f64>() - total).abs() < 1.0,
            "{id}: phases add up to the total: {sample}"
        );
    }
    let vmlab = contender(&json, "vmlab-ssh");
    assert_eq!(vmlab["phases"][3], "init to ssh-ready");
    // The resumed VM's snapshot: memory saved sparsely, so on disk it is
    // smaller than the file (the guest's 256 MiB).
    let resumed = &contender(&json, "vmlab-resume-ssh")["samples"][0]["metrics"];
    let on_disk = resumed["snapshot_disk_mib"].as_f64().unwrap_or(0.0);
    let file = resumed["snapshot_file_mib"].as_f64().unwrap_or(0.0);
    assert!(
        on_disk > 0.0 && file >= 256.0 && on_disk < file,
        "snapshot size: {resumed}"
    );
    let ratios = json["ratios"].as_array().unwrap();
    assert!(
        ratios
            .iter()
            .any(|r| r["subject"] == "vmlab-resume-ssh" && r["peer_role"] == "container"),
        "no ratio of the resume to runc in {json:#}"
    );
    for peer in ["qemu", "container"] {
        assert!(
            ratios
                .iter()
                .any(|r| r["goal"] == "ssh-ready" && r["peer_role"] == peer),
            "no ssh-ready ratio to the {peer} in {json:#}"
        );
    }
    assert_chart(
        s.file("ssh.svg"),
        &[
            "vmlab → ssh-ready",
            "QEMU microvm → ssh-ready",
            "runc → sshd answering",
            "vmlab resume → ssh-ready",
            "init to ssh-ready",
        ],
    );
}

#[test]
fn draws_the_chart() {
    let s = l1().scenario("bench_boot").assert_success();
    assert_chart(
        s.file("boot.svg"),
        &[
            "vmlab → init",
            "QEMU microvm → init",
            "runc → init",
            "kernel to init",
        ],
    );
}

/// A whole SVG with every one of `labels`.
fn assert_chart(svg: &str, labels: &[&str]) {
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for label in labels {
        assert!(svg.contains(label), "no {label:?} in the chart");
    }
}
