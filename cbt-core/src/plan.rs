//! Backup and restore plans: which chunks to read, fetch, write or zero, computed as data.
//!
//! Owns the decision of *what* an engine run does; the engine in `cbt-store` only executes a
//! plan. Plans are compact: a backup plan is a set of chunk-index runs, a restore plan borrows
//! the manifest's chunk map and adds only the byte ranges that must read as zero and the
//! offsets of chunks stored at several indices.

use std::collections::HashMap;

use crate::error::CoreError;
use crate::manifest::{ChunkHash, ChunkRef, ChunkState, Manifest};
use crate::ranges::{ByteRange, ChunkGeometry, ChunkSet, RangeSet};

/// One chunk the backup reads from the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRead {
    /// Chunk index.
    pub index: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes to read (the chunk size, or less for the last chunk).
    pub len: u64,
}

/// The chunks a backup must read, in the geometry of the new snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupPlan {
    geometry: ChunkGeometry,
    chunks: ChunkSet,
}

impl BackupPlan {
    /// A full backup: read every chunk touched by `allocated` (all chunks when `None`).
    ///
    /// # Errors
    /// [`CoreError::InvalidChunkSize`]; [`CoreError::RangePastEnd`] if an allocated range
    /// reaches past `volume_size` (a sign the size or the metadata is wrong).
    pub fn full(
        volume_size: u64,
        chunk_size: u64,
        allocated: Option<&RangeSet>,
    ) -> Result<Self, CoreError> {
        let geometry = ChunkGeometry::new(volume_size, chunk_size)?;
        let chunks = match allocated {
            Some(set) => {
                set.check_within(volume_size)?;
                set.chunks(&geometry)
            }
            None => ChunkSet::from_runs(std::iter::once(0..geometry.chunk_count())),
        };
        Ok(BackupPlan { geometry, chunks })
    }

    /// An incremental backup on top of `parent`: read the chunks touched by `changed`, plus
    /// those whose content the parent cannot vouch for because the volume was resized (the new
    /// area when it grew, the chunk whose length changed at the old or new end).
    ///
    /// # Errors
    /// [`CoreError::RangePastEnd`] if a changed range reaches past `volume_size`.
    pub fn incremental(
        parent: &Manifest,
        changed: &RangeSet,
        volume_size: u64,
    ) -> Result<Self, CoreError> {
        Self::incremental_of(parent.chunks.geometry(), changed, volume_size)
    }

    /// [`BackupPlan::incremental`] from the parent's geometry alone (all it needs; a format-2
    /// parent need not be loaded for it).
    ///
    /// # Errors
    /// As [`BackupPlan::incremental`].
    pub fn incremental_of(
        parent: &ChunkGeometry,
        changed: &RangeSet,
        volume_size: u64,
    ) -> Result<Self, CoreError> {
        changed.check_within(volume_size)?;
        let geometry = ChunkGeometry::new(volume_size, parent.chunk_size())?;
        let old_size = parent.volume_size();
        let mut need = changed.clone();
        if volume_size > old_size {
            need.insert(ByteRange::from_bounds(old_size, volume_size)?);
        }
        let cs = geometry.chunk_size();
        let small = old_size.min(volume_size);
        if old_size != volume_size && !small.is_multiple_of(cs) {
            // The short chunk ending at the smaller size has a different length in the other.
            need.insert(ByteRange::new(small - 1, 1)?);
        }
        Ok(BackupPlan {
            geometry,
            chunks: need.chunks(&geometry),
        })
    }

    /// Geometry of the snapshot being written.
    pub fn geometry(&self) -> &ChunkGeometry {
        &self.geometry
    }

    /// The chunk indices to read.
    pub fn chunks(&self) -> &ChunkSet {
        &self.chunks
    }

    /// Number of chunks to read.
    pub fn chunk_count(&self) -> u64 {
        self.chunks.count()
    }

    /// Bytes to read from the source.
    pub fn read_bytes(&self) -> u64 {
        self.chunks.to_byte_ranges(&self.geometry).total_bytes()
    }

    /// The reads in ascending offset order.
    pub fn reads(&self) -> impl Iterator<Item = ChunkRead> + '_ {
        let g = self.geometry;
        self.chunks.iter().map(move |index| ChunkRead {
            index,
            offset: g.chunk_offset(index),
            len: g.chunk_len(index),
        })
    }
}

/// What the restore target holds before the restore starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Reads as zeros everywhere (a new or freshly truncated sparse file): zero chunks are skipped.
    Zeroed,
    /// Holds unknown data (an existing device): zero chunks must be written or punched.
    Dirty,
}

