//! The data mover's backup, restore and read-back, through `mover::run` with a `file://`
//! repository and a regular file standing in for the attached block device.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use cbt_core::Timestamp;
use cbt_core::manifest::StoredManifest;
use cbt_k8s::mover::{
    self, BackupTask, MOVER_SPEC_VERSION, MoverError, MoverSpec, MoverTask, RestoreTask,
};
use cbt_store::repo::{InitOptions, Repository};
use cbt_store::store::{LocalStore, ObjectStore};

const CHUNK: u64 = 4096;
/// More stored chunks than the read-back window holds (`engine::READ_BACK_ENTRIES`).
const CHUNKS: u64 = 1600;

fn spec(repo: &Path, device: &Path, task: MoverTask) -> MoverSpec {
    MoverSpec {
        version: MOVER_SPEC_VERSION,
        repo: format!("file://{}", repo.display()),
        s3_endpoint: None,
        s3_region: None,
        device: device.display().to_string(),
        task,
    }
}

fn restore_task() -> RestoreTask {
    RestoreTask {
        volume: "ns-db".into(),
        snapshot: "s1".into(),
    }
}

/// A `file://` repository of `CHUNK`-sized chunks in `dir/repo`.
async fn init_repo(dir: &Path) -> std::path::PathBuf {
    let repo = dir.join("repo");
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&repo).unwrap());
    Repository::init(
        store,
        InitOptions {
            chunk_size: Some(CHUNK),
            now: Timestamp::from_unix_secs(1),
        },
    )
    .await
    .unwrap();
    repo
}

/// A backup of `volume` as `snapshot` without a metadata service (a full read, against the
/// volume's last snapshot if it has one).
fn backup_task(volume: &str, snapshot: &str) -> MoverTask {
    MoverTask::Backup(Box::new(BackupTask {
        volume: volume.into(),
        snapshot: snapshot.into(),
        metadata: None,
        fallback_full: true,
        source: Default::default(),
        labels: Default::default(),
        compression_level: 1,
    }))
}

/// A snapshot whose format-2 map spans many leaves, backed up by the mover from `src`.
async fn backed_up(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = dir.join("src.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(CHUNKS * CHUNK).unwrap();
    for i in 0..CHUNKS {
        if i % 5 != 2 {
            f.write_all_at(&(i + 1).to_le_bytes(), i * CHUNK + 100)
                .unwrap();
        }
    }
    let repo = init_repo(dir).await;
    let backup = backup_task("ns-db", "s1");
    let r = mover::run(&spec(&repo, &src, backup), Timestamp::from_unix_secs(2))
        .await
        .unwrap();
    assert!(r.ok);
    (repo, src)
}

/// A restore onto a device holding other data makes it the snapshot and reads every chunk
/// back; a device changed afterwards fails the read-back with the count and the first chunks;
/// a second restore repairs it.
#[tokio::test]
async fn a_restore_reads_the_device_back_and_a_changed_device_fails_the_read_back() {
    let t = tempfile::tempdir().unwrap();
    let (repo, src) = backed_up(t.path()).await;
    let stored = {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&repo).unwrap());
        let r = Repository::open(store).await.unwrap();
        let volume = cbt_core::VolumeName::new("ns-db").unwrap();
        let snap = cbt_core::SnapshotName::new("s1").unwrap();
        r.load_stored(&volume, &snap).await.unwrap()
    };
    let StoredManifest::V2(head) = &stored else {
        panic!("the mover's full backup writes format 2");
    };
    // A provisioned volume holding someone else's bytes, one chunk larger than the snapshot.
    let device = t.path().join("device");
    std::fs::write(&device, vec![0xa5u8; ((CHUNKS + 1) * CHUNK) as usize]).unwrap();
    let r = mover::run(
        &spec(&repo, &device, MoverTask::Restore(restore_task())),
        Timestamp::from_unix_secs(3),
    )
    .await
    .unwrap();
    assert!(r.ok);
    assert_eq!(r.chunks_verified, CHUNKS);
    assert_eq!(r.volume_size, CHUNKS * CHUNK);
    assert_eq!(r.snapshot_id.as_deref(), Some(head.snapshot_id.as_str()));
    let (want, got) = (
        std::fs::read(&src).unwrap(),
        std::fs::read(&device).unwrap(),
    );
    assert!(
        got[..want.len()] == want[..],
        "the device holds the snapshot"
    );

    // A stored chunk far into the map and a zero chunk change after the restore.
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap();
    w.write_all_at(&[1], 1500 * CHUNK + 100).unwrap();
    w.write_all_at(&[1], 1202 * CHUNK).unwrap(); // 1202 % 5 == 2: a zero chunk
    let verify = spec(&repo, &device, MoverTask::Verify(restore_task()));
    let e = mover::run(&verify, Timestamp::from_unix_secs(4))
        .await
        .unwrap_err();
    match &e {
        MoverError::VerifyFailed {
            snapshot,
            count,
            first,
        } => {
            assert_eq!(snapshot, "s1");
            assert_eq!(*count, 2);
            assert_eq!(first, &vec![1202, 1500]);
        }
        other => panic!("expected a failed read-back, got {other:?}"),
    }
    assert_eq!(e.kind(), cbt_core::ErrorKind::Integrity);
    assert!(!mover::failure_report(&e).ok);

    // Restoring again rewrites both chunks, and the read-back alone now passes.
    let r = mover::run(
        &spec(&repo, &device, MoverTask::Restore(restore_task())),
        Timestamp::from_unix_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.chunks_verified, CHUNKS);
    let r = mover::run(&verify, Timestamp::from_unix_secs(6))
        .await
        .unwrap();
    assert!(r.ok);
    assert_eq!(r.chunks_verified, CHUNKS);
    assert_eq!(r.bytes_written, 0, "a read-back writes nothing");
    // Every stored chunk is read (four in five); zero chunks only where they are not holes.
    assert!(
        (CHUNKS / 5 * 4 * CHUNK..=CHUNKS * CHUNK).contains(&r.bytes_read),
        "{r:?}"
    );

    // A device shorter than the volume cannot be read back: an I/O error, not a mismatch.
    w.set_len(1000 * CHUNK).unwrap();
    let e = mover::run(&verify, Timestamp::from_unix_secs(7))
        .await
        .unwrap_err();
    assert!(matches!(e, MoverError::Io { .. }), "{e:?}");
}

