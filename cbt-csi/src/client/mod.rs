//! The streaming metadata client for both APIs (CSI `csi.v1` and the Kubernetes
//! `snapshotmetadata` sidecar API).
//!
//! One [`MetadataClient`] owns a gRPC channel (unix socket, plain TCP or TLS with a private CA).
//! [`MetadataClient::stream`] opens a [`MetadataStream`] that yields normalized batches of
//! extents, one per response message, and transparently resumes a broken stream from the end of
//! the last range received, with exponential backoff and jitter.
//!
//! # Guarantees
//! - A call returns `Ok(None)` (end) only after the server's clean end-of-stream, so a completed
//!   call covered the whole volume from the starting offset.
//! - A stream the server ends at its own time limit (DEADLINE_EXCEEDED or CANCELLED before this
//!   client's deadline, as the Kubernetes sidecar does at `--max-streaming-duration-min`) is
//!   resumed like a broken one; attempts that delivered new ranges do not count against the
//!   [`RetryPolicy`], so a listing cut any number of times completes, while a limit that cuts
//!   before any new range fails with [`CsiError::ServerTimeLimit`] after bounded attempts. Only
//!   this client's own deadline yields [`CsiError::DeadlineExceeded`].
//! - Across resumes no range is lost and, for a driver that streams in order (as the spec
//!   requires), none is emitted twice; see [`crate::normalize`] for sloppy drivers.
//! - Memory: one decoded response message at a time, at most
//!   [`ClientConfig::max_message_bytes`] on the wire (16 MiB by default, roughly 1.5 million
//!   tuples; with `max_results` = N, about 48 N bytes decoded) plus the batch handed to the
//!   caller. The collecting helpers additionally hold the merged result (16 bytes per extent).
//!   Measured (`tests/bounded_memory.rs`, counting allocator, server and client in one process):
//!   1,000,000 ranges at 10,000 per message peak at about 2 MB of heap when streamed, against
//!   about 18 MB when collected.
//! - Whatever the server streams, a call ends: by default within [`DEFAULT_DEADLINE`]; after
//!   [`ClientConfig::max_out_of_order`] ranges sent out of order (a protocol violation naming
//!   them); and [`MetadataClient::collect`] holds at most
//!   [`ClientConfig::max_collected_ranges`] merged ranges, merging repeats as they arrive.

mod backoff;
mod connect;
pub(crate) use connect::error_chain;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;
use tonic::codec::Streaming;
use tonic::transport::Channel;

use crate::error::{Call, CsiError, is_retryable};
use crate::normalize::{Normalizer, RawMessage};
use crate::pb;
use crate::ranges::{BlockType, Extent, MetadataResult, MetadataSummary, merge_extents};

pub use backoff::RetryPolicy;

/// Supplies the bearer token for each attempt, so a long call can use a fresh token on resume.
#[async_trait::async_trait]
pub trait TokenSource: Send + Sync + std::fmt::Debug {
    /// Returns the token to send; an error aborts the call.
    async fn token(&self) -> Result<String, String>;
}

/// A token that never changes.
#[derive(Clone)]
pub struct StaticToken(pub String);

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticToken(<redacted>)")
    }
}

#[async_trait::async_trait]
impl TokenSource for StaticToken {
    async fn token(&self) -> Result<String, String> {
        Ok(self.0.clone())
    }
}

/// How to reach and talk to a metadata service.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `unix:///path/socket`, `https://host:port`, `host:port` (TLS) or `http://host:port` (plain).
    pub endpoint: String,
    /// PEM CA bundle the server certificate must chain to (the SnapshotMetadataService
    /// `caCert`); without it, the system roots are used for TLS endpoints.
    pub ca_pem: Option<Vec<u8>>,
    /// TLS server name to verify instead of the endpoint's host.
    pub server_name: Option<String>,
    /// Bearer token: CSI API as `authorization: Bearer` metadata, Kubernetes API in the
    /// request's `security_token` field.
    pub token: Option<Arc<dyn TokenSource>>,
    /// Timeout for establishing the connection.
    pub connect_timeout: Duration,
    /// Deadline for a whole call, resumes included ([`DEFAULT_DEADLINE`] unless changed);
    /// `None` waits forever, which a service that never ends its stream turns into a hang.
    pub deadline: Option<Duration>,
    /// Resume behaviour for broken streams.
    pub retry: RetryPolicy,
    /// Largest response message accepted (bytes); bounds the memory of one batch. A driver
    /// sending larger messages fails the call with a protocol violation (lower max_results).
    pub max_message_bytes: usize,
    /// Most ranges a call accepts out of order (starting below ranges already received) before
    /// it fails with a protocol violation; the spec requires ascending order, and every such
    /// range is handed on (and, by [`MetadataClient::collect`], buffered) until merged.
    pub max_out_of_order: u64,
    /// Most distinct ranges [`MetadataClient::collect`] holds (16 bytes each) before it fails
    /// with [`CsiError::AnswerTooLarge`]; stream with [`MetadataClient::stream`] for more.
    pub max_collected_ranges: usize,
}

