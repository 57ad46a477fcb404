//! `snapshift`: move VolumeSnapshots between clusters that share storage.
//!
//! Argument parsing, progress and printing only; the work is in
//! `cbt_k8s::snapshift`.

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbt_core::exit::ExitClass;
use cbt_k8s::snapshift::{
    MetadataFilter, MigrateOptions, MigrationReport, MigrationRequest, Outcome, PlannedAction,
    Progress, Side, SnapShift, Stage,
};
use cbt_k8s::{ClusterTarget, Error, ErrorKind, RetryPolicy};
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(
    name = "snapshift",
    version,
    about = "Move VolumeSnapshots between Kubernetes clusters that share a storage backend, without copying data",
    after_help = cbt_core::exit::HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More logging on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Move snapshots (new ones cut from PVCs, or existing ones) to the destination cluster.
    Migrate(Box<MigrateArgs>),
    /// Check migrated snapshots: same handle and driver on both sides, both ready.
    Verify(Box<VerifyArgs>),
}

#[derive(Args, Debug)]
struct ClusterArgs {
    /// Kubeconfig for both sides (default: $KUBECONFIG, which may list several files, then ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig for the origin side (overrides --kubeconfig).
    #[arg(long)]
    from_kubeconfig: Option<PathBuf>,
    /// Kubeconfig for the destination side (overrides --kubeconfig).
    #[arg(long)]
    to_kubeconfig: Option<PathBuf>,
    /// Origin context (default: current-context).
    #[arg(long)]
    from_context: Option<String>,
    /// Destination context (default: current-context).
    #[arg(long)]
    to_context: Option<String>,
    /// Origin namespace (default: the origin context's namespace).
    #[arg(short, long)]
    namespace: Option<String>,
    /// Destination namespace (default: the origin namespace).
    #[arg(long)]
    to_namespace: Option<String>,
    /// Attempts per API call on 429/5xx/connection errors.
    #[arg(long, default_value_t = 6)]
    retries: u32,
    /// First backoff between attempts (doubles, capped at 5s), e.g. 200ms.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    retry_backoff: Duration,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Human-readable table (YAML for --dry-run).
    Table,
    /// JSON.
    Json,
}

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("what").required(true).args(["pvcs", "selector", "snapshots"])))]
struct MigrateArgs {
    #[command(flatten)]
    clusters: ClusterArgs,
    /// PVC to snapshot and move (repeatable).
    #[arg(long = "pvc", value_name = "NAME")]
    pvcs: Vec<String>,
    /// Move every PVC matching this label selector, e.g. app=db.
    #[arg(short = 'l', long, conflicts_with_all = ["pvcs", "snapshots"])]
    selector: Option<String>,
    /// Existing VolumeSnapshot to move instead of cutting one (repeatable).
    #[arg(long = "snapshot", value_name = "NAME", conflicts_with = "pvcs")]
    snapshots: Vec<String>,
    /// Name of the snapshot cut from a single --pvc (default: PVC-snapshift).
    #[arg(long)]
    snapshot_name: Option<String>,
    /// VolumeSnapshotClass for the origin snapshot (default: the driver's default).
    #[arg(long)]
    from_snapshot_class: Option<String>,
    /// VolumeSnapshotClass in the destination (default: the driver's default there).
    #[arg(long)]
    snapshot_class: Option<String>,
    /// Also create a PVC from the moved snapshot.
    #[arg(long)]
    create_pvc: bool,
    /// Name of that PVC (single item only; default: the origin PVC's name).
    #[arg(long, requires = "create_pvc")]
    pvc_name: Option<String>,
    /// StorageClass of that PVC (default: the destination's default StorageClass).
    #[arg(long, requires = "create_pvc")]
    storage_class: Option<String>,
    /// Deadline per item, e.g. 90s, 5m, 1h.
    #[arg(long, default_value = "5m", value_parser = parse_timeout)]
    timeout: Duration,
    /// Print what would be created on each side and create nothing.
    #[arg(long)]
    dry_run: bool,
    /// On failure, leave the destination objects this run created.
    #[arg(long)]
    keep_partial: bool,
    /// Items migrated at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// Only copy labels/annotations with these prefixes (repeatable; default: all).
    #[arg(long = "copy-prefix", value_name = "PREFIX")]
    copy_prefixes: Vec<String>,
    /// Never copy labels/annotations with these prefixes (repeatable).
    #[arg(long = "skip-prefix", value_name = "PREFIX")]
    skip_prefixes: Vec<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    clusters: ClusterArgs,
    /// Destination snapshot to check (repeatable; default: all migrated ones in the namespace).
    #[arg(long = "snapshot", value_name = "NAME")]
    snapshots: Vec<String>,
    /// Deadline for the whole check.
    #[arg(long, default_value = "2m", value_parser = parse_timeout)]
    timeout: Duration,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

use cbt_core::units::parse_duration;

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s).map_err(|e| e.to_string())? {
        d if d.is_zero() => Err("a timeout must be longer than zero, e.g. 90s".into()),
        d => Ok(d),
    }
}

