//! A file-backed SnapshotMetadata server: serves the CSI `csi.v1` SnapshotMetadata and Identity
//! services and the Kubernetes `snapshotmetadata` API from a directory of snapshot images.
//!
//! # Directory layout
//! - `DIR/<snapshot-id>`: a snapshot image (regular file, sparse files welcome). The snapshot id
//!   (CSI handle) is the file name: 1-128 characters of `[A-Za-z0-9._-]`, not starting with `.`,
//!   not ending in `.meta.json`.
//! - `DIR/<snapshot-id>.meta.json` (optional): `{"volume_id": "...", "namespace": "...",
//!   "cbt": true}`. `volume_id` names the source volume (a delta between snapshots of different
//!   declared volumes is INVALID_ARGUMENT; an undeclared volume matches any); `namespace` is the
//!   VolumeSnapshot namespace for the Kubernetes API (default `default`); `cbt: false` makes
//!   deltas of that snapshot FAILED_PRECONDITION, like a backend without CBT.
//!
//! The Kubernetes API resolves a VolumeSnapshot `namespace/name` to the image whose id is `name`
//! and whose namespace matches (otherwise UNAVAILABLE, as the sidecar answers for a missing
//! VolumeSnapshot); `base_snapshot_id` is a CSI handle, unknown ones are NOT_FOUND.
//!
//! # Status codes
//! INVALID_ARGUMENT for empty or malformed ids, negative max_results and volume mismatch;
//! NOT_FOUND for unknown CSI ids; OUT_OF_RANGE for `starting_offset` < 0 or > capacity;
//! FAILED_PRECONDITION for a delta between images of different sizes (the volume was resized
//! between snapshots: the request is well-formed but the system state makes a delta impossible,
//! and the remedy is a full backup, which is what CSI prescribes FAILED_PRECONDITION for) or with
//! CBT disabled; UNAUTHENTICATED for a missing or wrong token when the server has one (the
//! Identity and health services need no token, like the sidecar's health service); with
//! [`ServerOptions::secrets`], INVALID_ARGUMENT for a CSI call missing a secret key and
//! PERMISSION_DENIED for a wrong value.
//!
//! # Memory
//! Per call: two scan windows (`window` bytes each), one zero block, one message being built
//! (≤ `max_results` tuples) and at most two queued messages.

mod scan;

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::error::CsiError;
use crate::pb;
use crate::ranges::BlockType;

pub use scan::{Geometry, ScanStats};

/// Test hook: break streams on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Abort a stream after this many messages.
    pub drop_after_messages: u32,
    /// How many streams to abort in total (then behave normally).
    pub times: u32,
    /// The status the aborted stream ends with.
    pub status: FaultStatus,
}

/// How a [`FaultPlan`] ends a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultStatus {
    /// UNAVAILABLE, as a broken connection or a restarting sidecar shows.
    #[default]
    Unavailable,
    /// DEADLINE_EXCEEDED, as the Kubernetes sidecar ends a call at its
    /// `--max-streaming-duration-min` limit (contracts §7).
    DeadlineExceeded,
}

impl FaultStatus {
    fn status(self, n: u32) -> Status {
        match self {
            Self::Unavailable => Status::unavailable(format!(
                "stream dropped after {n} messages (test fault injection)"
            )),
            Self::DeadlineExceeded => Status::deadline_exceeded(format!(
                "stream time limit reached after {n} messages (test fault injection)"
            )),
        }
    }
}

/// What the Kubernetes SnapshotMetadata API of the server asks of the cluster, as the
/// external-snapshot-metadata sidecar does: check the caller's token and rights, and turn a
/// VolumeSnapshot name into its CSI handle. Without one, VolumeSnapshot names are image file
/// names and the static [`ServerOptions::token`] is checked.
#[async_trait::async_trait]
pub trait SidecarAuthority: Send + Sync + std::fmt::Debug {
    /// Accepts `token` for reading VolumeSnapshots in `namespace` (TokenReview for the audience
    /// plus authorization in the sidecar), or returns UNAUTHENTICATED / PERMISSION_DENIED.
    async fn authorize(&self, token: &str, namespace: &str) -> Result<(), Status>;
    /// The CSI handle of VolumeSnapshot `namespace/name`, which must be ready and bound
    /// (UNAVAILABLE otherwise, as the sidecar answers).
    async fn resolve(&self, namespace: &str, name: &str) -> Result<String, Status>;
}

