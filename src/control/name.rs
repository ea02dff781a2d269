//! VM names: they become a directory, a socket file and the guest's
//! hostname, so they follow hostname rules.

use std::fmt;
use std::str::FromStr;

use super::error::ControlError;

/// Longest name accepted: a hostname label fits 63, but socket paths are
/// limited to 108 bytes and names are typed often.
pub const MAX_NAME_LEN: usize = 32;

/// A validated VM name: 1 to 32 lowercase letters, digits and hyphens,
/// starting with a letter or digit and not ending with a hyphen.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmName(String);

impl VmName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VmName {
    type Err = ControlError;

    fn from_str(name: &str) -> Result<Self, ControlError> {
        let bad = |why: &str| ControlError::BadName {
            // Escaped, so the message stays one line whatever was typed.
            name: name.escape_default().to_string(),
            why: why.to_string(),
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(bad(&format!("it is longer than {MAX_NAME_LEN} characters")));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(bad(&format!("'{}' is not allowed", c.escape_default())));
        }
        if name.starts_with('-') || name.ends_with('-') {
            return Err(bad("it starts or ends with '-'"));
        }
        Ok(VmName(name.to_string()))
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_like_names_are_accepted() {
        for name in ["vm1", "a", "web-2", "0vm", &"x".repeat(MAX_NAME_LEN)] {
            assert_eq!(name.parse::<VmName>().unwrap().as_str(), name);
        }
    }

    #[test]
    fn bad_names_give_one_line_saying_why() {
        for (name, why) in [
            ("", "empty"),
            ("VM1", "'V'"),
            ("a/b", "'/'"),
            ("..", "'.'"),
            ("-vm", "starts or ends"),
            ("vm-", "starts or ends"),
            ("vm 1", "' '"),
            ("vm\n", "'\\n'"),
        ] {
            let err = name.parse::<VmName>().unwrap_err().to_string();
            assert!(err.contains(why), "{name:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(long
            .parse::<VmName>()
            .unwrap_err()
            .to_string()
            .contains("longer"));
    }
}
