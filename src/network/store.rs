//! Where a lab network lives on disk: its definition, leases and
//! namespace members under `$XDG_DATA_HOME/vmlab/networks/NAME/`, its
//! socket `$XDG_RUNTIME_DIR/vmlab/net-NAME.sock`. Whether its process
//! runs is decided by a lock it holds for its life (as for named VMs), so
//! a killed network process is seen as stopped at once.
//!
//! `network.conf`, one `key = value` a line:
//!
//! ```text
//! subnet = 192.168.100.0/24
//! nat = yes
//! ```

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::error::{NetworkError, Result};
use super::subnet::{Subnet, USER_NET};
use crate::control::VmName;

/// A network's definition: what `network create` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkDef {
    pub subnet: Subnet,
    /// NAT to the outside (`--no-nat` clears it).
    pub nat: bool,
}

impl NetworkDef {
    pub fn render(&self) -> String {
        let mut out = String::from("# vmlab network (recreate it to change it)\n");
        let _ = writeln!(out, "subnet = {}", self.subnet);
        let _ = writeln!(out, "nat = {}", if self.nat { "yes" } else { "no" });
        out
    }

    pub fn parse(text: &str, path: &Path) -> Result<NetworkDef> {
        let (mut subnet, mut nat) = (None, true);
        let config = |line: usize, message: String| NetworkError::Config {
            path: path.to_path_buf(),
            line,
            message,
        };
        for entry in crate::key_value::entries(text) {
            let entry = entry.map_err(|(line, message)| config(line, message))?;
            let err = |message: String| config(entry.line, message);
            match (entry.key, entry.value) {
                ("subnet", v) => subnet = Some(v.parse().map_err(|e| err(format!("{e}")))?),
                ("nat", "yes") => nat = true,
                ("nat", "no") => nat = false,
                ("nat", v) => return Err(err(format!("nat '{v}' is not yes or no"))),
                (other, _) => return Err(err(format!("unknown key '{other}'"))),
            }
        }
        let subnet = subnet.ok_or_else(|| NetworkError::Config {
            path: path.to_path_buf(),
            line: 0,
            message: "no subnet".into(),
        })?;
        Ok(NetworkDef { subnet, nat })
    }
}

/// A network's name: the rules of VM names (it is also a DNS domain),
/// and never `user` or `none`, which `--net` means otherwise.
pub fn parse_name(name: &str) -> Result<String> {
    if matches!(name, "user" | "none") {
        return Err(NetworkError::BadName {
            name: name.to_string(),
            why: "it means something else to --net".into(),
        });
    }
    name.parse::<VmName>()
        .map(|n| n.to_string())
        .map_err(|e| match e {
            crate::control::ControlError::BadName { why, .. } => NetworkError::BadName {
                name: name.escape_default().to_string(),
                why,
            },
            other => NetworkError::BadName {
                name: name.escape_default().to_string(),
                why: other.to_string(),
            },
        })
}

/// One network's files.
#[derive(Clone, Debug)]
pub struct NetworkDir {
    name: String,
    dir: PathBuf,
}

fn networks_dir() -> PathBuf {
    crate::dirs::data_dir().join("networks")
}

