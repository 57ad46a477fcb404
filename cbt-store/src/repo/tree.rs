//! Manifest format 2 on the object store: segment objects, heads, and the tree walks over them.
//!
//! Owns the `segments/` prefix: how a segment is named (the content hash of its encoded bytes,
//! keyed like chunk names in an encrypted repository), sealed (like manifests), written (with
//! `IfAbsent`: a segment is immutable, and one already stored by a parent is the same bytes)
//! and read back (bounded by the length its parent records, name re-checked against the
//! content, then [`decode_segment`]). The tree logic itself is [`cbt_core::maptree`].
//!
//! # Memory
//! Loading a whole map ([`Repository::load_manifest`]) holds the map (as format 1 did) plus one
//! tree level of references. Writing a whole map streams it through a [`TreeWriter`]: one open
//! segment per level plus at most [`SEGMENT_BATCH`] finished segments waiting for upload. An
//! incremental ([`Repository::load_paths`] then [`derive_tree`]) holds only the segments on
//! the paths to its changed leaves.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use cbt_core::manifest::{ManifestHead, MapLocation};
use cbt_core::maptree::{
    EncodedSegment, LoadedTree, MAX_SEGMENT_LEN, Segment, SegmentPos, SegmentRef, TreeShape,
    TreeWriter, children_to_load, decode_segment, span,
};
use cbt_core::{ChunkHash, ChunkMap, ChunkRef, ChunkState, CoreError, Manifest};
use futures::{StreamExt, TryStreamExt};

use super::{RepoError, Repository, Result};
use crate::crypto::{ObjectKind, SEALED_OVERHEAD};
use crate::store::{PutMode, PutOptions, PutOutcome, StoreError};

/// Segments read or written concurrently.
const SEGMENT_CONCURRENCY: usize = 16;
/// Finished segments a full write collects before uploading them together.
pub const SEGMENT_BATCH: usize = 64;

/// Object key of a segment: `segments/<first two hex digits>/<name>`.
pub fn segment_key(name: &ChunkHash) -> String {
    let hex = name.to_hex();
    format!("segments/{}/{hex}", &hex[..2])
}

/// The segment name in a `segments/` key, if it is one.
pub(crate) fn parse_segment_key(key: &str) -> Option<ChunkHash> {
    let rest = key.strip_prefix("segments/")?;
    let (fan, hex) = rest.split_once('/')?;
    let h = ChunkHash::from_hex(hex).ok()?;
    (fan.len() == 2 && hex.starts_with(fan)).then_some(h)
}

/// Metadata bytes one commit wrote: segments and head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetadataWritten {
    /// Segment objects written (not counting those already stored).
    pub segments: u64,
    /// Bytes of those, as stored.
    pub segment_bytes: u64,
    /// Bytes of the head object, as stored.
    pub head_bytes: u64,
}

fn segment_error(key: &str, pos: SegmentPos, reason: String) -> RepoError {
    RepoError::Manifest {
        key: key.to_string(),
        source: CoreError::SegmentInvalid {
            level: pos.level,
            first_index: pos.first,
            reason,
        },
    }
}

impl Repository {
    /// The name of a segment with these encoded bytes (keyed in an encrypted repository).
    pub fn segment_name(&self, bytes: &[u8]) -> ChunkHash {
        self.codec().chunk_hash(bytes)
    }

    /// Stores a segment unless one of that name exists; returns the bytes written.
    ///
    /// # Errors
    /// Store errors, with the key.
    pub async fn put_segment(&self, seg: &EncodedSegment) -> Result<u64> {
        let key = segment_key(&seg.seg.name);
        let body = self.codec().seal_object(
            ObjectKind::Manifest,
            &key,
            Bytes::copy_from_slice(&seg.bytes),
        )?;
        let len = body.len() as u64;
        let opts = PutOptions {
            mode: PutMode::IfAbsent,
            crc32c: Some(crate::crc::crc32c(&body)),
            defer_sync: true,
        };
        match self
            .store()
            .put_with(&key, body, opts)
            .await
            .map_err(|e| RepoError::store(format!("writing segment {key}"), e))?
        {
            PutOutcome::Created => Ok(len),
            PutOutcome::AlreadyExists => Ok(0),
        }
    }