/// Default [`ClientConfig::deadline`]: one hour per call, resumes included (a listing of a
/// large volume takes minutes; a service that never ends its stream is cut off).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(3600);
/// Default [`ClientConfig::max_out_of_order`].
pub const DEFAULT_MAX_OUT_OF_ORDER: u64 = 1 << 20;
/// Default [`ClientConfig::max_collected_ranges`]: 16 Mi ranges (256 MiB).
pub const DEFAULT_MAX_COLLECTED_RANGES: usize = 16 << 20;

impl ClientConfig {
    /// A configuration with defaults: no TLS CA, no token, 10 s connect timeout, a
    /// [`DEFAULT_DEADLINE`] per call, and the default bounds on what a server may send.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            ca_pem: None,
            server_name: None,
            token: None,
            connect_timeout: Duration::from_secs(10),
            deadline: Some(DEFAULT_DEADLINE),
            retry: RetryPolicy::default(),
            max_message_bytes: 16 << 20,
            max_out_of_order: DEFAULT_MAX_OUT_OF_ORDER,
            max_collected_ranges: DEFAULT_MAX_COLLECTED_RANGES,
        }
    }

    /// Removes the per-call deadline (a call then waits as long as the service streams).
    pub fn without_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }

    /// Trusts only the CAs in this PEM bundle.
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Verifies the server certificate against this name.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Uses a fixed bearer token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Arc::new(StaticToken(token.into())));
        self
    }

    /// Uses a token source asked once per attempt.
    pub fn with_token_source(mut self, source: Arc<dyn TokenSource>) -> Self {
        self.token = Some(source);
        self
    }

    /// Sets the deadline for each whole call.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the resume policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

/// What to ask, in which API flavour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// CSI GetMetadataAllocated of a snapshot handle.
    CsiAllocated {
        /// CSI snapshot id (handle).
        snapshot_id: String,
    },
    /// CSI GetMetadataDelta between two snapshot handles of one volume.
    CsiDelta {
        /// Older snapshot handle.
        base_snapshot_id: String,
        /// Newer snapshot handle.
        target_snapshot_id: String,
    },
    /// Kubernetes API GetMetadataAllocated of a VolumeSnapshot.
    K8sAllocated {
        /// Namespace of the VolumeSnapshot.
        namespace: String,
        /// VolumeSnapshot name.
        snapshot_name: String,
    },
    /// Kubernetes API GetMetadataDelta: base as CSI handle, target as VolumeSnapshot name.
    K8sDelta {
        /// Namespace of the target VolumeSnapshot.
        namespace: String,
        /// CSI handle of the base snapshot (its VolumeSnapshotContent `status.snapshotHandle`).
        base_snapshot_id: String,
        /// VolumeSnapshot name of the target.
        target_snapshot_name: String,
    },
}

impl Query {
    /// Which RPC this query calls.
    pub fn call(&self) -> Call {
        match self {
            Self::CsiAllocated { .. } | Self::K8sAllocated { .. } => Call::Allocated,
            Self::CsiDelta { .. } | Self::K8sDelta { .. } => Call::Delta,
        }
    }

    /// True for the Kubernetes sidecar API.
    pub fn is_kubernetes(&self) -> bool {
        matches!(self, Self::K8sAllocated { .. } | Self::K8sDelta { .. })
    }

