//! `vmlab snapshot ...`: the subcommands, their arguments and what they
//! print.

use super::{Created, SnapshotRow};
use crate::control::error::Result;

#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot every writable disk of a VM, running (a short pause) or
    /// stopped.
    Create {
        vm: String,
        name: String,
        /// Memory and devices too (a running VM; it runs on after a short
        /// pause): restore suspends the VM at that point, and vmlab run
        /// --name NEW --from VM@NAME starts new VMs from it.
        #[arg(long)]
        full: bool,
    },
    /// List a VM's snapshots: name, when taken, disks, full or not, space
    /// on the host.
    Ls { vm: String },
    /// Put a stopped VM's disks back to a snapshot (their present state is
    /// lost; later snapshots stay). A full snapshot leaves the VM
    /// suspended there: vmlab resume VM continues it.
    Restore { vm: String, name: String },
    /// Delete a snapshot; layers nothing else needs are merged or deleted.
    Rm { vm: String, name: String },
}

/// Runs one `vmlab snapshot` subcommand.
pub fn run(command: SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::Create { vm, name, full } => {
            let created = if full {
                super::create_full(&vm, &name)?
            } else {
                super::create(&vm, &name)?
            };
            println!("{}", created_line(&vm, &name, &created));
        }
        SnapshotCommand::Ls { vm } => print!("{}", render(&super::list(&vm)?)),
        SnapshotCommand::Restore { vm, name } => {
            super::restore(&vm, &name)?;
            if super::list(&vm)?.iter().any(|s| s.name == name && s.full) {
                println!("{vm}: restored to snapshot {name}, suspended there (continue it with vmlab resume {vm})");
            } else {
                println!("{vm}: disks restored to snapshot {name}");
            }
        }
        SnapshotCommand::Rm { vm, name } => {
            let done = super::remove(&vm, &name)?;
            let mut line = format!("{vm}: snapshot {name} removed");
            if done.merged + done.deleted > 0 {
                line.push_str(&format!(
                    " ({} layer(s) merged, {} deleted)",
                    done.merged, done.deleted
                ));
            }
            if done.in_use > 0 {
                line.push_str("; layers the running VM reads merge at a later snapshot command");
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn created_line(vm: &str, name: &str, created: &Created) -> String {
    let disks = match created.disks {
        1 => "1 disk".to_string(),
        n => format!("{n} disks"),
    };
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    match (created.paused, created.state) {
        (Some(paused), Some(state)) => format!(
            "{vm}: full snapshot {name} of {disks} and {:.1} MiB of its {:.0} MiB of memory ({:.1} MiB on disk), guest paused {:.1} ms; start new VMs from it with vmlab run --name NEW --from {vm}@{name}",
            mib(state.written_bytes),
            mib(state.ram_bytes),
            mib(state.file_bytes),
            paused.as_secs_f64() * 1000.0
        ),
        (Some(paused), None) => format!(
            "{vm}: snapshot {name} of {disks}, taken live (guest paused {:.1} ms; crash-consistent)",
            paused.as_secs_f64() * 1000.0
        ),
        (None, _) => format!("{vm}: snapshot {name} of {disks}"),
    }
}

/// The table `vmlab snapshot ls` prints.
pub fn render(rows: &[SnapshotRow]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!(
        "{:<width$}  {:<20}  {:>5}  {:<4}  {:>10}\n",
        "NAME", "CREATED", "DISKS", "FULL", "SIZE"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<width$}  {:<20}  {:>5}  {:<4}  {:>10}\n",
            row.name,
            utc(row.created),
            row.disks,
            if row.full { "yes" } else { "no" },
            crate::disk::human_size(row.size)
        ));
    }
    out
}

/// `secs` since the epoch as `YYYY-MM-DD HH:MM:SSZ` (UTC).
fn utc(secs: u64) -> String {
    crate::civil_time::CivilTime::from_unix(i64::try_from(secs).unwrap_or(i64::MAX)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_dates_are_right_across_leap_years() {
        assert_eq!(utc(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(utc(4_107_542_399), "2100-02-28 23:59:59Z");
    }

    #[test]
    fn the_table_has_the_five_columns() {
        let rows = [SnapshotRow {
            name: "before-upgrade".into(),
            created: 1_700_000_000,
            disks: 2,
            size: 3 << 20,
            live: false,
            full: false,
        }];
        let text = render(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME            CREATED"), "{text}");
        assert!(lines[0].ends_with("DISKS  FULL        SIZE"), "{text}");
        assert!(
            lines[1].contains("before-upgrade  2023-11-14 22:13:20Z"),
            "{text}"
        );
        assert!(lines[1].ends_with("2  no       3.0 MiB"), "{text}");
        assert_eq!(render(&[]).lines().count(), 1);
    }

    #[test]
    fn a_live_snapshot_says_how_long_the_guest_paused() {
        let created = Created {
            disks: 1,
            paused: Some(Duration::from_micros(2500)),
            state: None,
        };
        assert_eq!(
            created_line("vm1", "s1", &created),
            "vm1: snapshot s1 of 1 disk, taken live (guest paused 2.5 ms; crash-consistent)"
        );
    }
}
