//! Object stores (local directory, S3) and the CBT backup repository and engine built on them.
//!
//! [`store`] is the object-store boundary: the [`store::ObjectStore`] trait, its backends and
//! wrappers. The repository format and the backup/restore engine sit on top of it.
//!
//! Cargo features:
//! - `s3` (default): the S3 backend (`store::s3`, on the AWS SDK). A program that embeds only
//!   the local directory store turns default features off and does not compile the SDK; an
//!   `s3://` URL is then refused with [`store::StoreError::InvalidUrl`].
//! - `csi`: plan backups from a SnapshotMetadata service (`engine::cbt`).
//! - `testing` (implies `s3`): the `testing` module, an in-process S3 server on loopback
//!   (`testing::S3TestServer`) and the object-store conformance suite, and `store::fault`, the
//!   fault-injecting store wrapper, for this crate's tests and for users testing their own
//!   stores or tools.

pub mod store;

mod aligned;

pub mod chunk;
mod crc;
pub mod crypto;
pub mod engine;
pub mod repo;

#[cfg(feature = "testing")]
pub mod testing;
