//! The `vmlab` command: argument parsing and one small function per
//! subcommand; all the work happens in the library.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use vmlab::bench::{BootBench, Progress, RunOptions, SshPeers};
use vmlab::cli::{ByteSize, DiskSpec, ForwardRule, MacAddress};
use vmlab::control::{self, Attach, ControlError, StopOutcome, VmDir, VmSettings};
use vmlab::disk::{self, BackingPolicy, CloneMode, CloneOptions, CreateOptions, ImageFormat};
use vmlab::image::{Flavor, ImageSpec};
use vmlab::net::{ForwardListeners, HostLoopback, Nat, NatConfig, Outbound, Tap, TapNat};
use vmlab::vmm::{ConsoleConfig, LastBoot, OnReboot, RunReport, Vm};

/// `print!` and `println!` that return [`vmlab::cli::stdout::StdoutError`]
/// instead of panicking when stdout is a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => { vmlab::cli::stdout::print(format_args!($($arg)*))? };
}
macro_rules! outln {
    ($($arg:tt)*) => { out!("{}\n", format_args!($($arg)*)) };
}

/// A small hypervisor for virtualization labs.
#[derive(Parser, Debug)]
#[command(name = "vmlab", version, about)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a Linux guest with its console on this terminal (Ctrl-A x quits).
    Run(Box<RunArgs>),
    /// Run the userspace NAT on an existing TAP device (e.g. one moved into a
    /// network namespace), the way slirp4netns serves a namespace; or
    /// `nat show NAME`: a running VM's flows and forwards.
    #[command(args_conflicts_with_subcommands = true)]
    Nat(NatCmd),
    /// Create, inspect and grow disk images.
    Disk {
        #[command(subcommand)]
        action: DiskCommand,
    },
    /// Clone a VM (SRC and DST are VM names) or a disk image (paths): a
    /// linked qcow2 clone in constant time, or a full copy.
    Clone(CloneArgs),
    /// List named VMs: name, state, pid, uptime, forwards.
    Ps,
    /// Stop named VMs: press the power button, wait, kill after --timeout.
    /// A suspended VM's saved state is discarded, without asking (its next
    /// run boots cold).
    Stop {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
        /// Seconds to wait for the guest to power off before killing it.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        timeout: u64,
    },
    /// Attach to a running VM's serial console (Ctrl-A x detaches).
    Console { name: String },
    /// Save a running VM whole (memory and devices) into its directory and
    /// end it; vmlab resume continues it where it was.
    Suspend { name: String },
    /// Continue a suspended VM where it was, in the background (no boot).
    Resume {
        name: String,
        /// Run without vmlab's per-thread seccomp filters (as run
        /// --no-seccomp).
        #[arg(long)]
        no_seccomp: bool,
    },
    /// Snapshots of a VM's disks: create (running or stopped), ls, restore
    /// (stopped), rm.
    Snapshot {
        #[command(subcommand)]
        action: control::snapshot::command::SnapshotCommand,
    },
    /// Delete stopped VMs: their settings, disks and logs.
    Rm {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// SSH into a VM through its forward to port 22, with vmlab's key.
    Ssh {
        name: String,
        /// Command to run instead of a shell (after --).
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Print an OpenSSH config stanza for a VM (for ssh, scp, rsync).
    SshConfig { name: String },
    /// Runs a named VM in the background (started by run --detach).
    #[command(name = "vm-daemon", hide = true)]
    VmDaemon {
        name: String,
        #[arg(long)]
        no_seccomp: bool,
    },
    /// Lab networks that VMs and network namespaces share.
    #[command(subcommand)]
    Network(vmlab::network::NetworkCommand),
    /// A lab network's process (started by its first member).
    #[command(name = "network-daemon", hide = true)]
    NetworkDaemon {
        name: String,
        #[arg(long)]
        no_seccomp: bool,
    },
    /// Measure vmlab against its peers.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The default Debian guest image.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build a Debian base image (needs root: debootstrap) unless this
    /// recipe's is cached; prints its path.
    Build {
        /// Rebuild even if cached (refused while a VM uses the image).
        #[arg(long)]
        force: bool,
        /// `lean` (vmlab's kernel and init, the fastest boot) or `full`
        /// (systemd, Debian's cloud kernel and modules).
        #[arg(long, value_name = "FLAVOR", default_value = "lean")]
        flavor: Flavor,
        /// Extra Debian packages baked into a full image, comma-separated
        /// (e.g. docker.io); each package set is its own cached image.
        #[arg(long, value_name = "LIST", value_parser = package_list)]
        packages: Option<PackageList>,
    },
    /// Get the default guests' kernel: `lean` compiles vmlab's own (minutes;
    /// the default guests boot it from then on), `debian` fetches Debian's
    /// current packaged kernel (seconds); prints the kernel's path.
    Kernel {
        #[arg(value_name = "lean|debian")]
        which: vmlab::image::GuestKernel,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Boot time to the guest's init and to ssh-ready: vmlab, QEMU microvm
    /// and runc, interleaved, with vmlab's own CPU and memory cost.
    Boot(BenchBootArgs),
    /// Lab network throughput and round-trip time between two network
    /// namespaces, against a Linux bridge with veth pairs; with --nat, a
    /// lab member's NAT against --net user's (root).
    Net(BenchNetArgs),
}

#[derive(Args, Debug)]
struct BenchNetArgs {
    /// Measured rounds per contender, interleaved.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Seconds of each iperf3 run.
    #[arg(long, value_name = "S", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=600))]
    seconds: u32,
    /// Measure a lab member's NAT to the host's loopback against --net
    /// user's (vmlab nat --tap), instead of the switch against a bridge.
    #[arg(long)]
    nat: bool,
}

#[derive(Args, Debug)]
struct BenchBootArgs {
    /// Guest kernel to boot [default: vmlab's lean kernel, built first if
    /// need be].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs for the VMs, unpacked as the container's root filesystem
    /// [default: the lean guest's].
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Measured boots per contender.
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    runs: u32,
    /// Rounds run first and not counted (cold caches).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    warmup: u32,
    /// Guest memory of every VM contender.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    mem: ByteSize,
    /// Write a chart (SVG): a stacked bar per contender, spread shown.
    #[arg(long, value_name = "PATH")]
    plot: Option<PathBuf>,
    /// Write the raw samples and statistics as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Run the ssh-ready contenders even when the Debian image is not
    /// built yet: build it first (`vmlab image build`) [default: run them
    /// when it is built, else list them as missing].
    #[arg(long, conflicts_with = "no_ssh")]
    ssh: bool,
    /// Leave out the ssh-ready contenders (listed as missing).
    #[arg(long)]
    no_ssh: bool,
    /// `full`: time vmlab and QEMU microvm to ssh-ready (split at init) on
    /// the full Debian image, each booting the kernel and initrd it carries
    /// [default: lean, all six contenders].
    #[arg(long, value_name = "FLAVOR", default_value = "lean")]
    flavor: Flavor,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage [default: the default guest].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive) for the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to vmlab's own (console=ttyS0 ...).
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G [default: 512M, or the named VM's].
    #[arg(long, value_name = "SIZE")]
    mem: Option<ByteSize>,
    /// Number of vCPUs [default: 1, or the named VM's].
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u8).range(1..=254))]
    cpus: Option<u8>,
    /// Port forward tcp:[HOSTADDR:]HOSTPORT:GUESTPORT or udp:... to the
    /// card of the --net before it (repeatable; replaces that card's saved
    /// forwards).
    #[arg(long = "forward", value_name = "RULE")]
    forwards: Vec<ForwardRule>,
    /// On the lab network of the --net before it, only connections a rule
    /// admits come in: tcp:PORT[-PORT], udp:PORT[-PORT] or icmp, each
    /// optionally 'from CIDR'; replies to the VM's own connections always
    /// pass (repeatable; replaces that card's saved rules).
    #[arg(long = "ingress", value_name = "RULE")]
    ingress: Vec<vmlab::cli::IngressRule>,
    /// Name the VM: its settings, serial log and control socket are kept
    /// (see vmlab ps); without it the VM is throwaway.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Run in the background (needs --name); reach it with vmlab console,
    /// vmlab ssh, vmlab stop.
    #[arg(long)]
    detach: bool,
    /// A disk image (raw or qcow2, told apart by content), PATH or PATH,ro;
    /// repeat for more: /dev/vda, /dev/vdb, ... in this order (replaces a
    /// named VM's saved disks).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskSpec>,
    /// Grow the named VM's first disk to SIZE, e.g. 20G (never shrinks; the
    /// Debian guest grows its root filesystem to match at boot).
    #[arg(long, value_name = "SIZE")]
    disk_size: Option<ByteSize>,
    /// A suspended named VM: discard its saved state and boot it cold
    /// (vmlab resume continues it instead).
    #[arg(long)]
    discard_state: bool,
    /// Start the new VM --name from a full snapshot (vmlab snapshot create
    /// VM SNAPSHOT --full) instead of booting: it resumes there, in the
    /// background, with its own disk overlays, MAC and identity.
    #[arg(long, value_name = "VM@SNAPSHOT",
          conflicts_with_all = ["kernel", "initrd", "cmdline", "disks", "disk_size",
                                "discard_state", "flavor", "packages", "boot_timer", "report_json"])]
    from: Option<control::from_snapshot::SnapshotRef>,
    /// Print milliseconds to the first vCPU entry and to the guest's
    /// userspace-started signal (also shown with -v).
    #[arg(long)]
    boot_timer: bool,
    /// At exit, write the boot timeline, memory footprint and exit reason
    /// as JSON (for benchmarks).
    #[arg(long, value_name = "PATH")]
    report_json: Option<PathBuf>,
    /// A network card: `user` (behind vmlab's own NAT, at most one card),
    /// `none` (no card), a lab network's name (vmlab network create) or
    /// `tap:DEV` (an existing TAP device, bridged). Repeat for more cards,
    /// eth0, eth1, ... in order; --mac, --forward and --ip apply to the
    /// card of the --net they follow (before any --net, to the first)
    /// [default: user, or the named VM's cards].
    #[arg(long, value_name = "user|none|NETWORK|tap:DEV")]
    net: Vec<control::settings::NetChoice>,
    /// The card's address on its lab network (reserved for its MAC)
    /// [default: a lease from the network's pool, kept per MAC].
    #[arg(long, value_name = "ADDR")]
    ip: Vec<std::net::Ipv4Addr>,
    /// The card's MAC address, one per card [default: derived from --name
    /// and the card's place, 52:54:00:xx:xx:xx].
    #[arg(long, value_name = "MAC")]
    mac: Vec<MacAddress>,
    /// Where each --net, --mac, --forward and --ip stood on the command
    /// line (filled from clap's matches after parsing).
    #[arg(skip)]
    card_flags: Box<control::cards::CardFlags>,
    /// The Debian guest of a new named VM: `lean` (vmlab's kernel and init)
    /// or `full` (systemd, Debian's kernel from the VM's own /boot); chosen
    /// at its first run [default: lean].
    #[arg(long, value_name = "FLAVOR")]
    flavor: Option<Flavor>,
    /// Extra packages of a new full VM's image (built first if needed),
    /// comma-separated, as `vmlab image build --packages` takes them.
    #[arg(long, value_name = "LIST", value_parser = package_list)]
    packages: Option<PackageList>,
    /// What a guest reboot does: `restart` it in place (a named VM's
    /// default) or `exit` vmlab (an unnamed VM's default).
    #[arg(long, value_name = "WHAT")]
    on_reboot: Option<OnReboot>,
    #[command(flatten)]
    reach: ReachArgs,
    #[command(flatten)]
    backing: BackingArgs,
    /// Run without vmlab's per-thread seccomp filters (for debugging: a
    /// VM "killed by its seccomp filter" runs on with this, and strace
    /// shows the syscall).
    #[arg(long)]
    no_seccomp: bool,
}