/// The mover's second backup without a SnapshotMetadata service: a full read of the device
/// with the latest backup as parent (`BackupMode::FullWithParent`), whose map is read in a
/// window beside the new one. 4,096 chunks of 64 distinct contents (few objects, so it stays
/// fast, but a map of 32 leaves, more than the streamed bound); three chunks change.
#[tokio::test]
async fn a_backup_without_metadata_service_streams_against_its_parent_and_uploads_only_changes() {
    const N: u64 = 4096;
    let t = tempfile::tempdir().unwrap();
    let device = t.path().join("device");
    let f = std::fs::File::create(&device).unwrap();
    let mut image = vec![0u8; (N * CHUNK) as usize];
    for i in 0..N {
        let at = (i * CHUNK) as usize;
        image[at..at + 8].copy_from_slice(&(i % 64 + 1).to_le_bytes());
    }
    f.write_all_at(&image, 0).unwrap();
    let repo = init_repo(t.path()).await;
    let backup = |snapshot: &str| backup_task("ns-big", snapshot);
    let first = mover::run(
        &spec(&repo, &device, backup("b1")),
        Timestamp::from_unix_secs(2),
    )
    .await
    .unwrap();
    assert!(first.ok);
    assert_eq!(first.parent, None);
    assert_eq!(first.chunks_uploaded, 64);

    // Three chunks get content of their own: early, mid-volume, the last one.
    for i in [5, 2000, N - 1] {
        f.write_all_at(format!("changed {i}").as_bytes(), i * CHUNK + 200)
            .unwrap();
    }
    let second = mover::run(
        &spec(&repo, &device, backup("b2")),
        Timestamp::from_unix_secs(3),
    )
    .await
    .unwrap();
    assert!(second.ok);
    assert_eq!(second.parent.as_deref(), Some("b1"));
    assert!(second.metadata_call.is_none(), "no service was asked");
    assert_eq!(second.bytes_read, N * CHUNK);
    assert_eq!(second.chunks_uploaded, 3);
    assert_eq!(second.chunks_deduplicated, N - 3);
    assert_eq!(second.bytes_changed, 3 * CHUNK);
    // Both maps streamed: under the bound from the engine's constants, below the map's size.
    let o = cbt_store::engine::EngineOptions::default();
    let leaf = cbt_core::maptree::LEAF_SPAN;
    let window = cbt_store::repo::LEAF_WINDOW as u64;
    let ahead = (o.readers + o.readahead + o.workers + 2 * o.transfers) as u64;
    let bound = ahead + (window + 2) * leaf + (window + 2 + ahead.div_ceil(leaf)) * leaf;
    assert!(
        second.map_entries_peak <= bound && second.map_entries_peak < N,
        "{} entries held, bound {bound}, map {N}",
        second.map_entries_peak
    );

    // The snapshot restores to the changed device's bytes.
    let target = t.path().join("target");
    std::fs::write(&target, vec![0u8; (N * CHUNK) as usize]).unwrap();
    let restore = MoverTask::Restore(RestoreTask {
        volume: "ns-big".into(),
        snapshot: "b2".into(),
    });
    let r = mover::run(&spec(&repo, &target, restore), Timestamp::from_unix_secs(4))
        .await
        .unwrap();
    assert_eq!(r.chunks_verified, N);
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&device).unwrap());
}
