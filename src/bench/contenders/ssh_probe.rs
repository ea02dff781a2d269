//! The ssh-ready signal: the system `ssh` running `true` as root on a
//! forwarded loopback port, tried again and again until it succeeds, the
//! same way a user would find out that a machine is reachable.

use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::scratch::ScratchFile;
use crate::bench::contender::SampleError;
use crate::bench::process::wait_with_limit;

/// Pause between failed tries: short against a boot, long enough not to
/// load the machine being measured with ssh processes.
const RETRY_PAUSE: Duration = Duration::from_millis(150);
/// Bounds the TCP connect and the banner exchange of one try: a forwarded
/// connection can be accepted on the host and then held while the guest's
/// network is not up yet. Generous, since under CPU emulation a nested
/// guest's sshd takes seconds to answer.
const CONNECT_TIMEOUT_S: u32 = 10;
/// Bounds one whole try (key exchange, login, `true`).
const TRY_LIMIT: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1, as the kernel hands out for port 0: the
/// listener is closed at once, so the server started next can bind it
/// (a race with other programs is possible but rare, and a server that
/// loses it fails its start with the port named).
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `ssh -p PORT root@127.0.0.1 true` with the user's key, in batch mode.
#[derive(Debug)]
pub struct SshProbe {
    pub ssh: PathBuf,
    pub key: PathBuf,
    pub port: u16,
    /// A scratch known_hosts: every sample's server has new host keys.
    pub known_hosts: ScratchFile,
}

impl SshProbe {
    /// The probe of one sample: a free port, and an empty known_hosts in
    /// `dir` (removed with the probe).
    pub fn for_sample(ssh: &Path, key: &Path, dir: &Path) -> Result<SshProbe, SampleError> {
        let port = free_port().map_err(|e| SampleError::new(format!("no free port: {e}")))?;
        let known_hosts = ScratchFile(dir.join("known_hosts"));
        let _ = std::fs::remove_file(known_hosts.path());
        Ok(SshProbe {
            ssh: ssh.to_path_buf(),
            key: key.to_path_buf(),
            port,
            known_hosts,
        })
    }

    /// The arguments of one try. No user configuration (`-F /dev/null`),
    /// only the given key, no prompt of any kind.
    pub fn args(&self) -> Vec<String> {
        let opt = |o: String| ["-o".to_string(), o];
        let mut args = vec![
            "-F".to_string(),
            "/dev/null".to_string(),
            "-i".to_string(),
            self.key.display().to_string(),
            "-p".to_string(),
            self.port.to_string(),
        ];
        for o in [
            "BatchMode=yes".to_string(),
            format!("ConnectTimeout={CONNECT_TIMEOUT_S}"),
            "IdentitiesOnly=yes".to_string(),
            format!("UserKnownHostsFile={}", self.known_hosts.path().display()),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            "StrictHostKeyChecking=no".to_string(),
            "LogLevel=ERROR".to_string(),
        ] {
            args.extend(opt(o));
        }
        args.extend(["root@127.0.0.1".to_string(), "true".to_string()]);
        args
    }

