//! The user's SSH key pair for reaching vmlab's VMs: made once with the
//! system `ssh-keygen`, kept in `$XDG_DATA_HOME/vmlab/ssh/id_ed25519`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::lock::BuildLock;
use super::ImageError;

/// The user's key pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserKey {
    /// The private key file (`ssh -i`).
    pub private_key: PathBuf,
    /// The public key line (`ssh-ed25519 AAAA... vmlab`).
    pub public_key: String,
}

/// Where vmlab keeps its SSH files (key pair, known_hosts).
pub fn ssh_dir() -> PathBuf {
    crate::dirs::ssh_dir()
}

/// The user's key pair, made on first use.
pub fn user_key() -> Result<UserKey, ImageError> {
    key_in(&ssh_dir())
}

/// The key pair in `dir`, made if missing or incomplete.
pub fn key_in(dir: &Path) -> Result<UserKey, ImageError> {
    let private_key = dir.join("id_ed25519");
    let public = dir.join("id_ed25519.pub");
    if let Some(key) = read_pair(&private_key, &public) {
        return Ok(key);
    }
    let io = |what: String| move |source| ImageError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("cannot set the mode of {}", dir.display())))?;
    let _lock = BuildLock::acquire(&dir.join(".lock"), "the SSH key")?;
    // Another vmlab may have made it while we waited.
    if let Some(key) = read_pair(&private_key, &public) {
        return Ok(key);
    }

    let tmp = dir.join(format!(".id_ed25519.tmp{}", std::process::id()));
    let mut tmp_pub = tmp.clone().into_os_string();
    tmp_pub.push(".pub");
    let tmp_pub = PathBuf::from(tmp_pub);
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_file(&tmp_pub);
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmlab", "-f"])
        .arg(&tmp)
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ImageError::MissingTool {
                tool: "ssh-keygen",
                package: "openssh-client",
            },
            _ => ImageError::Io {
                what: "cannot run ssh-keygen".into(),
                source,
            },
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&tmp_pub);
        return Err(ImageError::StepFailed {
            step: format!("the SSH key {}", private_key.display()),
            status: output.status.to_string(),
            tail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    // The public half first: a pair counts as made once the private key is
    // in place, so a crash in between leaves a pair that is remade.
    std::fs::rename(&tmp_pub, &public).map_err(io(format!("cannot write {}", public.display())))?;
    std::fs::rename(&tmp, &private_key)
        .map_err(io(format!("cannot write {}", private_key.display())))?;
    log::info!("made the SSH key {}", private_key.display());
    read_pair(&private_key, &public).ok_or_else(|| ImageError::Io {
        what: format!("cannot read {}", public.display()),
        source: std::io::ErrorKind::InvalidData.into(),
    })
}

fn read_pair(private_key: &Path, public: &Path) -> Option<UserKey> {
    if !private_key.is_file() {
        return None;
    }
    let line = std::fs::read_to_string(public).ok()?;
    let line = line.lines().next()?.trim();
    line.starts_with("ssh-ed25519 ").then(|| UserKey {
        private_key: private_key.to_path_buf(),
        public_key: line.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn made_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = dir.path().join("data/vmlab/ssh");
        let key = key_in(&ssh).unwrap();
        assert_eq!(key.private_key, ssh.join("id_ed25519"));
        assert!(key.public_key.starts_with("ssh-ed25519 AAAA"), "{key:?}");
        assert!(key.public_key.ends_with(" vmlab"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&key.private_key), 0o600);
        assert_eq!(mode(&ssh), 0o700);
        // The pair really matches: ssh-keygen derives the same public key.
        let derived = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&key.private_key)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&derived.stdout)
            .starts_with(key.public_key.rsplit_once(' ').unwrap().0));
        let again = key_in(&ssh).unwrap();
        assert_eq!(again, key, "the second call reuses the pair");
        let names: Vec<_> = std::fs::read_dir(&ssh)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(".lock"))
            .collect();
        assert_eq!(names.len(), 2, "no temporary left: {names:?}");
        crate::image::GuestIdentity::new("vm", &key.public_key).expect("usable identity");
    }

    #[test]
    fn a_pair_missing_its_public_half_is_remade() {
        let dir = tempfile::tempdir().unwrap();
        let first = key_in(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("id_ed25519.pub")).unwrap();
        let second = key_in(dir.path()).unwrap();
        assert_ne!(first.public_key, second.public_key);
    }

    #[test]
    fn concurrent_first_uses_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || key_in(&p).unwrap())
            })
            .collect();
        let keys: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(keys.windows(2).all(|w| w[0] == w[1]), "{keys:?}");
    }
}