    /// Writes segments (children before parents is not required: nothing refers to them until
    /// the head is written); returns how many were new and their bytes.
    async fn put_segments(&self, segs: Vec<EncodedSegment>) -> Result<(u64, u64)> {
        futures::stream::iter(segs)
            .map(|s| async move { self.put_segment(&s).await })
            .buffer_unordered(SEGMENT_CONCURRENCY)
            .try_fold((0u64, 0u64), |(n, b), w| async move {
                Ok(if w > 0 { (n + 1, b + w) } else { (n, b) })
            })
            .await
    }

    /// Reads and validates the segment at `pos` that its parent recorded as `seg`.
    ///
    /// # Errors
    /// [`RepoError::Manifest`] with [`CoreError::SegmentInvalid`] for a missing, oversized,
    /// misnamed or invalid segment (the key names it); [`RepoError::Sealed`]; store errors.
    pub async fn read_segment(
        &self,
        shape: &TreeShape,
        pos: SegmentPos,
        seg: &SegmentRef,
    ) -> Result<Segment> {
        self.read_segment_sized(shape, pos, seg)
            .await
            .map(|(s, _)| s)
    }

    /// As [`Repository::read_segment`], with the bytes the store returned for it (the
    /// sealed envelope included in an encrypted repository).
    pub(crate) async fn read_segment_sized(
        &self,
        shape: &TreeShape,
        pos: SegmentPos,
        seg: &SegmentRef,
    ) -> Result<(Segment, u64)> {
        let key = segment_key(&seg.name);
        let overhead = if self.is_encrypted() {
            SEALED_OVERHEAD as u64
        } else {
            0
        };
        let max = u64::from(seg.len).min(MAX_SEGMENT_LEN) + overhead;
        let body = match self.store().get_bounded(&key, max).await {
            Ok(b) => b,
            Err(StoreError::NotFound { .. }) => {
                return Err(segment_error(&key, pos, "missing from the store".into()));
            }
            Err(StoreError::TooLarge { size, .. }) => {
                return Err(segment_error(
                    &key,
                    pos,
                    format!(
                        "stored as {} bytes, more than the {max} its parent allows",
                        size.map_or_else(|| "more".to_string(), |s| s.to_string())
                    ),
                ));
            }
            Err(e) if e.kind() == crate::store::ErrorKind::Integrity => {
                return Err(segment_error(&key, pos, e.to_string()));
            }
            Err(e) => return Err(RepoError::store(format!("reading segment {key}"), e)),
        };
        let read = body.len() as u64;
        let plain = self.codec().open_object(ObjectKind::Manifest, &key, body)?;
        if self.segment_name(&plain) != seg.name {
            return Err(segment_error(
                &key,
                pos,
                "content does not match its name".into(),
            ));
        }
        decode_segment(&plain, shape, pos, seg)
            .map(|s| (s, read))
            .map_err(|source| RepoError::Manifest {
                key: key.clone(),
                source,
            })
    }

    /// Walks a whole tree level by level, calling `visit` with each decoded segment. Subtrees
    /// whose root name `skip` accepts are not read (GC uses it to read each shared subtree
    /// once).
    pub(crate) async fn walk_tree(
        &self,
        shape: &TreeShape,
        root: Option<SegmentRef>,
        mut skip: impl FnMut(&SegmentRef) -> bool,
        mut visit: impl FnMut(SegmentPos, &SegmentRef, &Segment) -> Result<()>,
        reads: &WalkReads,
    ) -> Result<()> {
        let mut frontier: Vec<(SegmentPos, SegmentRef)> = root
            .filter(|r| !skip(r))
            .map(|r| (shape.root_pos(), r))
            .into_iter()
            .collect();
        while !frontier.is_empty() {
            let level = std::mem::take(&mut frontier);
            let mut loaded = futures::stream::iter(level)
                .map(|(pos, r)| async move {
                    self.read_segment_sized(shape, pos, &r)
                        .await
                        .map(|(s, read)| (pos, r, s, read))
                })
                .buffered(SEGMENT_CONCURRENCY);
            while let Some(item) = loaded.next().await {
                let (pos, r, seg, read) = item?;
                reads.add(read);
                visit(pos, &r, &seg)?;
                if let Segment::Node(children) = seg {
                    frontier.extend(children.into_iter().filter(|(_, c)| !skip(c)));
                }
            }
        }
        Ok(())
    }

