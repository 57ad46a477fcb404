//! Errors of the `cbt` command and their exit codes.
//!
//! Every failure is reduced to an [`ExitClass`] (which fixes the exit code), a message and an
//! optional hint telling the user what to do. Library errors classify themselves into the
//! toolkit's one [`cbt_core::ErrorKind`] (`kind()`), which [`ExitClass::from`] maps to the one
//! exit-code table; this module adds only the hints, never re-classifies.

use std::process::ExitCode;

use cbt_store::repo::RepoError;
use cbt_store::store::{ErrorKind, StoreError};

/// Exit codes, printed in `cbt --help`: the toolkit's one table (shared with `snapshift`).
pub const EXIT_CODES_HELP: &str = cbt_core::exit::HELP;

pub use cbt_core::exit::ExitClass;

/// The process exit code of a class.
pub fn exit_code(class: ExitClass) -> ExitCode {
    ExitCode::from(class.code())
}

/// A failed command: class, message and what to do about it.
#[derive(Debug)]
pub struct CliError {
    /// Decides the exit code.
    pub class: ExitClass,
    /// What went wrong (with names, keys, offsets).
    pub message: String,
    /// What the user can do.
    pub hint: Option<String>,
    /// The command already printed this error as part of its own JSON document, so the
    /// generic error document is not printed again (stdout stays one document).
    pub reported: bool,
}

impl CliError {
    /// Bad arguments or input.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            class: ExitClass::Usage,
            message: message.into(),
            hint: None,
            reported: false,
        }
    }

    /// Bad configuration.
    pub fn config(message: impl Into<String>) -> Self {
        Self {
            class: ExitClass::Config,
            message: message.into(),
            hint: None,
            reported: false,
        }
    }

    /// The error as a JSON value (`class`, `exit_code`, `message`, `hint`), for embedding in a
    /// command's own output document.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "class": self.class.name(),
            "exit_code": self.class.code(),
            "message": self.message,
            "hint": self.hint,
        })
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

fn store_hint(e: &StoreError) -> Option<String> {
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

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError {
            reported: false,
            class: ExitClass::from(e.kind()),
            hint: store_hint(&e),
            message: e.to_string(),
        }
    }
}

impl From<RepoError> for CliError {
    fn from(e: RepoError) -> Self {
        let class = ExitClass::from(e.kind());
        let hint = match &e {
            RepoError::Store { source, .. } => store_hint(source),
            RepoError::NotInitialized => {
                Some("check --repo, or create it with `cbt repo init`".into())
            }
            RepoError::KeyRequired => {
                Some("set CBT_PASSWORD, or pass --password-file (or set CBT_PASSWORD_FILE)".into())
            }
            RepoError::WrongPassword { .. } => Some(
                "check CBT_PASSWORD / the password file; each password added with \
                 `cbt key add` opens the repository"
                    .into(),
            ),
            RepoError::NotEncrypted => Some(
                "unset CBT_PASSWORD / CBT_PASSWORD_FILE for this repository; if it was \
                 created encrypted, its config has been edited: restore it before writing"
                    .into(),
            ),
            RepoError::Crypto(cbt_store::crypto::CryptoError::BadPassword { .. })
            | RepoError::Crypto(cbt_store::crypto::CryptoError::PasswordFile { .. }) => {
                Some("check CBT_PASSWORD / the password file".into())
            }
            RepoError::KeyInUse { .. } | RepoError::LastKeySlot { .. } => Some(
                "to rotate a password: `cbt key add` the new one, then `cbt key remove` the \
                 old slot while opening with the new password"
                    .into(),
            ),
            RepoError::KeySlotNotFound { .. } => Some("see `cbt key list`".into()),
            RepoError::Locked { .. } => Some(
                "another cbt process is using the repository; if it died, see `cbt lock list` \
                 and `cbt lock break <id>`"
                    .into(),
            ),
            _ => match class {
                ExitClass::Integrity => {
                    Some("run `cbt verify --read-data` to list every damaged object".to_string())
                }
                ExitClass::Transient => Some(
                    "retry; an interrupted backup resumes without re-uploading stored chunks"
                        .to_string(),
                ),
                ExitClass::Unsupported => Some("upgrade cbt".to_string()),
                _ => None,
            },
        };
        CliError {
            reported: false,
            class,
            hint,
            message: e.to_string(),
        }
    }
}

impl From<cbt_core::CoreError> for CliError {
    fn from(e: cbt_core::CoreError) -> Self {
        RepoError::from(e).into()
    }
}
