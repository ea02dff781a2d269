//! The `vmlab` command: argument parsing and one small function per
//! subcommand; all the work happens in the library.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use vmlab::cli::ByteSize;
use vmlab::disk::{self, CloneMode, CloneOptions, CreateOptions, ImageFormat};

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
    /// Create, inspect and grow disk images.
    Disk {
        #[command(subcommand)]
        action: DiskCommand,
    },
    /// Clone a disk image: a linked qcow2 clone in constant time, or a full copy.
    Clone(CloneArgs),
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
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let code = match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            // One line: the error and its causes, joined.
            eprintln!("vmlab: error: {err:#}");
            1
        }
    };
    std::process::exit(code);
}

fn dispatch(command: Command) -> Result<i32> {
    match command {
        Command::Disk { action } => disk_cmd(action),
        Command::Clone(args) => clone_cmd(args),
    }
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
