//! Manifest format 2: the chunk map as a tree of fixed-range, content-named segments.
//!
//! Owns the segment model ([`SegmentPos`], [`SegmentRef`], [`TreeShape`]), the binary
//! encoding of segments, their validation on read, the streaming builder ([`TreeWriter`]) and
//! the incremental derivation ([`derive_tree`]). It performs no I/O and does not know how
//! segments are named or stored (the repository injects the naming function and does the
//! reads and writes).
//!
//! # Shape
//! A *leaf* (level 0) covers the [`LEAF_SPAN`] chunk indices `[k·128, (k+1)·128)` and lists
//! the stored chunks among them. A *node* of level `l ≥ 1` covers `128·128^l` indices and
//! lists its non-empty children (each covering `128·128^(l-1)` indices), at most [`FANOUT`].
//! The root is the single node at the smallest level whose span covers the whole volume
//! ([`TreeShape::root_level`]); the manifest head records only the root's [`SegmentRef`]. A
//! segment's range is fixed by its position, never by its content: an incremental rewrites
//! exactly the leaves whose range holds a changed chunk and the nodes on their paths, and
//! shares every other segment with its parent by name. An empty range (all zero or
//! unallocated chunks) has no segment at all: its slot is simply absent from its parent.
//!
//! # Encoding (little-endian, version [`SEGMENT_FORMAT_VERSION`])
//! ```text
//! "CBTS" | version u8 | level u8 | first_index u64 | count varint (1..=128)
//! leaf entry:  slot gap varint | content hash [32] | stored_size varint | crc32c u32
//! node entry:  slot gap varint | segment name [32] | encoded len varint | stored varint
//! ```
//! `slot gap` is the distance to the previous entry's slot minus one (the first entry's slot
//! itself), so slots strictly increase by construction. A leaf entry's raw length is not stored:
//! the geometry gives it. `stored` is the number of stored chunks under the child; a reader
//! checks every node's counts against what it loads. Varints are LEB128 (at most 10 bytes).
//! A segment is named by the BLAKE3 hash of its encoded bytes (keyed like chunk names in an
//! encrypted repository), so reading it back checks its content end to end.
//!
//! # Size (the maths)
//! * Leaf entry: 1 (slot gap) + 32 (hash) + 3 (stored size of a chunk up to 2 MiB; 4 up to
//!   256 MiB) + 4 (crc32c) = **40 bytes**; a full leaf is 16 + 128·40 = **5,136 bytes**.
//! * Node entry: 1 + 32 + 2 (len ≤ 8,192) + up to 4 (stored count < 2^28) = **≤ 39 bytes**;
//!   a full node is **≤ 5,008 bytes**. Every segment is at most [`MAX_SEGMENT_LEN`] (8 KiB,
//!   the bound every read is held to, whatever the entries hold).
//! * Full manifest: about 40.1 bytes per stored chunk (leaves) + 0.3 (nodes). A fully
//!   allocated 1 TiB volume: at 1 MiB chunks 1,048,576 entries = 8,192 leaves + 64 nodes +
//!   1 root ≈ **42.4 MB** (v1 JSON: ~105 MB before, ~50 MB after zstd); at 256 KiB chunks
//!   4,194,304 entries = 32,768 leaves + 256 + 2 + 1 nodes ≈ **169.6 MB**. Segments are not
//!   compressed: hashes do not compress.
//! * Depth: the root level is 2 for 1 TiB at 1 MiB (2,097,152 indices per level-2 node; the
//!   root has 64 children, 2.5 KB) and 3 at 256 KiB (268,435,456 per level-3 node; the root
//!   has 2 children), so a changed chunk rewrites one leaf, one level-1 node and what is above:
//!   **≤ 12.7 KB (1 MiB) / ≤ 15.3 KB (256 KiB)** for the first change, ≤ 10.2 KB for each
//!   further one in another level-1 range, whatever else the volume holds.
//! * Incremental touching 100 scattered places (0.01% of 1 TiB): at most 100 leaves plus the
//!   distinct nodes on their paths. Worst case, no two in one level-1 range: 100·(5,136 +
//!   5,008) + 2.5 KB ≈ **1.02 MB** at 1 MiB; 100·(5,136 + 5,008) + 2·5,008 + 0.1 KB ≈
//!   **1.03 MB** at 256 KiB, written, and the same read from the parent (its versions of the
//!   same segments), plus a head of a few hundred bytes (at most
//!   [`crate::manifest::MAX_HEAD_JSON`]). Both under the 2 MB budget, and independent of the
//!   volume size except through the depth (one more node per path per 128× growth).
//!   [`max_incremental_segment_bytes`] is the bound as code (one full segment per level per
//!   leaf).
//!
//! # Trust
//! Segments come from storage and are hostile until checked: [`decode_segment`] is given the
//! position and reference its parent recorded and refuses anything else: a length other than
//! the recorded one or above [`MAX_SEGMENT_LEN`], another level or first index, slots outside
//! the span or past the volume's last chunk, stored sizes no chunk object can have, counts
//! that do not add up, trailing bytes. All arithmetic is checked.

