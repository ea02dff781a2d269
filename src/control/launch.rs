//! From a VM's settings to the machine's `VmConfig`: the one place where
//! `vmlab run`, named or not, attached or detached, decides what it boots.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::cards::{card_macs, check_cards, CardSettings};
use super::error::ControlError;
use super::error::Result;
use super::settings::{NetChoice, VmSettings};
use crate::cli::{DiskSpec, MacAddress};
use crate::devices::virtio::net::{NetSettings, TapLink};
use crate::image::{Flavor, GuestIdentity};
use crate::net::{ForwardListeners, NatConfig};
use crate::network::link::{MemberLink, MemberNatView};
use crate::network::protocol::JoinRequest;
use crate::network::NetworkDir;
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
    if settings.debian {
        return debian_config(name, settings, console, boot_timer, started);
    }
    let (kernel, initrd) = boot_images(settings)?;
    Ok(VmConfig {
        name: name.to_string(),
        cpus: settings.cpus,
        mem_size: settings.mem.bytes(),
        boot: BootSource::Linux {
            kernel: kernel.into(),
            initrd: initrd.map(Into::into),
            cmdline: settings.cmdline.clone(),
        },
        console,
        disks: settings.disks.clone(),
        nets: net_settings(name, settings)?,
        boot_timer,
        started,
        resume: None,
        new_generation: None,
        backing_policy: settings.backing_policy(),
    })
}

/// A VM on a Debian image: its disks already hold its overlay (see
/// [`prepare_debian`]); it boots with the VM's name as hostname, the user's
/// public key and the VM's name as the instance id (a clone, having a new
/// name, makes itself new host keys and machine-id). The lean flavor boots
/// the default guest kernel; the full one the kernel and initrd its own disk carries
/// (read again at every boot), unless the settings name others.
fn debian_config(
    name: &str,
    settings: &VmSettings,
    console: ConsoleConfig,
    boot_timer: bool,
    started: Instant,
) -> Result<VmConfig> {
    let key = crate::image::user_key()?;
    let identity = GuestIdentity::new(name, &key.public_key)?.with_instance(name)?;
    let (kernel, initrd, params) = match settings.flavor {
        Flavor::Lean => {
            let guest = crate::image::debian_guest(&identity)?;
            // Debian's packaged kernel comes with the initramfs holding its
            // disk drivers; a kernel of the user's brings its own, or none.
            let initrd = match &settings.kernel {
                Some(_) => settings.initrd.clone(),
                None => settings.initrd.clone().or(guest.initrd),
            };
            let kernel = settings.kernel.clone().unwrap_or(guest.kernel);
            (kernel.into(), initrd.map(Into::into), guest.cmdline)
        }
        Flavor::Full => {
            let params = crate::image::boot_params_for(Flavor::Full, &identity);
            match (&settings.kernel, settings.disks.first()) {
                (Some(kernel), _) => (
                    kernel.clone().into(),
                    settings.initrd.clone().map(Into::into),
                    params,
                ),
                (None, Some(disk)) => {
                    let boot = crate::image::read_disk_boot(
                        &disk.path,
                        settings.mem.bytes(),
                        &settings.backing_policy(),
                    )?;
                    log::info!("booting {} from {}", boot.kernel_path, disk.path.display());
                    (boot.kernel, Some(boot.initrd), params)
                }
                (None, None) => {
                    return Err(ControlError::Refused(format!(
                        "VM {name} is a full Debian VM without a disk to boot from: give --disk (its root disk first) or --kernel"
                    )))
                }
            }
        }
    };
    let mut cmdline = params.join(" ");
    if !settings.cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&settings.cmdline);
    }
    Ok(VmConfig {
        name: name.to_string(),
        cpus: settings.cpus,
        mem_size: settings.mem.bytes(),
        boot: BootSource::Linux {
            kernel,
            initrd,
            cmdline,
        },
        console,
        disks: settings.disks.clone(),
        nets: net_settings(name, settings)?,
        boot_timer,
        started,
        resume: None,
        new_generation: None,
        backing_policy: settings.backing_policy(),
    })
}

/// Makes a new named VM a Debian one, of the settings' flavor and packages:
/// builds that base image if needed (with progress) and puts a linked qcow2
/// overlay of it, `disk.qcow2`, in the VM's directory as its first disk.
/// Constant time whatever the base's size.
pub fn prepare_debian(dir: &Path, settings: &mut VmSettings) -> Result<()> {
    let image = crate::image::image_for(&settings.image_spec()?)?;
    let overlay = dir.join("disk.qcow2");
    crate::fsutil::create_private_dir(dir).map_err(super::error::ControlError::io(
        "cannot create the VM directory",
        dir,
    ))?;
    crate::disk::clone_image(&image.base, &overlay, &crate::disk::CloneOptions::default())
        .map_err(|source| super::error::ControlError::Disk {
            vm: dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            source,
        })?;
    settings.disks.insert(
        0,
        DiskSpec {
            path: overlay,
            read_only: false,
        },
    );
    settings.debian = true;
    Ok(())
}