    /// The snapshots named, for messages.
    pub fn describe(&self) -> String {
        match self {
            Self::CsiAllocated { snapshot_id } => snapshot_id.clone(),
            Self::CsiDelta {
                base_snapshot_id,
                target_snapshot_id,
            } => {
                format!("{base_snapshot_id} -> {target_snapshot_id}")
            }
            Self::K8sAllocated {
                namespace,
                snapshot_name,
            } => format!("{namespace}/{snapshot_name}"),
            Self::K8sDelta {
                namespace,
                base_snapshot_id,
                target_snapshot_name,
            } => {
                format!("{base_snapshot_id} -> {namespace}/{target_snapshot_name}")
            }
        }
    }

    fn base_and_target(&self) -> (String, String) {
        match self {
            Self::CsiDelta {
                base_snapshot_id,
                target_snapshot_id,
            } => (base_snapshot_id.clone(), target_snapshot_id.clone()),
            Self::K8sDelta {
                namespace,
                base_snapshot_id,
                target_snapshot_name,
            } => (
                base_snapshot_id.clone(),
                format!("{namespace}/{target_snapshot_name}"),
            ),
            other => (String::new(), other.describe()),
        }
    }
}

/// One metadata call: the query, where to start and how many tuples per message.
#[derive(Clone, PartialEq, Eq)]
pub struct MetadataRequest {
    /// What to ask.
    pub query: Query,
    /// Byte offset to start from (0 for the whole volume).
    pub starting_offset: u64,
    /// Tuples per response message; 0 lets the server choose.
    pub max_results: u32,
    /// CSI secrets (CSI API only; never logged).
    pub secrets: std::collections::HashMap<String, String>,
}

impl MetadataRequest {
    /// A request for the whole volume with server-chosen message sizes.
    pub fn new(query: Query) -> Self {
        Self {
            query,
            starting_offset: 0,
            max_results: 0,
            secrets: Default::default(),
        }
    }

    /// Starts at `offset`.
    pub fn starting_at(mut self, offset: u64) -> Self {
        self.starting_offset = offset;
        self
    }

    /// Caps tuples per message.
    pub fn max_results(mut self, n: u32) -> Self {
        self.max_results = n;
        self
    }

    /// Sends these CSI secrets (CSI API only; the Kubernetes sidecar supplies its own).
    pub fn with_secrets(mut self, secrets: std::collections::HashMap<String, String>) -> Self {
        self.secrets = secrets;
        self
    }
}

impl std::fmt::Debug for MetadataRequest {
    // Secret values never reach logs: only their keys are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<&String> = self.secrets.keys().collect();
        keys.sort();
        f.debug_struct("MetadataRequest")
            .field("query", &self.query)
            .field("starting_offset", &self.starting_offset)
            .field("max_results", &self.max_results)
            .field("secret_keys", &keys)
            .finish()
    }
}

/// One response message after normalization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// New extents, sorted and disjoint.
    pub extents: Vec<Extent>,
    /// Block type of the stream.
    pub block_type: BlockType,
    /// Volume capacity in bytes.
    pub capacity: u64,
}

/// A connected client for one endpoint; cheap to clone.
#[derive(Debug, Clone)]
pub struct MetadataClient {
    channel: Channel,
    config: Arc<ClientConfig>,
}

impl MetadataClient {
    /// Connects to the endpoint of `config`.
    ///
    /// # Errors
    /// [`CsiError::InvalidEndpoint`], [`CsiError::Tls`] or [`CsiError::Connect`].
    pub async fn connect(config: ClientConfig) -> Result<Self, CsiError> {
        let channel = connect::connect(&config).await?;
        Ok(Self {
            channel,
            config: Arc::new(config),
        })
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Opens a resumable stream of normalized batches for `request`.
    pub fn stream(&self, request: MetadataRequest) -> MetadataStream {
        MetadataStream::new(self.clone(), request)
    }

    /// Runs the call to completion, handing each batch to `f`; an error from `f` cancels the call.
    ///
    /// # Errors
    /// Any [`CsiError`] of the call, or [`CsiError::Consumer`] wrapping the callback's error.
    pub async fn for_each_batch<F, E>(
        &self,
        request: MetadataRequest,
        mut f: F,
    ) -> Result<MetadataSummary, CsiError>
    where
        F: FnMut(&Batch) -> Result<(), E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut s = self.stream(request);
        while let Some(b) = s.next_batch().await? {
            f(&b).map_err(|e| CsiError::Consumer { source: e.into() })?;
        }
        Ok(s.summary())
    }

