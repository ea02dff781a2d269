//! The block layer: one trait (`BlockBackend`) for every image format, raw
//! and qcow2 backends, and the image operations behind `vmlab disk` and
//! `vmlab clone` (create, info, resize, clone), the chain operations behind
//! snapshots (freeze, overlay, commit and merge), with QEMU-compatible
//! locking.
//!
//! Formats are recognised by content (the qcow2 magic), never by file name;
//! a backing file whose format the overlay records is opened as exactly that.

mod backend;
mod backing_policy;
mod clone;
mod commit;
mod create;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod info;
pub mod iovec;
mod layers;
mod lock;
mod open;
pub mod qcow2;
mod raw;
mod staging;

pub use backend::{BlockBackend, BlockStatus, ImageFormat};
pub use backing_policy::{BackingPolicy, BackingRefusal};
pub use clone::{clone_image, CloneMode, CloneOptions, CloneOutcome};
pub use commit::{commit_image, merge_into_backing, CommitOutcome};
pub(crate) use create::check_replaceable;
pub use create::{create_image, resize_image, CreateOptions, DEFAULT_CLUSTER_SIZE};
pub use error::{DiskError, Result};
pub use info::{human_size, image_info, ImageInfo};
pub use layers::{
    backing_chain, checked_backing_chain, freeze_top, open_overlay_over, overlay_onto,
    prepare_overlay_onto, unfreeze_top, FrozenTop, PreparedOverlay,
};
pub use lock::LockMode;
pub use open::{open_image, probe_format, OpenOptions};
pub use qcow2::Qcow2Image;
pub use raw::RawImage;
