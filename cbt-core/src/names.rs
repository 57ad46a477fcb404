//! Validated names for volumes and snapshots, the only user text that enters object keys.
//!
//! Owns the rule that makes key construction safe: a valid name is one key segment made of
//! `[A-Za-z0-9._-]`, starting with a letter or digit, at most 253 bytes, with no `..`. Such a
//! name can never contain `/`, NUL, control characters or a parent reference, so a hostile
//! name cannot escape the prefix it is placed under. Kubernetes names (DNS-1123 subdomains)
//! are all valid; `namespace/pvc` pairs are encoded with [`VolumeName::from_pvc`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// Longest accepted name, in bytes (the Kubernetes object-name limit).
pub const MAX_NAME_LEN: usize = 253;

/// Checks `name` against the key-segment rules; `what` names the kind in the error.
///
/// # Errors
/// [`CoreError::InvalidName`] with the reason.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), CoreError> {
    let bad = |reason| {
        Err(CoreError::InvalidName {
            what,
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 253 bytes");
    }
    if let Some(c) = name.chars().find(|c| !is_allowed(*c)) {
        return bad(if c == '/' || c == '\\' {
            "must not contain a path separator"
        } else if c == '\0' {
            "must not contain NUL"
        } else if c.is_control() {
            "must not contain control characters"
        } else {
            "only ASCII letters, digits, '.', '_' and '-' are allowed"
        });
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    if name.contains("..") {
        return bad("must not contain '..'");
    }
    Ok(())
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `name` and wraps it.
            ///
            /// # Errors
            /// [`CoreError::InvalidName`] if it breaks the key-segment rules.
            pub fn new(name: impl Into<String>) -> Result<Self, CoreError> {
                let name = name.into();
                validate_name($what, &name)?;
                Ok($ty(name))
            }

            /// The name as text (safe to use as one object-key segment).
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = CoreError;
            fn try_from(s: String) -> Result<Self, CoreError> {
                $ty::new(s)
            }
        }

        impl std::str::FromStr for $ty {
            type Err = CoreError;
            fn from_str(s: &str) -> Result<Self, CoreError> {
                $ty::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A validated volume name: the per-volume prefix of manifests in a repository.
    VolumeName,
    "volume"
);
name_type!(
    /// A validated snapshot name, unique within its volume.
    SnapshotName,
    "snapshot"
);

impl VolumeName {
    /// Encodes a PVC as `namespace_pvc`; unambiguous because neither part may contain `_`.
    ///
    /// # Errors
    /// [`CoreError::InvalidName`] if either part is not a Kubernetes name or the result is too long.
    pub fn from_pvc(namespace: &str, pvc: &str) -> Result<Self, CoreError> {
        for (what, part) in [("namespace", namespace), ("PVC", pvc)] {
            validate_name(what, part)?;
            if part.contains('_') {
                return Err(CoreError::InvalidName {
                    what,
                    name: part.to_owned(),
                    reason: "Kubernetes names cannot contain '_'",
                });
            }
        }
        VolumeName::new(format!("{namespace}_{pvc}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_names() {
        for ok in ["pvc-1", "db.data", "A_b-9", "x", &"a".repeat(253)] {
            assert!(VolumeName::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            VolumeName::from_pvc("prod", "db-0").unwrap().as_str(),
            "prod_db-0"
        );
    }

    #[test]
    fn rejects_hostile_names() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "a..b",
            "-rf",
            ".hidden",
            "a\0b",
            "a\nb",
            "é",
            "a b",
            &"a".repeat(254),
            "/abs",
        ] {
            assert!(
                matches!(SnapshotName::new(bad), Err(CoreError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(VolumeName::from_pvc("a_b", "c").is_err());
        assert!(serde_json::from_str::<SnapshotName>("\"../../etc\"").is_err());
    }
}
