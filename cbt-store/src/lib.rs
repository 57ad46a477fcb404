//! Object stores (local directory, S3) and the CBT backup repository and engine built on them.
//!
//! [`store`] is the object-store boundary: the [`store::ObjectStore`] trait, its backends and
//! wrappers. The repository format and the backup/restore engine sit on top of it.

pub mod store;

pub mod chunk;
pub mod engine;
pub mod repo;

#[cfg(feature = "testing")]
pub mod testing;
