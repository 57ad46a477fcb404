//! Result types of a metadata call: byte extents, the block-metadata type and the totals a
//! caller prints or feeds to the backup engine. Conversion into cbt-core's range set lives here
//! and nowhere else.

use serde::Serialize;

/// How a driver describes ranges: equal-size blocks or extents of any size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BlockType {
    /// Every tuple of the stream has the same `size_bytes` (the last one may end at capacity).
    FixedLength,
    /// Tuples are extents of any positive size.
    VariableLength,
}

impl BlockType {
    /// Maps the wire enum value (same numbers in both APIs); `None` for UNKNOWN or unknown values.
    pub fn from_wire(v: i32) -> Option<Self> {
        match v {
            1 => Some(Self::FixedLength),
            2 => Some(Self::VariableLength),
            _ => None,
        }
    }

    /// The wire enum value (same numbers in both APIs).
    pub fn to_wire(self) -> i32 {
        match self {
            Self::FixedLength => 1,
            Self::VariableLength => 2,
        }
    }

    /// Upper-case protocol name, as printed by tools.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FixedLength => "FIXED_LENGTH",
            Self::VariableLength => "VARIABLE_LENGTH",
        }
    }
}

impl std::fmt::Display for BlockType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A half-open byte range `[offset, offset + len)` of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Extent {
    /// First byte of the range.
    pub offset: u64,
    /// Number of bytes (always > 0 in results).
    pub len: u64,
}

impl Extent {
    /// Builds an extent from its start and length.
    pub fn new(offset: u64, len: u64) -> Self {
        Self { offset, len }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Totals of one metadata call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetadataSummary {
    /// Volume size reported by the service; `None` if the stream carried no message at all (a
    /// driver may answer "nothing allocated/changed" that way), so the size is unknown, not 0.
    pub volume_capacity_bytes: Option<u64>,
    /// Block-metadata type reported by the service (`None` if the stream carried no message).
    pub block_type: Option<BlockType>,
    /// Size of a FIXED_LENGTH block, taken from the first full tuple.
    pub block_size: Option<u64>,
    /// Disjoint, merged ranges after normalization.
    pub ranges: u64,
    /// Bytes covered by those ranges.
    pub bytes: u64,
    /// Tuples as received on the wire, over all attempts.
    pub tuples_received: u64,
    /// Response messages received, over all attempts.
    pub messages: u64,
    /// Stream attempts (1 + resumes).
    pub attempts: u32,
    /// Tuples that arrived out of order relative to earlier ones (sloppy driver).
    pub out_of_order_tuples: u64,
}

/// The collected answer of a metadata call: sorted, disjoint, merged extents plus totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetadataResult {
    /// Sorted, disjoint extents; touching extents are merged.
    pub extents: Vec<Extent>,
    /// Totals.
    pub summary: MetadataSummary,
}

impl MetadataResult {
    /// The extents as cbt-core's range set, the type the backup engine consumes.
    pub fn to_range_set(&self) -> cbt_core::RangeSet {
        extents_to_range_set(&self.extents)
    }
}

/// The one place that converts this crate's extents into cbt-core's range set.
pub fn extents_to_range_set(extents: &[Extent]) -> cbt_core::RangeSet {
    // Result extents are never empty, so `ByteRange::new` only rejects what cannot occur.
    cbt_core::RangeSet::from_ranges(
        extents
            .iter()
            .filter_map(|e| cbt_core::ByteRange::new(e.offset, e.len).ok()),
    )
}

/// Sorts and merges overlapping or touching extents in place; zero-length extents are dropped.
pub fn merge_extents(v: &mut Vec<Extent>) {
    v.retain(|e| e.len > 0);
    v.sort_unstable();
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v.drain(..) {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                let end = last.end().max(e.end());
                last.len = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    *v = out;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn merge_sorts_and_coalesces() {
        let mut v = vec![
            Extent::new(100, 10),
            Extent::new(0, 10),
            Extent::new(5, 10),
            Extent::new(15, 5),
            Extent::new(50, 0),
            Extent::new(105, 1),
        ];
        merge_extents(&mut v);
        assert_eq!(v, vec![Extent::new(0, 20), Extent::new(100, 10)]);
    }
}
