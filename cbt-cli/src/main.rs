//! `cbt`: back up block volumes (Kubernetes CSI snapshots, devices, image files) to object
//! storage using changed-block tracking, and restore, verify, list and prune them.
//!
//! This binary only parses arguments, calls one library function per command and prints the
//! result; everything a library user needs lives in `cbt-store`, `cbt-csi` and `cbt-k8s`.

mod commands;
mod error;
mod metadata_cmd;
mod output;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cbt_store::crypto::{KeyFile, Password};
use cbt_store::repo::{RepoKey, Repository};
use cbt_store::store::{ObjectStore, S3Options, open_url};
use clap::{Parser, Subcommand};

use crate::error::{CliError, EXIT_CODES_HELP, ExitClass};
use crate::output::{Format, Output};

/// Help heading of the options every subcommand accepts, so they stay apart from its own.
const GLOBAL: &str = "Global options";

/// Command-line interface of `cbt`.
#[derive(Debug, Parser)]
#[command(
    name = "cbt",
    version,
    about = "Changed-block-tracking backups of block volumes to object storage",
    after_long_help = EXIT_CODES_HELP,
    after_help = "Run `cbt --help` for exit codes."
)]
pub struct Cli {
    /// Repository URL: file:///path (local directory) or s3://bucket[/prefix]. S3 credentials
    /// come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
    /// web identity, instance role), never from the command line.
    #[arg(long, env = "CBT_REPO", global = true, value_name = "URL", help_heading = GLOBAL)]
    pub repo: Option<String>,

    /// S3 endpoint URL for S3-compatible servers (MinIO, Ceph RGW, SeaweedFS); implies
    /// path-style addressing.
    #[arg(long, env = "CBT_S3_ENDPOINT", global = true, value_name = "URL", help_heading = GLOBAL)]
    pub s3_endpoint: Option<String>,

    /// S3 region (default: from the AWS configuration, else us-east-1).
    #[arg(long, env = "CBT_S3_REGION", global = true, value_name = "REGION", help_heading = GLOBAL)]
    pub s3_region: Option<String>,

    /// File holding the password of an encrypted repository (one trailing newline is
    /// ignored). The password can also come from CBT_PASSWORD; never from the command line.
    #[arg(long, env = "CBT_PASSWORD_FILE", global = true, value_name = "PATH", help_heading = GLOBAL)]
    pub password_file: Option<std::path::PathBuf>,

    /// Key file of an encrypted repository, instead of a password (written by `cbt repo init
    /// --key-file-out` or `cbt key add --key-file-out`).
    #[arg(long, env = "CBT_KEY_FILE", global = true, value_name = "PATH", help_heading = GLOBAL)]
    pub key_file: Option<std::path::PathBuf>,

    /// Output format: `human` text, or one JSON document on stdout (errors included).
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value = "human",
        global = true,
        help_heading = GLOBAL
    )]
    pub output: Format,

    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = GLOBAL)]
    pub verbose: u8,

    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands. Each variant's arguments live in its module under `commands/`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a repository.
    #[command(subcommand)]
    Repo(commands::repo::RepoCommand),
    /// Back up a device or image file as a new snapshot (full or incremental).
    Backup(commands::backup::BackupArgs),
    /// Restore a snapshot to a device or image file.
    Restore(commands::restore::RestoreArgs),
    /// Check that snapshots are complete (and with --read-data, intact).
    Verify(commands::maint::VerifyArgs),
    /// List snapshots.
    List(commands::maint::ListArgs),
    /// Show one snapshot in detail.
    Show(commands::maint::ShowArgs),
    /// Delete one snapshot (its data is reclaimed by the next prune).
    Delete(commands::maint::DeleteArgs),
    /// Delete snapshots by retention policy, then unreferenced data.
    Prune(commands::maint::PruneArgs),
    /// Repository totals: snapshots, stored bytes, deduplication.
    Status,
    /// Inspect or break repository locks.
    #[command(subcommand)]
    Lock(commands::maint::LockCommand),
    /// Manage the passwords (key slots) of an encrypted repository.
    #[command(subcommand)]
    Key(commands::key::KeyCommand),
    /// Query a SnapshotMetadata service (CSI driver or Kubernetes sidecar) for allocated or
    /// changed ranges.
    #[command(subcommand)]
    Metadata(metadata_cmd::MetadataCommand),
    /// Serve the CSI and Kubernetes SnapshotMetadata APIs from a directory of snapshot images.
    ServeMetadata(metadata_cmd::ServeMetadataArgs),
    /// Check that CBT backups can work in a cluster: snapshot API and controller, the driver's
    /// SnapshotMetadataService and sidecar, TLS, tokens, snapshot class, RBAC; one line per
    /// check with the fix (exit 5 if any check fails).
    Doctor(commands::doctor::DoctorArgs),
    /// csi-addons volume replication (served by cbt-replicator): status, promote, demote,
    /// resync.
    #[command(subcommand)]
    Replication(commands::replication::ReplicationCommand),
    /// Run as the data mover of a `backup --pvc` / `restore --to-pvc` Job (spec in CBT_MOVER_SPEC).
    #[command(hide = true)]
    Mover(commands::k8s::MoverArgs),
}

/// Everything a command needs besides its own arguments.
pub struct Ctx {
    /// Global flags.
    pub repo_url: Option<String>,
    /// S3 settings from the flags.
    pub s3: S3Options,
    /// Where output goes.
    pub out: Output,
    /// `--password-file` / CBT_PASSWORD_FILE.
    pub password_file: Option<std::path::PathBuf>,
    /// `--key-file` / CBT_KEY_FILE.
    pub key_file: Option<std::path::PathBuf>,
}

