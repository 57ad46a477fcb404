//! `engine::verify_target`: a restored device is read back and compared with the manifest.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod engine_support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cbt_core::manifest::StoredManifest;
use cbt_store::engine::{self, verify_target, verify_target_stored};
use cbt_store::repo::{RepoError, Repository};
use engine_support::{backed_up_and_restored, local_repo_sealed_if, snap, vol};

#[tokio::test]
async fn a_restored_target_verifies_and_a_changed_byte_is_found() {
    check(false).await;
}

/// The same from an encrypted repository, whose manifests record keyed chunk hashes.
#[tokio::test]
async fn a_target_restored_from_an_encrypted_repository_verifies() {
    check(true).await;
}

async fn check(encrypted: bool) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[7u8; 5000], 70_000).unwrap();
    f.write_all_at(&[9u8; 10], (1 << 20) - 10).unwrap();
    let repo = local_repo_sealed_if(t.path(), 64 * 1024, encrypted).await;
    assert_eq!(repo.is_encrypted(), encrypted);
    let target = backed_up_and_restored(&repo, &src, t.path()).await;
    // A full backup streams its map; verify_target takes it whole.
    let stored = repo.load_manifest(&vol("v"), &snap("s")).await.unwrap();
    let r = verify_target(repo.codec(), &stored, &target).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.bytes_checked, 1 << 20);
    assert_eq!(r.chunks_ok, 16);

    // A changed byte in a stored chunk and one in a zero chunk are both found.
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    w.write_all_at(&[1], 70_001).unwrap();
    w.write_all_at(&[1], 5 * 64 * 1024 + 3).unwrap();
    let r = verify_target(repo.codec(), &stored, &target).await.unwrap();
    assert_eq!(r.mismatched, vec![1, 5]);
    assert_eq!(r.mismatched_count, 2);

    // A target shorter than the volume cannot hold it.
    w.set_len(1000).unwrap();
    let e = verify_target(repo.codec(), &stored, &target)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
}

/// A format-2 map larger than the read-back window is walked leaf by leaf: the read-back holds
/// at most `READ_BACK_ENTRIES` entries, still checks every chunk (stored ones far into the map,
/// zero ones between and after leaves), and finds a changed byte in each kind.
#[tokio::test]
async fn a_map_larger_than_the_window_is_read_back_in_a_bounded_window() {
    let t = tempfile::tempdir().unwrap();
    let chunk = 4096u64;
    let chunks = 2048u64;
    let src = t.path().join("src.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(chunks * chunk).unwrap();
    // Every chunk but each seventh and the last 100 holds distinct data.
    let mut stored = 0u64;
    for i in 0..chunks - 100 {
        if i % 7 != 3 {
            f.write_all_at(&i.to_le_bytes(), i * chunk + 17).unwrap();
            stored += 1;
        }
    }
    assert!(stored > engine::READ_BACK_ENTRIES);
    let (repo, head, target) = restored(t.path(), &src, chunk).await;
    assert!(
        matches!(head, StoredManifest::V2(_)),
        "a full backup writes format 2"
    );
    let r = verify_target_stored(&repo, &head, &target).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.chunks_ok, chunks);
    assert_eq!(r.bytes_checked, chunks * chunk);
    assert!(r.map_entries_peak > 0);
    assert!(
        r.map_entries_peak <= engine::READ_BACK_ENTRIES,
        "held {} entries",
        r.map_entries_peak
    );

    // A stored chunk far past the window, a zero chunk between leaves and one after the last
    // stored chunk.
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    w.write_all_at(&[0xff], 1900 * chunk + 5).unwrap();
    w.write_all_at(&[0xff], 1004 * chunk).unwrap(); // 1004 % 7 == 3: a zero chunk
    w.write_all_at(&[0xff], (chunks - 1) * chunk + 9).unwrap();
    let r = verify_target_stored(&repo, &head, &target).await.unwrap();
    assert_eq!(r.mismatched, vec![1004, 1900, chunks - 1]);
    assert_eq!(r.mismatched_count, 3);
    assert_eq!(r.chunks_ok, chunks - 3);

    // A target shorter than the volume cannot hold it: an I/O error naming the offset.
    w.set_len(1000 * chunk).unwrap();
    let e = verify_target_stored(&repo, &head, &target)
        .await
        .unwrap_err();
    match e {
        RepoError::TargetIo { offset, source, .. } => {
            assert_eq!(offset, Some(1000 * chunk));
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
        }
        other => panic!("expected a target I/O error, got {other:?}"),
    }
}

