//! Runs contenders interleaved, round by round (A B C A B C ...), so that
//! drift on a noisy machine hits every contender alike, and gathers the
//! samples into a [`BenchReport`].

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::contender::{Contender, Sample};
use super::host::HostInfo;
use super::report::{BenchReport, ContenderReport, ContenderSummary, SampleRecord, Status, SCHEMA};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Recorded rounds.
    pub runs: usize,
    /// Rounds run first and discarded (cold caches, first-time setup).
    pub warmup: usize,
}

/// Where progress goes: a bar on a terminal, one line per sample otherwise,
/// or nowhere (tests).
pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
}

impl Progress {
    /// A bar when stderr is a terminal, else lines on stderr.
    pub fn stderr() -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{elapsed:>4} [{bar:30}] {pos}/{len} {wide_msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress {
                bar: Some(bar),
                lines: false,
            }
        } else {
            Progress {
                bar: None,
                lines: true,
            }
        }
    }

    pub fn silent() -> Progress {
        Progress {
            bar: None,
            lines: false,
        }
    }

    fn start(&self, total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
        }
    }

    fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if self.lines => eprintln!("{line}"),
            None => {}
        }
    }

    fn running(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(what.to_string());
        }
    }

    fn done(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.inc(1),
            None if self.lines => eprintln!("{line}"),
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Where one contender stands during a run.
struct Entry {
    report: ContenderReport,
    active: bool,
}

fn record(round: usize, seq: usize, sample: &Sample) -> SampleRecord {
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    SampleRecord {
        round,
        seq,
        phases_ms: sample.phases.iter().map(ms).collect(),
        total_ms: ms(&sample.total()),
        metrics: sample.metrics.clone(),
    }
}

/// Prepares every contender, samples the available ones `warmup + runs`
/// times in interleaved rounds, and summarises. A contender whose sample
/// fails is marked failed and left out of later rounds; the others go on.
pub fn run(
    contenders: &mut [Box<dyn Contender>],
    options: RunOptions,
    host: HostInfo,
    progress: &Progress,
) -> BenchReport {
    let mut entries: Vec<Entry> = contenders
        .iter_mut()
        .map(|c| {
            let d = c.describe();
            progress.running(&format!("preparing {}", d.label));
            let prepared = c.prepare();
            if let Err(missing) = &prepared {
                progress.note(&format!("vmlab bench: {}: {missing}", d.label));
            }
            Entry {
                active: prepared.is_ok(),
                report: ContenderReport {
                    id: d.id,
                    label: d.label,
                    goal: d.goal,
                    role: d.role,
                    status: if prepared.is_ok() {
                        Status::Measured
                    } else {
                        Status::Missing
                    },
                    reason: prepared.err().map(|m| m.0),
                    phases: d.phases,
                    samples: Vec::new(),
                    summary: None,
                },
            }
        })
        .collect();
    let order: Vec<String> = entries
        .iter()
        .filter(|e| e.active)
        .map(|e| e.report.id.clone())
        .collect();
    let rounds = options.warmup + options.runs;
    progress.start(rounds * order.len());

    let mut seq = 0;
    for round in 0..rounds {
        let warmup = round < options.warmup;
        let tag = if warmup {
            format!("warm-up {}/{}", round + 1, options.warmup)
        } else {
            format!("round {}/{}", round - options.warmup + 1, options.runs)
        };
        for (contender, entry) in contenders.iter_mut().zip(entries.iter_mut()) {
            if !entry.active {
                continue;
            }
            progress.running(&format!("{tag}: {}", entry.report.label));
            match contender.sample() {
                Ok(sample) => {
                    progress.done(&format!(
                        "vmlab bench: {tag}: {}: {:.1} ms",
                        entry.report.label,
                        sample.total().as_secs_f64() * 1000.0
                    ));
                    if !warmup {
                        let record = record(round - options.warmup, seq, &sample);
                        entry.report.samples.push(record);
                    }
                }
                Err(e) => {
                    progress.note(&format!(
                        "vmlab bench: {tag}: {} failed: {e}\n{}",
                        entry.report.label, e.details
                    ));
                    entry.active = false;
                    entry.report.status = Status::Failed;
                    entry.report.reason = Some(e.what);
                }
            }
            seq += 1;
        }
    }
    progress.finish();

    let contenders = entries
        .into_iter()
        .map(|mut e| {
            e.report.summary = ContenderSummary::of(&e.report.samples, e.report.phases.len());
            e.report
        })
        .collect();
    let mut report = BenchReport {
        schema: SCHEMA.to_string(),
        host,
        runs: options.runs,
        warmup: options.warmup,
        order,
        contenders,
        ratios: Vec::new(),
        targets: Vec::new(),
    };
    report.compute_ratios();
    report
}
