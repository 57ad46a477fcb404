//! Pure types and algorithms for CBT block-volume backups.
//!
//! This crate owns the decisions, never the I/O: byte-range algebra ([`ranges`]), name rules for
//! anything that ends up in an object key ([`names`]), the versioned snapshot manifest
//! ([`manifest`], its format-2 segment tree in [`maptree`]), backup and restore plans ([`plan`]), garbage-collection reachability plus
//! retention ([`gc`]), escaping repository text for printing ([`text`]), and parsing the sizes
//! and durations users type ([`units`]), plus the one seeded generator of test data ([`testing`]). It has no async runtime, no network and no clock: time
//! is always passed in by the caller, so every function is deterministic and testable. The one
//! filesystem call is [`extents`], asking the kernel where a caller-opened file's data is
//! (`SEEK_DATA`/`SEEK_HOLE`), so that every crate walks sparse files by the same rules.

pub mod error;
pub mod exit;
pub mod extents;
pub mod gc;
pub mod lineage;
pub mod manifest;
pub mod maptree;
pub mod names;
pub mod plan;
pub mod ranges;
pub mod testing;
pub mod text;
pub mod time;
pub mod units;

pub use error::{CoreError, ErrorKind};
pub use manifest::{ChunkHash, ChunkMap, ChunkRef, ChunkState, Manifest};
pub use names::{SnapshotName, VolumeName};
pub use plan::{BackupPlan, RestorePlan};
pub use ranges::{ByteRange, ChunkGeometry, RangeSet};
pub use time::Timestamp;
