//! The object store boundary: a small async trait every backend implements, the error type
//! all backends share, key validation, and opening a store from a URL.
//!
//! Owns: [`ObjectStore`], [`StoreError`], key rules, [`open_url`]. Backends live in
//! [`local`] (directory store, the embedded default) and `s3` (cargo feature `s3`, on by
//! default); wrappers that implement the same trait live in [`retry`] (backoff on transient
//! errors) and `fault` (fault injection for tests, cargo feature `testing`). Nothing here knows about repositories, chunks or manifests.
//!
//! Memory: a `put` or `get` holds one whole object body (plus, for S3, one part of a multipart
//! upload in flight). Objects read back are untrusted, so readers that know how large an object
//! can be (the repository always does) use [`ObjectStore::get_bounded`], which refuses a larger
//! object before reading its body wherever the backend reports the size up front (both
//! backends do) and never holds more than the limit. Listings hold one page.

#[cfg(feature = "testing")]
pub mod fault;
pub mod local;
pub mod retry;
#[cfg(feature = "s3")]
pub mod s3;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use local::LocalStore;
pub use retry::{RetryPolicy, RetryingStore};
#[cfg(feature = "s3")]
pub use s3::{ConditionalWrites, RequestCounts, S3Config, S3Store};

/// User-facing S3 settings shared by every bucket a program opens (flags, config file).
///
/// Credentials are deliberately absent: they come from the standard AWS chain
/// (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, web identity, instance roles).
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Custom endpoint URL (MinIO, SeaweedFS, Ceph RGW...); `None` for AWS.
    pub endpoint: Option<String>,
    /// Region; `None` takes it from the AWS chain, falling back to `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); defaults to true when an endpoint is set.
    pub force_path_style: Option<bool>,
    /// Bodies at least this large are uploaded in parts.
    pub multipart_threshold: u64,
    /// Size of each part of a multipart upload (at least 5 MiB).
    pub part_size: u64,
    /// Retry policy of the store returned by [`open_url`].
    pub retry: RetryPolicy,
    /// Limit on one attempt of one request (connect + transfer).
    pub attempt_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            force_path_style: None,
            multipart_threshold: 64 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
            retry: RetryPolicy::default(),
            attempt_timeout: Duration::from_secs(120),
        }
    }
}

/// Longest key (in bytes) any backend accepts.
pub const MAX_KEY_LEN: usize = 1024;