impl Ctx {
    /// Opens the object store named by `--repo`.
    pub async fn store(&self) -> Result<Arc<dyn ObjectStore>, CliError> {
        let url = self.repo_url.as_deref().ok_or_else(|| {
            CliError::config("no repository given").with_hint(
                "pass --repo file:///path or --repo s3://bucket/prefix (or set CBT_REPO)",
            )
        })?;
        Ok(open_url(url, &self.s3).await?)
    }

    /// The password of an encrypted repository: CBT_PASSWORD, else `--password-file` /
    /// CBT_PASSWORD_FILE; `None` when neither is set.
    pub fn password(&self) -> Result<Option<Password>, CliError> {
        password_from(
            "CBT_PASSWORD",
            self.password_file.as_deref(),
            "--password-file",
        )
    }

    /// The key of an encrypted repository: a password (see [`Ctx::password`]) or the key file
    /// of `--key-file` / CBT_KEY_FILE; `None` when none is given, an error when both are.
    pub fn key(&self) -> Result<Option<RepoKey>, CliError> {
        let password = self.password()?;
        match (password, &self.key_file) {
            (Some(_), Some(_)) => Err(CliError::config(
                "both a password (CBT_PASSWORD or --password-file) and a key file (--key-file) are given",
            )
            .with_hint("set only one: either opens the repository")),
            (Some(pw), None) => Ok(Some(RepoKey::Password(pw))),
            (None, Some(path)) => Ok(Some(RepoKey::KeyFile(
                KeyFile::from_file(path).map_err(cbt_store::repo::RepoError::from)?,
            ))),
            (None, None) => Ok(None),
        }
    }

    /// Opens the repository named by `--repo` (with the password or key file, if one is
    /// given).
    pub async fn repo(&self) -> Result<Repository, CliError> {
        let store = self.store().await?;
        Ok(match self.key()? {
            Some(key) => Repository::open_with_key(store, &key).await?,
            None => Repository::open(store).await?,
        })
    }
}

/// A password from the environment variable `var`, else from `file`; both set is an error
/// (which one is meant cannot be guessed).
pub fn password_from(
    var: &str,
    file: Option<&std::path::Path>,
    flag: &str,
) -> Result<Option<Password>, CliError> {
    let from_env = std::env::var_os(var);
    match (from_env, file) {
        (Some(_), Some(_)) => Err(CliError::config(format!(
            "both {var} and {flag} are set; set only one"
        ))),
        (Some(v), None) => {
            let v = v
                .into_string()
                .map_err(|_| CliError::config(format!("{var} is not valid UTF-8")))?;
            Ok(Some(
                Password::new(v).map_err(cbt_store::repo::RepoError::from)?,
            ))
        }
        (None, Some(path)) => Ok(Some(
            Password::from_file(path).map_err(cbt_store::repo::RepoError::from)?,
        )),
        (None, None) => Ok(None),
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    // The AWS SDK logs every failed step of its credential chain (IMDS probes and the like) as
    // a warning; the error we return says what matters, so its chatter stays below -vvv.
    let directives = if verbose >= 3 {
        default.to_string()
    } else {
        format!("{default},aws_config=error,aws_smithy_runtime=error,aws_sdk_s3=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(directives));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli, ctx: Ctx) -> Result<(), CliError> {
    match cli.command {
        Command::Repo(cmd) => commands::repo::run(&ctx, cmd).await,
        Command::Backup(args) => commands::backup::run(&ctx, args).await,
        Command::Restore(args) => commands::restore::run(&ctx, args).await,
        Command::Verify(args) => commands::maint::verify(&ctx, args).await,
        Command::List(args) => commands::maint::list(&ctx, args).await,
        Command::Show(args) => commands::maint::show(&ctx, args).await,
        Command::Delete(args) => commands::maint::delete(&ctx, args).await,
        Command::Prune(args) => commands::maint::prune(&ctx, args).await,
        Command::Status => commands::maint::status(&ctx).await,
        Command::Lock(cmd) => commands::maint::lock(&ctx, cmd).await,
        Command::Key(cmd) => commands::key::run(&ctx, cmd).await,
        Command::Metadata(cmd) => metadata_cmd::run_metadata(&ctx, cmd).await,
        Command::ServeMetadata(args) => metadata_cmd::run_serve_metadata(args).await,
        Command::Doctor(args) => commands::doctor::run(&ctx, &args).await,
        Command::Mover(args) => commands::k8s::mover(&args, ctx.key_file.as_deref()).await,
        Command::Replication(cmd) => commands::replication::run(&ctx, cmd).await,
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    ExitCode::SUCCESS
                }
                _ => error::exit_code(ExitClass::Usage),
            };
        }
    };
    init_logging(cli.verbose);
    let out = Output { format: cli.output };
    let ctx = Ctx {
        repo_url: cli.repo.clone(),
        s3: S3Options {
            endpoint: cli.s3_endpoint.clone(),
            region: cli.s3_region.clone(),
            attempt_timeout: Duration::from_secs(120),
            ..S3Options::default()
        },
        out,
        password_file: cli.password_file.clone(),
        key_file: cli.key_file.clone(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out.error(&CliError {
                reported: false,
                class: ExitClass::Internal,
                message: format!("cannot start the async runtime: {e}"),
                hint: None,
            });
            return error::exit_code(ExitClass::Internal);
        }
    };
    match runtime.block_on(run(cli, ctx)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            error::exit_code(e.class)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        // Flattened argument sets (metadata, PVC, cluster) must not reuse ids or flags.
        super::Cli::command().debug_assert();
    }
}
