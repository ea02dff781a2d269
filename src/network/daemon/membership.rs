//! Who is on the network: admitting a member (its name, MAC and address
//! checked, its lease taken), VMs joining and namespaces attaching, and
//! members leaving (detach, a closed socket, a deleted namespace).

use super::requests::write_line;
use super::*;

impl Process {
    pub(super) fn member_named(&self, name: &str) -> Option<&Member> {
        self.members.values().find(|m| m.name == name)
    }

    /// Checks a new member and gives it its address; the caller makes it
    /// a port. Errors are the one line the joining command prints.
    pub(super) fn admit(
        &mut self,
        name: &str,
        mac: MacAddress,
        ip: Option<std::net::Ipv4Addr>,
    ) -> std::result::Result<std::net::Ipv4Addr, String> {
        let network = self.dir.name().to_string();
        if self.member_named(name).is_some() {
            return Err(format!(
                "a member named {name} is already on network {network}"
            ));
        }
        if let Some(other) = self.members.values().find(|m| m.mac == mac) {
            return Err(format!(
                "{} already uses MAC {mac} on network {network}: two members cannot share one (give another --mac)",
                other.name
            ));
        }
        let eth = EthernetAddress(mac.octets());
        let leases = self.nat.leases_mut();
        let ip = match ip {
            Some(ip) => {
                if !self.def.subnet.is_host(ip) {
                    return Err(format!(
                        "--ip {ip} is not a member address of {network}'s {} (not the network, gateway or broadcast address)",
                        self.def.subnet
                    ));
                }
                leases.reserve(eth, ip).map_err(|e| e.to_string())?;
                ip
            }
            None => leases
                .lease_for(eth)
                .ok_or_else(|| format!("network {network} has no address left in its pool"))?,
        };
        leases.set_name(eth, name);
        self.nat.add_neighbor(ip, eth);
        Ok(ip)
    }

    pub(super) fn join(
        &mut self,
        join: &JoinRequest,
    ) -> std::result::Result<(Joined, PortId), String> {
        // Bind the forwards first: a port in use fails the join, and so
        // `vmlab run`, before the member counts.
        let listeners = ForwardListeners::bind(&join.forwards).map_err(|e| e.to_string())?;
        let ip = self.admit(&join.name, join.mac, join.ip)?;
        self.nat
            .add_forwards(listeners, ip, &mut self.reg)
            .map_err(|e| e.to_string())?;
        let port = self
            .switch
            .add_port(Some(EthernetAddress(join.mac.octets())));
        self.firewall.guard(port, &join.ingress);
        let joined = Joined {
            ip,
            prefix: self.def.subnet.prefix(),
            gateway: self.def.subnet.gateway(),
        };
        Ok((joined, port))
    }

    pub(super) fn become_member(
        &mut self,
        stream: UnixStream,
        port: PortId,
        join: &JoinRequest,
        joined: Joined,
    ) {
        let answered = write_line(&stream, &NetResponse::Joined(joined.clone()));
        let link = answered
            .and_then(|()| StreamPort::new(stream, Framing::VnetHdr, PORT_BUFFER))
            .and_then(|p| {
                self.reg
                    .add(p.as_raw_fd(), TOKEN_MEMBER | port.0)
                    .map(|()| p)
            });
        let member = Member {
            name: join.name.clone(),
            mac: join.mac,
            ip: joined.ip,
            link: match link {
                Ok(link) => Link::Stream(link),
                Err(e) => {
                    log::warn!("network: {} could not join: {e}", join.name);
                    self.switch.remove_port(port);
                    self.firewall.remove_port(port);
                    self.nat.forget_guest(joined.ip, &mut self.reg);
                    return;
                }
            },
            forwards: join.forwards.clone(),
            ingress: join.ingress.clone(),
            readable: true,
            paused: false,
        };
        log::info!(
            "network: {} joined as {} ({})",
            join.name,
            joined.ip,
            join.mac
        );
        self.members.insert(port, member);
        self.had_member = true;
    }

