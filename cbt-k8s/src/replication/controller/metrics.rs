//! Prometheus metrics of the replication controller, rendered in the text exposition format.
//!
//! Owns the counters the reconciler updates and their rendering; it never
//! serves HTTP (see [`super::serve`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the reconcile duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
struct Histogram {
    buckets: [u64; DURATION_BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    /// (kind, result) -> count.
    reconciles: BTreeMap<(&'static str, &'static str), u64>,
    /// (kind, error kind) -> count.
    errors: BTreeMap<(&'static str, String), u64>,
    /// kind -> durations.
    durations: BTreeMap<&'static str, Histogram>,
    /// `Kind/ns/name` -> (kind, observed state).
    states: HashMap<String, (&'static str, String)>,
}

/// Counters and gauges of one controller process.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    leader: AtomicBool,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Records one finished reconcile: its kind, result label and duration.
    pub fn reconciled(&self, kind: &'static str, result: &'static str, took: Duration) {
        let mut inner = lock(&self.inner);
        *inner.reconciles.entry((kind, result)).or_default() += 1;
        let h = inner.durations.entry(kind).or_default();
        let secs = took.as_secs_f64();
        for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Records a failed reconcile by error kind.
    pub fn error(&self, kind: &'static str, error_kind: &str) {
        *lock(&self.inner)
            .errors
            .entry((kind, error_kind.to_string()))
            .or_default() += 1;
    }

    /// Sets the observed state of one object (`None` forgets it, e.g. once deleted).
    pub fn set_state(&self, kind: &'static str, key: &str, state: Option<&str>) {
        let mut inner = lock(&self.inner);
        match state {
            Some(s) => {
                inner.states.insert(key.to_string(), (kind, s.to_string()));
            }
            None => {
                inner.states.remove(key);
            }
        }
    }

    /// Sets whether this replica holds the leader Lease.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Total reconciles of `kind` with `result` so far.
    pub fn reconcile_count(&self, kind: &str, result: &str) -> u64 {
        lock(&self.inner)
            .reconciles
            .iter()
            .filter(|((k, r), _)| *k == kind && *r == result)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Total reconciles of `kind` so far, whatever their result.
    pub fn reconcile_total(&self, kind: &str) -> u64 {
        lock(&self.inner)
            .reconciles
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, n)| *n)
            .sum()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let inner = lock(&self.inner);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP cbt_replicator_reconciles_total Reconciles finished, by kind and result.\n# TYPE cbt_replicator_reconciles_total counter"
        );
        for ((kind, result), n) in &inner.reconciles {
            let _ = writeln!(
                out,
                "cbt_replicator_reconciles_total{{kind=\"{kind}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP cbt_replicator_reconcile_errors_total Reconciles that failed, by kind and error kind.\n# TYPE cbt_replicator_reconcile_errors_total counter"
        );
        for ((kind, err), n) in &inner.errors {
            let _ = writeln!(
                out,
                "cbt_replicator_reconcile_errors_total{{kind=\"{kind}\",error=\"{}\"}} {n}",
                escape(err)
            );
        }
        let _ = writeln!(
            out,
            "# HELP cbt_replicator_reconcile_duration_seconds Time spent in one reconcile.\n# TYPE cbt_replicator_reconcile_duration_seconds histogram"
        );
        for (kind, h) in &inner.durations {
            for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "cbt_replicator_reconcile_duration_seconds_bucket{{kind=\"{kind}\",le=\"{bound}\"}} {}",
                    h.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "cbt_replicator_reconcile_duration_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {}\ncbt_replicator_reconcile_duration_seconds_sum{{kind=\"{kind}\"}} {}\ncbt_replicator_reconcile_duration_seconds_count{{kind=\"{kind}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP cbt_replicator_objects Replication objects served, by kind and observed state.\n# TYPE cbt_replicator_objects gauge"
        );
        let mut per_state: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (kind, state) in inner.states.values() {
            *per_state.entry((kind, state.as_str())).or_default() += 1;
        }
        for ((kind, state), n) in per_state {
            let _ = writeln!(
                out,
                "cbt_replicator_objects{{kind=\"{kind}\",state=\"{}\"}} {n}",
                escape(state)
            );
        }
        let _ = writeln!(
            out,
            "# HELP cbt_replicator_leader 1 while this replica holds the leader Lease.\n# TYPE cbt_replicator_leader gauge\ncbt_replicator_leader {}",
            u8::from(self.leader.load(Ordering::Relaxed))
        );
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_state_gauges() {
        let m = Metrics::default();
        m.reconciled("VolumeReplication", "converged", Duration::from_millis(20));
        m.reconciled("VolumeReplication", "converged", Duration::from_millis(300));
        m.error("VolumeReplication", "transient");
        m.set_state(
            "VolumeReplication",
            "VolumeReplication/a/x",
            Some("Primary"),
        );
        m.set_state(
            "VolumeReplication",
            "VolumeReplication/a/y",
            Some("Primary"),
        );
        m.set_state(
            "VolumeReplication",
            "VolumeReplication/a/z",
            Some("Secondary"),
        );
        m.set_state("VolumeReplication", "VolumeReplication/a/z", None);
        m.set_leader(true);
        let text = m.render();
        assert!(text.contains(
            "cbt_replicator_reconciles_total{kind=\"VolumeReplication\",result=\"converged\"} 2"
        ));
        assert!(text.contains(
            "cbt_replicator_reconcile_duration_seconds_bucket{kind=\"VolumeReplication\",le=\"0.025\"} 1"
        ));
        assert!(text.contains(
            "cbt_replicator_reconcile_duration_seconds_bucket{kind=\"VolumeReplication\",le=\"0.5\"} 2"
        ));
        assert!(
            text.contains("cbt_replicator_objects{kind=\"VolumeReplication\",state=\"Primary\"} 2")
        );
        assert!(!text.contains("state=\"Secondary\""));
        assert!(text.contains("cbt_replicator_leader 1"));
        assert!(text.contains(
            "cbt_replicator_reconcile_errors_total{kind=\"VolumeReplication\",error=\"transient\"} 1"
        ));
        assert_eq!(m.reconcile_count("VolumeReplication", "converged"), 2);
    }

    #[test]
    fn the_total_counts_every_result_of_one_kind() {
        let m = Metrics::default();
        m.reconciled("VolumeReplication", "converged", Duration::ZERO);
        m.reconciled("VolumeReplication", "not_leader", Duration::ZERO);
        m.reconciled("VolumeReplication", "released", Duration::ZERO);
        m.reconciled("VolumeGroupReplication", "converged", Duration::ZERO);
        assert_eq!(m.reconcile_total("VolumeReplication"), 3);
        assert_eq!(m.reconcile_total("VolumeGroupReplication"), 1);
        assert_eq!(m.reconcile_total("VolumeReplicationContent"), 0);
    }
}