/// `run --disk-size`: grows the VM's first disk to `size` bytes (the image
/// keeps its new size); refuses to shrink it.
pub fn grow_first_disk(name: &str, settings: &VmSettings, size: u64) -> Result<()> {
    let Some(disk) = settings.disks.first() else {
        return Err(ControlError::Refused(format!(
            "VM {name} has no disk to grow: --disk-size applies to its first --disk"
        )));
    };
    let path = &disk.path;
    if disk.read_only {
        return Err(ControlError::Refused(format!(
            "VM {name}'s first disk {} is attached read-only: it cannot grow",
            path.display()
        )));
    }
    let disk_err = |source| ControlError::Disk {
        vm: name.to_string(),
        source,
    };
    let current = crate::disk::image_info(path, &settings.backing_policy()).map_err(disk_err)?[0]
        .virtual_size;
    if size < current {
        return Err(ControlError::Refused(format!(
            "VM {name}'s first disk is {} ({current} bytes): --disk-size {} would shrink it, and disks only grow",
            crate::disk::human_size(current),
            crate::cli::ByteSize(size)
        )));
    }
    if size > current {
        crate::disk::resize_image(path, size, &settings.backing_policy()).map_err(disk_err)?;
    }
    Ok(())
}

/// The VM's network cards, eth0 first: each behind its own NAT, on a lab
/// network, or on a TAP. Binds the forwarded host ports now (or has the lab
/// network bind them), and attaches the TAPs, before anything else is
/// built: a port in use or a missing TAP fails the start at once, named.
pub fn net_settings(name: &str, settings: &VmSettings) -> Result<Vec<NetSettings>> {
    let cards = settings.cards();
    if cards.is_empty() {
        if !settings.forwards.is_empty() {
            return Err(ControlError::Refused(
                "--forward needs a network card: drop --forward or --net none".to_string(),
            ));
        }
        if settings.ip.is_some() {
            return Err(ControlError::Refused(
                "--ip is an address on a lab network: add --net NETWORK (see vmlab network ls)"
                    .to_string(),
            ));
        }
        return Ok(Vec::new());
    }
    check_cards(&cards)?;
    let macs = card_macs(name, &cards)?;
    cards
        .iter()
        .zip(macs)
        .map(|(card, mac)| card_settings(name, settings, card, mac))
        .collect()
}

fn card_settings(
    name: &str,
    settings: &VmSettings,
    card: &CardSettings,
    mac: MacAddress,
) -> Result<NetSettings> {
    match &card.net {
        NetChoice::None => unreachable!("check_cards refuses a card on none"),
        NetChoice::Lab(network) => lab_member(name, mac, network, card),
        NetChoice::Tap(dev) => Ok(NetSettings {
            mac,
            mtu: TapLink::mtu(dev),
            backend: Box::new(TapLink::attach(dev)?),
            nat_view: None,
        }),
        NetChoice::User => Ok(NetSettings::nat(
            mac,
            NatConfig {
                hostname: name.to_string(),
                forwards: card.forwards.clone(),
                host_loopback: settings.host_loopback.clone(),
                outbound: settings.outbound,
                // Lab networks are reached as their members, not through
                // another VM's NAT.
                walled_off: NetworkDir::list()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|n| n.load().ok())
                    .map(|d| (d.subnet.network(), d.subnet.prefix()))
                    .collect(),
                ..NatConfig::with_host_resolvers()
            },
            ForwardListeners::bind(&card.forwards)?,
        )),
    }
}

/// Joins lab network `network` as VM `name` (starting the network's
/// process if it is the first member); the network binds the forwards.
fn lab_member(
    name: &str,
    mac: MacAddress,
    network: &str,
    card: &CardSettings,
) -> Result<NetSettings> {
    let net = NetworkDir::existing(network)?;
    let request = JoinRequest {
        name: name.to_string(),
        mac,
        ip: card.ip,
        forwards: card.forwards.clone(),
        ingress: card.ingress.clone(),
    };
    let (link, ip) = MemberLink::join(net.clone(), request)?;
    log::info!("VM {name}: on network {network} as {ip}");
    Ok(NetSettings {
        mac,
        mtu: NatConfig::default().mtu,
        backend: Box::new(link),
        nat_view: Some(Arc::new(MemberNatView {
            net,
            name: name.to_string(),
        })),
    })
}
