//! Backups of sources read with `O_DIRECT`: the chunks stored are byte for byte those of a
//! buffered read (through the local store, which copies the unaligned objects once, and over
//! S3, which uploads them as read), the volume's unaligned tail included; a source refusing
//! direct reads falls back without failing the backup; and a loop device is read directly by
//! default (skipped, with the reason printed, where `losetup` is unavailable).
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbt_store::engine::{self, BlockSource, DirectIo, FileSource, ReadCounts};
use cbt_store::repo::Repository;
use cbt_store::store::{LocalStore, ObjectStore};
use cbt_store::testing::S3TestServer;
use engine_support::*;

/// Chunk size: large enough that the local store writes chunk objects with its own
/// `O_DIRECT` path (it does from 256 KiB), small enough for a quick test.
const BIG: u64 = 512 * 1024;

/// A temp dir on the target dir's file system (a real disk's, where `/tmp` may be a tmpfs
/// that refuses `O_DIRECT`).
fn disk_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// A dense image of `BIG` chunks of noise, text and zeros with a last chunk of `tail` bytes.
fn dense(chunks: u64, tail: usize) -> Vec<u8> {
    let cs = BIG as usize;
    let mut img = Vec::new();
    for i in 0..chunks {
        match i % 3 {
            0 => img.extend(noise(300 + i, cs)),
            1 => img.extend(b"read past the page cache ".repeat(cs / 25 + 1)[..cs].iter()),
            _ => img.extend(std::iter::repeat_n(0u8, cs)),
        }
    }
    img.extend(noise(400, tail));
    img
}

/// Writes `img` to `path` as a sparse file: only its non-zero 64 KiB blocks are written, so
/// the file has holes the backup skips (where the file system reports them).
fn write_sparse(path: &Path, img: &[u8]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(img.len() as u64).unwrap();
    for (i, block) in img.chunks(64 * 1024).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, (i * 64 * 1024) as u64).unwrap();
        }
    }
}

/// A sparse image: data here and there (one run crossing a chunk boundary), holes between,
/// and an odd-sized tail.
fn sparse(chunks: u64, tail: usize) -> Vec<u8> {
    let cs = BIG as usize;
    let mut img = vec![0u8; chunks as usize * cs + tail];
    img[cs / 2..cs / 2 + 100_000].copy_from_slice(&noise(7, 100_000));
    img[3 * cs - 5000..3 * cs + 70_000].copy_from_slice(&noise(8, 75_000));
    let end = img.len();
    img[end - tail / 2..].copy_from_slice(&noise(9, tail / 2));
    img
}

/// [`backup_check_restore`] of `src` into a new local repository under `dir`, which reads the
/// whole image; returns the bytes read.
async fn backed_up_locally(dir: &Path, src: Arc<FileSource>, img: &[u8]) -> u64 {
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.join("repo")).unwrap());
    let repo = init_sized(store.clone(), BIG).await;
    let restored = dir.join("restored");
    let read = backup_check_restore(&repo, store.as_ref(), src, img, "one", &restored).await;
    assert_eq!(read, img.len() as u64);
    read
}

/// Backs `path` up through `src` as `pvc`/`snapshot` with the test engine options, checks
/// every stored chunk against the copying encoder's object of the same bytes of `img`, restores
/// it and compares with `img`. Returns the bytes the backup read.
async fn backup_check_restore(
    repo: &Repository,
    store: &dyn ObjectStore,
    src: Arc<FileSource>,
    img: &[u8],
    snapshot: &str,
    restored: &Path,
) -> u64 {
    let mut out = engine::backup(
        repo,
        src.clone(),
        request("pvc", snapshot, full(), 1),
        &opts(),
    )
    .await
    .unwrap();
    if out.manifest.is_none() {
        out.manifest = Some(
            repo.load_manifest(&vol("pvc"), &snap(snapshot))
                .await
                .unwrap(),
        );
    }
    let map = &out.manifest.as_ref().unwrap().chunks;
    assert_stored_as_encoded(store, map, img, BIG, snapshot).await;
    restore_file(repo, &vol("pvc"), &snap(snapshot), restored)
        .await
        .unwrap();
    assert!(
        std::fs::read(restored).unwrap() == img,
        "{snapshot}: restore differs"
    );
    out.stats.bytes_read
}

