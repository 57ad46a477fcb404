//! `cbt key ...`: add, list and remove the passwords (key slots) of an encrypted repository.

use cbt_core::Timestamp;
use cbt_core::text::Escaped;
use cbt_store::crypto::KdfParams;
use clap::Subcommand;

use crate::error::CliError;
use crate::{Ctx, password_from};

/// `cbt key` subcommands. Each opens the repository with the current password (CBT_PASSWORD
/// or --password-file).
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Add a password: the new one comes from CBT_NEW_PASSWORD or --new-password-file. No data
    /// is re-encrypted.
    Add {
        /// File holding the new password (one trailing newline is ignored).
        #[arg(long, env = "CBT_NEW_PASSWORD_FILE", value_name = "PATH")]
        new_password_file: Option<std::path::PathBuf>,
    },
    /// List the key slots; the one the current password opened is marked.
    List,
    /// Remove a key slot (its password stops working). The slot of the current password and
    /// the last usable slot cannot be removed: to rotate, add the new password, then remove
    /// the old slot with the new password.
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
    match cmd {
        KeyCommand::Add { new_password_file } => {
            let new = password_from(
                "CBT_NEW_PASSWORD",
                new_password_file.as_deref(),
                "--new-password-file",
            )?
            .ok_or_else(|| {
                CliError::config("no new password given").with_hint(
                    "set CBT_NEW_PASSWORD, or pass --new-password-file (or set CBT_NEW_PASSWORD_FILE)",
                )
            })?;
            let now = Timestamp::from_system_time(std::time::SystemTime::now());
            let info = repo.add_key(&new, KdfParams::DEFAULT, now).await?;
            ctx.out
                .emit(&info, || format!("added key slot {}", info.id));
            Ok(())
        }
        KeyCommand::List => {
            let slots = repo.list_keys().await?;
            ctx.out.emit(&slots, || {
                slots
                    .iter()
                    .map(|s| {
                        let what = match (&s.problem, s.params, s.created) {
                            (Some(p), _, _) => format!("UNUSABLE: {}", Escaped(p)),
                            (None, Some(k), Some(t)) => format!(
                                "added {}, argon2id {} MiB x{} passes",
                                t.to_rfc3339(),
                                k.memory_kib / 1024,
                                k.iterations
                            ),
                            _ => String::new(),
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
            let now = Timestamp::from_system_time(std::time::SystemTime::now());
            repo.remove_key(&id, now).await?;
            ctx.out.emit(&serde_json::json!({ "removed": id }), || {
                format!("removed key slot {}", Escaped(&id))
            });
            Ok(())
        }
    }
}
