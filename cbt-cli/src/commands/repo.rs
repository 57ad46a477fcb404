//! `cbt repo ...`: create a repository.

use cbt_core::Timestamp;
use cbt_store::crypto::KdfParams;
use cbt_store::repo::{InitOptions, Repository};
use clap::Subcommand;

use super::parse;
use crate::Ctx;
use crate::error::CliError;
use crate::output::bytes;

/// `cbt repo` subcommands.
#[derive(Debug, Subcommand)]
pub enum RepoCommand {
    /// Create a new, empty repository at --repo (fails if one exists there).
    Init {
        /// Default chunk size of full backups (power of two, 4K..64M; default 4M).
        #[arg(long, value_parser = parse::size)]
        chunk_size: Option<u64>,
        /// Encrypt the repository (chunks, manifests; chunk names keyed) under a password from
        /// CBT_PASSWORD or --password-file. Every later command needs that password; more can
        /// be added with `cbt key add`. Without the password the data cannot be read.
        #[arg(long)]
        encryption: bool,
    },
}

/// Runs a `cbt repo` subcommand.
pub async fn run(ctx: &Ctx, cmd: RepoCommand) -> Result<(), CliError> {
    match cmd {
        RepoCommand::Init {
            chunk_size,
            encryption,
        } => {
            let opts = InitOptions {
                chunk_size,
                now: Timestamp::from_system_time(std::time::SystemTime::now()),
            };
            let password = ctx.password()?;
            let repo = match (encryption, password) {
                (true, Some(pw)) => {
                    let store = ctx.store().await?;
                    Repository::init_encrypted(store, opts, &pw, KdfParams::DEFAULT).await?
                }
                (true, None) => {
                    return Err(CliError::config("--encryption needs a password").with_hint(
                        "set CBT_PASSWORD, or pass --password-file (or set CBT_PASSWORD_FILE)",
                    ));
                }
                (false, Some(_)) => {
                    return Err(CliError::config(
                        "a password is set (CBT_PASSWORD or --password-file) but --encryption was not given",
                    )
                    .with_hint("pass --encryption to create an encrypted repository, or unset the password"));
                }
                (false, None) => Repository::init(ctx.store().await?, opts).await?,
            };
            let cfg = repo.config();
            let url = ctx.repo_url.clone().unwrap_or_default();
            ctx.out.emit(
                &serde_json::json!({
                    "repository": url,
                    "id": cfg.id,
                    "version": cfg.version,
                    "chunk_size": cfg.chunk_size,
                    "encrypted": repo.is_encrypted(),
                    "key_slot": repo.opened_slot(),
                }),
                || {
                    format!(
                        "created {}repository {} at {url} (chunk size {}){}",
                        if repo.is_encrypted() {
                            "encrypted "
                        } else {
                            ""
                        },
                        cfg.id,
                        bytes(cfg.chunk_size),
                        if repo.is_encrypted() {
                            "\nkeep the password safe: without it the data cannot be read"
                        } else {
                            ""
                        }
                    )
                },
            );
            Ok(())
        }
    }
}