use std::collections::BTreeMap;

use crate::error::CoreError;
use crate::manifest::{ChunkHash, ChunkRef, ChunkState, MAX_CHUNK_FRAMING};
use crate::ranges::ChunkGeometry;

/// Chunk indices covered by one leaf segment.
pub const LEAF_SPAN: u64 = 128;
/// Children of one node segment.
pub const FANOUT: u64 = 128;
/// Segment encoding version written and read by this build.
pub const SEGMENT_FORMAT_VERSION: u8 = 1;
/// Largest encoded segment (leaf or node) this build writes or reads.
pub const MAX_SEGMENT_LEN: u64 = 8192;
/// Bytes before the first entry, at most: magic, version, level, first index, count.
const HEADER_LEN: usize = 4 + 1 + 1 + 8 + 2;
const MAGIC: [u8; 4] = *b"CBTS";
/// Deepest tree: 128·128^7 = 2^56 indices covers any volume of 4 KiB chunks.
const MAX_LEVEL: u8 = 7;

/// Where a segment sits: its level (0 = leaf) and the first chunk index it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentPos {
    /// 0 for a leaf, `l` for a node whose children have level `l - 1`.
    pub level: u8,
    /// First chunk index of the range (a multiple of the level's span).
    pub first: u64,
}

/// A reference to a stored segment, as its parent (or the manifest head) records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentRef {
    /// Object name: hash of the encoded bytes (keyed in an encrypted repository).
    pub name: ChunkHash,
    /// Length of the encoded (plain) segment in bytes.
    pub len: u32,
    /// Stored (non-zero) chunks under it.
    pub stored: u64,
}

/// The tree shape of one volume geometry: chunk count and root level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeShape {
    geometry: ChunkGeometry,
    root_level: u8,
}

/// Chunk indices covered by one segment of `level` (saturating at `u64::MAX`).
pub fn span(level: u8) -> u64 {
    let mut s = LEAF_SPAN;
    for _ in 0..level {
        s = s.saturating_mul(FANOUT);
    }
    s
}

impl TreeShape {
    /// The shape of a volume of `geometry`.
    pub fn new(geometry: ChunkGeometry) -> Self {
        let count = geometry.chunk_count();
        let mut root_level = 0;
        while span(root_level) < count && root_level < MAX_LEVEL {
            root_level += 1;
        }
        TreeShape {
            geometry,
            root_level,
        }
    }

    /// The volume geometry.
    pub fn geometry(&self) -> &ChunkGeometry {
        &self.geometry
    }

    /// Level of the root segment.
    pub fn root_level(&self) -> u8 {
        self.root_level
    }

    /// Position of the root segment.
    pub fn root_pos(&self) -> SegmentPos {
        SegmentPos {
            level: self.root_level,
            first: 0,
        }
    }

    /// Position of child `slot` of the node at `pos`, if it lies inside the volume.
    pub fn child_pos(&self, pos: SegmentPos, slot: u64) -> Option<SegmentPos> {
        if pos.level == 0 || slot >= FANOUT {
            return None;
        }
        let first = slot
            .checked_mul(span(pos.level - 1))?
            .checked_add(pos.first)?;
        (first < self.geometry.chunk_count()).then_some(SegmentPos {
            level: pos.level - 1,
            first,
        })
    }

    /// Position of the segment of `level` covering chunk `index`.
    pub fn pos_of(&self, level: u8, index: u64) -> SegmentPos {
        let s = span(level);
        SegmentPos {
            level,
            first: index / s * s,
        }
    }
}

/// Upper bound of the segment bytes an incremental writes (and reads from its parent) when
/// its changes touch `touched_leaves` leaves: one full segment per level on each path (the
/// bound of the module docs, as code). The head adds its own size (at most
/// [`crate::manifest::MAX_HEAD_JSON`], a few hundred bytes without long labels).
pub fn max_incremental_segment_bytes(shape: &TreeShape, touched_leaves: u64) -> u64 {
    let per_leaf = MAX_SEGMENT_LEN.saturating_mul(u64::from(shape.root_level()) + 1);
    touched_leaves.saturating_mul(per_leaf)
}

/// One decoded segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Stored chunks of a leaf, ascending by index.
    Leaf(Vec<(u64, ChunkRef)>),
    /// Non-empty children of a node, ascending by position.
    Node(Vec<(SegmentPos, SegmentRef)>),
}

/// An encoded segment ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSegment {
    /// Its position in the tree.
    pub pos: SegmentPos,
    /// Its reference (name, length, stored count).
    pub seg: SegmentRef,
    /// The bytes to store (before sealing).
    pub bytes: Vec<u8>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn header(out: &mut Vec<u8>, pos: SegmentPos, count: usize) {
    out.extend_from_slice(&MAGIC);
    out.push(SEGMENT_FORMAT_VERSION);
    out.push(pos.level);
    out.extend_from_slice(&pos.first.to_le_bytes());
    put_varint(out, count as u64);
}

