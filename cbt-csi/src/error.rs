//! The crate's error type: every gRPC status and local failure mapped to a variant that says what
//! went wrong and what to do about it.

use std::time::Duration;

/// The toolkit's one error-kind vocabulary ([`CsiError::kind`] classifies into it).
pub use cbt_core::ErrorKind;

/// Which RPC a failure belongs to, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// GetMetadataAllocated.
    Allocated,
    /// GetMetadataDelta.
    Delta,
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Allocated => "GetMetadataAllocated",
            Self::Delta => "GetMetadataDelta",
        })
    }
}

/// Errors of the metadata client and server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CsiError {
    /// The endpoint string cannot be used.
    #[error(
        "invalid endpoint {endpoint:?}: {reason} (use unix:///path/to/socket or https://host:port)"
    )]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// Why it was rejected.
        reason: String,
    },
    /// TLS settings cannot be used (bad CA bundle, TLS on a unix socket, ...).
    #[error("TLS configuration for {endpoint}: {reason}")]
    Tls {
        /// The endpoint being configured.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// The connection to the service could not be established.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// Transport error, with its causes.
        reason: String,
    },
    /// The request was rejected as malformed (INVALID_ARGUMENT).
    #[error("{call} rejected the request as invalid: {message}")]
    InvalidArgument {
        /// The RPC.
        call: Call,
        /// The server's message.
        message: String,
    },
    /// A snapshot id is unknown to the driver (NOT_FOUND).
    #[error(
        "{call}: snapshot not found ({snapshots}): {message}; check that the snapshot handle(s) exist on the storage backend"
    )]
    SnapshotNotFound {
        /// The RPC.
        call: Call,
        /// The snapshot id(s) of the request.
        snapshots: String,
        /// The server's message.
        message: String,
    },
    /// The Kubernetes sidecar answered UNAVAILABLE for a call that never made progress: the
    /// VolumeSnapshot (or its content) does not exist or is not ready, or the driver is not ready.
    #[error(
        "{call}: snapshot {snapshots} unavailable: {message}; check that the VolumeSnapshot exists in that namespace, is readyToUse, and that the CSI driver is running"
    )]
    SnapshotUnavailable {
        /// The RPC.
        call: Call,
        /// The VolumeSnapshot names / ids of the request.
        snapshots: String,
        /// The server's message.
        message: String,
    },
    /// The token was missing or rejected (UNAUTHENTICATED).
    #[error(
        "{call}: not authenticated: {message}; pass a valid token (for the Kubernetes API: a ServiceAccount token for the SnapshotMetadataService audience)"
    )]
    Unauthenticated {
        /// The RPC.
        call: Call,
        /// The server's message.
        message: String,
    },
    /// The identity may not read these snapshots (PERMISSION_DENIED).
    #[error(
        "{call}: permission denied: {message}; Kubernetes API: grant `get` on volumesnapshots (snapshot.storage.k8s.io) in the namespace to the token's identity; CSI driver: check the credentials (secrets) sent"
    )]
    PermissionDenied {
        /// The RPC.
        call: Call,
        /// The server's message.
        message: String,
    },
    /// The starting offset lies outside the volume (OUT_OF_RANGE).
    #[error("{call}: starting offset {offset} is outside the volume: {message}")]
    OutOfRange {
        /// The RPC.
        call: Call,
        /// The offset that was sent.
        offset: u64,
        /// The server's message.
        message: String,
    },
    /// Delta not possible (FAILED_PRECONDITION on GetMetadataDelta).
    #[error(
        "GetMetadataDelta {base} -> {target}: CBT not enabled or delta not possible for these snapshots ({message}); do a full backup instead"
    )]
    CbtNotEnabled {
        /// Base snapshot of the request.
        base: String,
        /// Target snapshot of the request.
        target: String,
        /// The server's message.
        message: String,
    },
    /// FAILED_PRECONDITION on GetMetadataAllocated.
    #[error("{call}: failed precondition: {message}")]
    FailedPrecondition {
        /// The RPC.
        call: Call,
        /// The server's message.
        message: String,
    },
    /// The endpoint does not serve this API (UNIMPLEMENTED): wrong endpoint or wrong API flavour.
    #[error(
        "{call}: not implemented by the endpoint: {message}; is this a CSI driver socket (csi.v1) or the Kubernetes snapshot-metadata sidecar (snapshotmetadata)?"
    )]
    Unimplemented {
        /// The RPC.
        call: Call,
        /// The server's message.
        message: String,
    },
    /// Any other non-retryable status.
    #[error("{call}: server error {code:?}: {message}")]
    Status {
        /// The RPC.
        call: Call,
        /// The gRPC code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// This client's own per-call deadline passed (not a limit of the server: a server's time
    /// limit is resumed, see [`CsiError::ServerTimeLimit`]).
    #[error(
        "{call}: this client's own deadline of {deadline:?} expired after {attempts} attempt(s) with the listing {}; the service was still answering: raise the client's deadline",
        coverage(*starting_offset, *resume_offset, *capacity)
    )]
    DeadlineExceeded {
        /// The RPC.
        call: Call,
        /// The configured deadline.
        deadline: Duration,
        /// Where the call started.
        starting_offset: u64,
        /// Where a new call could resume.
        resume_offset: u64,
        /// Volume size reported by the service, if any message arrived.
        capacity: Option<u64>,
        /// Attempts made (the first call plus resumes).
        attempts: u32,
    },
    /// The service ended every attempt at its own stream time limit (DEADLINE_EXCEEDED from the
    /// server) before sending a single new range, so resuming cannot make progress.
    #[error(
        "{call}: the service ended the stream at its own time limit {attempts} times in a row without sending a new range (last: {message}); resume offset {resume_offset}; raise the service's stream time limit (Kubernetes sidecar: --max-streaming-duration-min) or make the driver answer faster"
    )]
    ServerTimeLimit {
        /// The RPC.
        call: Call,
        /// Consecutive attempts cut without progress.
        attempts: u32,
        /// The server's last message.
        message: String,
        /// Where a new call could resume.
        resume_offset: u64,
    },
    /// Retryable failures kept happening without progress.
    #[error(
        "{call}: stream failed {attempts} times in a row without progress (last: {code:?}: {message}); resume offset {resume_offset}; check the service's health"
    )]
    RetriesExhausted {
        /// The RPC.
        call: Call,
        /// Consecutive failed attempts.
        attempts: u32,
        /// Last gRPC code.
        code: tonic::Code,
        /// Last message.
        message: String,
        /// Where a new call could resume.
        resume_offset: u64,
    },
    /// The server broke the protocol (type or capacity changed, invalid tuple, ...).
    #[error("{call}: protocol violation by the server{}: {detail}", offset.map(|o| format!(" at byte offset {o}")).unwrap_or_default())]
    ProtocolViolation {
        /// The RPC.
        call: Call,
        /// Offending tuple's offset, if any.
        offset: Option<i64>,
        /// What was wrong.
        detail: String,
    },
    /// The collected answer has more distinct ranges than the client accepts.
    #[error(
        "{call}: the service's answer has more than {limit} distinct ranges ({ranges} so far); stream it in batches instead of collecting, or raise the client's max_collected_ranges"
    )]
    AnswerTooLarge {
        /// The RPC.
        call: Call,
        /// Ranges held when the limit was passed.
        ranges: u64,
        /// The limit.
        limit: u64,
    },
    /// The token source failed.
    #[error("cannot obtain a security token: {reason}")]
    Token {
        /// Why.
        reason: String,
    },
    /// The caller's batch callback returned an error; the call was cancelled.
    #[error("metadata consumer failed: {source}")]
    Consumer {
        /// The callback's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Local I/O of the file-backed server or its configuration.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (path included).
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Invalid server configuration.
    #[error("server configuration: {reason}")]
    ServerConfig {
        /// What is wrong.
        reason: String,
    },
}

