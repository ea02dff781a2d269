//! The container to ssh-ready: `runc run` of an OCI bundle whose root
//! filesystem is the Debian image's own (copied out once, in `prepare`),
//! doing what the guest's init does for ssh: new Ed25519 and ECDSA host
//! keys (the guest's two; `ssh-keygen -A` would add an RSA key, the
//! slowest to make), the user's key for root, then sshd, timed to the
//! first successful `ssh true`. The process writes one byte on its stdout
//! first, which splits the time: runc start to the container's process,
//! then to ssh-ready.
//!
//! Network: the container shares the host's network namespace (Docker's
//! `--network host`) and sshd listens on a free port of 127.0.0.1. A
//! private namespace would need a port forwarder in front (docker-proxy,
//! slirp4netns, pasta) that is a program of its own to start and to time;
//! without it the container's figure is its lower bound: the fairest
//! comparison for the VMs, whose NAT and forward are counted in full.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::debian::DebianGuest;
use super::oci;
use super::rootfs;
use super::ssh_probe::SshProbe;
use super::ssh_run::{log_file, SshRun};
use crate::bench::contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};

/// The container's process: the ssh part of the Debian guest's init
/// (guest/debian/rootfs/sbin/vmlab-init), then sshd in the foreground as
/// the container's PID 1, with the image's sshd configuration.
const SSHD_SCRIPT: &str = r#"printf U
rm -f /etc/ssh/ssh_host_*
for type in ed25519 ecdsa; do
    ssh-keygen -q -t "$type" -N '' -C root@vmlab-bench -f "/etc/ssh/ssh_host_${type}_key" || exit 1
done
mkdir -p -m 700 /root/.ssh
printf '%s\n' "$VMLAB_SSH_KEY" >/root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
mkdir -p /run/sshd
chmod 0755 /run/sshd
exec /usr/sbin/sshd -D -e -o "ListenAddress=127.0.0.1:$VMLAB_SSH_PORT"
"#;

/// Docker's default capabilities: sshd needs more than `runc spec`'s three
/// (chroot and setuid for its privilege separation), and this is what a
/// container gets from the runtime people compare VMs with.
const DOCKER_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

pub struct RuncSshd {
    guest: DebianGuest,
    dir: PathBuf,
    prepared: Option<(PathBuf, Value)>,
    count: usize,
}

impl RuncSshd {
    pub fn new(guest: DebianGuest, dir: PathBuf) -> Self {
        RuncSshd {
            guest,
            dir,
            prepared: None,
            count: 0,
        }
    }

    fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
}

/// Turns `runc spec`'s default into the sshd container's (the parts every
/// sample shares): the script as the process, no terminal, a writable
/// root, the host's network namespace, Docker's capabilities.
fn adapt_spec(spec: &mut Value) -> Result<(), String> {
    let process = oci::process(spec)?;
    process.insert("terminal".into(), json!(false));
    process.insert("args".into(), json!(["/bin/sh", "-c", SSHD_SCRIPT]));
    let caps = json!(DOCKER_CAPABILITIES);
    process.insert(
        "capabilities".into(),
        json!({ "bounding": caps, "effective": caps, "permitted": caps }),
    );
    spec["root"] = json!({ "path": "rootfs", "readonly": false });
    spec["hostname"] = json!("vmlab-bench");
    let namespaces = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
        .ok_or("runc spec gave no linux.namespaces list")?;
    namespaces.retain(|ns| ns["type"] != "network");
    Ok(())
}

/// The spec of one sample: the shared one with the port and the key.
fn sample_spec(shared: &Value, port: u16, public_key: &str) -> Result<Value, String> {
    let mut spec = shared.clone();
    oci::add_env(
        &mut spec,
        &[
            format!("VMLAB_SSH_PORT={port}"),
            format!("VMLAB_SSH_KEY={public_key}"),
        ],
    )?;
    Ok(spec)
}

