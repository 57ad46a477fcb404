//! The frozen repository fixture: a small repository in the current (v1) format, committed
//! under `tests/fixtures/repo-v1/`, that every future version must still list, verify and
//! restore to the same bytes (as restic and rustic keep theirs).
//!
//! The fixture was written once by `generate_frozen_fixture` (ignored; see
//! `tests/fixtures/README.md`) with the library's own writer. It must never be regenerated to
//! make a test pass: `repo-v1.json` records the checksum of every file in it, and the test
//! fails if any file was added, removed or changed, so a regeneration is always a visible,
//! deliberate change of both.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbt_core::manifest::SourceInfo;
use cbt_core::{RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::crypto::{KdfParams, KeyFile, Password};
use cbt_store::engine::{
    self, BackupMode, BackupRequest, EngineOptions, FileSource, RestoreOptions,
};
use cbt_store::repo::{InitOptions, RepoError, RepoKey, Repository};
use cbt_store::store::{LocalStore, ObjectStore};
use engine_support::{XorShift, verify_data};
use serde::{Deserialize, Serialize};

const CS: usize = 4096;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// What the fixture must read back as; written by the generator, then frozen.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Expected {
    /// Repository format version of the fixture.
    format: u32,
    /// Snapshots in listing order.
    snapshots: Vec<ExpectedSnapshot>,
    /// Every file of the fixture (path relative to its root) and the BLAKE3 of its bytes.
    files: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ExpectedSnapshot {
    volume: String,
    snapshot: String,
    parent: Option<String>,
    created_unix_ms: i64,
    volume_size: u64,
    chunk_size: u64,
    allocated_bytes: u64,
    stored_chunks: u64,
    labels: BTreeMap<String, String>,
    /// BLAKE3 (hex) of the restored image.
    image_blake3: String,
}

/// The three images: a full backup, an incremental, and an incremental of a grown volume.
/// Raw and zstd-compressed chunks, zero chunks, one chunk stored at two indices, and a short
/// last chunk.
fn images() -> Vec<Vec<u8>> {
    let mut stream = XorShift::from_state(0x5eed_f12e_d0c0_ffee);
    let mut noise = |n: usize| stream.low_bytes(n);
    let text =
        |n: usize| b"frozen fixture of cbt repository format v1. ".repeat(n / 44 + 1)[..n].to_vec();
    let mut v1 = Vec::new();
    v1.extend(noise(CS)); // 0: raw (incompressible)
    v1.extend(text(CS)); // 1: zstd
    v1.extend(vec![0; CS]); // 2: zero
    v1.extend(text(CS)); // 3: same chunk as 1
    v1.extend(noise(CS / 2)); // 4: half data, half zeros
    v1.extend(vec![0; CS / 2]);
    v1.extend(vec![0; CS]); // 5: zero
    let mut v2 = v1.clone();
    v2[CS + 10..CS + 20].copy_from_slice(b"CHANGED!!!"); // 1 changes, 3 keeps the old text
    v2[2 * CS..3 * CS].copy_from_slice(&noise(CS)); // 2: zero -> data
    let mut v3 = v2.clone();
    v3.extend(text(CS)); // 6: new, full
    v3.extend(noise(1000)); // 7: short last chunk
    v3[5 * CS..5 * CS + 5].copy_from_slice(b"hello"); // 5: zero -> data
    vec![v1, v2, v3]
}

fn blake3_hex(data: &[u8]) -> String {
    cbt_store::chunk::hash_raw(data).to_hex()
}

/// Every file under `root` (relative path -> BLAKE3), skipping the store's staging directory.
fn file_sums(root: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".cbt-tmp" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                walk(&p, root, out);
            } else {
                out.insert(rel, blake3_hex(&std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Opens, lists, verifies (reading every chunk) and restores the frozen repository.
#[tokio::test]
async fn frozen_fixture_v1_is_still_read() {
    check_fixture("repo-v1", None).await;
}

/// The password of the frozen encrypted fixture (it is a test fixture: no secret).
const ENC_PASSWORD: &str = "frozen fixture password v1";
/// Its key derivation parameters: small, so the test is fast; within every bound.
const ENC_KDF: KdfParams = KdfParams {
    memory_kib: 1024,
    iterations: 1,
    parallelism: 1,
};

/// The same for the frozen encrypted repository (format version 2): opened with its password,
/// refused without it or with another one.
#[tokio::test]
async fn frozen_encrypted_fixture_v1_is_still_read() {
    check_fixture("repo-enc-v1", Some(ENC_PASSWORD)).await;
}

/// The frozen key-file slot of `repo-enc-v1` (`repo-enc-v1-key-file/keys/<id>`, written by
/// `generate_frozen_key_file_slot`) still opens it with the frozen key file
/// (`repo-enc-v1-key-file/repo.key`): the key file format, the slot format and the HKDF
/// derivation are frozen too. Another key file is refused as such.
#[tokio::test]
async fn frozen_encrypted_fixture_v1_opens_with_its_frozen_key_file() {
    let overlay = fixtures().join("repo-enc-v1-key-file");
    let expected: BTreeMap<String, String> = serde_json::from_slice(
        &std::fs::read(fixtures().join("repo-enc-v1-key-file.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        file_sums(&overlay),
        expected,
        "the frozen key-file slot changed: it must never be regenerated or edited"
    );
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("repo");
    copy_tree(&fixtures().join("repo-enc-v1"), &copy);
    copy_tree(&overlay.join("keys"), &copy.join("keys"));
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&copy).unwrap());
    let key_file = KeyFile::from_file(&overlay.join("repo.key")).unwrap();
    assert!(matches!(
        Repository::open_with_key(
            store.clone(),
            &RepoKey::KeyFile(KeyFile::generate().unwrap())
        )
        .await,
        Err(RepoError::WrongKeyFile {
            slots: 0,
            others: 2,
            ..
        })
    ));
    let repo = Repository::open_with_key(store, &RepoKey::KeyFile(key_file))
        .await
        .unwrap();
    let slots = repo.list_keys().await.unwrap();
    assert_eq!(slots.len(), 2);
    assert!(
        slots
            .iter()
            .any(|s| s.current && s.kind == Some(cbt_store::crypto::SlotKind::KeyFile))
    );
    for (img, n) in images().iter().zip(1..) {
        let target = work.path().join(format!("snap-{n}.img"));
        engine::restore(
            &repo,
            &VolumeName::from_pvc("prod", "db-0").unwrap(),
            &SnapshotName::new(format!("snap-{n}")).unwrap(),
            &target,
            &RestoreOptions::default(),
            &EngineOptions::default(),
        )
        .await
        .unwrap();
        assert!(std::fs::read(&target).unwrap() == *img, "snap-{n} differs");
    }
}

/// Writes the frozen key-file slot of `repo-enc-v1` and its key file to `$CBT_FIXTURE_OUT`
/// (`repo-enc-v1-key-file/`, `repo-enc-v1-key-file.json`). See `tests/fixtures/README.md`.
#[tokio::test]
#[ignore = "writes a new fixture; run by hand, see tests/fixtures/README.md"]
async fn generate_frozen_key_file_slot() {
    let out = fixture_out();
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("repo");
    copy_tree(&fixtures().join("repo-enc-v1"), &copy);
    let before: Vec<_> = std::fs::read_dir(copy.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&copy).unwrap());
    let repo = Repository::open_with_key(store, &key(ENC_PASSWORD))
        .await
        .unwrap();
    let kf = KeyFile::generate().unwrap();
    let root = out.join("repo-enc-v1-key-file");
    std::fs::create_dir_all(root.join("keys")).unwrap();
    kf.write_new(&root.join("repo.key")).unwrap();
    let slot = repo
        .add_key_file(&kf, Timestamp(1_767_225_600_000))
        .await
        .unwrap();
    assert!(!before.contains(&std::ffi::OsString::from(&slot.id)));
    std::fs::copy(
        copy.join("keys").join(&slot.id),
        root.join("keys").join(&slot.id),
    )
    .unwrap();
    std::fs::write(
        out.join("repo-enc-v1-key-file.json"),
        serde_json::to_vec_pretty(&file_sums(&root)).unwrap(),
    )
    .unwrap();
}

async fn check_fixture(name: &str, password: Option<&str>) {
    check_fixture_images(name, password, images()).await;
}

async fn check_fixture_images(name: &str, password: Option<&str>, imgs: Vec<Vec<u8>>) {
    let root = fixtures().join(name);
    let expected: Expected =
        serde_json::from_slice(&std::fs::read(fixtures().join(format!("{name}.json"))).unwrap())
            .unwrap();
    assert_eq!(
        expected.format,
        if password.is_some() {
            cbt_store::repo::ENCRYPTED_REPO_FORMAT_VERSION
        } else {
            cbt_store::repo::REPO_FORMAT_VERSION
        }
    );
    assert_eq!(
        file_sums(&root),
        expected.files,
        "the frozen fixture changed: it must never be regenerated or edited (see tests/fixtures/README.md)"
    );

    // Work on a copy: opening a local store and restoring (which locks) write to it.
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("repo");
    copy_tree(&root, &copy);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&copy).unwrap());
    let repo = match password {
        None => Repository::open(store).await.unwrap(),
        Some(pw) => {
            assert!(matches!(
                Repository::open(store.clone()).await,
                Err(RepoError::KeyRequired)
            ));
            assert!(matches!(
                Repository::open_with_key(store.clone(), &key("not the password")).await,
                Err(RepoError::WrongPassword { slots: 1, .. })
            ));
            Repository::open_with_key(store, &key(pw)).await.unwrap()
        }
    };
    assert_eq!(repo.is_encrypted(), password.is_some());
    assert_eq!(repo.config().chunk_size, CS as u64);

    let listed = repo.list_snapshots(None).await.unwrap();
    assert_eq!(listed.len(), expected.snapshots.len());
    for (s, e) in listed.iter().zip(&expected.snapshots) {
        assert_eq!(s.volume.as_str(), e.volume);
        assert_eq!(s.snapshot.as_str(), e.snapshot);
        assert_eq!(s.parent.as_ref().map(|p| p.snapshot.to_string()), e.parent);
        assert_eq!(s.created.unix_millis(), e.created_unix_ms);
        assert_eq!(s.volume_size, e.volume_size);
        assert_eq!(s.chunk_size, e.chunk_size);
        assert_eq!(s.allocated_bytes, e.allocated_bytes);
        assert_eq!(s.stored_chunks, e.stored_chunks);
        assert_eq!(s.labels, e.labels);
    }

    let report = verify_data(&repo).await;
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(report.snapshots, expected.snapshots.len() as u64);

    for e in &expected.snapshots {
        let volume = VolumeName::new(&e.volume).unwrap();
        let (r, data) = restored(&repo, &volume, &e.snapshot, work.path()).await;
        assert_eq!(r.volume_size, e.volume_size);
        assert_eq!(data.len() as u64, e.volume_size);
        assert_eq!(
            blake3_hex(&data),
            e.image_blake3,
            "{} restores differently",
            e.snapshot
        );
    }
    // The images the fixture was made from are still what this file generates.
    for (img, e) in imgs.iter().zip(&expected.snapshots) {
        assert_eq!(blake3_hex(img), e.image_blake3);
    }
}

fn key(password: &str) -> RepoKey {
    RepoKey::Password(Password::new(password).unwrap())
}

fn fixture_out() -> PathBuf {
    let out = PathBuf::from(
        std::env::var("CBT_FIXTURE_OUT").expect("set CBT_FIXTURE_OUT to a new directory"),
    );
    assert!(
        !out.exists(),
        "{} exists: never overwrite a fixture",
        out.display()
    );
    out
}

fn fixture_init() -> InitOptions {
    InitOptions {
        chunk_size: Some(CS as u64),
        now: Timestamp(1_767_225_600_000), // 2026-01-01
    }
}

/// Writes a new fixture to `$CBT_FIXTURE_OUT` (which must not exist yet). Only for a new
/// format version: the committed v1 fixture is frozen. See `tests/fixtures/README.md`.
#[tokio::test]
#[ignore = "writes a new fixture; run by hand, see tests/fixtures/README.md"]
async fn generate_frozen_fixture() {
    let out = fixture_out();
    let root = out.join("repo-v1");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&root).unwrap());
    let repo = Repository::init(store, fixture_init()).await.unwrap();
    write_fixture(&repo, &out, "repo-v1", images()).await;
}

