//! Byte-range algebra: half-open byte ranges, normalized range sets, and chunk geometry.
//!
//! Owns how changed/allocated extents (as CSI reports them) become the set of chunks a backup
//! must read. Everything is in bytes, half-open `[start, end)`, `u64`. A [`RangeSet`] is always
//! normalized (sorted, no empty ranges, overlapping or touching ranges merged), so equality of
//! sets is equality of their vectors and every operation is linear in the number of ranges.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;

/// A non-empty half-open byte range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawByteRange")]
pub struct ByteRange {
    start: u64,
    end: u64,
}

/// The wire form of a [`ByteRange`], validated before it becomes one (an empty or inverted
/// range must not slip in through deserialization).
#[derive(Deserialize)]
struct RawByteRange {
    start: u64,
    end: u64,
}

impl TryFrom<RawByteRange> for ByteRange {
    type Error = CoreError;
    fn try_from(r: RawByteRange) -> Result<Self, CoreError> {
        ByteRange::from_bounds(r.start, r.end)
    }
}

impl ByteRange {
    /// Builds the range `[offset, offset + len)`.
    ///
    /// # Errors
    /// [`CoreError::EmptyRange`] if `len == 0`, [`CoreError::RangeOverflow`] if the end does not
    /// fit in `u64`.
    pub fn new(offset: u64, len: u64) -> Result<Self, CoreError> {
        if len == 0 {
            return Err(CoreError::EmptyRange { offset });
        }
        let end = offset
            .checked_add(len)
            .ok_or(CoreError::RangeOverflow { offset, len })?;
        Ok(ByteRange { start: offset, end })
    }

    /// Builds `[start, end)` from its bounds.
    ///
    /// # Errors
    /// [`CoreError::EmptyRange`] if `end <= start`.
    pub fn from_bounds(start: u64, end: u64) -> Result<Self, CoreError> {
        if end <= start {
            return Err(CoreError::EmptyRange { offset: start });
        }
        Ok(ByteRange { start, end })
    }

    /// Converts a signed CSI extent (`byte_offset`, `size_bytes`), rejecting negatives.
    ///
    /// # Errors
    /// [`CoreError::NegativeExtent`], [`CoreError::EmptyRange`] or [`CoreError::RangeOverflow`].
    pub fn from_signed(offset: i64, len: i64) -> Result<Self, CoreError> {
        if offset < 0 || len < 0 {
            return Err(CoreError::NegativeExtent { offset, len });
        }
        // Both are non-negative, so the casts are exact.
        ByteRange::new(offset as u64, len as u64)
    }

    /// First byte of the range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte of the range.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Number of bytes in the range (always > 0).
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: a `ByteRange` is never empty; present for API symmetry with collections.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `offset` lies inside the range.
    pub fn contains(&self, offset: u64) -> bool {
        self.start <= offset && offset < self.end
    }

    /// The range as a `std::ops::Range`.
    pub fn as_range(&self) -> Range<u64> {
        self.start..self.end
    }

    /// The overlap of two ranges, if any.
    pub fn intersect(&self, other: &ByteRange) -> Option<ByteRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(ByteRange { start, end })
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

/// A normalized set of bytes: sorted, disjoint, non-touching [`ByteRange`]s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<ByteRange>", into = "Vec<ByteRange>")]
pub struct RangeSet {
    ranges: Vec<ByteRange>,
}

impl TryFrom<Vec<ByteRange>> for RangeSet {
    type Error = CoreError;
    fn try_from(v: Vec<ByteRange>) -> Result<Self, CoreError> {
        // Every element was validated when it was deserialized; hand-written input may still
        // be unsorted or overlapping, so normalize.
        Ok(RangeSet::from_ranges(v))
    }
}

impl From<RangeSet> for Vec<ByteRange> {
    fn from(s: RangeSet) -> Self {
        s.ranges
    }
}

impl FromIterator<ByteRange> for RangeSet {
    fn from_iter<I: IntoIterator<Item = ByteRange>>(iter: I) -> Self {
        RangeSet::from_ranges(iter)
    }
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        RangeSet::default()
    }

    /// Normalizes arbitrary (unsorted, overlapping, touching) ranges into a set.
    pub fn from_ranges<I: IntoIterator<Item = ByteRange>>(iter: I) -> Self {
        let mut v: Vec<ByteRange> = iter.into_iter().collect();
        v.sort_unstable();
        let mut out: Vec<ByteRange> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        RangeSet { ranges: out }
    }

