//! Sizes and durations as users type them, one parser each for every binary and flag.
//!
//! Sizes use binary units whatever the spelling: `65536`, `64K`, `64KiB`, `64kb`, `4M`, `4MiB`,
//! `1G`, `1T` (case-insensitive, optional space and trailing `B`). Durations are one or more
//! `<integer><unit>` parts with units `ms`, `s`, `m`, `h`, `d`, `w`: `90s`, `1h30m`, `250ms`,
//! `7d`. A bare number is refused rather than guessed: `--keep-within 7` meaning 7 seconds
//! instead of 7 days would let prune delete a week of backups.

use std::time::Duration;

/// Why a size or duration was refused; each variant carries the text as typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitsError {
    /// Nothing was given.
    #[error("empty value (expected e.g. {example})")]
    Empty {
        /// An accepted spelling to show.
        example: &'static str,
    },
    /// The text does not start with an integer.
    #[error("`{text}` is not a {what} (expected e.g. {example})")]
    NotANumber {
        /// The value as typed.
        text: String,
        /// `size` or `duration`.
        what: &'static str,
        /// An accepted spelling to show.
        example: &'static str,
    },
    /// The unit is not one this parser knows.
    #[error("`{text}`: unknown unit `{unit}` (use {accepted})")]
    UnknownUnit {
        /// The value as typed.
        text: String,
        /// The unit found.
        unit: String,
        /// The units accepted.
        accepted: &'static str,
    },
    /// A duration without a unit.
    #[error("`{text}` needs a unit: ms, s, m, h, d or w (e.g. {text}s)")]
    MissingUnit {
        /// The value as typed.
        text: String,
    },
    /// The value does not fit (64-bit bytes, or `Duration`).
    #[error("`{text}` is too large")]
    Overflow {
        /// The value as typed.
        text: String,
    },
}

const SIZE_EXAMPLE: &str = "65536, 64K, 4MiB, 1G";
const SIZE_UNITS: &str = "B, K/KiB, M/MiB, G/GiB or T/TiB";
const DURATION_EXAMPLE: &str = "90s, 30m, 1h30m, 7d";

/// Parses a byte size in binary units (see the module doc).
///
/// # Errors
/// [`UnitsError`] naming what is wrong.
pub fn parse_size(text: &str) -> Result<u64, UnitsError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(UnitsError::Empty {
            example: SIZE_EXAMPLE,
        });
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        if num.is_empty() {
            UnitsError::NotANumber {
                text: s.to_string(),
                what: "size",
                example: SIZE_EXAMPLE,
            }
        } else {
            UnitsError::Overflow {
                text: s.to_string(),
            }
        }
    })?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(UnitsError::UnknownUnit {
                text: s.to_string(),
                unit: other.to_string(),
                accepted: SIZE_UNITS,
            });
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| UnitsError::Overflow {
            text: s.to_string(),
        })
}

/// Parses a duration such as `90s`, `1h30m`, `250ms` or `7d` (see the module doc).
///
/// # Errors
/// [`UnitsError`] naming what is wrong; a bare number is [`UnitsError::MissingUnit`].
pub fn parse_duration(text: &str) -> Result<Duration, UnitsError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(UnitsError::Empty {
            example: DURATION_EXAMPLE,
        });
    }
    let overflow = || UnitsError::Overflow {
        text: s.to_string(),
    };
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(UnitsError::NotANumber {
                text: s.to_string(),
                what: "duration",
                example: DURATION_EXAMPLE,
            });
        }
        let n: u64 = rest[..digits].parse().map_err(|_| overflow())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (unit, tail) = rest.split_at(unit_len);
        rest = tail;
        let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => secs(1),
            "m" => secs(60),
            "h" => secs(3600),
            "d" => secs(86_400),
            "w" => secs(7 * 86_400),
            "" => {
                return Err(UnitsError::MissingUnit {
                    text: s.to_string(),
                });
            }
            other => {
                return Err(UnitsError::UnknownUnit {
                    text: s.to_string(),
                    unit: other.to_string(),
                    accepted: "ms, s, m, h, d or w",
                });
            }
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(overflow)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_every_spelling() {
        for (text, want) in [
            ("65536", 65536),
            ("0", 0),
            ("512B", 512),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("64kb", 64 << 10),
            ("4M", 4 << 20),
            ("4MiB", 4 << 20),
            ("4 MiB", 4 << 20),
            (" 4mib ", 4 << 20),
            ("1G", 1 << 30),
            ("1GiB", 1 << 30),
            ("2T", 2 << 40),
            ("16TiB", 16 << 40),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_sizes_say_why() {
        assert!(matches!(parse_size(""), Err(UnitsError::Empty { .. })));
        assert!(matches!(
            parse_size("M"),
            Err(UnitsError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_size("-4M"),
            Err(UnitsError::NotANumber { .. })
        ));
        assert!(
            matches!(parse_size("4X"), Err(UnitsError::UnknownUnit { unit, .. }) if unit == "x")
        );
        assert!(matches!(
            parse_size("4.5M"),
            Err(UnitsError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999G"),
            Err(UnitsError::Overflow { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(UnitsError::Overflow { .. })
        ));
    }

    #[test]
    fn durations_single_and_compound() {
        for (text, want) in [
            ("90s", Duration::from_secs(90)),
            ("30m", Duration::from_secs(1800)),
            ("12h", Duration::from_secs(12 * 3600)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("2w", Duration::from_secs(14 * 86_400)),
            ("250ms", Duration::from_millis(250)),
            ("1h30m", Duration::from_secs(5400)),
            ("1m500ms", Duration::from_millis(60_500)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(matches!(
            parse_duration("7"),
            Err(UnitsError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_duration("1h30"),
            Err(UnitsError::MissingUnit { .. })
        ));
        assert!(matches!(
            parse_duration("7y"),
            Err(UnitsError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("5 minutes"),
            Err(UnitsError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("m5"),
            Err(UnitsError::NotANumber { .. })
        ));
        assert!(matches!(parse_duration(""), Err(UnitsError::Empty { .. })));
        assert!(matches!(
            parse_duration("99999999999999999h"),
            Err(UnitsError::Overflow { .. })
        ));
        assert!(matches!(
            parse_duration("18446744073709551615s1s"),
            Err(UnitsError::Overflow { .. })
        ));
    }
}