    /// Loads the whole chunk map of a format-2 head and validates it as a manifest.
    pub(crate) async fn load_tree_manifest(&self, head: ManifestHead) -> Result<Manifest> {
        self.load_tree_manifest_keeping(head, &WalkReads::default(), &BTreeSet::new())
            .await
            .map(|(m, _)| m)
    }

    /// As [`Repository::load_tree_manifest`], counting the segments read in `reads`, and
    /// keeping as they pass the segments [`Repository::load_paths`] would load for `changed`
    /// (those whose range holds a changed index): a caller that needs both the whole map and
    /// those paths reads each segment once. The paths are not checked on their own (the
    /// whole map they are part of is).
    pub(crate) async fn load_tree_manifest_keeping(
        &self,
        head: ManifestHead,
        reads: &WalkReads,
        changed: &BTreeSet<u64>,
    ) -> Result<(Manifest, LoadedTree)> {
        let MapLocation::Tree { root } = head.map else {
            return Err(RepoError::Internal {
                message: "format-1 heads carry their map inline".into(),
            });
        };
        let shape = TreeShape::new(head.geometry);
        let mut map = ChunkMap::new(head.geometry);
        let mut kept = LoadedTree::default();
        self.walk_tree(
            &shape,
            root,
            |_| false,
            |pos, _, seg| {
                if let Segment::Leaf(entries) = seg {
                    for (i, r) in entries {
                        map.set(*i, ChunkState::Stored(*r))?;
                    }
                }
                let end = pos.first.saturating_add(span(pos.level));
                if changed.range(pos.first..end).next().is_some() {
                    kept.insert(pos, seg.clone());
                }
                Ok(())
            },
            reads,
        )
        .await?;
        Ok((Manifest::new(head.meta(), map, head.parent)?, kept))
    }

    /// Loads the segments of a format-2 tree on the paths to the leaves holding `changed`
    /// chunk indices: what an incremental needs of its parent. Returns them with the bytes
    /// read. The chunk references loaded are checked against each other.
    ///
    /// # Errors
    /// As [`Repository::read_segment`]; [`RepoError::Core`] for loaded leaves that contradict
    /// each other.
    pub async fn load_paths(
        &self,
        shape: &TreeShape,
        root: Option<SegmentRef>,
        changed: &BTreeSet<u64>,
    ) -> Result<(LoadedTree, u64)> {
        let mut loaded = LoadedTree::default();
        let mut bytes = 0u64;
        let mut frontier: Vec<(SegmentPos, SegmentRef)> = match root {
            Some(r) if !changed.is_empty() => vec![(shape.root_pos(), r)],
            _ => Vec::new(),
        };
        while !frontier.is_empty() {
            let level = std::mem::take(&mut frontier);
            let segs: Vec<(SegmentPos, u64, Segment)> = futures::stream::iter(level)
                .map(|(pos, r)| async move {
                    self.read_segment_sized(shape, pos, &r)
                        .await
                        .map(|(s, read)| (pos, read, s))
                })
                .buffered(SEGMENT_CONCURRENCY)
                .try_collect()
                .await?;
            for (pos, read, seg) in segs {
                bytes += read;
                if let Segment::Node(children) = &seg {
                    frontier.extend(children_to_load(pos, children, changed));
                }
                loaded.insert(pos, seg);
            }
        }
        cbt_core::manifest::check_chunk_refs(shape.geometry(), loaded.loaded_chunks())?;
        Ok((loaded, bytes))
    }