impl Contender for RuncSshd {
    fn describe(&self) -> Description {
        Description::new(
            "runc-sshd",
            "runc → sshd answering",
            Goal::SshReady,
            Role::Container,
            &["runc start to process", "process to ssh-ready"],
        )
    }
    fn prepare(&mut self) -> Result<(), Missing> {
        let spec = self.guest.clone()?;
        let runc = oci::find_runc()?;
        let bundle = self.bundle();
        std::fs::create_dir_all(&bundle)
            .map_err(|e| Missing(format!("cannot create {}: {e}", bundle.display())))?;
        let rootfs = bundle.join("rootfs");
        rootfs::extract(&spec.base, &self.dir.join("rootfs.raw"), &rootfs)
            .map_err(|e| Missing(format!("cannot unpack the Debian image: {e}")))?;
        if !rootfs.join("usr/sbin/sshd").is_file() {
            return Err(Missing(format!(
                "the Debian image {} has no /usr/sbin/sshd",
                spec.base.display()
            )));
        }
        let mut default = oci::default_spec(&runc, &bundle)?;
        adapt_spec(&mut default).map_err(Missing)?;
        self.prepared = Some((runc, default));
        Ok(())
    }
    fn sample(&mut self) -> Result<Sample, SampleError> {
        let (Ok(spec), Some((runc, shared))) = (&self.guest, &self.prepared) else {
            return Err(SampleError::new("runc was not prepared"));
        };
        self.count += 1;
        let bundle = self.bundle();
        let probe = SshProbe::for_sample(&spec.ssh, &spec.key.private_key, &self.dir)?;
        let config =
            sample_spec(shared, probe.port, &spec.key.public_key).map_err(SampleError::new)?;
        oci::write_spec(&bundle, &config).map_err(SampleError::new)?;
        let stderr = self.dir.join("runc.stderr");
        let id = oci::container_id("sshd", self.count);
        let mut command = Command::new(runc);
        command
            .arg("run")
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&stderr)?);
        let run = SshRun {
            what: "runc",
            probe: &probe,
            logs: vec![stderr],
        };
        let times = run.run(command, |_| {
            let _ = Command::new(runc)
                .args(["kill", &id, "KILL"])
                .stderr(Stdio::null())
                .status();
        });
        // Whatever happened, no container is left behind.
        oci::delete(runc, &id);
        let times = times?;
        Ok(Sample {
            phases: times.split_at_marker("runc", "the container process's start byte")?,
            metrics: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_like() -> Value {
        json!({
            "process": { "terminal": true, "args": ["sh"], "env": ["PATH=/bin"],
                         "capabilities": { "bounding": ["CAP_KILL"] } },
            "root": { "path": "rootfs", "readonly": true },
            "linux": { "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "mount" }
            ] }
        })
    }

    #[test]
    fn shares_the_host_network_with_dockers_capabilities() {
        let mut spec = default_like();
        adapt_spec(&mut spec).unwrap();
        assert_eq!(spec["process"]["terminal"], json!(false));
        assert_eq!(spec["process"]["args"][0], "/bin/sh");
        assert_eq!(spec["root"]["readonly"], json!(false));
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{ "type": "pid" }, { "type": "mount" }])
        );
        let effective = spec["process"]["capabilities"]["effective"]
            .as_array()
            .unwrap();
        for cap in ["CAP_SYS_CHROOT", "CAP_SETUID", "CAP_SETGID"] {
            assert!(effective.contains(&json!(cap)), "{cap}");
        }
        assert!(adapt_spec(&mut json!({ "process": {} })).is_err());
    }

    #[test]
    fn each_sample_gets_its_port_and_the_users_key() {
        let mut shared = default_like();
        adapt_spec(&mut shared).unwrap();
        let spec = sample_spec(&shared, 40024, "ssh-ed25519 AAAA vmlab").unwrap();
        let env = spec["process"]["env"].as_array().unwrap();
        assert!(env.contains(&json!("VMLAB_SSH_PORT=40024")));
        assert!(env.contains(&json!("VMLAB_SSH_KEY=ssh-ed25519 AAAA vmlab")));
        assert_eq!(
            shared["process"]["env"],
            json!(["PATH=/bin"]),
            "shared spec untouched"
        );
    }

    /// The script's ssh part, run with a fake root: it makes the host keys
    /// the guest makes and installs the key (sshd itself is not run here).
    #[test]
    fn the_script_makes_host_keys_and_installs_the_users_key() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let script = SSHD_SCRIPT
            .replace(" /etc/", &format!(" {}/etc/", root.display()))
            .replace("\"/etc/", &format!("\"{}/etc/", root.display()))
            .replace("/root/.ssh", &format!("{}/root/.ssh", root.display()))
            .replace("/run/sshd", &format!("{}/run/sshd", root.display()))
            .replace("exec /usr/sbin/sshd", "echo sshd");
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        std::fs::write(root.join("etc/ssh/ssh_host_rsa_key"), "stale").unwrap();
        let out = Command::new("sh")
            .args(["-c", &script])
            .env("VMLAB_SSH_KEY", "ssh-ed25519 AAAA vmlab")
            .env("VMLAB_SSH_PORT", "40025")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with('U'),
            "the start byte comes first: {stdout}"
        );
        assert!(stdout.contains("ListenAddress=127.0.0.1:40025"), "{stdout}");
        let mut keys: Vec<String> = std::fs::read_dir(root.join("etc/ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "ssh_host_ecdsa_key",
                "ssh_host_ecdsa_key.pub",
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(root.join("root/.ssh/authorized_keys")).unwrap(),
            "ssh-ed25519 AAAA vmlab\n"
        );
        assert!(root.join("run/sshd").is_dir());
    }
}