/// The running network process's claim on its network.
pub struct DaemonLock(#[allow(dead_code)] Flock<File>);

impl NetworkDir {
    /// Locates network `name` (validated); touches nothing.
    pub fn named(name: &str) -> Result<NetworkDir> {
        let name = parse_name(name)?;
        Ok(NetworkDir {
            dir: networks_dir().join(&name),
            name,
        })
    }

    /// An existing network, or a clear error.
    pub fn existing(name: &str) -> Result<NetworkDir> {
        let net = NetworkDir::named(name)?;
        if !net.config_path().is_file() {
            return Err(NetworkError::NotFound(net.name));
        }
        Ok(net)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("network.conf")
    }
    /// DHCP leases, kept across restarts of the network.
    pub fn leases_path(&self) -> PathBuf {
        self.dir.join("leases")
    }
    /// Namespace members, re-attached when a killed network restarts.
    pub fn members_path(&self) -> PathBuf {
        self.dir.join("namespaces")
    }
    /// The network process's messages.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("network.log")
    }
    fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }
    /// Serializes starting the network process.
    pub fn start_lock_path(&self) -> PathBuf {
        self.dir.join("start.lock")
    }
    pub fn socket_path(&self) -> PathBuf {
        crate::dirs::runtime_dir().join(format!("net-{}.sock", self.name))
    }
    /// Where QEMU guests connect (`-netdev stream`): every connection is
    /// a member, its frames in QEMU's framing without vnet headers.
    pub fn qemu_socket_path(&self) -> PathBuf {
        crate::dirs::runtime_dir().join(format!("net-{}.qemu.sock", self.name))
    }

    pub fn load(&self) -> Result<NetworkDef> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(NetworkError::io(
            "cannot read the network definition",
            &path,
        ))?;
        NetworkDef::parse(&text, &path)
    }

    /// Every network, sorted by name.
    pub fn list() -> Result<Vec<NetworkDir>> {
        let root = networks_dir();
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(NetworkError::io("cannot list", &root)(e)),
        };
        let mut nets: Vec<NetworkDir> = entries
            .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_string))
            .filter_map(|name| NetworkDir::named(&name).ok())
            .filter(|n| n.config_path().is_file())
            .collect();
        nets.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nets)
    }

    /// Creates the network: `subnet` or the first free /24. Refuses a
    /// name that exists and a subnet overlapping another network's or
    /// `--net user`'s; nothing is left behind on failure.
    pub fn create(&self, subnet: Option<Subnet>, nat: bool) -> Result<NetworkDef> {
        let root = networks_dir();
        std::fs::create_dir_all(&root).map_err(NetworkError::io("cannot create", &root))?;
        // One create at a time: two must not take the same subnet.
        let _serial = lock_file(&root.join(".create.lock"), FlockArg::LockExclusive)?;
        if self.config_path().is_file() {
            return Err(NetworkError::Exists(self.name.clone()));
        }
        let others: Vec<(String, Subnet)> = NetworkDir::list()?
            .into_iter()
            .filter_map(|n| n.load().ok().map(|d| (n.name, d.subnet)))
            .collect();
        let subnet = match subnet {
            Some(s) => {
                let clash = others
                    .iter()
                    .map(|(n, o)| (n.as_str(), *o))
                    .chain([("--net user", USER_NET)])
                    .find(|(_, o)| o.overlaps(&s));
                if let Some((other, o)) = clash {
                    return Err(NetworkError::Overlap {
                        subnet: s.to_string(),
                        other: other.to_string(),
                        other_subnet: o.to_string(),
                    });
                }
                s
            }
            None => {
                let taken: Vec<Subnet> = others.iter().map(|(_, s)| *s).collect();
                Subnet::first_free(&taken).ok_or(NetworkError::NoFreeSubnet)?
            }
        };
        let def = NetworkDef { subnet, nat };
        std::fs::create_dir_all(&self.dir).map_err(NetworkError::io("cannot create", &self.dir))?;
        let path = self.config_path();
        if let Err(e) = crate::fsutil::write_atomically(&path, def.render().as_bytes()) {
            let _ = std::fs::remove_dir_all(&self.dir);
            return Err(NetworkError::io("cannot write", &path)(e));
        }
        Ok(def)
    }

    /// Every guest network but this one: the other lab networks and
    /// `--net user`'s, which its NAT must not reach.
    pub fn other_subnets(&self) -> Vec<Subnet> {
        let mut others: Vec<Subnet> = NetworkDir::list()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.name != self.name)
            .filter_map(|n| n.load().ok().map(|d| d.subnet))
            .collect();
        others.push(USER_NET);
        others
    }

    /// Deletes the network; refused while its process runs (it has members).
    pub fn remove(&self) -> Result<()> {
        let held = self.lock_daemon()?.ok_or_else(|| NetworkError::Refused {
            name: self.name.clone(),
            message: "it has members: detach them or stop their VMs first (see vmlab network show)"
                .into(),
        })?;
        let result = std::fs::remove_dir_all(&self.dir)
            .map_err(NetworkError::io("cannot remove", &self.dir));
        drop(held);
        let _ = std::fs::remove_file(self.socket_path());
        let _ = std::fs::remove_file(self.qemu_socket_path());
        result
    }

    /// Whether the network process runs.
    pub fn is_running(&self) -> Result<bool> {
        if !self.dir.is_dir() {
            return Ok(false);
        }
        match lock_file(&self.lock_path(), FlockArg::LockSharedNonblock) {
            Ok(_) => Ok(false),
            Err(NetworkError::Io { source, .. })
                if source.raw_os_error() == Some(Errno::EWOULDBLOCK as i32) =>
            {
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the network for this process (the network process, or `rm`);
    /// None while another holds it.
    pub fn lock_daemon(&self) -> Result<Option<DaemonLock>> {
        match lock_file(&self.lock_path(), FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(Some(DaemonLock(held))),
            Err(NetworkError::Io { source, .. })
                if source.raw_os_error() == Some(Errno::EWOULDBLOCK as i32) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// Opens (creating) and locks `path`.
pub(crate) fn lock_file(path: &Path, how: FlockArg) -> Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(NetworkError::io("cannot open", path))?;
    Flock::lock(file, how).map_err(|(_, e)| NetworkError::Io {
        what: "cannot lock",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::tests::temp_home;

    #[test]
    fn create_picks_free_subnets_and_refuses_overlaps_and_twins() {
        let _home = temp_home();
        let a = NetworkDir::named("lab").unwrap();
        assert_eq!(
            a.create(None, true).unwrap().subnet.to_string(),
            "192.168.100.0/24"
        );
        let b = NetworkDir::named("lab2").unwrap();
        assert_eq!(
            b.create(None, false).unwrap().subnet.to_string(),
            "192.168.101.0/24"
        );
        let err = a.create(None, true).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        let c = NetworkDir::named("c").unwrap();
        let err = c
            .create(Some("192.168.0.0/16".parse().unwrap()), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlaps lab's 192.168.100.0/24"), "{err}");
        let err = c
            .create(Some("10.0.0.0/16".parse().unwrap()), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--net user"), "{err}");
        assert!(!c.path().exists(), "nothing half-made");
        let names: Vec<_> = NetworkDir::list()
            .unwrap()
            .iter()
            .map(|n| n.name().to_string())
            .collect();
        assert_eq!(names, ["lab", "lab2"]);
        assert!(!b.load().unwrap().nat);
        assert!(!a.is_running().unwrap());
        a.remove().unwrap();
        assert!(NetworkDir::existing("lab").is_err());
    }

    #[test]
    fn a_running_network_is_not_removed_and_names_are_checked() {
        let _home = temp_home();
        let a = NetworkDir::named("lab").unwrap();
        a.create(None, true).unwrap();
        let held = a.lock_daemon().unwrap().unwrap();
        assert!(a.is_running().unwrap());
        let err = a.remove().unwrap_err().to_string();
        assert!(err.contains("it has members"), "{err}");
        drop(held);
        for bad in ["user", "none", "Lab", "-x", ""] {
            assert!(NetworkDir::named(bad).is_err(), "{bad}");
        }
        let err = NetworkDir::existing("nope").unwrap_err().to_string();
        assert!(err.contains("no network named nope"), "{err}");
    }
}