    /// Writes the whole map of `manifest` as a segment tree, streaming: segments are uploaded
    /// in batches as the writer finishes them. Returns the root and what was written.
    pub(crate) async fn write_tree(
        &self,
        manifest: &Manifest,
    ) -> Result<(Option<SegmentRef>, MetadataWritten)> {
        let shape = TreeShape::new(*manifest.chunks.geometry());
        let namer = |b: &[u8]| self.segment_name(b);
        let mut writer = TreeWriter::new(shape, &namer);
        let mut written = MetadataWritten::default();
        let mut pending: Vec<EncodedSegment> = Vec::new();
        for (index, r) in manifest.chunks.iter_stored() {
            writer.push(index, *r)?;
            pending.extend(writer.take_finished());
            if pending.len() >= SEGMENT_BATCH {
                let (n, b) = self.put_segments(std::mem::take(&mut pending)).await?;
                written.segments += n;
                written.segment_bytes += b;
            }
        }
        let (root, rest) = writer.finish();
        pending.extend(rest);
        let (n, b) = self.put_segments(pending).await?;
        written.segments += n;
        written.segment_bytes += b;
        Ok((root, written))
    }

    /// Commits a format-2 head whose segments are all stored (new ones written by the caller
    /// with [`Repository::put_segments_of`]), making the snapshot visible.
    ///
    /// # Errors
    /// As [`Repository::commit_manifest`].
    pub async fn commit_head(&self, head: &ManifestHead) -> Result<u64> {
        let key = super::manifest_key(&head.volume, &head.snapshot);
        let body = self.codec().seal_object(
            ObjectKind::Manifest,
            &key,
            super::frame_manifest_json(&head.to_json()?)?,
        )?;
        let len = body.len() as u64;
        // Chunks and segments are put with deferred durability; they must be on disk before
        // the head that references them can be.
        self.store()
            .sync()
            .await
            .map_err(|e| RepoError::store(format!("syncing objects before manifest {key}"), e))?;
        match self
            .store()
            .put(&key, body, PutMode::IfAbsent)
            .await
            .map_err(|e| RepoError::store(format!("writing manifest {key}"), e))?
        {
            PutOutcome::Created => Ok(len),
            PutOutcome::AlreadyExists => {
                // A retried write whose first attempt landed finds its own manifest.
                match self.load_head(&head.volume, &head.snapshot).await {
                    Ok(h) if h.snapshot_id == head.snapshot_id => Ok(0),
                    _ => Err(RepoError::SnapshotExists {
                        volume: head.volume.to_string(),
                        snapshot: head.snapshot.to_string(),
                    }),
                }
            }
        }
    }

    /// Writes new segments an incremental derived ([`cbt_core::maptree::derive_tree`]).
    ///
    /// # Errors
    /// Store errors, with the key.
    pub async fn put_segments_of(&self, segs: Vec<EncodedSegment>) -> Result<MetadataWritten> {
        let (segments, segment_bytes) = self.put_segments(segs).await?;
        Ok(MetadataWritten {
            segments,
            segment_bytes,
            head_bytes: 0,
        })
    }

    /// Reads a snapshot's head: its metadata and where its map is, without reading the map
    /// of a format-2 manifest (a format-1 one is read whole and its map dropped).
    ///
    /// # Errors
    /// As [`Repository::load_manifest`].
    pub async fn load_head(
        &self,
        volume: &cbt_core::VolumeName,
        snapshot: &cbt_core::SnapshotName,
    ) -> Result<ManifestHead> {
        Ok(self.load_stored(volume, snapshot).await?.head())
    }

    /// Every segment stored, with size and modification time (one listing of `segments/`).
    pub(crate) async fn stored_segments(
        &self,
    ) -> Result<BTreeMap<ChunkHash, cbt_core::gc::StoredChunk>> {
        let objects = crate::store::list_all(self.store().as_ref(), "segments/")
            .await
            .map_err(|e| RepoError::store("listing segments/", e))?;
        Ok(objects
            .iter()
            .filter_map(|o| {
                let hash = parse_segment_key(&o.key)?;
                Some((
                    hash,
                    cbt_core::gc::StoredChunk {
                        hash,
                        size: o.size,
                        modified: o.last_modified.map(cbt_core::Timestamp::from_system_time),
                    },
                ))
            })
            .collect())
    }
}