    /// Builds a set from `(offset, len)` extents, validating each one.
    ///
    /// # Errors
    /// The first extent with `len == 0` or an overflowing end, with its offset.
    pub fn try_from_extents<I: IntoIterator<Item = (u64, u64)>>(
        iter: I,
    ) -> Result<Self, CoreError> {
        let ranges = iter
            .into_iter()
            .map(|(o, l)| ByteRange::new(o, l))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RangeSet::from_ranges(ranges))
    }

    /// Builds a set from signed `(byte_offset, size_bytes)` extents as the CSI API sends them.
    ///
    /// # Errors
    /// The first negative, empty or overflowing extent.
    pub fn try_from_signed_extents<I: IntoIterator<Item = (i64, i64)>>(
        iter: I,
    ) -> Result<Self, CoreError> {
        let ranges = iter
            .into_iter()
            .map(|(o, l)| ByteRange::from_signed(o, l))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RangeSet::from_ranges(ranges))
    }

    /// The single range `[0, size)`, or the empty set when `size == 0`.
    pub fn full(size: u64) -> Self {
        match ByteRange::from_bounds(0, size) {
            Ok(r) => RangeSet { ranges: vec![r] },
            Err(_) => RangeSet::new(),
        }
    }

    /// Adds one range, merging as needed.
    pub fn insert(&mut self, r: ByteRange) {
        // Find the first range that ends at or after r.start (it may touch r).
        let lo = self.ranges.partition_point(|x| x.end < r.start);
        let hi = self.ranges.partition_point(|x| x.start <= r.end);
        if lo == hi {
            self.ranges.insert(lo, r);
            return;
        }
        let start = r.start.min(self.ranges[lo].start);
        let end = r.end.max(self.ranges[hi - 1].end);
        self.ranges
            .splice(lo..hi, std::iter::once(ByteRange { start, end }));
    }

    /// The normalized ranges, in ascending order.
    pub fn ranges(&self) -> &[ByteRange] {
        &self.ranges
    }

    /// Iterates the normalized ranges in ascending order.
    pub fn iter(&self) -> std::slice::Iter<'_, ByteRange> {
        self.ranges.iter()
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether the set holds no byte.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Total number of bytes in the set.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(ByteRange::len).sum()
    }

    /// One past the highest byte in the set (0 when empty).
    pub fn end(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r.end)
    }

    /// Whether byte `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= offset);
        self.ranges.get(i).is_some_and(|r| r.contains(offset))
    }

    /// Bytes in either set.
    pub fn union(&self, other: &RangeSet) -> RangeSet {
        RangeSet::from_ranges(self.ranges.iter().chain(other.ranges.iter()).copied())
    }

    /// Bytes in both sets.
    pub fn intersect(&self, other: &RangeSet) -> RangeSet {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (self.ranges[i], other.ranges[j]);
            if let Some(x) = a.intersect(&b) {
                out.push(x);
            }
            if a.end < b.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        // Pieces of normalized inputs are disjoint and non-touching already.
        RangeSet { ranges: out }
    }

    /// Bytes in `self` but not in `other`.
    pub fn subtract(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let mut j = 0;
        for &a in &self.ranges {
            let mut cur = a.start;
            while j < other.ranges.len() && other.ranges[j].end <= cur {
                j += 1;
            }
            let mut k = j;
            while cur < a.end {
                match other.ranges.get(k) {
                    Some(b) if b.start < a.end => {
                        if b.start > cur {
                            out.push(ByteRange {
                                start: cur,
                                end: b.start,
                            });
                        }
                        cur = cur.max(b.end);
                        k += 1;
                    }
                    _ => {
                        out.push(ByteRange {
                            start: cur,
                            end: a.end,
                        });
                        cur = a.end;
                    }
                }
            }
        }
        RangeSet { ranges: out }
    }

    /// The part of the set below `volume_size` (ranges past the end are cut off).
    pub fn clip(&self, volume_size: u64) -> RangeSet {
        self.intersect(&RangeSet::full(volume_size))
    }

    /// Checks that every byte lies below `volume_size`.
    ///
    /// # Errors
    /// [`CoreError::RangePastEnd`] naming the first offending range.
    pub fn check_within(&self, volume_size: u64) -> Result<(), CoreError> {
        match self.ranges.iter().find(|r| r.end > volume_size) {
            Some(r) => Err(CoreError::RangePastEnd {
                start: r.start,
                end: r.end,
                volume_size,
            }),
            None => Ok(()),
        }
    }

    /// The chunks of `geometry` touched by any byte of the set (clipped to the volume).
    pub fn chunks(&self, geometry: &ChunkGeometry) -> ChunkSet {
        let cs = geometry.chunk_size;
        let clipped = self.clip(geometry.volume_size);
        ChunkSet::from_runs(
            clipped
                .ranges
                .iter()
                .map(|r| r.start / cs..r.end.div_ceil(cs)),
        )
    }

    /// The set widened outward to whole chunks of `geometry` (the last chunk may be short).
    pub fn align_out(&self, geometry: &ChunkGeometry) -> RangeSet {
        self.chunks(geometry).to_byte_ranges(geometry)
    }
}

