//! A named VM's state directory (`$XDG_DATA_HOME/vmlab/vms/NAME`) and its
//! control socket (`$XDG_RUNTIME_DIR/vmlab/NAME.sock`).
//!
//! Whether a VM runs is decided by a lock, not by files that a crash can
//! leave behind: the VM's process holds an exclusive `flock` on `NAME/lock`
//! for its whole life, and the kernel drops it when the process dies however
//! it dies. Anyone else probes with a shared lock: if they get it, no VM
//! runs, and a socket or pid file still there is stale and is removed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::{ControlError, Result};
use super::name::VmName;
use super::settings::VmSettings;

const CONFIG_FILE: &str = "vm.conf";
const LOCK_FILE: &str = "lock";
const PID_FILE: &str = "vmlab.pid";
const SERIAL_LOG: &str = "serial.log";
const VMM_LOG: &str = "vmm.log";
const SECCOMP_RECORD: &str = "seccomp.violation";
/// Where each log rotates; one previous file (`NAME.1`) is kept, so a VM's
/// logs take at most 2 × (8 + 4) MiB whatever its guest does.
pub const SERIAL_LOG_LIMIT: u64 = 8 << 20;
pub const VMM_LOG_LIMIT: u64 = 4 << 20;

/// How long an exclusive lock is retried: probes (`vmlab ps`) hold the
/// shared lock for milliseconds, a running VM forever.
const EXCLUSIVE_RETRY: Duration = Duration::from_secs(2);

/// Where one VM's state lives. Creating the value touches nothing on disk.
#[derive(Clone, Debug)]
pub struct VmDir {
    name: VmName,
    dir: PathBuf,
}

/// Whether a VM's process is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The VM's process holds its lock; its pid, when the file says.
    Running { pid: Option<u32> },
    /// Nothing runs; `cleaned` is true if a crashed run's socket or pid
    /// file was found and removed.
    Stopped { cleaned: bool },
}

/// The running VM's claim on its name, held by its process until it exits.
/// Dropping it removes the socket and pid file, then releases the lock.
pub struct RunLock {
    dir: VmDir,
    _held: Flock<File>,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        self.dir.remove_run_files();
    }
}

impl VmDir {
    pub fn new(name: &VmName) -> VmDir {
        VmDir {
            name: name.clone(),
            dir: crate::dirs::vms_dir().join(name.as_str()),
        }
    }

    /// Parses and validates `name`, then locates its directory.
    pub fn named(name: &str) -> Result<VmDir> {
        Ok(VmDir::new(&name.parse()?))
    }

    /// The directory of an existing VM, or a clear error.
    pub fn existing(name: &str) -> Result<VmDir> {
        let vm = VmDir::named(name)?;
        if !vm.exists() {
            return Err(ControlError::NotFound(name.to_string()));
        }
        Ok(vm)
    }

    pub fn name(&self) -> &VmName {
        &self.name
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }
    /// Everything the guest printed on its serial console.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join(SERIAL_LOG)
    }
    /// vmlab's own messages while the VM ran detached.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join(VMM_LOG)
    }
    /// Why the last run was killed by its seccomp filter; empty otherwise.
    pub fn seccomp_record(&self) -> PathBuf {
        self.dir.join(SECCOMP_RECORD)
    }
    /// The last run's seccomp violation, if it was killed by its filter.
    pub fn seccomp_violation(&self) -> Option<String> {
        crate::seccomp::violation(&self.seccomp_record())
    }
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join(PID_FILE)
    }
    pub fn socket_path(&self) -> PathBuf {
        crate::dirs::runtime_dir().join(format!("{}.sock", self.name))
    }

    /// A VM exists once its configuration file does.
    pub fn exists(&self) -> bool {
        self.config_path().is_file()
    }

    pub fn load_settings(&self) -> Result<VmSettings> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path)
            .map_err(ControlError::io("cannot read the VM configuration", &path))?;
        VmSettings::parse(&text, &path)
    }

    /// Writes the configuration (atomically, owner-only), creating the
    /// directory.
    pub fn save_settings(&self, settings: &VmSettings) -> Result<()> {
        crate::fsutil::create_private_dir(&self.dir).map_err(ControlError::io(
            "cannot create the VM directory",
            &self.dir,
        ))?;
        let path = self.config_path();
        crate::fsutil::write_private(&path, settings.render().as_bytes())
            .map_err(ControlError::io("cannot write the VM configuration", &path))
    }

    fn open_lock(&self) -> Result<File> {
        let path = self.dir.join(LOCK_FILE);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(crate::fsutil::PRIVATE_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(ControlError::io("cannot open the VM lock", &path))
    }

    /// Is the VM running? Cleans what a crashed run left behind.
    pub fn liveness(&self) -> Result<Liveness> {
        if !self.dir.is_dir() {
            return Ok(Liveness::Stopped { cleaned: false });
        }
        let file = self.open_lock()?;
        match Flock::lock(file, FlockArg::LockSharedNonblock) {
            Ok(_shared) => {
                let cleaned = self.remove_run_files();
                if cleaned {
                    log::info!(
                        "{}: removed the socket or pid file of a crashed run",
                        self.name
                    );
                }
                Ok(Liveness::Stopped { cleaned })
            }
            Err((_, Errno::EWOULDBLOCK)) => Ok(Liveness::Running { pid: self.pid() }),
            Err((_, e)) => Err(ControlError::Io {
                what: "cannot lock",
                path: self.dir.join(LOCK_FILE),
                source: e.into(),
            }),
        }
    }

    pub fn is_running(&self) -> Result<bool> {
        Ok(matches!(self.liveness()?, Liveness::Running { .. }))
    }

    /// The pid recorded by the running VM.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_path())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Takes the VM's name for this process (the VM itself, or a command
    /// that must not race with it: rm, clone). Fails with `Running` while
    /// another process holds it. Stale run files are removed.
    pub fn lock_exclusive(&self) -> Result<RunLock> {
        crate::fsutil::create_private_dir(&self.dir).map_err(ControlError::io(
            "cannot create the VM directory",
            &self.dir,
        ))?;
        let mut file = self.open_lock()?;
        let deadline = Instant::now() + EXCLUSIVE_RETRY;
        let held = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => break held,
                Err((back, Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = back;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(ControlError::Running(self.name.to_string()))
                }
                Err((_, e)) => {
                    return Err(ControlError::Io {
                        what: "cannot lock",
                        path: self.dir.join(LOCK_FILE),
                        source: e.into(),
                    })
                }
            }
        };
        self.remove_run_files();
        Ok(RunLock {
            dir: self.clone(),
            _held: held,
        })
    }

    /// Removes the socket and pid file; true if either was there.
    fn remove_run_files(&self) -> bool {
        let mut removed = false;
        for path in [self.socket_path(), self.pid_path()] {
            match std::fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
        removed
    }

    /// Deletes the VM's directory. The caller holds its exclusive lock.
    pub fn remove(&self, _held: &RunLock) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).map_err(ControlError::io(
            "cannot remove the VM directory",
            &self.dir,
        ))
    }

    /// Every VM with a configuration, sorted by name.
    pub fn list() -> Result<Vec<VmDir>> {
        let root = crate::dirs::vms_dir();
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ControlError::io("cannot list", &root)(e)),
        };
        let mut vms: Vec<VmDir> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| entry.file_name().to_str()?.parse::<VmName>().ok())
            .map(|name| VmDir::new(&name))
            .filter(VmDir::exists)
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(vms)
    }
}