/// "at byte X of Y (Z%)" for deadline messages: how far a listing got.
fn coverage(start: u64, resume: u64, capacity: Option<u64>) -> String {
    match capacity {
        Some(c) if c > 0 => {
            let pct = (resume.min(c) as f64) * 100.0 / c as f64;
            format!("covered up to byte {resume} of {c} ({pct:.1}%, started at {start})")
        }
        _ => format!("covered up to byte {resume} (started at {start}; no volume size received)"),
    }
}

impl CsiError {
    /// What a caller can do about this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Connect { .. }
            | Self::DeadlineExceeded { .. }
            | Self::ServerTimeLimit { .. }
            | Self::RetriesExhausted { .. } => ErrorKind::Transient,
            Self::SnapshotUnavailable { .. } => ErrorKind::Transient,
            Self::CbtNotEnabled { .. } => ErrorKind::Unsupported,
            Self::ProtocolViolation { .. } | Self::AnswerTooLarge { .. } => ErrorKind::Protocol,
            Self::Consumer { .. } => ErrorKind::Cancelled,
            Self::Status { code, .. } if is_retryable(*code) => ErrorKind::Transient,
            Self::Io { .. } => ErrorKind::Transient,
            // The request named something wrong: the service's answer will not change.
            Self::InvalidArgument { .. }
            | Self::OutOfRange { .. }
            | Self::FailedPrecondition { .. } => ErrorKind::Usage,
            Self::SnapshotNotFound { .. } => ErrorKind::NotFound,
            _ => ErrorKind::Config,
        }
    }

    /// What the user can do about it, in one line (`None` when the message says it all).
    pub fn guidance(&self) -> Option<&'static str> {
        match self {
            CsiError::Unauthenticated { .. }
            | CsiError::PermissionDenied { .. }
            | CsiError::Token { .. } => {
                Some("check --metadata-token / --metadata-token-file and the identity's RBAC")
            }
            CsiError::Unimplemented { .. } => Some(
                "use --metadata-namespace only with the Kubernetes sidecar, and omit it for a CSI driver socket",
            ),
            CsiError::DeadlineExceeded { .. } => Some(
                "raise --metadata-deadline-secs: the service was still answering when cbt's own deadline expired",
            ),
            CsiError::ServerTimeLimit { .. } => Some(
                "the service's stream time limit is shorter than the time it needs for one message; raise it (sidecar flag --max-streaming-duration-min)",
            ),
            CsiError::ProtocolViolation { .. } => Some(
                "the metadata service broke the protocol; report it to the CSI driver's maintainers",
            ),
            CsiError::CbtNotEnabled { .. } => {
                Some("take a full backup (--full), or enable changed-block tracking for the volume")
            }
            _ if self.kind().is_transient() => Some("this looks temporary: retry later"),
            _ => None,
        }
    }

    /// True for service answers that a retry of the same request cannot change (the codes the
    /// CSI spec prescribes for bad requests, plus authentication and authorization).
    pub fn is_non_retryable_service_error(&self) -> bool {
        matches!(
            self,
            Self::InvalidArgument { .. }
                | Self::SnapshotNotFound { .. }
                | Self::Unauthenticated { .. }
                | Self::PermissionDenied { .. }
                | Self::OutOfRange { .. }
                | Self::CbtNotEnabled { .. }
                | Self::FailedPrecondition { .. }
                | Self::Unimplemented { .. }
        )
    }
}

/// gRPC codes the client retries (with resume) instead of failing the call.
pub fn is_retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | Aborted | Internal | Unknown | ResourceExhausted | Cancelled
    )
}
