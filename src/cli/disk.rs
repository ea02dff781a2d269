//! Disk arguments: `PATH[,ro]`, as `vmlab run --disk` takes them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// A disk to give the guest: its image and whether the guest may write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Why a disk argument did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid disk '{spec}': {reason} (expected PATH or PATH,ro, e.g. data.qcow2,ro)")]
pub struct DiskParseError {
    spec: String,
    reason: String,
}

impl FromStr for DiskSpec {
    type Err = DiskParseError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| DiskParseError {
            spec: spec.to_string(),
            reason,
        };
        let mut parts = spec.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(fail("the image path is empty".into()));
        }
        let mut read_only = false;
        for option in parts {
            match option {
                "ro" => read_only = true,
                other => return Err(fail(format!("unknown option '{other}'"))),
            }
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.read_only {
            f.write_str(",ro")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_path_and_read_only() {
        let d: DiskSpec = "data.qcow2".parse().unwrap();
        assert_eq!((d.path, d.read_only), (PathBuf::from("data.qcow2"), false));
        let d: DiskSpec = "/images/base.raw,ro".parse().unwrap();
        assert_eq!(
            (d.path.clone(), d.read_only),
            (PathBuf::from("/images/base.raw"), true)
        );
        assert_eq!(d.to_string(), "/images/base.raw,ro");
    }

    #[test]
    fn refuses_empty_paths_and_unknown_options() {
        let e = "".parse::<DiskSpec>().unwrap_err().to_string();
        assert!(e.contains("path is empty"), "{e}");
        let e = ",ro".parse::<DiskSpec>().unwrap_err().to_string();
        assert!(e.contains("path is empty"), "{e}");
        let e = "a.img,rw".parse::<DiskSpec>().unwrap_err().to_string();
        assert!(e.contains("unknown option 'rw'"), "{e}");
        assert!(e.contains("PATH,ro"), "{e}");
    }
}
