//! Benchmarks that compare vmlab with its peers, run by `vmlab bench` and
//! by the cargo benches in benches/.
//!
//! A [`Contender`] boots one program to one goal and returns a [`Sample`]
//! split into phases; the [`runner`] samples all contenders interleaved
//! (A B C A B C ...) and summarises into a [`BenchReport`] (JSON), drawn as a
//! [`table`] and a [`chart`]. Contenders that cannot run here are reported
//! as missing, never skipped silently. [`BootBench`] is `vmlab bench boot`.

pub mod boot;
pub mod chart;
pub mod contender;
pub mod contenders;
pub mod host;
pub mod net;
pub mod process;
pub mod report;
pub mod runner;
pub mod stats;
pub mod table;

pub use boot::{check_host, check_output_path, BenchError, BootBench, SshPeers};
pub use contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};
pub use host::{HostInfo, HostKind};
pub use report::{BenchReport, Status};
pub use runner::{Progress, RunOptions};

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::Duration;

    use super::*;

    /// A contender that returns scripted samples and logs when it is called.
    struct Fake {
        id: String,
        role: Role,
        missing: Option<&'static str>,
        /// Phase durations in ms per call; a call past the end fails.
        script: Vec<Vec<u64>>,
        calls: usize,
        log: Rc<RefCell<Vec<String>>>,
    }

    impl Fake {
        fn boxed(
            id: &str,
            role: Role,
            script: Vec<Vec<u64>>,
            log: &Rc<RefCell<Vec<String>>>,
        ) -> Box<dyn Contender> {
            Box::new(Fake {
                id: id.to_string(),
                role,
                missing: None,
                script,
                calls: 0,
                log: log.clone(),
            })
        }

        fn missing(
            id: &str,
            why: &'static str,
            log: &Rc<RefCell<Vec<String>>>,
        ) -> Box<dyn Contender> {
            Box::new(Fake {
                id: id.to_string(),
                role: Role::Container,
                missing: Some(why),
                script: Vec::new(),
                calls: 0,
                log: log.clone(),
            })
        }
    }

    impl Contender for Fake {
        fn describe(&self) -> Description {
            let n = self.script.first().map_or(1, Vec::len);
            let phases: Vec<String> = (0..n).map(|i| format!("{} phase {i}", self.id)).collect();
            let phases: Vec<&str> = phases.iter().map(String::as_str).collect();
            Description::new(&self.id, &self.id, Goal::Init, self.role, &phases)
        }
        fn prepare(&mut self) -> Result<(), Missing> {
            match self.missing {
                Some(why) => Err(Missing(why.to_string())),
                None => Ok(()),
            }
        }
        fn sample(&mut self) -> Result<Sample, SampleError> {
            self.log.borrow_mut().push(self.id.clone());
            let phases = self
                .script
                .get(self.calls)
                .ok_or_else(|| SampleError::new(format!("{} ran out of script", self.id)))?;
            self.calls += 1;
            let mut metrics = std::collections::BTreeMap::new();
            if self.role == Role::Vmlab {
                metrics.insert(
                    "vmm_cpu_before_entry_ms".to_string(),
                    4.0 + self.calls as f64,
                );
                metrics.insert("vmm_overhead_mib".to_string(), 3.0);
            }
            Ok(Sample {
                phases: phases.iter().map(|&ms| Duration::from_millis(ms)).collect(),
                metrics,
            })
        }
    }

    fn host() -> HostInfo {
        HostInfo {
            kind: HostKind::Emulated,
            detail: "test".into(),
            kernel: "6.1".into(),
            cpus: 2,
        }
    }

    /// vmlab (3 phases), qemu, runc, and a missing ssh peer; 1 warm-up + 3 runs.
    fn sample_report(log: &Rc<RefCell<Vec<String>>>) -> BenchReport {
        let mut contenders = vec![
            Fake::boxed(
                "vmlab",
                Role::Vmlab,
                vec![
                    vec![9, 9, 90],
                    vec![10, 1, 100],
                    vec![30, 2, 200],
                    vec![20, 3, 150],
                ],
                log,
            ),
            Fake::boxed(
                "qemu",
                Role::Qemu,
                vec![vec![999], vec![200], vec![400], vec![300]],
                log,
            ),
            Fake::boxed(
                "runc",
                Role::Container,
                vec![vec![99], vec![10], vec![30], vec![20]],
                log,
            ),
            Fake::missing("ssh", "needs virtio-net", log),
        ];
        let mut report = runner::run(
            &mut contenders,
            RunOptions { runs: 3, warmup: 1 },
            host(),
            &Progress::silent(),
        );
        report.targets = boot::targets(&report);
        report
    }

    #[test]
    fn samples_interleaved_round_by_round_after_warmup() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let report = sample_report(&log);
        let expected: Vec<&str> = ["vmlab", "qemu", "runc"].repeat(4);
        assert_eq!(*log.borrow(), expected);
        assert_eq!(report.order, ["vmlab", "qemu", "runc"]);
        let vmlab = report.contender("vmlab").unwrap();
        // The warm-up sample (9+9+90) is not recorded.
        assert_eq!(vmlab.samples.len(), 3);
        let rounds: Vec<usize> = vmlab.samples.iter().map(|s| s.round).collect();
        assert_eq!(rounds, [0, 1, 2]);
        let seqs: Vec<usize> = report
            .contender("qemu")
            .unwrap()
            .samples
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(seqs, [4, 7, 10]);
    }

    #[test]
    fn summarises_totals_phases_metrics_and_ratios() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let report = sample_report(&log);
        let vmlab = report.contender("vmlab").unwrap();
        let s = vmlab.summary.as_ref().unwrap();
        assert_eq!(vmlab.samples[0].total_ms, 111.0);
        assert_eq!(
            (s.total_ms.min, s.total_ms.median, s.total_ms.p95),
            (111.0, 173.0, 232.0)
        );
        assert_eq!(s.phases_ms[0].median, 20.0);
        assert_eq!(s.phases_ms[2].median, 150.0);
        assert_eq!(s.metrics["vmm_cpu_before_entry_ms"].median, 7.0);
        let qemu = report.ratio(Goal::Init, Role::Qemu).unwrap();
        assert!((qemu.median - 173.0 / 300.0).abs() < 1e-9);
        assert!((qemu.min - 111.0 / 200.0).abs() < 1e-9);
        let runc = report.ratio(Goal::Init, Role::Container).unwrap();
        assert!((runc.median - 173.0 / 20.0).abs() < 1e-9);
        // Targets: 0.58x <= 0.8 met; 7 ms <= 8 met; 3 MiB <= 5 met.
        assert_eq!(report.targets.len(), 3);
        assert!(
            report.targets.iter().all(|t| t.met == Some(true)),
            "{:?}",
            report.targets
        );
    }

    /// The host line of an emulated rig ran past the SVG's right edge.
    #[test]
    fn the_charts_subtitle_stays_within_its_width() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut report = sample_report(&log);
        report.host.kind = HostKind::Emulated;
        report.host.detail = "QEMU TCG, AMD EPYC-Milan Processor with SVM, nested under KVM".into();
        let svg = chart::render(&report);
        let subtitle: Vec<&str> = svg
            .lines()
            .filter(|l| l.contains(r##"fill="#555">"##) && !l.contains("<line"))
            .collect();
        assert!(subtitle.len() > 1, "{svg}");
        for line in &subtitle {
            let text = line.split('>').nth(1).unwrap().trim_end_matches("</text");
            assert!(text.chars().count() <= 135, "{text}");
        }
        assert!(svg.contains("interleaved"));
    }

    #[test]
    fn missing_peer_is_reported_never_sampled() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let report = sample_report(&log);
        assert!(!log.borrow().iter().any(|id| id == "ssh"));
        let ssh = report.contender("ssh").unwrap();
        assert_eq!(ssh.status, Status::Missing);
        assert_eq!(ssh.reason.as_deref(), Some("needs virtio-net"));
        assert!(ssh.samples.is_empty() && ssh.summary.is_none());
        let table = table::render(&report);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("ssh") && l.contains("missing: needs virtio-net")),
            "{table}"
        );
        assert!(chart::render(&report).contains("missing: needs virtio-net"));
    }

    #[test]
    fn a_failing_contender_keeps_its_samples_and_the_others_go_on() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut contenders = vec![
            Fake::boxed("vmlab", Role::Vmlab, vec![vec![1, 1, 10]; 3], &log),
            // Two samples scripted: the third call fails.
            Fake::boxed("qemu", Role::Qemu, vec![vec![20]; 2], &log),
        ];
        let report = runner::run(
            &mut contenders,
            RunOptions { runs: 3, warmup: 0 },
            host(),
            &Progress::silent(),
        );
        assert_eq!(
            *log.borrow(),
            ["vmlab", "qemu", "vmlab", "qemu", "vmlab", "qemu"]
        );
        let qemu = report.contender("qemu").unwrap();
        assert_eq!(qemu.status, Status::Failed);
        assert!(qemu
            .reason
            .as_deref()
            .unwrap()
            .contains("ran out of script"));
        assert_eq!(qemu.samples.len(), 2);
        assert_eq!(report.contender("vmlab").unwrap().samples.len(), 3);
        assert!(table::render(&report).contains("failed after 2 sample(s)"));
    }

    #[test]
    fn json_has_the_documented_schema_and_round_trips() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let report = sample_report(&log);
        let json = report.to_json();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["schema"], report::SCHEMA);
        assert_eq!(value["host"]["kind"], "emulated");
        assert_eq!(value["runs"], 3);
        assert_eq!(value["warmup"], 1);
        let vmlab = &value["contenders"][0];
        for key in [
            "id", "label", "goal", "role", "status", "reason", "phases", "samples", "summary",
        ] {
            assert!(vmlab.get(key).is_some(), "contender has no {key}: {vmlab}");
        }
        assert_eq!(vmlab["goal"], "init");
        assert_eq!(vmlab["status"], "measured");
        let sample = &vmlab["samples"][0];
        for key in ["round", "seq", "phases_ms", "total_ms", "metrics"] {
            assert!(sample.get(key).is_some(), "sample has no {key}: {sample}");
        }
        for key in ["min", "median", "p95"] {
            assert!(vmlab["summary"]["total_ms"].get(key).is_some());
        }
        assert_eq!(value["contenders"][3]["status"], "missing");
        assert_eq!(value["ratios"][0]["peer_role"], "qemu");
        assert!(value["targets"][0]["limit"].is_number());
        assert_eq!(BenchReport::from_json(&json).unwrap(), report);
    }

    #[test]
    fn chart_and_json_are_written_whole() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let report = sample_report(&log);
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-chart").unwrap();
        let svg_path = dir.as_path().join("boot.svg");
        chart::write(&report, &svg_path).unwrap();
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Three stacked phases for vmlab, one bar each for qemu and runc.
        assert_eq!(
            svg.matches("<rect x=").count(),
            5 + 5,
            "bars + legend swatches"
        );
        for label in ["vmlab", "qemu", "runc", "vmlab phase 2"] {
            assert!(svg.contains(label), "{label}");
        }
        let json_path = dir.as_path().join("boot.json");
        report.write_json(&json_path).unwrap();
        let back = std::fs::read_to_string(&json_path).unwrap();
        assert_eq!(BenchReport::from_json(&back).unwrap(), report);
    }

    #[test]
    fn table_shows_phases_costs_ratios_and_targets() {
        let log = Rc::new(RefCell::new(Vec::new()));
        let table = table::render(&sample_report(&log));
        assert!(table.starts_with("host: emulated"), "{table}");
        for needle in [
            "vmlab phase 0",
            "VMM CPU before first vCPU entry",
            "VMM overhead",
            "vmlab / qemu: 0.58x",
            "vmlab / runc: 8.65x",
            "targets (reported, not asserted)",
            ": met",
        ] {
            assert!(table.contains(needle), "no {needle:?} in\n{table}");
        }
    }
}