/// A flat namespace of immutable-ish blobs addressed by `/`-separated keys.
///
/// Keys are relative to the store's root (directory or bucket prefix) and are validated by
/// [`validate_key`] in every backend, so a key can never address anything outside the root.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug + 'static {
    /// Writes `body` under `key`, with its crc32c stored beside it (S3: `x-amz-checksum-crc32c`).
    ///
    /// # Guarantees
    /// Readers see either the previous object or the whole new one, never a partial body.
    /// With [`PutMode::IfAbsent`], of two concurrent writers of the same key exactly one gets
    /// [`PutOutcome::Created`]; the other gets [`PutOutcome::AlreadyExists`] and the stored body
    /// is the winner's.
    ///
    /// # Errors
    /// [`StoreError::InvalidKey`] for a bad key; transport and backend failures otherwise.
    async fn put(&self, key: &str, body: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError>;

    /// Like [`ObjectStore::put`], with what the caller knows or allows besides the mode (see
    /// [`PutOptions`]): the body's crc32c, so the backend does not read the body again to
    /// checksum it, and whether durability may wait for [`ObjectStore::sync`].
    ///
    /// The default ignores both and calls `put`; backends and wrappers override it (a wrapper
    /// that overrides it must also forward [`ObjectStore::sync`]).
    ///
    /// # Errors
    /// As [`ObjectStore::put`].
    async fn put_with(
        &self,
        key: &str,
        body: Bytes,
        opts: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        self.put(key, body, opts.mode).await
    }

    /// Makes every object put so far with [`PutOptions::defer_sync`] durable (survives a
    /// crash of the machine) before returning. Backends whose puts are always durable (S3)
    /// do nothing.
    ///
    /// # Errors
    /// Backend failures.
    async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Reads the whole object and verifies its stored crc32c.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if absent, [`StoreError::Corrupt`] / [`StoreError::Malformed`]
    /// if the bytes do not match their checksum.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;

    /// Like [`ObjectStore::get`], for an object that cannot legitimately be larger than
    /// `max_len` bytes: a larger one is refused with [`StoreError::TooLarge`] without reading
    /// more than `max_len` bytes of it (backends check the size they are told first).
    ///
    /// # Errors
    /// As [`ObjectStore::get`], plus [`StoreError::TooLarge`].
    async fn get_bounded(&self, key: &str, max_len: u64) -> Result<Bytes, StoreError>;

    /// Like [`ObjectStore::get_bounded`], asking for byte `aligned_at` of the body to sit at
    /// a 4096-aligned address, so that the caller can hand the bytes from there on to direct
    /// I/O without copying them. A wish, not a promise: the default ignores it and callers
    /// check the address (backends that read into memory they allocate honour it).
    ///
    /// # Errors
    /// As [`ObjectStore::get_bounded`].
    async fn get_bounded_aligned(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: usize,
    ) -> Result<Bytes, StoreError> {
        let _ = aligned_at;
        self.get_bounded(key, max_len).await
    }

    /// Like [`ObjectStore::get_bounded_aligned`] (or [`ObjectStore::get_bounded`] without
    /// `aligned_at`), but a backend may leave its checksum comparison to the caller: the body
    /// comes back with the crc32c stored beside it ([`UncheckedBody::pending_crc32c`]), and
    /// the caller must run [`UncheckedBody::check`] with the crc32c of the bytes before using
    /// them. For a caller that checksums the body anyway (a chunk's own trailer covers all
    /// but its last four bytes), this saves a pass over every byte read. The default checks
    /// as `get_bounded` does and leaves nothing pending, so wrappers that do not forward it
    /// stay correct.
    ///
    /// # Errors
    /// As [`ObjectStore::get_bounded`]; the checksum comparison itself is the caller's.
    async fn get_unchecked(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Result<UncheckedBody, StoreError> {
        let body = match aligned_at {
            Some(at) => self.get_bounded_aligned(key, max_len, at).await?,
            None => self.get_bounded(key, max_len).await?,
        };
        Ok(UncheckedBody::verified(body))
    }

    /// Whether [`ObjectStore::get_unchecked_now`] reads (a local file system: nothing to wait
    /// for but the disk), so that a caller on a blocking thread can read, check and use an
    /// object in one task instead of handing each read to another thread first.
    fn reads_now(&self) -> bool {
        false
    }

    /// [`ObjectStore::get_unchecked`] on the calling thread, which may block on disk I/O (call
    /// it from a blocking task); `None` where the backend cannot (see
    /// [`ObjectStore::reads_now`]). No retries: a caller that gets a transient error retries
    /// through [`ObjectStore::get_unchecked`].
    fn get_unchecked_now(
        &self,
        key: &str,
        max_len: u64,
        aligned_at: Option<usize>,
    ) -> Option<Result<UncheckedBody, StoreError>> {
        let _ = (key, max_len, aligned_at);
        None
    }

    /// Reads bytes `[range.start, range.end)` of the object. A partial read cannot be checked
    /// against the whole-object checksum; callers verify ranges with their own hashes.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] if absent, [`StoreError::RangeNotSatisfiable`] if the range is
    /// empty, reversed, or ends past the object's end.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError>;

    /// Metadata of the object, or `None` if absent.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError>;

    /// One page of objects whose key starts with `prefix`, in lexicographic (byte) order,
    /// starting after the key `continuation` names (pass back [`ListPage::next`]).
    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, StoreError>;

    /// Removes the object; deleting an absent key succeeds.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// A body read by [`ObjectStore::get_unchecked`], with the checksum comparison the backend
/// left to the caller (if any).
#[derive(Debug, Clone)]
#[must_use = "the body is not checked until `check` is called"]
pub struct UncheckedBody {
    /// The bytes read; untrusted until [`UncheckedBody::check`] has passed, so only the
    /// crate's decoders (which compare the checksum in their own pass) take them out
    /// unchecked.
    body: Bytes,
    key: String,
    pending: Option<u32>,
    /// crc32c of all the body's bytes but the last four, computed by this process as the
    /// bytes arrived (see [`UncheckedBody::with_crc_before_last4`]).
    before_last4: Option<u32>,
}

impl UncheckedBody {
    /// A body the backend has already checked: nothing is pending.
    pub fn verified(body: Bytes) -> Self {
        UncheckedBody {
            body,
            key: String::new(),
            pending: None,
            before_last4: None,
        }
    }

    /// A body read from `key` whose stored crc32c, `stored`, is still to be compared.
    pub fn pending(key: &str, body: Bytes, stored: u32) -> Self {
        UncheckedBody {
            body,
            key: key.to_string(),
            pending: Some(stored),
            before_last4: None,
        }
    }

    /// Records `crc`, the crc32c of all the body's bytes but the last four, which the backend
    /// computed while receiving them (the pieces are checksummed as they are copied, while
    /// they are in cache). Objects whose last four bytes are the crc32c of the rest (chunk
    /// objects) are then checked without another pass over the bytes.
    ///
    /// # Panics
    /// If the body is shorter than four bytes (a backend bug).
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub(crate) fn with_crc_before_last4(mut self, crc: u32) -> Self {
        assert!(self.body.len() >= 4);
        self.before_last4 = Some(crc);
        self
    }

    /// Bytes read.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    /// Whether no byte was read.
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// The bytes, the stored crc32c still to compare with them (for a decoder that compares
    /// it in its own pass over the bytes), and the crc32c of all but the last four bytes
    /// when the backend computed it.
    pub(crate) fn into_parts(self) -> (Bytes, Option<u32>, Option<u32>) {
        (self.body, self.pending, self.before_last4)
    }

    /// The stored crc32c the caller must compare with the body's, or `None` if the backend
    /// has compared it already.
    pub fn pending_crc32c(&self) -> Option<u32> {
        self.pending
    }

    /// Completes the check with `computed`, the crc32c of all the bytes read.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if it differs from the stored one.
    pub fn check(&self, computed: u32) -> Result<(), StoreError> {
        match self.pending {
            Some(expected) if expected != computed => Err(StoreError::Corrupt {
                key: self.key.clone(),
                expected,
                actual: computed,
            }),
            _ => Ok(()),
        }
    }

    /// The body, checked with a pass of its own if a check is pending (for a caller that
    /// does not checksum the bytes itself).
    ///
    /// # Errors
    /// As [`UncheckedBody::check`].
    pub fn into_checked(self) -> Result<Bytes, StoreError> {
        if self.pending.is_some() {
            self.check(crate::crc::crc32c(&self.body))?;
        }
        Ok(self.body)
    }
}

/// How [`ObjectStore::put`] treats an existing object under the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PutMode {
    /// Replace any existing object.
    Overwrite,
    /// Create only if no object has this key (S3 `If-None-Match: *`).
    IfAbsent,
}

/// How [`ObjectStore::put_with`] writes an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOptions {
    /// Existing-object behaviour.
    pub mode: PutMode,
    /// The crc32c of the body when the caller already knows it (the chunk encoder derives it
    /// while building the body). A wrong value makes the object read back as
    /// [`StoreError::Corrupt`], never as other bytes.
    pub crc32c: Option<u32>,
    /// The object need not be durable when the put returns, only after the next
    /// [`ObjectStore::sync`]. A backup puts its chunks this way and syncs once before it
    /// commits the manifest, instead of paying one or two `fsync`s per chunk on a local store.
    /// Readers see the object at once either way.
    pub defer_sync: bool,
}