/// Writes a new encrypted fixture (`repo-enc-v1`, password [`ENC_PASSWORD`]) to
/// `$CBT_FIXTURE_OUT`. See `tests/fixtures/README.md`.
#[tokio::test]
#[ignore = "writes a new fixture; run by hand, see tests/fixtures/README.md"]
async fn generate_frozen_encrypted_fixture() {
    let out = fixture_out();
    let root = out.join("repo-enc-v1");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&root).unwrap());
    let repo = Repository::init_encrypted(
        store,
        fixture_init(),
        &Password::new(ENC_PASSWORD).unwrap(),
        ENC_KDF,
    )
    .await
    .unwrap();
    write_fixture(&repo, &out, "repo-enc-v1", images()).await;
}

/// Backs up `imgs` into `repo` (at `out/name`) and writes `out/name.json`: the first in
/// full, each next one as an incremental of the previous ([`BackupMode::IncrementalOf`], which
/// writes manifest format 2; the v1 fixtures were written with the format-1 writer of their
/// time).
async fn write_fixture(repo: &Repository, out: &Path, name: &str, imgs: Vec<Vec<u8>>) {
    let work = tempfile::tempdir().unwrap();
    let root = out.join(name);
    let volume = VolumeName::from_pvc("prod", "db-0").unwrap();
    let mut parent: Option<cbt_core::manifest::ManifestHead> = None;
    let mut expected = Expected {
        format: repo.config().version,
        snapshots: Vec::new(),
        files: BTreeMap::new(),
    };
    let label = if name.contains("v2") { "v2" } else { "v1" };
    for (i, img) in imgs.iter().enumerate() {
        let path = work.path().join(format!("v{i}.img"));
        std::fs::write(&path, img).unwrap();
        let name = SnapshotName::new(format!("snap-{}", i + 1)).unwrap();
        let mode = match parent.take() {
            None => BackupMode::Full { allocated: None },
            Some(p) => {
                // Changed ranges as CBT would report them: everything that differs, plus
                // the grown area.
                let prev = &imgs[i - 1];
                let mut extents = Vec::new();
                for (c, chunk) in img.chunks(CS).enumerate() {
                    let start = c * CS;
                    if prev.get(start..start + chunk.len()) != Some(chunk) {
                        extents.push((start as u64, chunk.len() as u64));
                    }
                }
                BackupMode::IncrementalOf {
                    parent: Box::new(p),
                    changed: RangeSet::try_from_extents(extents).unwrap(),
                }
            }
        };
        let req = BackupRequest {
            volume: volume.clone(),
            snapshot: name.clone(),
            mode,
            created: Timestamp(1_767_225_600_000 + (i as i64 + 1) * 86_400_000),
            source_info: SourceInfo {
                csi_driver: Some("hostpath.csi.k8s.io".into()),
                csi_snapshot_id: Some(format!("snap-handle-{}", i + 1)),
                namespace: Some("prod".into()),
                pvc: Some("db-0".into()),
                ..Default::default()
            },
            labels: BTreeMap::from([("fixture".into(), label.into())]),
            chunk_size: None,
            volume_size: None,
        };
        let src = Arc::new(FileSource::open(&path).unwrap());
        let done = engine::backup(repo, src, req, &EngineOptions::default())
            .await
            .unwrap();
        let m = repo.load_manifest(&volume, &name).await.unwrap();
        expected.snapshots.push(ExpectedSnapshot {
            volume: volume.to_string(),
            snapshot: name.to_string(),
            parent: m.parent.as_ref().map(|p| p.snapshot.to_string()),
            created_unix_ms: m.created.unix_millis(),
            volume_size: m.volume_size(),
            chunk_size: m.chunk_size(),
            allocated_bytes: m.chunks.allocated_bytes(),
            stored_chunks: m.chunks.stored_count(),
            labels: m.labels.clone(),
            image_blake3: blake3_hex(img),
        });
        parent = Some(done.head.clone());
    }
    std::fs::remove_dir_all(root.join(".cbt-tmp")).unwrap();
    expected.files = file_sums(&root);
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_vec_pretty(&expected).unwrap(),
    )
    .unwrap();
}