/// Encodes a leaf. `entries` must be non-empty, ascending and inside the leaf's range (the
/// writer and [`derive_tree`] guarantee it).
fn encode_leaf(pos: SegmentPos, entries: &[(u64, ChunkRef)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * 44);
    header(&mut out, pos, entries.len());
    let mut next = pos.first;
    for (index, r) in entries {
        put_varint(&mut out, index - next);
        next = index + 1;
        out.extend_from_slice(&r.hash.0);
        put_varint(&mut out, r.stored_size);
        out.extend_from_slice(&r.crc32c.to_le_bytes());
    }
    out
}

fn encode_node(pos: SegmentPos, children: &[(SegmentPos, SegmentRef)]) -> Vec<u8> {
    let child_span = span(pos.level - 1);
    let mut out = Vec::with_capacity(HEADER_LEN + children.len() * 44);
    header(&mut out, pos, children.len());
    let mut next = 0;
    for (p, r) in children {
        let slot = (p.first - pos.first) / child_span;
        put_varint(&mut out, slot - next);
        next = slot + 1;
        out.extend_from_slice(&r.name.0);
        put_varint(&mut out, u64::from(r.len));
        put_varint(&mut out, r.stored);
    }
    out
}

/// A cursor over untrusted bytes whose every read is checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return None;
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

/// Decodes and validates the segment at `pos` that its parent recorded as `expected`.
/// The caller has already checked the name against the bytes.
///
/// # Errors
/// [`CoreError::SegmentInvalid`] naming the position and the first check that failed;
/// [`CoreError::StoredSizeOutOfBounds`] for a stored size no chunk object can have.
pub fn decode_segment(
    bytes: &[u8],
    shape: &TreeShape,
    pos: SegmentPos,
    expected: &SegmentRef,
) -> Result<Segment, CoreError> {
    let bad = |reason: String| CoreError::SegmentInvalid {
        level: pos.level,
        first_index: pos.first,
        reason,
    };
    let truncated = || bad("truncated".into());
    if bytes.len() as u64 > MAX_SEGMENT_LEN {
        return Err(bad(format!(
            "{} bytes, more than the {MAX_SEGMENT_LEN} any segment can need",
            bytes.len()
        )));
    }
    if bytes.len() as u64 != u64::from(expected.len) {
        return Err(bad(format!(
            "{} bytes where its parent records {}",
            bytes.len(),
            expected.len
        )));
    }
    let mut r = Reader { bytes, at: 0 };
    if r.take(4).ok_or_else(truncated)? != MAGIC {
        return Err(bad("not a segment (bad magic)".into()));
    }
    let version = r.u8().ok_or_else(truncated)?;
    if version != SEGMENT_FORMAT_VERSION {
        return Err(CoreError::UnsupportedSegmentVersion {
            found: version,
            supported: SEGMENT_FORMAT_VERSION,
        });
    }
    let level = r.u8().ok_or_else(truncated)?;
    let mut first = [0u8; 8];
    first.copy_from_slice(r.take(8).ok_or_else(truncated)?);
    let first = u64::from_le_bytes(first);
    if level != pos.level || first != pos.first {
        return Err(bad(format!(
            "declares level {level} at index {first}, but sits at level {} index {}",
            pos.level, pos.first
        )));
    }
    let count = r.varint().ok_or_else(truncated)?;
    let limit = if level == 0 { LEAF_SPAN } else { FANOUT };
    if count == 0 || count > limit {
        return Err(bad(format!("{count} entries (must be 1..={limit})")));
    }
    let chunk_count = shape.geometry().chunk_count();
    let mut next_slot: u64 = 0;
    let mut slot_of = |r: &mut Reader<'_>| -> Result<u64, CoreError> {
        let gap = r.varint().ok_or_else(truncated)?;
        let slot = next_slot
            .checked_add(gap)
            .filter(|s| *s < limit)
            .ok_or_else(|| bad(format!("slot past {limit}")))?;
        next_slot = slot + 1;
        Ok(slot)
    };
    let seg = if level == 0 {
        let g = shape.geometry();
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let slot = slot_of(&mut r)?;
            // Checked: the position is the caller's, and a caller may be wrong too.
            let index = first.saturating_add(slot);
            if index >= chunk_count {
                return Err(bad(format!(
                    "chunk index {index} past the volume's {chunk_count} chunks"
                )));
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(r.take(32).ok_or_else(truncated)?);
            let stored_size = r.varint().ok_or_else(truncated)?;
            let mut crc = [0u8; 4];
            crc.copy_from_slice(r.take(4).ok_or_else(truncated)?);
            let raw_len = g.chunk_len(index);
            let max = raw_len + MAX_CHUNK_FRAMING;
            if stored_size == 0 || stored_size > max {
                return Err(CoreError::StoredSizeOutOfBounds {
                    index,
                    stored_size,
                    raw_len,
                    max,
                });
            }
            entries.push((
                index,
                ChunkRef {
                    hash: ChunkHash(hash),
                    stored_size,
                    crc32c: u32::from_le_bytes(crc),
                    raw_len,
                },
            ));
        }
        if count != expected.stored {
            return Err(bad(format!(
                "holds {count} chunks where its parent records {}",
                expected.stored
            )));
        }
        Segment::Leaf(entries)
    } else {
        let mut children = Vec::with_capacity(count as usize);
        let mut total: u64 = 0;
        for _ in 0..count {
            let slot = slot_of(&mut r)?;
            let child = shape
                .child_pos(pos, slot)
                .ok_or_else(|| bad(format!("child {slot} lies past the end of the volume")))?;
            let mut name = [0u8; 32];
            name.copy_from_slice(r.take(32).ok_or_else(truncated)?);
            let len = r.varint().ok_or_else(truncated)?;
            let stored = r.varint().ok_or_else(truncated)?;
            if len == 0 || len > MAX_SEGMENT_LEN {
                return Err(bad(format!("child {slot} has length {len}")));
            }
            let max_stored = span(child.level).min(chunk_count - child.first);
            if stored == 0 || stored > max_stored {
                return Err(bad(format!(
                    "child {slot} claims {stored} stored chunks (must be 1..={max_stored})"
                )));
            }
            total = total
                .checked_add(stored)
                .ok_or_else(|| bad("stored count overflows".into()))?;
            children.push((
                child,
                SegmentRef {
                    name: ChunkHash(name),
                    len: len as u32,
                    stored,
                },
            ));
        }
        if total != expected.stored {
            return Err(bad(format!(
                "children hold {total} chunks where its parent records {}",
                expected.stored
            )));
        }
        Segment::Node(children)
    };
    if r.at != bytes.len() {
        return Err(bad(format!("{} trailing bytes", bytes.len() - r.at)));
    }
    Ok(seg)
}