impl PutOptions {
    /// `mode`, nothing known, durable on return: what [`ObjectStore::put`] does.
    pub fn new(mode: PutMode) -> Self {
        PutOptions {
            mode,
            crc32c: None,
            defer_sync: false,
        }
    }
}

/// What a successful [`ObjectStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PutOutcome {
    /// The body was stored.
    Created,
    /// `IfAbsent` and an object already had this key; nothing was written.
    AlreadyExists,
}

/// Metadata of one stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store root.
    pub key: String,
    /// Body size in bytes (without any backend framing).
    pub size: u64,
    /// Last modification time, where the backend reports one.
    pub last_modified: Option<SystemTime>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListPage {
    /// Objects of this page in lexicographic key order.
    pub objects: Vec<ObjectMeta>,
    /// Continuation token for the next page; `None` when the listing is complete.
    pub next: Option<String>,
}

/// Lists every object under `prefix` by following continuation tokens.
///
/// Memory grows with the number of objects listed; use [`ObjectStore::list_page`] directly to
/// stream very large listings.
///
/// # Errors
/// The first error of any page.
pub async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<ObjectMeta>, StoreError> {
    let mut out = Vec::new();
    list_pages(store, prefix, |page| {
        out.extend(page.objects);
        std::ops::ControlFlow::Continue(())
    })
    .await?;
    Ok(out)
}