/// Configuration of the file-backed server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Directory of snapshot images.
    pub dir: PathBuf,
    /// Block granularity in bytes (power of two, 512 B .. 64 MiB).
    pub block_size: u64,
    /// Tuple style of responses.
    pub block_type: BlockType,
    /// Cap of tuples per message (also used when a request leaves max_results at 0).
    pub max_results: u32,
    /// Required bearer token (CSI: `authorization` metadata; Kubernetes API: `security_token`).
    pub token: Option<String>,
    /// Bytes read per scan window (multiple of block_size).
    pub window: u64,
    /// Driver name reported by the Identity service.
    pub driver_name: String,
    /// Stream-breaking test hook.
    pub fault: Option<FaultPlan>,
    /// Metadata calls served at once, over all connections; further calls are refused with
    /// RESOURCE_EXHAUSTED (clients retry with backoff) so a flood cannot exhaust threads or
    /// file handles.
    pub max_concurrent_calls: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Connections open at once; a connection beyond it is closed as soon as it is accepted
    /// (clients see a reset and retry), so idle or slow clients cannot exhaust file handles
    /// and memory.
    pub max_connections: usize,
    /// Resolves VolumeSnapshot names and checks tokens through a cluster (see
    /// [`SidecarAuthority`]); snapshot files are then named by CSI handle.
    pub sidecar: Option<Arc<dyn SidecarAuthority>>,
    /// Longest time one call may stream before it is ended with DEADLINE_EXCEEDED, like the
    /// Kubernetes sidecar's `--max-streaming-duration-min`; `None` streams without a limit.
    pub max_stream_duration: Option<std::time::Duration>,
    /// CSI secrets every CSI SnapshotMetadata call must carry, as a driver configured with
    /// backend credentials requires (missing key: INVALID_ARGUMENT, wrong value:
    /// PERMISSION_DENIED). The Kubernetes API carries no secrets (the sidecar adds them).
    pub secrets: Option<std::collections::BTreeMap<String, String>>,
}

impl ServerOptions {
    /// Defaults: 64 KiB VARIABLE_LENGTH blocks, 1024 tuples per message, 1 MiB windows, no token.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            block_size: 64 * 1024,
            block_type: BlockType::VariableLength,
            max_results: 1024,
            token: None,
            window: 1024 * 1024,
            driver_name: "file.cbt.example.com".to_string(),
            fault: None,
            max_stream_duration: None,
            max_concurrent_calls: 64,
            max_streams_per_connection: 16,
            max_connections: 256,
            sidecar: None,
            secrets: None,
        }
    }

    fn validate(&self) -> Result<(), CsiError> {
        let bad = |reason: String| Err(CsiError::ServerConfig { reason });
        if !self.block_size.is_power_of_two() || !(512..=64 << 20).contains(&self.block_size) {
            return bad(format!(
                "block size {} must be a power of two between 512 B and 64 MiB",
                self.block_size
            ));
        }
        if self.max_results == 0 {
            return bad("max_results must be at least 1".into());
        }
        if !self.dir.is_dir() {
            return bad(format!(
                "snapshot directory {} does not exist or is not a directory",
                self.dir.display()
            ));
        }
        if self.token.as_deref() == Some("") {
            return bad("the token must not be empty".into());
        }
        Ok(())
    }

    fn geometry(&self) -> Geometry {
        let window = (self.window.max(self.block_size) / self.block_size) * self.block_size;
        Geometry {
            block: self.block_size,
            window,
        }
    }
}

/// Optional per-snapshot metadata (`<id>.meta.json`).
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Source volume identity.
    #[serde(default)]
    pub volume_id: Option<String>,
    /// VolumeSnapshot namespace for the Kubernetes API.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Whether deltas are possible (default true).
    #[serde(default)]
    pub cbt: Option<bool>,
}

