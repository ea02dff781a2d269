//! A VM's identity as the Debian guest's init reads it: the kernel command
//! line parameters `vmlab.hostname`, `vmlab.ssh_key` and `vmlab.instance`
//! (see guest/debian/rootfs/sbin/vmlab-init).
//!
//! Why the command line rather than a config disk: it needs no second
//! device, it is there before the init runs its first command, and it only
//! ever carries public data (a public key is ~100 bytes, far below the
//! kernel's 2048-byte limit). The key is base64-encoded because a key line
//! has spaces and the kernel splits parameters on them.

use base64::Engine as _;

use super::ImageError;

/// The longest public key line accepted: keeps the command line well under
/// the kernel's 2048 bytes (an Ed25519 line is about 100 bytes, an RSA-4096
/// one about 750).
const MAX_KEY_LINE: usize = 1024;

/// What makes a VM itself inside the Debian guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestIdentity {
    hostname: String,
    ssh_public_key: String,
    instance: Option<String>,
}

impl GuestIdentity {
    /// `hostname` must be an RFC 1123 label (a VM name); `ssh_public_key`
    /// one OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
    pub fn new(hostname: &str, ssh_public_key: &str) -> Result<Self, ImageError> {
        check_hostname(hostname)?;
        let key = ssh_public_key.trim();
        check_public_key(key)?;
        Ok(GuestIdentity {
            hostname: hostname.to_string(),
            ssh_public_key: key.to_string(),
            instance: None,
        })
    }

    /// An id unique to this VM (letters, digits, '-'; at most 64): when a
    /// disk boots with an id other than its last one, it is a clone and
    /// makes itself a new machine-id and new SSH host keys.
    pub fn with_instance(mut self, instance: &str) -> Result<Self, ImageError> {
        let ok = !instance.is_empty()
            && instance.len() <= 64
            && instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(ImageError::InvalidIdentity(format!(
                "instance id {instance:?} must be 1 to 64 letters, digits or '-'"
            )));
        }
        self.instance = Some(instance.to_string());
        Ok(self)
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    pub fn ssh_public_key(&self) -> &str {
        &self.ssh_public_key
    }

    /// The kernel command line parameters carrying this identity.
    pub fn cmdline_params(&self) -> Vec<String> {
        let key = base64::engine::general_purpose::STANDARD.encode(&self.ssh_public_key);
        let mut params = vec![
            format!("vmlab.hostname={}", self.hostname),
            format!("vmlab.ssh_key={key}"),
        ];
        if let Some(instance) = &self.instance {
            params.push(format!("vmlab.instance={instance}"));
        }
        params
    }
}

/// Checks that `name` is an RFC 1123 host label: 1 to 63 letters, digits
/// and '-', not starting or ending with '-'.
pub fn check_hostname(name: &str) -> Result<(), ImageError> {
    let bad = |why: &str| {
        Err(ImageError::InvalidIdentity(format!(
            "{name:?} cannot be a hostname: {why}; use 1 to 63 letters, digits or '-'"
        )))
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it starts or ends with '-'");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return bad(&format!("it contains {c:?}"));
    }
    Ok(())
}

/// Checks that `line` looks like one OpenSSH public key line: a key type,
/// base64 key data, an optional comment, no line breaks.
fn check_public_key(line: &str) -> Result<(), ImageError> {
    let bad = |why: &str| {
        Err(ImageError::InvalidIdentity(format!(
            "not an OpenSSH public key line ({why}): give the contents of a .pub file"
        )))
    };
    if line.len() > MAX_KEY_LINE {
        return bad("longer than 1024 bytes");
    }
    if line.contains(['\n', '\r', '\0']) {
        return bad("more than one line");
    }
    let mut words = line.split_ascii_whitespace();
    let kind = words.next().unwrap_or_default();
    // The init accepts the same prefixes.
    if !["ssh-", "ecdsa-", "sk-"]
        .iter()
        .any(|p| kind.starts_with(p))
    {
        return bad("no ssh-*, ecdsa-* or sk-* key type first");
    }
    match words.next() {
        Some(data)
            if base64::engine::general_purpose::STANDARD
                .decode(data)
                .is_ok() =>
        {
            Ok(())
        }
        _ => bad("no base64 key data after the type"),
    }
}

/// The value of `name=` in a kernel command line, as the guest's init finds
/// it (the first occurrence).
pub fn cmdline_param<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC2x8Jf2Yy0fLQ8XIbRp1gqG2hH2Qm2m6u7pU4bJzY5A vmlab@host";

    #[test]
    fn params_carry_the_name_and_the_key_without_spaces() {
        let id = GuestIdentity::new("vm1", KEY).unwrap();
        let params = id.cmdline_params();
        assert_eq!(params.len(), 2);
        assert!(params.iter().all(|p| !p.contains(char::is_whitespace)));
        let cmdline = format!("console=ttyS0 root=/dev/vda {}", params.join(" "));
        assert_eq!(cmdline_param(&cmdline, "vmlab.hostname"), Some("vm1"));
        let encoded = cmdline_param(&cmdline, "vmlab.ssh_key").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, KEY.as_bytes());
    }

    #[test]
    fn instance_is_optional_and_checked() {
        let id = GuestIdentity::new("vm2", KEY)
            .unwrap()
            .with_instance("3f2a-91")
            .unwrap();
        let cmdline = id.cmdline_params().join(" ");
        assert_eq!(cmdline_param(&cmdline, "vmlab.instance"), Some("3f2a-91"));
        for bad in ["", "a b", "x;reboot", &"a".repeat(65)] {
            let err = GuestIdentity::new("vm2", KEY)
                .unwrap()
                .with_instance(bad)
                .unwrap_err();
            assert!(err.to_string().contains("instance id"), "{err}");
        }
    }

    #[test]
    fn hostnames_are_rfc1123_labels() {
        for good in ["vm1", "a", "Lab-VM-2", &"x".repeat(63)] {
            check_hostname(good).unwrap();
        }
        for bad in [
            "",
            "-vm",
            "vm-",
            "vm_1",
            "vm.lab",
            "vm 1",
            "vm\n1",
            &"x".repeat(64),
        ] {
            let err = check_hostname(bad).unwrap_err().to_string();
            assert!(err.contains("cannot be a hostname"), "{bad:?}: {err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
    }

    #[test]
    fn public_keys_must_be_one_openssh_line() {
        GuestIdentity::new("vm", &format!("{KEY}\n")).expect("a trailing newline is trimmed");
        GuestIdentity::new("vm", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5").expect("no comment");
        for bad in [
            "",
            "AAAAC3NzaC1lZDI1NTE5 vmlab",
            "ssh-ed25519",
            "ssh-ed25519 not*base64",
            &format!("{KEY}\n{KEY}"),
            &format!("ssh-rsa AAAA {}", "c".repeat(1100)),
            "-----BEGIN OPENSSH PRIVATE KEY-----",
        ] {
            let err = GuestIdentity::new("vm", bad).unwrap_err().to_string();
            assert!(
                err.contains("not an OpenSSH public key line"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn cmdline_param_matches_whole_names_only() {
        let cmdline = "vmlab.hostnamex=no vmlab.hostname=yes vmlab.hostname=second";
        assert_eq!(cmdline_param(cmdline, "vmlab.hostname"), Some("yes"));
        assert_eq!(cmdline_param(cmdline, "vmlab.ssh_key"), None);
        assert_eq!(cmdline_param("a=b=c", "a"), Some("b=c"));
    }
}
