//! Garbage-collection reachability and retention-policy evaluation.
//!
//! Owns the pure decisions of `prune`: which snapshots a policy keeps (with `now` injected) and
//! which stored chunks no remaining manifest references. It never deletes anything itself; the
//! repository executes the result under its exclusive lock.
//!
//! # Time the repository can trust
//! Two clocks are involved and either may be wrong: the writer's (a snapshot's `created`, the
//! caller's `now`) and the store's (an object's last-modified time). Decisions take the
//! earlier of the two where being early is the safe side:
//! * GC's grace period counts back from [`trusted_now`], the earlier of the caller's clock and
//!   the store's, so a clock running ahead cannot make a chunk written a minute ago look old.
//! * Retention orders snapshots by [`trusted_created`], the earlier of `created` and the time
//!   the store received the manifest, so a writer whose clock runs ahead cannot make its
//!   snapshot "newest" for years and push real backups out of `keep-last`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::manifest::{ChunkHash, Manifest};
use crate::names::SnapshotName;
use crate::time::Timestamp;

/// Every chunk referenced by `manifests`, with its stored size.
pub fn referenced_chunks<'a, I>(manifests: I) -> BTreeMap<ChunkHash, u64>
where
    I: IntoIterator<Item = &'a Manifest>,
{
    let mut out = BTreeMap::new();
    for m in manifests {
        for (_, r) in m.chunks.iter_stored() {
            out.insert(r.hash, r.stored_size);
        }
    }
    out
}

/// What garbage collection would delete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcPlan {
    /// Stored chunks no manifest references, ascending.
    pub delete: Vec<ChunkHash>,
    /// Bytes those chunks occupy.
    pub reclaim_bytes: u64,
    /// Stored chunks that stay (referenced, or unreferenced but within the grace period).
    pub kept: u64,
    /// Unreferenced chunks kept because they were written within the grace period (or the
    /// store reports no time for them): a backup the GC cannot see may be about to use them.
    pub recent: u64,
    /// Bytes of those.
    pub recent_bytes: u64,
    /// Referenced chunks that are not stored (a damaged repository; `verify` reports them).
    pub missing: Vec<ChunkHash>,
}

/// One stored chunk as a listing of the store reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    /// Content hash (the object's name).
    pub hash: ChunkHash,
    /// Object size in bytes.
    pub size: u64,
    /// When the store last wrote it, by the store's clock, if it says.
    pub modified: Option<Timestamp>,
}

/// Compares the referenced set with the stored chunks `(hash, size)`, with no grace period.
pub fn plan_gc<I>(referenced: &BTreeMap<ChunkHash, u64>, stored: I) -> GcPlan
where
    I: IntoIterator<Item = (ChunkHash, u64)>,
{
    plan_gc_with_grace(
        referenced,
        stored.into_iter().map(|(hash, size)| StoredChunk {
            hash,
            size,
            modified: None,
        }),
        None,
    )
}

/// Compares the referenced set with the stored chunks. With `recent_since`, an unreferenced
/// chunk modified at or after it, or whose modification time is unknown, is kept (counted in
/// [`GcPlan::recent`]) instead of deleted.
///
/// # Guarantees
/// A referenced chunk is never in [`GcPlan::delete`]; neither is a chunk within the grace
/// period. Sums saturate instead of overflowing.
pub fn plan_gc_with_grace<I>(
    referenced: &BTreeMap<ChunkHash, u64>,
    stored: I,
    recent_since: Option<Timestamp>,
) -> GcPlan
where
    I: IntoIterator<Item = StoredChunk>,
{
    let mut plan = GcPlan::default();
    let mut seen = BTreeSet::new();
    for c in stored {
        if !seen.insert(c.hash) {
            continue;
        }
        let recent = recent_since.is_some_and(|since| c.modified.is_none_or(|m| m >= since));
        if referenced.contains_key(&c.hash) {
            plan.kept += 1;
        } else if recent {
            plan.kept += 1;
            plan.recent += 1;
            plan.recent_bytes = plan.recent_bytes.saturating_add(c.size);
        } else {
            plan.delete.push(c.hash);
            plan.reclaim_bytes = plan.reclaim_bytes.saturating_add(c.size);
        }
    }
    plan.delete.sort_unstable();
    plan.missing = referenced
        .keys()
        .filter(|h| !seen.contains(*h))
        .copied()
        .collect();
    plan
}

/// The current time to measure a grace period from: the earlier of the caller's clock and the
/// store's (when the store reported one), so neither clock running ahead shortens the grace.
pub fn trusted_now(caller_now: Timestamp, store_now: Option<Timestamp>) -> Timestamp {
    store_now.map_or(caller_now, |s| s.min(caller_now))
}

/// The creation time retention should use for a snapshot: its recorded `created`, but never
/// later than when the store received its manifest (`stored_at`, by the store's clock).
pub fn trusted_created(created: Timestamp, stored_at: Option<Timestamp>) -> Timestamp {
    stored_at.map_or(created, |s| s.min(created))
}

/// Which snapshots of one volume to keep.
///
/// The newest snapshot is always kept, whatever the rules: it is the base of the next
/// incremental and a policy must never leave a volume without a backup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Keep the N newest snapshots.
    pub keep_last: Option<u32>,
    /// Keep snapshots created within this duration before `now`.
    pub keep_within: Option<Duration>,
}

/// Why a snapshot is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeepReason {
    /// Among the newest `keep_last`.
    Last,
    /// Created within `keep_within` of now.
    Within,
    /// The newest snapshot of the volume.
    Newest,
}