/// Backing files an image may name beyond vmlab's rule (its own directory,
/// vmlab's image and VM directories).
#[derive(Args, Debug)]
struct BackingArgs {
    /// Let disk images name PATH as a backing file: a file, or a directory
    /// and everything below it (repeatable; a named VM keeps the list).
    #[arg(long = "allow-backing", value_name = "PATH")]
    allow_backing: Vec<PathBuf>,
}

impl BackingArgs {
    /// The paths given, made absolute; each must exist.
    fn paths(&self) -> Result<Vec<PathBuf>> {
        self.allow_backing
            .iter()
            .map(|p| {
                anyhow::ensure!(
                    p.exists(),
                    "--allow-backing {}: no such file or directory",
                    p.display()
                );
                std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
            })
            .collect()
    }

    fn policy(&self) -> Result<BackingPolicy> {
        Ok(BackingPolicy::vmlab().allowing(self.paths()?))
    }
}

/// What a guest behind the NAT may reach on the host and beyond.
#[derive(Args, Debug)]
struct ReachArgs {
    /// What the gateway (10.0.2.2) reaches on the host's 127.0.0.1: all
    /// ports, none, or a list like 22,8080 [default: all, or the named VM's].
    #[arg(long, value_name = "all|none|PORT,...")]
    host_loopback: Option<HostLoopback>,
    /// Where else the guest's flows may go: any (whatever the host reaches)
    /// or host (the gateway and the DNS relay only) [default: any, or the
    /// named VM's].
    #[arg(long, value_name = "any|host")]
    outbound: Option<Outbound>,
}

