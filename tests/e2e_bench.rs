//! `vmlab bench boot` end to end, in the emulated-SVM rig (tests/rig): two
//! interleaved rounds of vmlab, QEMU microvm and runc booting the default
//! guest (the container: its initramfs) to the init's boot-timer write,
//! checked from the JSON report and the chart it writes. Only the harness is
//! checked here: the figures are reported, never asserted.

mod rig;

use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

fn l1() -> &'static rig::Run {
    static RUN: OnceLock<rig::Run> = OnceLock::new();
    RUN.get_or_init(|| {
        rig::Batch::new("e2e_bench")
            .scenario(
                "bench_boot",
                Duration::from_secs(10 * 60),
                r#"
                "$VMLAB" bench boot --kernel "$VMLAB_VMLINUX" --initrd "$VMLAB_INITRAMFS" \
                    --runs 2 --warmup 0 --json "$RIG_OUT/boot.json" --plot "$RIG_OUT/boot.svg"
                "#,
            )
            .run()
    })
}

fn report() -> (Value, &'static rig::Scenario) {
    let s = l1().scenario("bench_boot").assert_success();
    let json: Value = serde_json::from_str(s.file("boot.json"))
        .unwrap_or_else(|e| panic!("boot.json is not JSON: {e}\n{}", s.diagnostics()));
    (json, s)
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
fn lists_the_ssh_ready_peers_as_missing() {
    let (json, s) = report();
    for id in ["vmlab-ssh", "qemu-microvm-ssh", "runc-sshd"] {
        let c = contender(&json, id);
        assert_eq!(c["status"], "missing", "{c:#}");
        assert!(c["reason"].as_str().is_some_and(|r| r.starts_with("needs")));
        assert!(c["samples"].as_array().unwrap().is_empty());
    }
    assert!(s.output.contains("missing: needs"), "{}", s.diagnostics());
}

#[test]
fn draws_the_chart() {
    let s = l1().scenario("bench_boot").assert_success();
    let svg = s.file("boot.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    for label in [
        "vmlab → init",
        "QEMU microvm → init",
        "runc → init",
        "kernel to init",
    ] {
        assert!(svg.contains(label), "no {label:?} in the chart");
    }
}