/// Checks a snapshot id against the naming rules of the directory layout.
pub fn validate_snapshot_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!(
            "snapshot id must be 1-128 characters, got {}",
            id.len()
        ));
    }
    if id.starts_with('.') {
        return Err(format!("snapshot id {id:?} must not start with '.'"));
    }
    if id.ends_with(".meta.json") {
        return Err(format!("snapshot id {id:?} must not end with .meta.json"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "snapshot id {id:?} contains {c:?}; allowed: A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Writes the metadata file of snapshot `id` in `dir`.
///
/// # Errors
/// [`CsiError::Io`] if the file cannot be written, [`CsiError::ServerConfig`] for a bad id.
pub fn write_snapshot_meta(dir: &Path, id: &str, meta: &SnapshotMeta) -> Result<(), CsiError> {
    validate_snapshot_id(id).map_err(|reason| CsiError::ServerConfig { reason })?;
    let path = dir.join(format!("{id}.meta.json"));
    let body = serde_json::to_vec_pretty(meta).map_err(|e| CsiError::ServerConfig {
        reason: e.to_string(),
    })?;
    std::fs::write(&path, body).map_err(|source| CsiError::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

struct Snapshot {
    file: std::fs::File,
    size: u64,
    meta: SnapshotMeta,
}

enum Lookup {
    Found(Snapshot),
    Missing,
}

fn open_snapshot(dir: &Path, id: &str) -> Result<Lookup, Status> {
    validate_snapshot_id(id).map_err(Status::invalid_argument)?;
    let path = dir.join(id);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lookup::Missing),
        Err(e) => return Err(Status::internal(format!("opening snapshot {id}: {e}"))),
    };
    let md = file
        .metadata()
        .map_err(|e| Status::internal(format!("stat of snapshot {id}: {e}")))?;
    if !md.is_file() {
        return Ok(Lookup::Missing);
    }
    let meta_path = dir.join(format!("{id}.meta.json"));
    let meta = match std::fs::read(&meta_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            Status::internal(format!("snapshot metadata {}: {e}", meta_path.display()))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => SnapshotMeta::default(),
        Err(e) => {
            return Err(Status::internal(format!(
                "reading {}: {e}",
                meta_path.display()
            )));
        }
    };
    Ok(Lookup::Found(Snapshot {
        file,
        size: md.len(),
        meta,
    }))
}

/// Compares a presented token with the expected one in time independent of where they differ,
/// so response timing does not reveal a prefix of the secret.
fn token_matches(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    let diff = a
        .iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |d, (x, y)| d | usize::from(x ^ y));
    diff == 0
}

/// The services over one directory; cheap to clone.
#[derive(Debug, Clone)]
pub struct FileMetadataService {
    opts: Arc<ServerOptions>,
    drops_left: Arc<AtomicU32>,
    calls: Arc<tokio::sync::Semaphore>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A finished response message, common to both APIs.
struct Msg {
    block_type: BlockType,
    capacity: u64,
    tuples: Vec<(u64, u64)>,
}

/// Turns block runs into tuples and messages, and sends them.
struct Packer {
    tx: mpsc::Sender<Result<Msg, Status>>,
    block_type: BlockType,
    block: u64,
    capacity: u64,
    per_msg: usize,
    pending: Vec<(u64, u64)>,
    sent: u32,
    failed: bool,
    drop_after: Option<(u32, FaultStatus, Arc<AtomicU32>)>,
    /// When the call's stream time limit expires.
    cut_at: Option<std::time::Instant>,
}

impl Packer {
    fn push(&mut self, off: u64, len: u64) -> ControlFlow<()> {
        match self.block_type {
            BlockType::VariableLength => self.tuple(off, len),
            BlockType::FixedLength => {
                let end = off + len;
                let mut o = off;
                while o < end {
                    self.tuple(o, self.block.min(end - o))?;
                    o += self.block;
                }
                ControlFlow::Continue(())
            }
        }
    }

    fn tuple(&mut self, off: u64, len: u64) -> ControlFlow<()> {
        self.pending.push((off, len));
        if self.pending.len() >= self.per_msg {
            return self.flush();
        }
        ControlFlow::Continue(())
    }

    /// Sends the pending tuples; Break when the client is gone or the fault hook fired.
    fn flush(&mut self) -> ControlFlow<()> {
        if let Some((n, status, left)) = &self.drop_after
            && self.sent >= *n
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .is_ok()
        {
            let _ = self.tx.blocking_send(Err(status.status(*n)));
            self.failed = true;
            return ControlFlow::Break(());
        }
        if self
            .cut_at
            .is_some_and(|at| std::time::Instant::now() >= at)
        {
            // What the sidecar does when its per-call limit expires: the messages sent so far
            // stand, the stream ends with DEADLINE_EXCEEDED and nothing says where to resume.
            let _ = self.tx.blocking_send(Err(Status::deadline_exceeded(format!(
                "stream time limit reached after {} messages",
                self.sent
            ))));
            self.failed = true;
            return ControlFlow::Break(());
        }
        let msg = Msg {
            block_type: self.block_type,
            capacity: self.capacity,
            tuples: std::mem::take(&mut self.pending),
        };
        self.sent += 1;
        if self.tx.blocking_send(Ok(msg)).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }
}

enum Work {
    Allocated(Snapshot),
    Delta(Snapshot, Snapshot),
}

impl FileMetadataService {
    /// Validates options and builds the services.
    ///
    /// # Errors
    /// [`CsiError::ServerConfig`] for unusable options.
    pub fn new(opts: ServerOptions) -> Result<Self, CsiError> {
        opts.validate()?;
        let drops = opts.fault.map(|f| f.times).unwrap_or(0);
        Ok(Self {
            calls: Arc::new(tokio::sync::Semaphore::new(
                opts.max_concurrent_calls.max(1),
            )),
            opts: Arc::new(opts),
            drops_left: Arc::new(AtomicU32::new(drops)),
        })
    }

    /// The options in use.
    pub fn options(&self) -> &ServerOptions {
        &self.opts
    }

    fn check_csi_token<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.opts.token else {
            return Ok(());
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match got.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(t) if token_matches(t, expected) => Ok(()),
            Some(_) => Err(Status::unauthenticated("bearer token rejected")),
            None => Err(Status::unauthenticated(
                "missing authorization: Bearer <token> metadata",
            )),
        }
    }

    fn check_csi_secrets(
        &self,
        got: &std::collections::HashMap<String, String>,
    ) -> Result<(), Status> {
        let Some(required) = &self.opts.secrets else {
            return Ok(());
        };
        for (key, value) in required {
            match got.get(key) {
                None => {
                    return Err(Status::invalid_argument(format!(
                        "secret {key:?} is required"
                    )));
                }
                Some(v) if !token_matches(v, value) => {
                    return Err(Status::permission_denied(format!(
                        "secret {key:?} rejected"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    async fn check_k8s_token(&self, token: &str, namespace: &str) -> Result<(), Status> {
        if token.is_empty() {
            return Err(Status::invalid_argument("security_token is required"));
        }
        if let Some(sidecar) = &self.opts.sidecar {
            return sidecar.authorize(token, namespace).await;
        }
        match &self.opts.token {
            Some(expected) if !token_matches(token, expected) => {
                Err(Status::unauthenticated("security token rejected"))
            }
            _ => Ok(()),
        }
    }

    fn csi_lookup(&self, id: &str, field: &str) -> Result<Snapshot, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(format!("{field} is required")));
        }
        match open_snapshot(&self.opts.dir, id)? {
            Lookup::Found(s) => Ok(s),
            Lookup::Missing => Err(Status::not_found(format!("snapshot {id} not found"))),
        }
    }

    async fn k8s_lookup(&self, namespace: &str, name: &str) -> Result<Snapshot, Status> {
        if let Some(sidecar) = &self.opts.sidecar {
            let handle = sidecar.resolve(namespace, name).await?;
            return match open_snapshot(&self.opts.dir, &handle)? {
                Lookup::Found(s) => Ok(s),
                // The driver does not know the handle its own content names.
                Lookup::Missing => Err(Status::not_found(format!(
                    "snapshot {handle} (VolumeSnapshot {namespace}/{name}) not found"
                ))),
            };
        }
        match open_snapshot(&self.opts.dir, name) {
            Ok(Lookup::Found(s))
                if s.meta.namespace.as_deref().unwrap_or("default") == namespace =>
            {
                Ok(s)
            }
            Ok(_) => Err(Status::unavailable(format!(
                "VolumeSnapshot {namespace}/{name} not found or not ready"
            ))),
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                Err(Status::unavailable(format!(
                    "VolumeSnapshot {namespace}/{name} not found: {}",
                    s.message()
                )))
            }
            Err(s) => Err(s),
        }
    }

    fn check_delta(
        base: &Snapshot,
        target: &Snapshot,
        base_id: &str,
        target_id: &str,
    ) -> Result<(), Status> {
        if let (Some(a), Some(b)) = (&base.meta.volume_id, &target.meta.volume_id)
            && a != b
        {
            return Err(Status::invalid_argument(format!(
                "base snapshot {base_id} (volume {a}) and target snapshot {target_id} (volume {b}) belong to different volumes"
            )));
        }
        if base.meta.cbt == Some(false) || target.meta.cbt == Some(false) {
            return Err(Status::failed_precondition(
                "changed block tracking is not enabled for these snapshots",
            ));
        }
        if base.size != target.size {
            return Err(Status::failed_precondition(format!(
                "base snapshot {base_id} is {} bytes but target {target_id} is {} bytes (volume resized); a delta across a resize is not supported",
                base.size, target.size
            )));
        }
        Ok(())
    }

    fn check_paging(offset: i64, max_results: i32, capacity: u64) -> Result<u64, Status> {
        if max_results < 0 {
            return Err(Status::invalid_argument(format!(
                "max_results {max_results} is negative"
            )));
        }
        if offset < 0 || offset as u64 > capacity {
            return Err(Status::out_of_range(format!(
                "starting_offset {offset} is outside the volume [0, {capacity}]"
            )));
        }
        Ok(offset as u64)
    }

    /// Runs the scan on a blocking thread and streams messages through a small channel.
    fn run(&self, work: Work, start: u64, max_results: i32) -> mpsc::Receiver<Result<Msg, Status>> {
        let (tx, rx) = mpsc::channel::<Result<Msg, Status>>(2);
        let opts = self.opts.clone();
        let per_msg = if max_results > 0 {
            (max_results as u32).min(opts.max_results)
        } else {
            opts.max_results
        } as usize;
        let drop_after = match opts.fault {
            Some(f) if self.drops_left.load(Ordering::SeqCst) > 0 => {
                Some((f.drop_after_messages, f.status, self.drops_left.clone()))
            }
            _ => None,
        };
        let cut_at = opts
            .max_stream_duration
            .and_then(|d| std::time::Instant::now().checked_add(d));
        tokio::task::spawn_blocking(move || {
            let g = opts.geometry();
            let capacity = match &work {
                Work::Allocated(s) => s.size,
                Work::Delta(_, t) => t.size,
            };
            let mut out = Packer {
                tx,
                block_type: opts.block_type,
                block: g.block,
                capacity,
                per_msg,
                pending: Vec::with_capacity(per_msg.min(65536)),
                sent: 0,
                failed: false,
                drop_after,
                cut_at,
            };
            // The receiver is dropped when the client cancels or disconnects: stop reading then.
            let probe = out.tx.clone();
            let cancelled = || probe.is_closed();
            let res = match &work {
                Work::Allocated(s) => {
                    scan::allocated(&s.file, s.size, start, g, cancelled, |o, l| out.push(o, l))
                }
                Work::Delta(b, t) => {
                    scan::delta(&b.file, &t.file, t.size, start, g, cancelled, |o, l| {
                        out.push(o, l)
                    })
                }
            };
            match res {
                Err(e) => {
                    let _ = out.tx.blocking_send(Err(Status::internal(format!(
                        "reading snapshot image: {e}"
                    ))));
                }
                Ok(_) if out.failed => {}
                // A final (possibly empty) message: an empty answer still reports type and capacity.
                Ok(_) if !out.pending.is_empty() || out.sent == 0 => {
                    let _ = out.flush();
                }
                Ok(_) => {}
            }
        });
        rx
    }

    /// A permit for one metadata call, or RESOURCE_EXHAUSTED when `max_concurrent_calls` are
    /// running; held until the call's stream is dropped.
    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.calls.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} metadata calls are running, the server's limit; retry later",
                self.opts.max_concurrent_calls
            ))
        })
    }

    /// Admits the call, checks its paging against the volume the answer describes (a delta's
    /// target), and streams the scan's messages as the API's response type `T`.
    fn serve_work<T: From<Msg> + Send + 'static>(
        &self,
        work: Work,
        starting_offset: i64,
        max_results: i32,
    ) -> Result<Response<ResponseStream<T>>, Status> {
        let permit = self.admit()?;
        let (Work::Allocated(described) | Work::Delta(_, described)) = &work;
        let start = Self::check_paging(starting_offset, max_results, described.size)?;
        let rx = self.run(work, start, max_results);
        // The permit travels with the stream: the call counts until the client is done with it.
        Ok(Response::new(Box::pin(futures::stream::unfold(
            (rx, permit),
            move |(mut rx, permit)| async move {
                rx.recv().await.map(|m| (m.map(T::from), (rx, permit)))
            },
        ))))
    }
}