/// A repository of `chunk`-sized chunks in `dir/repo`, `src` backed up into it in full and
/// restored to `dir/restored.img`: the repository, the snapshot's stored manifest, the target.
async fn restored(dir: &Path, src: &Path, chunk: u64) -> (Repository, StoredManifest, PathBuf) {
    let repo = local_repo_sealed_if(dir, chunk, false).await;
    let target = backed_up_and_restored(&repo, src, dir).await;
    let head = repo.load_stored(&vol("v"), &snap("s")).await.unwrap();
    (repo, head, target)
}

/// A restore into a sparse file is read back without reading its holes: an 8 GiB volume with
/// a few MiB of data reads about that much, and still finds a changed byte, a hole punched
/// over a whole stored chunk (not read, judged as the zeros it reads as) and one punched into
/// part of a stored chunk.
#[tokio::test]
async fn a_sparse_target_is_read_back_without_reading_its_holes() {
    const MIB: u64 = 1 << 20;
    let t = tempfile::tempdir().unwrap();
    let size = 8 << 30;
    let src = t.path().join("src.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    // Sixteen 1 MiB chunks of data spread over the volume (at 1 MiB chunks: 8192 chunks).
    let data_chunks: Vec<u64> = (0..16).map(|i| i * 509 + 3).collect();
    for &c in &data_chunks {
        let fill: Vec<u8> = (0..MIB).map(|b| (b * 31 + c) as u8 | 1).collect();
        f.write_all_at(&fill, c * MIB).unwrap();
    }
    drop(f);
    let (repo, head, target) = restored(t.path(), &src, MIB).await;
    let sparse = {
        let f = std::fs::File::open(&target).unwrap();
        cbt_core::extents::data_ranges(&f, size)
            .unwrap()
            .is_some_and(|d| d.total_bytes() < size / 2)
    };

    let r = verify_target_stored(&repo, &head, &target).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(r.chunks_ok, size / MIB);
    assert_eq!(r.bytes_checked, size);
    // Where the file system reports holes (ext4, xfs, btrfs, tmpfs), only the data is read.
    if sparse {
        assert_eq!(r.bytes_read, 16 * MIB, "{r:?}");
    } else {
        assert_eq!(r.bytes_read, size);
    }

    // A changed byte in one stored chunk, a hole over all of another and over part of a third.
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    let (changed, emptied, pierced) = (data_chunks[2], data_chunks[7], data_chunks[12]);
    w.write_all_at(&[0], changed * MIB + 77).unwrap();
    let punch = |at: u64, len: u64| {
        use rustix::fs::{FallocateFlags, fallocate};
        fallocate(
            &w,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            at,
            len,
        )
    };
    let punched = punch(emptied * MIB, MIB).is_ok() && punch(pierced * MIB + 8192, 4096).is_ok();
    let r = verify_target_stored(&repo, &head, &target).await.unwrap();
    if punched {
        assert_eq!(r.mismatched, vec![changed, emptied, pierced], "{r:?}");
        assert_eq!(r.mismatched_count, 3);
        if sparse {
            assert_eq!(
                r.bytes_read,
                15 * MIB,
                "the emptied chunk is not read: {r:?}"
            );
        }
    } else {
        assert_eq!(r.mismatched, vec![changed], "{r:?}");
    }
    assert_eq!(r.bytes_checked, size);

    // A sparse target shorter than the volume still cannot hold it.
    w.set_len(size - 3 * MIB).unwrap();
    let e = verify_target_stored(&repo, &head, &target)
        .await
        .unwrap_err();
    match e {
        RepoError::TargetIo { offset, source, .. } => {
            assert_eq!(offset, Some(size - 3 * MIB));
            assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof);
        }
        other => panic!("expected a target I/O error, got {other:?}"),
    }
}
