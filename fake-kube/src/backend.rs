//! The simulated storage backend: the one thing two fake clusters share.
//!
//! It owns snapshot handles and their sizes, as a storage array would. Each fake
//! API server's simulated CSI driver cuts snapshots here and looks handles up here,
//! so a handle created through one cluster is visible to the other.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// One snapshot held by the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSnapshot {
    /// CSI snapshot id (the `snapshotHandle`).
    pub handle: String,
    /// Volume the snapshot was cut from (CSI volume id).
    pub source_volume: String,
    /// Size in bytes (reported as `restoreSize`).
    pub size_bytes: i64,
    /// Creation time, Unix nanoseconds.
    pub created_unix_nanos: i64,
}

#[derive(Default, Debug)]
struct Inner {
    next: u64,
    snapshots: BTreeMap<String, BackendSnapshot>,
}

/// Storage shared by any number of fake clusters; clones share state.
#[derive(Clone, Default, Debug)]
pub struct SharedBackend {
    inner: Arc<Mutex<Inner>>,
}

impl SharedBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic in another test thread must not hide this test's own result.
        self.inner
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Cuts a snapshot of `source_volume` and returns it (the simulated CreateSnapshot RPC).
    pub fn create_snapshot(&self, source_volume: &str, size_bytes: i64) -> BackendSnapshot {
        let mut inner = self.lock();
        inner.next += 1;
        let snap = BackendSnapshot {
            handle: format!("snap-{:06}", inner.next),
            source_volume: source_volume.to_string(),
            size_bytes,
            created_unix_nanos: crate::values::unix_nanos_now(),
        };
        inner.snapshots.insert(snap.handle.clone(), snap.clone());
        snap
    }

    /// Looks a handle up (the simulated ListSnapshots-by-id RPC).
    pub fn get(&self, handle: &str) -> Option<BackendSnapshot> {
        self.lock().snapshots.get(handle).cloned()
    }

    /// Deletes a snapshot (the simulated DeleteSnapshot RPC); true if it existed.
    pub fn delete(&self, handle: &str) -> bool {
        self.lock().snapshots.remove(handle).is_some()
    }

    /// All handles currently held, sorted.
    pub fn handles(&self) -> Vec<String> {
        self.lock().snapshots.keys().cloned().collect()
    }
}
