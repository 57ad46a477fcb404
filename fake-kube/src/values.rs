//! Small value helpers: timestamps and resource quantities as the API server writes them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Current time as Unix nanoseconds (what VolumeSnapshotContent status.creationTime holds).
pub fn unix_nanos_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// RFC 3339 UTC timestamp with second precision, as metav1.Time serialises.
pub fn rfc3339_from_unix_nanos(nanos: i64) -> String {
    cbt_core::Timestamp(nanos.div_euclid(1_000_000)).to_rfc3339_secs()
}

/// Current time in RFC 3339.
pub fn rfc3339_now() -> String {
    rfc3339_from_unix_nanos(unix_nanos_now())
}

/// Parses an integral resource quantity ("10Gi", "500M", "1024") into bytes.
pub fn parse_quantity(q: &str) -> Option<i64> {
    let q = q.trim();
    let split = q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: i64 = num.parse().ok()?;
    let mult: i64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Formats bytes the way resource.Quantity canonicalises a binary-SI value.
pub fn format_quantity(bytes: i64) -> String {
    const UNITS: [(&str, i64); 5] = [
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    if bytes > 0 {
        for (suffix, unit) in UNITS {
            if bytes % unit == 0 {
                return format!("{}{suffix}", bytes / unit);
            }
        }
    }
    bytes.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_quantities() {
        assert_eq!(rfc3339_from_unix_nanos(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_from_unix_nanos(1_700_000_000_123_000_000),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(parse_quantity("10Gi"), Some(10 << 30));
        assert_eq!(parse_quantity("2G"), Some(2_000_000_000));
        assert_eq!(parse_quantity("1.5Gi"), None);
        assert_eq!(format_quantity(3 << 30), "3Gi");
        assert_eq!(format_quantity(1536), "1536");
        assert_eq!(format_quantity(1000), "1000");
    }
}
