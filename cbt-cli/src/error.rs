//! Errors of the `cbt` command and their exit codes.
//!
//! Every failure is reduced to an [`ExitClass`] (which fixes the exit code), a message and an
//! optional hint telling the user what to do. Library errors classify themselves into the
//! toolkit's one [`cbt_core::ErrorKind`] (`kind()`), which [`ExitClass::from`] maps to the one
//! exit-code table; this module adds only the hints, never re-classifies.

use std::process::ExitCode;

use cbt_store::repo::RepoError;
use cbt_store::store::StoreError;

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

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError {
            reported: false,
            class: ExitClass::from(e.kind()),
            hint: e.guidance(),
            message: e.to_string(),
        }
    }
}

impl From<RepoError> for CliError {
    fn from(e: RepoError) -> Self {
        CliError {
            reported: false,
            class: ExitClass::from(e.kind()),
            hint: e.guidance(),
            message: e.to_string(),
        }
    }
}

impl From<cbt_core::CoreError> for CliError {
    fn from(e: cbt_core::CoreError) -> Self {
        RepoError::from(e).into()
    }
}