#[derive(Args, Debug)]
struct NatArgs {
    /// TAP device to serve (created if missing; needs CAP_NET_ADMIN).
    #[arg(long, value_name = "DEV")]
    tap: Option<String>,
    /// Open the TAP inside this network namespace (e.g. /run/netns/NAME);
    /// host sockets stay in vmlab's own namespace.
    #[arg(long, value_name = "PATH")]
    netns: Option<std::path::PathBuf>,
    /// Port forward tcp:[HOSTADDR:]HOSTPORT:GUESTPORT or udp:... (repeatable).
    #[arg(long = "forward", value_name = "RULE")]
    forwards: Vec<ForwardRule>,
    /// MTU announced by DHCP and used for the TCP MSS.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(576..=65520))]
    mtu: u16,
    /// Hostname announced by DHCP.
    #[arg(long, default_value = "vmlab")]
    hostname: String,
    /// Most flows at once; the oldest idle flow is evicted beyond it.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_flows: u64,
    /// Only let the namespace reach the host itself (same as --outbound host).
    #[arg(long, conflicts_with = "outbound")]
    host_only: bool,
    #[command(flatten)]
    reach: ReachArgs,
    /// Serve without vmlab's seccomp filter (for debugging, as run
    /// --no-seccomp).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(Args, Debug)]
struct NatCmd {
    #[command(subcommand)]
    action: Option<NatAction>,
    #[command(flatten)]
    serve: NatArgs,
}

#[derive(Subcommand, Debug)]
enum NatAction {
    /// A running VM's NAT: forwards, flow table and counters.
    Show { name: String },
}

#[derive(Subcommand, Debug)]
enum DiskCommand {
    /// Create a new image (qcow2 unless --format raw).
    Create {
        path: PathBuf,
        /// Virtual size, e.g. 10G; defaults to the backing file's size.
        size: Option<ByteSize>,
        /// Make a qcow2 overlay of this image (its format is detected).
        #[arg(long, short = 'b', value_name = "FILE")]
        backing: Option<PathBuf>,
        /// Image format: qcow2 or raw.
        #[arg(long, short = 'f', default_value = "qcow2")]
        format: ImageFormat,
        /// qcow2 cluster size, 512 to 2M.
        #[arg(long, default_value = "64K")]
        cluster_size: ByteSize,
        /// Replace PATH if it exists (never an image in use).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        allow: BackingArgs,
    },
    /// Show format, virtual size, allocated bytes and backing chain.
    Info {
        path: PathBuf,
        #[command(flatten)]
        allow: BackingArgs,
    },
    /// Grow an image to SIZE (e.g. 20G).
    Resize {
        path: PathBuf,
        size: ByteSize,
        #[command(flatten)]
        allow: BackingArgs,
    },
}

#[derive(Args, Debug)]
struct CloneArgs {
    /// The image to clone.
    src: PathBuf,
    /// The new image.
    dst: PathBuf,
    /// Make a standalone copy (sparse-aware) instead of a linked clone.
    #[arg(long)]
    full: bool,
    /// Output format: qcow2 or raw (raw needs --full; default: qcow2, or the
    /// source's format with --full).
    #[arg(long, short = 'f')]
    format: Option<ImageFormat>,
    /// Replace DST if it exists (never an image in use).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    allow: BackingArgs,
}

/// Logs to stderr, or for a VM in the background to its capped vmm.log.
fn init_logging(verbose: u8, command: &Command) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let file = match command {
        Command::VmDaemon { name, .. } => control::daemon::vmm_log(name),
        _ => None,
    };
    vmlab::logging::init(level, file);
}

