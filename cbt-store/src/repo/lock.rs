//! Repository locks: shared for backups, exclusive for prune / GC, and one for key changes.
//!
//! Owns the lock protocol; holds no data. Lock objects are small JSON files (sealed in an
//! encrypted repository): `locks/exclusive`, `locks/shared/<id>` and `locks/keys`.
//!
//! `locks/keys` serializes changes of the key slots (`cbt key add|remove`): created with
//! `IfAbsent` like the exclusive lock, but independent of the others, so a password can be
//! changed while a backup runs, and two removals can never both see the other's slot as the
//! one that remains. It is listed and broken like the others.
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
//! gone; `break_lock` breaks only such a lock unless forced ([`BreakMode::Force`]), because
//! breaking a live holder's lock exposes its work to GC.
//!
//! Breaking is never silently fatal for the holder: a backup re-checks before it commits that
//! its lock object still exists ([`RepoLock::still_held`]) and fails instead of committing,
//! and GC's grace period keeps the chunks such a backup uploaded meanwhile.
//!
//! Releasing (or dropping) a lock, and breaking one, delete a lock object only after reading
//! it back and finding the expected id: a lock that was broken and then taken by another
//! process (`locks/exclusive` is one key for every holder) is left alone. A shared lock is
//! released without that read: its key carries its own random id, so nobody else's lock can
//! be there (see `remove_if_ours`). The object stores
//! offer no conditional delete, so a replacement in the instant between that read and the
//! delete is not excluded; it would need a lock broken by hand at that very moment.

use std::sync::Arc;

use bytes::Bytes;
use cbt_core::Timestamp;
use cbt_core::text::Escaped;
use serde::{Deserialize, Serialize};

use super::{Codec, Repository, Result, random_id};
use crate::crypto::ObjectKind;
use crate::repo::RepoError;
use crate::store::{ObjectStore, PutMode, PutOptions, PutOutcome, StoreError, list_all};

const EXCLUSIVE_KEY: &str = "locks/exclusive";
const KEYS_LOCK_KEY: &str = "locks/keys";
/// Largest lock object accepted (ours are a few hundred bytes).
pub const MAX_LOCK_LEN: u64 = 64 * 1024;
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

    /// One line for people; the holder's own text (id, purpose, host) is escaped, since
    /// anyone with write access to the repository can put anything there.
    pub fn describe(&self) -> String {
        format!(
            "{:?} lock {} held by {} (pid {} on {}) since {}",
            self.kind,
            Escaped(&self.id),
            Escaped(&self.purpose),
            self.pid,
            Escaped(&self.host),
            self.created
        )
    }
}

/// A held lock. Release it with [`RepoLock::release`]; if it is dropped instead, removal is
/// attempted in the background on the current Tokio runtime.
#[derive(Debug)]
pub struct RepoLock {
    store: Arc<dyn ObjectStore>,
    codec: Codec,
    key: String,
    info: LockInfo,
    released: bool,
}

impl RepoLock {
    /// The lock's description.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }

    /// Whether the lock is still in place: its object exists and carries this lock's id
    /// (false once someone broke it, even if another lock now has the same key).
    ///
    /// # Errors
    /// Store errors.
    pub async fn still_held(&self) -> Result<bool> {
        Ok(read_lock_id(self.store.as_ref(), &self.codec, &self.key)
            .await?
            .as_deref()
            == Some(self.info.id.as_str()))
    }

    /// When the store wrote this lock object, by the store's own clock (`None` if the store
    /// does not say, or the object is gone): a time the repository can trust.
    ///
    /// # Errors
    /// Store errors.
    pub async fn stored_at(&self) -> Result<Option<Timestamp>> {
        let meta = self
            .store
            .head(&self.key)
            .await
            .map_err(|e| RepoError::store(format!("checking lock {}", self.key), e))?;
        Ok(meta
            .and_then(|m| m.last_modified)
            .map(Timestamp::from_system_time))
    }

    /// Removes the lock object, if it is still ours.
    ///
    /// # Errors
    /// Store errors (the lock then stays and must be broken by hand).
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        remove_if_ours(self.store.as_ref(), &self.codec, &self.key, &self.info.id)
            .await
            .map(|_| ())
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            let codec = self.codec.clone();
            let key = std::mem::take(&mut self.key);
            let id = std::mem::take(&mut self.info.id);
            handle.spawn(async move {
                if let Err(e) = remove_if_ours(store.as_ref(), &codec, &key, &id).await {
                    tracing::warn!(%key, error = %e, "could not remove lock; break it by hand");
                }
            });
        }
    }
}

