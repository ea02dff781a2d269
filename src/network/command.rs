//! `vmlab network ...`: the subcommands' arguments and what each does
//! (main.rs only dispatches here).

use std::path::PathBuf;

use clap::Subcommand;

use super::client;
use super::error::{NetworkError, Result};
use super::protocol::{AttachRequest, NetRequest, NetResponse};
use super::store::NetworkDir;
use super::subnet::Subnet;
use super::view::{render_qemu_join, render_rows, NetworkRow};

#[derive(Subcommand, Debug)]
pub enum NetworkCommand {
    /// Define a network: a subnet with a gateway (DHCP, DNS for members,
    /// NAT) that VMs (run --net NAME) and namespaces (attach) share.
    Create {
        name: String,
        /// The subnet, /16 to /29 [default: the first free /24 from
        /// 192.168.100.0/24].
        #[arg(long, value_name = "CIDR")]
        subnet: Option<Subnet>,
        /// Members reach each other and the gateway's DHCP and DNS, nothing
        /// beyond (no NAT, no DNS relay).
        #[arg(long)]
        no_nat: bool,
    },
    /// List networks: name, subnet, NAT, members, whether it runs.
    Ls,
    /// A network's members, leases, forwards, flows and counters.
    Show { name: String },
    /// Attach a network namespace (as root): a TAP device appears in it,
    /// configured from its lease; returns once the link is up.
    Attach {
        name: String,
        /// The namespace, e.g. /run/netns/ct1 or /proc/PID/ns/net.
        #[arg(long, value_name = "PATH")]
        netns: PathBuf,
        /// The member's name (DNS) [default: the namespace file's name].
        #[arg(long = "name", value_name = "NAME")]
        member: Option<String>,
        /// Leave the TAP unconfigured (up, no address): a DHCP client in
        /// the namespace gets the same lease.
        #[arg(long)]
        no_config: bool,
        /// If this starts the network's process, run it without its
        /// seccomp filters (for debugging, as run --no-seccomp).
        #[arg(long)]
        no_seccomp: bool,
        /// Only connections a rule admits come in: tcp:PORT[-PORT],
        /// udp:PORT[-PORT] or icmp, each optionally 'from CIDR' (repeatable).
        #[arg(long = "ingress", value_name = "RULE")]
        ingress: Vec<crate::cli::IngressRule>,
    },
    /// Detach a network namespace (its TAP device goes).
    Detach {
        name: String,
        #[arg(long, value_name = "PATH")]
        netns: PathBuf,
    },
    /// Delete a network's definition and leases (refused while it has members).
    Rm { name: String },
}

/// Runs one `vmlab network` subcommand.
pub fn run(command: NetworkCommand) -> Result<i32> {
    match command {
        NetworkCommand::Create {
            name,
            subnet,
            no_nat,
        } => {
            let net = NetworkDir::named(&name)?;
            let def = net.create(subnet, !no_nat)?;
            println!(
                "network {name}: {} gateway {}{}",
                def.subnet,
                def.subnet.gateway(),
                if def.nat { "" } else { ", no NAT" }
            );
        }
        NetworkCommand::Ls => {
            let rows = NetworkDir::list()?
                .iter()
                .map(|net| {
                    let def = net.load()?;
                    let members = match client::ask(net, &NetRequest::Status) {
                        Ok(Some(NetResponse::Status(view))) => Some(view.members.len()),
                        _ => None,
                    };
                    Ok(NetworkRow {
                        name: net.name().to_string(),
                        subnet: def.subnet,
                        nat: def.nat,
                        members,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            print!("{}", render_rows(&rows));
        }
        NetworkCommand::Show { name } => {
            let net = NetworkDir::existing(&name)?;
            match client::ask(&net, &NetRequest::Status)? {
                Some(NetResponse::Status(view)) => print!("{}", view.render()),
                _ => {
                    let def = net.load()?;
                    println!(
                        "network {name}: {} gateway {} nat {} (not running: no members)",
                        def.subnet,
                        def.subnet.gateway(),
                        if def.nat { "yes" } else { "no" }
                    );
                }
            }
            print!("{}", render_qemu_join(&net.qemu_socket_path()));
        }
        NetworkCommand::Attach {
            name,
            netns,
            member,
            no_config,
            no_seccomp,
            ingress,
        } => {
            let net = NetworkDir::existing(&name)?;
            let netns = namespace_path(&netns)?;
            let member = match member {
                Some(m) => m,
                None => netns
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string(),
            };
            let member = member
                .parse::<crate::control::VmName>()
                .map_err(|e| NetworkError::Refused {
                    name: name.clone(),
                    message: format!("{e} (give the member's name with --name)"),
                })?
                .to_string();
            let request = NetRequest::Attach(AttachRequest {
                netns,
                name: member,
                configure: !no_config,
                ingress,
            });
            let filtered = !no_seccomp;
            if let NetResponse::Attached(view) = client::ask_starting(&net, &request, filtered)? {
                println!("{} joined {name} as {} ({})", view.name, view.ip, view.mac);
            }
        }
        NetworkCommand::Detach { name, netns } => {
            let net = NetworkDir::existing(&name)?;
            let netns = namespace_path(&netns)?;
            let request = NetRequest::Detach {
                netns: netns.clone(),
            };
            match client::ask(&net, &request)? {
                Some(_) => {}
                None => {
                    return Err(NetworkError::Refused {
                        name,
                        message: format!(
                            "{} is not attached (the network does not run)",
                            netns.display()
                        ),
                    })
                }
            }
        }
        NetworkCommand::Rm { name } => NetworkDir::existing(&name)?.remove()?,
    }
    Ok(0)
}

/// The namespace file, absolute, checked to exist (a typo fails here, not
/// in the network process).
fn namespace_path(path: &std::path::Path) -> Result<PathBuf> {
    let absolute =
        std::path::absolute(path).map_err(NetworkError::io("bad namespace path", path))?;
    if absolute.to_str().is_none_or(|p| p.contains(['\t', '\n'])) {
        return Err(NetworkError::Io {
            what: "unusable namespace path",
            path: absolute,
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    }
    std::fs::metadata(&absolute).map_err(NetworkError::io("no network namespace at", &absolute))?;
    Ok(absolute)
}

/// `vmlab network-daemon NAME`: the network process. It forks once so
/// that it is nobody's child (its starter, maybe a VM, waits for the
/// first process only), leaves the starter's session, and serves, its
/// threads under seccomp filters unless `no_seccomp`.
pub fn daemon(name: &str, no_seccomp: bool) -> Result<i32> {
    // SAFETY: called first thing in the process, before any thread
    // exists; the child continues with a copy of one thread.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => return Ok(0),
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(e) => {
            return Err(NetworkError::Daemon {
                name: name.to_string(),
                message: format!("cannot fork: {e}"),
            })
        }
    }
    crate::control::daemon::detach_from_terminal();
    if !no_seccomp {
        crate::seccomp::prepare()?;
    }
    super::daemon::serve(name, client::signal_ready)?;
    Ok(0)
}