fn main() {
    let started = Instant::now();
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(err) if err.use_stderr() => {
            // One line, like every other vmlab error; clap's usage block
            // would bury it.
            let text = err.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("vmlab: {first} (see vmlab --help)");
            std::process::exit(2);
        }
        Err(err) => err.exit(),
    };
    init_logging(cli.verbose, &cli.command);
    // A NAT with thousands of flows needs more than the usual soft limit.
    if let Err(e) = vmlab::fds::raise_open_file_limit() {
        log::warn!("cannot raise the open-file limit: {e}");
    }
    let code = match dispatch(cli.command, cli.verbose, started) {
        Ok(code) => code,
        // The reader of our output left (`| head -1`): stop quietly.
        Err(err) if vmlab::cli::stdout::is_closed(&*err) => 0,
        Err(err) => {
            // One line: the error and its causes, joined. Not eprintln!,
            // which panics when stderr is a closed pipe too.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "vmlab: error: {}", one_line(&err));
            1
        }
    };
    std::process::exit(code);
}

/// The command line, with `run`'s per-card options placed on their cards
/// (which needs the positions clap saw them at).
fn parse_command_line() -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().try_get_matches()?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Run(args), Some(run)) = (&mut cli.command, matches.subcommand_matches("run")) {
        let at = |id: &str| -> Vec<usize> { run.indices_of(id).into_iter().flatten().collect() };
        let flags = &mut args.card_flags;
        flags.nets = at("net").into_iter().zip(args.net.clone()).collect();
        flags.macs = at("mac").into_iter().zip(args.mac.clone()).collect();
        flags.forwards = at("forwards")
            .into_iter()
            .zip(args.forwards.clone())
            .collect();
        flags.ips = at("ip").into_iter().zip(args.ip.clone()).collect();
        flags.ingress = at("ingress")
            .into_iter()
            .zip(args.ingress.clone())
            .collect();
    }
    Ok(cli)
}

/// The error and its causes joined in one line, leaving out a cause whose
/// text the message before it already says (library errors name theirs).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

fn dispatch(command: Command, verbose: u8, started: Instant) -> Result<i32> {
    match command {
        Command::Run(args) => run(*args, verbose, started),
        Command::Nat(NatCmd {
            action: Some(NatAction::Show { name }),
            ..
        }) => nat_show(&name),
        Command::Nat(NatCmd { serve, .. }) => nat(serve),
        Command::Disk { action } => disk_cmd(action),
        Command::Clone(args) => clone_cmd(args),
        Command::Ps => ps(),
        Command::Stop { names, timeout } => stop(&names, timeout),
        Command::Console { name } => console(&name),
        Command::Suspend { name } => suspend(&name),
        Command::Resume { name, no_seccomp } => resume(&name, verbose, no_seccomp),
        Command::Rm { names } => rm(&names),
        Command::Snapshot { action } => {
            control::snapshot::command::run(action)?;
            Ok(0)
        }
        Command::Ssh { name, command } => ssh(&name, &command),
        Command::SshConfig { name } => ssh_config(&name),
        Command::VmDaemon { name, no_seccomp } => vm_daemon(&name, no_seccomp, started),
        Command::Network(command) => Ok(vmlab::network::command::run(command)?),
        Command::NetworkDaemon { name, no_seccomp } => {
            Ok(vmlab::network::command::daemon(&name, no_seccomp)?)
        }
        Command::Bench(BenchCommand::Boot(args)) => bench_boot(args),
        Command::Bench(BenchCommand::Net(args)) => {
            let bench = vmlab::bench::net::NetBench {
                runs: args.runs,
                seconds: args.seconds,
                mode: net_bench_mode(&args),
            };
            bench.run()?;
            Ok(0)
        }
        Command::Image(ImageCommand::Build {
            force,
            flavor,
            packages,
        }) => image_build(force, flavor, packages.unwrap_or_default()),
        Command::Image(ImageCommand::Kernel { which }) => image_kernel(which),
    }
}

fn run(args: RunArgs, verbose: u8, started: Instant) -> Result<i32> {
    match args.name.clone() {
        None if args.detach => {
            anyhow::bail!(
                "--detach needs --name NAME: a VM in the background is reached by its name"
            )
        }
        None if args.flavor.is_some() || args.packages.is_some() => anyhow::bail!(
            "--flavor and --packages need --name NAME: a Debian VM keeps its own disk"
        ),
        None if args.disk_size.is_some() => {
            anyhow::bail!(
                "--disk-size needs --name NAME: it grows a named VM's first disk for good"
            )
        }
        None if args.from.is_some() => {
            anyhow::bail!("--from needs --name NAME: the new VM keeps its own disks and identity")
        }
        None => run_vm(args, VmSettings::default(), "vmlab", None, verbose, started),
        Some(name) if args.from.is_some() => run_from(args, &name, verbose),
        Some(name) => run_named(args, &name, verbose, started),
    }
}