impl<'a> IntoIterator for &'a RangeSet {
    type Item = &'a ByteRange;
    type IntoIter = std::slice::Iter<'a, ByteRange>;
    fn into_iter(self) -> Self::IntoIter {
        self.ranges.iter()
    }
}

/// Smallest chunk size accepted (4 KiB, the usual block-device page).
pub const MIN_CHUNK_SIZE: u64 = 4 * 1024;
/// Largest chunk size accepted (64 MiB).
pub const MAX_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
/// Default chunk size (1 MiB). A changed byte costs its whole chunk, and scattered small
/// writes covering 1% of a volume re-upload about 65 bytes per changed byte at 4 MiB, 25 at
/// 1 MiB and 8 at 256 KiB (see the `cbt_store::engine` docs). Since manifests are segment
/// trees (`crate::maptree`), an incremental's metadata no longer grows with the chunk count,
/// so the smaller chunk costs only a full manifest of about 42 MB per fully allocated TiB and
/// more objects; 256 KiB would cost a file or request per 256 KiB, which halved full-backup
/// throughput on S3 (measured).
pub const DEFAULT_CHUNK_SIZE: u64 = 1024 * 1024;

/// How a volume of `volume_size` bytes is cut into fixed-size chunks (the last may be short).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawGeometry")]
pub struct ChunkGeometry {
    volume_size: u64,
    chunk_size: u64,
}

/// The wire form of a [`ChunkGeometry`]: a chunk size of 0 would divide by zero later, so it
/// is validated on the way in like [`ChunkGeometry::new`] does.
#[derive(Deserialize)]
struct RawGeometry {
    volume_size: u64,
    chunk_size: u64,
}

impl TryFrom<RawGeometry> for ChunkGeometry {
    type Error = CoreError;
    fn try_from(g: RawGeometry) -> Result<Self, CoreError> {
        ChunkGeometry::new(g.volume_size, g.chunk_size)
    }
}

impl ChunkGeometry {
    /// Validates the chunk size (power of two in [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`]).
    ///
    /// # Errors
    /// [`CoreError::InvalidChunkSize`].
    pub fn new(volume_size: u64, chunk_size: u64) -> Result<Self, CoreError> {
        validate_chunk_size(chunk_size)?;
        Ok(ChunkGeometry {
            volume_size,
            chunk_size,
        })
    }

    /// Size of the volume in bytes.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Size of a full chunk in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks covering the volume.
    pub fn chunk_count(&self) -> u64 {
        self.volume_size.div_ceil(self.chunk_size)
    }

    /// Byte offset where chunk `index` starts.
    pub fn chunk_offset(&self, index: u64) -> u64 {
        index.saturating_mul(self.chunk_size)
    }

    /// Length of chunk `index` in bytes (0 if the index is past the end).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = self.chunk_offset(index);
        self.volume_size.saturating_sub(start).min(self.chunk_size)
    }

    /// The bytes of chunk `index`.
    ///
    /// # Errors
    /// [`CoreError::ChunkIndexOutOfRange`] if the index is past the end.
    pub fn chunk_range(&self, index: u64) -> Result<ByteRange, CoreError> {
        ByteRange::new(self.chunk_offset(index), self.chunk_len(index)).map_err(|_| {
            CoreError::ChunkIndexOutOfRange {
                index,
                chunk_count: self.chunk_count(),
            }
        })
    }
}

/// Checks that `size` is a power of two within the supported chunk-size bounds.
///
/// # Errors
/// [`CoreError::InvalidChunkSize`].
pub fn validate_chunk_size(size: u64) -> Result<(), CoreError> {
    if !size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size) {
        return Err(CoreError::InvalidChunkSize {
            size,
            min: MIN_CHUNK_SIZE,
            max: MAX_CHUNK_SIZE,
        });
    }
    Ok(())
}