/// A node being filled by [`TreeWriter`]: its position and the children so far.
type OpenNode = (SegmentPos, Vec<(SegmentPos, SegmentRef)>);

/// Builds the segment tree of a chunk map from its stored chunks in ascending index order,
/// holding one open segment per level (at most `(root level + 1) · 128` entries) whatever the
/// volume size. Finished segments are handed out by [`TreeWriter::take_finished`].
pub struct TreeWriter<'a> {
    shape: TreeShape,
    namer: &'a (dyn Fn(&[u8]) -> ChunkHash + Sync),
    leaf: Option<(SegmentPos, Vec<(u64, ChunkRef)>)>,
    /// `nodes[l - 1]`: the open node of level `l`.
    nodes: Vec<Option<OpenNode>>,
    last: Option<u64>,
    root: Option<SegmentRef>,
    finished: Vec<EncodedSegment>,
}

impl<'a> TreeWriter<'a> {
    /// A writer for a volume of `shape`; `namer` names a segment by its encoded bytes.
    pub fn new(shape: TreeShape, namer: &'a (dyn Fn(&[u8]) -> ChunkHash + Sync)) -> Self {
        TreeWriter {
            shape,
            namer,
            leaf: None,
            nodes: vec![None; usize::from(shape.root_level())],
            last: None,
            root: None,
            finished: Vec::new(),
        }
    }

    /// Adds stored chunk `index` (ascending, each once).
    ///
    /// # Errors
    /// [`CoreError::ChunkIndexOutOfRange`], [`CoreError::ChunkLengthMismatch`], or
    /// [`CoreError::ManifestInvalid`] for an index not above the previous one.
    pub fn push(&mut self, index: u64, r: ChunkRef) -> Result<(), CoreError> {
        let g = *self.shape.geometry();
        if index >= g.chunk_count() {
            return Err(CoreError::ChunkIndexOutOfRange {
                index,
                chunk_count: g.chunk_count(),
            });
        }
        if r.raw_len != g.chunk_len(index) {
            return Err(CoreError::ChunkLengthMismatch {
                index,
                raw_len: r.raw_len,
                expected: g.chunk_len(index),
            });
        }
        if self.last.is_some_and(|l| index <= l) {
            return Err(CoreError::ManifestInvalid {
                reason: format!("chunk {index} added out of order"),
            });
        }
        self.last = Some(index);
        let pos = self.shape.pos_of(0, index);
        if self.leaf.as_ref().is_some_and(|(p, _)| *p != pos) {
            self.close_leaf();
        }
        self.leaf
            .get_or_insert_with(|| (pos, Vec::new()))
            .1
            .push((index, r));
        Ok(())
    }

    fn emit(&mut self, pos: SegmentPos, bytes: Vec<u8>, stored: u64) -> SegmentRef {
        let seg = SegmentRef {
            name: (self.namer)(&bytes),
            len: bytes.len() as u32,
            stored,
        };
        self.finished.push(EncodedSegment { pos, seg, bytes });
        seg
    }