/// A named VM: its saved settings with the command line's on top, saved
/// back; then started detached or on this terminal.
fn run_named(args: RunArgs, name: &str, verbose: u8, started: Instant) -> Result<i32> {
    let vm = VmDir::named(name)?;
    let created = !vm.exists();
    let base = if created {
        VmSettings::default()
    } else {
        vm.load_settings()?
    };
    choose_image(&args, name, created, &base)?;
    let mut settings = merge_settings(base, &args)?;
    if created {
        settings.flavor = args.flavor.unwrap_or_default();
        settings.packages = args.packages.clone().unwrap_or_default().0;
    }
    if vm.is_running()? {
        return Err(ControlError::Running(name.to_string()).into());
    }
    if vm.is_suspended() {
        if !args.discard_state {
            anyhow::bail!(
                "VM {name} is suspended: continue it with vmlab resume {name}, or add --discard-state to boot it cold"
            );
        }
        control::stop_all(std::slice::from_ref(&vm), Duration::ZERO)
            .pop()
            .expect("one result")?;
    }
    // Builds the default guest now, with progress on this terminal. A new
    // named VM without a kernel of its own is a Debian VM with its own disk.
    let prepared = if created && settings.kernel.is_none() {
        vmlab::image::check_hostname(name)?;
        control::launch::prepare_debian(vm.path(), &mut settings)
    } else if settings.debian {
        Ok(())
    } else {
        control::launch::boot_images(&settings).map(drop)
    };
    let prepared = prepared.and_then(|()| match args.disk_size {
        Some(size) => {
            // The disk that grows is the one a cut-short restore leaves.
            control::snapshot::finish_restore(&vm)?;
            control::launch::grow_first_disk(name, &settings, size.bytes())
        }
        None => Ok(()),
    });
    if let Err(e) = prepared {
        if created {
            if let Ok(held) = vm.lock_exclusive() {
                let _ = vm.remove(&held);
            }
        }
        return Err(e.into());
    }
    vm.save_settings(&settings)?;
    let result = if args.detach {
        let exe = std::env::current_exe().context("cannot find the vmlab binary")?;
        control::daemon::spawn_detached(&exe, &vm, verbose, args.no_seccomp)
            .map_err(anyhow::Error::from)
            .and_then(|pid| {
                outln!("{name} is running in the background (pid {pid})");
                outln!("  console: vmlab console {name}   (Ctrl-A x detaches)");
                if control::ssh::ssh_address(name, &settings).is_ok() {
                    outln!("  ssh:     vmlab ssh {name}");
                }
                outln!("  stop:    vmlab stop {name}");
                Ok(0)
            })
    } else {
        run_vm(args, settings, name, Some(&vm), verbose, started)
    };
    if result.is_err() && created {
        // A VM that never ran leaves nothing behind.
        if let Ok(held) = vm.lock_exclusive() {
            let _ = vm.remove(&held);
        }
    }
    result
}

/// `run --name NEW --from VM@SNAPSHOT`: the new VM, made suspended at the
/// snapshot, resumed in the background.
fn run_from(args: RunArgs, name: &str, verbose: u8) -> Result<i32> {
    let from = args.from.clone().expect("run_from is for --from");
    let source = control::from_snapshot::FromSnapshot::open(&from)?;
    let settings = merge_settings(source.settings()?, &args)?;
    let vm = source.create(name, &settings)?;
    drop(source);
    let exe = std::env::current_exe().context("cannot find the vmlab binary")?;
    match control::daemon::spawn_detached(&exe, &vm, verbose, args.no_seccomp) {
        Ok(pid) => {
            outln!(
                "{name} is running in the background (pid {pid}), resumed from {}@{}",
                from.vm,
                from.snapshot
            );
            outln!("  console: vmlab console {name}   (Ctrl-A x detaches)");
            if control::ssh::ssh_address(name, &settings).is_ok() {
                outln!("  ssh:     vmlab ssh {name}");
            }
            outln!("  stop:    vmlab stop {name}");
            Ok(0)
        }
        Err(e) => {
            // A VM that never ran leaves nothing behind.
            if let Ok(held) = vm.lock_exclusive() {
                let _ = vm.remove(&held);
            }
            Err(e.into())
        }
    }
}

/// Checks `--flavor` and `--packages` against the VM: they pick the image
/// of a new Debian VM, and may only repeat an existing VM's choice.
fn choose_image(args: &RunArgs, name: &str, created: bool, saved: &VmSettings) -> Result<()> {
    if args.flavor.is_none() && args.packages.is_none() {
        return Ok(());
    }
    if created {
        anyhow::ensure!(
            args.kernel.is_none(),
            "--flavor and --packages pick a Debian image and its kernel, --kernel boots one of your own: drop one of them"
        );
        return Ok(());
    }
    anyhow::ensure!(
        saved.debian,
        "VM {name} boots a kernel of its own, not a Debian image: drop --flavor and --packages"
    );
    let asked = ImageSpec::new(
        args.flavor.unwrap_or(saved.flavor),
        &args
            .packages
            .clone()
            .map_or_else(|| saved.packages.clone(), |p| p.0),
    )?;
    let has = saved.image_spec()?;
    anyhow::ensure!(
        asked == has,
        "VM {name} is a {} Debian VM{} (chosen at its first run, its disk is a clone of that image): drop --flavor and --packages, or make a new VM with another --name",
        has.flavor(),
        if has.packages().is_empty() {
            String::new()
        } else {
            format!(" with {}", has.packages().join(","))
        }
    );
    Ok(())
}

/// The command line's settings over `base` (a named VM's saved ones).
fn merge_settings(mut settings: VmSettings, args: &RunArgs) -> Result<VmSettings> {
    let absolute =
        |p: &PathBuf| std::path::absolute(p).with_context(|| format!("bad path {}", p.display()));
    if let Some(kernel) = &args.kernel {
        settings.kernel = Some(absolute(kernel)?);
    }
    if let Some(initrd) = &args.initrd {
        settings.initrd = Some(absolute(initrd)?);
    }
    if let Some(cmdline) = &args.cmdline {
        settings.cmdline = cmdline.clone();
    }
    if let Some(mem) = args.mem {
        settings.mem = mem;
    }
    if let Some(cpus) = args.cpus {
        settings.cpus = cpus;
    }
    let cards = args.card_flags.apply(settings.cards())?;
    control::cards::check_cards(&cards)?;
    settings.set_cards(cards);
    if let Some(host_loopback) = &args.reach.host_loopback {
        settings.host_loopback = host_loopback.clone();
    }
    if let Some(outbound) = args.reach.outbound {
        settings.outbound = outbound;
    }
    if !args.backing.allow_backing.is_empty() {
        settings.allow_backing = args.backing.paths()?;
    }
    if let Some(policy) = args.on_reboot {
        settings.on_reboot = Some(policy);
    }
    if !args.disks.is_empty() {
        settings.disks = args
            .disks
            .iter()
            .map(|d| {
                Ok(DiskSpec {
                    path: absolute(&d.path)?,
                    read_only: d.read_only,
                })
            })
            .collect::<Result<_>>()?;
    }
    Ok(settings)
}

