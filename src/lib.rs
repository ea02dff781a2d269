//! vmlab: a small type-2 hypervisor on KVM for virtualization labs.
//!
//! The crate is split the way data flows through it (see README.md):
//! `cli` parses what users type, `vmm` owns the machine and its vCPU
//! threads, `arch` lays out an x86-64 guest for boot, `devices` emulates what
//! the guest talks to, `net` is the userspace NAT and `disk` the block layer;
//! `bench` measures vmlab against its peers (QEMU, a container runtime);
//! `vmstate` saves a whole VM to a file and takes it back.

pub mod arch;
pub mod bench;
pub mod civil_time;
pub mod cli;
pub mod control;
pub mod devices;
pub mod dirs;
pub mod disk;
pub mod escape;
pub mod fds;
pub mod fsutil;
pub mod image;
pub mod key_value;
pub mod logging;
pub mod net;
pub mod network;
pub mod rate_limit;
pub mod seccomp;
pub mod switch;
pub mod vmm;
pub mod vmstate;