/// Lists every object under `prefix` a page at a time, handing each page (with its
/// continuation token, `None` on the last) to `each` until the listing ends or `each` breaks.
/// Memory is one page.
///
/// # Errors
/// The first error of any page.
pub async fn list_pages(
    store: &dyn ObjectStore,
    prefix: &str,
    mut each: impl FnMut(ListPage) -> std::ops::ControlFlow<()> + Send,
) -> Result<(), StoreError> {
    let mut continuation = None;
    loop {
        let page = store.list_page(prefix, continuation.take()).await?;
        let next = page.next.clone();
        if each(page).is_break() {
            return Ok(());
        }
        match next {
            Some(next) => continuation = Some(next),
            None => return Ok(()),
        }
    }
}

/// The toolkit's one error-kind vocabulary ([`StoreError::kind`] classifies into it).
pub use cbt_core::ErrorKind;

/// Operation names used in error messages and fault counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// [`ObjectStore::put`]
    Put,
    /// [`ObjectStore::get`]
    Get,
    /// [`ObjectStore::get_range`]
    GetRange,
    /// [`ObjectStore::head`]
    Head,
    /// [`ObjectStore::list_page`]
    List,
    /// [`ObjectStore::delete`]
    Delete,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::GetRange => "get_range",
            Op::Head => "head",
            Op::List => "list",
            Op::Delete => "delete",
        })
    }
}

