//! From a VM's settings to the machine's `VmConfig`: the one place where
//! `vmlab run`, named or not, attached or detached, decides what it boots.

use std::path::PathBuf;
use std::time::Instant;

use super::error::Result;
use super::settings::VmSettings;
use crate::vmm::{BootSource, ConsoleConfig, VmConfig};

/// The kernel and initrd to boot: the settings' own, else the default
/// guest's (built on first use, with progress on stderr).
pub fn boot_images(settings: &VmSettings) -> Result<(PathBuf, Option<PathBuf>)> {
    Ok(match &settings.kernel {
        Some(kernel) => (kernel.clone(), settings.initrd.clone()),
        None => {
            let guest = crate::image::default_guest()?;
            (guest.kernel, settings.initrd.clone().or(Some(guest.initrd)))
        }
    })
}

pub fn vm_config(
    name: &str,
    settings: &VmSettings,
    console: ConsoleConfig,
    boot_timer: bool,
    started: Instant,
) -> Result<VmConfig> {
    let (kernel, initrd) = boot_images(settings)?;
    Ok(VmConfig {
        name: name.to_string(),
        cpus: settings.cpus,
        mem_size: settings.mem.bytes(),
        boot: BootSource::Linux {
            kernel,
            initrd,
            cmdline: settings.cmdline.clone(),
        },
        console,
        boot_timer,
        started,
    })
}
