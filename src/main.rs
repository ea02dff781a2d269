//! The `vmlab` command: argument parsing and one small function per
//! subcommand; all the work happens in the library.

use anyhow::Result;
use clap::{Parser, Subcommand};

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
enum Command {}

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
    match command {}
}