/// Everything an object store operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No object has this key.
    #[error("object `{key}` not found")]
    NotFound {
        /// Key that was asked for.
        key: String,
    },
    /// The stored bytes do not match their stored crc32c.
    #[error(
        "object `{key}` is corrupt: crc32c {actual:#010x} does not match stored {expected:#010x}"
    )]
    Corrupt {
        /// Damaged object.
        key: String,
        /// Checksum stored with the object.
        expected: u32,
        /// Checksum of the bytes read.
        actual: u32,
    },
    /// The object's framing is damaged (truncated file, missing or unreadable checksum).
    #[error("object `{key}` is damaged: {reason}")]
    Malformed {
        /// Damaged object.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object is larger than its reader allows for that kind of object.
    #[error(
        "object `{key}` is {} than the {limit} bytes an object of its kind may have; refusing to read it",
        size.map(|s| format!("{s} bytes, more")).unwrap_or_else(|| "larger".into())
    )]
    TooLarge {
        /// Object read.
        key: String,
        /// Its size, when the backend said.
        size: Option<u64>,
        /// The limit.
        limit: u64,
    },
    /// The local store found a symbolic link (or another non-directory) where a directory of
    /// its own, or an object, should be; it never follows links inside its root.
    #[error(
        "object `{key}`: `{path}` inside the store root is a symbolic link; the local store never follows links inside its root (remove it)"
    )]
    UnsafePath {
        /// Key being accessed.
        key: String,
        /// The offending path, relative to the root.
        path: String,
    },
    /// The S3 server does not honour conditional writes (`If-None-Match: *`), found by the
    /// probe at connect: create-if-absent writes (locks, snapshot manifests, the repository
    /// config) are refused rather than silently overwriting what is there.
    #[error(
        "the S3 server at {endpoint} does not honour conditional writes (If-None-Match: *): {detail}; refusing exclusive writes (locks, snapshot manifests), which would silently overwrite existing objects there"
    )]
    ConditionalWritesUnsupported {
        /// The server (endpoint URL).
        endpoint: String,
        /// What the probe saw.
        detail: String,
    },
    /// The key breaks the key rules (see [`validate_key`]).
    #[error("invalid object key `{key}`: {reason}")]
    InvalidKey {
        /// Offending key (possibly truncated for display).
        key: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A ranged read asked for bytes the object does not have.
    #[error("range {start}..{end} not satisfiable for object `{key}`{}", size.map(|s| format!(" of {s} bytes")).unwrap_or_default())]
    RangeNotSatisfiable {
        /// Object read.
        key: String,
        /// Requested start.
        start: u64,
        /// Requested end (exclusive).
        end: u64,
        /// Object size, where known.
        size: Option<u64>,
    },
    /// A store URL could not be understood.
    #[error("invalid store URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The bucket does not exist.
    #[error(
        "bucket `{bucket}` does not exist (create it first, or check the bucket name and endpoint)"
    )]
    BucketNotFound {
        /// Bucket name.
        bucket: String,
    },
    /// The server rejected the credentials or the signature, or denied access.
    #[error(
        "access to bucket `{bucket}` denied ({code}): {message} (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile)"
    )]
    AccessDenied {
        /// Bucket name.
        bucket: String,
        /// S3 error code, e.g. `SignatureDoesNotMatch`, `InvalidAccessKeyId`, `AccessDenied`.
        code: String,
        /// Server message.
        message: String,
    },
    /// Some other configuration problem (missing credentials, bad option).
    #[error("object store configuration error: {message}")]
    Config {
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The endpoint could not be reached (connection refused, DNS failure, connect timeout).
    #[error("cannot reach object store endpoint {endpoint}: {message}")]
    Unreachable {
        /// Endpoint URL.
        endpoint: String,
        /// Transport error.
        message: String,
    },
    /// A failure worth retrying: throttling, timeout, 5xx, connection reset.
    #[error("transient error during {op} of `{key}`: {message}")]
    Transient {
        /// Operation that failed.
        op: Op,
        /// Key (or prefix) involved.
        key: String,
        /// What happened.
        message: String,
    },
    /// Local file system I/O failed.
    #[error("I/O error on object `{key}`: {source}")]
    Io {
        /// Key involved.
        key: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The backend answered with an error that fits no other variant.
    #[error("object store error during {op} of `{key}`: {message}")]
    Backend {
        /// Operation that failed.
        op: Op,
        /// Key (or prefix) involved.
        key: String,
        /// Error code and message from the backend.
        message: String,
    },
}

impl StoreError {
    /// Classification a caller can branch on.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::Corrupt { .. }
            | StoreError::Malformed { .. }
            | StoreError::TooLarge { .. }
            | StoreError::UnsafePath { .. } => ErrorKind::Integrity,
            StoreError::InvalidKey { .. } | StoreError::RangeNotSatisfiable { .. } => {
                ErrorKind::Usage
            }
            StoreError::InvalidUrl { .. }
            | StoreError::BucketNotFound { .. }
            | StoreError::AccessDenied { .. }
            | StoreError::Config { .. }
            | StoreError::ConditionalWritesUnsupported { .. } => ErrorKind::Config,
            StoreError::Unreachable { .. } | StoreError::Transient { .. } => ErrorKind::Transient,
            StoreError::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut => {
                    ErrorKind::Transient
                }
                // The directory or its files cannot be used as they are: fix the setup.
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                    ErrorKind::Config
                }
                // EIO, a full disk: the storage under the repository failed.
                _ => ErrorKind::Backend,
            },
            StoreError::Backend { .. } => ErrorKind::Backend,
        }
    }

    /// True when retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }

    /// What the user can do about it, in one line (`None` when the message says it all).
    pub fn guidance(&self) -> Option<String> {
        let e = self;
        match e {
            StoreError::AccessDenied { .. } => Some(
                "credentials come from the standard AWS chain: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
                 AWS_PROFILE, web identity or the instance role"
                    .into(),
            ),
            StoreError::BucketNotFound { bucket } => Some(format!(
                "create the bucket `{bucket}` first, or check --s3-endpoint/--s3-region"
            )),
            StoreError::Unreachable { .. } => {
                Some("check --s3-endpoint and that the server is up; then retry".into())
            }
            StoreError::InvalidUrl { .. } => {
                Some("use --repo file:///path/to/repo or --repo s3://bucket/prefix".into())
            }
            StoreError::ConditionalWritesUnsupported { .. } => Some(
                "use an S3 server that honours If-None-Match: * (AWS S3, recent MinIO, Ceph RGW, \
                 SeaweedFS); restore, verify and list still work against this one"
                    .into(),
            ),
            _ if e.kind() == ErrorKind::Integrity => {
                Some("run `cbt verify --read-data` to list every damaged object".into())
            }
            _ if e.is_transient() => Some("this looks temporary: retry later".into()),
            _ => None,
        }
    }
}

