//! `cbt repo ...`: create a repository.

use std::path::PathBuf;

use cbt_core::Timestamp;
use cbt_store::crypto::{KdfParams, KeyFile};
use cbt_store::repo::{InitOptions, NewKey, RepoError, RepoKey, Repository};
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
        /// Default chunk size of full backups (power of two, 4K..64M; default 1M).
        #[arg(long, value_parser = parse::size)]
        chunk_size: Option<u64>,
        /// Encrypt the repository (chunks, manifests, locks; chunk names keyed) under a password
        /// from CBT_PASSWORD or --password-file, an existing key file (--key-file), and/or a new
        /// key file (--key-file-out). Every later command needs one of them; more can be added
        /// with `cbt key add`. Without them the data cannot be read.
        #[arg(long)]
        encryption: bool,
        /// With --encryption: write a new random key file here (mode 0600, never overwriting)
        /// and make it open the repository, besides the password or key file given, if any.
        #[arg(long, value_name = "PATH", requires = "encryption")]
        key_file_out: Option<PathBuf>,
    },
}

/// Runs a `cbt repo` subcommand.
pub async fn run(ctx: &Ctx, cmd: RepoCommand) -> Result<(), CliError> {
    match cmd {
        RepoCommand::Init {
            chunk_size,
            encryption,
            key_file_out,
        } => {
            let opts = InitOptions {
                chunk_size,
                now: Timestamp::from_system_time(std::time::SystemTime::now()),
            };
            let given = ctx.key()?;
            let mut new_file = None;
            let repo = match (encryption, given) {
                (false, Some(_)) => {
                    return Err(CliError::config(
                        "a password or key file is set (CBT_PASSWORD, --password-file or --key-file) but --encryption was not given",
                    )
                    .with_hint("pass --encryption to create an encrypted repository, or unset the password or key file"));
                }
                (false, None) => Repository::init(ctx.store().await?, opts).await?,
                (true, None) if key_file_out.is_none() => {
                    return Err(CliError::config("--encryption needs a password or a key file").with_hint(
                        "set CBT_PASSWORD, pass --password-file (CBT_PASSWORD_FILE) or --key-file \
                         (CBT_KEY_FILE), or have a new key file written with --key-file-out PATH",
                    ));
                }
                (true, given) => {
                    let store = ctx.store().await?;
                    let generated = match &key_file_out {
                        Some(path) => {
                            let kf = KeyFile::generate().map_err(RepoError::from)?;
                            // Written first: a repository is never created whose key was lost.
                            kf.write_new(path).map_err(RepoError::from)?;
                            Some((kf, path.clone()))
                        }
                        None => None,
                    };
                    let mut keys = Vec::new();
                    match &given {
                        Some(RepoKey::Password(pw)) => {
                            keys.push(NewKey::Password(pw, KdfParams::DEFAULT));
                        }
                        Some(RepoKey::KeyFile(kf)) => keys.push(NewKey::KeyFile(kf)),
                        Some(RepoKey::Master(_)) | None => {}
                    }
                    if let Some((kf, _)) = &generated {
                        keys.push(NewKey::KeyFile(kf));
                    }
                    match Repository::init_encrypted_with(store, opts, &keys).await {
                        Ok(repo) => {
                            new_file = generated.map(|(kf, p)| (kf.id().to_string(), p));
                            repo
                        }
                        Err(e) => {
                            // The key file opens nothing: do not leave it behind.
                            if let Some((_, path)) = &generated {
                                let _ = std::fs::remove_file(path);
                            }
                            return Err(e.into());
                        }
                    }
                }
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
                    "key_file": new_file.as_ref().map(|(id, p)| serde_json::json!({
                        "path": p.display().to_string(),
                        "id": id,
                    })),
                }),
                || {
                    let mut text = format!(
                        "created {}repository {} at {url} (chunk size {})",
                        if repo.is_encrypted() {
                            "encrypted "
                        } else {
                            ""
                        },
                        cfg.id,
                        bytes(cfg.chunk_size),
                    );
                    if let Some((id, p)) = &new_file {
                        text.push_str(&format!("\nwrote key file {id} to {}", p.display()));
                    }
                    if repo.is_encrypted() {
                        text.push_str(
                            "\nkeep the password or key file safe: without it the data cannot be read",
                        );
                    }
                    text
                },
            );
            Ok(())
        }
    }
}