/// Runs a VM on this terminal; `named` gives it a control socket.
fn run_vm(
    args: RunArgs,
    settings: VmSettings,
    name: &str,
    named: Option<&VmDir>,
    verbose: u8,
    started: Instant,
) -> Result<i32> {
    let settings = match named {
        Some(_) => settings,
        None => merge_settings(settings, &args)?,
    };
    if !args.no_seccomp {
        vmlab::seccomp::prepare()?;
    }
    // A reboot's boot is timed from its own start.
    let mut build = |console, boot: u32| {
        let origin = if boot == 0 { started } else { Instant::now() };
        control::launch::vm_config(name, &settings, console, args.boot_timer, origin)
    };
    let last = match named {
        None => {
            let first = Vm::build(build(ConsoleConfig::stdio(), 0)?)?;
            let policy = settings.on_reboot.unwrap_or(OnReboot::Exit);
            vmlab::vmm::run_rebooting(policy, first, |boot| {
                eprintln!("vmlab: guest rebooted: starting it again");
                Ok::<_, anyhow::Error>(Some(Vm::build(build(ConsoleConfig::stdio(), boot)?)?))
            })?
        }
        Some(dir) => {
            control::start_named(dir, &settings, Attach::Terminal, &mut build)?.run(&mut build)?
        }
    };
    let LastBoot {
        reason,
        footprint,
        timeline,
        ..
    } = last;
    if args.boot_timer || verbose > 0 {
        eprintln!("vmlab: {}", timeline.summary());
        if let Some(footprint) = &footprint {
            eprintln!("vmlab: {}", footprint.summary());
        }
    }
    if let Some(path) = &args.report_json {
        RunReport::new(&timeline, footprint.as_ref(), &reason)
            .write(path)
            .with_context(|| format!("cannot write the run report {}", path.display()))?;
    }
    eprintln!("vmlab: {}", reason.ending());
    Ok(reason.exit_code())
}

/// The background process of `run --detach`.
fn vm_daemon(name: &str, no_seccomp: bool, started: Instant) -> Result<i32> {
    control::daemon::detach_from_terminal();
    if !no_seccomp {
        vmlab::seccomp::prepare()?;
    }
    let vm = VmDir::existing(name)?;
    let settings = vm.load_settings()?;
    // Only the first boot continues from the saved state; a reboot
    // afterwards boots cold like any other.
    let resume = control::suspend::saved_state(&vm);
    let generation = resume
        .as_ref()
        .and_then(|_| control::suspend::new_generation(&vm));
    let mut build = |console, boot: u32| {
        let origin = if boot == 0 { started } else { Instant::now() };
        let mut config = control::launch::vm_config(name, &settings, console, false, origin)?;
        if boot == 0 {
            config.resume = resume.clone();
            config.new_generation = generation.clone();
        }
        Ok(config)
    };
    let named = control::start_named(&vm, &settings, Attach::Detached, &mut build)?;
    if resume.is_some() {
        control::suspend::forget_saved_state(&vm)?;
    }
    control::daemon::signal_ready();
    let last = named.run(&mut build)?;
    eprintln!("vmlab: {}", last.reason.ending());
    Ok(last.reason.exit_code())
}

fn ps() -> Result<i32> {
    out!("{}", control::ps::render(&control::ps::rows()?));
    Ok(0)
}

