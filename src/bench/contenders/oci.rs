//! What the container contenders share: finding runc (and being allowed
//! to run it), an OCI bundle made from `runc spec`'s default (what
//! Docker-style runtimes give a container: namespaces, capabilities, masked
//! paths) adapted by each contender, and container names and clean-up.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::bench::contender::Missing;
use crate::bench::process::find_program;

const RUNC: &str = "runc";

/// runc on PATH, when this process may run containers (root: rootless
/// containers are not set up).
pub fn find_runc() -> Result<PathBuf, Missing> {
    let runc = find_program(RUNC).ok_or_else(|| {
        Missing(format!(
            "{RUNC} not found on PATH (Debian: apt-get install runc)"
        ))
    })?;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        return Err(Missing(
            "runc needs root here (rootless containers are not set up): run as root".into(),
        ));
    }
    Ok(runc)
}

/// `runc spec`'s default configuration, made in `bundle` and read back.
pub fn default_spec(runc: &Path, bundle: &Path) -> Result<Value, Missing> {
    let _ = std::fs::remove_file(config_path(bundle));
    let out = Command::new(runc)
        .args(["spec", "--bundle"])
        .arg(bundle)
        .output()
        .map_err(|e| Missing(format!("cannot run runc spec: {e}")))?;
    if !out.status.success() {
        return Err(Missing(format!(
            "runc spec failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let config = config_path(bundle);
    std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| Missing(format!("runc spec wrote no readable {}", config.display())))
}

fn config_path(bundle: &Path) -> PathBuf {
    bundle.join("config.json")
}

/// Writes `spec` as the bundle's configuration.
pub fn write_spec(bundle: &Path, spec: &Value) -> Result<(), String> {
    let config = config_path(bundle);
    let text = serde_json::to_string_pretty(spec).expect("JSON values serialise");
    std::fs::write(&config, text).map_err(|e| format!("cannot write {}: {e}", config.display()))
}

/// The process section of a spec, for a contender to adapt.
pub fn process(spec: &mut Value) -> Result<&mut serde_json::Map<String, Value>, String> {
    spec.get_mut("process")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| "runc spec gave no process section".to_string())
}

/// Adds `vars` to the process environment.
pub fn add_env(spec: &mut Value, vars: &[String]) -> Result<(), String> {
    let env = process(spec)?
        .entry("env")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or("runc spec's process.env is not a list")?;
    env.extend(vars.iter().cloned().map(Value::String));
    Ok(())
}

/// A container name unique to this process and sample.
pub fn container_id(kind: &str, count: usize) -> String {
    format!("vmlab-bench-{kind}-{}-{count}", std::process::id())
}

/// Removes container `id` whatever its state (a runc killed at a time
/// limit can leave it behind).
pub fn delete(runc: &Path, id: &str) {
    let _ = Command::new(runc)
        .args(["delete", "--force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn adds_to_the_environment_and_refuses_a_spec_without_a_process() {
        let mut spec = json!({ "process": { "env": ["PATH=/bin"] } });
        add_env(&mut spec, &["A=1".to_string()]).unwrap();
        assert_eq!(spec["process"]["env"], json!(["PATH=/bin", "A=1"]));
        let mut bare = json!({ "process": {} });
        add_env(&mut bare, &["B=2".to_string()]).unwrap();
        assert_eq!(bare["process"]["env"], json!(["B=2"]));
        assert!(add_env(&mut json!({}), &[]).is_err());
        assert!(add_env(&mut json!({ "process": { "env": 3 } }), &[]).is_err());
    }

    #[test]
    fn container_ids_differ_per_kind_and_sample() {
        let a = container_id("init", 1);
        assert_ne!(a, container_id("init", 2));
        assert_ne!(a, container_id("sshd", 1));
        assert!(a.starts_with("vmlab-bench-init-"));
    }
}