/// `From<Msg>` for the four response messages: the two APIs' responses carry the same three
/// fields under the same names, in types the generated code keeps apart.
macro_rules! response_from_msg {
    ($api:ident: $($response:ident),+) => {$(
        impl From<Msg> for pb::$api::$response {
            fn from(m: Msg) -> Self {
                Self {
                    block_metadata_type: m.block_type.to_wire(),
                    volume_capacity_bytes: m.capacity as i64,
                    block_metadata: m
                        .tuples
                        .into_iter()
                        .map(|(o, l)| pb::$api::BlockMetadata {
                            byte_offset: o as i64,
                            size_bytes: l as i64,
                        })
                        .collect(),
                }
            }
        }
    )+};
}

response_from_msg!(csi: GetMetadataAllocatedResponse, GetMetadataDeltaResponse);
response_from_msg!(k8s: GetMetadataAllocatedResponse, GetMetadataDeltaResponse);

/// INVALID_ARGUMENT listing all the required fields of a request (`a, b and c are required`)
/// when any of them is empty.
fn require(fields: &[(&str, &str)]) -> Result<(), Status> {
    if fields.iter().all(|(_, value)| !value.is_empty()) {
        return Ok(());
    }
    let names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
    let list = match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("{} and {last} are required", rest.join(", "))
        }
        _ => format!("{} is required", names.concat()),
    };
    Err(Status::invalid_argument(list))
}

