//! The `vmlab` command: argument parsing and one small function per
//! subcommand; all the work happens in the library.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use vmlab::bench::{BootBench, Progress, RunOptions};
use vmlab::cli::{ByteSize, DiskSpec, ForwardRule};
use vmlab::disk::{self, CloneMode, CloneOptions, CreateOptions, ImageFormat};
use vmlab::net::{ForwardListeners, Nat, NatConfig, Outbound, Tap, TapNat};
use vmlab::vmm::{BootSource, ConsoleConfig, RunReport, VmConfig};

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
    Run(RunArgs),
    /// Run the userspace NAT on an existing TAP device (e.g. one moved into a
    /// network namespace), the way slirp4netns serves a namespace.
    Nat(NatArgs),
    /// Create, inspect and grow disk images.
    Disk {
        #[command(subcommand)]
        action: DiskCommand,
    },
    /// Clone a disk image: a linked qcow2 clone in constant time, or a full copy.
    Clone(CloneArgs),
    /// Measure vmlab against its peers.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The default Debian guest image.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build the Debian base image (needs root: debootstrap) unless this
    /// recipe's is cached; prints its path.
    Build {
        /// Rebuild even if cached (refused while a VM uses the image).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Boot time to the guest's init: vmlab, QEMU microvm and runc,
    /// interleaved, with vmlab's own CPU and memory cost.
    Boot(BenchBootArgs),
}

#[derive(Args, Debug)]
struct BenchBootArgs {
    /// Guest kernel to boot [default: the default guest's].
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs for the VMs, unpacked as the container's root filesystem
    /// [default: the default guest's].
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
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest memory, e.g. 512M or 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    mem: ByteSize,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=254))]
    cpus: u8,
    /// Name of the VM.
    #[arg(long, default_value = "vmlab")]
    name: String,
    /// A disk image (raw or qcow2, told apart by content), PATH or PATH,ro;
    /// repeat for more: /dev/vda, /dev/vdb, ... in this order.
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskSpec>,
    /// Print milliseconds to the first vCPU entry and to the guest's
    /// userspace-started signal (also shown with -v).
    #[arg(long)]
    boot_timer: bool,
    /// At exit, write the boot timeline, memory footprint and exit reason
    /// as JSON (for benchmarks).
    #[arg(long, value_name = "PATH")]
    report_json: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct NatArgs {
    /// TAP device to serve (created if missing; needs CAP_NET_ADMIN).
    #[arg(long, value_name = "DEV")]
    tap: String,
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
    /// Only let the namespace reach the host itself (10.0.2.2 and the DNS relay).
    #[arg(long)]
    host_only: bool,
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
    },
    /// Show format, virtual size, allocated bytes and backing chain.
    Info { path: PathBuf },
    /// Grow an image to SIZE (e.g. 20G).
    Resize { path: PathBuf, size: ByteSize },
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
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp_millis()
        .parse_env("VMLAB_LOG")
        .init();
}

fn main() {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
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
    init_logging(cli.verbose);
    let code = match dispatch(cli.command, cli.verbose, started) {
        Ok(code) => code,
        Err(err) => {
            // One line: the error and its causes, joined.
            eprintln!("vmlab: error: {err:#}");
            1
        }
    };
    std::process::exit(code);
}

fn dispatch(command: Command, verbose: u8, started: Instant) -> Result<i32> {
    match command {
        Command::Run(args) => run(args, verbose, started),
        Command::Nat(args) => nat(args),
        Command::Disk { action } => disk_cmd(action),
        Command::Clone(args) => clone_cmd(args),
        Command::Bench(BenchCommand::Boot(args)) => bench_boot(args),
        Command::Image(ImageCommand::Build { force }) => image_build(force),
    }
}

