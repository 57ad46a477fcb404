//! Object stores (local directory, S3) and the CBT backup repository and engine built on them.
//!
//! [`store`] is the object-store boundary: the [`store::ObjectStore`] trait, its backends and
//! wrappers. The repository format and the backup/restore engine sit on top of it.
//!
//! Cargo feature `testing` adds the `testing` module: an in-process S3 server on
//! loopback (`testing::S3TestServer`) and the object-store conformance suite, for this
//! crate's tests and for users testing their own stores or tools.

pub mod store;

pub mod chunk;
pub mod crypto;
pub mod engine;
pub mod repo;

#[cfg(feature = "testing")]
pub mod testing;
