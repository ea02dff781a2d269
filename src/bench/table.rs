//! The report as a text table: min, median and p95 per contender and
//! phase, vmlab's own cost, ratios and targets.

use std::fmt::Write as _;

use super::report::{BenchReport, Status};
use super::stats::Summary;

/// How a metric key reads in a table: label and unit (from the key's
/// `_ms` / `_mib` suffix).
pub fn metric_label(key: &str) -> (String, &'static str) {
    let (stem, unit) = if let Some(stem) = key.strip_suffix("_ms") {
        (stem, "ms")
    } else if let Some(stem) = key.strip_suffix("_mib") {
        (stem, "MiB")
    } else {
        (key, "")
    };
    let label = match stem {
        "vmm_cpu_before_entry" => "VMM CPU before first vCPU entry".to_string(),
        "vmm_overhead" => "VMM overhead (peak RSS - guest touched)".to_string(),
        "peak_rss" => "peak RSS".to_string(),
        "exec" => "process start to main (exec, loading)".to_string(),
        "guest_touched" => "guest memory touched".to_string(),
        other => other.replace('_', " "),
    };
    (label, unit)
}

const NAME_WIDTH: usize = 42;

fn row(out: &mut String, name: &str, s: &Summary, unit: &str) {
    let _ = writeln!(
        out,
        "{name:<NAME_WIDTH$} {:>10.1} {:>10.1} {:>10.1}  {unit}",
        s.min, s.median, s.p95
    );
}

fn header(out: &mut String, title: &str) {
    let _ = writeln!(
        out,
        "{title:<NAME_WIDTH$} {:>10} {:>10} {:>10}",
        "min", "median", "p95"
    );
}

pub fn render(report: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "host: {}", report.host.describe());
    let _ = writeln!(
        out,
        "{} run(s) per contender, interleaved, after {} warm-up round(s)\n",
        report.runs, report.warmup
    );

    header(&mut out, "contender / phase");
    for c in &report.contenders {
        match (&c.summary, c.status) {
            (Some(summary), status) => {
                let mut name = c.label.clone();
                if status == Status::Failed {
                    name += " (failed)";
                }
                row(&mut out, &name, &summary.total_ms, "ms");
                if c.phases.len() > 1 {
                    for (phase, s) in c.phases.iter().zip(&summary.phases_ms) {
                        row(&mut out, &format!("  {phase}"), s, "ms");
                    }
                }
            }
            (None, _) => {
                let what = match c.status {
                    Status::Missing => "missing",
                    _ => "failed",
                };
                let _ = writeln!(
                    out,
                    "{:<NAME_WIDTH$} {what}: {}",
                    c.label,
                    c.reason.as_deref().unwrap_or("no samples")
                );
            }
        }
    }
    for c in &report.contenders {
        if let (Some(reason), Status::Failed, Some(_)) = (&c.reason, c.status, &c.summary) {
            let _ = writeln!(
                out,
                "{}: failed after {} sample(s): {reason}",
                c.label,
                c.samples.len()
            );
        }
    }

    for c in &report.contenders {
        let Some(summary) = c.summary.as_ref().filter(|s| !s.metrics.is_empty()) else {
            continue;
        };
        let _ = writeln!(out);
        header(&mut out, &format!("cost of {}", c.label));
        for (key, s) in &summary.metrics {
            let (label, unit) = metric_label(key);
            row(&mut out, &format!("  {label}"), s, unit);
        }
    }

    if !report.ratios.is_empty() {
        let _ = writeln!(
            out,
            "\nratios: vmlab's total over the peer's (median; of the minimums in brackets)"
        );
        for r in &report.ratios {
            let label = |id: &str| {
                report
                    .contender(id)
                    .map_or_else(|| id.to_string(), |c| c.label.clone())
            };
            let _ = writeln!(
                out,
                "  {} / {}: {:.2}x ({:.2}x)",
                label(&r.subject),
                label(&r.peer),
                r.median,
                r.min
            );
        }
    }

    if !report.targets.is_empty() {
        let _ = writeln!(out, "\ntargets (reported, not asserted)");
        for t in &report.targets {
            let verdict = match (t.measured, t.met) {
                (Some(v), Some(met)) => {
                    format!("{v:.2} {}: {}", t.unit, if met { "met" } else { "NOT met" })
                }
                _ => "not measured".to_string(),
            };
            let note = t
                .note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {} <= {} {}: {verdict}{note}",
                t.what, t.limit, t.unit
            );
        }
    }
    out
}
