//! The namespace members saved beside the leases (`namespaces`, one a
//! line, tab-separated, ingress rules comma-separated last), so a network process killed and started again
//! takes back the TAP devices it left in them.

use super::*;

/// A namespace member as saved for a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SavedNetns {
    pub(super) path: PathBuf,
    pub(super) device: String,
    pub(super) name: String,
    pub(super) mac: MacAddress,
    pub(super) configure: bool,
    pub(super) ingress: Vec<IngressRule>,
}

impl Process {
    pub(super) fn saved_namespaces(&self) -> Vec<SavedNetns> {
        self.members
            .values()
            .filter_map(|m| match &m.link {
                Link::Tap {
                    tap,
                    netns,
                    configure,
                    ..
                } => Some(SavedNetns {
                    path: netns.clone(),
                    device: tap.name().to_string(),
                    name: m.name.clone(),
                    mac: m.mac,
                    configure: *configure,
                    ingress: m.ingress.clone(),
                }),
                Link::Stream(_) | Link::Qemu { .. } => None,
            })
            .collect()
    }

    pub(super) fn save_namespaces(&self) {
        let path = self.dir.members_path();
        let text = render_namespaces(&self.saved_namespaces());
        if let Err(e) = crate::fsutil::write_atomically(&path, text.as_bytes()) {
            log::warn!(
                "network {}: cannot save {}: {e}",
                self.dir.name(),
                path.display()
            );
        }
    }

    /// After a kill, the namespaces that were members come back (their
    /// TAP devices outlived the process).
    pub(super) fn restore_namespaces(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.dir.members_path()) else {
            return;
        };
        for saved in parse_namespaces(&text) {
            if !saved.path.exists() {
                log::info!("network: {} is gone", saved.path.display());
                continue;
            }
            if let Err(e) = self.add_netns(&saved) {
                log::warn!("network: cannot re-attach {}: {e}", saved.path.display());
            }
        }
        self.save_namespaces();
    }
}

fn render_namespaces(saved: &[SavedNetns]) -> String {
    saved
        .iter()
        .map(|s| {
            let ingress: Vec<String> = s.ingress.iter().map(ToString::to_string).collect();
            format!(
                "{}\t{}\t{}\t{}\t{}\t{}\n",
                s.path.display(),
                s.device,
                s.name,
                s.mac,
                if s.configure { "configure" } else { "dhcp" },
                ingress.join(",")
            )
        })
        .collect()
}

fn parse_namespaces(text: &str) -> Vec<SavedNetns> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            let (path, device, name, mac, how, ingress) = match f[..] {
                [path, device, name, mac, how] => (path, device, name, mac, how, ""),
                [path, device, name, mac, how, ingress] => (path, device, name, mac, how, ingress),
                _ => return None,
            };
            let ingress = ingress
                .split(',')
                .filter(|r| !r.is_empty())
                .map(str::parse)
                .collect::<std::result::Result<Vec<IngressRule>, _>>()
                .ok()?;
            Some(SavedNetns {
                path: PathBuf::from(path),
                device: device.to_string(),
                name: name.to_string(),
                mac: mac.parse().ok()?,
                configure: how == "configure",
                ingress,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::membership::tap_name;
    use super::*;

    #[test]
    fn saved_namespaces_read_back() {
        let saved = vec![SavedNetns {
            path: "/run/netns/ct1".into(),
            device: tap_name("a-very-long-network-name"),
            name: "ct1".into(),
            mac: "52:54:00:01:02:03".parse().unwrap(),
            configure: true,
            ingress: vec![
                "tcp:22".parse().unwrap(),
                "udp:53-54 from 10.0.0.0/8".parse().unwrap(),
            ],
        }];
        assert_eq!(saved[0].device, "vl-a-very-long-");
        assert_eq!(parse_namespaces(&render_namespaces(&saved)), saved);
        assert!(parse_namespaces("junk\n").is_empty());
        let older = "/run/netns/ct1\tvl-x\tct1\t52:54:00:01:02:03\tdhcp\n";
        assert_eq!(parse_namespaces(older)[0].ingress, []);
    }
}
