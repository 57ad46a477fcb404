//! Resource quantities ("10Gi", "1.5G", "500M") to and from byte counts.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::Error;

fn invalid(q: &str, reason: &str) -> Error {
    Error::InvalidInput {
        what: format!("quantity {q:?}"),
        reason: reason.to_string(),
    }
}

/// Parses a quantity into bytes, rounding fractional bytes up.
///
/// # Errors
/// Negative, malformed or overflowing quantities.
pub fn to_bytes(q: &Quantity) -> Result<u64, Error> {
    let s = q.0.trim();
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    if num.is_empty() {
        return Err(invalid(s, "expected a number"));
    }
    let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
    if frac_part.contains('.') {
        return Err(invalid(s, "more than one decimal point"));
    }
    let digits = format!("{int_part}{frac_part}");
    let mut numer: u128 = digits
        .parse()
        .map_err(|_| invalid(s, "number out of range"))?;
    let mut denom: u128 = 10u128
        .checked_pow(u32::try_from(frac_part.len()).unwrap_or(u32::MAX))
        .ok_or_else(|| invalid(s, "too many decimals"))?;
    let (mult, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1_000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        other => {
            let exp = other
                .strip_prefix('e')
                .or_else(|| other.strip_prefix('E'))
                .and_then(|e| e.parse::<u32>().ok())
                .ok_or_else(|| invalid(s, "unknown suffix"))?;
            (
                10u128
                    .checked_pow(exp)
                    .ok_or_else(|| invalid(s, "exponent too large"))?,
                1,
            )
        }
    };
    numer = numer
        .checked_mul(mult)
        .ok_or_else(|| invalid(s, "too large"))?;
    denom = denom
        .checked_mul(div)
        .ok_or_else(|| invalid(s, "too small"))?;
    let bytes = numer.div_ceil(denom);
    u64::try_from(bytes).map_err(|_| invalid(s, "too large"))
}

/// Formats bytes as the canonical quantity: the largest exact binary suffix, else plain bytes.
pub fn from_bytes(bytes: u64) -> Quantity {
    const UNITS: [(&str, u64); 6] = [
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    if bytes > 0 {
        for (suffix, unit) in UNITS {
            if bytes.is_multiple_of(unit) {
                return Quantity(format!("{}{suffix}", bytes / unit));
            }
        }
    }
    Quantity(bytes.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn b(s: &str) -> Result<u64, Error> {
        to_bytes(&Quantity(s.to_string()))
    }

    #[test]
    fn parses_and_formats() {
        assert_eq!(b("10Gi").unwrap(), 10 << 30);
        assert_eq!(b("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(b("2G").unwrap(), 2_000_000_000);
        assert_eq!(b("1e3").unwrap(), 1000);
        assert_eq!(b("1500m").unwrap(), 2);
        assert_eq!(b("123").unwrap(), 123);
        assert!(b("-1Gi").is_err());
        assert!(b("1Zi").is_err());
        assert!(b("").is_err());
        assert!(b("99999999999Ei").is_err());
        assert_eq!(from_bytes(3 << 30).0, "3Gi");
        assert_eq!(from_bytes(1536).0, "1536");
        assert_eq!(from_bytes(0).0, "0");
        for v in [1u64, 1024, 5 << 20, 7 << 40, 12345] {
            assert_eq!(to_bytes(&from_bytes(v)).unwrap(), v);
        }
    }
}