/// Checks a key against the rules every backend enforces.
///
/// A key is 1..=[`MAX_KEY_LEN`] bytes of `/`-separated non-empty segments; no segment is `.`
/// or `..`; no leading or trailing `/`; no NUL, backslash or ASCII control characters; and the
/// first segment is not `.cbt-tmp` (reserved for the local store's staging files).
///
/// # Errors
/// [`StoreError::InvalidKey`] naming the rule broken.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason: &'static str| {
        let mut shown: String = key.chars().take(120).collect();
        if shown.len() < key.len() {
            shown.push('…');
        }
        Err(StoreError::InvalidKey { key: shown, reason })
    };
    if key.is_empty() {
        return bad("key is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("key is longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return bad("key starts with `/`");
    }
    if key.ends_with('/') {
        return bad("key ends with `/`");
    }
    if key
        .chars()
        .any(|c| c == '\0' || c == '\\' || c.is_ascii_control())
    {
        return bad("key contains NUL, backslash or a control character");
    }
    for (i, seg) in key.split('/').enumerate() {
        match seg {
            "" => return bad("key has an empty path segment (`//`)"),
            "." | ".." => return bad("key has a `.` or `..` path segment"),
            local::TEMP_DIR if i == 0 => return bad("key uses the reserved `.cbt-tmp` prefix"),
            _ => {}
        }
    }
    Ok(())
}

/// Validates a listing prefix: empty, or a key-like string that may end with `/`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix.strip_suffix('/').unwrap_or(prefix)).map_err(|e| match e {
        StoreError::InvalidKey { reason, .. } => StoreError::InvalidKey {
            key: prefix.to_string(),
            reason,
        },
        other => other,
    })
}

/// Opens a store from a URL: `file:///abs/path` (or a plain absolute/relative path) for a
/// [`LocalStore`], `s3://bucket[/prefix]` for an S3 store configured by `opts`
/// (refused with [`StoreError::InvalidUrl`] when built without the `s3` feature).
///
/// The returned store is wrapped in a [`RetryingStore`] with `opts.retry` as its policy. The
/// S3 connection probe is retried on transient errors (throttling, 5xx, timeouts) but not when
/// the endpoint refuses connections or the credentials are rejected: those fail at once.
///
/// # Errors
/// [`StoreError::InvalidUrl`] for an unknown scheme or malformed URL; backend errors from
/// creating the directory or connecting to S3.
pub async fn open_url(url: &str, opts: &S3Options) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let inner: Arc<dyn ObjectStore> = if let Some(rest) = url.strip_prefix("s3://") {
        open_s3(url, rest, opts).await?
    } else if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(StoreError::InvalidUrl {
                url: url.to_string(),
                reason: "file URLs need an absolute path: file:///path/to/repo".into(),
            });
        }
        Arc::new(LocalStore::new(path)?)
    } else if url.contains("://") {
        return Err(StoreError::InvalidUrl {
            url: url.to_string(),
            reason: "unsupported scheme (use file:///path or s3://bucket/prefix)".into(),
        });
    } else if url.is_empty() {
        return Err(StoreError::InvalidUrl {
            url: url.to_string(),
            reason: "empty repository URL".into(),
        });
    } else {
        Arc::new(LocalStore::new(url)?)
    };
    Ok(Arc::new(RetryingStore::new(inner, opts.retry.clone())))
}