/// A normalized set of chunk indices stored as sorted, disjoint, non-touching runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ChunkSet {
    runs: Vec<Range<u64>>,
}

impl ChunkSet {
    /// The empty set.
    pub fn new() -> Self {
        ChunkSet::default()
    }

    /// Normalizes arbitrary index runs (empty runs are ignored).
    pub fn from_runs<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut v: Vec<Range<u64>> = iter.into_iter().filter(|r| r.start < r.end).collect();
        v.sort_unstable_by_key(|r| (r.start, r.end));
        let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        ChunkSet { runs: out }
    }

    /// Builds a set from individual indices.
    pub fn from_indices<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        ChunkSet::from_runs(iter.into_iter().filter_map(|i| Some(i..i.checked_add(1)?)))
    }

    /// The runs, ascending.
    pub fn runs(&self) -> &[Range<u64>] {
        &self.runs
    }

    /// Number of chunk indices in the set.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether no index is in the set.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether `index` is in the set.
    pub fn contains(&self, index: u64) -> bool {
        let i = self.runs.partition_point(|r| r.end <= index);
        self.runs.get(i).is_some_and(|r| r.contains(&index))
    }

    /// Indices in either set.
    pub fn union(&self, other: &ChunkSet) -> ChunkSet {
        ChunkSet::from_runs(self.runs.iter().chain(other.runs.iter()).cloned())
    }

    /// Iterates every index in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|r| r.clone())
    }

    /// The bytes these chunks cover in `geometry` (indices past the end are dropped).
    pub fn to_byte_ranges(&self, geometry: &ChunkGeometry) -> RangeSet {
        let count = geometry.chunk_count();
        RangeSet::from_ranges(self.runs.iter().filter_map(|r| {
            let end_idx = r.end.min(count);
            let start = geometry.chunk_offset(r.start);
            let end = geometry.chunk_offset(end_idx).min(geometry.volume_size);
            ByteRange::from_bounds(start, end).ok()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[(u64, u64)]) -> RangeSet {
        RangeSet::try_from_extents(v.iter().copied()).unwrap()
    }

    #[test]
    fn construction_validates_and_normalizes() {
        assert_eq!(
            ByteRange::new(5, 0),
            Err(CoreError::EmptyRange { offset: 5 })
        );
        assert_eq!(
            ByteRange::new(u64::MAX, 2),
            Err(CoreError::RangeOverflow {
                offset: u64::MAX,
                len: 2
            })
        );
        assert!(matches!(
            ByteRange::from_signed(-1, 4),
            Err(CoreError::NegativeExtent { .. })
        ));
        let s = set(&[(10, 5), (0, 4), (4, 2), (12, 10)]);
        assert_eq!(s.ranges(), set(&[(0, 6), (10, 12)]).ranges());
        assert_eq!(s.total_bytes(), 18);
        assert!(RangeSet::try_from_extents([(0, 1), (3, 0)]).is_err());
    }

    #[test]
    fn algebra_examples() {
        let a = set(&[(0, 10), (20, 10)]);
        let b = set(&[(5, 20)]);
        assert_eq!(a.union(&b), set(&[(0, 30)]));
        assert_eq!(a.intersect(&b), set(&[(5, 5), (20, 5)]));
        assert_eq!(a.subtract(&b), set(&[(0, 5), (25, 5)]));
        assert_eq!(a.clip(22), set(&[(0, 10), (20, 2)]));
        assert!(matches!(
            a.check_within(29),
            Err(CoreError::RangePastEnd {
                start: 20,
                end: 30,
                volume_size: 29
            })
        ));
        let mut c = set(&[(0, 2), (10, 2)]);
        c.insert(ByteRange::new(2, 8).unwrap());
        assert_eq!(c, set(&[(0, 12)]));
    }

    #[test]
    fn chunk_alignment_handles_short_last_chunk() {
        let g = ChunkGeometry::new(10_000, 4096).unwrap();
        assert_eq!(g.chunk_count(), 3);
        assert_eq!(g.chunk_len(2), 10_000 - 8192);
        let s = set(&[(4095, 2), (9000, 5000)]);
        assert_eq!(s.chunks(&g).iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(s.align_out(&g), set(&[(0, 10_000)]));
        assert!(ChunkGeometry::new(1, 1000).is_err());
        assert!(g.chunk_range(3).is_err());
    }
}