/// The format-2 fixture's images: 4 KiB chunks over 300 chunk slots (three leaf segments and a
/// root), mostly holes; `snap-2` changes one chunk of the first leaf (so it shares the other
/// leaves with `snap-1`), `snap-3` grows the volume by a fourth leaf with a short last chunk.
fn images_v2() -> Vec<Vec<u8>> {
    let mut stream = XorShift::from_state(0x0f0e_2222_c0de_f00d);
    let mut noise = |n: usize| stream.low_bytes(n);
    let text =
        |n: usize| b"frozen fixture of cbt manifest format 2. ".repeat(n / 40 + 2)[..n].to_vec();
    let mut v1 = vec![0u8; 300 * CS];
    for (c, data) in [
        (0, noise(CS)),
        (1, text(CS)),
        (5, text(CS)), // same chunk as 1
        (130, noise(CS)),
        (131, text(CS / 2)),
        (260, noise(CS)),
        (299, text(CS)),
    ] {
        v1[c * CS..c * CS + data.len()].copy_from_slice(&data);
    }
    let mut v2 = v1.clone();
    v2[10..20].copy_from_slice(b"CHANGED!!!"); // chunk 0; leaves 1 and 2 unchanged
    let mut v3 = v2.clone();
    v3.extend(vec![0u8; 100 * CS]);
    v3.extend(noise(1000)); // chunk 400: a short last chunk in a fourth leaf
    v3[350 * CS..350 * CS + 5].copy_from_slice(b"hello");
    vec![v1, v2, v3]
}

