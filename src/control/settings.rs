//! A named VM's configuration file (`vm.conf` in its state directory):
//! what `vmlab run --name NAME` starts it with next time. One `key = value`
//! per line, `#` comments, `forward`, `disk` and `ingress` repeatable:
//!
//! ```text
//! cpus = 2
//! mem = 1G
//! forward = tcp:127.0.0.1:2222:22
//! disk = /home/me/.local/share/vmlab/vms/vm1/disk.qcow2
//! guest = debian
//! flavor = full
//! packages = docker.io
//! on-reboot = restart
//! allow-backing = /srv/images/base.qcow2
//! net = lab
//! ip = 192.168.100.20
//! net = dmz
//! mac = 52:54:00:12:34:57
//! ingress = tcp:5432 from 192.168.100.0/24
//! ```
//!
//! Each `net` line after the first is another card (eth1, eth2, ...); the
//! `mac`, `forward` and `ip` lines after it are that card's, as on the
//! command line. Lines before the second `net` are the first card's, so a
//! file from before several cards reads as it always did.

use std::fmt::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::cards::CardSettings;
use super::error::{ControlError, Result};
use crate::cli::{ByteSize, DiskSpec, ForwardRule, IngressRule};
use crate::disk::BackingPolicy;
use crate::image::{Flavor, ImageSpec};
use crate::net::{HostLoopback, Outbound};
use crate::vmm::OnReboot;

/// Guest memory when neither the user nor the file says.
pub const DEFAULT_MEM: u64 = 512 << 20;

/// What the VM's card is on (`--net`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetChoice {
    /// Its own NAT (10.0.2.15).
    #[default]
    User,
    /// No card.
    None,
    /// A lab network (`vmlab network create NAME`).
    Lab(String),
    /// An existing TAP device (`tap:DEV`), which vmlab neither creates nor
    /// configures: bridged mode.
    Tap(String),
}

impl NetChoice {
    /// Whether the card is behind a NAT of vmlab's (its own or a lab
    /// network's), which is what `--forward` needs.
    pub fn has_nat(&self) -> bool {
        matches!(self, NetChoice::User | NetChoice::Lab(_))
    }
}

impl FromStr for NetChoice {
    type Err = ControlError;

    fn from_str(text: &str) -> Result<NetChoice> {
        match text {
            "user" => Ok(NetChoice::User),
            "none" => Ok(NetChoice::None),
            tap if tap.starts_with("tap:") => {
                let dev = &tap[4..];
                if crate::net::tap_name_is_valid(dev) {
                    Ok(NetChoice::Tap(dev.to_string()))
                } else {
                    Err(ControlError::Refused(format!(
                        "--net '{}': '{}' is not a network device name (1 to 15 characters, no '/' or spaces)",
                        tap.escape_default(),
                        dev.escape_default()
                    )))
                }
            }
            name => match name.parse::<super::VmName>() {
                Ok(name) => Ok(NetChoice::Lab(name.to_string())),
                Err(_) => Err(ControlError::Refused(format!(
                    "--net '{}' is not user, none or a network's name (see vmlab network ls)",
                    name.escape_default()
                ))),
            },
        }
    }
}

impl fmt::Display for NetChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetChoice::User => f.write_str("user"),
            NetChoice::None => f.write_str("none"),
            NetChoice::Lab(name) => f.write_str(name),
            NetChoice::Tap(dev) => write!(f, "tap:{dev}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSettings {
    pub cpus: u8,
    pub mem: ByteSize,
    pub forwards: Vec<ForwardRule>,
    pub disks: Vec<DiskSpec>,
    /// None: derived from the VM's name (see [`derived_mac`]), so a clone,
    /// which has a new name, gets a new MAC.
    pub mac: Option<[u8; 6]>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to vmlab's own.
    pub cmdline: String,
    /// Boots the default Debian image (its kernel, `root=/dev/vda` on the
    /// VM's own overlay, identity on the command line) instead of `kernel`.
    pub debian: bool,
    /// Which Debian image the VM's disk was cloned from (with `debian`):
    /// chosen at the first run, fixed afterwards.
    pub flavor: Flavor,
    /// The extra packages of that (full) image.
    pub packages: Vec<String>,
    /// What a guest reboot does; None: the default, a restart in place.
    pub on_reboot: Option<OnReboot>,
    /// What the first network card (eth0) is on (`--net`); `mac`,
    /// `forwards` and `ip` are that card's too.
    pub net: NetChoice,
    /// The VM's reserved address on its lab network (`--ip`).
    pub ip: Option<Ipv4Addr>,
    /// The cards after the first: eth1, eth2, ...
    pub more_cards: Vec<CardSettings>,
    /// What may open connections toward it on its lab network (`--ingress`).
    pub ingress: Vec<IngressRule>,
    /// What the gateway reaches on the host's loopback (`--host-loopback`).
    pub host_loopback: HostLoopback,
    /// Where else the guest may go (`--outbound`).
    pub outbound: Outbound,
    /// Backing files the disks may name beyond vmlab's rule (`--allow-backing`).
    pub allow_backing: Vec<PathBuf>,
}