    pub(super) fn attach(
        &mut self,
        attach: &AttachRequest,
    ) -> std::result::Result<MemberView, String> {
        if self
            .members
            .values()
            .any(|m| matches!(&m.link, Link::Tap { netns, .. } if netns == &attach.netns))
        {
            return Err(format!(
                "{} is already attached to network {}",
                attach.netns.display(),
                self.dir.name()
            ));
        }
        let saved = SavedNetns {
            path: attach.netns.clone(),
            device: tap_name(self.dir.name()),
            name: attach.name.clone(),
            mac: MacAddress::for_vm(&format!("netns:{}:{}", self.dir.name(), attach.name)),
            configure: attach.configure,
            ingress: attach.ingress.clone(),
        };
        let view = self.add_netns(&saved)?;
        self.save_namespaces();
        Ok(view)
    }

    pub(super) fn add_netns(
        &mut self,
        saved: &SavedNetns,
    ) -> std::result::Result<MemberView, String> {
        let ip = self.admit(&saved.name, saved.mac, None)?;
        let address = saved.configure.then_some(netns::Address {
            ip,
            prefix: self.def.subnet.prefix(),
            gateway: self.def.subnet.gateway(),
        });
        let identity = netns::identity(&saved.path);
        let opened = identity
            .ok_or_else(|| format!("no network namespace at {}", saved.path.display()))
            .and_then(|_| {
                self.netns
                    .open(&saved.path, &saved.device, saved.mac, address)
                    .map_err(|e| e.to_string())
            });
        let tap = match opened {
            Ok(tap) => tap,
            Err(e) => {
                self.nat.forget_guest(ip, &mut self.reg);
                return Err(e);
            }
        };
        let port = self
            .switch
            .add_port(Some(EthernetAddress(saved.mac.octets())));
        self.firewall.guard(port, &saved.ingress);
        if let Err(e) = self.reg.add(tap.as_raw_fd(), TOKEN_MEMBER | port.0) {
            self.switch.remove_port(port);
            self.firewall.remove_port(port);
            netns::release(tap);
            return Err(format!("cannot watch the TAP device: {e}"));
        }
        let member = Member {
            name: saved.name.clone(),
            mac: saved.mac,
            ip,
            link: Link::Tap {
                tap,
                netns: saved.path.clone(),
                configure: saved.configure,
                identity: identity.unwrap_or_default(),
            },
            forwards: Vec::new(),
            ingress: saved.ingress.clone(),
            readable: true,
            paused: false,
        };
        let view = MemberView {
            ingress: self.firewall.view(port),
            ..member.view()
        };
        log::info!(
            "network: {} ({}) attached as {ip}",
            saved.name,
            saved.path.display()
        );
        self.members.insert(port, member);
        self.had_member = true;
        Ok(view)
    }

    pub(super) fn detach(&mut self, netns: &Path) -> std::result::Result<(), String> {
        let port = self
            .members
            .iter()
            .find(|(_, m)| matches!(&m.link, Link::Tap { netns: n, .. } if n == netns))
            .map(|(p, _)| *p)
            .ok_or_else(|| {
                format!(
                    "{} is not attached to network {}",
                    netns.display(),
                    self.dir.name()
                )
            })?;
        self.leave(port);
        Ok(())
    }

    /// Member `port` is gone: its port, forwards and flows go too (its
    /// lease stays for when it comes back).
    pub(super) fn leave(&mut self, port: PortId) {
        let Some(member) = self.members.remove(&port) else {
            return;
        };
        let _ = self.reg.remove(member.fd(), TOKEN_MEMBER | port.0);
        self.switch.remove_port(port);
        self.firewall.remove_port(port);
        self.nat.forget_guest(member.ip, &mut self.reg);
        log::info!("network: {} left", member.name);
        if let Link::Tap { tap, .. } = member.link {
            netns::release(tap);
            self.save_namespaces();
        }
    }

    /// Namespace members whose namespace was deleted leave.
    pub(super) fn drop_deleted_namespaces(&mut self) {
        let gone: Vec<PortId> = self
            .members
            .iter()
            .filter(|(_, m)| match &m.link {
                Link::Tap {
                    netns, identity, ..
                } => netns::identity(netns) != Some(*identity),
                Link::Stream(_) | Link::Qemu { .. } => false,
            })
            .map(|(p, _)| *p)
            .collect();
        for port in gone {
            self.leave(port);
        }
    }
}

/// The device a namespace member gets: `vl-NETWORK`, cut to fit.
pub(super) fn tap_name(network: &str) -> String {
    format!("vl-{network}").chars().take(15).collect()
}
