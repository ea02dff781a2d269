//! The block layer: one trait (`BlockBackend`) for every image format, raw
//! and qcow2 backends, and the image operations behind `vmlab disk` and
//! `vmlab clone` (create, info, resize, clone), with QEMU-compatible locking.
//!
//! Formats are recognised by content (the qcow2 magic), never by file name;
//! a backing file whose format the overlay records is opened as exactly that.

mod backend;
mod backing_policy;
mod clone;
mod create;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod info;
pub mod iovec;
mod lock;
mod open;
pub mod qcow2;
mod raw;
mod staging;

pub use backend::{BlockBackend, BlockStatus, ImageFormat};
pub use backing_policy::{BackingPolicy, BackingRefusal};
pub use clone::{clone_image, CloneMode, CloneOptions, CloneOutcome};
pub(crate) use create::check_replaceable;
pub use create::{create_image, resize_image, CreateOptions, DEFAULT_CLUSTER_SIZE};
pub use error::{DiskError, Result};
pub use info::{image_info, ImageInfo};
pub use lock::LockMode;
pub use open::{open_image, probe_format, OpenOptions};
pub use qcow2::Qcow2Image;
pub use raw::RawImage;