#[tonic::async_trait]
impl pb::csi::snapshot_metadata_server::SnapshotMetadata for FileMetadataService {
    type GetMetadataAllocatedStream = ResponseStream<pb::csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = ResponseStream<pb::csi::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<pb::csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        self.check_csi_token(&request)?;
        let r = request.into_inner();
        self.check_csi_secrets(&r.secrets)?;
        let snap = self.csi_lookup(&r.snapshot_id, "snapshot_id")?;
        self.serve_work(Work::Allocated(snap), r.starting_offset, r.max_results)
    }

    async fn get_metadata_delta(
        &self,
        request: Request<pb::csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        self.check_csi_token(&request)?;
        let r = request.into_inner();
        self.check_csi_secrets(&r.secrets)?;
        let base = self.csi_lookup(&r.base_snapshot_id, "base_snapshot_id")?;
        let target = self.csi_lookup(&r.target_snapshot_id, "target_snapshot_id")?;
        Self::check_delta(&base, &target, &r.base_snapshot_id, &r.target_snapshot_id)?;
        self.serve_work(Work::Delta(base, target), r.starting_offset, r.max_results)
    }
}

#[tonic::async_trait]
impl pb::k8s::snapshot_metadata_server::SnapshotMetadata for FileMetadataService {
    type GetMetadataAllocatedStream = ResponseStream<pb::k8s::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = ResponseStream<pb::k8s::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<pb::k8s::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = request.into_inner();
        require(&[
            ("namespace", &r.namespace),
            ("snapshot_name", &r.snapshot_name),
        ])?;
        self.check_k8s_token(&r.security_token, &r.namespace)
            .await?;
        let snap = self.k8s_lookup(&r.namespace, &r.snapshot_name).await?;
        self.serve_work(Work::Allocated(snap), r.starting_offset, r.max_results)
    }

    async fn get_metadata_delta(
        &self,
        request: Request<pb::k8s::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = request.into_inner();
        require(&[
            ("namespace", &r.namespace),
            ("base_snapshot_id", &r.base_snapshot_id),
            ("target_snapshot_name", &r.target_snapshot_name),
        ])?;
        self.check_k8s_token(&r.security_token, &r.namespace)
            .await?;
        let target = self
            .k8s_lookup(&r.namespace, &r.target_snapshot_name)
            .await?;
        let base = self.csi_lookup(&r.base_snapshot_id, "base_snapshot_id")?;
        Self::check_delta(&base, &target, &r.base_snapshot_id, &r.target_snapshot_name)?;
        self.serve_work(Work::Delta(base, target), r.starting_offset, r.max_results)
    }
}

