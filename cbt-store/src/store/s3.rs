//! S3 backend (AWS S3 and compatible servers) on aws-sdk-s3 with the ring-based HTTPS client.
//!
//! Owns: client construction (endpoint, region, path style, credentials from the standard AWS
//! chain: environment, profile, web identity, container/instance metadata), checksums on the
//! wire, conditional creates, multipart uploads of large bodies, and the mapping of S3 errors
//! to [`StoreError`]. The SDK's own retries are turned off: [`super::RetryingStore`] retries,
//! so the classification here (transient or not) is the single source of truth.
//!
//! Integrity: every PUT carries `x-amz-checksum-crc32c` (the server verifies the body) and the
//! crc32c as user metadata `cbt-crc32c`; bodies are sent with an unsigned payload (the
//! headers, checksum included, are signed; a SHA-256 of the body would only repeat what the
//! crc32c checks, at a multiple of its cost); a whole-object GET asks for the checksum
//! (`ChecksumMode::Enabled`) and compares both with the bytes received. A chunk read
//! ([`ObjectStore::get_unchecked`]) asks for neither check: the chunk decoder's one crc32c
//! pass over the body is compared with the `cbt-crc32c` metadata instead, and the SDK's own
//! response validation (on by default, a pass of its own) is configured to run only where a
//! request asks for it.
//!
//! # Knowing the server
//! Create-if-absent ([`PutMode::IfAbsent`], S3 `If-None-Match: *`) is what keeps locks
//! exclusive and snapshots immutable, and not every S3-compatible server honours it: some
//! ignore the header and overwrite. [`S3Store::connect`] therefore probes the server (when
//! `check_on_connect` is on): after a one-key listing (the bucket exists, the credentials
//! work) it creates a marker object, [`PROBE_KEY`], with the condition, and keeps it: on every
//! later connect a server that honours the condition refuses to create it again (one
//! request). The first creation writes it twice (the second must be refused) and reads it
//! back (a read right after a write must see the first body). On a server that fails, every
//! `IfAbsent` put is refused with [`StoreError::ConditionalWritesUnsupported`] naming the
//! server; reads (restore, verify, list) keep working. Credentials that may not write (a
//! read-only restore) leave the answer [`ConditionalWrites::Unknown`] and change nothing.
//!
//! Only the listing is waited for by `connect` (it is what turns a missing bucket or a wrong
//! credential into a clear error, and it must come first: some servers, SeaweedFS among them,
//! create a missing bucket on the first write into it). The conditional-write probe then runs
//! in the background, so the caller's first reads (the repository config) travel beside it:
//! opening a repository costs two sequential round trips instead of three. Every `IfAbsent`
//! put waits for the probe's answer before it is sent; a probe that failed on a transient error
//! is run again by the first put that needs it. Dropping the store and every clone of it aborts
//! a probe still running: nothing is left sending requests for a store nobody holds.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, ResponseChecksumValidation,
    RuntimeComponents,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls;
use bytes::Bytes;

use crate::aligned::{self, DIRECT_ALIGN};

use super::{
    ListPage, ObjectMeta, ObjectStore, Op, PutMode, PutOptions, PutOutcome, StoreError,
    UncheckedBody, validate_key, validate_prefix,
};

/// A GET's body and the crc32c values stored with the object, not yet compared.
struct FetchedBody {
    body: Bytes,
    /// From the `cbt-crc32c` user metadata.
    meta_crc: Option<u32>,
    /// From `x-amz-checksum-crc32c` (only when asked for).
    wire_crc: Option<u32>,
    /// crc32c of all the body's bytes but the last four, computed as they were copied (only
    /// when read into an aligned buffer without a wire checksum, and the whole announced
    /// length arrived).
    before_last4: Option<u32>,
}

/// User-metadata name under which the body's crc32c (8 hex digits) is stored.
pub const CRC_METADATA: &str = "cbt-crc32c";
/// Smallest part size S3 accepts (except for the last part).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

pub use super::S3Options;

/// Explicit access key pair, for embedding programs and tests; normal use leaves it out.
#[derive(Clone)]
pub struct StaticCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Everything needed to open one bucket/prefix.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`; empty for the bucket root).
    pub prefix: String,
    /// Custom endpoint URL; `None` for AWS.
    pub endpoint: Option<String>,
    /// Region; `None` takes it from the AWS chain, falling back to `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing.
    pub force_path_style: bool,
    /// Bodies at least this large are uploaded in parts.
    pub multipart_threshold: u64,
    /// Size of each part (raised to [`MIN_PART_SIZE`] if smaller).
    pub part_size: u64,
    /// Objects per listing page (S3 caps it at 1000).
    pub page_size: i32,
    /// Limit on one attempt of one request.
    pub attempt_timeout: Duration,
    /// Limit on establishing a connection.
    pub connect_timeout: Duration,
    /// Use these instead of the AWS credential chain.
    pub credentials: Option<StaticCredentials>,
    /// Probe the bucket when connecting (see the module docs), so a missing bucket or bad
    /// credentials fail early and a server that ignores conditional writes is known.
    pub check_on_connect: bool,
}

