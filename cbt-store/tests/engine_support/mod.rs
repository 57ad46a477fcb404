//! Shared helpers of the engine/repository integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbt_core::{ChunkRef, RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::crypto::{KdfParams, Password};
use cbt_store::engine::{
    self, BackupMode, BackupOutcome, BackupRequest, EngineOptions, FileSource,
};
use cbt_store::repo::{
    GcOptions, GcReport, InitOptions, PruneOptions, PruneReport, Repository, VerifyOptions,
    VerifyReport,
};
use cbt_store::store::fault::FaultyStore;
use cbt_store::store::{LocalStore, ObjectStore, PutMode};

/// Chunk size of the test repositories (small so tests are fast but have many chunks).
pub const CS: u64 = 64 * 1024;

/// The workspace's xorshift stream (the frozen fixtures' images were drawn one low byte per
/// step, [`XorShift::low_bytes`]).
pub use cbt_core::testing::XorShift;

/// `len` bytes of a deterministic xorshift stream chosen by `seed` (one low byte per step).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    XorShift::seeded(seed).low_bytes(len)
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

    /// The fixture's repository opened again through a [`FaultyStore`] that counts calls and
    /// fails the ones its rules pick (none yet): the store to steer, the repository to drive.
    pub async fn through_faults(&self) -> (Arc<FaultyStore>, Repository) {
        let faulty = Arc::new(FaultyStore::over(self.store.clone()));
        let repo = Repository::open(faulty.clone()).await.unwrap();
        (faulty, repo)
    }

    /// Restores `volume`/`snapshot` to a new file named after them and reads it back.
    pub async fn restored(&self, volume: &str, snapshot: &str) -> Vec<u8> {
        let target = self.path(&format!("{volume}-{snapshot}.restored"));
        restore_file(&self.repo, &vol(volume), &snap(snapshot), &target)
            .await
            .unwrap();
        std::fs::read(&target).unwrap()
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

/// A repository of chunk size `chunk_size` on a new local store in `dir/repo`, sealed under
/// the password "pw" (with the cheapest key derivation) when `encrypted`.
pub async fn local_repo_sealed_if(dir: &Path, chunk_size: u64, encrypted: bool) -> Repository {
    if !encrypted {
        return local_repo(dir, chunk_size).await.1;
    }
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.join("repo")).unwrap());
    let init = InitOptions {
        chunk_size: Some(chunk_size),
        now: Timestamp::from_unix_secs(1_000),
    };
    let kdf = KdfParams {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    Repository::init_encrypted(store, init, &Password::new("pw").unwrap(), kdf)
        .await
        .unwrap()
}

/// `src` backed up in full into `repo` as `v/s` and restored to `dir/restored.img`, which is
/// returned.
pub async fn backed_up_and_restored(repo: &Repository, src: &Path, dir: &Path) -> PathBuf {
    full_backup(repo, src, "v", "s", 2).await;
    let target = dir.join("restored.img");
    restore_file(repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap();
    target
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

/// Backs up 200 incompressible chunks into `repo` with small options and checks the raw
/// buffers the run allocated stay within `readers + readahead + workers + transfers` (what
/// `BackupOutcome::raw_buffers_allocated` documents): an incompressible chunk is uploaded from
/// the buffer it was read into, so this holds only if the store lets go of a body when its
/// put returns.
pub async fn raw_buffers_are_bounded(fx: &Fixture, repo: &Repository) {
    let src = fx.write("big.img", &noise(5, 200 * CS as usize));
    let o = EngineOptions {
        readers: 3,
        readahead: 2,
        workers: 2,
        transfers: 3,
        compression_level: 1,
        progress: None,
    };
    let source = Arc::new(FileSource::open(&src).unwrap());
    let out = engine::backup(repo, source, request("v", "s", full(), 1), &o)
        .await
        .unwrap();
    assert_eq!(out.stats.chunks_read, 200);
    assert_eq!(out.stats.objects_written, 200);
    assert!(out.raw_buffers_allocated >= 1);
    assert!(
        out.raw_buffers_allocated <= (o.readers + o.readahead + o.workers + o.transfers) as u64,
        "{} raw buffers for 200 chunks",
        out.raw_buffers_allocated
    );
    assert!(o.backup_memory_bound(CS) < 20 * CS);
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

/// An incremental on top of the map `parent` holds, with `changed` reported changed.
pub fn incremental(parent: &BackupOutcome, changed: RangeSet) -> BackupMode {
    BackupMode::Incremental {
        parent: Box::new(parent.manifest.clone().expect("the map of the parent")),
        changed,
    }
}

/// A full backup of the file at `path` as `volume`/`snapshot` created at `t`, which must work.
pub async fn full_backup(
    repo: &Repository,
    path: &Path,
    volume: &str,
    snapshot: &str,
    t: i64,
) -> BackupOutcome {
    backup_file(repo, path, request(volume, snapshot, full(), t))
        .await
        .unwrap()
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

/// `verify` reading every chunk's data, which must run (what it finds is the caller's to check).
pub async fn verify_data(repo: &Repository) -> VerifyReport {
    repo.verify(&VerifyOptions {
        read_data: true,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Garbage collection at `now` without a grace period, which must run.
pub async fn collect(repo: &Repository, now: Timestamp) -> GcReport {
    repo.gc(&GcOptions {
        now,
        dry_run: false,
        grace: std::time::Duration::ZERO,
    })
    .await
    .unwrap()
}

/// Prunes every volume down to its newest snapshot at `now_secs`, collecting without grace.
pub async fn prune_to_newest(repo: &Repository, now_secs: i64) -> PruneReport {
    repo.prune(&PruneOptions {
        policy: cbt_core::gc::RetentionPolicy {
            keep_last: Some(1),
            keep_within: None,
        },
        now: Timestamp::from_unix_secs(now_secs),
        volume: None,
        dry_run: false,
        gc_grace: std::time::Duration::ZERO,
    })
    .await
    .unwrap()
}

/// Flips bit `mask` of byte `at` of the object stored under `key` in `local`, in place.
pub fn flip_stored_byte(local: &LocalStore, key: &str, at: usize, mask: u8) {
    let file = local.path_of(key).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at] ^= mask;
    std::fs::write(&file, &bytes).unwrap();
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

/// Every chunk `map` stores is, byte for byte, the object `chunk::encode` makes of `img`'s
/// bytes at its index (chunks of `chunk` bytes, the test options' level), with the same
/// reference. Returns (chunks stored, of which stored raw).
pub async fn assert_stored_as_encoded(
    store: &dyn ObjectStore,
    map: &cbt_core::ChunkMap,
    img: &[u8],
    chunk: u64,
    label: &str,
) -> (usize, usize) {
    let (mut stored, mut raw) = (0, 0);
    for (index, r) in map.iter_stored() {
        let at = (index * chunk) as usize;
        let bytes = &img[at..(at + chunk as usize).min(img.len())];
        let expected = cbt_store::chunk::encode(bytes, opts().compression_level);
        let body = store
            .get(&cbt_store::chunk::chunk_key(&r.hash))
            .await
            .unwrap();
        assert!(body == expected.body, "{label}: chunk {index} differs");
        assert_eq!(*r, expected.chunk, "{label}: chunk {index}");
        raw += usize::from(body[5] == 0);
        stored += 1;
    }
    (stored, raw)
}
