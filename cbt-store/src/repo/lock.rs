//! Repository locks: shared for backups, exclusive for prune / GC.
//!
//! Owns the lock protocol; holds no data. Lock objects are small JSON files:
//! `locks/exclusive` and `locks/shared/<id>`.
//!
//! # Protocol
//! * Shared: create `locks/shared/<id>`, *then* check `locks/exclusive`; if it exists, remove
//!   the shared lock again and fail with [`RepoError::Locked`].
//! * Exclusive: create `locks/exclusive` with `IfAbsent` (fails if held), *then* list
//!   `locks/shared/`; if any exists, remove the exclusive lock again and fail.
//!
//! Each side writes before it checks, so with a read-after-write consistent store (local
//! directories, S3 since 2020) at least one of two racing lockers sees the other: a backup and
//! a GC can never both proceed. Both may back off; retrying later resolves that.
//!
//! Locks do not expire: a crashed process leaves its lock behind and GC refuses to run until
//! an operator removes it with [`Repository::break_lock`] (`cbt lock break <id>`).
//! Expiry by age would let a slow-but-alive backup lose its protection, which is worse than a
//! manual step. [`LockInfo::holder_gone_here`] tells whether a holder ran on this host and is
//! gone, which is what an operator (or the CLI) needs to know before breaking a lock.

use std::sync::Arc;

use bytes::Bytes;
use cbt_core::Timestamp;
use serde::{Deserialize, Serialize};

use super::{Repository, Result, random_id};
use crate::repo::RepoError;
use crate::store::{ObjectStore, PutMode, PutOutcome, StoreError, list_all};

const EXCLUSIVE_KEY: &str = "locks/exclusive";
const SHARED_PREFIX: &str = "locks/shared/";

/// Which kind of lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// Many holders at once (backups); excludes GC.
    Shared,
    /// One holder and no shared holders (prune, GC).
    Exclusive,
}

/// What a lock object says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Lock id (pass it to [`Repository::break_lock`]).
    pub id: String,
    /// Shared or exclusive.
    pub kind: LockKind,
    /// What the holder is doing, e.g. `backup prod_db/nightly-3`.
    pub purpose: String,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When it was taken.
    pub created: Timestamp,
}

impl LockInfo {
    /// Whether the holder is known to be gone: the lock names this host and no process with
    /// its pid runs here. `None` when that cannot be told (another host, no `/proc`); a pid
    /// reused by another process reads as alive, so a `Some(true)` is safe to act on with
    /// [`Repository::break_lock`] as long as host names are unique (pods' are).
    pub fn holder_gone_here(&self) -> Option<bool> {
        if self.pid == 0 || self.host != host_name() || !std::path::Path::new("/proc/self").exists()
        {
            return None;
        }
        Some(!std::path::Path::new(&format!("/proc/{}", self.pid)).exists())
    }

    fn describe(&self) -> String {
        format!(
            "{:?} lock {} held by {} (pid {} on {}) since {}",
            self.kind, self.id, self.purpose, self.pid, self.host, self.created
        )
    }
}

/// A held lock. Release it with [`RepoLock::release`]; if it is dropped instead, removal is
/// attempted in the background on the current Tokio runtime.
#[derive(Debug)]
pub struct RepoLock {
    store: Arc<dyn ObjectStore>,
    key: String,
    info: LockInfo,
    released: bool,
}

impl RepoLock {
    /// The lock's description.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// Removes the lock object.
    ///
    /// # Errors
    /// Store errors (the lock then stays and must be broken by hand).
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.store
            .delete(&self.key)
            .await
            .map_err(|e| RepoError::store(format!("releasing lock {}", self.key), e))
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            let key = std::mem::take(&mut self.key);
            handle.spawn(async move {
                if let Err(e) = store.delete(&key).await {
                    tracing::warn!(%key, error = %e, "could not remove lock; break it by hand");
                }
            });
        }
    }
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

impl Repository {
    fn lock_info(&self, kind: LockKind, purpose: &str, now: Timestamp) -> LockInfo {
        LockInfo {
            id: random_id("lock"),
            kind,
            purpose: purpose.to_string(),
            host: host_name(),
            pid: std::process::id(),
            created: now,
        }
    }