    /// Runs the call to completion and collects sorted, merged extents with totals.
    ///
    /// Memory grows with the number of distinct extents in the answer (16 bytes each), up to
    /// [`ClientConfig::max_collected_ranges`]: ranges received out of order are merged in
    /// whenever as many have accumulated as the merged list holds, so repeats cost no memory.
    ///
    /// # Errors
    /// Any [`CsiError`] of the call; [`CsiError::AnswerTooLarge`] past the bound.
    pub async fn collect(&self, request: MetadataRequest) -> Result<MetadataResult, CsiError> {
        let call = request.query.call();
        let limit = self.config.max_collected_ranges;
        let mut s = self.stream(request);
        let mut extents: Vec<Extent> = Vec::new();
        // Extents at [..merged_len] are sorted and disjoint; the rest arrived out of order.
        let mut merged_len = 0usize;
        while let Some(b) = s.next_batch().await? {
            for e in b.extents {
                match extents.last_mut() {
                    Some(last) if e.offset == last.end() => last.len += e.len,
                    Some(last) if e.offset < last.end() => extents.push(e),
                    _ => {
                        extents.push(e);
                        if merged_len + 1 == extents.len() {
                            merged_len += 1;
                        }
                    }
                }
            }
            let unsorted = extents.len() - merged_len;
            if unsorted > 0 && unsorted >= merged_len.max(4096) {
                merge_extents(&mut extents);
                merged_len = extents.len();
            }
            if extents.len() > limit {
                merge_extents(&mut extents);
                merged_len = extents.len();
                if extents.len() > limit {
                    return Err(CsiError::AnswerTooLarge {
                        call,
                        ranges: extents.len() as u64,
                        limit: limit as u64,
                    });
                }
            }
        }
        if merged_len < extents.len() {
            merge_extents(&mut extents);
        }
        let mut summary = s.summary();
        summary.ranges = extents.len() as u64;
        summary.bytes = extents.iter().map(|e| e.len).sum();
        Ok(MetadataResult { extents, summary })
    }

    /// Collects the call's answer directly as cbt-core's range set, with totals.
    ///
    /// # Errors
    /// Any [`CsiError`] of the call.
    pub async fn collect_range_set(
        &self,
        request: MetadataRequest,
    ) -> Result<(cbt_core::RangeSet, MetadataSummary), CsiError> {
        let r = self.collect(request).await?;
        Ok((r.to_range_set(), r.summary))
    }

    /// Asks the CSI Identity service for the plugin name, version and whether it advertises the
    /// SNAPSHOT_METADATA_SERVICE capability (CSI endpoints only).
    ///
    /// # Errors
    /// [`CsiError::Status`] (or a more specific variant) if the plugin answers with an error.
    pub async fn plugin_info(&self) -> Result<PluginInfo, CsiError> {
        let mut c = pb::csi::identity_client::IdentityClient::new(self.channel.clone());
        let info = c
            .get_plugin_info(pb::csi::GetPluginInfoRequest {})
            .await
            .map_err(|s| {
                map_status(
                    &Query::CsiAllocated {
                        snapshot_id: String::new(),
                    },
                    0,
                    s,
                )
            })?
            .into_inner();
        let caps = c
            .get_plugin_capabilities(pb::csi::GetPluginCapabilitiesRequest {})
            .await
            .map_err(|s| {
                map_status(
                    &Query::CsiAllocated {
                        snapshot_id: String::new(),
                    },
                    0,
                    s,
                )
            })?
            .into_inner();
        let snapshot_metadata = caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(pb::csi::plugin_capability::Type::Service(s))
                if s.r#type == pb::csi::plugin_capability::service::Type::SnapshotMetadataService as i32)
        });
        Ok(PluginInfo {
            name: info.name,
            vendor_version: info.vendor_version,
            snapshot_metadata,
        })
    }
}