    fn close_leaf(&mut self) {
        if let Some((pos, entries)) = self.leaf.take() {
            let bytes = encode_leaf(pos, &entries);
            let seg = self.emit(pos, bytes, entries.len() as u64);
            self.add_child(pos, seg);
        }
    }

    fn add_child(&mut self, child: SegmentPos, seg: SegmentRef) {
        let level = child.level + 1;
        if level > self.shape.root_level() {
            self.root = Some(seg);
            return;
        }
        let pos = self.shape.pos_of(level, child.first);
        let slot = usize::from(level - 1);
        if self.nodes[slot].as_ref().is_some_and(|(p, _)| *p != pos) {
            self.close_node(slot);
        }
        self.nodes[slot]
            .get_or_insert_with(|| (pos, Vec::new()))
            .1
            .push((child, seg));
    }

    fn close_node(&mut self, slot: usize) {
        if let Some((pos, children)) = self.nodes[slot].take() {
            let bytes = encode_node(pos, &children);
            let stored = children.iter().map(|(_, s)| s.stored).sum();
            let seg = self.emit(pos, bytes, stored);
            self.add_child(pos, seg);
        }
    }

    /// Segments finished since the last call, children before their parents.
    pub fn take_finished(&mut self) -> Vec<EncodedSegment> {
        std::mem::take(&mut self.finished)
    }

    /// Closes every open segment; returns the root (`None` for an all-zero map) and the last
    /// finished segments.
    pub fn finish(mut self) -> (Option<SegmentRef>, Vec<EncodedSegment>) {
        self.close_leaf();
        for slot in 0..self.nodes.len() {
            self.close_node(slot);
        }
        (self.root, self.finished)
    }
}

/// The parts of a parent's tree an incremental loaded: the nodes on the paths to the changed
/// leaves and those leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedTree {
    /// Decoded nodes by position.
    pub nodes: BTreeMap<SegmentPos, Vec<(SegmentPos, SegmentRef)>>,
    /// Decoded leaves by position.
    pub leaves: BTreeMap<SegmentPos, Vec<(u64, ChunkRef)>>,
}

impl LoadedTree {
    /// Files a decoded segment under its position.
    pub fn insert(&mut self, pos: SegmentPos, seg: Segment) {
        match seg {
            Segment::Leaf(e) => {
                self.leaves.insert(pos, e);
            }
            Segment::Node(c) => {
                self.nodes.insert(pos, c);
            }
        }
    }

    /// The stored chunks of every loaded leaf, ascending.
    pub fn loaded_chunks(&self) -> impl Iterator<Item = (u64, &ChunkRef)> + '_ {
        self.leaves.values().flatten().map(|(i, r)| (*i, r))
    }

    /// The state of chunk `index` in the parent, if its leaf was loaded (or is known empty).
    pub fn get(&self, shape: &TreeShape, index: u64) -> ChunkState {
        let pos = shape.pos_of(0, index);
        self.leaves
            .get(&pos)
            .and_then(|e| {
                e.binary_search_by_key(&index, |(i, _)| *i)
                    .ok()
                    .map(|k| e[k].1)
            })
            .map_or(ChunkState::Zero, ChunkState::Stored)
    }
}

/// The children of a loaded node (at `pos`) whose range holds one of `changed` (ascending chunk
/// indices): what an incremental must load next.
pub fn children_to_load<'a>(
    pos: SegmentPos,
    children: &'a [(SegmentPos, SegmentRef)],
    changed: &'a std::collections::BTreeSet<u64>,
) -> impl Iterator<Item = (SegmentPos, SegmentRef)> + 'a {
    let child_span = span(pos.level.saturating_sub(1));
    children
        .iter()
        .filter(move |(p, _)| {
            changed
                .range(p.first..p.first.saturating_add(child_span))
                .next()
                .is_some()
        })
        .copied()
}

/// Derives a child tree from its parent's (same geometry): the leaves holding `changes` are
/// rebuilt from the parent's loaded versions with the changes applied, and so are the nodes
/// on their paths; every other segment is shared by reference. Returns the new root and the
/// new segments (children before parents). Segments equal to the parent's are not returned.
///
/// # Errors
/// [`CoreError::ChunkIndexOutOfRange`] / [`CoreError::ChunkLengthMismatch`] for a bad change;
/// [`CoreError::ManifestInvalid`] if a segment the changes need was not loaded (a caller bug).
pub fn derive_tree(
    shape: &TreeShape,
    parent_root: Option<SegmentRef>,
    loaded: &LoadedTree,
    changes: &BTreeMap<u64, ChunkState>,
    namer: &(dyn Fn(&[u8]) -> ChunkHash + Sync),
) -> Result<(Option<SegmentRef>, Vec<EncodedSegment>), CoreError> {
    let g = shape.geometry();
    for (index, state) in changes {
        if *index >= g.chunk_count() {
            return Err(CoreError::ChunkIndexOutOfRange {
                index: *index,
                chunk_count: g.chunk_count(),
            });
        }
        if let ChunkState::Stored(r) = state
            && r.raw_len != g.chunk_len(*index)
        {
            return Err(CoreError::ChunkLengthMismatch {
                index: *index,
                raw_len: r.raw_len,
                expected: g.chunk_len(*index),
            });
        }
    }
    let mut out = Vec::new();
    let root = rebuild(
        shape,
        shape.root_pos(),
        parent_root,
        loaded,
        changes,
        namer,
        &mut out,
    )?;
    Ok((root, out))
}