/// The id in the lock object at `key` (`None` if absent or unreadable).
async fn read_lock_id(store: &dyn ObjectStore, codec: &Codec, key: &str) -> Result<Option<String>> {
    match store.get_bounded(key, MAX_LOCK_LEN).await {
        Ok(b) => Ok(codec
            .open_object(ObjectKind::Lock, key, b)
            .ok()
            .and_then(|b| serde_json::from_slice::<LockInfo>(&b).ok())
            .map(|i| i.id)),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) if e.kind() == crate::store::ErrorKind::Integrity => Ok(None),
        Err(e) => Err(RepoError::store(format!("reading lock {key}"), e)),
    }
}

/// Deletes the lock object at `key` only if it carries `id`; true if it was deleted (or,
/// for a shared lock, is gone now).
///
/// A shared lock's key is made of its own (random) id, so no other holder ever writes it:
/// whatever is there is ours or nothing (broken: deleting an absent key succeeds), and it is
/// deleted without being read first. Only the keys every holder shares (`locks/exclusive`,
/// `locks/keys`) can hold someone else's lock and are read back first.
async fn remove_if_ours(
    store: &dyn ObjectStore,
    codec: &Codec,
    key: &str,
    id: &str,
) -> Result<bool> {
    let own_key = key
        .strip_prefix(SHARED_PREFIX)
        .is_some_and(|rest| rest == id);
    if !own_key && read_lock_id(store, codec, key).await?.as_deref() != Some(id) {
        tracing::warn!(%key, id, "lock was broken or replaced; leaving the current one alone");
        return Ok(false);
    }
    store
        .delete(key)
        .await
        .map_err(|e| RepoError::store(format!("releasing lock {key}"), e))?;
    Ok(true)
}

/// How [`Repository::break_lock`] treats a holder that may still be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakMode {
    /// Break only a lock whose holder ran on this host and is gone
    /// ([`LockInfo::holder_gone_here`] is `Some(true)`).
    IfHolderGone,
    /// Break it whatever the holder's state: its work loses its protection against GC
    /// (a backup then fails before committing; a prune may already have deleted data).
    Force,
}