impl MetadataClient {
    /// Asks `grpc.health.v1.Health` whether `service` ("" = the whole server) is SERVING, as
    /// the Kubernetes sidecar reports once its driver is ready; an unknown service is `false`.
    ///
    /// # Errors
    /// The mapped status if the check itself fails (e.g. UNIMPLEMENTED without a health service).
    pub async fn health(&self, service: &str) -> Result<bool, CsiError> {
        let mut c = pb::health::health_client::HealthClient::new(self.channel.clone());
        let req = pb::health::HealthCheckRequest {
            service: service.to_string(),
        };
        match c.check(req).await {
            Ok(r) => Ok(r.into_inner().status
                == pb::health::health_check_response::ServingStatus::Serving as i32),
            // The health protocol answers NOT_FOUND for a service it does not know: not serving.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(map_status(
                &Query::CsiAllocated {
                    snapshot_id: String::new(),
                },
                0,
                s,
            )),
        }
    }
}

/// What the CSI Identity service reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Driver name.
    pub name: String,
    /// Driver version.
    pub vendor_version: String,
    /// Whether SNAPSHOT_METADATA_SERVICE is advertised.
    pub snapshot_metadata: bool,
}

enum Attempt {
    CsiAllocated(Streaming<pb::csi::GetMetadataAllocatedResponse>),
    CsiDelta(Streaming<pb::csi::GetMetadataDeltaResponse>),
    K8sAllocated(Streaming<pb::k8s::GetMetadataAllocatedResponse>),
    K8sDelta(Streaming<pb::k8s::GetMetadataDeltaResponse>),
}

fn tuples_csi(v: &[pb::csi::BlockMetadata]) -> Vec<(i64, i64)> {
    v.iter().map(|b| (b.byte_offset, b.size_bytes)).collect()
}

fn tuples_k8s(v: &[pb::k8s::BlockMetadata]) -> Vec<(i64, i64)> {
    v.iter().map(|b| (b.byte_offset, b.size_bytes)).collect()
}

impl Attempt {
    async fn message(&mut self) -> Result<Option<RawMessage>, Status> {
        Ok(match self {
            Self::CsiAllocated(s) => s.message().await?.map(|m| RawMessage {
                block_type: m.block_metadata_type,
                capacity: m.volume_capacity_bytes,
                tuples: tuples_csi(&m.block_metadata),
            }),
            Self::CsiDelta(s) => s.message().await?.map(|m| RawMessage {
                block_type: m.block_metadata_type,
                capacity: m.volume_capacity_bytes,
                tuples: tuples_csi(&m.block_metadata),
            }),
            Self::K8sAllocated(s) => s.message().await?.map(|m| RawMessage {
                block_type: m.block_metadata_type,
                capacity: m.volume_capacity_bytes,
                tuples: tuples_k8s(&m.block_metadata),
            }),
            Self::K8sDelta(s) => s.message().await?.map(|m| RawMessage {
                block_type: m.block_metadata_type,
                capacity: m.volume_capacity_bytes,
                tuples: tuples_k8s(&m.block_metadata),
            }),
        })
    }
}

/// A resumable stream of normalized batches for one call. Obtain it from
/// [`MetadataClient::stream`]; pull with [`MetadataStream::next_batch`] or adapt with
/// [`MetadataStream::into_stream`].
pub struct MetadataStream {
    client: MetadataClient,
    request: MetadataRequest,
    norm: Normalizer,
    current: Option<Attempt>,
    attempt_start_offset: u64,
    failures: u32,
    attempts: u32,
    deadline_at: Option<Instant>,
    done: bool,
    rng: backoff::Jitter,
    emitted_ranges: u64,
    emitted_bytes: u64,
    last_end: Option<u64>,
}