fn run(args: RunArgs, verbose: u8, started: Instant) -> Result<i32> {
    let (kernel, initrd) = match args.kernel {
        Some(kernel) => (kernel, args.initrd),
        None => {
            let guest = vmlab::image::default_guest()?;
            (guest.kernel, args.initrd.or(Some(guest.initrd)))
        }
    };
    let config = VmConfig {
        name: args.name,
        cpus: args.cpus,
        mem_size: args.mem.bytes(),
        boot: BootSource::Linux {
            kernel,
            initrd,
            cmdline: args.cmdline,
        },
        console: ConsoleConfig::stdio(),
        disks: args.disks,
        boot_timer: args.boot_timer,
        started,
    };
    let vm = vmlab::vmm::Vm::build(config)?;
    let timeline = vm.timeline();
    let (reason, footprint) = vm.run_measured()?;
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
    eprintln!("vmlab: {reason}");
    Ok(reason.exit_code())
}

fn nat(args: NatArgs) -> Result<i32> {
    // Forward ports first: a port in use must fail before anything else.
    let listeners = ForwardListeners::bind(&args.forwards)?;
    let tap = match &args.netns {
        Some(path) => Tap::open_in_netns(&args.tap, path)?,
        None => Tap::open(&args.tap)?,
    };
    let config = NatConfig {
        mtu: args.mtu,
        hostname: args.hostname,
        max_flows: args.max_flows as usize,
        forwards: args.forwards,
        outbound: if args.host_only {
            Outbound::HostOnly
        } else {
            Outbound::Any
        },
        ..NatConfig::with_host_resolvers()
    };
    log::info!("nat: serving tap {} (mtu {})", tap.name(), config.mtu);
    let backend = Arc::new(Mutex::new(TapNat::new(Nat::new(config, listeners), tap)?));
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
        } => {
            let opts = CreateOptions {
                size: size.map(ByteSize::bytes),
                format,
                cluster_size: cluster_size.bytes(),
                backing,
                force,
            };
            disk::create_image(&path, &opts)?;
        }
        DiskCommand::Info { path } => {
            let chain = disk::image_info(&path)?;
            for (depth, info) in chain.iter().enumerate() {
                if depth > 0 {
                    println!("\nbacking image {depth}:");
                }
                print!("{info}");
            }
        }
        DiskCommand::Resize { path, size } => disk::resize_image(&path, size.bytes())?,
    }
    Ok(0)
}

fn clone_cmd(args: CloneArgs) -> Result<i32> {
    let opts = CloneOptions {
        mode: if args.full {
            CloneMode::Full
        } else {
            CloneMode::Linked
        },
        format: args.format,
        force: args.force,
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

fn image_build(force: bool) -> Result<i32> {
    let outcome = vmlab::image::build_image(force)?;
    let index = &outcome.image.index;
    if outcome.built {
        eprintln!(
            "vmlab: built the Debian {} image in {:.1} s: {} MiB on disk, {} GiB virtual",
            index.suite,
            outcome.elapsed.as_secs_f64(),
            index.file_size >> 20,
            index.virtual_size >> 30
        );
    } else {
        log::info!("the Debian image of recipe {} is cached", index.recipe);
    }
    println!("{}", outcome.image.base.display());
    Ok(0)
}

fn bench_boot(args: BenchBootArgs) -> Result<i32> {
    vmlab::bench::check_host()?;
    for path in args.json.iter().chain(&args.plot) {
        vmlab::bench::check_output_path(path)?;
    }
    let (kernel, initrd) = match (args.kernel, args.initrd) {
        (Some(kernel), Some(initrd)) => (kernel, initrd),
        (kernel, initrd) => {
            let guest = vmlab::image::default_guest()?;
            (
                kernel.unwrap_or(guest.kernel),
                initrd.unwrap_or(guest.initrd),
            )
        }
    };
    for (what, path) in [("kernel", &kernel), ("initrd", &initrd)] {
        anyhow::ensure!(
            path.is_file(),
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
    };
    let report = bench.run(&Progress::stderr())?;
    print!("{}", vmlab::bench::table::render(&report));
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
