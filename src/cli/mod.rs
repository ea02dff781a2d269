//! Argument types shared by every subcommand, parsed once here so that `run`,
//! `nat`, `disk` and the rest accept exactly the same spellings.

mod disk;
mod forward;
mod ingress;
mod mac;
mod size;
pub mod stdout;

pub use disk::{DiskParseError, DiskSpec};
pub use forward::{ForwardParseError, ForwardRule, Protocol};
pub use ingress::{IngressParseError, IngressProtocol, IngressRule};
pub use mac::{MacAddress, MacParseError};
pub use size::{ByteSize, SizeParseError};