impl std::fmt::Debug for MetadataStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadataStream")
            .field("query", &self.request.query)
            .field("resume_offset", &self.norm.resume_offset())
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl MetadataStream {
    fn new(client: MetadataClient, request: MetadataRequest) -> Self {
        let deadline_at = client.config.deadline.map(|d| Instant::now() + d);
        let rng = backoff::Jitter::new(client.config.retry.seed);
        Self {
            norm: Normalizer::new(request.starting_offset)
                .with_max_out_of_order(client.config.max_out_of_order),
            attempt_start_offset: request.starting_offset,
            client,
            request,
            current: None,
            failures: 0,
            attempts: 0,
            deadline_at,
            done: false,
            rng,
            emitted_ranges: 0,
            emitted_bytes: 0,
            last_end: None,
        }
    }

    /// Where the call would resume if the stream broke now.
    pub fn resume_offset(&self) -> u64 {
        self.norm.resume_offset()
    }

    /// Totals so far (complete once `next_batch` returned `Ok(None)`). `ranges` counts extents
    /// as if touching extents of consecutive batches were merged (as [`MetadataClient::collect`]
    /// does); the batches themselves are not merged with each other.
    pub fn summary(&self) -> MetadataSummary {
        MetadataSummary {
            volume_capacity_bytes: self.norm.capacity(),
            block_type: self.norm.block_type(),
            block_size: self.norm.block_size(),
            ranges: self.emitted_ranges,
            bytes: self.emitted_bytes,
            tuples_received: self.norm.tuples_received(),
            messages: self.norm.messages(),
            attempts: self.attempts,
            out_of_order_tuples: self.norm.out_of_order(),
        }
    }

    /// Adapts this stream into a `futures::Stream` of batches.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Batch, CsiError>> + Send {
        futures::stream::try_unfold(self, |mut s| async move {
            Ok(s.next_batch().await?.map(|b| (b, s)))
        })
    }

    /// Next batch of new extents, `Ok(None)` after the server's clean end-of-stream.
    ///
    /// Batches with no new extent are skipped. Broken streams are resumed according to the
    /// [`RetryPolicy`].
    ///
    /// # Errors
    /// Non-retryable statuses as their typed variants, [`CsiError::ProtocolViolation`],
    /// [`CsiError::DeadlineExceeded`], [`CsiError::RetriesExhausted`], [`CsiError::Token`].
    pub async fn next_batch(&mut self) -> Result<Option<Batch>, CsiError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.current.is_none() {
                match self.open().await {
                    Ok(a) => self.current = Some(a),
                    Err(Failure::Fatal(e)) => {
                        self.done = true;
                        return Err(e);
                    }
                    Err(Failure::Retry(status)) => {
                        self.after_failure(status).await?;
                        continue;
                    }
                }
            }
            let Some(attempt) = self.current.as_mut() else {
                continue;
            };
            let next = match self.deadline_at {
                Some(at) => match tokio::time::timeout_at(at, attempt.message()).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.done = true;
                        return Err(self.deadline_error());
                    }
                },
                None => attempt.message().await,
            };
            match next {
                Ok(Some(raw)) => {
                    let extents = self.norm.accept(&raw).map_err(|v| {
                        self.done = true;
                        CsiError::ProtocolViolation {
                            call: self.request.query.call(),
                            offset: v.offset,
                            detail: v.detail,
                        }
                    })?;
                    if self.norm.resume_offset() > self.attempt_start_offset {
                        self.failures = 0;
                    }
                    if extents.is_empty() {
                        continue;
                    }
                    // Count ranges as merged across batches, like the collected result.
                    let touching = extents
                        .first()
                        .is_some_and(|e| Some(e.offset) == self.last_end);
                    self.emitted_ranges += extents.len() as u64 - u64::from(touching);
                    self.last_end = extents.last().map(|e| e.end());
                    self.emitted_bytes += extents.iter().map(|e| e.len).sum::<u64>();
                    let block_type = self.norm.block_type().unwrap_or(BlockType::VariableLength);
                    return Ok(Some(Batch {
                        extents,
                        block_type,
                        capacity: self.norm.capacity().unwrap_or(0),
                    }));
                }
                Ok(None) => {
                    self.done = true;
                    self.current = None;
                    return Ok(None);
                }
                Err(status) => {
                    self.current = None;
                    if !self.resumable(&status) {
                        self.done = true;
                        return Err(self.map(status));
                    }
                    self.after_failure(status).await?;
                }
            }
        }
    }

    /// Whether a failed attempt is resumed: retryable codes, and a DEADLINE_EXCEEDED or
    /// CANCELLED that this client's own deadline cannot explain. The Kubernetes sidecar ends
    /// every call at its stream time limit with DEADLINE_EXCEEDED after the messages sent so
    /// far (contracts §7), and a driver may do the same; such a cut is resumed like a broken
    /// connection, not reported as the client's deadline.
    fn resumable(&self, status: &Status) -> bool {
        match status.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => !self.own_deadline_passed(),
            code => is_retryable(code),
        }
    }

    /// True once this client's deadline has (nearly) passed. The margin covers a server that
    /// enforces the `grpc-timeout` we sent and answers a moment before our own timer fires.
    fn own_deadline_passed(&self) -> bool {
        const MARGIN: Duration = Duration::from_millis(250);
        self.deadline_at
            .is_some_and(|at| Instant::now() + MARGIN >= at)
    }

    fn map(&self, status: Status) -> CsiError {
        // tonic reports an oversized message as OUT_OF_RANGE; it is not about the offset.
        if status.code() == tonic::Code::OutOfRange
            && status.message().contains("message length too large")
        {
            return CsiError::ProtocolViolation {
                call: self.request.query.call(),
                offset: None,
                detail: format!(
                    "{} (ClientConfig::max_message_bytes); request fewer tuples per message with max_results",
                    status.message()
                ),
            };
        }
        if matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ) && self.own_deadline_passed()
        {
            return self.deadline_error();
        }
        map_status(&self.request.query, self.attempt_start_offset, status)
    }

    fn deadline_error(&self) -> CsiError {
        CsiError::DeadlineExceeded {
            call: self.request.query.call(),
            deadline: self.client.config.deadline.unwrap_or_default(),
            starting_offset: self.request.starting_offset,
            resume_offset: self.norm.resume_offset(),
            capacity: self.norm.capacity(),
            attempts: self.attempts,
        }
    }

    async fn after_failure(&mut self, status: Status) -> Result<(), CsiError> {
        self.failures += 1;
        let policy = &self.client.config.retry;
        if status.code() == tonic::Code::DeadlineExceeded {
            tracing::info!(
                message = status.message(),
                failures = self.failures,
                resume_offset = self.norm.resume_offset(),
                "the service ended the stream at its time limit; resuming"
            );
        } else {
            tracing::debug!(code = ?status.code(), message = status.message(), failures = self.failures,
                resume_offset = self.norm.resume_offset(), "metadata stream broke");
        }
        if self.failures >= policy.max_attempts.max(1) {
            self.done = true;
            let call = self.request.query.call();
            if status.code() == tonic::Code::DeadlineExceeded {
                return Err(CsiError::ServerTimeLimit {
                    call,
                    attempts: self.failures,
                    message: status.message().to_string(),
                    resume_offset: self.norm.resume_offset(),
                });
            }
            if self.request.query.is_kubernetes()
                && status.code() == tonic::Code::Unavailable
                && self.norm.messages() == 0
            {
                return Err(CsiError::SnapshotUnavailable {
                    call,
                    snapshots: self.request.query.describe(),
                    message: status.message().to_string(),
                });
            }
            return Err(CsiError::RetriesExhausted {
                call,
                attempts: self.failures,
                code: status.code(),
                message: status.message().to_string(),
                resume_offset: self.norm.resume_offset(),
            });
        }
        let delay = policy.delay(self.failures, &mut self.rng);
        match self.deadline_at {
            Some(at) if Instant::now() + delay >= at => {
                self.done = true;
                Err(self.deadline_error())
            }
            _ => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
        }
    }

    async fn open(&mut self) -> Result<Attempt, Failure> {
        self.attempts += 1;
        let offset = self.norm.resume_offset();
        self.attempt_start_offset = offset;
        let token = match &self.client.config.token {
            Some(src) => Some(
                src.token()
                    .await
                    .map_err(|reason| Failure::Fatal(CsiError::Token { reason }))?,
            ),
            None => None,
        };
        let req = &self.request;
        let off = i64::try_from(offset).unwrap_or(i64::MAX);
        let max = i32::try_from(req.max_results).unwrap_or(i32::MAX);
        let remaining = self
            .deadline_at
            .map(|at| at.saturating_duration_since(Instant::now()));
        let max_msg = self.client.config.max_message_bytes;
        // One client per call: a tonic client is a cheap handle on the shared channel.
        let csi = || {
            pb::csi::snapshot_metadata_client::SnapshotMetadataClient::new(
                self.client.channel.clone(),
            )
            .max_decoding_message_size(max_msg)
        };
        let k8s = || {
            pb::k8s::snapshot_metadata_client::SnapshotMetadataClient::new(
                self.client.channel.clone(),
            )
            .max_decoding_message_size(max_msg)
        };
        // The CSI service takes the token as a bearer header, the Kubernetes one in the body.
        let bearer = token.as_deref();
        let result = match &req.query {
            Query::CsiAllocated { snapshot_id } => {
                let r = pb::csi::GetMetadataAllocatedRequest {
                    snapshot_id: snapshot_id.clone(),
                    starting_offset: off,
                    max_results: max,
                    secrets: req.secrets.clone(),
                };
                csi()
                    .get_metadata_allocated(decorate(r, bearer, remaining)?)
                    .await
                    .map(|r| Attempt::CsiAllocated(r.into_inner()))
            }
            Query::CsiDelta {
                base_snapshot_id,
                target_snapshot_id,
            } => {
                let r = pb::csi::GetMetadataDeltaRequest {
                    base_snapshot_id: base_snapshot_id.clone(),
                    target_snapshot_id: target_snapshot_id.clone(),
                    starting_offset: off,
                    max_results: max,
                    secrets: req.secrets.clone(),
                };
                csi()
                    .get_metadata_delta(decorate(r, bearer, remaining)?)
                    .await
                    .map(|r| Attempt::CsiDelta(r.into_inner()))
            }
            Query::K8sAllocated {
                namespace,
                snapshot_name,
            } => {
                let r = pb::k8s::GetMetadataAllocatedRequest {
                    security_token: token.unwrap_or_default(),
                    namespace: namespace.clone(),
                    snapshot_name: snapshot_name.clone(),
                    starting_offset: off,
                    max_results: max,
                };
                k8s()
                    .get_metadata_allocated(decorate(r, None, remaining)?)
                    .await
                    .map(|r| Attempt::K8sAllocated(r.into_inner()))
            }
            Query::K8sDelta {
                namespace,
                base_snapshot_id,
                target_snapshot_name,
            } => {
                let r = pb::k8s::GetMetadataDeltaRequest {
                    security_token: token.unwrap_or_default(),
                    namespace: namespace.clone(),
                    base_snapshot_id: base_snapshot_id.clone(),
                    target_snapshot_name: target_snapshot_name.clone(),
                    starting_offset: off,
                    max_results: max,
                };
                k8s()
                    .get_metadata_delta(decorate(r, None, remaining)?)
                    .await
                    .map(|r| Attempt::K8sDelta(r.into_inner()))
            }
        };
        result.map_err(|status| {
            if self.resumable(&status) {
                Failure::Retry(status)
            } else {
                Failure::Fatal(self.map(status))
            }
        })
    }
}

