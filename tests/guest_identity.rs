//! The Debian guests' resume hook (`/sbin/vmlab-identity`) read
//! against a memory image that vmlab's own note writer filled: what the
//! hook takes from the note, and what it refuses. The hook runs in its
//! test mode (`VMLAB_IDENTITY_MEM=FILE VMLAB_IDENTITY_ONCE=1`), which
//! prints what it read and changes nothing.

use std::path::Path;
use std::process::Command;

use vmlab::vmm::vmgenid::{note_bytes, NOTE_MAX};

const HOOK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/guest/debian/rootfs/sbin/vmlab-identity"
);
/// Where the note lies: the generation ID page, 0x100 in.
const NOTE_ADDR: usize = 0xff100;

/// 1 MiB of guest memory with `note` (its bytes as vmlab writes them)
/// at the note's address and random-looking bytes around it.
fn memory_with(dir: &Path, note: &[u8]) -> std::path::PathBuf {
    let mut mem: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 + 3) as u8).collect();
    mem[NOTE_ADDR..NOTE_ADDR + note.len()].copy_from_slice(note);
    let path = dir.join("mem");
    std::fs::write(&path, mem).unwrap();
    path
}

fn hook_reads(mem: &Path) -> String {
    let out = Command::new("sh")
        .arg(HOOK)
        .env("VMLAB_IDENTITY_MEM", mem)
        .env("VMLAB_IDENTITY_ONCE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn the_hook_reads_the_note_vmlab_writes() {
    let dir = tempfile::tempdir().unwrap();
    let note = note_bytes("hostname=fromvm\ninstance=3f2a-77\nmac=52:54:00:12:34:56\n");
    assert_eq!(
        hook_reads(&memory_with(dir.path(), &note)),
        "name=fromvm instance=3f2a-77 mac=52:54:00:12:34:56"
    );
}

#[test]
fn the_hook_takes_a_note_of_the_longest_length() {
    let dir = tempfile::tempdir().unwrap();
    // The fields first, then padding up to the longest note the hook
    // reads: all of it lies in the one block it copies.
    let mut text = String::from("hostname=vm7\ninstance=i7\nmac=52:54:00:00:00:07\n");
    text.push_str(&"#".repeat(3800 - text.len()));
    assert!(text.len() <= NOTE_MAX);
    assert_eq!(
        hook_reads(&memory_with(dir.path(), &note_bytes(&text))),
        "name=vm7 instance=i7 mac=52:54:00:00:00:07"
    );
}

#[test]
fn the_hook_refuses_a_missing_note_and_hostile_fields() {
    let dir = tempfile::tempdir().unwrap();
    // No magic: nothing is taken.
    let mem = memory_with(dir.path(), b"VMLABID0\x10\x00hostname=evil\n");
    assert_eq!(hook_reads(&mem), "name= instance= mac=");
    // A length past the page: nothing is taken.
    let mut long = b"VMLABID1".to_vec();
    long.extend_from_slice(&4000u16.to_le_bytes());
    long.extend_from_slice(b"hostname=evil\n");
    assert_eq!(
        hook_reads(&memory_with(dir.path(), &long)),
        "name= instance= mac="
    );
    // Fields a shell or ip(8) would misread are dropped one by one.
    let note = note_bytes("hostname=a;reboot\ninstance=$(id)\nmac=52:54:00:12:34:zz\n");
    assert_eq!(
        hook_reads(&memory_with(dir.path(), &note)),
        "name= instance= mac="
    );
}

/// The hook in its test mode with the host's clocks stood in for: `env`
/// are the stand-ins (VMLAB_IDENTITY_PORT, VMLAB_IDENTITY_RTC).
fn hook_reads_clock(dir: &Path, env: &[(&str, &Path)]) -> String {
    let mem = memory_with(dir, b"");
    let mut command = Command::new("sh");
    command
        .arg(HOOK)
        .env("VMLAB_IDENTITY_MEM", &mem)
        .env("VMLAB_IDENTITY_ONCE", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines().nth(1).unwrap_or_default().to_string()
}

/// The host clock's 16 bytes as vmlab's device gives them.
fn clock_ports(now: u64, run: u64) -> Vec<u8> {
    [now.to_le_bytes(), run.to_le_bytes()].concat()
}

#[test]
fn the_hook_reads_the_host_clock_from_the_rtc_where_there_is_no_dev_port() {
    let dir = tempfile::tempdir().unwrap();
    let rtc = dir.path().join("since_epoch");
    std::fs::write(&rtc, "1796299338\n").unwrap();
    assert_eq!(
        hook_reads_clock(dir.path(), &[("VMLAB_IDENTITY_RTC", &rtc)]),
        "rtc_s=1796299338"
    );
    // Not a number: nothing is taken.
    std::fs::write(&rtc, "17962;reboot\n").unwrap();
    assert_eq!(
        hook_reads_clock(dir.path(), &[("VMLAB_IDENTITY_RTC", &rtc)]),
        "rtc_s="
    );
}

#[test]
fn the_hook_reads_the_host_clock_through_a_port_file() {
    let dir = tempfile::tempdir().unwrap();
    let (now, run) = (1_796_299_338_374_858_964_u64, 1_796_299_319_553_710_461_u64);
    // A file standing in for /dev/port: the clock at 0x520.
    let mut ports = vec![0u8; 0x520];
    ports.extend(clock_ports(now, run));
    let file = dir.path().join("port");
    std::fs::write(&file, ports).unwrap();
    assert_eq!(
        hook_reads_clock(dir.path(), &[("VMLAB_IDENTITY_PORT", &file)]),
        format!("clock_ns={now} run_ns={run}")
    );
}

/// A stand-in sshd for the hook's reload: a shell that, on SIGHUP, does
/// what sshd does when it re-executes itself (its pid file gone while the
/// new one starts, written again once it listens), slowly, as under the
/// rig's emulation, and marks when it is done.
#[test]
fn the_hook_reports_sshd_reloaded_only_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("sshd.pid");
    let done = dir.path().join("listening");
    let script = format!(
        "trap 'rm -f {pid}; sleep 1; : >{done}; echo $$ >{pid}; exit 0' HUP; \
         echo $$ >{pid}; while :; do sleep 0.05; done",
        pid = pid_file.display(),
        done = done.display()
    );
    // A shell cannot trap a signal it was started with ignored (as under
    // nohup): SIGHUP back to its default first.
    let mut sshd = Command::new("env")
        .args(["--default-signal=HUP", "sh", "-c", &script])
        .spawn()
        .unwrap();
    while !pid_file.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = Command::new("sh")
        .arg(HOOK)
        .env("VMLAB_IDENTITY_RELOAD", "1")
        .env("VMLAB_IDENTITY_SSHD_PID", &pid_file)
        .output()
        .unwrap();
    let back = done.exists();
    sshd.kill().ok();
    sshd.wait().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(back, "the hook went on before the reloaded sshd listened");
    assert!(pid_file.exists());
}