impl S3Config {
    /// Configuration for `bucket`/`prefix` with defaults.
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self::from_options(&bucket.into(), &prefix.into(), &S3Options::default())
    }

    /// Configuration for `bucket`/`prefix` from user-facing options.
    pub fn from_options(bucket: &str, prefix: &str, opts: &S3Options) -> Self {
        Self {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: opts.endpoint.clone(),
            region: opts.region.clone(),
            force_path_style: opts.force_path_style.unwrap_or(opts.endpoint.is_some()),
            multipart_threshold: opts.multipart_threshold,
            part_size: opts.part_size,
            page_size: 1000,
            attempt_timeout: opts.attempt_timeout,
            connect_timeout: Duration::from_secs(10),
            credentials: None,
            check_on_connect: true,
        }
    }
}

/// What the connect-time probe found out about conditional writes on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionalWrites {
    /// `If-None-Match: *` is honoured and a read after a write sees it.
    Honoured,
    /// The server overwrote an existing object despite `If-None-Match: *`, or a read right
    /// after a write did not see it: exclusive writes are refused.
    Ignored,
    /// Not probed (`check_on_connect` off) or the probe could not write (read-only
    /// credentials): writes go to the server as asked.
    Unknown,
}

/// HTTP requests a [`S3Store`] has sent, by kind (every attempt counts, retries included).
///
/// Requests cost round trips and, on a server sharing the machine, its CPU: these counts are
/// what tests bound and what `RUST_LOG=cbt_store::store::s3=debug` shows request by request
/// (an `S3 request` line when one is sent, an `S3 answer` line with its status when the answer
/// arrives: together they show which requests overlap).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// `PUT` (objects and multipart parts).
    pub put: u64,
    /// `GET` of an object (whole or range).
    pub get: u64,
    /// `HEAD` of an object.
    pub head: u64,
    /// `GET` of a listing.
    pub list: u64,
    /// `DELETE`.
    pub delete: u64,
    /// Anything else (`POST`: multipart create and complete).
    pub other: u64,
    /// Of the object `GET`s, those that asked for the stored checksum
    /// (`x-amz-checksum-mode: ENABLED`), which the SDK then validates with a crc32c pass of
    /// its own (a chunk read does not: its bytes are checksummed once, by the decoder).
    pub get_with_checksum: u64,
}

impl RequestCounts {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.put + self.get + self.head + self.list + self.delete + self.other
    }
}

/// `METHOD uri` of the attempt in flight, for its answer's log line.
#[derive(Debug, Clone)]
struct SentRequest(String);

impl aws_smithy_types::config_bag::Storable for SentRequest {
    type Storer = aws_smithy_types::config_bag::StoreReplace<Self>;
}

/// Shared by every clone of one store; one slot per [`RequestCounts`] field.
#[derive(Debug, Default, Clone)]
struct RequestCounter(Arc<[AtomicU64; 7]>);

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "cbt-request-counter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let req = context.request();
        let uri = req.uri();
        let query = uri.split_once('?').map_or("", |(_, q)| q);
        let slot = match req.method() {
            "PUT" => 0,
            "GET" if query.split('&').any(|p| p.starts_with("list-type=")) => 3,
            "GET" => 1,
            "HEAD" => 2,
            "DELETE" => 4,
            _ => 5,
        };
        self.0[slot].fetch_add(1, Ordering::Relaxed);
        if slot == 1 && req.headers().get("x-amz-checksum-mode").is_some() {
            self.0[6].fetch_add(1, Ordering::Relaxed);
        }
        // Only for the debug log: no string per request otherwise.
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(method = req.method(), %uri, "S3 request");
            // The request itself is gone by the time its answer is seen: keep what names it.
            cfg.interceptor_state()
                .store_put(SentRequest(format!("{} {uri}", req.method())));
        }
        Ok(())
    }

    // With the request lines, the answers show the round trips: which requests overlap and
    // which wait for another.
    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let status = context.response().map(|r| r.status().as_u16());
            let sent = cfg.load::<SentRequest>().map_or("?", |s| s.0.as_str());
            tracing::debug!(request = sent, ?status, "S3 answer");
        }
        Ok(())
    }
}

impl RequestCounter {
    fn snapshot(&self) -> RequestCounts {
        let n = |i: usize| self.0[i].load(Ordering::Relaxed);
        RequestCounts {
            put: n(0),
            get: n(1),
            head: n(2),
            list: n(3),
            delete: n(4),
            other: n(5),
            get_with_checksum: n(6),
        }
    }
}