/// What the holder of a lock is known to be, for [`RepoError::LockInUse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HolderState {
    /// Running on this host (its process exists).
    AliveHere,
    /// Cannot be told: another host, an unreadable lock object, or no `/proc`.
    Unknown,
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
        // A lock object that cannot be read still stands for a holder: it keeps blocking what
        // it blocks, and shows up (by its key) for an operator to inspect and break.
        let unreadable = |why: &str| LockInfo {
            id: key.rsplit('/').next().unwrap_or(key).to_string(),
            kind: if key == EXCLUSIVE_KEY {
                LockKind::Exclusive
            } else {
                LockKind::Shared
            },
            purpose: format!("unreadable lock object ({why})"),
            host: "unknown".into(),
            pid: 0,
            created: Timestamp(0),
        };
        match self.store().get_bounded(key, MAX_LOCK_LEN).await {
            Ok(b) => Ok(Some(
                match self.codec().open_object(ObjectKind::Lock, key, b) {
                    Ok(b) => {
                        serde_json::from_slice(&b).unwrap_or_else(|_| unreadable("not a lock"))
                    }
                    Err(_) => unreadable("cannot be opened with this repository's key"),
                },
            )),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) if e.kind() == crate::store::ErrorKind::Integrity => {
                Ok(Some(unreadable("damaged or oversized")))
            }
            Err(e) => Err(RepoError::store(format!("reading lock {key}"), e)),
        }
    }

    /// Writes a lock object with `IfAbsent`. A `durable` put is on disk when it returns;
    /// otherwise it is visible to every other process at once (all the protocol needs) and
    /// on disk after the store's next sync (a backup's commit), which spares a backup two
    /// `fsync`s on a local store: a shared lock protects only while its holder runs, and a
    /// host crash ends the holder too, so losing (or half-writing) it in that crash changes
    /// nothing (a damaged lock reads as a holder and is broken like a stale one).
    async fn put_lock(&self, key: &str, info: &LockInfo, durable: bool) -> Result<PutOutcome> {
        let body = serde_json::to_vec_pretty(info).map_err(|e| RepoError::Internal {
            message: format!("encoding lock: {e}"),
        })?;
        let body = self
            .codec()
            .seal_object(ObjectKind::Lock, key, Bytes::from(body))?;
        let opts = PutOptions {
            defer_sync: !durable,
            ..PutOptions::new(PutMode::IfAbsent)
        };
        self.store()
            .put_with(key, body, opts)
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
        if let Err(e) = self.put_lock(&key, &info, false).await {
            // The write may have landed with its answer lost: do not leave a stale lock.
            let _ = self.store().delete(&key).await;
            return Err(e);
        }
        let lock = RepoLock {
            store: self.store().clone(),
            codec: self.codec().clone(),
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
        let lock = self.take_single(EXCLUSIVE_KEY, purpose, now).await?;
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

    /// Takes the key-change lock (`locks/keys`): one key slot change at a time; backups,
    /// restores and GC are not affected.
    ///
    /// # Errors
    /// [`RepoError::Locked`] while another key change holds it; store errors.
    pub async fn lock_keys(&self, purpose: &str, now: Timestamp) -> Result<RepoLock> {
        self.take_single(KEYS_LOCK_KEY, purpose, now).await
    }

    /// Creates the single-holder lock object `key` (`IfAbsent`).
    async fn take_single(&self, key: &str, purpose: &str, now: Timestamp) -> Result<RepoLock> {
        let info = self.lock_info(LockKind::Exclusive, purpose, now);
        let outcome = match self.put_lock(key, &info, true).await {
            Ok(o) => o,
            Err(e) => {
                // Remove the lock only if the lost write was ours.
                if let Ok(Some(h)) = self.read_lock(key).await
                    && h.id == info.id
                {
                    let _ = self.store().delete(key).await;
                }
                return Err(e);
            }
        };
        if outcome == PutOutcome::AlreadyExists {
            let holders = match self.read_lock(key).await? {
                // A retried write whose first attempt landed finds its own lock.
                Some(h) if h.id == info.id => vec![],
                Some(h) => vec![h.describe()],
                None => vec![format!("{key} (just released; retry)")],
            };
            if !holders.is_empty() {
                return Err(RepoError::Locked { holders });
            }
        }
        Ok(RepoLock {
            store: self.store().clone(),
            codec: self.codec().clone(),
            key: key.to_string(),
            info,
            released: false,
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
        let mut out: Vec<(String, LockInfo)> = Vec::new();
        for key in [EXCLUSIVE_KEY, KEYS_LOCK_KEY] {
            if let Some(info) = self.read_lock(key).await? {
                out.push((key.to_string(), info));
            }
        }
        out.extend(self.shared_locks().await?);
        Ok(out)
    }

    /// Removes a lock left behind by a process that is gone, and returns what it said;
    /// `None` if no lock has this id. Unless `mode` is [`BreakMode::Force`], only a lock whose
    /// holder ran on this host and is gone is broken.
    ///
    /// # Errors
    /// [`RepoError::LockInUse`] for a holder alive on this host or whose state cannot be told
    /// (another host), without `Force`; store errors.
    pub async fn break_lock(&self, id: &str, mode: BreakMode) -> Result<Option<LockInfo>> {
        for (key, info) in self.lock_objects().await? {
            if info.id != id {
                continue;
            }
            let state = match info.holder_gone_here() {
                Some(true) => None,
                Some(false) => Some(HolderState::AliveHere),
                None => Some(HolderState::Unknown),
            };
            if let Some(holder) = state
                && mode != BreakMode::Force
            {
                return Err(RepoError::LockInUse {
                    id: info.id.clone(),
                    holder: info.describe(),
                    state: holder,
                });
            }
            // Read back just before deleting: delete only the lock object we judged.
            if self.read_lock(&key).await?.as_ref() == Some(&info) {
                self.store()
                    .delete(&key)
                    .await
                    .map_err(|e| RepoError::store(format!("breaking lock {key}"), e))?;
                return Ok(Some(info));
            }
            // Released (or replaced) while we looked: nothing of that id is left to break.
            return Ok(None);
        }
        Ok(None)
    }
}