fn rebuild(
    shape: &TreeShape,
    pos: SegmentPos,
    old: Option<SegmentRef>,
    loaded: &LoadedTree,
    changes: &BTreeMap<u64, ChunkState>,
    namer: &(dyn Fn(&[u8]) -> ChunkHash + Sync),
    out: &mut Vec<EncodedSegment>,
) -> Result<Option<SegmentRef>, CoreError> {
    let end = pos.first.saturating_add(span(pos.level));
    let mut mine = changes.range(pos.first..end).peekable();
    if mine.peek().is_none() {
        return Ok(old);
    }
    let not_loaded = || CoreError::ManifestInvalid {
        reason: format!(
            "segment at level {} index {} is needed but was not loaded",
            pos.level, pos.first
        ),
    };
    let emit = |out: &mut Vec<EncodedSegment>, bytes: Vec<u8>, stored: u64| {
        let seg = SegmentRef {
            name: namer(&bytes),
            len: bytes.len() as u32,
            stored,
        };
        if old != Some(seg) {
            out.push(EncodedSegment { pos, seg, bytes });
        }
        seg
    };
    if pos.level == 0 {
        let mut entries: BTreeMap<u64, ChunkRef> = match old {
            Some(_) => loaded
                .leaves
                .get(&pos)
                .ok_or_else(not_loaded)?
                .iter()
                .copied()
                .collect(),
            None => BTreeMap::new(),
        };
        for (index, state) in mine {
            match state {
                ChunkState::Zero => entries.remove(index),
                ChunkState::Stored(r) => entries.insert(*index, *r),
            };
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let entries: Vec<(u64, ChunkRef)> = entries.into_iter().collect();
        return Ok(Some(emit(
            out,
            encode_leaf(pos, &entries),
            entries.len() as u64,
        )));
    }
    let mut children: BTreeMap<SegmentPos, SegmentRef> = match old {
        Some(_) => loaded
            .nodes
            .get(&pos)
            .ok_or_else(not_loaded)?
            .iter()
            .copied()
            .collect(),
        None => BTreeMap::new(),
    };
    let child_span = span(pos.level - 1);
    let mut touched: Vec<SegmentPos> = Vec::new();
    for (index, _) in mine {
        let child = shape.pos_of(pos.level - 1, *index);
        if touched.last() != Some(&child) {
            touched.push(child);
        }
    }
    debug_assert!(
        touched
            .iter()
            .all(|c| c.first - pos.first < child_span * FANOUT)
    );
    for child in touched {
        let old_child = children.get(&child).copied();
        match rebuild(shape, child, old_child, loaded, changes, namer, out)? {
            Some(s) => children.insert(child, s),
            None => children.remove(&child),
        };
    }
    if children.is_empty() {
        return Ok(None);
    }
    let children: Vec<(SegmentPos, SegmentRef)> = children.into_iter().collect();
    let stored = children.iter().map(|(_, s)| s.stored).sum();
    Ok(Some(emit(out, encode_node(pos, &children), stored)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namer(b: &[u8]) -> ChunkHash {
        ChunkHash(*blake3_stub(b))
    }

    /// A test-only stand-in for a content hash (FNV spread over 32 bytes): distinct bytes give
    /// distinct names in these tests, which is all the tree logic relies on.
    fn blake3_stub(b: &[u8]) -> Box<[u8; 32]> {
        let mut out = [0u8; 32];
        for (k, o) in out.chunks_mut(8).enumerate() {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ k as u64;
            for x in b {
                h = (h ^ u64::from(*x)).wrapping_mul(0x100_0000_01b3);
            }
            o.copy_from_slice(&h.to_le_bytes());
        }
        Box::new(out)
    }

    fn r(i: u64, g: &ChunkGeometry) -> ChunkRef {
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&i.to_le_bytes());
        ChunkRef {
            hash: ChunkHash(hash),
            stored_size: 100 + i % 1000,
            crc32c: i as u32,
            raw_len: g.chunk_len(i),
        }
    }

    /// Stored segments by name, as a repository would hold them.
    type SegmentStore = BTreeMap<ChunkHash, (SegmentPos, Vec<u8>)>;

    /// Writes a full tree and reads it back through `decode_segment` from the root.
    fn build(g: ChunkGeometry, indices: &[u64]) -> (Option<SegmentRef>, SegmentStore) {
        let shape = TreeShape::new(g);
        let mut w = TreeWriter::new(shape, &namer);
        let mut all = BTreeMap::new();
        for i in indices {
            w.push(*i, r(*i, &g)).unwrap();
            for s in w.take_finished() {
                all.insert(s.seg.name, (s.pos, s.bytes));
            }
        }
        let (root, rest) = w.finish();
        for s in rest {
            all.insert(s.seg.name, (s.pos, s.bytes));
        }
        (root, all)
    }

    fn read_all(shape: &TreeShape, root: Option<SegmentRef>, store: &SegmentStore) -> Vec<u64> {
        let mut out = Vec::new();
        let mut stack = root
            .map(|r| (shape.root_pos(), r))
            .into_iter()
            .collect::<Vec<_>>();
        while let Some((pos, seg)) = stack.pop() {
            let (p, bytes) = &store[&seg.name];
            assert_eq!(*p, pos);
            match decode_segment(bytes, shape, pos, &seg).unwrap() {
                Segment::Leaf(e) => out.extend(e.iter().map(|(i, _)| *i)),
                Segment::Node(c) => stack.extend(c.into_iter().rev()),
            }
        }
        out
    }

    #[test]
    fn shapes_follow_the_volume() {
        let mib = 1 << 20;
        let tib = 1u64 << 40;
        let s = TreeShape::new(ChunkGeometry::new(tib, mib).unwrap());
        assert_eq!(s.root_level(), 2);
        let s = TreeShape::new(ChunkGeometry::new(tib, 256 << 10).unwrap());
        assert_eq!(s.root_level(), 3);
        let s = TreeShape::new(ChunkGeometry::new(128 * 4096, 4096).unwrap());
        assert_eq!(s.root_level(), 0);
        let s = TreeShape::new(ChunkGeometry::new(0, 4096).unwrap());
        assert_eq!(s.root_level(), 0);
        let s = TreeShape::new(ChunkGeometry::new(u64::MAX, 4096).unwrap());
        assert_eq!(s.root_level(), 7);
    }

    #[test]
    fn full_segments_stay_within_the_documented_sizes() {
        // 256 KiB chunks with worst-case stored sizes: a full leaf is 16 + 128 * 40 bytes.
        let g = ChunkGeometry::new(1 << 40, 256 << 10).unwrap();
        let shape = TreeShape::new(g);
        let mut w = TreeWriter::new(shape, &namer);
        for i in 0..(LEAF_SPAN * FANOUT + 1) {
            let mut c = r(i, &g);
            c.stored_size = g.chunk_size() + 52;
            w.push(i, c).unwrap();
        }
        let (_, rest) = w.finish();
        let mut all = rest;
        all.sort_by_key(|s| s.bytes.len());
        let leaf = all
            .iter()
            .filter(|s| s.pos.level == 0)
            .map(|s| s.bytes.len())
            .max();
        assert_eq!(leaf, Some(16 + 128 * 40));
        let node = all
            .iter()
            .filter(|s| s.pos.level == 1)
            .map(|s| s.bytes.len())
            .max();
        assert!(node.unwrap() <= 5008, "{node:?}");
        assert!(all.iter().all(|s| s.bytes.len() as u64 <= MAX_SEGMENT_LEN));
    }

    #[test]
    fn trees_round_trip_and_empty_ranges_cost_nothing() {
        let g = ChunkGeometry::new(100_000 * 4096 + 17, 4096).unwrap();
        let shape = TreeShape::new(g);
        let indices: Vec<u64> = (0..g.chunk_count())
            .filter(|i| i % 7 == 0 && !(20_000..60_000).contains(i))
            .chain([g.chunk_count() - 1])
            .collect();
        let (root, store) = build(g, &indices);
        assert_eq!(root.unwrap().stored, indices.len() as u64);
        assert_eq!(read_all(&shape, root, &store), indices);
        // No segment covers only the hole.
        assert!(
            store
                .values()
                .all(|(p, _)| { p.level > 0 || !(20_000..60_000 - 128).contains(&p.first) })
        );
        let (empty, none) = build(g, &[]);
        assert_eq!((empty, none.len()), (None, 0));
    }

    #[test]
    fn derived_trees_equal_trees_built_from_scratch() {
        let g = ChunkGeometry::new(3_000_000 * 4096, 4096).unwrap();
        let shape = TreeShape::new(g);
        assert_eq!(shape.root_level(), 3);
        let parent: Vec<u64> = (0..g.chunk_count()).step_by(97).collect();
        let (root, mut store) = build(g, &parent);
        let mut changes = BTreeMap::new();
        for i in [5u64, 97, 194, 1_000_000, 2_999_999, 2_000_001] {
            let state = if i % 2 == 0 {
                ChunkState::Zero
            } else {
                let mut c = r(i + 7, &g);
                c.raw_len = g.chunk_len(i);
                ChunkState::Stored(c)
            };
            changes.insert(i, state);
        }
        // Load exactly the paths to the changed leaves.
        let changed: std::collections::BTreeSet<u64> = changes.keys().copied().collect();
        let mut loaded = LoadedTree::default();
        let mut frontier = vec![(shape.root_pos(), root.unwrap())];
        let mut loaded_bytes = 0;
        while let Some((pos, seg)) = frontier.pop() {
            let bytes = &store[&seg.name].1;
            loaded_bytes += bytes.len();
            let s = decode_segment(bytes, &shape, pos, &seg).unwrap();
            if let Segment::Node(c) = &s {
                frontier.extend(children_to_load(pos, c, &changed));
            }
            loaded.insert(pos, s);
        }
        // 5 and 97 share leaf 0; the last leaf (64 chunks) holds no multiple of 97 in the parent.
        assert_eq!(loaded.leaves.len(), 4);
        let (new_root, new) = derive_tree(&shape, root, &loaded, &changes, &namer).unwrap();
        let written: usize = new.iter().map(|s| s.bytes.len()).sum();
        assert!(written as u64 <= max_incremental_segment_bytes(&shape, 5));
        assert!(loaded_bytes as u64 <= max_incremental_segment_bytes(&shape, 5));
        for s in new {
            store.insert(s.seg.name, (s.pos, s.bytes));
        }
        let mut expect: BTreeMap<u64, ()> = parent.iter().map(|i| (*i, ())).collect();
        for (i, st) in &changes {
            match st {
                ChunkState::Zero => expect.remove(i),
                ChunkState::Stored(_) => expect.insert(*i, ()),
            };
        }
        let expect: Vec<u64> = expect.into_keys().collect();
        assert_eq!(read_all(&shape, new_root, &store), expect);
        // Same bytes as a tree written from scratch: content naming makes them equal.
        let mut w = TreeWriter::new(shape, &namer);
        for i in &expect {
            let c = match changes.get(i) {
                Some(ChunkState::Stored(c)) => *c,
                _ => r(*i, &g),
            };
            w.push(*i, c).unwrap();
        }
        assert_eq!(w.finish().0, new_root);
    }

    #[test]
    fn hostile_segments_are_refused_with_typed_errors() {
        let g = ChunkGeometry::new(1000 * 4096, 4096).unwrap();
        let shape = TreeShape::new(g);
        let (root, store) = build(g, &[1, 2, 300, 999]);
        let root = root.unwrap();
        let (pos, bytes) = store[&root.name].clone();
        assert_eq!(pos, shape.root_pos());
        let Segment::Node(children) = decode_segment(&bytes, &shape, pos, &root).unwrap() else {
            panic!("root is a node")
        };
        let (leaf_pos, leaf_ref) = children[0];
        let leaf = store[&leaf_ref.name].1.clone();
        let invalid = |b: &[u8], p: SegmentPos, s: &SegmentRef| {
            let e = decode_segment(b, &shape, p, s).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Integrity, "{e}");
            e
        };
        // Another position than the parent says.
        let moved = SegmentPos {
            level: 0,
            first: 128,
        };
        assert!(matches!(
            invalid(&leaf, moved, &leaf_ref),
            CoreError::SegmentInvalid {
                first_index: 128,
                ..
            }
        ));
        // Length and count must match the parent's record.
        invalid(
            &leaf,
            leaf_pos,
            &SegmentRef {
                len: leaf_ref.len + 1,
                ..leaf_ref
            },
        );
        invalid(
            &leaf,
            leaf_pos,
            &SegmentRef {
                stored: 3,
                ..leaf_ref
            },
        );
        // Truncated and trailing bytes.
        let short = &leaf[..leaf.len() - 1];
        invalid(
            short,
            leaf_pos,
            &SegmentRef {
                len: short.len() as u32,
                ..leaf_ref
            },
        );
        let mut long = leaf.clone();
        long.push(0);
        invalid(
            &long,
            leaf_pos,
            &SegmentRef {
                len: long.len() as u32,
                ..leaf_ref
            },
        );
        // A slot gap that leaves the span.
        let mut far = leaf.clone();
        far[15] = 0x7f;
        invalid(&far, leaf_pos, &leaf_ref);
        // An impossible stored size.
        let mut zero = leaf.clone();
        zero[16 + 32] = 0;
        zero[16 + 33] = 0;
        let e = decode_segment(&zero, &shape, leaf_pos, &leaf_ref);
        assert!(e.is_err());
        // The last leaf: chunk 999 is the volume's last; a slot past it is refused.
        let (last_pos, last_ref) = children[children.len() - 1];
        let mut past = store[&last_ref.name].1.clone();
        past[15] += 1; // slot 103 (index 999) -> 104 (index 1000)
        assert!(matches!(
            invalid(&past, last_pos, &last_ref),
            CoreError::SegmentInvalid { .. }
        ));
        // A future encoding version is Unsupported, not a misread.
        let mut future = leaf.clone();
        future[4] = 9;
        let e = decode_segment(&future, &shape, leaf_pos, &leaf_ref).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        // Larger than any segment, whatever the parent claims.
        let huge = vec![0u8; MAX_SEGMENT_LEN as usize + 1];
        invalid(
            &huge,
            leaf_pos,
            &SegmentRef {
                len: huge.len() as u32,
                ..leaf_ref
            },
        );
    }
}