/// One stored chunk the restore fetches and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkFetch {
    /// Chunk index.
    pub index: u64,
    /// Byte offset in the target.
    pub offset: u64,
    /// The stored chunk to fetch.
    pub chunk: ChunkRef,
}

/// One distinct stored chunk and every place the restore writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchGroup {
    /// The stored chunk.
    pub chunk: ChunkRef,
    /// `(chunk index, byte offset)` of every copy, ascending.
    pub targets: Vec<(u64, u64)>,
}

/// What restoring one manifest onto a target does.
///
/// The plan borrows the manifest's chunk map instead of copying it: fetches are produced
/// lazily in index order. Only chunks stored at more than one index get an entry of their own
/// (their list of offsets), so the plan's memory is the zero ranges plus the duplicates, not a
/// second copy of the map. Building it counts references per distinct chunk in a transient
/// table (about 50 bytes per distinct stored chunk, freed before the plan is returned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan<'a> {
    manifest: &'a Manifest,
    zero: RangeSet,
    /// Offsets of every chunk stored at several indices, keyed by hash.
    duplicates: HashMap<ChunkHash, Vec<(u64, u64)>>,
    unique_fetch_bytes: u64,
}

impl<'a> RestorePlan<'a> {
    /// Plans restoring `manifest` onto a target in `target` state.
    pub fn new(manifest: &'a Manifest, target: TargetState) -> Self {
        let geometry = *manifest.chunks.geometry();
        let mut counts: HashMap<ChunkHash, u32> = HashMap::new();
        let mut unique_fetch_bytes = 0;
        for (_, r) in manifest.chunks.iter_stored() {
            let n = counts.entry(r.hash).or_insert(0);
            if *n == 0 {
                unique_fetch_bytes += r.stored_size;
            }
            *n = n.saturating_add(1);
        }
        counts.retain(|_, n| *n > 1);
        let mut duplicates: HashMap<ChunkHash, Vec<(u64, u64)>> = HashMap::new();
        if !counts.is_empty() {
            for (index, r) in manifest.chunks.iter_stored() {
                if counts.contains_key(&r.hash) {
                    duplicates
                        .entry(r.hash)
                        .or_default()
                        .push((index, geometry.chunk_offset(index)));
                }
            }
        }
        let zero = match target {
            TargetState::Zeroed => RangeSet::new(),
            TargetState::Dirty => {
                RangeSet::full(geometry.volume_size()).subtract(&manifest.chunks.allocated_ranges())
            }
        };
        RestorePlan {
            manifest,
            zero,
            duplicates,
            unique_fetch_bytes,
        }
    }

    /// Geometry of the snapshot being restored.
    pub fn geometry(&self) -> &ChunkGeometry {
        self.manifest.chunks.geometry()
    }

