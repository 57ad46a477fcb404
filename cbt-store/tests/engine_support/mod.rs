//! Shared helpers of the engine/repository integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbt_core::{ChunkRef, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::engine::{
    self, BackupMode, BackupOutcome, BackupRequest, EngineOptions, FileSource,
};
use cbt_store::repo::{InitOptions, Repository};
use cbt_store::store::{LocalStore, ObjectStore, PutMode};

/// Chunk size of the test repositories (small so tests are fast but have many chunks).
pub const CS: u64 = 64 * 1024;

/// A deterministic xorshift byte stream.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A test image: runs of random data, compressible text and zeros (with an odd tail).
pub fn image(size: usize, seed: u64) -> Vec<u8> {
    let mut img = vec![0u8; size];
    let mut off = 0;
    let mut k = 0u64;
    while off < size {
        let len = (CS as usize * (1 + (k as usize % 3))).min(size - off);
        match k % 4 {
            0 => img[off..off + len].copy_from_slice(&noise(seed + k, len)),
            1 => {
                let text = b"block volumes deserve good backups ".repeat(len / 35 + 1);
                img[off..off + len].copy_from_slice(&text[..len]);
            }
            2 => {} // zeros
            _ => img[off..off + len / 2].copy_from_slice(&noise(seed * 7 + k, len / 2)),
        }
        off += len;
        k += 1;
    }
    img
}

/// Test fixture: a temp dir with a local-store repository.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn ObjectStore>,
    pub local: LocalStore,
    pub repo: Repository,
}

impl Fixture {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::new(dir.path().join("repo")).unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(local.clone());
        let repo = init(store.clone()).await;
        Fixture {
            dir,
            store,
            local,
            repo,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).unwrap();
        p
    }
}

/// Initialises a repository of chunk size [`CS`] on `store`.
pub async fn init(store: Arc<dyn ObjectStore>) -> Repository {
    init_sized(store, CS).await
}

/// Initialises a repository of chunk size `chunk_size` on `store`.
pub async fn init_sized(store: Arc<dyn ObjectStore>, chunk_size: u64) -> Repository {
    Repository::init(
        store,
        InitOptions {
            chunk_size: Some(chunk_size),
            now: Timestamp::from_unix_secs(1_000),
        },
    )
    .await
    .unwrap()
}

/// A repository of chunk size `chunk_size` on a new local store in `dir/repo`, with the
/// store (for tests that damage or inspect objects behind the repository's back).
pub async fn local_repo(dir: &Path, chunk_size: u64) -> (Arc<LocalStore>, Repository) {
    let local = Arc::new(LocalStore::new(dir.join("repo")).unwrap());
    let repo = init_sized(local.clone(), chunk_size).await;
    (local, repo)
}

pub fn opts() -> EngineOptions {
    EngineOptions {
        readers: 2,
        readahead: 2,
        workers: 2,
        transfers: 4,
        compression_level: 1,
        progress: None,
    }
}

pub fn vol(name: &str) -> VolumeName {
    VolumeName::new(name).unwrap()
}

pub fn snap(name: &str) -> SnapshotName {
    SnapshotName::new(name).unwrap()
}

pub fn request(volume: &str, snapshot: &str, mode: BackupMode, t: i64) -> BackupRequest {
    BackupRequest {
        volume: vol(volume),
        snapshot: snap(snapshot),
        mode,
        created: Timestamp::from_unix_secs(t),
        source_info: Default::default(),
        labels: BTreeMap::new(),
        chunk_size: None,
        volume_size: None,
    }
}

pub fn full() -> BackupMode {
    BackupMode::Full { allocated: None }
}

pub async fn backup_file(
    repo: &Repository,
    path: &Path,
    req: BackupRequest,
) -> Result<BackupOutcome, cbt_store::repo::RepoError> {
    let src = Arc::new(FileSource::open(path).unwrap());
    let full = matches!(
        req.mode,
        engine::BackupMode::Full { .. } | engine::BackupMode::FullWithParent { .. }
    );
    let mut out = engine::backup(repo, src, req, &opts()).await?;
    // A full backup streams its map to the store and hands back only the head; the tests
    // look at the map as stored.
    if full && out.manifest.is_none() {
        out.manifest = Some(
            repo.load_manifest(&out.head.volume, &out.head.snapshot)
                .await?,
        );
    }
    Ok(out)
}

/// Restores `volume`/`snapshot` to `target` with the default restore and engine options:
/// [`backup_file`]'s twin.
pub async fn restore_file(
    repo: &Repository,
    volume: &VolumeName,
    snapshot: &SnapshotName,
    target: &Path,
) -> Result<engine::RestoreReport, cbt_store::repo::RepoError> {
    engine::restore(
        repo,
        volume,
        snapshot,
        target,
        &engine::RestoreOptions::default(),
        &opts(),
    )
    .await
}

/// Stores `body` under `key` as it is, replacing what is there: how tests forge or damage
/// objects behind the repository's back.
pub async fn put_raw(store: &dyn ObjectStore, key: &str, body: bytes::Bytes) {
    store.put(key, body, PutMode::Overwrite).await.unwrap();
}

/// The `n`-th (0-based) stored chunk of the map `out` holds: its index and reference.
pub fn nth_stored(out: &BackupOutcome, n: usize) -> (u64, ChunkRef) {
    let map = &out.manifest.as_ref().expect("the map of the backup").chunks;
    map.iter_stored()
        .nth(n)
        .map(|(i, r)| (i, *r))
        .expect("enough stored chunks")
}

/// Overwrites `count` spread-out ranges of `len` bytes with new noise; returns them.
pub fn mutate(img: &mut [u8], count: usize, len: usize, seed: u64) -> RangeSet {
    let step = img.len() / count;
    let mut extents = Vec::new();
    for i in 0..count {
        let off = i * step + (seed as usize * 4099 + i * 977) % (step - len);
        img[off..off + len].copy_from_slice(&noise(seed + i as u64 + 99, len));
        extents.push((off as u64, len as u64));
    }
    RangeSet::try_from_extents(extents).unwrap()
}