/// The outcome of applying a policy to one volume's snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionDecision {
    /// Snapshots kept, newest first, with every reason that keeps them.
    pub keep: Vec<(SnapshotName, Vec<KeepReason>)>,
    /// Snapshots the policy removes, newest first.
    pub remove: Vec<SnapshotName>,
}

impl RetentionPolicy {
    /// Decides which of `snapshots` (name, creation time) to keep at time `now`.
    ///
    /// # Errors
    /// [`CoreError::EmptyRetentionPolicy`] when no rule is set (it would delete all but one).
    pub fn evaluate(
        &self,
        snapshots: &[(SnapshotName, Timestamp)],
        now: Timestamp,
    ) -> Result<RetentionDecision, CoreError> {
        if self.keep_last.is_none() && self.keep_within.is_none() {
            return Err(CoreError::EmptyRetentionPolicy);
        }
        let mut sorted: Vec<&(SnapshotName, Timestamp)> = snapshots.iter().collect();
        // Newest first; names break ties so the result does not depend on input order.
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        let cutoff = self.keep_within.map(|d| now.saturating_sub(d));
        let mut out = RetentionDecision::default();
        for (rank, (name, created)) in sorted.into_iter().enumerate() {
            let mut reasons = Vec::new();
            if rank == 0 {
                reasons.push(KeepReason::Newest);
            }
            if self.keep_last.is_some_and(|n| (rank as u64) < u64::from(n)) {
                reasons.push(KeepReason::Last);
            }
            if cutoff.is_some_and(|c| *created >= c) {
                reasons.push(KeepReason::Within);
            }
            if reasons.is_empty() {
                out.remove.push(name.clone());
            } else {
                out.keep.push((name.clone(), reasons));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(v: &[(&str, i64)]) -> Vec<(SnapshotName, Timestamp)> {
        v.iter()
            .map(|(n, t)| {
                (
                    SnapshotName::new(*n).unwrap(),
                    Timestamp::from_unix_secs(*t),
                )
            })
            .collect()
    }

    fn names(v: &[SnapshotName]) -> Vec<&str> {
        v.iter().map(|n| n.as_str()).collect()
    }

    #[test]
    fn keep_last_and_within() {
        let s = snaps(&[("a", 100), ("d", 400), ("b", 200), ("c", 300)]);
        let now = Timestamp::from_unix_secs(1000);
        let last2 = RetentionPolicy {
            keep_last: Some(2),
            keep_within: None,
        };
        assert_eq!(
            names(&last2.evaluate(&s, now).unwrap().remove),
            vec!["b", "a"]
        );
        let within = RetentionPolicy {
            keep_last: None,
            keep_within: Some(Duration::from_secs(750)),
        };
        let d = within.evaluate(&s, now).unwrap();
        assert_eq!(names(&d.remove), vec!["b", "a"]);
        assert_eq!(d.keep[0].1, vec![KeepReason::Newest, KeepReason::Within]);
        // Everything old: the newest still survives.
        let short = RetentionPolicy {
            keep_last: None,
            keep_within: Some(Duration::from_secs(1)),
        };
        assert_eq!(
            names(&short.evaluate(&s, now).unwrap().remove),
            vec!["c", "b", "a"]
        );
        assert_eq!(
            RetentionPolicy::default().evaluate(&s, now),
            Err(CoreError::EmptyRetentionPolicy)
        );
    }

    #[test]
    fn grace_keeps_recent_and_undated_unreferenced_chunks() {
        let h = |b| ChunkHash([b; 32]);
        let at = |t| Some(Timestamp(t));
        let referenced = BTreeMap::from([(h(1), 10)]);
        let stored = [
            StoredChunk {
                hash: h(1),
                size: 10,
                modified: at(0),
            },
            StoredChunk {
                hash: h(2),
                size: 20,
                modified: at(99),
            },
            StoredChunk {
                hash: h(3),
                size: 30,
                modified: at(100),
            },
            StoredChunk {
                hash: h(4),
                size: 40,
                modified: None,
            },
        ];
        let plan = plan_gc_with_grace(&referenced, stored, Some(Timestamp(100)));
        assert_eq!(plan.delete, vec![h(2)]);
        assert_eq!((plan.kept, plan.recent, plan.recent_bytes), (3, 2, 70));
        let none = plan_gc_with_grace(&referenced, stored, None);
        assert_eq!(none.delete, vec![h(2), h(3), h(4)]);
        assert_eq!(trusted_now(Timestamp(5), Some(Timestamp(3))), Timestamp(3));
        assert_eq!(trusted_now(Timestamp(5), None), Timestamp(5));
        assert_eq!(
            trusted_created(Timestamp(9), Some(Timestamp(4))),
            Timestamp(4)
        );
        assert_eq!(
            trusted_created(Timestamp(2), Some(Timestamp(4))),
            Timestamp(2)
        );
    }

    #[test]
    fn gc_finds_unreferenced_and_missing() {
        let h = |b| ChunkHash([b; 32]);
        let referenced = BTreeMap::from([(h(1), 10), (h(2), 20)]);
        let plan = plan_gc(
            &referenced,
            [(h(3), 30), (h(1), 10), (h(4), 40), (h(3), 30)],
        );
        assert_eq!(plan.delete, vec![h(3), h(4)]);
        assert_eq!(plan.reclaim_bytes, 70);
        assert_eq!(plan.kept, 1);
        assert_eq!(plan.missing, vec![h(2)]);
    }
}