impl RunLock {
    /// Records this process as the VM's.
    pub fn write_pid(&self) -> Result<()> {
        let path = self.dir.pid_path();
        crate::fsutil::write_private(&path, format!("{}\n", std::process::id()).as_bytes())
            .map_err(ControlError::io("cannot write the pid file", &path))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Mutex, MutexGuard};

    /// Points the XDG directories at a fresh temporary place for one test;
    /// tests that use it run one at a time (the environment is global).
    pub(crate) struct TempHome {
        pub dir: vmm_sys_util::tempdir::TempDir,
        _guard: MutexGuard<'static, ()>,
    }

    pub(crate) fn temp_home() -> TempHome {
        static ENV: Mutex<()> = Mutex::new(());
        let guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vmlab-state").unwrap();
        std::env::set_var("XDG_DATA_HOME", dir.as_path().join("data"));
        std::env::set_var("XDG_RUNTIME_DIR", dir.as_path().join("run"));
        TempHome { dir, _guard: guard }
    }

    #[test]
    fn paths_follow_xdg() {
        let home = temp_home();
        let vm = VmDir::named("vm1").unwrap();
        assert_eq!(vm.path(), home.dir.as_path().join("data/vmlab/vms/vm1"));
        assert_eq!(
            vm.socket_path(),
            home.dir.as_path().join("run/vmlab/vm1.sock")
        );
        assert!(!vm.exists());
        assert!(VmDir::named("../x").is_err());
    }

    #[test]
    fn settings_saved_are_listed_and_loaded() {
        let _home = temp_home();
        assert!(VmDir::list().unwrap().is_empty());
        let settings = VmSettings {
            cpus: 2,
            ..VmSettings::default()
        };
        for name in ["b", "a"] {
            VmDir::named(name)
                .unwrap()
                .save_settings(&settings)
                .unwrap();
        }
        let names: Vec<_> = VmDir::list()
            .unwrap()
            .iter()
            .map(|v| v.name().to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            VmDir::existing("a").unwrap().load_settings().unwrap(),
            settings
        );
        let missing = VmDir::existing("zz").unwrap_err().to_string();
        assert!(missing.contains("no VM named zz"), "{missing}");
    }

    #[test]
    fn a_held_lock_means_running_and_its_release_cleans_up() {
        let _home = temp_home();
        let vm = VmDir::named("vm1").unwrap();
        vm.save_settings(&VmSettings::default()).unwrap();
        assert_eq!(vm.liveness().unwrap(), Liveness::Stopped { cleaned: false });
        let held = vm.lock_exclusive().unwrap();
        held.write_pid().unwrap();
        assert_eq!(
            vm.liveness().unwrap(),
            Liveness::Running {
                pid: Some(std::process::id())
            }
        );
        // A second claim on the name fails (after its short retry).
        let err = vm.lock_exclusive().err().unwrap().to_string();
        assert!(err.contains("already running"), "{err}");
        drop(held);
        assert!(!vm.pid_path().exists());
        assert_eq!(vm.liveness().unwrap(), Liveness::Stopped { cleaned: false });
    }

    #[test]
    fn stale_socket_and_pid_of_a_crashed_run_are_cleaned() {
        let _home = temp_home();
        let vm = VmDir::named("crashed").unwrap();
        vm.save_settings(&VmSettings::default()).unwrap();
        // What a killed VM leaves: a socket nobody listens on and a pid.
        let run = crate::dirs::ensure_runtime_dir().unwrap();
        drop(std::os::unix::net::UnixListener::bind(vm.socket_path()).unwrap());
        assert!(run.join("crashed.sock").exists());
        std::fs::write(vm.pid_path(), "999999\n").unwrap();
        assert_eq!(vm.liveness().unwrap(), Liveness::Stopped { cleaned: true });
        assert!(!vm.socket_path().exists());
        assert!(!vm.pid_path().exists());
        assert_eq!(vm.liveness().unwrap(), Liveness::Stopped { cleaned: false });
    }
}