impl Default for VmSettings {
    fn default() -> Self {
        VmSettings {
            cpus: 1,
            mem: ByteSize(DEFAULT_MEM),
            forwards: Vec::new(),
            disks: Vec::new(),
            mac: None,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            debian: false,
            flavor: Flavor::Lean,
            packages: Vec::new(),
            on_reboot: None,
            net: NetChoice::User,
            ip: None,
            more_cards: Vec::new(),
            ingress: Vec::new(),
            host_loopback: HostLoopback::All,
            outbound: Outbound::Any,
            allow_backing: Vec::new(),
        }
    }
}

impl VmSettings {
    /// The file's text; [`VmSettings::parse`] reads it back unchanged.
    pub fn render(&self) -> String {
        let mut out = String::from("# vmlab VM configuration (edit while the VM is stopped)\n");
        let _ = writeln!(out, "cpus = {}", self.cpus);
        let _ = writeln!(out, "mem = {}", self.mem);
        for rule in &self.forwards {
            let _ = writeln!(out, "forward = {rule}");
        }
        for disk in &self.disks {
            let _ = writeln!(out, "disk = {disk}");
        }
        if let Some(mac) = self.mac {
            let _ = writeln!(out, "mac = {}", format_mac(&mac));
        }
        if let Some(kernel) = &self.kernel {
            let _ = writeln!(out, "kernel = {}", kernel.display());
        }
        if let Some(initrd) = &self.initrd {
            let _ = writeln!(out, "initrd = {}", initrd.display());
        }
        if !self.cmdline.is_empty() {
            let _ = writeln!(out, "cmdline = {}", self.cmdline);
        }
        if self.debian {
            let _ = writeln!(out, "guest = debian");
            let _ = writeln!(out, "flavor = {}", self.flavor);
        }
        if !self.packages.is_empty() {
            let _ = writeln!(out, "packages = {}", self.packages.join(","));
        }
        if let Some(policy) = self.on_reboot {
            let _ = writeln!(out, "on-reboot = {policy}");
        }
        if self.net != NetChoice::User || !self.more_cards.is_empty() {
            let _ = writeln!(out, "net = {}", self.net);
        }
        if let Some(ip) = self.ip {
            let _ = writeln!(out, "ip = {ip}");
        }
        for rule in &self.ingress {
            let _ = writeln!(out, "ingress = {rule}");
        }
        if self.host_loopback != HostLoopback::All {
            let _ = writeln!(out, "host_loopback = {}", self.host_loopback);
        }
        if self.outbound != Outbound::Any {
            let _ = writeln!(out, "outbound = {}", self.outbound);
        }
        for path in &self.allow_backing {
            let _ = writeln!(out, "allow-backing = {}", path.display());
        }
        for card in &self.more_cards {
            let _ = writeln!(out, "net = {}", card.net);
            if let Some(mac) = card.mac {
                let _ = writeln!(out, "mac = {}", format_mac(&mac));
            }
            for rule in &card.forwards {
                let _ = writeln!(out, "forward = {rule}");
            }
            if let Some(ip) = card.ip {
                let _ = writeln!(out, "ip = {ip}");
            }
            for rule in &card.ingress {
                let _ = writeln!(out, "ingress = {rule}");
            }
        }
        out
    }

