//! A contender: one program brought to one goal (the guest's init, or ssh
//! answering), measured once per round. Real ones live in `contenders/`;
//! tests use fakes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a boot is timed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Goal {
    /// The VMM's first `KVM_RUN`: all of its own start-up.
    FirstEntry,
    /// The guest's (or container's) init signalling "userspace started".
    Init,
    /// `ssh -p PORT true` succeeding.
    SshReady,
}

impl Goal {
    pub fn name(self) -> &'static str {
        match self {
            Goal::FirstEntry => "first vCPU entry",
            Goal::Init => "init",
            Goal::SshReady => "ssh-ready",
        }
    }
}

/// Which side of the comparison a contender is on: ratios are vmlab's
/// figures over QEMU's and over the container's, per goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Vmlab,
    Qemu,
    Container,
}

/// One measurement: how long each phase took (in the contender's phase
/// order; together they make the whole), plus named figures in their own
/// units (e.g. `vmm_overhead_mib`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub phases: Vec<Duration>,
    pub metrics: BTreeMap<String, f64>,
}

impl Sample {
    pub fn total(&self) -> Duration {
        self.phases.iter().sum()
    }
}

/// Why a contender cannot run here (reported, never silently skipped).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("missing: {0}")]
pub struct Missing(pub String);

/// Why one measurement failed: a line, and the evidence (log tails).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct SampleError {
    pub what: String,
    pub details: String,
}

impl SampleError {
    pub fn new(what: impl Into<String>) -> Self {
        SampleError {
            what: what.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

/// Who a contender is, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description {
    /// Stable identifier for JSON (`vmlab-init`, `qemu-microvm-init`).
    pub id: String,
    /// What people read (`vmlab → init`).
    pub label: String,
    pub goal: Goal,
    pub role: Role,
    /// Names of the phases a sample is split into, in order.
    pub phases: Vec<String>,
}

impl Description {
    pub fn new(id: &str, label: &str, goal: Goal, role: Role, phases: &[&str]) -> Self {
        Description {
            id: id.to_string(),
            label: label.to_string(),
            goal,
            role,
            phases: phases.iter().map(|p| p.to_string()).collect(),
        }
    }
}

pub trait Contender {
    fn describe(&self) -> Description;
    /// Checks the tools it needs and prepares what every sample shares
    /// (e.g. a container bundle); called once before the first round.
    fn prepare(&mut self) -> Result<(), Missing>;
    /// Boots once, to the goal, and tears down again.
    fn sample(&mut self) -> Result<Sample, SampleError>;
}
