//! gRPC for CSI Changed Block Tracking: the CSI `SnapshotMetadata` service (`csi.v1`) and the
//! Kubernetes `SnapshotMetadata` API (`snapshotmetadata`) served by the external-snapshot-metadata
//! sidecar.
//!
//! - [`client`]: one streaming client for both APIs, with TLS (private CA bundle, server name
//!   override), bearer tokens, per-call deadlines, paging, transparent resume of broken streams
//!   and normalization of whatever tuples a driver sends ([`normalize`]).
//! - [`server`]: a file-backed server that serves both APIs from a directory of snapshot images,
//!   used by tests, the quickstart and `cbt serve-metadata`.
//!
//! The `.proto` files under `proto/` are this project's own, written to the field numbers, names
//! and paths of the upstream specifications, and compiled at build time by `protox` (no `protoc`).

pub mod client;
pub mod error;
pub mod normalize;
pub mod ranges;
pub mod server;

pub use client::{
    ClientConfig, DEFAULT_DEADLINE, DEFAULT_MAX_COLLECTED_RANGES, DEFAULT_MAX_OUT_OF_ORDER,
    MetadataClient, MetadataRequest, MetadataStream, Query, RetryPolicy,
};
pub use error::{CsiError, ErrorKind};
pub use ranges::{BlockType, Extent, MetadataResult, MetadataSummary};

/// Generated protocol types and gRPC stubs.
pub mod pb {
    /// CSI `csi.v1`: Identity and SnapshotMetadata services.
    #[allow(missing_docs, clippy::all)]
    pub mod csi {
        tonic::include_proto!("csi.v1");
    }
    /// Kubernetes `snapshotmetadata`: the sidecar's SnapshotMetadata API.
    #[allow(missing_docs, clippy::all)]
    pub mod k8s {
        tonic::include_proto!("snapshotmetadata");
    }
    /// `grpc.health.v1`: standard health checking, also served by the sidecar.
    #[allow(missing_docs, clippy::all)]
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}
