//! Encrypted repositories: creating one, opening one with a password, a key file or the master
//! key, and managing its key slots (`keys/<slot id>`). The cryptography itself is in
//! [`crate::crypto`].
//!
//! Every slot read from the store is hostile input: read with [`MAX_KEY_SLOT_LEN`], parsed,
//! and validated (KDF parameters bounded) before any key derivation runs; at most
//! [`MAX_KEY_SLOTS`] slots are considered. Key derivation runs on blocking threads.
//!
//! Adding and removing slots happens under the key-change lock ([`Repository::lock_keys`]),
//! and a removal re-reads the slots inside it: two removals racing each other cannot both
//! count the other's slot as the one that remains.

use std::sync::Arc;

use bytes::Bytes;
use cbt_core::Timestamp;
use cbt_core::text::escape;
use futures::TryStreamExt;
use serde::Serialize;

use super::{
    Codec, ENCRYPTED_REPO_FORMAT_VERSION, EncryptionConfig, InitOptions, REPO_FORMAT_NAME,
    RepoConfig, RepoError, Repository, Result, random_id, read_config,
};
use crate::crypto::{
    KdfParams, KeyFile, KeySlot, MAX_KEY_SLOT_LEN, MasterKey, Password, RepoKeys, SCHEME,
    SlotError, SlotKind,
};
use crate::store::{ObjectStore, PutMode, PutOutcome, StoreError};
use cbt_core::ranges::{DEFAULT_CHUNK_SIZE, validate_chunk_size};

/// Most key slots an open considers (each costs one bounded key derivation).
pub const MAX_KEY_SLOTS: usize = 32;
const KEYS_PREFIX: &str = "keys/";

/// What opens an encrypted repository.
#[derive(Debug, Clone)]
pub enum RepoKey {
    /// A password, tried against every password slot.
    Password(Password),
    /// A key file, tried against the slots made for it.
    KeyFile(KeyFile),
    /// The master key itself (for tools that keep it, e.g. in a secret store); no slot is
    /// needed.
    Master(MasterKey),
}

/// One key slot as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeySlotInfo {
    /// Slot id (escaped for printing).
    pub id: String,
    /// When it was added (`None` if the slot is unreadable).
    pub created: Option<Timestamp>,
    /// What opens it (`None` if unreadable).
    pub kind: Option<SlotKind>,
    /// Its Argon2id parameters (password slots).
    pub params: Option<KdfParams>,
    /// The id of the key file that opens it (key-file slots).
    pub key_file_id: Option<String>,
    /// Whether this slot opened the repository.
    pub current: bool,
    /// Why the slot is unusable, if it is.
    pub problem: Option<String>,
}

fn slot_key(id: &str) -> String {
    format!("{KEYS_PREFIX}{id}")
}

/// A new key slot's secret.
#[derive(Debug, Clone, Copy)]
pub enum NewKey<'a> {
    /// A password, stretched with these Argon2id parameters.
    Password(&'a Password, KdfParams),
    /// A key file.
    KeyFile(&'a KeyFile),
}

/// Slot ids we write are 20 hex digits; anything else under `keys/` was not written by us.
fn valid_slot_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn slot_ids(store: &dyn ObjectStore) -> Result<Vec<String>> {
    let objects = crate::store::list_all(store, KEYS_PREFIX)
        .await
        .map_err(|e| RepoError::store("listing keys/", e))?;
    let ids: Vec<String> = objects
        .iter()
        .filter_map(|o| o.key.strip_prefix(KEYS_PREFIX))
        .filter(|id| valid_slot_id(id))
        .map(str::to_string)
        .collect();
    if ids.len() > MAX_KEY_SLOTS {
        return Err(RepoError::TooManyKeySlots {
            count: ids.len(),
            max: MAX_KEY_SLOTS,
        });
    }
    Ok(ids)
}

/// Reads and parses one slot; `Ok(Err(reason))` for a slot that is there but unusable.
async fn read_slot(
    store: &dyn ObjectStore,
    id: &str,
) -> Result<std::result::Result<KeySlot, String>> {
    let key = slot_key(id);
    let body = match store.get_bounded(&key, MAX_KEY_SLOT_LEN).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => {
            return Err(RepoError::KeySlotNotFound { id: id.to_string() });
        }
        Err(e @ StoreError::TooLarge { .. }) => return Ok(Err(e.to_string())),
        Err(e) => return Err(RepoError::store(format!("reading key slot {key}"), e)),
    };
    let slot: KeySlot = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return Ok(Err(format!("not a key slot: {e}"))),
    };
    if slot.id != id {
        return Ok(Err(format!("it names itself {}", escape(&slot.id))));
    }
    Ok(slot.validate().map(|()| slot).map_err(|e| e.to_string()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RepoError::Internal {
            message: format!("key derivation task failed: {e}"),
        })
}

