//! `cbt metadata allocated|delta` (query a SnapshotMetadata service, like the Kubernetes
//! snapshot-metadata-lister) and `cbt serve-metadata` (the file-backed server). Argument parsing
//! and printing only; the work is done by `cbt_csi`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use cbt_csi::client::Batch;
use cbt_csi::server::{
    FaultPlan, FaultStatus, FileMetadataService, Listen, ServerOptions, TlsIdentity,
};
use cbt_csi::{BlockType, ClientConfig, CsiError, MetadataClient, MetadataRequest, Query};

use crate::Ctx;
use crate::error::{CliError, ExitClass};

/// Connection settings of a metadata service besides its endpoint (shared by `metadata` and
/// `backup`).
#[derive(Debug, Clone, clap::Args)]
pub struct ConnArgs {
    /// Bearer token (CSI: authorization metadata; Kubernetes API: security_token).
    #[arg(
        long = "metadata-token",
        env = "CBT_METADATA_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// File holding the bearer token (e.g. a projected ServiceAccount token).
    #[arg(long = "metadata-token-file", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle the server certificate must chain to (the SnapshotMetadataService caCert).
    #[arg(long = "metadata-ca-file")]
    pub ca_file: Option<PathBuf>,
    /// TLS server name to verify instead of the endpoint host.
    #[arg(long = "metadata-server-name")]
    pub server_name: Option<String>,
    /// Use the Kubernetes SnapshotMetadata API: namespace of the VolumeSnapshot(s).
    /// Snapshots are then VolumeSnapshot names, except the delta base, which is a CSI handle.
    #[arg(long = "metadata-namespace")]
    pub namespace: Option<String>,
    /// JSON object of CSI secrets sent with every call (e.g. {"userID": "...", "userKey": "..."}),
    /// for a CSI driver socket that needs backend credentials. Not with --metadata-namespace:
    /// the sidecar takes secrets from the VolumeSnapshotClass.
    #[arg(
        long = "metadata-secrets-file",
        value_name = "FILE.json",
        conflicts_with = "namespace"
    )]
    pub secrets_file: Option<PathBuf>,
    /// Deadline for each metadata call in seconds, resumes included.
    #[arg(long = "metadata-deadline-secs", default_value_t = 600)]
    pub deadline_secs: u64,
    /// Consecutive failed attempts without progress before a call fails.
    #[arg(long = "metadata-max-attempts", default_value_t = 6)]
    pub max_attempts: u32,
    /// Tuples per response message (0 = server chooses).
    #[arg(
        long = "metadata-max-results",
        visible_alias = "max-results",
        default_value_t = 0
    )]
    pub max_results: u32,
}

impl ConnArgs {
    /// Builds the client configuration for `endpoint`, reading the token and CA files.
    ///
    /// # Errors
    /// A usage error if a file cannot be read.
    pub fn client_config(&self, endpoint: &str) -> Result<ClientConfig, CliError> {
        let mut c = ClientConfig::new(endpoint);
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(p)) => Some(read(p)?.trim().to_string()),
            (None, None) => None,
        };
        if let Some(t) = token {
            c = c.with_token(t);
        }
        if let Some(p) = &self.ca_file {
            c = c.with_ca_pem(read(p)?.into_bytes());
        }
        if let Some(n) = &self.server_name {
            c = c.with_server_name(n);
        }
        c = c.with_deadline(Duration::from_secs(self.deadline_secs.max(1)));
        c.retry.max_attempts = self.max_attempts.max(1);
        Ok(c)
    }

    /// A request for `query` with this connection's max_results and CSI secrets.
    ///
    /// # Errors
    /// A usage error if the secrets file cannot be read or is not a JSON object of strings.
    pub fn request(&self, query: Query) -> Result<MetadataRequest, CliError> {
        let mut r = MetadataRequest::new(query).max_results(self.max_results);
        if let Some(p) = &self.secrets_file {
            let secrets = serde_json::from_str(&read(p)?).map_err(|e| {
                // The parser's message may quote the file; it must not echo secret values.
                CliError::usage(format!(
                    "--metadata-secrets-file {}: not a JSON object of string values (line {}, column {})",
                    p.display(),
                    e.line(),
                    e.column()
                ))
            })?;
            r = r.with_secrets(secrets);
        }
        Ok(r)
    }

    /// The allocated query for `snapshot` in this API flavour.
    pub fn allocated(&self, snapshot: &str) -> Query {
        match &self.namespace {
            Some(ns) => Query::K8sAllocated {
                namespace: ns.clone(),
                snapshot_name: snapshot.to_string(),
            },
            None => Query::CsiAllocated {
                snapshot_id: snapshot.to_string(),
            },
        }
    }

    /// The delta query from `base` (CSI handle) to `target` in this API flavour.
    pub fn delta(&self, base: &str, target: &str) -> Query {
        match &self.namespace {
            Some(ns) => Query::K8sDelta {
                namespace: ns.clone(),
                base_snapshot_id: base.to_string(),
                target_snapshot_name: target.to_string(),
            },
            None => Query::CsiDelta {
                base_snapshot_id: base.to_string(),
                target_snapshot_id: target.to_string(),
            },
        }
    }
}