    /// The VM's cards in order (none with `--net none`).
    pub fn cards(&self) -> Vec<CardSettings> {
        if self.net == NetChoice::None {
            return Vec::new();
        }
        let first = CardSettings {
            net: self.net.clone(),
            mac: self.mac,
            forwards: self.forwards.clone(),
            ip: self.ip,
            ingress: self.ingress.clone(),
        };
        std::iter::once(first)
            .chain(self.more_cards.iter().cloned())
            .collect()
    }

    /// Gives the VM these cards (none: `--net none`).
    pub fn set_cards(&mut self, cards: Vec<CardSettings>) {
        let mut cards = cards.into_iter();
        let first = cards.next().unwrap_or(CardSettings {
            net: NetChoice::None,
            ..CardSettings::default()
        });
        self.net = first.net;
        self.mac = first.mac;
        self.forwards = first.forwards;
        self.ip = first.ip;
        self.ingress = first.ingress;
        self.more_cards = cards.collect();
    }

    /// Every card's forwards, the first card's first.
    pub fn all_forwards(&self) -> Vec<ForwardRule> {
        self.cards().into_iter().flat_map(|c| c.forwards).collect()
    }

    /// Parses a configuration; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<VmSettings> {
        let mut settings = VmSettings::default();
        let mut nets_seen = 0;
        let config = |line: usize, message: String| ControlError::Config {
            path: path.to_path_buf(),
            line,
            message,
        };
        for entry in crate::key_value::entries(text) {
            let entry = entry.map_err(|(line, message)| config(line, message))?;
            let err = |message: String| config(entry.line, message);
            let (key, value) = (entry.key, entry.value);
            match key {
                "cpus" => {
                    settings.cpus = value
                        .parse()
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| err(format!("cpus '{value}' is not 1 to 254")))?;
                }
                "mem" => settings.mem = value.parse().map_err(|e| err(format!("mem: {e}")))?,
                "forward" => {
                    let rule = value.parse().map_err(|e| err(format!("{e}")))?;
                    match settings.more_cards.last_mut() {
                        Some(card) => card.forwards.push(rule),
                        None => settings.forwards.push(rule),
                    }
                }
                "disk" => settings
                    .disks
                    .push(value.parse().map_err(|e| err(format!("{e}")))?),
                "mac" => {
                    let mac = Some(parse_mac(value).ok_or_else(|| {
                        err(format!(
                            "mac '{value}' is not six hex bytes like 52:54:00:12:34:56"
                        ))
                    })?);
                    match settings.more_cards.last_mut() {
                        Some(card) => card.mac = mac,
                        None => settings.mac = mac,
                    }
                }
                "kernel" => settings.kernel = Some(PathBuf::from(value)),
                "initrd" => settings.initrd = Some(PathBuf::from(value)),
                "cmdline" => settings.cmdline = value.to_string(),
                "guest" if value == "debian" => settings.debian = true,
                "guest" => return Err(err(format!("guest '{value}' is not 'debian'"))),
                "flavor" => settings.flavor = value.parse().map_err(err)?,
                "packages" => settings.packages = crate::image::parse_package_list(value),
                "on-reboot" => settings.on_reboot = Some(value.parse().map_err(err)?),
                "net" => {
                    let net = value.parse().map_err(|_| {
                        err(format!(
                            "net '{value}' is not user, none, tap:DEV or a network name"
                        ))
                    })?;
                    nets_seen += 1;
                    match nets_seen {
                        1 => settings.net = net,
                        _ => settings.more_cards.push(CardSettings {
                            net,
                            ..CardSettings::default()
                        }),
                    }
                }
                "ip" => {
                    let ip = Some(
                        value
                            .parse()
                            .map_err(|_| err(format!("ip '{value}' is not an IPv4 address")))?,
                    );
                    match settings.more_cards.last_mut() {
                        Some(card) => card.ip = ip,
                        None => settings.ip = ip,
                    }
                }
                "ingress" => {
                    let rule = value.parse().map_err(|e| err(format!("{e}")))?;
                    match settings.more_cards.last_mut() {
                        Some(card) => card.ingress.push(rule),
                        None => settings.ingress.push(rule),
                    }
                }
                "host_loopback" => {
                    settings.host_loopback = value.parse().map_err(|e| err(format!("{e}")))?
                }
                "outbound" => settings.outbound = value.parse().map_err(|e| err(format!("{e}")))?,
                "allow-backing" => settings.allow_backing.push(PathBuf::from(value)),
                other => return Err(err(format!("unknown key '{other}'"))),
            }
        }
        Ok(settings)
    }

    /// The Debian image the VM's disk comes from.
    pub fn image_spec(&self) -> Result<ImageSpec> {
        ImageSpec::new(self.flavor, &self.packages).map_err(Into::into)
    }

    /// What a guest reboot does: the saved policy, else a restart in place.
    pub fn reboot_policy(&self) -> OnReboot {
        self.on_reboot.unwrap_or(OnReboot::Restart)
    }

    /// Where the VM's disks may find their backing files.
    pub fn backing_policy(&self) -> BackingPolicy {
        BackingPolicy::vmlab().allowing(self.allow_backing.iter().cloned())
    }

    /// Drops every card's chosen MAC, so each is derived from the VM's
    /// name (a clone, a VM started from another's snapshot).
    pub fn forget_macs(&mut self) {
        self.mac = None;
        for card in &mut self.more_cards {
            card.mac = None;
        }
    }

    /// The MAC the VM's network card uses.
    pub fn mac_for(&self, name: &str) -> [u8; 6] {
        self.mac.unwrap_or_else(|| derived_mac(name))
    }
}