/// Leaves an in-order walk ([`Repository::leaves_in_order`]) reads ahead of its consumer.
pub const LEAF_WINDOW: usize = 8;

/// Counts the chunk-map entries a streaming walk holds at once (decoded leaves not yet
/// dropped), and the most it ever held: the figure the memory bound is checked against.
#[derive(Debug, Default)]
pub struct EntryGauge {
    now: std::sync::atomic::AtomicU64,
    peak: std::sync::atomic::AtomicU64,
}

impl EntryGauge {
    /// Counts `n` more entries held.
    pub(crate) fn add(&self, n: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.now.fetch_add(n, Relaxed) + n;
        self.peak.fetch_max(now, Relaxed);
    }

    /// Counts `n` entries released.
    pub(crate) fn sub(&self, n: u64) {
        self.now.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Most entries held at once so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a whole map of `n` entries held at once (a format-1 manifest).
    pub fn hold_whole(&self, n: u64) {
        self.add(n);
        self.sub(n);
    }
}

/// Segments a walk read from the store and the bytes it fetched for them (shared by the tasks
/// of the walk; read once it is done).
#[derive(Debug, Default)]
pub struct WalkReads {
    segments: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl WalkReads {
    fn add(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.segments.fetch_add(1, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }

    /// Segments read (nodes and leaves).
    pub fn segments(&self) -> u64 {
        self.segments.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes the store returned for them.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One decoded leaf of an in-order walk; counted in its walk's [`EntryGauge`] until dropped.
#[derive(Debug)]
pub struct HeldLeaf {
    /// The leaf's stored chunks, ascending.
    pub entries: Vec<(u64, ChunkRef)>,
    gauge: std::sync::Arc<EntryGauge>,
}

impl HeldLeaf {
    /// Wraps entries held outside a tree walk (a batch of a loaded map), counting them.
    pub fn new(entries: Vec<(u64, ChunkRef)>, gauge: std::sync::Arc<EntryGauge>) -> Self {
        gauge.add(entries.len() as u64);
        HeldLeaf { entries, gauge }
    }
}

impl Drop for HeldLeaf {
    fn drop(&mut self) {
        self.gauge.sub(self.entries.len() as u64);
    }
}

impl Repository {
    /// The stored chunks of a snapshot's map in ascending index order, a leaf's worth at a
    /// time: a format-2 map's leaves as [`Repository::leaves_in_order`] walks them
    /// ([`LEAF_WINDOW`] read ahead), a format-1 map (already held whole, bounded by its own
    /// object, counted in `gauge` as held) as copies of 128 entries at a time.
    ///
    /// # Errors
    /// [`RepoError::Internal`] for a format-2 head without a tree (loading refuses one).
    pub(crate) fn stored_leaves<'a>(
        &self,
        stored: &'a cbt_core::manifest::StoredManifest,
        gauge: &std::sync::Arc<EntryGauge>,
    ) -> Result<futures::stream::BoxStream<'a, Result<HeldLeaf>>> {
        use cbt_core::manifest::StoredManifest;
        match stored {
            StoredManifest::V1(m) => {
                gauge.hold_whole(m.chunks.stored_count());
                let mut entries = m.chunks.iter_stored().map(|(i, r)| (i, *r)).peekable();
                let g = gauge.clone();
                let leaves = std::iter::from_fn(move || {
                    entries.peek()?;
                    let leaf: Vec<_> = entries
                        .by_ref()
                        .take(cbt_core::maptree::LEAF_SPAN as usize)
                        .collect();
                    Some(Ok(HeldLeaf::new(leaf, g.clone())))
                });
                Ok(futures::stream::iter(leaves).boxed())
            }
            StoredManifest::V2(head) => match head.map {
                MapLocation::Tree { root } => Ok(self
                    .leaves_in_order(
                        TreeShape::new(head.geometry),
                        root,
                        LEAF_WINDOW,
                        gauge.clone(),
                    )
                    .boxed()),
                MapLocation::Inline => Err(RepoError::Internal {
                    message: "a format-2 head without a tree".into(),
                }),
            },
        }
    }

    /// Walks a format-2 tree's leaves in ascending index order, holding the open nodes of one
    /// path (at most `root level · 128` references) and at most `window` decoded leaves read
    /// ahead (each at most 128 entries), whatever the volume size. Every leaf is read and
    /// validated like [`Repository::read_segment`]; nodes are read when the walk reaches them.
    /// The leaves ahead are read by spawned tasks (on the current tokio runtime), so up to
    /// `window` reads overlap and go on while the consumer is busy with an earlier leaf.
    pub fn leaves_in_order(
        &self,
        shape: TreeShape,
        root: Option<SegmentRef>,
        window: usize,
        gauge: std::sync::Arc<EntryGauge>,
    ) -> impl futures::Stream<Item = Result<HeldLeaf>> + Send + 'static {
        self.leaves_in_order_counted(shape, root, window, gauge, Default::default(), u64::MAX)
    }

    /// As [`Repository::leaves_in_order`], counting the segments read and their bytes in
    /// `reads`, and ending before the first segment that starts at or past chunk index
    /// `below` (none of it is read: a backup of a volume shrunk below its parent's size).
    pub fn leaves_in_order_counted(
        &self,
        shape: TreeShape,
        root: Option<SegmentRef>,
        window: usize,
        gauge: std::sync::Arc<EntryGauge>,
        reads: std::sync::Arc<WalkReads>,
        below: u64,
    ) -> impl futures::Stream<Item = Result<HeldLeaf>> + Send + 'static {
        let leaf_reads = reads.clone();
        // Owns a clone (cheap): a walk that borrows nothing can sit in any pipeline.
        let (nodes, leaves) = (self.clone(), self.clone());
        type Pending = std::collections::VecDeque<(SegmentPos, SegmentRef)>;
        let start: Vec<Pending> = root
            .map(|r| Pending::from([(shape.root_pos(), r)]))
            .into_iter()
            .collect();
        let not_a = |pos: SegmentPos, what: &str| RepoError::Internal {
            message: format!(
                "segment at level {} index {} decoded as a {what}",
                pos.level, pos.first
            ),
        };
        futures::stream::try_unfold(start, move |mut stack| {
            let repo = nodes.clone();
            let reads = reads.clone();
            async move {
                loop {
                    let Some(top) = stack.last_mut() else {
                        return Ok(None);
                    };
                    let Some((pos, r)) = top.pop_front() else {
                        stack.pop();
                        continue;
                    };
                    if pos.first >= below {
                        // In index order: everything after starts later still.
                        return Ok(None);
                    }
                    if pos.level == 0 {
                        return Ok(Some(((pos, r), stack)));
                    }
                    let (seg, read) = repo.read_segment_sized(&shape, pos, &r).await?;
                    reads.add(read);
                    match seg {
                        Segment::Node(children) => stack.push(children.into()),
                        Segment::Leaf(_) => return Err(not_a(pos, "leaf")),
                    }
                }
            }
        })
        .map_ok(move |(pos, r)| {
            let gauge = gauge.clone();
            let repo = leaves.clone();
            let reads = leaf_reads.clone();
            // Each leaf read is a task of its own, so the read-ahead progresses while the
            // consumer works on a leaf instead of only while it polls the walk; dropped with
            // the walk, the tasks are cancelled.
            let task = super::AbortOnDrop(tokio::spawn(async move {
                let (seg, read) = repo.read_segment_sized(&shape, pos, &r).await?;
                reads.add(read);
                match seg {
                    Segment::Leaf(entries) => Ok(HeldLeaf::new(entries, gauge)),
                    Segment::Node(_) => Err(not_a(pos, "node")),
                }
            }));
            async move {
                task.await.map_err(|e| RepoError::Internal {
                    message: format!("reading a map leaf: {e}"),
                })?
            }
        })
        .try_buffered(window.max(1))
    }
}