    /// Chunks to fetch and write, ascending by offset.
    pub fn fetches(&self) -> impl Iterator<Item = ChunkFetch> + '_ {
        let g = *self.geometry();
        self.manifest
            .chunks
            .iter_stored()
            .map(move |(index, chunk)| ChunkFetch {
                index,
                offset: g.chunk_offset(index),
                chunk: *chunk,
            })
    }

    /// Number of chunk indices written (stored chunks of the manifest).
    pub fn fetch_count(&self) -> u64 {
        self.manifest.chunks.stored_count()
    }

    /// The fetches grouped by stored chunk, in order of first use: each distinct chunk is
    /// downloaded once and written to every offset that holds it.
    pub fn fetch_groups(&self) -> impl Iterator<Item = FetchGroup> + '_ {
        self.fetches()
            .filter_map(|f| match self.duplicates.get(&f.chunk.hash) {
                None => Some(FetchGroup {
                    chunk: f.chunk,
                    targets: vec![(f.index, f.offset)],
                }),
                // Emitted at its first index only; later copies are written by that group.
                Some(targets) => {
                    (targets.first().map(|t| t.0) == Some(f.index)).then(|| FetchGroup {
                        chunk: f.chunk,
                        targets: targets.clone(),
                    })
                }
            })
    }

    /// Bytes downloaded when each distinct chunk is fetched once (see [`Self::fetch_groups`]).
    pub fn unique_fetch_bytes(&self) -> u64 {
        self.unique_fetch_bytes
    }

    /// Byte ranges that must be zeroed on the target (empty for a zeroed target).
    pub fn zero_ranges(&self) -> &RangeSet {
        &self.zero
    }

    /// Bytes downloaded from the store (stored object sizes, duplicates counted each time).
    pub fn fetch_bytes(&self) -> u64 {
        self.fetches().map(|f| f.chunk.stored_size).sum()
    }

    /// Data bytes written to the target (excluding zeroing).
    pub fn write_bytes(&self) -> u64 {
        self.manifest.chunks.allocated_bytes()
    }

    /// Bytes zeroed on the target.
    pub fn zero_bytes(&self) -> u64 {
        self.zero.total_bytes()
    }

    /// The state of chunk `index` in the plan's manifest.
    pub fn chunk_state(&self, index: u64) -> ChunkState {
        self.manifest.chunks.get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkMap, SnapshotMeta};
    use crate::names::{SnapshotName, VolumeName};
    use crate::time::Timestamp;

    fn manifest(size: u64, stored: &[u64]) -> Manifest {
        let g = ChunkGeometry::new(size, 4096).unwrap();
        let mut map = ChunkMap::new(g);
        for &i in stored {
            let r = ChunkRef {
                hash: ChunkHash([i as u8; 32]),
                stored_size: 10,
                crc32c: 0,
                raw_len: g.chunk_len(i),
            };
            map.set(i, ChunkState::Stored(r)).unwrap();
        }
        let meta = SnapshotMeta {
            volume: VolumeName::new("v").unwrap(),
            snapshot: SnapshotName::new("s").unwrap(),
            snapshot_id: "id".into(),
            created: Timestamp(0),
            source: Default::default(),
            labels: Default::default(),
            stats: Default::default(),
        };
        Manifest::new(meta, map, None).unwrap()
    }

    #[test]
    fn full_plan_reads_allocated_chunks_only() {
        let alloc = RangeSet::try_from_extents([(100, 10), (9000, 100)]).unwrap();
        let p = BackupPlan::full(5 * 4096, 4096, Some(&alloc)).unwrap();
        assert_eq!(p.chunks().iter().collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(p.read_bytes(), 8192);
        let past = RangeSet::try_from_extents([(20_000, 1000)]).unwrap();
        assert!(matches!(
            BackupPlan::full(5 * 4096, 4096, Some(&past)),
            Err(CoreError::RangePastEnd { .. })
        ));
        assert_eq!(
            BackupPlan::full(10_000, 4096, None).unwrap().chunk_count(),
            3
        );
    }

    #[test]
    fn incremental_plan_adds_resize_boundaries() {
        let parent = manifest(10_000, &[0, 2]);
        let none = RangeSet::new();
        assert_eq!(
            BackupPlan::incremental(&parent, &none, 10_000)
                .unwrap()
                .chunk_count(),
            0
        );
        // Grown: old short chunk 2 and the new area 3..5 are read.
        let grown = BackupPlan::incremental(&parent, &none, 5 * 4096).unwrap();
        assert_eq!(grown.chunks().iter().collect::<Vec<_>>(), vec![2, 3, 4]);
        // Shrunk to 6000: chunk 1 becomes short.
        let shrunk = BackupPlan::incremental(&parent, &none, 6000).unwrap();
        assert_eq!(shrunk.chunks().iter().collect::<Vec<_>>(), vec![1]);
        let past = RangeSet::try_from_extents([(9999, 2)]).unwrap();
        assert!(BackupPlan::incremental(&parent, &past, 10_000).is_err());
    }

    #[test]
    fn restore_plan_zeroes_only_dirty_targets() {
        let m = manifest(10_000, &[1]);
        let fresh = RestorePlan::new(&m, TargetState::Zeroed);
        assert_eq!(fresh.fetches().count(), 1);
        assert_eq!(fresh.fetch_count(), 1);
        assert_eq!(fresh.zero_bytes(), 0);
        assert_eq!(fresh.write_bytes(), 4096);
        let dirty = RestorePlan::new(&m, TargetState::Dirty);
        assert_eq!(
            dirty.zero_ranges(),
            &RangeSet::try_from_extents([(0, 4096), (8192, 10_000 - 8192)]).unwrap()
        );
        assert!(matches!(dirty.chunk_state(1), ChunkState::Stored(_)));

        // Two indices holding the same chunk are fetched once.
        let mut m = manifest(4 * 4096, &[0, 2]);
        let r = match m.chunks.get(0) {
            ChunkState::Stored(r) => r,
            ChunkState::Zero => unreachable!(),
        };
        m.chunks.set(3, ChunkState::Stored(r)).unwrap();
        let p = RestorePlan::new(&m, TargetState::Zeroed);
        let groups: Vec<FetchGroup> = p.fetch_groups().collect();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].targets, vec![(0, 0), (3, 3 * 4096)]);
        assert_eq!(p.fetch_bytes(), 30);
        assert_eq!(p.unique_fetch_bytes(), 20);
        assert_eq!(dirty.chunk_state(0), ChunkState::Zero);
    }
}