/// Endpoint plus connection settings of `cbt metadata`.
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// Service endpoint: unix:///path/csi.sock (CSI driver), https://host:port or host:port
    /// (Kubernetes snapshot-metadata sidecar, TLS), http://host:port (plain TCP).
    #[arg(
        long = "metadata-endpoint",
        visible_alias = "endpoint",
        env = "CBT_METADATA_ENDPOINT"
    )]
    pub endpoint: String,
    #[command(flatten)]
    pub conn: ConnArgs,
}

fn read(p: &PathBuf) -> Result<String, CliError> {
    std::fs::read_to_string(p)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", p.display())))
}

impl From<CsiError> for CliError {
    fn from(e: CsiError) -> Self {
        CliError {
            reported: false,
            class: ExitClass::from(e.kind()),
            hint: e.guidance().map(str::to_string),
            message: e.to_string(),
        }
    }
}

fn output_error(e: std::io::Error) -> CliError {
    CliError {
        reported: false,
        class: ExitClass::Transient,
        message: format!("writing output: {e}"),
        hint: None,
    }
}

/// `cbt metadata ...`: list allocated or changed ranges of snapshots.
#[derive(Debug, clap::Subcommand)]
pub enum MetadataCommand {
    /// Check the service: gRPC health and, for a CSI driver socket, the plugin identity and its
    /// SNAPSHOT_METADATA_SERVICE capability.
    Probe {
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Ranges holding data in a snapshot (GetMetadataAllocated).
    Allocated {
        /// Snapshot: CSI snapshot handle, or VolumeSnapshot name with --metadata-namespace.
        #[arg(long, short = 's', visible_alias = "snapshot-id")]
        snapshot: String,
        /// Byte offset to start from.
        #[arg(long, default_value_t = 0)]
        starting_offset: u64,
        /// Only print totals.
        #[arg(long)]
        summary_only: bool,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
    /// Ranges that changed between two snapshots of a volume (GetMetadataDelta).
    Delta {
        /// Base (older) snapshot: always a CSI snapshot handle.
        #[arg(long, short = 'b', visible_alias = "base-snapshot-id")]
        base: String,
        /// Target (newer) snapshot: CSI handle, or VolumeSnapshot name with --metadata-namespace.
        #[arg(long, short = 's', visible_aliases = ["target", "snapshot-id"])]
        snapshot: String,
        /// Byte offset to start from.
        #[arg(long, default_value_t = 0)]
        starting_offset: u64,
        /// Only print totals.
        #[arg(long)]
        summary_only: bool,
        #[command(flatten)]
        endpoint: EndpointArgs,
    },
}

/// Runs `cbt metadata ...`, streaming ranges to stdout (memory stays bounded by one message).
///
/// # Errors
/// [`CliError`] on any failure; nothing is printed as complete unless the stream ended
/// cleanly.
pub async fn run_metadata(ctx: &Ctx, cmd: MetadataCommand) -> Result<(), CliError> {
    let json = ctx.out.json();
    let (query, endpoint, starting_offset, summary_only) = match cmd {
        MetadataCommand::Probe { endpoint } => return probe(ctx, &endpoint).await,
        MetadataCommand::Allocated {
            snapshot,
            starting_offset,
            summary_only,
            endpoint,
        } => (
            endpoint.conn.allocated(&snapshot),
            endpoint,
            starting_offset,
            summary_only,
        ),
        MetadataCommand::Delta {
            base,
            snapshot,
            starting_offset,
            summary_only,
            endpoint,
        } => (
            endpoint.conn.delta(&base, &snapshot),
            endpoint,
            starting_offset,
            summary_only,
        ),
    };
    let client = MetadataClient::connect(endpoint.conn.client_config(&endpoint.endpoint)?).await?;
    let request = endpoint
        .conn
        .request(query.clone())?
        .starting_at(starting_offset);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // Ranges are printed as they arrive, so memory stays bounded by one message even in JSON.
    // Nothing is printed before the first range, so an immediate failure prints only the error.
    let prefix = if json {
        format!(
            "{{\"query\":{},\"ranges\":[",
            serde_json::json!(query.describe())
        )
    } else {
        format!("{:>20} {:>16}\n", "OFFSET", "LENGTH")
    };
    let mut started = false;
    let mut first = true;
    let mut io_err: Option<std::io::Error> = None;
    // One extent is held back so extents touching across messages print as one range.
    let mut pending: Option<cbt_csi::Extent> = None;
    let mut emit = |out: &mut dyn Write, e: cbt_csi::Extent| -> Result<(), std::io::Error> {
        if !started {
            out.write_all(prefix.as_bytes())?;
            started = true;
        }
        if json {
            if !first {
                out.write_all(b",")?;
            }
            write!(out, "{{\"offset\":{},\"length\":{}}}", e.offset, e.len)?;
        } else {
            writeln!(out, "{:>20} {:>16}", e.offset, e.len)?;
        }
        first = false;
        Ok(())
    };
    let mut print = |out: &mut dyn Write, b: Option<&Batch>| -> Result<(), std::io::Error> {
        if summary_only {
            return Ok(());
        }
        let Some(b) = b else {
            return match pending.take() {
                Some(p) => emit(out, p),
                None => Ok(()),
            };
        };
        for e in &b.extents {
            match &mut pending {
                Some(p) if p.end() == e.offset => p.len += e.len,
                Some(p) => {
                    let done = *p;
                    *p = *e;
                    emit(out, done)?;
                }
                None => pending = Some(*e),
            }
        }
        Ok(())
    };
    // The stream is driven here (not through for_each_batch) so that its totals are still at
    // hand when the call fails midway: a failed JSON listing is one complete document too.
    let mut stream = client.stream(request);
    let result = loop {
        match stream.next_batch().await {
            Ok(Some(b)) => {
                if let Err(e) = print(&mut out, Some(&b)) {
                    io_err = Some(e);
                    break Ok(());
                }
            }
            Ok(None) => {
                if let Err(e) = print(&mut out, None) {
                    io_err = Some(e);
                }
                break Ok(());
            }
            Err(e) => {
                // The extent held back is complete as far as this call got: print it too.
                if let Err(io) = print(&mut out, None) {
                    io_err = Some(io);
                }
                break Err(e);
            }
        }
    };
    if let Some(e) = io_err {
        return Err(output_error(e));
    }
    let summary = stream.summary();
    if let Err(e) = result {
        let mut err = CliError::from(e);
        if json {
            // Ranges already printed stay valid; the document says they are not the whole answer.
            if !started {
                let _ = out.write_all(prefix.as_bytes());
            }
            let _ = writeln!(
                out,
                "],\"complete\":false,\"summary\":{},\"error\":{}}}",
                serde_json::to_string(&summary).unwrap_or_else(|_| "null".into()),
                err.to_json()
            );
            err.reported = true;
        } else if started {
            let _ = out.write_all(b"(incomplete: the call failed)\n");
        }
        let _ = out.flush();
        return Err(err);
    }
    if json {
        if !started {
            out.write_all(prefix.as_bytes()).map_err(output_error)?;
        }
        writeln!(
            out,
            "],\"complete\":true,\"summary\":{}}}",
            serde_json::to_string(&summary).unwrap_or_default()
        )
        .map_err(output_error)?;
    } else {
        if !started && !summary_only {
            out.write_all(prefix.as_bytes()).map_err(output_error)?;
        }
        let block_type = summary.block_type.map(BlockType::as_str).unwrap_or("-");
        writeln!(
            out,
            "ranges: {}  bytes: {} ({})  capacity: {}  block type: {}{}  messages: {}  attempts: {}",
            summary.ranges,
            summary.bytes,
            human(summary.bytes),
            summary
                .volume_capacity_bytes
                .map(|c| format!("{c} ({})", human(c)))
                .unwrap_or_else(|| "- (no message received)".into()),
            block_type,
            summary.block_size.map(|b| format!(" ({b} B blocks)")).unwrap_or_default(),
            summary.messages,
            summary.attempts,
        )
        .map_err(output_error)?;
    }
    out.flush().map_err(output_error)?;
    if summary.out_of_order_tuples > 0 {
        // Ranges are printed as they arrive (bounded memory), so a driver that breaks the order
        // can make the listing repeat ranges; collecting consumers such as `cbt backup` are exact.
        eprintln!(
            "warning: the service sent {} tuple(s) out of order (a driver bug); ranges printed above may be unsorted or repeated and the byte total may count them twice",
            summary.out_of_order_tuples
        );
    }
    Ok(())
}

/// `cbt metadata probe`: health, and identity for CSI endpoints. Fails (exit 4) unless the
/// service is SERVING and, for a CSI driver, advertises SNAPSHOT_METADATA_SERVICE.
async fn probe(ctx: &Ctx, endpoint: &EndpointArgs) -> Result<(), CliError> {
    let client = MetadataClient::connect(endpoint.conn.client_config(&endpoint.endpoint)?).await?;
    // Health is optional for CSI drivers; the Kubernetes sidecar always registers it.
    let health = match client.health("").await {
        Ok(serving) => Some(serving),
        Err(CsiError::Unimplemented { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let info = if endpoint.conn.namespace.is_none() {
        Some(client.plugin_info().await?)
    } else {
        None
    };
    let ok = health != Some(false) && info.as_ref().is_none_or(|i| i.snapshot_metadata);
    ctx.out.emit(
        &serde_json::json!({
            "endpoint": endpoint.endpoint,
            "serving": health,
            "driver": info.as_ref().map(|i| &i.name),
            "vendor_version": info.as_ref().map(|i| &i.vendor_version),
            "snapshot_metadata_capability": info.as_ref().map(|i| i.snapshot_metadata),
            "ready": ok,
        }),
        || {
            let mut t = format!("endpoint: {}\n", endpoint.endpoint);
            t.push_str(&format!(
                "health:   {}\n",
                match health {
                    Some(true) => "SERVING",
                    Some(false) => "NOT_SERVING",
                    None => "no health service",
                }
            ));
            if let Some(i) = &info {
                t.push_str(&format!(
                    "driver:   {} {}\nSNAPSHOT_METADATA_SERVICE capability: {}\n",
                    i.name,
                    i.vendor_version,
                    if i.snapshot_metadata { "yes" } else { "NO" }
                ));
            }
            t.push_str(if ok { "ready: yes" } else { "ready: NO" });
            t
        },
    );
    if ok {
        Ok(())
    } else {
        Err(CliError {
            reported: false,
            class: ExitClass::Transient,
            message: format!("the metadata service at {} is not ready", endpoint.endpoint),
            hint: Some("check the CSI driver and its snapshot-metadata sidecar; the driver must report SNAPSHOT_METADATA_SERVICE".into()),
        })
    }
}

/// Binary-prefixed size for humans.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Tuple style flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BlockTypeArg {
    /// Equal-size blocks (FIXED_LENGTH).
    Fixed,
    /// Coalesced extents (VARIABLE_LENGTH).
    Variable,
}

/// `cbt serve-metadata`: serve the CSI and Kubernetes SnapshotMetadata APIs from image files.
#[derive(Debug, clap::Args)]
pub struct ServeMetadataArgs {
    /// Directory of snapshot images (snapshot id = file name; optional ID.meta.json beside it).
    #[arg(long)]
    pub dir: PathBuf,
    /// unix:///path/to.sock or tcp://IP:PORT.
    #[arg(long)]
    pub listen: String,
    /// PEM server certificate (TCP only; enables TLS together with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require this bearer token (prefer --token-file or CBT_METADATA_SERVER_TOKEN: a command
    /// line is visible to every user of the host).
    #[arg(long, env = "CBT_METADATA_SERVER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Require the bearer token held in this file.
    #[arg(long, value_name = "PATH", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Serve a TCP listener without TLS or without a token (refused otherwise: anyone who can
    /// reach the port could read every snapshot's block map).
    #[arg(long)]
    pub insecure: bool,
    /// Metadata calls served at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub max_concurrent_calls: usize,
    /// Connections open at once; one more is closed as soon as it is accepted.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// JSON object of CSI secrets every CSI call must carry, like a driver that needs backend
    /// credentials (missing key: INVALID_ARGUMENT; wrong value: PERMISSION_DENIED).
    #[arg(long, value_name = "FILE.json")]
    pub secrets_file: Option<PathBuf>,
    /// Block granularity in bytes (power of two; 64K, 64KiB, 1M ...).
    #[arg(long, default_value = "64K", value_parser = cbt_core::units::parse_size)]
    pub block_size: u64,
    /// Tuple style of responses.
    #[arg(long, value_enum, default_value_t = BlockTypeArg::Variable)]
    pub block_type: BlockTypeArg,
    /// Maximum tuples per response message.
    #[arg(long, default_value_t = 1024)]
    pub max_results: u32,
    /// Act as the Kubernetes snapshot-metadata sidecar: check each caller's token with a
    /// TokenReview for this audience and its right to get VolumeSnapshots with a
    /// SubjectAccessReview, and resolve VolumeSnapshot names to CSI handles (the files in --dir
    /// are then named by handle). Uses the kubeconfig like kubectl.
    #[arg(long, value_name = "AUDIENCE")]
    pub kubernetes_audience: Option<String>,
    /// Kubeconfig for --kubernetes-audience.
    #[arg(long, requires = "kubernetes_audience")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context for --kubernetes-audience.
    #[arg(long, requires = "kubernetes_audience")]
    pub context: Option<String>,
    /// CSI driver name reported by the Identity service and required of snapshot contents.
    #[arg(long)]
    pub driver: Option<String>,
    /// End any call that streams longer than this many seconds with DEADLINE_EXCEEDED, as the
    /// Kubernetes snapshot-metadata sidecar does (--max-streaming-duration-min); clients resume.
    #[arg(long, value_name = "SECS")]
    pub max_stream_secs: Option<f64>,
    /// Test hook: abort streams after this many messages.
    #[arg(long, hide = true)]
    pub drop_after: Option<u32>,
    /// Test hook: how many streams --drop-after aborts.
    #[arg(long, hide = true, default_value_t = 1)]
    pub drop_times: u32,
    /// Test hook: end dropped streams with DEADLINE_EXCEEDED (a stream time limit) instead of
    /// UNAVAILABLE.
    #[arg(long, hide = true)]
    pub drop_deadline: bool,
}

/// Runs the server until Ctrl-C (or SIGTERM).
///
/// # Errors
/// [`CliError`] if the options are unusable or the server fails.
pub async fn run_serve_metadata(args: ServeMetadataArgs) -> Result<(), CliError> {
    let mut opts = ServerOptions::new(&args.dir);
    opts.block_size = args.block_size;
    opts.block_type = match args.block_type {
        BlockTypeArg::Fixed => BlockType::FixedLength,
        BlockTypeArg::Variable => BlockType::VariableLength,
    };
    opts.max_results = args.max_results;
    opts.max_concurrent_calls = args.max_concurrent_calls.max(1);
    opts.max_connections = args.max_connections.max(1);
    opts.token = match &args.token_file {
        Some(p) => Some(read(p)?.trim().to_string()),
        None => args.token.clone(),
    };
    if opts.token.as_deref() == Some("") {
        return Err(CliError::usage("the metadata server token is empty"));
    }
    if let Some(p) = &args.secrets_file {
        opts.secrets = Some(serde_json::from_str(&read(p)?).map_err(|e| {
            CliError::usage(format!(
                "--secrets-file {}: not a JSON object of string values (line {}, column {})",
                p.display(),
                e.line(),
                e.column()
            ))
        })?);
    }
    opts.fault = args.drop_after.map(|n| FaultPlan {
        drop_after_messages: n,
        times: args.drop_times,
        status: if args.drop_deadline {
            FaultStatus::DeadlineExceeded
        } else {
            FaultStatus::Unavailable
        },
    });
    opts.max_stream_duration = match args.max_stream_secs {
        Some(s) => Some(Duration::try_from_secs_f64(s).map_err(|_| {
            CliError::usage(format!("--max-stream-secs {s}: not a duration in seconds"))
        })?),
        None => None,
    };
    if let Some(d) = &args.driver {
        opts.driver_name = d.clone();
    }
    if let Some(audience) = &args.kubernetes_audience {
        let cluster = cbt_k8s::connect(&cbt_k8s::ClusterTarget {
            kubeconfig: args.kubeconfig.clone(),
            context: args.context.clone(),
        })
        .await
        .map_err(|e| CliError::config(e.to_string()))?;
        opts.sidecar = Some(std::sync::Arc::new(cbt_k8s::sidecar::KubeSidecar::new(
            cluster.client,
            audience,
            &opts.driver_name,
        )));
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(TlsIdentity {
            cert_pem: read(c)?.into_bytes(),
            key_pem: read(k)?.into_bytes(),
        }),
        _ => None,
    };
    let listen: Listen = args.listen.parse()?;
    if matches!(listen, Listen::Tcp(_)) && !args.insecure {
        // A TCP port is reachable by others: refuse to serve it in the clear or to anyone.
        if tls.is_none() {
            return Err(
                CliError::usage(format!("{} is a TCP listener without TLS", args.listen))
                    .with_hint("pass --tls-cert and --tls-key (or --insecure for a test setup)"),
            );
        }
        if opts.token.is_none() && args.kubernetes_audience.is_none() {
            return Err(CliError::usage(format!(
                "{} is a TCP listener without authentication",
                args.listen
            ))
            .with_hint(
                "pass --token-file (or CBT_METADATA_SERVER_TOKEN), or --kubernetes-audience to check callers' ServiceAccount tokens (or --insecure for a test setup)",
            ));
        }
    }
    let service = FileMetadataService::new(opts)?;
    let server = cbt_csi::server::spawn(service, listen, tls).await?;
    eprintln!(
        "serving CSI and Kubernetes SnapshotMetadata APIs from {} on {}",
        args.dir.display(),
        server.endpoint()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError {
            reported: false,
            class: ExitClass::Internal,
            message: format!("cannot install SIGTERM handler: {e}"),
            hint: None,
        })?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown().await?;
    Ok(())
}

/// `cbt backup` flags that take the ranges to read from a SnapshotMetadata service.
#[derive(Debug, Clone, clap::Args)]
pub struct CbtBackupArgs {
    /// Take the ranges to read from this SnapshotMetadata service (see `cbt metadata --help`):
    /// allocated ranges for a full backup, changed ranges for an incremental (--base-snapshot-id).
    #[arg(
        long = "metadata-endpoint",
        requires = "snapshot_id",
        value_name = "URL"
    )]
    pub metadata_endpoint: Option<String>,
    /// The snapshot being backed up: CSI snapshot handle, or VolumeSnapshot name with
    /// --metadata-namespace. Recorded in the manifest so a later incremental can use it as base.
    #[arg(long, requires = "metadata_endpoint", value_name = "ID")]
    pub snapshot_id: Option<String>,
    /// Incremental: CSI snapshot handle the delta is computed against. It must be the snapshot the
    /// repository's latest backup of this volume was taken from (see --allow-non-latest-base);
    /// that backup becomes the parent.
    #[arg(long, requires = "metadata_endpoint", value_name = "ID")]
    pub base_snapshot_id: Option<String>,
    /// With --metadata-namespace: the CSI handle of --snapshot-id (its VolumeSnapshotContent
    /// status.snapshotHandle), recorded so the next incremental can name it as base.
    #[arg(long, requires = "namespace", value_name = "HANDLE")]
    pub snapshot_handle: Option<String>,
    /// Accept a base that is not the latest backup of the volume (the matching older backup
    /// becomes the parent).
    #[arg(long, requires = "base_snapshot_id")]
    pub allow_non_latest_base: bool,
    /// If the service refuses the request (CBT not enabled, snapshot unknown, ...), take a full
    /// backup instead (reading the device's data map, or every byte) rather than failing. With
    /// --pvc, also when the driver has no SnapshotMetadata service at all.
    #[arg(long)]
    pub fallback_full: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// The library's CBT backup spec for these flags (the binary only translates flags).
///
/// # Errors
/// A usage error if the secrets file cannot be read or parsed.
pub fn cbt_spec(
    args: &CbtBackupArgs,
    volume: &cbt_core::VolumeName,
    parent: Option<&cbt_core::SnapshotName>,
) -> Result<Option<cbt_store::engine::cbt::CbtBackupSpec>, CliError> {
    use cbt_store::engine::cbt::{CbtBackupSpec, CbtTarget, DeltaBase};
    let Some(snapshot) = &args.snapshot_id else {
        return Ok(None);
    };
    let target = match &args.conn.namespace {
        Some(ns) => CbtTarget::Kubernetes {
            namespace: ns.clone(),
            snapshot_name: snapshot.clone(),
            snapshot_handle: args.snapshot_handle.clone(),
        },
        None => CbtTarget::Csi {
            snapshot_id: snapshot.clone(),
        },
    };
    let template = args.conn.request(Query::CsiAllocated {
        snapshot_id: String::new(),
    })?;
    let mut spec = CbtBackupSpec::new(volume.clone(), target);
    spec.base = match &args.base_snapshot_id {
        Some(b) => DeltaBase::Handle(b.clone()),
        None => DeltaBase::Full,
    };
    spec.explicit_parent = parent.cloned();
    spec.allow_non_latest_base = args.allow_non_latest_base;
    spec.fallback_full = args.fallback_full;
    spec.max_results = template.max_results;
    spec.secrets = template.secrets;
    Ok(Some(spec))
}

impl From<cbt_store::engine::cbt::CbtPlanError> for CliError {
    fn from(e: cbt_store::engine::cbt::CbtPlanError) -> Self {
        use cbt_core::lineage::LineageError;
        use cbt_store::engine::cbt::CbtPlanError;
        // The library's guidance speaks of decisions; here they are named by their flags.
        match e {
            CbtPlanError::Metadata { source, refused } => {
                let mut err = CliError::from(source);
                if refused {
                    err.hint = Some(format!(
                        "{}the service refused the request, so retrying will not help: pass --fallback-full to take a full backup instead of failing",
                        err.hint.map(|h| format!("{h}; ")).unwrap_or_default()
                    ));
                }
                err
            }
            CbtPlanError::Repo(r) => CliError::from(r),
            CbtPlanError::ParentWithoutBase { parent } => CliError::usage(format!(
                "--parent {parent} with --metadata-endpoint needs --base-snapshot-id (the CSI snapshot that backup was taken from)"
            ))
            .with_hint("omit --parent for a full backup from GetMetadataAllocated"),
            CbtPlanError::Lineage(l) => {
                let hint = match &l {
                    LineageError::BaseNotLatest { latest_from, .. } => format!(
                        "use --base-snapshot-id {latest_from} to build on the latest backup, or pass --allow-non-latest-base"
                    ),
                    LineageError::NoBackup { .. } | LineageError::NoBackupFromBase { .. } => {
                        "take a full backup instead (omit --base-snapshot-id)".into()
                    }
                    other => other.guidance(),
                };
                CliError::usage(l.to_string()).with_hint(hint)
            }
            other => CliError::usage(other.to_string()),
        }
    }
}

/// One line describing a metadata answer: call, snapshots, ranges, bytes, capacity, attempts.
pub fn describe_answer(query: &Query, summary: &cbt_csi::MetadataSummary) -> String {
    format!(
        "{} {}: {} ranges, {} of {} ({}, {} attempt(s))",
        query.call(),
        query.describe(),
        summary.ranges,
        human(summary.bytes),
        summary
            .volume_capacity_bytes
            .map(human)
            .unwrap_or_else(|| "a volume of unreported size".into()),
        summary.block_type.map(BlockType::as_str).unwrap_or("-"),
        summary.attempts
    )
}
