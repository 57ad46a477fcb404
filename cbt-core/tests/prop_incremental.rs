//! Property test: an incremental manifest (parent map + changed chunks) restores exactly the
//! same bytes as a full backup of the same image, using an in-memory chunk store.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use cbt_core::manifest::{ChunkHash, ChunkMap, ChunkRef, ChunkState, Manifest, SnapshotMeta};
use cbt_core::plan::{BackupPlan, RestorePlan, TargetState};
use cbt_core::ranges::{ChunkGeometry, RangeSet};
use cbt_core::{SnapshotName, Timestamp, VolumeName};
use proptest::prelude::*;

const CS: u64 = 4096;

/// A 256-bit test hash from four seeded SipHash runs (collisions are not a concern here).
fn test_hash(data: &[u8]) -> ChunkHash {
    let mut out = [0u8; 32];
    for (seed, part) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        data.hash(&mut h);
        part.copy_from_slice(&h.finish().to_le_bytes());
    }
    ChunkHash(out)
}

#[derive(Default)]
struct MemStore {
    chunks: HashMap<ChunkHash, Vec<u8>>,
}

impl MemStore {
    /// Reads the planned chunks from `image`, "uploads" non-zero ones, returns the changes.
    fn backup(&mut self, image: &[u8], plan: &BackupPlan) -> Vec<(u64, ChunkState)> {
        plan.reads()
            .map(|r| {
                let data = &image[r.offset as usize..(r.offset + r.len) as usize];
                if data.iter().all(|b| *b == 0) {
                    return (r.index, ChunkState::Zero);
                }
                let hash = test_hash(data);
                self.chunks.entry(hash).or_insert_with(|| data.to_vec());
                let chunk = ChunkRef {
                    hash,
                    stored_size: data.len() as u64,
                    crc32c: 0,
                    raw_len: r.len,
                };
                (r.index, ChunkState::Stored(chunk))
            })
            .collect()
    }

    fn restore(&self, m: &Manifest, target: &mut Vec<u8>, state: TargetState) {
        target.resize(m.volume_size() as usize, 0);
        let plan = RestorePlan::new(m, state);
        for g in plan.fetch_groups() {
            let data = &self.chunks[&g.chunk.hash];
            for (_, off) in g.targets {
                target[off as usize..off as usize + data.len()].copy_from_slice(data);
            }
        }
        for z in plan.zero_ranges() {
            target[z.start() as usize..z.end() as usize].fill(0);
        }
    }
}

fn meta(name: &str) -> SnapshotMeta {
    SnapshotMeta {
        volume: VolumeName::new("vol").unwrap(),
        snapshot: SnapshotName::new(name).unwrap(),
        snapshot_id: format!("id-{name}"),
        created: Timestamp(0),
        source: Default::default(),
        labels: BTreeMap::new(),
        stats: Default::default(),
    }
}

fn full_backup(store: &mut MemStore, image: &[u8], name: &str) -> Manifest {
    let plan = BackupPlan::full(image.len() as u64, CS, None).unwrap();
    let mut map = ChunkMap::new(ChunkGeometry::new(image.len() as u64, CS).unwrap());
    for (i, s) in store.backup(image, &plan) {
        map.set(i, s).unwrap();
    }
    Manifest::new(meta(name), map, None).unwrap()
}

/// A write: offset, length and fill byte (0 = discard/zeroing).
type Write = (u64, u64, u8);

fn apply(image: &mut Vec<u8>, writes: &[Write], new_size: usize) -> RangeSet {
    image.resize(new_size, 0);
    let mut changed = Vec::new();
    for &(off, len, fill) in writes {
        let off = (off as usize).min(new_size.saturating_sub(1));
        let end = (off + len as usize).min(new_size);
        if end > off {
            image[off..end].fill(fill);
            changed.push((off as u64, (end - off) as u64));
        }
    }
    RangeSet::try_from_extents(changed).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn incremental_restores_like_full(
        size in 1usize..40_000,
        seed_writes in prop::collection::vec((0u64..40_000, 1u64..9000, 0u8..4), 0..6),
        writes in prop::collection::vec((0u64..50_000, 1u64..9000, 0u8..4), 0..6),
        new_size in prop::option::of(1usize..50_000),
        dirty in any::<bool>(),
    ) {
        let mut store = MemStore::default();
        let mut image = vec![0u8; size];
        apply(&mut image, &seed_writes, size);
        let parent = full_backup(&mut store, &image, "base");

        let new_size = new_size.unwrap_or(size);
        let changed = apply(&mut image, &writes, new_size);
        let plan = BackupPlan::incremental(&parent, &changed, new_size as u64).unwrap();
        let changes = store.backup(&image, &plan);
        let child = Manifest::derive_child(&parent, meta("inc"), new_size as u64, changes).unwrap();

        let full = full_backup(&mut store, &image, "full");
        prop_assert_eq!(&child.chunks, &full.chunks);

        let state = if dirty { TargetState::Dirty } else { TargetState::Zeroed };
        let mut target = if dirty { vec![0xEE; new_size] } else { vec![0; new_size] };
        store.restore(&child, &mut target, state);
        prop_assert!(target == image, "restored image differs");

        // The manifest survives its wire form unchanged.
        prop_assert_eq!(Manifest::from_json(&child.to_json().unwrap()).unwrap(), child);
    }
}