fn stop(names: &[String], timeout: u64) -> Result<i32> {
    let vms = names
        .iter()
        .map(|n| VmDir::existing(n))
        .collect::<Result<Vec<_>, _>>()?;
    let mut failed = false;
    for (vm, result) in vms
        .iter()
        .zip(control::stop_all(&vms, Duration::from_secs(timeout)))
    {
        match result {
            Ok(StopOutcome::PoweredOff) => outln!("{}: powered off", vm.name()),
            Ok(StopOutcome::Killed) => outln!(
                "{}: killed (the guest did not power off within {timeout} s)",
                vm.name()
            ),
            Ok(StopOutcome::NotRunning) => outln!("{}: was not running", vm.name()),
            Ok(StopOutcome::Discarded) => {
                outln!("{}: was suspended; its saved state is discarded", vm.name())
            }
            Ok(StopOutcome::SeccompKilled(why)) => outln!("{}: {why}", vm.name()),
            Err(e) => {
                eprintln!("vmlab: error: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}

fn suspend(name: &str) -> Result<i32> {
    let saved = control::suspend::suspend(name)?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    outln!(
        "{name} is suspended: {:.1} MiB of its {:.0} MiB of memory saved ({:.1} MiB on disk) in {} ms",
        mib(saved.written_bytes),
        mib(saved.ram_bytes),
        mib(saved.file_bytes),
        saved.took.as_millis()
    );
    outln!("  resume: vmlab resume {name}   (vmlab stop {name} discards the saved state)");
    Ok(0)
}

fn resume(name: &str, verbose: u8, no_seccomp: bool) -> Result<i32> {
    let exe = std::env::current_exe().context("cannot find the vmlab binary")?;
    let pid = control::suspend::resume(name, &exe, verbose, no_seccomp)?;
    outln!("{name} is running in the background again (pid {pid})");
    Ok(0)
}

fn console(name: &str) -> Result<i32> {
    let vm = VmDir::existing(name)?;
    eprintln!("vmlab: attached to {name}'s console (Ctrl-A x detaches)\r");
    control::client::attach_console(&vm)?;
    Ok(0)
}

fn rm(names: &[String]) -> Result<i32> {
    for name in names {
        control::remove_vm(name)?;
    }
    Ok(0)
}

fn nat_show(name: &str) -> Result<i32> {
    let vm = VmDir::existing(name)?;
    match control::client::request(&vm, &control::Request::Nat)? {
        control::Response::Nat {
            nat: Some(snapshot),
        } => out!("{}", snapshot.render()),
        control::Response::Nat { nat: None } => {
            outln!("no network card (the VM runs without a NAT)")
        }
        other => anyhow::bail!("VM {name} answered {other:?} to a NAT request"),
    }
    Ok(0)
}

/// The address, key and known_hosts for ssh to `name`.
fn ssh_target(name: &str) -> Result<(std::net::SocketAddrV4, PathBuf, PathBuf)> {
    let vm = VmDir::existing(name)?;
    let addr = control::ssh::ssh_address(name, &vm.load_settings()?)?;
    let known_hosts = control::ssh::known_hosts_path();
    if let Some(dir) = known_hosts.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok((addr, vmlab::image::user_key()?.private_key, known_hosts))
}

fn ssh(name: &str, command: &[String]) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let (addr, key, known_hosts) = ssh_target(name)?;
    if !VmDir::existing(name)?.is_running()? {
        return Err(ControlError::NotRunning(name.to_string()).into());
    }
    let args = control::ssh::ssh_args(name, addr, &key, &known_hosts, command);
    let err = std::process::Command::new("ssh").args(args).exec();
    anyhow::bail!("cannot run ssh: {err} (install the OpenSSH client: apt install openssh-client)")
}

fn ssh_config(name: &str) -> Result<i32> {
    let (addr, key, known_hosts) = ssh_target(name)?;
    out!(
        "{}",
        control::ssh::ssh_config(name, addr, &key, &known_hosts)
    );
    Ok(0)
}

fn nat(args: NatArgs) -> Result<i32> {
    // Forward ports first: a port in use must fail before anything else.
    // Optional for clap only, so that `nat show NAME` needs no --tap.
    let Some(dev) = &args.tap else {
        anyhow::bail!("vmlab nat needs --tap DEV (or: vmlab nat show NAME for a VM's NAT)");
    };
    let listeners = ForwardListeners::bind(&args.forwards)?;
    let tap = match &args.netns {
        Some(path) => Tap::open_in_netns(dev, path)?,
        None => Tap::open(dev)?,
    };
    let config = NatConfig {
        mtu: args.mtu,
        hostname: args.hostname,
        max_flows: args.max_flows as usize,
        forwards: args.forwards,
        outbound: if args.host_only {
            Outbound::HostOnly
        } else {
            args.reach.outbound.unwrap_or(Outbound::Any)
        },
        host_loopback: args.reach.host_loopback.unwrap_or(HostLoopback::All),
        ..NatConfig::with_host_resolvers()
    };
    log::info!("nat: serving tap {} (mtu {})", tap.name(), config.mtu);
    let backend = Arc::new(Mutex::new(TapNat::new(Nat::new(config, listeners), tap)?));
    // Set up (the TAP open, the forwards bound): the loop runs filtered.
    if !args.no_seccomp {
        vmlab::seccomp::prepare()?;
        vmlab::seccomp::install(vmlab::seccomp::ThreadClass::Nat)?;
    }
    let stop = AtomicBool::new(false);
    vmlab::net::run_until(backend, &stop)?;
    Ok(0)
}

fn disk_cmd(action: DiskCommand) -> Result<i32> {
    match action {
        DiskCommand::Create {
            path,
            size,
            backing,
            format,
            cluster_size,
            force,
            allow,
        } => {
            if force {
                control::suspend::refuse_if_disk_of_suspended(&path, "replacing")?;
            }
            let opts = CreateOptions {
                size: size.map(ByteSize::bytes),
                format,
                cluster_size: cluster_size.bytes(),
                backing,
                force,
                backing_policy: allow.policy()?,
            };
            disk::create_image(&path, &opts)?;
        }
        DiskCommand::Info { path, allow } => {
            let chain = disk::image_info(&path, &allow.policy()?)?;
            for (depth, info) in chain.iter().enumerate() {
                if depth > 0 {
                    outln!("\nbacking image {depth}:");
                }
                out!("{info}");
            }
        }
        DiskCommand::Resize { path, size, allow } => {
            control::suspend::refuse_if_disk_of_suspended(&path, "resizing")?;
            disk::resize_image(&path, size.bytes(), &allow.policy()?)?
        }
    }
    Ok(0)
}

fn clone_cmd(args: CloneArgs) -> Result<i32> {
    if let Some(src) = vm_name_of(&args.src) {
        anyhow::ensure!(
            !args.full && args.format.is_none() && !args.force && args.allow.allow_backing.is_empty(),
            "--full, --format, --force and --allow-backing are for disk images; {src} is a VM (give a path like ./{src} for a file)"
        );
        let dst = args.dst.to_str().unwrap_or_default();
        control::clone_vm(&src, dst)?;
        eprintln!("cloned VM {src} to {dst} (start it with vmlab run --name {dst} --detach)");
        return Ok(0);
    }
    if args.force {
        control::suspend::refuse_if_disk_of_suspended(&args.dst, "replacing")?;
    }
    let opts = CloneOptions {
        mode: if args.full {
            CloneMode::Full
        } else {
            CloneMode::Linked
        },
        format: args.format,
        force: args.force,
        backing_policy: args.allow.policy()?,
    };
    let outcome = disk::clone_image(&args.src, &args.dst, &opts)?;
    log::info!(
        "cloned {} to {} ({}, {} bytes copied)",
        args.src.display(),
        args.dst.display(),
        outcome.format,
        outcome.bytes_copied
    );
    Ok(0)
}

fn image_build(force: bool, flavor: Flavor, packages: PackageList) -> Result<i32> {
    let spec = ImageSpec::new(flavor, &packages.0)?;
    let outcome = vmlab::image::build(&spec, force)?;
    let index = &outcome.image.index;
    if outcome.built {
        eprintln!(
            "vmlab: built the {} Debian {} image in {:.1} s: {} MiB on disk, {} GiB virtual",
            index.flavor,
            index.suite,
            outcome.elapsed.as_secs_f64(),
            index.file_size >> 20,
            index.virtual_size >> 30
        );
    } else {
        log::info!("the Debian image of recipe {} is cached", index.recipe);
    }
    outln!("{}", outcome.image.base.display());
    Ok(0)
}

fn image_kernel(which: vmlab::image::GuestKernel) -> Result<i32> {
    let guest = vmlab::image::refresh_default_guest(which)?;
    println!("{}", guest.kernel.display());
    Ok(0)
}

/// A comma-separated list of Debian packages, as `--packages` takes it.
#[derive(Clone, Debug, Default)]
struct PackageList(Vec<String>);

fn package_list(text: &str) -> Result<PackageList, String> {
    Ok(PackageList(vmlab::image::parse_package_list(text)))
}

/// The VM a clone argument names: a bare word (no '/') that is an existing
/// VM; anything else is a disk image path.
fn vm_name_of(arg: &std::path::Path) -> Option<String> {
    let text = arg.to_str()?;
    if text.contains('/') {
        return None;
    }
    VmDir::named(text)
        .ok()
        .filter(VmDir::exists)
        .map(|_| text.to_string())
}

fn bench_boot(args: BenchBootArgs) -> Result<i32> {
    vmlab::bench::check_host()?;
    for path in args.json.iter().chain(&args.plot) {
        vmlab::bench::check_output_path(path)?;
    }
    if args.flavor == Flavor::Full {
        anyhow::ensure!(
            !args.no_ssh && args.kernel.is_none() && args.initrd.is_none(),
            "--flavor full times the full image, kernel and initrd its own, to ssh-ready: drop --no-ssh, --kernel and --initrd"
        );
    }
    let (kernel, initrd) = match (args.kernel, args.initrd) {
        // The full image's VMs boot its own kernel: no lean guest needed.
        _ if args.flavor == Flavor::Full => (PathBuf::new(), PathBuf::new()),
        (Some(kernel), Some(initrd)) => (kernel, initrd),
        (kernel, initrd) => {
            // The benchmark's guest is the lean one: built now if need be.
            let guest = vmlab::image::default_guest_on(vmlab::image::GuestKernel::Lean)?;
            (
                kernel.unwrap_or(guest.kernel),
                initrd.unwrap_or(guest.initrd),
            )
        }
    };
    for (what, path) in [("kernel", &kernel), ("initrd", &initrd)] {
        anyhow::ensure!(
            args.flavor == Flavor::Full || path.is_file(),
            "{what} {} not found: give an existing file",
            path.display()
        );
    }
    let bench = BootBench {
        vmlab: std::env::current_exe().context("cannot find the vmlab binary")?,
        kernel,
        initrd,
        mem_mib: args.mem.bytes() >> 20,
        options: RunOptions {
            runs: args.runs as usize,
            warmup: args.warmup as usize,
        },
        ssh: match (args.ssh, args.no_ssh) {
            (true, _) => SshPeers::Build,
            (_, true) => SshPeers::Off,
            _ => SshPeers::Auto,
        },
        flavor: args.flavor,
    };
    let report = bench.run(&Progress::stderr())?;
    out!("{}", vmlab::bench::table::render(&report));
    if let Some(path) = &args.json {
        report
            .write_json(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        vmlab::bench::chart::write(&report, path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed = report
        .contenders
        .iter()
        .any(|c| c.status == vmlab::bench::Status::Failed);
    Ok(if failed { 1 } else { 0 })
}

fn net_bench_mode(args: &BenchNetArgs) -> vmlab::bench::net::NetBenchMode {
    if args.nat {
        vmlab::bench::net::NetBenchMode::Nat
    } else {
        vmlab::bench::net::NetBenchMode::Switch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmlab::bench::net::NetBenchMode;

    fn bench_net(args: &[&str]) -> BenchNetArgs {
        let argv = ["vmlab", "bench", "net"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Bench(BenchCommand::Net(args)) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bench_net_compares_the_switch_unless_nat_is_asked() {
        let plain = bench_net(&[]);
        assert_eq!(net_bench_mode(&plain), NetBenchMode::Switch);
        assert_eq!((plain.runs, plain.seconds), (3, 5));
        let nat = bench_net(&["--nat", "--runs", "2", "--seconds", "4"]);
        assert_eq!(net_bench_mode(&nat), NetBenchMode::Nat);
        assert_eq!((nat.runs, nat.seconds), (2, 4));
        let argv = ["vmlab", "bench", "net", "--nat", "--runs", "0"];
        assert!(Cli::try_parse_from(argv).is_err(), "no rounds is refused");
    }
}