    /// One try: `Ok` when `ssh true` succeeded, else what ssh said.
    fn try_once(&self) -> Result<(), String> {
        let mut child = Command::new(&self.ssh)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.ssh.display()))?;
        let status = wait_with_limit(&mut child, "ssh", TRY_LIMIT).map_err(|e| e.what)?;
        let mut said = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut said);
        }
        if status.success() {
            Ok(())
        } else {
            let line = said.lines().rev().find(|l| !l.trim().is_empty());
            Err(line.map_or_else(|| format!("ssh: {status}"), |l| l.trim().to_string()))
        }
    }

    /// Tries until `ssh true` succeeds and returns that moment. Fails when
    /// `server` (`what`: the VMM or runtime serving the port) ends first, or
    /// at `deadline`, with ssh's last complaint.
    pub fn wait_ready(
        &self,
        server: &mut Child,
        what: &str,
        deadline: Instant,
    ) -> Result<Instant, SampleError> {
        self.wait_while(what, deadline, || match server.try_wait() {
            Ok(Some(status)) => Err(format!("{what} ended ({status})")),
            Ok(None) => Ok(()),
            Err(e) => Err(format!("cannot wait for {what}: {e}")),
        })
    }

    /// As [`wait_ready`](Self::wait_ready) for a server that is not a
    /// child (a detached VM): `alive` says why it is gone, when it is.
    pub fn wait_while(
        &self,
        what: &str,
        deadline: Instant,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> Result<Instant, SampleError> {
        let mut last = String::from("no try finished");
        loop {
            if let Err(gone) = alive() {
                return Err(SampleError::new(format!(
                    "{gone} before ssh on port {} answered (last try: {last})",
                    self.port
                )));
            }
            match self.try_once() {
                Ok(()) => return Ok(Instant::now()),
                Err(e) => last = e,
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(SampleError::new(format!(
                    "no ssh on port {} from {what} within the sample's time limit (last try: {last})",
                    self.port
                )));
            }
            thread::sleep(RETRY_PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(ssh: &str, port: u16) -> SshProbe {
        SshProbe {
            ssh: PathBuf::from(ssh),
            key: PathBuf::from("/k/id_ed25519"),
            port,
            known_hosts: ScratchFile(PathBuf::from("/s/known_hosts")),
        }
    }

    #[test]
    fn args_are_batch_mode_with_the_key_and_a_scratch_known_hosts() {
        let args = probe("ssh", 2345).args().join(" ");
        assert!(
            args.starts_with("-F /dev/null -i /k/id_ed25519 -p 2345 "),
            "{args}"
        );
        for o in [
            "-o BatchMode=yes",
            "-o ConnectTimeout=10",
            "-o IdentitiesOnly=yes",
            "-o UserKnownHostsFile=/s/known_hosts",
            "-o StrictHostKeyChecking=no",
        ] {
            assert!(args.contains(o), "no {o} in {args}");
        }
        assert!(args.ends_with(" root@127.0.0.1 true"), "{args}");
    }

    #[test]
    fn free_port_can_be_bound_again() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the port is free");
    }

    #[test]
    fn a_sample_probe_has_a_free_port_and_its_own_fresh_known_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("known_hosts");
        std::fs::write(&stale, "[127.0.0.1]:2222 ssh-ed25519 AAAA\n").unwrap();
        let probe =
            SshProbe::for_sample(Path::new("ssh"), Path::new("/k/key"), dir.path()).unwrap();
        assert_eq!(probe.known_hosts.path(), stale);
        assert!(!stale.exists(), "last sample's host keys are forgotten");
        TcpListener::bind((Ipv4Addr::LOCALHOST, probe.port)).expect("the port is free");
        std::fs::write(&stale, "x").unwrap();
        drop(probe);
        assert!(!stale.exists(), "removed with the probe");
    }

    #[test]
    fn waits_until_a_try_succeeds() {
        // A stand-in for ssh: fails until a file exists.
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("up");
        let fake = dir.path().join("fake-ssh");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\n[ -e {} ] || {{ echo 'Connection refused' >&2; exit 255; }}\n",
                flag.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut server = Command::new("sleep").arg("30").spawn().unwrap();
        let up = flag.clone();
        let start = Instant::now();
        let maker = thread::spawn(move || {
            thread::sleep(Duration::from_millis(400));
            std::fs::write(up, "").unwrap();
        });
        let probe = probe(fake.to_str().unwrap(), 1);
        let ready = probe
            .wait_ready(&mut server, "sleep", start + Duration::from_secs(20))
            .unwrap();
        maker.join().unwrap();
        assert!(ready - start >= Duration::from_millis(400));
        assert!(ready - start < Duration::from_secs(5));

        // Never up: the deadline ends it, with ssh's complaint.
        std::fs::remove_file(&flag).unwrap();
        let err = probe
            .wait_ready(
                &mut server,
                "sleep",
                Instant::now() + Duration::from_millis(500),
            )
            .unwrap_err();
        assert!(err.what.contains("within the sample's time limit"), "{err}");
        assert!(err.what.contains("Connection refused"), "{err}");
        let _ = server.kill();
        let _ = server.wait();
    }

    #[test]
    fn a_server_that_ends_fails_the_wait_at_once() {
        let mut server = Command::new("true").spawn().unwrap();
        server.wait().unwrap();
        let start = Instant::now();
        let err = probe("/bin/false", 1)
            .wait_ready(&mut server, "the VMM", start + Duration::from_secs(20))
            .unwrap_err();
        assert!(err.what.starts_with("the VMM ended"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
