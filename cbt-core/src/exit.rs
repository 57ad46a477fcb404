//! The one exit-code table of every binary of the toolkit (`cbt`, `snapshift`): what kind of
//! failure ended a command, and the number a script sees for it.
//!
//! Library errors classify themselves into an [`ExitClass`] (or into a kind the binary maps
//! here); a binary never re-classifies by message text. The numbers are part of the public
//! interface: scripts and CronJobs branch on them, so a class's number never changes.

/// What kind of outcome ended a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitClass {
    /// Items of one batch failed in different ways (see each item's report).
    Partial,
    /// Bad arguments or input: names, ranges, unknown snapshot, a target too small.
    Usage,
    /// Stored or read data is damaged, or a peer broke its protocol; repair or report.
    Integrity,
    /// Network, timeout, throttling, 5xx, device errors: retry later.
    Transient,
    /// Configuration: credentials, repository, kubeconfig, missing driver/class/CRD, RBAC, TLS.
    Config,
    /// An object exists and differs, or the repository is locked.
    Conflict,
    /// Written by a newer version (upgrade), or a feature the storage does not offer.
    Unsupported,
    /// The storage system, snapshot controller or a Job reported a failure of its own.
    Backend,
    /// A bug in this software: please report it.
    Internal,
    /// Interrupted (Ctrl-C, SIGTERM) after cleaning up what the run created.
    Interrupted,
}

impl ExitClass {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Self::Partial => 1,
            Self::Usage => 2,
            Self::Integrity => 3,
            Self::Transient => 4,
            Self::Config => 5,
            Self::Conflict => 6,
            Self::Unsupported => 7,
            Self::Backend => 8,
            Self::Internal => 70,
            Self::Interrupted => 130,
        }
    }

    /// Short name used in JSON documents (`error.class`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Partial => "partial",
            Self::Usage => "usage",
            Self::Integrity => "integrity",
            Self::Transient => "transient",
            Self::Config => "config",
            Self::Conflict => "conflict",
            Self::Unsupported => "unsupported",
            Self::Backend => "backend",
            Self::Internal => "internal",
            Self::Interrupted => "interrupted",
        }
    }

    /// The class named `name` (as [`ExitClass::name`] writes it, e.g. in a mover's report).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Every class, in code order.
    pub const ALL: [ExitClass; 10] = [
        Self::Partial,
        Self::Usage,
        Self::Integrity,
        Self::Transient,
        Self::Config,
        Self::Conflict,
        Self::Unsupported,
        Self::Backend,
        Self::Internal,
        Self::Interrupted,
    ];

    /// The class of a batch whose items failed with `classes`: the one class when they agree,
    /// [`ExitClass::Partial`] when they differ, `None` when nothing failed.
    pub fn of_batch(classes: impl IntoIterator<Item = ExitClass>) -> Option<ExitClass> {
        let mut it = classes.into_iter();
        let first = it.next()?;
        Some(if it.all(|c| c == first) {
            first
        } else {
            Self::Partial
        })
    }
}

impl From<crate::ErrorKind> for ExitClass {
    fn from(kind: crate::ErrorKind) -> Self {
        use crate::ErrorKind as K;
        match kind {
            K::Usage | K::NotFound => Self::Usage,
            K::Config => Self::Config,
            K::Integrity | K::Protocol => Self::Integrity,
            K::Transient => Self::Transient,
            K::Conflict => Self::Conflict,
            K::Unsupported => Self::Unsupported,
            K::Backend => Self::Backend,
            K::Cancelled => Self::Interrupted,
            K::Bug => Self::Internal,
        }
    }
}

/// The table as printed in every binary's `--help`.
pub const HELP: &str = "\
Exit codes (the same for cbt and snapshift):
  0    success
  1    items of one batch failed in different ways (see each item)
  2    usage: bad arguments or input (names, ranges file, unknown snapshot, target too small)
  3    integrity: stored or read data is damaged, or verify found problems
  4    transient: network, timeouts, throttling, device errors: retry later (an interrupted
       backup resumes without re-uploading what already landed)
  5    configuration: credentials, repository, kubeconfig/context, missing driver, class or
       CRD, RBAC, TLS
  6    conflict: the repository is locked, or an object exists and differs
  7    unsupported: written by a newer version (upgrade), or a feature the storage does not
       offer (changed-block tracking not enabled for the volume: take a full backup)
  8    backend: the storage system, snapshot controller or a data-mover Job failed
  70   internal error (a bug: please report it)
  130  interrupted (what the run created was cleaned up first)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_documented() {
        let mut seen = std::collections::BTreeSet::new();
        for c in ExitClass::ALL {
            assert!(seen.insert(c.code()), "{c:?} reuses {}", c.code());
            assert!(
                HELP.lines()
                    .any(|l| l.trim_start().starts_with(&c.code().to_string())),
                "{c:?} missing from HELP"
            );
        }
    }

    #[test]
    fn names_read_back() {
        for c in ExitClass::ALL {
            assert_eq!(ExitClass::from_name(c.name()), Some(c));
        }
        assert_eq!(ExitClass::from_name("nonsense"), None);
    }

    #[test]
    fn a_batch_takes_the_common_class_or_partial() {
        use ExitClass::*;
        assert_eq!(ExitClass::of_batch([]), None);
        assert_eq!(ExitClass::of_batch([Config, Config]), Some(Config));
        assert_eq!(ExitClass::of_batch([Config, Backend]), Some(Partial));
    }
}
