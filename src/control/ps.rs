//! `vmlab ps`: one row per VM, live ones answering through their socket.

use super::client;
use super::error::Result;
use super::protocol::{Request, Response};
use super::state::{Liveness, VmDir};
use crate::cli::ForwardRule;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PsRow {
    pub name: String,
    /// running, stopping, starting (alive but not answering yet), stopped.
    pub state: String,
    pub pid: Option<u32>,
    pub forwards: Vec<ForwardRule>,
    pub uptime_secs: Option<u64>,
    /// Why a stopped VM's last run ended, when it was not the guest's
    /// doing (its seccomp filter killed it).
    pub note: Option<String>,
}

/// Every VM's row; stale sockets of crashed VMs are cleaned on the way.
pub fn rows() -> Result<Vec<PsRow>> {
    VmDir::list()?.iter().map(row).collect()
}

fn row(vm: &VmDir) -> Result<PsRow> {
    let settings = vm.load_settings().ok();
    let configured = settings.map(|s| s.all_forwards()).unwrap_or_default();
    let mut row = PsRow {
        name: vm.name().to_string(),
        state: "stopped".into(),
        pid: None,
        forwards: configured,
        uptime_secs: None,
        note: None,
    };
    let liveness = vm.liveness()?;
    if let Liveness::Stopped { .. } = liveness {
        if let Some(violation) = vm.seccomp_violation() {
            row.state = "killed".into();
            row.note = Some(violation);
        }
    }
    if let Liveness::Running { pid } = liveness {
        row.pid = pid;
        row.state = "starting".into();
        if let Ok(Response::Status(status)) = client::request(vm, &Request::Status) {
            row.state = status.state;
            row.pid = Some(status.pid);
            row.forwards = status.forwards;
            row.uptime_secs = Some(status.uptime_secs);
        }
    } else if vm.is_suspended() {
        row.state = "suspended".into();
    }
    Ok(row)
}

/// `1h02m`, `3m05s`, `42s`.
pub fn format_uptime(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The table `vmlab ps` prints.
pub fn render(rows: &[PsRow]) -> String {
    use std::fmt::Write as _;
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:<width$}  {:<8}  {:>7}  {:>7}  FORWARDS\n",
        "NAME", "STATE", "PID", "UPTIME"
    );
    for r in rows {
        let pid = r.pid.map_or_else(|| "-".into(), |p| p.to_string());
        let uptime = r.uptime_secs.map_or_else(|| "-".into(), format_uptime);
        let forwards = if r.forwards.is_empty() {
            "-".to_string()
        } else {
            let rules: Vec<String> = r.forwards.iter().map(ToString::to_string).collect();
            rules.join(", ")
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<8}  {pid:>7}  {uptime:>7}  {forwards}",
            r.name, r.state
        );
    }
    for r in rows {
        if let Some(note) = &r.note {
            let _ = writeln!(out, "{}: {note}", r.name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_is_short_and_exact() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(59), "59s");
        assert_eq!(format_uptime(185), "3m05s");
        assert_eq!(format_uptime(3720), "1h02m");
        assert_eq!(format_uptime(90_000), "1d01h");
    }

    #[test]
    fn table_has_a_header_and_aligned_rows() {
        let rows = [
            PsRow {
                name: "vm1".into(),
                state: "running".into(),
                pid: Some(1234),
                forwards: vec!["tcp:127.0.0.1:2222:22".parse().unwrap()],
                uptime_secs: Some(65),
                note: None,
            },
            PsRow {
                name: "database".into(),
                state: "stopped".into(),
                pid: None,
                forwards: vec![],
                uptime_secs: None,
                note: None,
            },
        ];
        let text = render(&rows);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME      STATE"), "{text}");
        assert!(
            lines[1].contains("running") && lines[1].contains("1234"),
            "{text}"
        );
        assert!(lines[1].contains("1m05s") && lines[1].ends_with("tcp:127.0.0.1:2222:22"));
        assert!(lines[2].starts_with("database  stopped"), "{text}");
        let state_col = lines[0].find("STATE").unwrap();
        assert_eq!(lines[1].find("running"), Some(state_col));
    }

    #[test]
    fn a_stopped_vm_is_listed_with_its_configured_forwards() {
        let _home = crate::control::state::tests::temp_home();
        let settings = crate::control::VmSettings {
            forwards: vec!["tcp:2222:22".parse().unwrap()],
            ..Default::default()
        };
        VmDir::named("vm1")
            .unwrap()
            .save_settings(&settings)
            .unwrap();
        let rows = rows().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, "stopped");
        assert_eq!(rows[0].forwards[0].to_string(), "tcp:127.0.0.1:2222:22");
    }
}
