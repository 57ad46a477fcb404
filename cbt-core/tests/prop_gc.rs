//! Property tests: GC never deletes a referenced chunk and retention always keeps the newest.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cbt_core::gc::{KeepReason, RetentionPolicy, plan_gc};
use cbt_core::{ChunkHash, SnapshotName, Timestamp};
use proptest::prelude::*;

fn h(b: u8) -> ChunkHash {
    ChunkHash([b; 32])
}

proptest! {
    #[test]
    fn gc_partitions_stored_chunks(
        referenced in prop::collection::btree_set(0u8..40, 0..30),
        stored in prop::collection::vec((0u8..40, 1u64..1000), 0..50),
    ) {
        let referenced: BTreeMap<ChunkHash, u64> = referenced.iter().map(|b| (h(*b), 1)).collect();
        let plan = plan_gc(&referenced, stored.iter().map(|(b, s)| (h(*b), *s)));
        let stored_set: BTreeSet<ChunkHash> = stored.iter().map(|(b, _)| h(*b)).collect();
        for d in &plan.delete {
            prop_assert!(!referenced.contains_key(d), "referenced chunk deleted");
            prop_assert!(stored_set.contains(d));
        }
        prop_assert_eq!(plan.delete.len() as u64 + plan.kept, stored_set.len() as u64);
        let missing: Vec<ChunkHash> =
            referenced.keys().filter(|k| !stored_set.contains(*k)).copied().collect();
        prop_assert_eq!(plan.missing, missing);
    }

    #[test]
    fn retention_keeps_newest_and_respects_rules(
        times in prop::collection::btree_set(0i64..10_000, 1..20),
        keep_last in prop::option::of(0u32..6),
        within in prop::option::of(0u64..10_000),
        now in 0i64..12_000,
    ) {
        prop_assume!(keep_last.is_some() || within.is_some());
        let snaps: Vec<(SnapshotName, Timestamp)> = times
            .iter()
            .map(|t| (SnapshotName::new(format!("s{t}")).unwrap(), Timestamp::from_unix_secs(*t)))
            .collect();
        let policy = RetentionPolicy { keep_last, keep_within: within.map(Duration::from_secs) };
        let d = policy.evaluate(&snaps, Timestamp::from_unix_secs(now)).unwrap();
        prop_assert_eq!(d.keep.len() + d.remove.len(), snaps.len());
        let newest = times.iter().max().unwrap();
        prop_assert_eq!(d.keep[0].0.as_str(), format!("s{newest}"));
        prop_assert!(d.keep[0].1.contains(&KeepReason::Newest));
        let kept_last = d.keep.iter().filter(|(_, r)| r.contains(&KeepReason::Last)).count();
        prop_assert_eq!(kept_last, (keep_last.unwrap_or(0) as usize).min(snaps.len()));
        for (name, created) in &snaps {
            let removed = d.remove.contains(name);
            if let Some(w) = within
                && created.unix_millis() >= (now - w as i64) * 1000
            {
                prop_assert!(!removed, "{} is within {}s of now", name, w);
            }
        }
    }
}