/// The `s3://bucket[/prefix]` part of [`open_url`] (`rest` is what follows the scheme).
#[cfg(feature = "s3")]
async fn open_s3(
    url: &str,
    rest: &str,
    opts: &S3Options,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let (bucket, prefix) = match rest.split_once('/') {
        Some((b, p)) => (b, p.trim_end_matches('/')),
        None => (rest, ""),
    };
    if bucket.is_empty() {
        return Err(StoreError::InvalidUrl {
            url: url.to_string(),
            reason: "missing bucket name (expected s3://bucket[/prefix])".into(),
        });
    }
    if !prefix.is_empty() {
        validate_key(prefix).map_err(|e| StoreError::InvalidUrl {
            url: url.to_string(),
            reason: format!("bad prefix: {e}"),
        })?;
    }
    let cfg = S3Config::from_options(bucket, prefix, opts);
    // Throttling or a 5xx on the first request should not fail a whole command; a refused
    // connection or bad credentials fail at once with their own error.
    let mut attempt = 1;
    loop {
        match S3Store::connect(cfg.clone()).await {
            Ok(store) => return Ok(Arc::new(store)),
            Err(e @ StoreError::Transient { .. }) if attempt < opts.retry.max_attempts => {
                let delay = opts.retry.backoff(attempt - 1, 0.5);
                tracing::debug!(error = %e, ?delay, "retrying S3 connection probe");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Without the `s3` feature an `s3://` URL is a configuration error, never a local path.
#[cfg(not(feature = "s3"))]
async fn open_s3(
    url: &str,
    _rest: &str,
    _opts: &S3Options,
) -> Result<Arc<dyn ObjectStore>, StoreError> {
    Err(StoreError::InvalidUrl {
        url: url.to_string(),
        reason: "this build has no S3 support (cbt-store was built without its `s3` feature)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rules() {
        for good in [
            "a",
            "a/b",
            "chunks/ab/cdef",
            "x.y",
            "..a",
            "a/.b",
            "sn@p-1_2",
        ] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        let long = "a".repeat(MAX_KEY_LEN + 1);
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/../b",
            "a/.",
            ".",
            "a\0b",
            "a\\b",
            "a\nb",
            ".cbt-tmp/x",
            long.as_str(),
        ] {
            assert!(
                matches!(validate_key(bad), Err(StoreError::InvalidKey { .. })),
                "{bad:?}"
            );
        }
        assert!(validate_key("x/.cbt-tmp").is_ok());
        assert!(validate_prefix("").is_ok());
        assert!(validate_prefix("chunks/").is_ok());
        assert!(validate_prefix("../").is_err());
    }

    #[test]
    fn classification() {
        let t = StoreError::Transient {
            op: Op::Get,
            key: "k".into(),
            message: "503".into(),
        };
        assert!(t.is_transient());
        assert!(!StoreError::NotFound { key: "k".into() }.is_transient());
        assert_eq!(
            StoreError::Corrupt {
                key: "k".into(),
                expected: 1,
                actual: 2
            }
            .kind(),
            ErrorKind::Integrity
        );
        assert_eq!(
            StoreError::BucketNotFound { bucket: "b".into() }.kind(),
            ErrorKind::Config
        );
    }
}