/// The connect-time probe's marker object (kept: see [`S3Store::connect`]); listings skip
/// everything under `.cbt-probe/`, so users of the store never see it.
pub const PROBE_KEY: &str = ".cbt-probe/conditional-writes";
/// What listings hide: the probe's marker (and scratch objects older versions left behind).
const PROBE_DIR: &str = ".cbt-probe/";
/// Body of [`PROBE_KEY`].
const PROBE_BODY: &[u8] = b"cbt: conditional-write probe marker\n";

/// [`ObjectStore`] on one S3 bucket and key prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    cfg: S3Config,
    endpoint_label: String,
    /// The probe's answer and what it saw (for the error of a refused write); shared by every
    /// clone, filled by the background probe or by the first `IfAbsent` put that needs it.
    conditional: Arc<tokio::sync::OnceCell<(ConditionalWrites, String)>>,
    requests: RequestCounter,
    /// The background probe, aborted when the last clone the caller holds is dropped (the
    /// probe's own clone holds none of this, so it does not keep itself alive).
    probe_task: Option<Arc<ProbeTask>>,
}

/// Aborts the background conditional-write probe when dropped: a store dropped right after
/// `connect` (a failed open, a short-lived tool) leaves no request running behind it.
#[derive(Debug)]
struct ProbeTask(tokio::task::AbortHandle);

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl S3Store {
    /// Builds the client and, unless `check_on_connect` is off, probes the bucket: it exists and
    /// the credentials work (waited for), and conditional writes are honoured (in the
    /// background: see the module docs and [`Self::conditional_writes`]).
    ///
    /// # Errors
    /// [`StoreError::BucketNotFound`], [`StoreError::AccessDenied`],
    /// [`StoreError::Unreachable`], or [`StoreError::Config`] (e.g. no credentials found).
    pub async fn connect(cfg: S3Config) -> Result<Self, StoreError> {
        if cfg.bucket.is_empty() {
            return Err(StoreError::Config {
                message: "S3 bucket name is empty".into(),
            });
        }
        if !cfg.prefix.is_empty() {
            validate_key(&cfg.prefix)?;
        }
        // A plain-http endpoint (a server on the same host or network) gets a client without
        // TLS: the TLS one loads the system's root certificates (twice per process, once when
        // the client is checked and once on first use) for connections that never use them.
        let plain_http = cfg
            .endpoint
            .as_deref()
            .and_then(|e| e.get(..7))
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"));
        let http = if plain_http {
            aws_smithy_http_client::Builder::new().build_http()
        } else {
            aws_smithy_http_client::Builder::new()
                .tls_provider(tls::Provider::Rustls(
                    tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https()
        };
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(cfg.connect_timeout)
                    .operation_attempt_timeout(cfg.attempt_timeout)
                    .build(),
            );
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &cfg.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        if let Some(c) = &cfg.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                None,
                None,
                "cbt-static",
            ));
        }
        let sdk = loader.load().await;
        // Without a credential source every request would fail later as a retried "dispatch
        // failure"; resolving once here makes it a configuration error that says what to set.
        if let Some(provider) = sdk.credentials_provider() {
            use aws_sdk_s3::config::ProvideCredentials;
            provider
                .provide_credentials()
                .await
                .map_err(|e| StoreError::Config {
                    message: format!(
                        "no usable AWS credentials for s3://{} ({e}); set AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a web identity or \
                         instance role",
                        cfg.bucket
                    ),
                })?;
        }
        let requests = RequestCounter::default();
        // The SDK's default (`WhenSupported`) asks every GET for the stored checksum and
        // validates it with a crc32c pass of its own; `WhenRequired` validates only where a
        // request asks (`get_limited` does). Chunk reads leave it off: their crc32c is
        // computed once, by the chunk decoder, over every byte (`get_unchecked`).
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .force_path_style(cfg.force_path_style)
            .interceptor(requests.clone());
        if sdk.region().is_none() {
            builder = builder.region(Region::new("us-east-1"));
        }
        let client = Client::from_conf(builder.build());
        let endpoint_label = cfg
            .endpoint
            .clone()
            .unwrap_or_else(|| "AWS S3 (default endpoint)".to_string());
        let mut store = Self {
            client,
            cfg,
            endpoint_label,
            conditional: Arc::default(),
            requests,
            probe_task: None,
        };
        if !store.cfg.check_on_connect {
            // Cannot fail: the cell was created empty just above.
            let _ = store
                .conditional
                .set((ConditionalWrites::Unknown, String::new()));
            return Ok(store);
        }
        store.check_bucket().await?;
        let background = store.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = background.conditional_answer().await {
                tracing::debug!(error = %e, "conditional-write probe failed; the first exclusive write retries it");
            }
        });
        store.probe_task = Some(Arc::new(ProbeTask(task.abort_handle())));
        Ok(store)
    }

    /// What the connect-time probe found out about conditional writes (see the module docs);
    /// waits for the probe if it is still running, and runs it again if it failed.
    ///
    /// # Errors
    /// A transient failure of the probe's requests (the answer stays unknown: the next call
    /// probes again).
    pub async fn conditional_writes(&self) -> Result<ConditionalWrites, StoreError> {
        Ok(self.conditional_answer().await?.0)
    }

    /// The probe's answer, probing once for all clones.
    async fn conditional_answer(&self) -> Result<&(ConditionalWrites, String), StoreError> {
        self.conditional
            .get_or_try_init(|| async {
                let (found, detail) = self.probe().await?;
                if found == ConditionalWrites::Ignored {
                    tracing::warn!(endpoint = %self.endpoint_label, %detail, "S3 server ignores conditional writes; exclusive writes will be refused");
                }
                Ok((found, detail))
            })
            .await
    }

    /// Proves that the bucket exists and the credentials work: a one-key listing (not a write:
    /// some servers, SeaweedFS among them, create a missing bucket on the first write into it).
    async fn check_bucket(&self) -> Result<(), StoreError> {
        self.client
            .list_objects_v2()
            .bucket(&self.cfg.bucket)
            .prefix(self.full_key(""))
            .max_keys(1)
            .send()
            .await
            .map_err(|e| self.classify(Op::List, "", e))?;
        Ok(())
    }

    /// Finds out whether the server honours `If-None-Match: *` (after [`Self::check_bucket`]):
    /// one request once the marker exists.
    ///
    /// The marker object ([`PROBE_KEY`]) is created with the condition the first time and
    /// kept. Each later connect creates it again with the condition: a server that honours it
    /// refuses (`412`), which answers the question in one request; one that ignores it
    /// accepts, and a second create proves it. The first creation also reads the marker back
    /// (a read right after a write must see it).
    async fn probe(&self) -> Result<(ConditionalWrites, String), StoreError> {
        let put = || {
            let body = Bytes::from_static(PROBE_BODY);
            let crc = crate::crc::crc32c(&body);
            self.put_single(PROBE_KEY, body, crc, PutMode::IfAbsent)
        };
        match put().await {
            Ok(PutOutcome::AlreadyExists) => {
                return Ok((ConditionalWrites::Honoured, String::new()));
            }
            Ok(PutOutcome::Created) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                // No write permission (a read-only restore): nothing to learn about writes.
                tracing::debug!(error = %e, "conditional-write probe could not write");
                return Ok((ConditionalWrites::Unknown, String::new()));
            }
        }
        // Just created: a second create must be refused, and a read must see the first.
        let again = put().await?;
        let read = match self.get_limited(PROBE_KEY, Some(64), None).await {
            Ok(b) => Some(b),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(match (again, read) {
            (PutOutcome::Created, _) => (
                ConditionalWrites::Ignored,
                "a second create of the same key was accepted and overwrote the first".into(),
            ),
            (_, None) => (
                ConditionalWrites::Ignored,
                "an object just written could not be read back".into(),
            ),
            (_, Some(b)) if b != PROBE_BODY => (
                ConditionalWrites::Ignored,
                "an object read back right after it was written has other contents".into(),
            ),
            _ => (ConditionalWrites::Honoured, String::new()),
        })
    }

    /// HTTP requests sent so far by this store and its clones, the connect probes included.
    pub fn request_counts(&self) -> RequestCounts {
        self.requests.snapshot()
    }

    /// Bucket this store writes to.
    pub fn bucket(&self) -> &str {
        &self.cfg.bucket
    }

    /// The underlying SDK client (for tools that need bucket-level calls).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn full_key(&self, key: &str) -> String {
        if self.cfg.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.cfg.prefix, key)
        }
    }

    fn strip_prefix<'a>(&self, full: &'a str) -> Option<&'a str> {
        if self.cfg.prefix.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(self.cfg.prefix.as_str())?
                .strip_prefix('/')
        }
    }

    /// Maps an SDK error to a [`StoreError`]: the one place S3 failures are classified.
    fn classify<E>(
        &self,
        op: Op,
        key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_string);
        let text = format!("{}", DisplayErrorContext(&err));
        match &err {
            SdkError::DispatchFailure(d) => {
                if d.is_user() {
                    StoreError::Config { message: text }
                } else if d.is_timeout() || cannot_connect(&err, &text) {
                    StoreError::Unreachable {
                        endpoint: self.endpoint_label.clone(),
                        message: text,
                    }
                } else {
                    // Includes a pooled connection closed by the server mid-request.
                    StoreError::Transient {
                        op,
                        key: key.to_string(),
                        message: text,
                    }
                }
            }
            SdkError::TimeoutError(_) => StoreError::Transient {
                op,
                key: key.to_string(),
                message: format!("request timed out: {text}"),
            },
            SdkError::ResponseError(_) => StoreError::Transient {
                op,
                key: key.to_string(),
                message: format!("unreadable response: {text}"),
            },
            SdkError::ConstructionFailure(_) => StoreError::Config {
                message: format!(
                    "cannot build the S3 request (credentials or configuration): {text}"
                ),
            },
            _ => self.classify_status(op, key, status, code.as_deref(), err.message(), text),
        }
    }

    fn classify_status(
        &self,
        op: Op,
        key: &str,
        status: Option<u16>,
        code: Option<&str>,
        message: Option<&str>,
        text: String,
    ) -> StoreError {
        let message = message.map(str::to_string).unwrap_or(text);
        match (code, status) {
            (Some("NoSuchBucket"), _) => StoreError::BucketNotFound {
                bucket: self.cfg.bucket.clone(),
            },
            (Some("InvalidBucketName"), _) => StoreError::Config {
                message: format!("`{}` is not a valid bucket name", self.cfg.bucket),
            },
            (Some("NoSuchKey" | "NotFound"), _) | (_, Some(404)) => StoreError::NotFound {
                key: key.to_string(),
            },
            (
                Some(
                    c @ ("SignatureDoesNotMatch"
                    | "InvalidAccessKeyId"
                    | "AccessDenied"
                    | "ExpiredToken"
                    | "InvalidToken"
                    | "TokenRefreshRequired"
                    | "AuthorizationHeaderMalformed"),
                ),
                _,
            ) => StoreError::AccessDenied {
                bucket: self.cfg.bucket.clone(),
                code: c.to_string(),
                message,
            },
            (code, Some(403)) => StoreError::AccessDenied {
                bucket: self.cfg.bucket.clone(),
                code: code.unwrap_or("403 Forbidden").to_string(),
                message,
            },
            (Some("InvalidRange"), _) | (_, Some(416)) => StoreError::RangeNotSatisfiable {
                key: key.to_string(),
                start: 0,
                end: 0,
                size: None,
            },
            (
                Some(
                    "SlowDown"
                    | "Throttling"
                    | "ThrottlingException"
                    | "RequestTimeout"
                    | "InternalError"
                    | "ServiceUnavailable"
                    | "RequestTimeTooSkewed"
                    | "ConditionalRequestConflict"
                    | "BadDigest"
                    | "XAmzContentChecksumMismatch"
                    | "IncompleteBody",
                ),
                _,
            )
            | (_, Some(408 | 409 | 429 | 500..=599)) => StoreError::Transient {
                op,
                key: key.to_string(),
                message: format!("{}: {message}", code.unwrap_or("HTTP error")),
            },
            (code, status) => StoreError::Backend {
                op,
                key: key.to_string(),
                message: format!(
                    "{} (HTTP {}): {message}",
                    code.unwrap_or("unknown error"),
                    status.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
                ),
            },
        }
    }

    /// Whole-object GET with checksum checks; with `max_len`, an object whose announced
    /// length is larger is refused before its body is read, and the body is read piece by
    /// piece so a server that announces less than it sends cannot make us hold more.
    async fn get_limited(
        &self,
        key: &str,
        max_len: Option<u64>,
        aligned_at: Option<usize>,
    ) -> Result<Bytes, StoreError> {
        let got = self.get_body(key, max_len, aligned_at, true).await?;
        let actual = crate::crc::crc32c(&got.body);
        for expected in [got.meta_crc, got.wire_crc].into_iter().flatten() {
            if expected != actual {
                return Err(StoreError::Corrupt {
                    key: key.to_string(),
                    expected,
                    actual,
                });
            }
        }
        Ok(got.body)
    }

    /// Whole-object GET whose crc32c comparison is the caller's (see
    /// [`ObjectStore::get_unchecked`]). The response checksum is not asked for: the SDK would
    /// validate it with a crc32c pass of its own over the same bytes the caller checksums,
    /// so the body's stored crc32c comes from the `cbt-crc32c` metadata every put writes.
    async fn get_unchecked_body(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Result<UncheckedBody, StoreError> {
        let got = self.get_body(key, Some(max_len), aligned_at, false).await?;
        match (got.meta_crc, got.wire_crc) {
            (Some(meta), Some(wire)) if meta != wire => Err(StoreError::Malformed {
                key: key.to_string(),
                reason: format!(
                    "the object's stored checksums disagree: metadata {meta:#010x}, \
                     x-amz-checksum-crc32c {wire:#010x}"
                ),
            }),
            (Some(crc), _) | (None, Some(crc)) => {
                let read = UncheckedBody::pending(key, got.body, crc);
                Ok(match got.before_last4 {
                    Some(prefix) => read.with_crc_before_last4(prefix),
                    None => read,
                })
            }
            // `get_body` refuses an object without either.
            (None, None) => Err(StoreError::Malformed {
                key: key.to_string(),
                reason: "object carries no crc32c (not written by this tool?)".into(),
            }),
        }
    }

    /// The body of a whole-object GET with the crc32c values stored beside it (at least
    /// one), nothing compared yet. With `wire_checksum`, the server is asked for the
    /// checksum it stored (`x-amz-checksum-mode: ENABLED`), which the SDK then validates
    /// against the body as it streams in.
    async fn get_body(
        &self,
        key: &str,
        max_len: Option<u64>,
        aligned_at: Option<usize>,
        wire_checksum: bool,
    ) -> Result<FetchedBody, StoreError> {
        validate_key(key)?;
        let too_large = |size| StoreError::TooLarge {
            key: key.to_string(),
            size,
            limit: max_len.unwrap_or(u64::MAX),
        };
        let mut req = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(self.full_key(key));
        if wire_checksum {
            req = req.checksum_mode(ChecksumMode::Enabled);
        }
        let out = req
            .send()
            .await
            .map_err(|e| self.classify(Op::Get, key, e))?;
        let announced = out.content_length().and_then(|n| u64::try_from(n).ok());
        if let (Some(max), Some(n)) = (max_len, announced)
            && n > max
        {
            // Dropping the response closes the connection without reading the body.
            return Err(too_large(Some(n)));
        }
        let wire_crc = out.checksum_crc32_c().and_then(parse_crc_b64);
        let meta_crc = out
            .metadata()
            .and_then(|m| m.get(CRC_METADATA))
            .and_then(|v| u32::from_str_radix(v, 16).ok());
        let body_failed = |text: String| {
            if text.to_ascii_lowercase().contains("checksum mismatch") {
                StoreError::Malformed {
                    key: key.to_string(),
                    reason: format!("body does not match the checksum the server stored: {text}"),
                }
            } else {
                StoreError::Transient {
                    op: Op::Get,
                    key: key.to_string(),
                    message: format!("body read failed: {text}"),
                }
            }
        };
        let mut stream = out.body;
        let expect = announced
            .map_or(0, |n| n.min(max_len.unwrap_or(u64::MAX)))
            .min(64 << 20) as usize;
        // With an alignment wish and an announced length, the pieces are gathered straight
        // into a pooled aligned buffer (the same one copy as into a growable one); a server
        // that sends more than it announced falls back to growing.
        let mut fixed = aligned_at.filter(|_| announced.is_some()).map(|at| {
            let pad = (DIRECT_ALIGN - at % DIRECT_ALIGN) % DIRECT_ALIGN;
            let mut buf = aligned::take(pad + expect);
            buf.resize(pad + expect);
            (buf, pad, pad)
        });
        let mut buf = bytes::BytesMut::new();
        if fixed.is_none() {
            buf.reserve(expect);
        }
        // Without a wire checksum the caller checksums the body; into an aligned buffer, each
        // piece is checksummed as it is copied (still in cache) rather than in a pass of the
        // caller's over the whole body later. The last four bytes are left out (a chunk's
        // trailer is the crc32c of the bytes before it), so the caller derives both from this.
        let mut prefix = expect
            .checked_sub(4)
            .filter(|_| !wire_checksum)
            .map(|upto| (0u32, upto));
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| body_failed(format!("{}", DisplayErrorContext(&e))))?;
            let held = fixed.as_ref().map_or(buf.len(), |(_, pad, end)| end - pad);
            if max_len.is_some_and(|max| (held + piece.len()) as u64 > max) {
                return Err(too_large(None));
            }
            match &mut fixed {
                Some((b, pad, end)) if *end + piece.len() <= b.len() => {
                    let at = *end - *pad;
                    b.as_mut_slice()[*end..*end + piece.len()].copy_from_slice(&piece);
                    *end += piece.len();
                    if let Some((crc, upto)) = &mut prefix
                        && at < *upto
                    {
                        let take = (*upto - at).min(piece.len());
                        *crc = crate::crc::combine(*crc, crate::crc::crc32c(&piece[..take]), take);
                    }
                }
                Some((b, pad, end)) => {
                    buf.extend_from_slice(&b.as_slice()[*pad..*end]);
                    buf.extend_from_slice(&piece);
                    fixed = None;
                }
                None => buf.extend_from_slice(&piece),
            }
        }
        let (body, before_last4) = match fixed {
            Some((b, pad, end)) => {
                // Only when every announced byte arrived is the crc over all but the last four.
                let whole = end - pad == expect;
                (
                    aligned::into_bytes(b, pad..end),
                    prefix.filter(|_| whole).map(|(crc, _)| crc),
                )
            }
            None => (buf.freeze(), None),
        };
        if meta_crc.or(wire_crc).is_none() {
            return Err(StoreError::Malformed {
                key: key.to_string(),
                reason: "object carries no crc32c (not written by this tool?)".into(),
            });
        }
        Ok(FetchedBody {
            body,
            meta_crc,
            wire_crc,
            before_last4,
        })
    }

    async fn put_single(
        &self,
        key: &str,
        body: Bytes,
        crc: u32,
        mode: PutMode,
    ) -> Result<PutOutcome, StoreError> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(self.full_key(key))
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .checksum_crc32_c(crc_b64(crc))
            .metadata(CRC_METADATA, format!("{crc:08x}"))
            .body(ByteStream::from(body));
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        // The body's integrity is the crc32c header's job (the server verifies it), so the
        // SHA-256 of the body that SigV4 payload signing adds (a pass over every byte: an
        // eighth of a full backup's CPU) is skipped; the headers stay signed.
        match req.customize().disable_payload_signing().send().await {
            Ok(_) => Ok(PutOutcome::Created),
            Err(e) if mode == PutMode::IfAbsent && is_precondition_failed(&e) => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(e) => Err(self.classify(Op::Put, key, e)),
        }
    }

    async fn put_multipart(
        &self,
        key: &str,
        body: Bytes,
        crc: u32,
        mode: PutMode,
    ) -> Result<PutOutcome, StoreError> {
        let full = self.full_key(key);
        if mode == PutMode::IfAbsent && self.head(key).await?.is_some() {
            return Ok(PutOutcome::AlreadyExists);
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(&full)
            .checksum_algorithm(ChecksumAlgorithm::Crc32C)
            .metadata(CRC_METADATA, format!("{crc:08x}"))
            .send()
            .await
            .map_err(|e| self.classify(Op::Put, key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = self.upload_parts(key, &full, &upload_id, body, mode).await;
        if !matches!(result, Ok(PutOutcome::Created)) {
            // Abandoned parts cost storage until aborted; failure to abort is only logged.
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.cfg.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(key, error = %DisplayErrorContext(&e), "could not abort multipart upload");
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        body: Bytes,
        mode: PutMode,
    ) -> Result<PutOutcome, StoreError> {
        let part_size = self.cfg.part_size.max(MIN_PART_SIZE) as usize;
        let mut parts = Vec::new();
        for (i, start) in (0..body.len()).step_by(part_size).enumerate() {
            let part = body.slice(start..(start + part_size).min(body.len()));
            let number = i as i32 + 1;
            let part_crc = crc_b64(crate::crc::crc32c(&part));
            let out = self
                .client
                .upload_part()
                .bucket(&self.cfg.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_crc32_c(&part_crc)
                .body(ByteStream::from(part))
                .customize()
                .disable_payload_signing()
                .send()
                .await
                .map_err(|e| self.classify(Op::Put, key, e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .checksum_crc32_c(part_crc)
                    .build(),
            );
        }
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        if mode == PutMode::IfAbsent {
            req = req.if_none_match("*");
        }
        match req.send().await {
            Ok(_) => Ok(PutOutcome::Created),
            Err(e) if mode == PutMode::IfAbsent && is_precondition_failed(&e) => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(e) => Err(self.classify(Op::Put, key, e)),
        }
    }
}

/// True when the request failed before any connection was made: refused, unroutable, DNS.
fn cannot_connect(err: &(dyn std::error::Error + 'static), text: &str) -> bool {
    use std::io::ErrorKind as K;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::HostUnreachable
                    | K::NetworkUnreachable
                    | K::AddrNotAvailable
            )
        }) {
            return true;
        }
        cur = e.source();
    }
    let lower = text.to_ascii_lowercase();
    lower.contains("dns error")
        || lower.contains("failed to lookup address")
        || lower.contains("connection refused")
}

fn is_precondition_failed<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    e.raw_response().is_some_and(|r| r.status().as_u16() == 412)
        || e.code() == Some("PreconditionFailed")
}

/// Base64 of the big-endian crc32c, the form S3 uses in `x-amz-checksum-crc32c`.
pub fn crc_b64(crc: u32) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = crc.to_be_bytes();
    let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
    let m = u32::from(b[3]) << 16;
    let idx = [
        n >> 18,
        (n >> 12) & 63,
        (n >> 6) & 63,
        n & 63,
        m >> 18,
        (m >> 12) & 63,
    ];
    let mut s: String = idx.iter().map(|&i| ALPHABET[i as usize] as char).collect();
    s.push_str("==");
    s
}