#[tonic::async_trait]
impl pb::csi::identity_server::Identity for FileMetadataService {
    async fn get_plugin_info(
        &self,
        _request: Request<pb::csi::GetPluginInfoRequest>,
    ) -> Result<Response<pb::csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(pb::csi::GetPluginInfoResponse {
            name: self.opts.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<pb::csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<pb::csi::GetPluginCapabilitiesResponse>, Status> {
        use pb::csi::plugin_capability::{Service, Type, service};
        Ok(Response::new(pb::csi::GetPluginCapabilitiesResponse {
            capabilities: vec![pb::csi::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::SnapshotMetadataService as i32,
                })),
            }],
        }))
    }

    async fn probe(
        &self,
        _request: Request<pb::csi::ProbeRequest>,
    ) -> Result<Response<pb::csi::ProbeResponse>, Status> {
        Ok(Response::new(pb::csi::ProbeResponse { ready: Some(true) }))
    }
}

/// Services reported SERVING by the health service (besides the empty name: the whole server).
const HEALTH_SERVICES: [&str; 3] = [
    "csi.v1.SnapshotMetadata",
    "csi.v1.Identity",
    "snapshotmetadata.SnapshotMetadata",
];

fn health_status(service: &str) -> Result<pb::health::HealthCheckResponse, Status> {
    if service.is_empty() || HEALTH_SERVICES.contains(&service) {
        Ok(pb::health::HealthCheckResponse {
            status: pb::health::health_check_response::ServingStatus::Serving as i32,
        })
    } else {
        Err(Status::not_found(format!("unknown service {service:?}")))
    }
}

#[tonic::async_trait]
impl pb::health::health_server::Health for FileMetadataService {
    type WatchStream = ResponseStream<pb::health::HealthCheckResponse>;

    async fn check(
        &self,
        request: Request<pb::health::HealthCheckRequest>,
    ) -> Result<Response<pb::health::HealthCheckResponse>, Status> {
        health_status(&request.into_inner().service).map(Response::new)
    }

