//! `cbt key ...`: add, list and remove the passwords and key files (key slots) of an encrypted
//! repository.

use std::path::PathBuf;

use cbt_core::Timestamp;
use cbt_core::text::Escaped;
use cbt_store::crypto::{KdfParams, KeyFile, SlotKind};
use cbt_store::repo::{NewKey, RepoError};
use clap::Subcommand;

use crate::error::CliError;
use crate::{Ctx, password_from};

/// `cbt key` subcommands. Each opens the repository with the current password (CBT_PASSWORD
/// or --password-file) or key file (--key-file).
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add a password or a key file. The new password comes from CBT_NEW_PASSWORD or
    /// --new-password-file; a new key file is written with --key-file-out, an existing one is
    /// added with --new-key-file. No data is re-encrypted.
    Add {
        /// File holding the new password (one trailing newline is ignored).
        #[arg(long, env = "CBT_NEW_PASSWORD_FILE", value_name = "PATH")]
        new_password_file: Option<PathBuf>,
        /// Write a new random key file here (mode 0600; an existing file is never overwritten)
        /// and add a slot it opens.
        #[arg(long, value_name = "PATH", conflicts_with_all = ["new_password_file", "new_key_file"])]
        key_file_out: Option<PathBuf>,
        /// Add a slot opened by this existing key file (e.g. one shared by several
        /// repositories).
        #[arg(long, value_name = "PATH", conflicts_with = "new_password_file")]
        new_key_file: Option<PathBuf>,
    },
    /// List the key slots: what opens each (password or key file, with its id); the one that
    /// opened the repository is marked `*`.
    List,
    /// Remove a key slot (its password or key file stops working). The slot that opened the
    /// repository and the last usable slot cannot be removed: to rotate, add the new password
    /// or key file, then remove the old slot while opening with the new one. One key change
    /// runs at a time (lock `locks/keys`).
    Remove {
        /// Id of the slot (see `cbt key list`).
        id: String,
    },
}

/// Runs a `cbt key` subcommand.
pub async fn run(ctx: &Ctx, cmd: KeyCommand) -> Result<(), CliError> {
    let repo = ctx.repo().await?;
    if !repo.is_encrypted() {
        return Err(
            CliError::config("the repository is not encrypted: it has no keys")
                .with_hint("create an encrypted repository with `cbt repo init --encryption`"),
        );
    }
    let now = Timestamp::from_system_time(std::time::SystemTime::now());
    match cmd {
        KeyCommand::Add {
            new_password_file,
            key_file_out,
            new_key_file,
        } => {
            let new_password = password_from(
                "CBT_NEW_PASSWORD",
                new_password_file.as_deref(),
                "--new-password-file",
            )?;
            let chosen = usize::from(new_password.is_some())
                + usize::from(key_file_out.is_some())
                + usize::from(new_key_file.is_some());
            if chosen > 1 {
                return Err(CliError::usage(
                    "give one new key: CBT_NEW_PASSWORD / --new-password-file, --key-file-out or --new-key-file",
                ));
            }
            if let Some(pw) = new_password {
                let info = repo
                    .add_key_slot(NewKey::Password(&pw, KdfParams::DEFAULT), now)
                    .await?;
                ctx.out
                    .emit(&info, || format!("added key slot {} (password)", info.id));
                return Ok(());
            }
            if let Some(path) = new_key_file {
                let kf = KeyFile::from_file(&path).map_err(RepoError::from)?;
                let info = repo.add_key_file(&kf, now).await?;
                ctx.out.emit(&info, || {
                    format!("added key slot {} (key file {})", info.id, kf.id())
                });
                return Ok(());
            }
            let Some(path) = key_file_out else {
                return Err(CliError::config("no new password or key file given").with_hint(
                    "set CBT_NEW_PASSWORD, pass --new-password-file (or set CBT_NEW_PASSWORD_FILE), \
                     or write a new key file with --key-file-out PATH",
                ));
            };
            let kf = KeyFile::generate().map_err(RepoError::from)?;
            // Written before the slot: a slot is never added whose key file was not stored.
            kf.write_new(&path).map_err(RepoError::from)?;
            let info = match repo.add_key_file(&kf, now).await {
                Ok(info) => info,
                Err(e) => {
                    // It opens nothing: do not leave it behind.
                    let _ = std::fs::remove_file(&path);
                    return Err(e.into());
                }
            };
            let json = serde_json::json!({
                "slot": info,
                "key_file": { "path": path.display().to_string(), "id": kf.id() },
            });
            ctx.out.emit(&json, || {
                format!(
                    "added key slot {} (key file {}), wrote the key file to {}\nkeep it secret and keep a copy",
                    info.id,
                    kf.id(),
                    path.display()
                )
            });
            Ok(())
        }
        KeyCommand::List => {
            let slots = repo.list_keys().await?;
            ctx.out.emit(&slots, || {
                slots
                    .iter()
                    .map(|s| {
                        let added = s
                            .created
                            .map(|t| format!("added {}, ", t.to_rfc3339()))
                            .unwrap_or_default();
                        let what = match (&s.problem, s.kind) {
                            (Some(p), _) => format!("UNUSABLE: {}", Escaped(p)),
                            (None, Some(SlotKind::Password)) => match s.params {
                                Some(k) => format!(
                                    "password    {added}argon2id {} MiB x{} passes",
                                    k.memory_kib / 1024,
                                    k.iterations
                                ),
                                None => format!("password    {added}"),
                            },
                            (None, Some(SlotKind::KeyFile)) => format!(
                                "key-file    {added}key file {}",
                                Escaped(s.key_file_id.as_deref().unwrap_or("?"))
                            ),
                            (None, None) => "unknown".to_string(),
                        };
                        format!(
                            "{}{} {what}",
                            if s.current { "* " } else { "  " },
                            Escaped(&s.id)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(())
        }
        KeyCommand::Remove { id } => {
            repo.remove_key(&id, now).await?;
            ctx.out.emit(&serde_json::json!({ "removed": id }), || {
                format!("removed key slot {}", Escaped(&id))
            });
            Ok(())
        }
    }
}