/// A stable, locally administered MAC from the VM's name (QEMU's 52:54:00
/// prefix, then 24 bits of an FNV-1a hash of the name).
pub fn derived_mac(name: &str) -> [u8; 6] {
    crate::cli::MacAddress::for_vm(name).octets()
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> VmSettings {
        VmSettings {
            cpus: 2,
            mem: ByteSize(1 << 30),
            forwards: vec![
                "tcp:2222:22".parse().unwrap(),
                "udp:0.0.0.0:5353:53".parse().unwrap(),
            ],
            disks: vec![
                "/data/vm1/disk.qcow2".parse().unwrap(),
                "/x y.raw,ro".parse().unwrap(),
            ],
            mac: Some([0x52, 0x54, 0, 1, 2, 0xab]),
            kernel: Some(PathBuf::from("/k/vmlinux")),
            initrd: Some(PathBuf::from("/k/initrd.cpio")),
            cmdline: "quiet loglevel=3 a=b".into(),
            debian: true,
            flavor: Flavor::Full,
            packages: vec!["docker.io".into(), "linux-image-amd64".into()],
            on_reboot: Some(OnReboot::Exit),
            net: NetChoice::Lab("lab".into()),
            ip: Some(Ipv4Addr::new(192, 168, 100, 20)),
            more_cards: vec![
                CardSettings {
                    net: NetChoice::Lab("dmz".into()),
                    mac: Some([0x52, 0x54, 0, 1, 2, 0xac]),
                    forwards: vec!["tcp:8080:80".parse().unwrap()],
                    ip: Some(Ipv4Addr::new(192, 168, 101, 7)),
                    ingress: vec!["udp:53".parse().unwrap()],
                },
                CardSettings {
                    net: NetChoice::Tap("tap0".into()),
                    ..CardSettings::default()
                },
                CardSettings::default(),
            ],
            ingress: vec![
                "tcp:5432 from 192.168.100.0/24".parse().unwrap(),
                "icmp".parse().unwrap(),
            ],
            host_loopback: HostLoopback::Ports(vec![22, 5432]),
            outbound: Outbound::HostOnly,
            allow_backing: vec![PathBuf::from("/srv/base.qcow2"), PathBuf::from("/dev/sdb")],
        }
    }

    #[test]
    fn round_trips() {
        for settings in [VmSettings::default(), full()] {
            let text = settings.render();
            assert_eq!(
                VmSettings::parse(&text, Path::new("vm.conf")).unwrap(),
                settings,
                "{text}"
            );
        }
    }

    #[test]
    fn a_debian_vm_from_before_flavors_is_lean_and_restarts_on_reboot() {
        let s = VmSettings::parse("guest = debian\n", Path::new("vm.conf")).unwrap();
        assert!(s.debian);
        assert_eq!(s.flavor, Flavor::Lean);
        assert!(s.packages.is_empty());
        assert_eq!(s.on_reboot, None);
        assert_eq!(s.reboot_policy(), OnReboot::Restart);
        assert_eq!(s.image_spec().unwrap(), ImageSpec::lean());
        let full = VmSettings::parse(
            "guest = debian\nflavor = full\npackages = docker.io\non-reboot = exit\n",
            Path::new("vm.conf"),
        )
        .unwrap();
        assert_eq!(full.reboot_policy(), OnReboot::Exit);
        assert_eq!(
            full.image_spec().unwrap(),
            ImageSpec::new(Flavor::Full, &["docker.io".into()]).unwrap()
        );
    }

    #[test]
    fn a_file_from_before_several_cards_is_one_card_and_later_nets_are_more_cards() {
        let old =
            "forward = tcp:2222:22\nmac = 52:54:00:01:02:03\nnet = lab\nip = 192.168.100.20\n";
        let s = VmSettings::parse(old, Path::new("vm.conf")).unwrap();
        let cards = s.cards();
        assert_eq!(cards.len(), 1);
        assert_eq!(cards[0].net, NetChoice::Lab("lab".into()));
        assert_eq!(cards[0].forwards.len(), 1);
        assert_eq!(cards[0].mac, Some([0x52, 0x54, 0, 1, 2, 3]));
        assert_eq!(cards[0].ip, Some(Ipv4Addr::new(192, 168, 100, 20)));
        assert_eq!(VmSettings::default().cards()[0].net, NetChoice::User);
        let two = format!("{old}net = tap:tap0\nmac = 52:54:00:01:02:04\ncpus = 2\n");
        let s = VmSettings::parse(&two, Path::new("vm.conf")).unwrap();
        assert_eq!(s.cpus, 2, "VM-wide keys stay VM-wide after a card");
        let cards = s.cards();
        assert_eq!(cards[1].net, NetChoice::Tap("tap0".into()));
        assert_eq!(cards[1].mac, Some([0x52, 0x54, 0, 1, 2, 4]));
        assert_eq!(cards[0].mac, Some([0x52, 0x54, 0, 1, 2, 3]));
        let mut back = VmSettings::default();
        back.set_cards(cards.clone());
        assert_eq!(back.cards(), cards);
        back.set_cards(Vec::new());
        assert_eq!(back.net, NetChoice::None);
        assert!(back.cards().is_empty());
        assert!(back.render().contains("net = none"));
    }

    #[test]
    fn comments_blanks_and_spacing_are_fine() {
        let text = "\n# hi\n  cpus=3  \nmem =  256M\n";
        let s = VmSettings::parse(text, Path::new("c")).unwrap();
        assert_eq!((s.cpus, s.mem), (3, ByteSize(256 << 20)));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        for (text, needle) in [
            ("cpus = 0", "cpus '0'"),
            ("cpus = 300", "cpus '300'"),
            ("mem = lots", "mem:"),
            ("forward = tcp:99999:22", "invalid forward"),
            ("mac = 52:54", "mac '52:54'"),
            ("colour = blue", "unknown key 'colour'"),
            ("flavor = fat", "flavor 'fat' is not 'lean' or 'full'"),
            (
                "on-reboot = halt",
                "on-reboot 'halt' is not 'restart' or 'exit'",
            ),
            ("outbound = world", "outbound 'world'"),
            ("host_loopback = 0", "host loopback '0'"),
            ("net = Lab!", "net 'Lab!'"),
            ("net = tap:a/b", "net 'tap:a/b'"),
            ("ip = 300.1.1.1", "ip '300.1.1.1'"),
            ("just words", "expected 'key = value'"),
        ] {
            let err = VmSettings::parse(&format!("# c\n{text}\n"), Path::new("/v/vm.conf"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("/v/vm.conf:2: "), "{err}");
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn derived_macs_are_stable_local_and_differ_by_name() {
        let a = derived_mac("vm1");
        assert_eq!(a, derived_mac("vm1"));
        assert_ne!(a, derived_mac("vm2"));
        assert_eq!(&a[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(parse_mac(&format_mac(&a)), Some(a));
        let s = VmSettings::default();
        assert_eq!(s.mac_for("vm1"), a);
        assert_eq!(parse_mac("52:54:00:00:00"), None);
        assert_eq!(parse_mac("52:54:00:00:00:00:00"), None);
        assert_eq!(parse_mac("52:54:00:00:00:zz"), None);
    }
}
