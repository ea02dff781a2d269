//! Errors the NAT reports to its caller.

use std::io;
use std::net::SocketAddrV4;

use crate::cli::ForwardRule;

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error("cannot forward {rule}: {addr} is not available ({cause}); choose another host port or stop what uses it")]
    ForwardBind {
        rule: ForwardRule,
        addr: SocketAddrV4,
        cause: io::Error,
    },
    #[error("cannot open TAP device '{name}': {cause} (it needs root or CAP_NET_ADMIN, or a TAP device created for this user with `ip tuntap add {name} mode tap user $USER`)")]
    Tap { name: String, cause: io::Error },
    #[error("no network device '{0}': vmlab uses an existing TAP and creates none (make it with `ip tuntap add {0} mode tap user $USER`, then set it up or enslave it to a bridge)")]
    TapMissing(String),
    #[error("network device '{0}' is not a TAP device: give the name of a TAP (ip tuntap add NAME mode tap), not a bridge or a physical interface")]
    NotATap(String),
    #[error("TAP device '{0}' is in use by another program (a TAP serves one reader): stop it, or use another TAP")]
    TapBusy(String),
    #[error("TAP device name '{0}' is invalid (1-15 characters, no '/' or spaces)")]
    TapName(String),
    #[error("cannot enter network namespace {}: {cause} (give a path like /run/netns/NAME; it needs root)", path.display())]
    Netns {
        path: std::path::PathBuf,
        cause: io::Error,
    },
    #[error(
        "TAP device '{name}' stopped working: {cause} (was it deleted, or its namespace removed?)"
    )]
    TapGone { name: String, cause: io::Error },
    #[error("NAT event loop failed: {0}")]
    EventLoop(io::Error),
}