/// The toolkit's shared exit class of an error kind (one table for cbt and snapshift).
fn exit_class(kind: ErrorKind) -> ExitClass {
    ExitClass::from(kind)
}

fn exit_code(kind: ErrorKind) -> u8 {
    exit_class(kind).code()
}

fn kind_name(kind: ErrorKind) -> &'static str {
    kind.name()
}

/// Progress on stderr: spinners on a terminal, plain lines otherwise.
struct StderrProgress {
    multi: Option<indicatif::MultiProgress>,
    bars: Mutex<HashMap<String, indicatif::ProgressBar>>,
}

impl StderrProgress {
    fn new() -> Self {
        Self {
            multi: std::io::stderr()
                .is_terminal()
                .then(indicatif::MultiProgress::new),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn finish(&self, item: &str, message: &str) {
        if let Some(bar) = self
            .bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(item)
        {
            bar.finish_with_message(message.to_string());
        }
    }
}

impl Progress for StderrProgress {
    fn stage(&self, item: &str, stage: &Stage) {
        let Some(multi) = &self.multi else {
            eprintln!("snapshift: {item}: {stage}");
            return;
        };
        let mut bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        let bar = bars.entry(item.to_string()).or_insert_with(|| {
            let bar = multi.add(indicatif::ProgressBar::new_spinner());
            bar.set_prefix(item.to_string());
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
            {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        bar.set_message(stage.to_string());
    }
}

fn targets(c: &ClusterArgs) -> (ClusterTarget, ClusterTarget) {
    (
        ClusterTarget {
            kubeconfig: c.from_kubeconfig.clone().or_else(|| c.kubeconfig.clone()),
            context: c.from_context.clone(),
        },
        ClusterTarget {
            kubeconfig: c.to_kubeconfig.clone().or_else(|| c.kubeconfig.clone()),
            context: c.to_context.clone(),
        },
    )
}

async fn connect_both(c: &ClusterArgs) -> Result<(cbt_k8s::Cluster, cbt_k8s::Cluster), Error> {
    let (from, to) = targets(c);
    tokio::try_join!(cbt_k8s::connect(&from), cbt_k8s::connect(&to))
}

fn retry_policy(c: &ClusterArgs) -> RetryPolicy {
    RetryPolicy {
        max_attempts: c.retries.max(1),
        initial_backoff: c.retry_backoff,
        max_backoff: Duration::from_secs(5).max(c.retry_backoff),
    }
}

/// First Ctrl-C: stop and clean up (the library removes what it created); second: quit now.
fn interrupt_handler() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    // Registered before returning, so an interrupt can never slip in before the handler exists.
    #[cfg(unix)]
    let Ok(mut interrupts) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
    else {
        return rx;
    };
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut next = async || interrupts.recv().await.is_some();
        #[cfg(not(unix))]
        let mut next = async || tokio::signal::ctrl_c().await.is_ok();
        if !next().await {
            return;
        }
        eprintln!(
            "snapshift: interrupted; removing what this run created in the destination (Ctrl-C again to quit at once)"
        );
        let _ = tx.send(true);
        if next().await {
            std::process::exit(130);
        }
    });
    rx
}

fn fail(err: &Error) -> ExitCode {
    eprintln!("error: {err}");
    ExitCode::from(exit_code(err.kind()))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match cli.command {
        Command::Migrate(args) => migrate(*args).await,
        Command::Verify(args) => verify(*args).await,
    }
}

fn dedup(v: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    v.iter()
        .filter(|x| seen.insert((*x).clone()))
        .cloned()
        .collect()
}

async fn migrate(args: MigrateArgs) -> ExitCode {
    let (origin, dest) = match connect_both(&args.clusters).await {
        Ok(pair) => pair,
        Err(e) => return fail(&e),
    };
    let namespace = args
        .clusters
        .namespace
        .clone()
        .unwrap_or_else(|| origin.default_namespace.clone());
    let opts = MigrateOptions {
        timeout: args.timeout,
        keep_partial: args.keep_partial,
        dry_run: args.dry_run,
        filter: MetadataFilter {
            copy_prefixes: args.copy_prefixes.clone(),
            skip_prefixes: args.skip_prefixes.clone(),
        },
        retry: retry_policy(&args.clusters),
    };
    let progress = Arc::new(StderrProgress::new());
    let shift = SnapShift::new(origin, dest, opts)
        .with_progress(progress.clone())
        .with_cancel(interrupt_handler());

    let pvcs = match &args.selector {
        Some(sel) => match shift.pvcs_matching(&namespace, sel).await {
            Ok(names) if names.is_empty() => {
                eprintln!("error: no PVC in namespace {namespace} matches selector {sel:?}");
                return ExitCode::from(ExitClass::Config.code());
            }
            Ok(names) => names,
            Err(e) => return fail(&e),
        },
        None => dedup(&args.pvcs),
    };
    let snapshots = dedup(&args.snapshots);
    let count = pvcs.len() + snapshots.len();
    if count > 1 && (args.pvc_name.is_some() || args.snapshot_name.is_some()) {
        eprintln!(
            "error: --pvc-name and --snapshot-name name one object; they need exactly one item"
        );
        return ExitCode::from(ExitClass::Usage.code());
    }
    if args.snapshot_name.is_some() && pvcs.is_empty() {
        eprintln!(
            "error: --snapshot-name names the snapshot cut from --pvc; with --snapshot the name is given"
        );
        return ExitCode::from(ExitClass::Usage.code());
    }
    let requests: Vec<MigrationRequest> = pvcs
        .iter()
        .map(|p| MigrationRequest::for_pvc(&namespace, p))
        .chain(
            snapshots
                .iter()
                .map(|s| MigrationRequest::for_snapshot(&namespace, s)),
        )
        .map(|mut r| {
            r.origin_snapshot_name = args.snapshot_name.clone();
            r.origin_snapshot_class = args.from_snapshot_class.clone();
            r.to_namespace = args.clusters.to_namespace.clone();
            r.snapshot_class = args.snapshot_class.clone();
            r.create_pvc = args.create_pvc;
            r.pvc_name = args.pvc_name.clone();
            r.storage_class = args.storage_class.clone();
            r
        })
        .collect();

    let reports = shift
        .migrate_all(&requests, usize::from(args.concurrency))
        .await;
    for r in &reports {
        let msg = match &r.result {
            Ok(Outcome::Migrated { .. }) => "migrated".to_string(),
            Ok(Outcome::AlreadyMigrated) => "already migrated".to_string(),
            Ok(Outcome::DryRun(_)) => "planned".to_string(),
            Err(e) => format!("failed ({})", kind_name(e.kind())),
        };
        progress.finish(&r.item, &msg);
    }
    if args.dry_run {
        print_dry_run(&reports, args.output);
    } else {
        print_reports(&reports, args.output);
    }
    for r in &reports {
        for w in &r.warnings {
            eprintln!("warning: {}: {w}", r.item);
        }
        if let Err(e) = &r.result {
            eprintln!("error: {}: {e}", r.item);
            if !r.removed.is_empty() {
                eprintln!("  removed from the destination: {}", r.removed.join(", "));
            }
            if !r.kept.is_empty() {
                eprintln!("  left in the destination: {}", r.kept.join(", "));
            }
        }
    }
    let failed = reports
        .iter()
        .filter_map(|r| r.result.as_ref().err())
        .map(|e| exit_class(e.kind()));
    match ExitClass::of_batch(failed) {
        None => ExitCode::SUCCESS,
        Some(class) => ExitCode::from(class.code()),
    }
}

fn report_json(r: &MigrationReport) -> Value {
    let mut v = json!({
        "item": r.item,
        "warnings": r.warnings,
        "destination": r.destination,
        "handle": r.handle,
        "seconds": (r.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
    });
    match &r.result {
        Ok(Outcome::Migrated { created }) => {
            v["result"] = json!("migrated");
            v["created"] = json!(created);
        }
        Ok(Outcome::AlreadyMigrated) => v["result"] = json!("already-migrated"),
        Ok(Outcome::DryRun(objects)) => {
            v["result"] = json!("planned");
            v["objects"] = json!(objects);
        }
        Err(e) => {
            v["result"] = json!("failed");
            v["error"] = json!({"kind": kind_name(e.kind()), "message": e.to_string()});
            v["removed"] = json!(r.removed);
            v["kept"] = json!(r.kept);
        }
    }
    v
}

fn print_reports(reports: &[MigrationReport], output: Output) {
    if output == Output::Json {
        let failed = reports.iter().filter(|r| r.result.is_err()).count();
        let doc =
            json!({"items": reports.iter().map(report_json).collect::<Vec<_>>(), "failed": failed});
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    let rows: Vec<[String; 5]> = reports
        .iter()
        .map(|r| {
            let result = match &r.result {
                Ok(Outcome::Migrated { .. }) => "migrated".to_string(),
                Ok(Outcome::AlreadyMigrated) => "already migrated".to_string(),
                Ok(Outcome::DryRun(_)) => "planned".to_string(),
                Err(e) => format!("FAILED ({})", kind_name(e.kind())),
            };
            [
                r.item.clone(),
                result,
                r.destination.clone().unwrap_or_else(|| "-".into()),
                r.handle.clone().unwrap_or_else(|| "-".into()),
                format!("{:.1}s", r.elapsed.as_secs_f64()),
            ]
        })
        .collect();
    print_table(&["ITEM", "RESULT", "DESTINATION", "HANDLE", "TIME"], &rows);
    let failed = reports.iter().filter(|r| r.result.is_err()).count();
    println!("{} item(s), {} failed", reports.len(), failed);
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn print_dry_run(reports: &[MigrationReport], output: Output) {
    if output == Output::Json {
        let items: Vec<Value> = reports.iter().map(report_json).collect();
        let failed = reports.iter().filter(|r| r.result.is_err()).count();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"items": items, "failed": failed}))
                .unwrap_or_default()
        );
        return;
    }
    for r in reports {
        let Ok(Outcome::DryRun(objects)) = &r.result else {
            continue;
        };
        println!("# {} (dry run: nothing is created)", r.item);
        for o in objects {
            let side = match o.side {
                Side::Origin => "origin",
                Side::Destination => "destination",
            };
            let action = match o.action {
                PlannedAction::Create => "would create",
                PlannedAction::Exists => "exists, unchanged",
                PlannedAction::Rebind => "exists, would be re-bound to the re-created snapshot",
            };
            println!("---");
            println!(
                "# {side} (context {}): {action} {} {}",
                o.cluster, o.kind, o.name
            );
            // serde-saphyr is already in the graph (kube-client's kubeconfig parser); JSON is the fallback.
            match serde_saphyr::to_string(&o.object) {
                Ok(yaml) => print!("{yaml}"),
                Err(_) => println!(
                    "{}",
                    serde_json::to_string_pretty(&o.object).unwrap_or_default()
                ),
            }
        }
    }
}

async fn verify(args: VerifyArgs) -> ExitCode {
    let (origin, dest) = match connect_both(&args.clusters).await {
        Ok(pair) => pair,
        Err(e) => return fail(&e),
    };
    let namespace = args
        .clusters
        .to_namespace
        .clone()
        .or_else(|| args.clusters.namespace.clone())
        .unwrap_or_else(|| dest.default_namespace.clone());
    let opts = MigrateOptions {
        timeout: args.timeout,
        retry: retry_policy(&args.clusters),
        ..Default::default()
    };
    let shift = SnapShift::new(origin, dest, opts);
    let reports = match shift.verify(&namespace, &dedup(&args.snapshots)).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let bad = reports.iter().filter(|r| !r.problems.is_empty()).count();
    if args.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"items": reports, "failed": bad}))
                .unwrap_or_default()
        );
    } else {
        let rows: Vec<[String; 5]> = reports
            .iter()
            .map(|r| {
                [
                    r.snapshot.clone(),
                    r.origin.clone().unwrap_or_else(|| "-".into()),
                    r.handle.clone().unwrap_or_else(|| "-".into()),
                    if r.problems.is_empty() {
                        "ok".into()
                    } else {
                        "PROBLEM".into()
                    },
                    r.problems.join("; "),
                ]
            })
            .collect();
        print_table(
            &["SNAPSHOT", "ORIGIN", "HANDLE", "STATUS", "PROBLEMS"],
            &rows,
        );
        println!("{} snapshot(s), {} with problems", reports.len(), bad);
    }
    if reports.is_empty() {
        eprintln!("error: no migrated snapshots found in namespace {namespace}");
        return ExitCode::from(ExitClass::Config.code());
    }
    if bad > 0 {
        ExitCode::from(ExitClass::Integrity.code())
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_use_the_shared_duration_parser_and_refuse_zero() {
        assert_eq!(parse_timeout("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_timeout("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("90").is_err(), "a bare number needs a unit");
        assert!(
            Cli::try_parse_from([
                "snapshift",
                "migrate",
                "-l",
                "a=b",
                "--timeout",
                "5 minutes"
            ])
            .is_err()
        );
    }

    #[test]
    fn cli_shape() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        assert!(
            Cli::try_parse_from(["snapshift", "migrate", "--from-context", "a"]).is_err(),
            "needs an item"
        );
        assert!(
            Cli::try_parse_from(["snapshift", "migrate", "--pvc", "a", "--pvc-name", "b"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["snapshift", "migrate", "--pvc", "a", "--snapshot", "b"]).is_err()
        );
        assert!(
            Cli::try_parse_from([
                "snapshift",
                "migrate",
                "-l",
                "app=db",
                "--create-pvc",
                "-o",
                "json"
            ])
            .is_ok()
        );
    }
}
