//! `vmlab ssh` and `vmlab ssh-config`: the system's OpenSSH client pointed
//! at a VM's forwarded port 22 with vmlab's key and its own known_hosts.
//!
//! Host keys are recorded under the alias `vmlab-NAME`, not under
//! `[127.0.0.1]:PORT`: ports are reused by other VMs over time, names are
//! not (and `vmlab rm` forgets the name's key).

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use super::error::{ControlError, Result};
use super::settings::VmSettings;
use crate::cli::Protocol;

pub const SSH_USER: &str = "root";

/// vmlab's known_hosts file.
pub fn known_hosts_path() -> PathBuf {
    crate::dirs::data_dir().join("ssh").join("known_hosts")
}

pub fn host_key_alias(name: &str) -> String {
    format!("vmlab-{name}")
}

/// Where ssh connects: the host side of the VM's TCP forward to port 22.
pub fn ssh_address(name: &str, settings: &VmSettings) -> Result<SocketAddrV4> {
    let rule = settings
        .all_forwards()
        .into_iter()
        .find(|r| r.protocol == Protocol::Tcp && r.guest_port == 22)
        .ok_or_else(|| {
            ControlError::Refused(format!(
                "VM {name} has no port forward to its port 22: start it with --forward tcp:2222:22"
            ))
        })?;
    let ip = match *rule.host.ip() {
        ip if ip.is_unspecified() => Ipv4Addr::LOCALHOST,
        ip => ip,
    };
    Ok(SocketAddrV4::new(ip, rule.host.port()))
}

fn options(name: &str, key: &Path, known_hosts: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("IdentityFile", key.display().to_string()),
        ("IdentitiesOnly", "yes".into()),
        ("UserKnownHostsFile", known_hosts.display().to_string()),
        ("StrictHostKeyChecking", "accept-new".into()),
        ("HostKeyAlias", host_key_alias(name)),
    ]
}

/// Arguments for `ssh` (without the program name); `command` runs
/// remotely when not empty.
pub fn ssh_args(
    name: &str,
    addr: SocketAddrV4,
    key: &Path,
    known_hosts: &Path,
    command: &[String],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["-p".into(), addr.port().to_string().into()];
    for (option, value) in options(name, key, known_hosts) {
        args.push("-o".into());
        args.push(format!("{option}={value}").into());
    }
    args.push(format!("{SSH_USER}@{}", addr.ip()).into());
    if !command.is_empty() {
        args.push("--".into());
        args.extend(command.iter().map(OsString::from));
    }
    args
}

/// An OpenSSH config stanza, as `vagrant ssh-config` prints.
pub fn ssh_config(name: &str, addr: SocketAddrV4, key: &Path, known_hosts: &Path) -> String {
    let mut out = format!(
        "Host {name}\n  HostName {}\n  Port {}\n  User {SSH_USER}\n",
        addr.ip(),
        addr.port()
    );
    for (option, value) in options(name, key, known_hosts) {
        // Paths with spaces need quotes in ssh_config.
        let value = if value.contains(' ') {
            format!("\"{value}\"")
        } else {
            value
        };
        out.push_str(&format!("  {option} {value}\n"));
    }
    out
}

/// Drops the VM's host key from vmlab's known_hosts (when it is removed,
/// so a new VM of the same name is not refused for its new key).
pub fn forget_host_key(name: &str) -> Result<()> {
    let path = known_hosts_path();
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let alias = host_key_alias(name);
    let kept: String = text
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .next()
                .map(|h| h.split(',').any(|h| h == alias))
                != Some(true)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    if kept != text {
        crate::fsutil::write_private(&path, kept.as_bytes())
            .map_err(ControlError::io("cannot update", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_forwards(rules: &[&str]) -> VmSettings {
        VmSettings {
            forwards: rules.iter().map(|r| r.parse().unwrap()).collect(),
            ..VmSettings::default()
        }
    }

    #[test]
    fn the_tcp_forward_to_22_is_used() {
        let s = with_forwards(&["udp:2222:22", "tcp:8080:80", "tcp:0.0.0.0:2223:22"]);
        assert_eq!(
            ssh_address("vm1", &s).unwrap(),
            "127.0.0.1:2223".parse().unwrap()
        );
        let s = with_forwards(&["tcp:127.0.0.2:2222:22"]);
        assert_eq!(
            ssh_address("vm1", &s).unwrap(),
            "127.0.0.2:2222".parse().unwrap()
        );
    }

    #[test]
    fn no_forward_to_22_is_one_clear_line() {
        let err = ssh_address("vm1", &with_forwards(&["tcp:8080:80"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no port forward to its port 22"), "{err}");
        assert!(err.contains("--forward tcp:2222:22"), "{err}");
    }

    #[test]
    fn ssh_gets_port_key_known_hosts_and_the_command() {
        let args = ssh_args(
            "vm1",
            "127.0.0.1:2222".parse().unwrap(),
            Path::new("/k/id_ed25519"),
            Path::new("/k/known_hosts"),
            &["cat".into(), "/root/mark".into()],
        );
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("-p 2222 "), "{joined}");
        for needle in [
            "-o IdentityFile=/k/id_ed25519",
            "-o UserKnownHostsFile=/k/known_hosts",
            "-o StrictHostKeyChecking=accept-new",
            "-o HostKeyAlias=vmlab-vm1",
        ] {
            assert!(joined.contains(needle), "{joined}");
        }
        assert!(
            joined.ends_with("root@127.0.0.1 -- cat /root/mark"),
            "{joined}"
        );
    }

    #[test]
    fn config_stanza_works_for_plain_ssh() {
        let text = ssh_config(
            "vm2",
            "127.0.0.1:2223".parse().unwrap(),
            Path::new("/my keys/id"),
            Path::new("/k/known_hosts"),
        );
        assert!(text.starts_with("Host vm2\n  HostName 127.0.0.1\n  Port 2223\n  User root\n"));
        assert!(text.contains("  IdentityFile \"/my keys/id\"\n"), "{text}");
        assert!(
            text.contains("  StrictHostKeyChecking accept-new\n"),
            "{text}"
        );
    }

    #[test]
    fn removing_a_vm_forgets_only_its_host_key() {
        let _home = crate::control::state::tests::temp_home();
        let path = known_hosts_path();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            "vmlab-vm1 ssh-ed25519 AAAA1\nvmlab-vm10 ssh-ed25519 AAAA2\nvmlab-vm1 ecdsa AAAA3\n",
        )
        .unwrap();
        forget_host_key("vm1").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "vmlab-vm10 ssh-ed25519 AAAA2\n"
        );
        forget_host_key("absent").unwrap();
    }
}