fn parse_crc_b64(s: &str) -> Option<u32> {
    let decode = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = s.as_bytes();
    if bytes.len() != 8 || &bytes[6..] != b"==" {
        return None;
    }
    let mut acc: u64 = 0;
    for &c in &bytes[..6] {
        acc = (acc << 6) | u64::from(decode(c)?);
    }
    // 36 bits decoded; the low 4 are padding.
    Some((acc >> 4) as u32)
}

fn to_system_time(t: &aws_sdk_s3::primitives::DateTime) -> Option<SystemTime> {
    SystemTime::try_from(*t).ok()
}

#[async_trait::async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        self.put_with(key, body, PutOptions::new(mode)).await
    }

    // S3 puts are durable when acknowledged: `defer_sync` changes nothing and `sync` is the
    // trait's no-op.
    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        opts: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        validate_key(key)?;
        let mode = opts.mode;
        let crc = match opts.crc32c {
            Some(crc) => {
                debug_assert_eq!(crc, crc32c::crc32c(&body), "put_with: wrong crc32c");
                crc
            }
            None => crate::crc::crc32c(&body),
        };
        if mode == PutMode::IfAbsent {
            let (found, detail) = self.conditional_answer().await?;
            if *found == ConditionalWrites::Ignored {
                return Err(StoreError::ConditionalWritesUnsupported {
                    endpoint: self.endpoint_label.clone(),
                    detail: detail.clone(),
                });
            }
        }
        if body.len() as u64 >= self.cfg.multipart_threshold.max(MIN_PART_SIZE) {
            self.put_multipart(key, body, crc, mode).await
        } else {
            self.put_single(key, body, crc, mode).await
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.get_limited(key, None, None).await
    }

    async fn get_bounded(&self, key: &str, max_len: u64) -> Result<Bytes, StoreError> {
        self.get_limited(key, Some(max_len), None).await
    }

    async fn get_bounded_aligned(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: usize,
    ) -> Result<Bytes, StoreError> {
        self.get_limited(key, Some(max_len), Some(aligned_at)).await
    }

    async fn get_unchecked(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Result<UncheckedBody, StoreError> {
        self.get_unchecked_body(key, max_len, aligned_at).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let unsatisfiable = |size| StoreError::RangeNotSatisfiable {
            key: key.to_string(),
            start: range.start,
            end: range.end,
            size,
        };
        if range.start >= range.end {
            return Err(unsatisfiable(None));
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(self.full_key(key))
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await
            .map_err(|e| match self.classify(Op::GetRange, key, e) {
                StoreError::RangeNotSatisfiable { .. } => unsatisfiable(None),
                other => other,
            })?;
        let total = out
            .content_range()
            .and_then(|r| r.rsplit('/').next())
            .and_then(|t| t.parse::<u64>().ok());
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Transient {
                op: Op::GetRange,
                key: key.to_string(),
                message: format!("body read failed: {}", DisplayErrorContext(&e)),
            })?
            .into_bytes();
        // S3 clamps a range that runs past the end instead of failing; the trait does not.
        if body.len() as u64 != range.end - range.start {
            return Err(unsatisfiable(total));
        }
        Ok(body)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        validate_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                last_modified: out.last_modified().and_then(to_system_time),
            })),
            Err(e) => match self.classify(Op::Head, key, e) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, StoreError> {
        validate_prefix(prefix)?;
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.cfg.bucket)
            .prefix(self.full_key(prefix))
            .max_keys(self.cfg.page_size)
            .set_continuation_token(continuation)
            .send()
            .await
            .map_err(|e| self.classify(Op::List, prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                let key = self.strip_prefix(o.key()?)?;
                if key.starts_with(PROBE_DIR) {
                    return None;
                }
                Some(ObjectMeta {
                    key: key.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    last_modified: o.last_modified().and_then(to_system_time),
                })
            })
            .collect();
        let next = if out.is_truncated() == Some(true) {
            out.next_continuation_token().map(str::to_string)
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match self.classify(Op::Delete, key, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_base64_round_trip() {
        // crc32c("123456789") = 0xe3069283, which S3 writes as "4waSgw==".
        assert_eq!(crc_b64(0xe306_9283), "4waSgw==");
        for v in [0, 1, 0xffff_ffff, 0x1234_5678, 0xe306_9283] {
            assert_eq!(parse_crc_b64(&crc_b64(v)), Some(v));
        }
        assert_eq!(parse_crc_b64("nope"), None);
    }

    /// A body read into an aligned buffer for a caller that checks it comes with the crc32c
    /// of all but its last four bytes, computed as the pieces arrived (bodies of many pieces,
    /// of sizes around four bytes, at several alignments); read otherwise, without.
    #[cfg(feature = "testing")]
    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn aligned_unchecked_reads_carry_the_crc_before_the_last_four_bytes() {
        let server = crate::testing::S3TestServer::start().await.unwrap();
        server.create_bucket("arrival").unwrap();
        let store = server.store("arrival", "p").await.unwrap();
        for (i, len) in [4usize, 5, 4099, 1 << 20, (3 << 20) + 7]
            .into_iter()
            .enumerate()
        {
            let body: Bytes = (0..len).map(|j| (j * 7 + j / 251 + i) as u8).collect();
            let key = format!("o{i}");
            store
                .put(&key, body.clone(), PutMode::Overwrite)
                .await
                .unwrap();
            for at in [0, 48, 4095] {
                let read = store
                    .get_unchecked(&key, len as u64, Some(at))
                    .await
                    .unwrap();
                let (got, pending, before) = read.into_parts();
                assert!(got == body);
                assert_eq!(pending, Some(crc32c::crc32c(&body)));
                assert_eq!(
                    before,
                    Some(crc32c::crc32c(&body[..len - 4])),
                    "{len} at {at}"
                );
            }
            let (_, _, before) = store
                .get_unchecked(&key, len as u64, None)
                .await
                .unwrap()
                .into_parts();
            assert_eq!(before, None);
        }
    }
}