    async fn read_lock(&self, key: &str) -> Result<Option<LockInfo>> {
        match self.store().get(key).await {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).unwrap_or_else(|_| {
                LockInfo {
                    id: key.rsplit('/').next().unwrap_or(key).to_string(),
                    kind: if key == EXCLUSIVE_KEY {
                        LockKind::Exclusive
                    } else {
                        LockKind::Shared
                    },
                    purpose: "unreadable lock object".into(),
                    host: "unknown".into(),
                    pid: 0,
                    created: Timestamp(0),
                }
            }))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(RepoError::store(format!("reading lock {key}"), e)),
        }
    }

    async fn put_lock(&self, key: &str, info: &LockInfo) -> Result<PutOutcome> {
        let body = serde_json::to_vec_pretty(info).map_err(|e| RepoError::Internal {
            message: format!("encoding lock: {e}"),
        })?;
        self.store()
            .put(key, Bytes::from(body), PutMode::IfAbsent)
            .await
            .map_err(|e| RepoError::store(format!("taking lock {key}"), e))
    }

    /// Takes a shared lock (backups).
    ///
    /// # Errors
    /// [`RepoError::Locked`] while prune/GC holds the exclusive lock; store errors.
    pub async fn lock_shared(&self, purpose: &str, now: Timestamp) -> Result<RepoLock> {
        let info = self.lock_info(LockKind::Shared, purpose, now);
        let key = format!("{SHARED_PREFIX}{}", info.id);
        if let Err(e) = self.put_lock(&key, &info).await {
            // The write may have landed with its answer lost: do not leave a stale lock.
            let _ = self.store().delete(&key).await;
            return Err(e);
        }
        let lock = RepoLock {
            store: self.store().clone(),
            key,
            info,
            released: false,
        };
        match self.read_lock(EXCLUSIVE_KEY).await {
            Ok(None) => Ok(lock),
            Ok(Some(holder)) => {
                lock.release().await?;
                Err(RepoError::Locked {
                    holders: vec![holder.describe()],
                })
            }
            Err(e) => {
                let _ = lock.release().await;
                Err(e)
            }
        }
    }

    /// Takes the exclusive lock (prune, GC).
    ///
    /// # Errors
    /// [`RepoError::Locked`] while any other lock exists; store errors.
    pub async fn lock_exclusive(&self, purpose: &str, now: Timestamp) -> Result<RepoLock> {
        let info = self.lock_info(LockKind::Exclusive, purpose, now);
        let outcome = match self.put_lock(EXCLUSIVE_KEY, &info).await {
            Ok(o) => o,
            Err(e) => {
                // Remove the lock only if the lost write was ours.
                if let Ok(Some(h)) = self.read_lock(EXCLUSIVE_KEY).await
                    && h.id == info.id
                {
                    let _ = self.store().delete(EXCLUSIVE_KEY).await;
                }
                return Err(e);
            }
        };
        if outcome == PutOutcome::AlreadyExists {
            let holders = match self.read_lock(EXCLUSIVE_KEY).await? {
                // A retried write whose first attempt landed finds its own lock.
                Some(h) if h.id == info.id => vec![],
                Some(h) => vec![h.describe()],
                None => vec!["exclusive lock (just released; retry)".into()],
            };
            if !holders.is_empty() {
                return Err(RepoError::Locked { holders });
            }
        }
        let lock = RepoLock {
            store: self.store().clone(),
            key: EXCLUSIVE_KEY.to_string(),
            info,
            released: false,
        };
        let shared = match self.shared_locks().await {
            Ok(s) => s.into_iter().map(|(_, info)| info).collect::<Vec<_>>(),
            Err(e) => {
                let _ = lock.release().await;
                return Err(e);
            }
        };
        if shared.is_empty() {
            return Ok(lock);
        }
        lock.release().await?;
        Err(RepoError::Locked {
            holders: shared.iter().map(LockInfo::describe).collect(),
        })
    }

    async fn shared_locks(&self) -> Result<Vec<(String, LockInfo)>> {
        let objects = list_all(self.store().as_ref(), SHARED_PREFIX)
            .await
            .map_err(|e| RepoError::store("listing locks", e))?;
        let mut out = Vec::new();
        for o in objects {
            if let Some(info) = self.read_lock(&o.key).await? {
                out.push((o.key, info));
            }
        }
        Ok(out)
    }

    /// Every lock currently held.
    ///
    /// # Errors
    /// Store errors.
    pub async fn list_locks(&self) -> Result<Vec<LockInfo>> {
        Ok(self
            .lock_objects()
            .await?
            .into_iter()
            .map(|(_, info)| info)
            .collect())
    }

    async fn lock_objects(&self) -> Result<Vec<(String, LockInfo)>> {
        let mut out: Vec<(String, LockInfo)> = self
            .read_lock(EXCLUSIVE_KEY)
            .await?
            .map(|i| (EXCLUSIVE_KEY.to_string(), i))
            .into_iter()
            .collect();
        out.extend(self.shared_locks().await?);
        Ok(out)
    }

    /// Removes a lock left behind by a process that is gone. Returns false if no lock has
    /// this id. Breaking the lock of a live process exposes it to GC: check first.
    ///
    /// # Errors
    /// Store errors.
    pub async fn break_lock(&self, id: &str) -> Result<bool> {
        for (key, info) in self.lock_objects().await? {
            if info.id == id {
                self.store()
                    .delete(&key)
                    .await
                    .map_err(|e| RepoError::store(format!("breaking lock {key}"), e))?;
                return Ok(true);
            }
        }
        Ok(false)
    }
}