    async fn watch(
        &self,
        request: Request<pb::health::HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The status never changes while the server runs: send it once, then keep the stream open.
        let first = health_status(&request.into_inner().service)?;
        use futures::StreamExt;
        Ok(Response::new(Box::pin(
            futures::stream::iter([Ok(first)]).chain(futures::stream::pending()),
        )))
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket path (a stale socket file there is replaced).
    Unix(PathBuf),
    /// A TCP address (port 0 picks a free port).
    Tcp(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = CsiError;
    fn from_str(s: &str) -> Result<Self, CsiError> {
        let bad = |reason: &str| CsiError::ServerConfig {
            reason: format!("listen address {s:?}: {reason}"),
        };
        if let Some(p) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if p.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        addr.parse()
            .map(Self::Tcp)
            .map_err(|_| bad("expected unix:///path or tcp://IP:PORT"))
    }
}

/// PEM server certificate chain and private key.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    /// Certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// Private key (PEM).
    pub key_pem: Vec<u8>,
}

/// A server running on a background task.
#[derive(Debug)]
pub struct RunningServer {
    endpoint: String,
    local_addr: Option<SocketAddr>,
    socket_path: Option<PathBuf>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// Client endpoint string: `unix:///path`, `http://ip:port` or `https://ip:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Bound TCP address, if listening on TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Stops accepting, drains connections and removes the socket file.
    ///
    /// # Errors
    /// [`CsiError::ServerConfig`] if the server task failed.
    pub async fn shutdown(mut self) -> Result<(), CsiError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let r = (&mut self.task).await;
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CsiError::ServerConfig {
                reason: format!("server failed: {e}"),
            }),
            Err(e) => Err(CsiError::ServerConfig {
                reason: format!("server task failed: {e}"),
            }),
        }
    }

    /// Waits until the server stops (it stops only on error or [`RunningServer::shutdown`]).
    ///
    /// # Errors
    /// [`CsiError::ServerConfig`] if the server failed.
    pub async fn wait(mut self) -> Result<(), CsiError> {
        let r = (&mut self.task).await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CsiError::ServerConfig {
                reason: format!("server failed: {e}"),
            }),
            Err(e) => Err(CsiError::ServerConfig {
                reason: format!("server task failed: {e}"),
            }),
        }
    }
}

/// Binds `listen` and serves all services of `service` (both APIs, Identity and
/// `grpc.health.v1.Health`) in the background.
///
/// # Errors
/// [`CsiError::Io`] if the address cannot be bound, [`CsiError::ServerConfig`] for TLS problems.
pub async fn spawn(
    service: FileMetadataService,
    listen: Listen,
    tls: Option<TlsIdentity>,
) -> Result<RunningServer, CsiError> {
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(service.opts.max_streams_per_connection.max(1)));
    let connections = Arc::new(tokio::sync::Semaphore::new(
        service.opts.max_connections.max(1),
    ));
    let tls_on = tls.is_some();
    if let Some(id) = tls {
        if matches!(listen, Listen::Unix(_)) {
            return Err(CsiError::ServerConfig {
                reason: "TLS is only supported on TCP listeners".into(),
            });
        }
        let cfg = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(id.cert_pem, id.key_pem),
        );
        builder = builder
            .tls_config(cfg)
            .map_err(|e| CsiError::ServerConfig {
                reason: format!("TLS: {}", crate::client::error_chain(&e)),
            })?;
    }
    let router = builder
        .add_service(
            pb::csi::snapshot_metadata_server::SnapshotMetadataServer::new(service.clone()),
        )
        .add_service(
            pb::k8s::snapshot_metadata_server::SnapshotMetadataServer::new(service.clone()),
        )
        .add_service(pb::csi::identity_server::IdentityServer::new(
            service.clone(),
        ))
        .add_service(pb::health::health_server::HealthServer::new(service));
    let (tx, rx) = oneshot::channel::<()>();
    let signal = async move {
        let _ = rx.await;
    };
    match listen {
        Listen::Unix(path) => {
            if let Ok(md) = std::fs::symlink_metadata(&path) {
                use std::os::unix::fs::FileTypeExt;
                if md.file_type().is_socket() {
                    let _ = std::fs::remove_file(&path);
                } else {
                    return Err(CsiError::ServerConfig {
                        reason: format!(
                            "{} exists and is not a socket; refusing to replace it",
                            path.display()
                        ),
                    });
                }
            }
            let listener =
                tokio::net::UnixListener::bind(&path).map_err(|source| CsiError::Io {
                    context: format!("binding unix socket {}", path.display()),
                    source,
                })?;
            let incoming = futures::stream::unfold(listener, |l| async move {
                let r = l.accept().await.map(|(s, _)| s);
                Some((r, l))
            });
            let incoming = limit_connections(incoming, connections);
            let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal));
            Ok(RunningServer {
                endpoint: format!("unix://{}", path.display()),
                local_addr: None,
                socket_path: Some(path),
                shutdown: Some(tx),
                task,
            })
        }
        Listen::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| CsiError::Io {
                    context: format!("binding {addr}"),
                    source,
                })?;
            let local = listener.local_addr().map_err(|source| CsiError::Io {
                context: format!("local address of {addr}"),
                source,
            })?;
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            let incoming = limit_connections(incoming, connections);
            let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal));
            let scheme = if tls_on { "https" } else { "http" };
            Ok(RunningServer {
                endpoint: format!("{scheme}://{local}"),
                local_addr: Some(local),
                socket_path: None,
                shutdown: Some(tx),
                task,
            })
        }
    }
}