/// The frozen format-2 fixture (`repo-v2`): every future version must list, verify and
/// restore it to the same bytes, and its incremental must share segments with its parent.
#[tokio::test]
async fn frozen_fixture_v2_is_still_read() {
    check_fixture_images("repo-v2", None, images_v2()).await;
    // Sharing is in the committed bytes: fewer segment objects than the snapshots' trees have.
    let root = fixtures().join("repo-v2");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&root).unwrap());
    let repo = Repository::open(store).await.unwrap();
    let volume = VolumeName::from_pvc("prod", "db-0").unwrap();
    let mut referenced = 0;
    for s in ["snap-1", "snap-2", "snap-3"] {
        let head = repo
            .load_head(&volume, &SnapshotName::new(s).unwrap())
            .await
            .unwrap();
        let cbt_core::manifest::MapLocation::Tree { root: Some(r) } = head.map else {
            panic!("{s} is not a format-2 manifest")
        };
        let shape = cbt_core::maptree::TreeShape::new(head.geometry);
        let mut todo = vec![(shape.root_pos(), r)];
        while let Some((pos, r)) = todo.pop() {
            referenced += 1;
            if let cbt_core::maptree::Segment::Node(c) =
                repo.read_segment(&shape, pos, &r).await.unwrap()
            {
                todo.extend(c);
            }
        }
    }
    let stored = file_sums(&root)
        .keys()
        .filter(|k| k.starts_with("segments/"))
        .count();
    // Three leaves and a root, twice; four leaves and a root.
    assert_eq!(referenced, 4 + 4 + 5);
    assert!(
        stored < referenced,
        "{stored} segment objects for {referenced} references"
    );
}

