//! The container side: `runc run` (Debian's runc, the runtime Docker uses)
//! of an OCI bundle whose root filesystem is the default guest's initramfs,
//! unpacked. The same /init runs; in a container it learns from its
//! environment (`container=runc`, VMLAB_BOOT_TIMER) to skip the mounts the
//! runtime already made and to write the boot-timer byte to its stdout,
//! where the harness timestamps it (see guest/README.md).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::oci;
use crate::bench::contender::{Contender, Description, Goal, Missing, Role, Sample, SampleError};
use crate::bench::process::MarkerRun;

pub struct Runc {
    initrd: PathBuf,
    dir: PathBuf,
    runc: Option<PathBuf>,
    count: usize,
}

impl Runc {
    /// `initrd`: the root filesystem (a cpio archive, lz4, gzip or plain);
    /// `dir`: where the bundle is built.
    pub fn new(initrd: PathBuf, dir: PathBuf) -> Self {
        Runc {
            initrd,
            dir,
            runc: None,
            count: 0,
        }
    }

    fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
}

/// The decompressor for an initramfs, from its first bytes (`None`: plain cpio).
fn decompressor(magic: &[u8]) -> Result<Option<&'static str>, String> {
    match magic {
        // The legacy lz4 frame, the only one the kernel unpacks.
        [0x02, 0x21, 0x4c, 0x18, ..] => Ok(Some("lz4")),
        [0x1f, 0x8b, ..] => Ok(Some("gzip")),
        [b'0', b'7', b'0', b'7', ..] => Ok(None),
        _ => Err("not a cpio archive (plain, lz4 or gzip)".to_string()),
    }
}

/// Unpacks `initrd` into `rootfs` with the decompressor and cpio.
fn unpack(initrd: &Path, rootfs: &Path) -> Result<(), String> {
    let what = |e: std::io::Error| format!("cannot read {}: {e}", initrd.display());
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut File::open(initrd).map_err(what)?, &mut magic).map_err(what)?;
    let tool = decompressor(&magic).map_err(|e| format!("{}: {e}", initrd.display()))?;
    std::fs::create_dir_all(rootfs)
        .map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
    let input = File::open(initrd).map_err(what)?;
    let mut decomp = None;
    let stdin: Stdio = match tool {
        Some(tool) => {
            let mut child = Command::new(tool)
                .arg("-dc")
                .stdin(input)
                .stdout(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run {tool} (Debian: apt-get install {tool}): {e}"))?;
            let out = child.stdout.take().expect("stdout is piped");
            decomp = Some((tool, child));
            out.into()
        }
        None => input.into(),
    };
    let cpio = Command::new("cpio")
        .args(["-idm", "--quiet", "--no-absolute-filenames"])
        .current_dir(rootfs)
        .stdin(stdin)
        .status()
        .map_err(|e| format!("cannot run cpio (Debian: apt-get install cpio): {e}"))?;
    if let Some((tool, mut child)) = decomp {
        let status = child.wait().map_err(|e| format!("{tool}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "{tool} could not decompress {}: {status}",
                initrd.display()
            ));
        }
    }
    if !cpio.success() {
        return Err(format!(
            "cpio could not unpack {}: {cpio}",
            initrd.display()
        ));
    }
    Ok(())
}

/// Turns `runc spec`'s default into the benchmark's: /init as the
/// process, no terminal, a writable root, and the environment that tells
/// the init where it is.
fn adapt_spec(spec: &mut Value) -> Result<(), String> {
    let process = oci::process(spec)?;
    process.insert("terminal".into(), json!(false));
    process.insert("args".into(), json!(["/init"]));
    oci::add_env(
        spec,
        &[
            "container=runc".to_string(),
            "VMLAB_BENCH=1".to_string(),
            "VMLAB_BOOT_TIMER=/dev/stdout".to_string(),
        ],
    )?;
    spec["root"] = json!({ "path": "rootfs", "readonly": false });
    spec["hostname"] = json!("vmlab");
    Ok(())
}

impl Contender for Runc {
    fn describe(&self) -> Description {
        Description::new(
            "runc-init",
            "runc → init",
            Goal::Init,
            Role::Container,
            &["runc start to init"],
        )
    }
    fn prepare(&mut self) -> Result<(), Missing> {
        let runc = oci::find_runc()?;
        let bundle = self.bundle();
        unpack(&self.initrd, &bundle.join("rootfs")).map_err(Missing)?;
        let mut spec = oci::default_spec(&runc, &bundle)?;
        adapt_spec(&mut spec).map_err(Missing)?;
        oci::write_spec(&bundle, &spec).map_err(Missing)?;
        self.runc = Some(runc);
        Ok(())
    }
    fn sample(&mut self) -> Result<Sample, SampleError> {
        let runc = self
            .runc
            .clone()
            .ok_or_else(|| SampleError::new("runc was not prepared"))?;
        self.count += 1;
        let id = oci::container_id("init", self.count);
        let mut command = Command::new(&runc);
        command
            .arg("run")
            .arg("--bundle")
            .arg(self.bundle())
            .arg(&id);
        let marker = MarkerRun {
            what: "runc",
            marker: "the container init's boot-timer write",
            stderr: self.dir.join("runc.stderr"),
            logs: Vec::new(),
        };
        // The container may outlive a runc killed at the time limit.
        let cleanup = || oci::delete(&runc, &id);
        Ok(Sample {
            phases: vec![marker.run(command, cleanup)?],
            metrics: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_initramfs_formats() {
        assert_eq!(decompressor(&[0x02, 0x21, 0x4c, 0x18]), Ok(Some("lz4")));
        assert_eq!(decompressor(&[0x1f, 0x8b, 8, 0]), Ok(Some("gzip")));
        assert_eq!(decompressor(b"0707"), Ok(None));
        assert!(decompressor(b"\x7fELF").is_err());
    }

    #[test]
    fn adapts_the_default_spec() {
        let mut spec = json!({
            "process": { "terminal": true, "args": ["sh"], "env": ["PATH=/bin"] },
            "root": { "path": "rootfs", "readonly": true },
            "hostname": "runc"
        });
        adapt_spec(&mut spec).unwrap();
        assert_eq!(spec["process"]["terminal"], json!(false));
        assert_eq!(spec["process"]["args"], json!(["/init"]));
        let env = spec["process"]["env"].as_array().unwrap();
        assert!(env.contains(&json!("PATH=/bin")));
        assert!(env.contains(&json!("container=runc")));
        assert!(env.contains(&json!("VMLAB_BOOT_TIMER=/dev/stdout")));
        assert_eq!(spec["root"]["readonly"], json!(false));
        assert!(adapt_spec(&mut json!({})).is_err());
    }

    #[test]
    fn unpacks_a_plain_cpio_archive() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-unpack").unwrap();
        let src = dir.as_path().join("src");
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::write(src.join("etc/hello"), "hello there\n").unwrap();
        let archive = dir.as_path().join("a.cpio");
        let made = Command::new("sh")
            .arg("-c")
            .arg("find . | cpio --quiet -o -H newc > \"$0\"")
            .arg(&archive)
            .current_dir(&src)
            .status()
            .unwrap();
        assert!(made.success());
        let rootfs = dir.as_path().join("rootfs");
        unpack(&archive, &rootfs).unwrap();
        assert_eq!(
            std::fs::read_to_string(rootfs.join("etc/hello")).unwrap(),
            "hello there\n"
        );
        let err = unpack(&src.join("etc/hello"), &rootfs).unwrap_err();
        assert!(err.contains("not a cpio archive"), "{err}");
    }
}
