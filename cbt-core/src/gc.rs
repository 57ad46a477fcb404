//! Garbage-collection reachability and retention-policy evaluation.
//!
//! Owns the pure decisions of `prune`: which snapshots a policy keeps (with `now` injected) and
//! which stored chunks no remaining manifest references. It never deletes anything itself; the
//! repository executes the result under its exclusive lock.

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
    /// Stored chunks that stay.
    pub kept: u64,
    /// Referenced chunks that are not stored (a damaged repository; `verify` reports them).
    pub missing: Vec<ChunkHash>,
}

/// Compares the referenced set with the stored chunks `(hash, size)`.
pub fn plan_gc<I>(referenced: &BTreeMap<ChunkHash, u64>, stored: I) -> GcPlan
where
    I: IntoIterator<Item = (ChunkHash, u64)>,
{
    let mut plan = GcPlan::default();
    let mut seen = BTreeSet::new();
    for (hash, size) in stored {
        if !seen.insert(hash) {
            continue;
        }
        if referenced.contains_key(&hash) {
            plan.kept += 1;
        } else {
            plan.delete.push(hash);
            plan.reclaim_bytes += size;
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