enum Failure {
    Fatal(CsiError),
    Retry(Status),
}

/// Wraps a request message with the bearer token (if any) and the time left before the deadline.
fn decorate<T>(
    message: T,
    token: Option<&str>,
    remaining: Option<Duration>,
) -> Result<tonic::Request<T>, Failure> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        let v = format!("Bearer {t}").parse().map_err(|_| {
            Failure::Fatal(CsiError::Token {
                reason: "token contains characters not allowed in a gRPC header".into(),
            })
        })?;
        r.metadata_mut().insert("authorization", v);
    }
    if let Some(d) = remaining {
        r.set_timeout(d);
    }
    Ok(r)
}

/// Maps a non-retryable status to the typed error with guidance for this query.
pub fn map_status(query: &Query, offset: u64, status: Status) -> CsiError {
    use tonic::Code;
    let call = query.call();
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument => CsiError::InvalidArgument { call, message },
        Code::NotFound => CsiError::SnapshotNotFound {
            call,
            snapshots: query.describe(),
            message,
        },
        Code::Unauthenticated => CsiError::Unauthenticated { call, message },
        Code::PermissionDenied => CsiError::PermissionDenied { call, message },
        Code::OutOfRange => CsiError::OutOfRange {
            call,
            offset,
            message,
        },
        Code::FailedPrecondition if call == Call::Delta => {
            let (base, target) = query.base_and_target();
            CsiError::CbtNotEnabled {
                base,
                target,
                message,
            }
        }
        Code::FailedPrecondition => CsiError::FailedPrecondition { call, message },
        Code::Unimplemented => CsiError::Unimplemented { call, message },
        Code::Unavailable if query.is_kubernetes() => CsiError::SnapshotUnavailable {
            call,
            snapshots: query.describe(),
            message,
        },
        code => CsiError::Status {
            call,
            code,
            message,
        },
    }
}