/// Writes the format-2 fixture (`repo-v2`) to `$CBT_FIXTURE_OUT`. See
/// `tests/fixtures/README.md`.
#[tokio::test]
#[ignore = "writes a new fixture; run by hand, see tests/fixtures/README.md"]
async fn generate_frozen_v2_fixture() {
    let out = fixture_out();
    let root = out.join("repo-v2");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&root).unwrap());
    let repo = Repository::init(store, fixture_init()).await.unwrap();
    write_fixture(&repo, &out, "repo-v2", images_v2()).await;
}

/// An incremental whose parent is a format-1 manifest reads the parent whole and writes
/// format 2; both restore to the right bytes, and GC keeps everything both reference.
#[tokio::test]
async fn an_incremental_of_a_v1_parent_writes_v2() {
    let (work, repo, volume, parent, img, path) = v1_parent_and_a_change().await;
    let mode = BackupMode::IncrementalOf {
        parent: Box::new(parent.clone()),
        changed: RangeSet::try_from_extents([(0, CS as u64)]).unwrap(),
    };
    let done = back_up_snap_4(&repo, &volume, mode, &path).await;
    assert!(matches!(
        done.head.map,
        cbt_core::manifest::MapLocation::Tree { root: Some(_) }
    ));
    assert_eq!(done.head.parent, Some(parent.as_parent()));
    let gc = engine_support::collect(&repo, Timestamp(1_800_000_000_000)).await;
    assert_eq!(gc.deleted_segments, 0);
    for (snap, want) in [("snap-3", &images()[2]), ("snap-4", &img)] {
        assert_eq!(
            &restored(&repo, &volume, snap, work.path()).await.1,
            want,
            "{snap}"
        );
    }
}

