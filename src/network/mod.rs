//! Lab networks: VMs and network namespaces on one switched subnet, with a
//! gateway (DHCP, DNS for member names, NAT to the outside) — VirtualBox's
//! "NAT Network", Vagrant's private network.
//!
//! A network is defined once (`network create`, a file in the state
//! directory) and runs as a small process of its own, started by its first
//! member and gone with its last: a [`Switch`](crate::switch::Switch) whose
//! ports are the members' Unix sockets and TAP devices, and the
//! [`Nat`](crate::net::Nat) as the gateway's port.

pub mod client;
pub mod command;
mod daemon;
pub mod error;
pub mod link;
mod member;
mod netns;
pub mod protocol;
pub mod store;
pub mod subnet;
pub mod view;

pub use command::NetworkCommand;
pub use error::NetworkError;
pub use store::{NetworkDef, NetworkDir};
pub use subnet::{Subnet, USER_NET};