/// An accepted connection holding one of the server's connection permits until it closes.
#[derive(Debug)]
pub struct LimitedConnection<IO> {
    inner: IO,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for LimitedConnection<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for LimitedConnection<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for LimitedConnection<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Admits accepted connections while permits last; one beyond the limit is closed at once.
fn limit_connections<S, IO, E>(
    incoming: S,
    permits: Arc<tokio::sync::Semaphore>,
) -> impl Stream<Item = Result<LimitedConnection<IO>, E>>
where
    S: Stream<Item = Result<IO, E>>,
{
    use futures::StreamExt;
    incoming.filter_map(move |conn| {
        let permits = permits.clone();
        async move {
            match conn {
                Err(e) => Some(Err(e)),
                Ok(io) => match permits.try_acquire_owned() {
                    Ok(permit) => Some(Ok(LimitedConnection {
                        inner: io,
                        _permit: permit,
                    })),
                    Err(_) => {
                        tracing::warn!(
                            "connection refused: the server's connection limit is reached"
                        );
                        drop(io);
                        None
                    }
                },
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_required_field_names_them_all() {
        assert!(require(&[("namespace", "n"), ("snapshot_name", "s")]).is_ok());
        for fields in [
            [("namespace", ""), ("snapshot_name", "s")],
            [("namespace", "n"), ("snapshot_name", "")],
        ] {
            let e = require(&fields).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert_eq!(e.message(), "namespace and snapshot_name are required");
        }
        let e = require(&[
            ("namespace", "n"),
            ("base_snapshot_id", "b"),
            ("target", ""),
        ]);
        assert_eq!(
            e.unwrap_err().message(),
            "namespace, base_snapshot_id and target are required"
        );
        let e = require(&[("volume_id", "")]).unwrap_err();
        assert_eq!(e.message(), "volume_id is required");
    }

    #[test]
    fn both_apis_answer_with_the_same_fields() {
        let msg = || Msg {
            block_type: BlockType::FixedLength,
            capacity: 1 << 30,
            tuples: vec![(0, 4096), (1 << 20, 8192)],
        };
        let csi = pb::csi::GetMetadataDeltaResponse::from(msg());
        let k8s = pb::k8s::GetMetadataAllocatedResponse::from(msg());
        assert_eq!(csi.block_metadata_type, BlockType::FixedLength.to_wire());
        assert_eq!(k8s.block_metadata_type, csi.block_metadata_type);
        assert_eq!(
            (csi.volume_capacity_bytes, k8s.volume_capacity_bytes),
            (1 << 30, 1 << 30)
        );
        let pairs: Vec<_> = k8s
            .block_metadata
            .iter()
            .map(|b| (b.byte_offset, b.size_bytes))
            .collect();
        assert_eq!(pairs, [(0, 4096), (1 << 20, 8192)]);
        assert_eq!(csi.block_metadata.len(), 2);
        assert_eq!(csi.block_metadata[1].byte_offset, 1 << 20);
    }

    #[test]
    fn tokens_match_only_exactly() {
        assert!(token_matches("s3cret", "s3cret"));
        for wrong in ["", "s3cre", "s3cretX", "S3cret", "s3creT", "x"] {
            assert!(!token_matches(wrong, "s3cret"), "{wrong:?}");
        }
    }

    #[test]
    fn snapshot_ids_follow_the_directory_rules() {
        assert!(validate_snapshot_id("snap-1.v2_a").is_ok());
        assert!(validate_snapshot_id(&"x".repeat(128)).is_ok());
        for bad in [
            "",
            ".",
            "..",
            "../a",
            "a/b",
            ".h",
            "a.meta.json",
            "a\0",
            "é",
        ] {
            assert!(validate_snapshot_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_snapshot_id(&"x".repeat(129)).is_err());
    }
}
