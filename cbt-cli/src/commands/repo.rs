//! `cbt repo ...`: create a repository.

use cbt_core::Timestamp;
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
    },
}

/// Runs a `cbt repo` subcommand.
pub async fn run(ctx: &Ctx, cmd: RepoCommand) -> Result<(), CliError> {
    match cmd {
        RepoCommand::Init { chunk_size } => {
            let store = ctx.store().await?;
            let repo = Repository::init(
                store,
                InitOptions {
                    chunk_size,
                    now: Timestamp::from_system_time(std::time::SystemTime::now()),
                },
            )
            .await?;
            let cfg = repo.config();
            let url = ctx.repo_url.clone().unwrap_or_default();
            ctx.out.emit(
                &serde_json::json!({
                    "repository": url,
                    "id": cfg.id,
                    "version": cfg.version,
                    "chunk_size": cfg.chunk_size,
                }),
                || {
                    format!(
                        "created repository {} at {url} (chunk size {})",
                        cfg.id,
                        bytes(cfg.chunk_size)
                    )
                },
            );
            Ok(())
        }
    }
}