impl Repository {
    /// Creates an encrypted repository on an empty store: a random master key, wrapped in one
    /// key slot under `password` with `kdf`.
    ///
    /// # Errors
    /// As [`Repository::init_encrypted_with`].
    pub async fn init_encrypted(
        store: Arc<dyn ObjectStore>,
        opts: InitOptions,
        password: &Password,
        kdf: KdfParams,
    ) -> Result<Self> {
        Self::init_encrypted_with(store, opts, &[NewKey::Password(password, kdf)]).await
    }

    /// Creates an encrypted repository on an empty store: a random master key, wrapped in one
    /// key slot per entry of `keys` (passwords, key files). The returned repository counts as
    /// opened by the first.
    ///
    /// # Errors
    /// [`RepoError::InvalidRequest`] for no key; [`RepoError::AlreadyInitialized`] if a config
    /// exists; [`RepoError::Crypto`] for KDF parameters out of bounds; store errors.
    ///
    /// # Guarantees
    /// The key slots are written before the config, and the config with `IfAbsent`: a crash
    /// leaves either no repository or a complete one; the loser of two concurrent inits
    /// deletes the slots it wrote.
    pub async fn init_encrypted_with(
        store: Arc<dyn ObjectStore>,
        opts: InitOptions,
        keys: &[NewKey<'_>],
    ) -> Result<Self> {
        let chunk_size = opts.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
        validate_chunk_size(chunk_size)?;
        if keys.is_empty() || keys.len() > MAX_KEY_SLOTS {
            return Err(RepoError::InvalidRequest {
                reason: format!(
                    "an encrypted repository needs 1 to {MAX_KEY_SLOTS} keys, {} given",
                    keys.len()
                ),
            });
        }
        for k in keys {
            if let NewKey::Password(_, kdf) = k {
                kdf.validate()?;
            }
        }
        match read_config(store.as_ref()).await {
            Err(RepoError::NotInitialized) => {}
            Ok(existing) => return Err(RepoError::AlreadyInitialized { id: existing.id }),
            Err(e) => return Err(e),
        }
        let master = MasterKey::generate()?;
        let repo_keys = Arc::new(RepoKeys::derive(&master));
        let config = RepoConfig {
            format: REPO_FORMAT_NAME.into(),
            version: ENCRYPTED_REPO_FORMAT_VERSION,
            id: random_id("repo"),
            chunk_size,
            created_unix_ms: opts.now,
            encryption: Some(EncryptionConfig {
                scheme: SCHEME.into(),
                key_id: repo_keys.key_id().to_string(),
            }),
        };
        let mut written = Vec::new();
        for k in keys {
            match write_slot(store.as_ref(), &master, *k, &config.id, opts.now).await {
                Ok(id) => written.push(id),
                Err(e) => {
                    for id in &written {
                        let _ = store.delete(&slot_key(id)).await;
                    }
                    return Err(e);
                }
            }
        }
        let created = Self::write_config(
            store.clone(),
            config,
            Codec::sealed(repo_keys),
            written.first().cloned(),
        )
        .await;
        if created.is_err() {
            // Not ours to keep: the repository (if any) belongs to whoever wrote the config.
            for id in &written {
                let _ = store.delete(&slot_key(id)).await;
            }
        }
        created
    }

    /// Opens an encrypted repository with a password (tried against each password slot), a key
    /// file (tried against the slots made for it) or its master key.
    ///
    /// # Errors
    /// [`RepoError::NotEncrypted`] if the repository is not encrypted;
    /// [`RepoError::WrongPassword`] / [`RepoError::WrongKeyFile`] if no slot opens;
    /// [`RepoError::NoKeySlot`]; [`RepoError::KeyMismatch`] if the key is not this
    /// repository's; [`RepoError::TooManyKeySlots`]; the errors of [`Repository::open`].
    pub async fn open_with_key(store: Arc<dyn ObjectStore>, key: &RepoKey) -> Result<Self> {
        let config = read_config(store.as_ref()).await?;
        let Some(enc) = config.encryption.clone() else {
            return Err(RepoError::NotEncrypted);
        };
        let (master, slot) = match key {
            RepoKey::Master(m) => (m.clone(), None),
            RepoKey::Password(_) | RepoKey::KeyFile(_) => {
                let (m, id) = unlock(store.as_ref(), key, &config.id).await?;
                (m, Some(id))
            }
        };
        let keys = RepoKeys::derive(&master);
        if keys.key_id() != enc.key_id {
            return Err(RepoError::KeyMismatch {
                source_desc: match &slot {
                    Some(id) => format!("key slot {id}"),
                    None => "the supplied key".into(),
                },
                found: keys.key_id().to_string(),
                expected: escape(&enc.key_id).into_owned(),
            });
        }
        Ok(Repository {
            store,
            config,
            codec: Codec::sealed(Arc::new(keys)),
            slot,
            dedup: Arc::default(),
        })
    }

    /// The master key of an open encrypted repository (for tools that keep it themselves and
    /// open with [`RepoKey::Master`]); `None` when unencrypted.
    pub fn master_key(&self) -> Option<&MasterKey> {
        self.codec.keys().map(|k| k.master())
    }

    /// The id of the key slot whose password or key file opened this repository.
    pub fn opened_slot(&self) -> Option<&str> {
        self.slot.as_deref()
    }

    fn require_keys(&self) -> Result<&Arc<RepoKeys>> {
        self.codec.keys().ok_or(RepoError::NotEncrypted)
    }

    /// Adds a password slot: `password` will open the repository too. No data is rewritten.
    ///
    /// # Errors
    /// As [`Repository::add_key_slot`].
    pub async fn add_key(
        &self,
        password: &Password,
        kdf: KdfParams,
        now: Timestamp,
    ) -> Result<KeySlotInfo> {
        self.add_key_slot(NewKey::Password(password, kdf), now)
            .await
    }

    /// Adds a key-file slot: `key_file` will open the repository too. No data is rewritten.
    ///
    /// # Errors
    /// As [`Repository::add_key_slot`].
    pub async fn add_key_file(&self, key_file: &KeyFile, now: Timestamp) -> Result<KeySlotInfo> {
        self.add_key_slot(NewKey::KeyFile(key_file), now).await
    }

    /// Adds a key slot for a password or key file, under the key-change lock.
    ///
    /// # Errors
    /// [`RepoError::NotEncrypted`]; [`RepoError::Locked`] while another key change runs;
    /// [`RepoError::KeyFileAlreadyAdded`] for a key file that already has a slot;
    /// [`RepoError::TooManyKeySlots`] at [`MAX_KEY_SLOTS`]; [`RepoError::Crypto`] for KDF
    /// parameters out of bounds; store errors.
    pub async fn add_key_slot(&self, new: NewKey<'_>, now: Timestamp) -> Result<KeySlotInfo> {
        let keys = self.require_keys()?;
        if let NewKey::Password(_, kdf) = new {
            kdf.validate()?;
        }
        let lock = self.lock_keys("key add", now).await?;
        let result = async {
            let ids = slot_ids(self.store.as_ref()).await?;
            let count = ids.len();
            if let NewKey::KeyFile(f) = new {
                for id in ids {
                    if let Ok(Ok(slot)) = read_slot(self.store.as_ref(), &id).await
                        && slot.key_file_id.as_deref() == Some(f.id())
                    {
                        return Err(RepoError::KeyFileAlreadyAdded {
                            key_file_id: f.id().to_string(),
                            slot: id,
                        });
                    }
                }
            }
            if count >= MAX_KEY_SLOTS {
                return Err(RepoError::TooManyKeySlots {
                    count: count + 1,
                    max: MAX_KEY_SLOTS,
                });
            }
            write_slot(
                self.store.as_ref(),
                keys.master(),
                new,
                &self.config.id,
                now,
            )
            .await
        }
        .await;
        release_key_lock(lock).await;
        let id = result?;
        let (kind, params, key_file_id) = match new {
            NewKey::Password(_, kdf) => (SlotKind::Password, Some(kdf), None),
            NewKey::KeyFile(f) => (SlotKind::KeyFile, None, Some(f.id().to_string())),
        };
        Ok(KeySlotInfo {
            id,
            created: Some(now),
            kind: Some(kind),
            params,
            key_file_id,
            current: false,
            problem: None,
        })
    }

    /// Lists the key slots (reading each, not deriving any key), in id order.
    ///
    /// # Errors
    /// [`RepoError::NotEncrypted`]; [`RepoError::TooManyKeySlots`]; store errors.
    pub async fn list_keys(&self) -> Result<Vec<KeySlotInfo>> {
        self.require_keys()?;
        let mut out = Vec::new();
        for id in slot_ids(self.store.as_ref()).await? {
            let slot = match read_slot(self.store.as_ref(), &id).await {
                Err(RepoError::KeySlotNotFound { .. }) => continue, // removed since listed
                other => other?,
            };
            let current = self.slot.as_deref() == Some(id.as_str());
            out.push(match slot {
                Ok(s) => KeySlotInfo {
                    id,
                    created: Some(s.created_unix_ms),
                    kind: s.kind(),
                    params: s.params,
                    key_file_id: s.key_file_id,
                    current,
                    problem: None,
                },
                Err(problem) => KeySlotInfo {
                    id,
                    created: None,
                    kind: None,
                    params: None,
                    key_file_id: None,
                    current,
                    problem: Some(problem),
                },
            });
        }
        Ok(out)
    }

    /// Removes a key slot: its password or key file no longer opens the repository.
    ///
    /// # Errors
    /// [`RepoError::KeySlotNotFound`]; [`RepoError::KeyInUse`] for the slot that opened this
    /// repository; [`RepoError::LastKeySlot`] if no other usable slot would remain;
    /// [`RepoError::Locked`] while another key change runs; [`RepoError::NotEncrypted`]; store
    /// errors.
    ///
    /// # Guarantees
    /// Runs under the key-change lock and reads the slots inside it: another usable slot
    /// exists when the slot is deleted, even against a concurrent removal.
    pub async fn remove_key(&self, id: &str, now: Timestamp) -> Result<()> {
        self.require_keys()?;
        if !valid_slot_id(id) {
            return Err(RepoError::KeySlotNotFound {
                id: escape(id).into_owned(),
            });
        }
        if self.slot.as_deref() == Some(id) {
            return Err(RepoError::KeyInUse { id: id.to_string() });
        }
        let lock = self.lock_keys("key remove", now).await?;
        let result = self.remove_key_locked(id).await;
        release_key_lock(lock).await;
        result
    }

    async fn remove_key_locked(&self, id: &str) -> Result<()> {
        let slots = self.list_keys().await?;
        if !slots.iter().any(|s| s.id == id) {
            return Err(RepoError::KeySlotNotFound { id: id.to_string() });
        }
        let others = slots
            .iter()
            .filter(|s| s.id != id && s.problem.is_none())
            .count();
        if others == 0 {
            return Err(RepoError::LastKeySlot { id: id.to_string() });
        }
        let key = slot_key(id);
        self.store
            .delete(&key)
            .await
            .map_err(|e| RepoError::store(format!("deleting key slot {key}"), e))
    }
}

/// Releases the key-change lock after the change is done; a failure to release does not
/// undo the change, so it is only logged (the lock stays listed and can be broken).
async fn release_key_lock(lock: super::RepoLock) {
    let id = lock.info().id.clone();
    if let Err(e) = lock.release().await {
        tracing::warn!(lock = %id, error = %e, "could not release the key-change lock; see `cbt lock list`");
    }
}

/// Wraps `master` in a new slot and stores it; returns the slot id.
async fn write_slot(
    store: &dyn ObjectStore,
    master: &MasterKey,
    new: NewKey<'_>,
    repo_id: &str,
    now: Timestamp,
) -> Result<String> {
    let id = random_id("key");
    let slot = match new {
        NewKey::Password(password, kdf) => {
            let (master, password, repo_id2, id2) = (
                master.clone(),
                password.clone(),
                repo_id.to_string(),
                id.clone(),
            );
            blocking(move || KeySlot::wrap(&master, &password, kdf, &repo_id2, &id2, now)).await??
        }
        NewKey::KeyFile(f) => KeySlot::wrap_key_file(master, f, repo_id, &id, now)?,
    };
    let body = serde_json::to_vec_pretty(&slot).map_err(|e| RepoError::Internal {
        message: format!("encoding key slot: {e}"),
    })?;
    let key = slot_key(&id);
    match store
        .put(&key, Bytes::from(body), PutMode::IfAbsent)
        .await
        .map_err(|e| RepoError::store(format!("writing key slot {key}"), e))?
    {
        PutOutcome::Created => Ok(id),
        PutOutcome::AlreadyExists => Err(RepoError::Internal {
            message: format!("key slot id {id} collided"),
        }),
    }
}

/// Tries a password or key file against the slots of its kind; returns the master key and
/// the slot that opened.
async fn unlock(
    store: &dyn ObjectStore,
    key: &RepoKey,
    repo_id: &str,
) -> Result<(MasterKey, String)> {
    let ids = slot_ids(store).await?;
    let slots: Vec<(String, std::result::Result<KeySlot, String>)> =
        futures::stream::iter(ids.into_iter().map(Ok::<_, RepoError>))
            .and_then(|id| async move {
                match read_slot(store, &id).await {
                    Err(RepoError::KeySlotNotFound { .. }) => Ok(None),
                    other => other.map(|s| Some((id, s))),
                }
            })
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
    if slots.is_empty() {
        return Err(RepoError::NoKeySlot);
    }
    let mut invalid = Vec::new();
    let mut tried = 0;
    let mut others = 0;
    for (id, slot) in slots {
        let slot = match slot {
            Ok(s) => s,
            Err(reason) => {
                tracing::warn!(slot = %id, %reason, "skipping an unusable key slot");
                invalid.push(format!("{id}: {}", escape(&reason)));
                continue;
            }
        };
        let opened = match key {
            RepoKey::Password(pw) => {
                if slot.kind() != Some(SlotKind::Password) {
                    others += 1;
                    continue;
                }
                tried += 1;
                let (pw, rid) = (pw.clone(), repo_id.to_string());
                blocking(move || slot.unwrap_key(&pw, &rid)).await?
            }
            RepoKey::KeyFile(f) => {
                if slot.key_file_id.as_deref() != Some(f.id()) {
                    others += 1;
                    continue;
                }
                tried += 1;
                slot.unwrap_with_key_file(f, repo_id)
            }
            RepoKey::Master(_) => {
                return Err(RepoError::Internal {
                    message: "unlock called with the master key".into(),
                });
            }
        };
        match opened {
            Ok(master) => return Ok((master, id)),
            Err(SlotError::WrongPassword) => {}
            // The slot names this key file, so a failure means it was altered.
            Err(e) => invalid.push(format!("{id}: {}", escape(&e.to_string()))),
        }
    }
    Err(match key {
        RepoKey::KeyFile(f) => RepoError::WrongKeyFile {
            key_file_id: f.id().to_string(),
            slots: tried,
            others,
            invalid,
        },
        _ => RepoError::WrongPassword {
            slots: tried,
            invalid,
        },
    })
}