/// A full backup with a format-1 parent holds the parent whole (the streamed window needs
/// format 2) and still uploads only the chunk that differs from it, recording the link.
#[tokio::test]
async fn a_full_backup_with_a_v1_parent_uploads_only_the_change() {
    let (work, repo, volume, parent, img, path) = v1_parent_and_a_change().await;
    let mode = BackupMode::FullWithParent {
        allocated: None,
        parent: parent.as_parent(),
    };
    let done = back_up_snap_4(&repo, &volume, mode, &path).await;
    assert!(done.manifest.is_some(), "a format-1 parent is held whole");
    assert_eq!(done.head.parent, Some(parent.as_parent()));
    assert_eq!(done.stats.objects_written, 1);
    assert_eq!(done.stats.bytes_changed, CS as u64);
    assert_eq!(restored(&repo, &volume, "snap-4", work.path()).await.1, img);
}

/// Backs the file at `path` up as `volume`/`snap-4` (the day after the fixture's last
/// snapshot) with default engine options.
async fn back_up_snap_4(
    repo: &Repository,
    volume: &VolumeName,
    mode: BackupMode,
    path: &Path,
) -> engine::BackupOutcome {
    let req = BackupRequest {
        volume: volume.clone(),
        snapshot: SnapshotName::new("snap-4").unwrap(),
        mode,
        created: Timestamp(1_767_225_600_000 + 5 * 86_400_000),
        source_info: Default::default(),
        labels: Default::default(),
        chunk_size: None,
        volume_size: None,
    };
    let src = Arc::new(FileSource::open(path).unwrap());
    engine::backup(repo, src, req, &EngineOptions::default())
        .await
        .unwrap()
}

/// Restores `volume`/`snapshot` with default options to `<dir>/<snapshot>.img`; the report
/// and the bytes restored.
async fn restored(
    repo: &Repository,
    volume: &VolumeName,
    snapshot: &str,
    dir: &Path,
) -> (engine::RestoreReport, Vec<u8>) {
    let target = dir.join(format!("{snapshot}.img"));
    let report = engine::restore(
        repo,
        volume,
        &SnapshotName::new(snapshot).unwrap(),
        &target,
        &RestoreOptions::default(),
        &EngineOptions::default(),
    )
    .await
    .unwrap();
    let data = std::fs::read(&target).unwrap();
    (report, data)
}

/// A copy of the format-1 fixture repository, its `snap-3` head (format 1) and the image of
/// that snapshot with five bytes changed, written to `next.img` in the returned directory.
async fn v1_parent_and_a_change() -> (
    tempfile::TempDir,
    Repository,
    VolumeName,
    cbt_core::manifest::ManifestHead,
    Vec<u8>,
    std::path::PathBuf,
) {
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("repo");
    copy_tree(&fixtures().join("repo-v1"), &copy);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&copy).unwrap());
    let repo = Repository::open(store).await.unwrap();
    let volume = VolumeName::from_pvc("prod", "db-0").unwrap();
    let parent = repo
        .load_head(&volume, &SnapshotName::new("snap-3").unwrap())
        .await
        .unwrap();
    assert_eq!(parent.map, cbt_core::manifest::MapLocation::Inline);
    let mut img = images()[2].clone();
    img[100..105].copy_from_slice(b"v2 on");
    let path = work.path().join("next.img");
    std::fs::write(&path, &img).unwrap();
    (work, repo, volume, parent, img, path)
}
