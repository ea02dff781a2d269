//! The results of a benchmark run: raw samples, their statistics, ratios
//! between contenders and targets, as written to JSON (schema
//! [`SCHEMA`]). Tables and charts are drawn from this.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::contender::{Goal, Role};
use super::host::HostInfo;
use super::stats::Summary;

/// Names this JSON layout; bumped when a field changes meaning.
pub const SCHEMA: &str = "vmlab.bench.boot/1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub schema: String,
    pub host: HostInfo,
    /// Recorded samples per contender, and discarded warm-up rounds before.
    pub runs: usize,
    pub warmup: usize,
    /// Contender ids in the order one round samples them (A B C A B C ...).
    pub order: Vec<String>,
    pub contenders: Vec<ContenderReport>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<Target>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Every round measured.
    Measured,
    /// Not run: a tool or a feature is missing (`reason` says which).
    Missing,
    /// A sample failed; the rounds before it are kept.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContenderReport {
    pub id: String,
    pub label: String,
    pub goal: Goal,
    pub role: Role,
    pub status: Status,
    /// Why it is missing or failed.
    pub reason: Option<String>,
    pub phases: Vec<String>,
    pub samples: Vec<SampleRecord>,
    /// `None` with no samples.
    pub summary: Option<ContenderSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// Round number, from 0 after the warm-up.
    pub round: usize,
    /// Position in the whole sampling sequence, warm-up included.
    pub seq: usize,
    pub phases_ms: Vec<f64>,
    pub total_ms: f64,
    pub metrics: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContenderSummary {
    pub total_ms: Summary,
    /// One per phase, in phase order.
    pub phases_ms: Vec<Summary>,
    pub metrics: BTreeMap<String, Summary>,
}

impl ContenderSummary {
    pub fn of(samples: &[SampleRecord], phases: usize) -> Option<ContenderSummary> {
        let totals: Vec<f64> = samples.iter().map(|s| s.total_ms).collect();
        let phases_ms = (0..phases)
            .map(|i| {
                let values: Vec<f64> = samples
                    .iter()
                    .map(|s| s.phases_ms.get(i).copied().unwrap_or(f64::NAN))
                    .collect();
                Summary::of(&values)
            })
            .collect::<Option<Vec<_>>>()?;
        let mut names: Vec<&String> = samples.iter().flat_map(|s| s.metrics.keys()).collect();
        names.sort();
        names.dedup();
        let metrics = names
            .into_iter()
            .filter_map(|name| {
                let values: Vec<f64> = samples
                    .iter()
                    .filter_map(|s| s.metrics.get(name).copied())
                    .collect();
                Some((name.clone(), Summary::of(&values)?))
            })
            .collect();
        Some(ContenderSummary {
            total_ms: Summary::of(&totals)?,
            phases_ms,
            metrics,
        })
    }
}

/// vmlab's time over a peer's, for one goal (below 1: vmlab is faster).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub goal: Goal,
    /// Contender ids.
    pub subject: String,
    pub peer: String,
    pub peer_role: Role,
    /// Of the median totals, and of the minimum totals.
    pub median: f64,
    pub min: f64,
}

/// A goal the project set itself, reported as measured, never asserted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub what: String,
    /// The figure must be at most this.
    pub limit: f64,
    pub unit: String,
    /// `None` when what it needs was not measured (say why in `note`).
    pub measured: Option<f64>,
    pub met: Option<bool>,
    pub note: Option<String>,
}

impl BenchReport {
    pub fn contender(&self, id: &str) -> Option<&ContenderReport> {
        self.contenders.iter().find(|c| c.id == id)
    }

    /// The measured contender of `role` for `goal`, if any.
    pub fn measured(&self, goal: Goal, role: Role) -> Option<&ContenderReport> {
        self.contenders
            .iter()
            .find(|c| c.goal == goal && c.role == role && c.summary.is_some())
    }

    /// vmlab's ratio to every peer measured for the same goal.
    pub fn compute_ratios(&mut self) {
        let mut ratios = Vec::new();
        for subject in self.contenders.iter().filter(|c| c.role == Role::Vmlab) {
            let Some(mine) = &subject.summary else {
                continue;
            };
            for peer in &self.contenders {
                let Some(theirs) = &peer.summary else {
                    continue;
                };
                if peer.goal != subject.goal || peer.role == Role::Vmlab {
                    continue;
                }
                ratios.push(Ratio {
                    goal: subject.goal,
                    subject: subject.id.clone(),
                    peer: peer.id.clone(),
                    peer_role: peer.role,
                    median: mine.total_ms.median / theirs.total_ms.median,
                    min: mine.total_ms.min / theirs.total_ms.min,
                });
            }
        }
        self.ratios = ratios;
    }

    pub fn ratio(&self, goal: Goal, peer_role: Role) -> Option<&Ratio> {
        self.ratios
            .iter()
            .find(|r| r.goal == goal && r.peer_role == peer_role)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    pub fn from_json(text: &str) -> Result<BenchReport, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Writes the JSON atomically (nothing half-written on failure).
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        crate::fsutil::write_atomically(path, self.to_json().as_bytes())
    }
}
