//! Injected wall-clock time: a plain Unix-millisecond timestamp.
//!
//! The core never reads a clock; callers pass `now` in. This module only converts and formats.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC); negative values are before 1970.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Builds a timestamp from whole Unix seconds.
    pub fn from_unix_secs(secs: i64) -> Self {
        Timestamp(secs.saturating_mul(1000))
    }

    /// Milliseconds since the epoch.
    pub fn unix_millis(&self) -> i64 {
        self.0
    }

    /// Converts a `SystemTime` the caller read (saturating outside the representable span).
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX)),
        }
    }

    /// `self - d`, saturating.
    pub fn saturating_sub(&self, d: Duration) -> Timestamp {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_sub(ms))
    }

    /// RFC 3339 text in UTC with millisecond precision, e.g. `2026-11-22T01:02:03.004Z`.
    pub fn to_rfc3339(&self) -> String {
        format!(
            "{}.{:03}Z",
            self.rfc3339_to_the_second(),
            self.0.rem_euclid(1000)
        )
    }

    /// RFC 3339 text in UTC to the second (the fraction dropped), e.g. `2026-11-22T01:02:03Z`:
    /// how Kubernetes writes a `metav1.Time`.
    pub fn to_rfc3339_secs(&self) -> String {
        format!("{}Z", self.rfc3339_to_the_second())
    }

    /// `YYYY-MM-DDTHH:MM:SS` of the second this instant falls in.
    fn rfc3339_to_the_second(&self) -> String {
        let secs = self.0.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(1_795_309_323_004).to_rfc3339(),
            "2026-11-22T01:02:03.004Z"
        );
        assert_eq!(Timestamp(-1).to_rfc3339(), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            Timestamp(951_782_400_000).to_rfc3339(),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            Timestamp(1_795_309_323_004).to_rfc3339_secs(),
            "2026-11-22T01:02:03Z"
        );
        assert_eq!(Timestamp(-1).to_rfc3339_secs(), "1969-12-31T23:59:59Z");
    }
}