/// Image files read with `DirectIo::Always`, dense and sparse, of sizes that are multiples of
/// neither 4 KiB nor the chunk size, back up to chunk objects identical to the buffered
/// encoder's in the local store and over S3, and restore exactly. Where the file system takes
/// `O_DIRECT`, everything but each volume's sub-4 KiB tail was read directly.
#[tokio::test]
async fn direct_reads_store_the_same_objects_in_both_stores() {
    let dir = disk_tempdir();
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("direct").unwrap();
    let images = [
        ("dense", dense(7, 12_345)),
        ("sparse", sparse(6, 3 * 4096 + 1_001)),
    ];
    for (kind, img) in &images {
        let path = dir.path().join(format!("{kind}.img"));
        if *kind == "sparse" {
            write_sparse(&path, img);
        } else {
            std::fs::write(&path, img).unwrap();
        }
        let s3: Arc<dyn ObjectStore> = Arc::new(server.store("direct", kind).await.unwrap());
        let local: Arc<dyn ObjectStore> =
            Arc::new(LocalStore::new(dir.path().join(format!("{kind}-repo"))).unwrap());
        for (name, store) in [("local", local), ("s3", s3)] {
            let repo = init_sized(store.clone(), BIG).await;
            let src = Arc::new(FileSource::open_with(&path, DirectIo::Always).unwrap());
            let direct = src.reads_direct();
            let restored = dir.path().join(format!("{kind}-{name}.restored"));
            let read =
                backup_check_restore(&repo, store.as_ref(), src.clone(), img, kind, &restored)
                    .await;
            let counts = src.read_counts();
            assert_eq!(
                counts.direct_bytes + counts.buffered_bytes,
                read,
                "{kind}/{name}"
            );
            if direct {
                assert!(
                    src.reads_direct(),
                    "{kind}/{name}: a direct read was refused"
                );
                // Only the tail past the last 4 KiB boundary is read through the cache (when
                // the backup reads the last chunk at all).
                assert!(counts.buffered_bytes < 4096, "{kind}/{name}: {counts:?}");
                assert!(counts.direct_bytes > 0, "{kind}/{name}: {counts:?}");
            } else {
                eprintln!(
                    "{kind}/{name}: {} refuses O_DIRECT; checked the buffered fallback only",
                    dir.path().display()
                );
            }
        }
    }
}

/// A source whose direct reads are refused with `EINVAL` (on every machine: the test support
/// refuses them itself) backs up and restores exactly through the page cache, without an error.
#[tokio::test]
async fn a_source_refusing_direct_reads_falls_back_to_the_cache() {
    let dir = disk_tempdir();
    let img = dense(4, 777);
    let path = dir.path().join("refusing.img");
    std::fs::write(&path, &img).unwrap();
    let src = Arc::new(
        FileSource::open_with(&path, DirectIo::Always)
            .unwrap()
            .refusing_direct_reads(),
    );
    assert_eq!(src.direct_alignment(), Some(4096));
    let read = backed_up_locally(dir.path(), src.clone(), &img).await;
    assert_eq!(
        src.read_counts(),
        ReadCounts {
            direct_bytes: 0,
            buffered_bytes: read
        }
    );
    assert!(!src.reads_direct());
}

/// A loop device attached by `losetup`, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    /// Attaches `image`, or says why it cannot (no `losetup`, not root, no loop devices).
    fn attach(image: &Path) -> Result<Loop, String> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Loop(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

/// A block device is read with `O_DIRECT` by default (`FileSource::open`): the backup reads it
/// all directly, the device's size being a multiple of its 512-byte logical blocks but not of
/// 4 KiB, and restores it exactly. Skipped (with the reason) where loop devices are not
/// available.
#[tokio::test]
async fn a_loop_device_is_read_directly_by_default() {
    let dir = disk_tempdir();
    let img = dense(5, 3 * 512);
    let path = dir.path().join("loop.img");
    std::fs::write(&path, &img).unwrap();
    let dev = match Loop::attach(&path) {
        Ok(dev) => dev,
        Err(why) => {
            eprintln!("skipping the loop-device test: {why}");
            return;
        }
    };
    let src = Arc::new(FileSource::open(&dev.0).unwrap());
    assert_eq!(src.size(), img.len() as u64);
    assert!(
        src.reads_direct(),
        "a block device is read directly by default"
    );
    let read = backed_up_locally(dir.path(), src.clone(), &img).await;
    assert_eq!(
        src.read_counts(),
        ReadCounts {
            direct_bytes: read - 3 * 512,
            buffered_bytes: 3 * 512
        }
    );
}
