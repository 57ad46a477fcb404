//! "Trust nothing you read": repositories written with the library's own writer, then edited
//! the way someone with write access to the store could, and what every reader does with
//! them. Each test names the behaviour it pins; each failed before the checks it tests existed.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use cbt_core::gc::RetentionPolicy;
use cbt_core::{CoreError, Timestamp};
use cbt_store::chunk::{self, ChunkDecodeError};
use cbt_store::engine::{
    self, BackupMode, BackupOutcome, BackupRequest, BlockSource, FileSource, RestoreOptions,
};
use cbt_store::repo::{
    BreakMode, GcOptions, ProblemKind, PruneOptions, RepoError, Repository, VerifyOptions,
    manifest_key,
};
use cbt_store::store::{ErrorKind, ObjectStore, PutMode};
use cbt_store::testing::hooked::{Call, HookedStore, StoreHook};
use engine_support::*;

const SIZE: usize = 12 * CS as usize;

/// The JSON inside a stored manifest object.
/// The manifest in its format-1 (single JSON document) form, which every build still reads:
/// tampering with it is how these tests forge hostile manifests.
async fn manifest_json(repo: &Repository, volume: &str, snapshot: &str) -> serde_json::Value {
    let m = repo
        .load_manifest(&vol(volume), &snap(snapshot))
        .await
        .unwrap();
    serde_json::from_slice(&m.to_json().unwrap()).unwrap()
}

/// Writes `json` back as the manifest object, framed exactly as the writer frames it.
async fn put_manifest_json(
    store: &dyn ObjectStore,
    volume: &str,
    snapshot: &str,
    json: &serde_json::Value,
) {
    let z = zstd::bulk::compress(&serde_json::to_vec(json).unwrap(), 3).unwrap();
    put_manifest_body(store, volume, snapshot, &z).await;
}

async fn put_manifest_body(store: &dyn ObjectStore, volume: &str, snapshot: &str, z: &[u8]) {
    let mut body = b"CBMF\x01".to_vec();
    body.extend_from_slice(z);
    store
        .put(
            &manifest_key(&vol(volume), &snap(snapshot)),
            Bytes::from(body),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
}

fn chunk_file(fx: &Fixture, hash: &cbt_core::ChunkHash) -> std::path::PathBuf {
    fx.local.path_of(&chunk::chunk_key(hash)).unwrap()
}

fn set_mtime(path: &std::path::Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// The short last chunk of a volume recorded with the hash (and checksum and stored size) of
/// a full chunk: one content hash with two raw lengths. Restoring it used to write a whole
/// chunk past the end of the volume, growing the target; now every loader refuses it.
#[tokio::test]
async fn a_hash_recorded_with_two_lengths_is_refused_and_nothing_is_written_past_the_volume() {
    let fx = Fixture::new().await;
    let size = SIZE + 1000; // a short last chunk of 1000 bytes
    let img = image(size, 3);
    let src = fx.write("d.img", &img);
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    let last = out
        .manifest
        .as_ref()
        .unwrap()
        .chunks
        .geometry()
        .chunk_count()
        - 1;
    // A full chunk that compresses well, so its stored size is plausible for 1000 raw bytes.
    let (_, full_chunk) = out
        .manifest
        .as_ref()
        .unwrap()
        .chunks
        .iter_stored()
        .filter(|(i, _)| *i != last)
        .min_by_key(|(_, r)| r.stored_size)
        .unwrap();
    assert!(full_chunk.stored_size < 1000);
    let mut json = manifest_json(&fx.repo, "v", "s").await;
    let chunks = json["chunks"].as_array_mut().unwrap();
    chunks.retain(|c| c[0] != last);
    chunks.push(serde_json::json!([
        last,
        full_chunk.hash,
        full_chunk.stored_size,
        full_chunk.crc32c,
        1000
    ]));
    put_manifest_json(fx.store.as_ref(), "v", "s", &json).await;

    let target = fx.path("r.img");
    let err = restore_file(&fx.repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            RepoError::Manifest {
                source: CoreError::ConflictingChunkRefs { index, .. },
                ..
            } if *index == last
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(!target.exists());
    // Every other reader refuses it the same way; verify reports it instead of failing.
    assert!(matches!(
        fx.repo.list_snapshots(None).await,
        Err(RepoError::Manifest { .. })
    ));
    let report = fx.repo.verify(&VerifyOptions::default()).await.unwrap();
    assert!(matches!(
        report.problems[..],
        [cbt_store::repo::VerifyProblem {
            problem: ProblemKind::ManifestUnreadable { .. },
            ..
        }]
    ));
}

/// Two snapshots reference the same chunk; the second records the wrong checksum for it. A
/// restore of the second fails, so `verify --read-data` must say so, although the first
/// reference it meets (in the first snapshot) is correct.
#[tokio::test]
async fn verify_read_data_checks_every_reference_not_one_per_hash() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 5);
    let src = fx.write("d.img", &img);
    full_backup(&fx.repo, &src, "v", "s1", 1).await;
    let s2 = full_backup(&fx.repo, &src, "v", "s2", 2).await;
    let (index, r) = nth_stored(&s2, 0);
    let mut json = manifest_json(&fx.repo, "v", "s2").await;
    // Consistently wrong within s2 (every index holding this chunk), so s2 alone is valid.
    for c in json["chunks"].as_array_mut().unwrap() {
        if c[1] == serde_json::json!(r.hash) {
            c[3] = serde_json::json!(r.crc32c ^ 1);
        }
    }
    put_manifest_json(fx.store.as_ref(), "v", "s2", &json).await;

    let report = verify_data(&fx.repo).await;
    let bad: Vec<_> = report
        .problems
        .iter()
        .map(|p| (p.snapshot.as_str(), p.index, &p.problem))
        .collect();
    assert!(
        matches!(bad[..], [("v/s2", Some(i), ProblemKind::Corrupt { .. })] if i == index),
        "{bad:?}"
    );
    let target = fx.path("r.img");
    let err = restore_file(&fx.repo, &vol("v"), &snap("s2"), &target)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        RepoError::ChunkCorrupt {
            reason: ChunkDecodeError::Mismatch(_),
            ..
        }
    ));
}

/// A zstd frame of `len` bytes of `fill` after `prefix`, built from RLE blocks: a few hundred
/// KiB that inflate to gigabytes, the shape of a decompression bomb.
fn bomb_frame(prefix: &[u8], fill: u8, len: u64) -> Vec<u8> {
    const BLOCK: u64 = 128 * 1024;
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd]; // magic
    f.push(0x00); // no content size, no checksum, no dictionary, window descriptor follows
    f.push(7 << 3); // window 2^(10+7) = 128 KiB
    let header = |last: bool, kind: u32, size: u64| {
        let v = (size as u32) << 3 | kind << 1 | u32::from(last);
        v.to_le_bytes()[..3].to_vec()
    };
    f.extend(header(false, 0, prefix.len() as u64)); // raw block
    f.extend_from_slice(prefix);
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK);
        left -= n;
        f.extend(header(left == 0, 1, n)); // RLE block
        f.push(fill);
    }
    f
}

/// A manifest object of a few hundred KiB whose JSON inflates to 1 GiB (a valid manifest
/// followed by whitespace, which JSON allows): refused after reading what its geometry can
/// need, instead of being inflated whole.
#[tokio::test]
async fn a_manifest_that_inflates_to_a_gigabyte_is_refused_after_its_geometry_limit() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 7);
    let src = fx.write("d.img", &img);
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    let json = out.manifest.as_ref().unwrap().to_json().unwrap();
    let bomb = bomb_frame(&json, b' ', 1 << 30);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    put_manifest_body(fx.store.as_ref(), "v", "s", &bomb).await;

    let started = std::time::Instant::now();
    let err = fx
        .repo
        .load_manifest(&vol("v"), &snap("s"))
        .await
        .unwrap_err();
    let limit = cbt_core::manifest::max_json_len(out.manifest.as_ref().unwrap().chunks.geometry());
    assert!(
        matches!(
            err,
            RepoError::Manifest {
                source: CoreError::ManifestTooLarge { limit: l, chunk_count: Some(12) },
                ..
            } if l == limit
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);
    // Stopping at the limit (about 1 MiB) is quick; inflating the gigabyte is not.
    assert!(started.elapsed() < Duration::from_secs(20));
    // The same frame without the whitespace is a valid manifest: the framing is right.
    put_manifest_body(fx.store.as_ref(), "v", "s", &bomb_frame(&json, b' ', 1)).await;
    assert_eq!(
        fx.repo.load_manifest(&vol("v"), &snap("s")).await.unwrap(),
        out.manifest.unwrap()
    );
}

/// Config and lock objects larger than any this software writes are refused from their size,
/// unread; an oversized lock still counts as a lock.
#[tokio::test]
async fn oversized_config_and_lock_objects_are_not_read() {
    let fx = Fixture::new().await;
    let junk = Bytes::from(vec![b' '; 200 * 1024]);
    put_raw(fx.store.as_ref(), "locks/exclusive", junk.clone()).await;
    // An unreadable lock still blocks what it blocks, and is listed for an operator.
    let locks = fx.repo.list_locks().await.unwrap();
    assert_eq!(locks.len(), 1);
    assert!(locks[0].purpose.contains("unreadable"));
    put_raw(fx.store.as_ref(), "config", junk).await;
    let err = Repository::open(fx.store.clone()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            RepoError::Store {
                source: cbt_store::store::StoreError::TooLarge { limit: 65_536, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);
}

/// A chunk object replaced by one far larger than the size its manifest records (here a
/// sparse 1 GiB file) is refused from its size, never read: restore names the chunk with both
/// sizes (the object's as the store reports it, without the local store's own framing), and
/// `verify --read-data` reports it.
#[tokio::test]
async fn a_chunk_object_grown_beyond_its_recorded_size_is_refused_unread() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 4);
    let src = fx.write("d.img", &img);
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    let (index, r) = nth_stored(&out, 0);
    let file = chunk_file(&fx, &r.hash);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let target = fx.path("out.img");
    let err = restore_file(&fx.repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            RepoError::ChunkCorrupt {
                index: i,
                reason: ChunkDecodeError::Size { expected, actual },
                ..
            } if *i == index && *expected == r.stored_size && *actual > 1 << 29
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);
    let report = verify_data(&fx.repo).await;
    assert!(
        report.problems.iter().any(|p| p.index == Some(index)),
        "{:?}",
        report.problems
    );
}

/// A restore of `v/s` into the new file `target` fails on chunk `index` with a reason
/// `reason_ok` accepts, and leaves no partial target behind.
async fn assert_restore_refuses(
    fx: &Fixture,
    index: u64,
    reason_ok: impl Fn(&ChunkDecodeError) -> bool,
    case: &str,
    target: &str,
) {
    let target = fx.path(target);
    let err = restore_file(&fx.repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap_err();
    match &err {
        RepoError::ChunkCorrupt {
            index: i, reason, ..
        } if *i == index && reason_ok(reason) => {}
        other => panic!("{case}: restore said {other:?}"),
    }
    assert!(!target.exists(), "{case}: the partial target was left");
}

/// A chunk stored raw is checked where the store read it and written from there (no copy):
/// an object one byte short or one byte long (with a valid store checksum), a payload byte
/// changed (object crc32c), the same change with the trailer recomputed (raw crc32c), and a
/// header that names other content are each refused as [`RepoError::ChunkCorrupt`] naming
/// the chunk and the failed check, and the new target is removed.
#[tokio::test]
async fn a_raw_chunk_checked_in_place_still_refuses_every_damage() {
    let fx = Fixture::new().await;
    let src = fx.write("d.img", &image(SIZE, 4));
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    let manifest = out.manifest.unwrap();
    let (index, r) = manifest
        .chunks
        .iter_stored()
        .find(|(_, r)| r.stored_size == r.raw_len + chunk::OVERHEAD as u64)
        .map(|(i, r)| (i, *r))
        .expect("a chunk of random data is stored raw");
    let key = chunk::chunk_key(&r.hash);
    let good = fx.store.get(&key).await.unwrap();
    let payload_at = chunk::HEADER_LEN + 1000;
    let trailer_at = good.len() - chunk::TRAILER_LEN;
    let retrailer = |mut b: Vec<u8>| {
        let end = b.len() - chunk::TRAILER_LEN;
        let crc = crc32c::crc32c(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
        b
    };
    let mut short = good[..good.len() - 1].to_vec();
    short = retrailer(short);
    let mut long = good.to_vec();
    long.push(0);
    let mut flipped = good.to_vec();
    flipped[payload_at] ^= 1;
    let recrc = retrailer(flipped.clone());
    let mut renamed = good.to_vec();
    renamed[20] ^= 1;
    let renamed = retrailer(renamed);
    type Expect = fn(&ChunkDecodeError) -> bool;
    let cases: [(&str, Vec<u8>, Expect); 5] = [
        ("short", short, |e| {
            matches!(e, ChunkDecodeError::Size { .. })
        }),
        ("long", long, |e| matches!(e, ChunkDecodeError::Size { .. })),
        ("flipped", flipped, |e| {
            matches!(e, ChunkDecodeError::ObjectCrc { .. })
        }),
        ("re-checksummed", recrc, |e| {
            matches!(e, ChunkDecodeError::RawCrc { .. })
        }),
        ("renamed", renamed, |e| {
            matches!(e, ChunkDecodeError::Mismatch(_))
        }),
    ];
    assert!(trailer_at > payload_at);
    for (what, body, reason_ok) in cases {
        put_raw(fx.store.as_ref(), &key, Bytes::from(body)).await;
        assert_restore_refuses(&fx, index, reason_ok, what, &format!("out-{what}.img")).await;
    }
    // Put back, the same chunk restores byte for byte.
    put_raw(fx.store.as_ref(), &key, good).await;
    let target = fx.path("out-good.img");
    restore_file(&fx.repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), image(SIZE, 4));
}

/// How a chunk object is damaged: its file rewritten behind the store's back, or a body put
/// through the store (which checksums it).
enum Damage {
    File(Vec<u8>),
    Put(Bytes),
}

/// The store's checksum of a chunk object is compared in the same pass as the chunk's own
/// trailer, not by the store beforehand; every way the two can disagree is still refused, for
/// a chunk stored raw and a compressed one, by restore, `fetch_chunk` and `verify
/// --read-data`: the store's recorded crc32c rewritten (the chunk's bytes intact), a byte of
/// the file changed behind the store's back (both checksums fail; the store's is reported),
/// and the chunk's trailer changed with the store's checksum recomputed over it (the store
/// vouches for the bytes, the chunk's own check refuses them).
#[tokio::test]
async fn a_chunk_whose_store_checksum_and_trailer_disagree_is_refused_by_every_reader() {
    let fx = Fixture::new().await;
    let src = fx.write("d.img", &image(SIZE, 5));
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    let manifest = out.manifest.unwrap();
    let raw = manifest
        .chunks
        .iter_stored()
        .find(|(_, r)| r.stored_size == r.raw_len + chunk::OVERHEAD as u64)
        .map(|(i, r)| (i, *r))
        .expect("a chunk of random data is stored raw");
    let packed = manifest
        .chunks
        .iter_stored()
        .find(|(_, r)| r.stored_size < r.raw_len)
        .map(|(i, r)| (i, *r))
        .expect("a chunk of text is compressed");
    type Expect = fn(&ChunkDecodeError) -> bool;
    let stored_crc: Expect = |e| matches!(e, ChunkDecodeError::StoredCrc { .. });
    let object_crc: Expect = |e| matches!(e, ChunkDecodeError::ObjectCrc { .. });
    for (what, (index, r)) in [("raw", raw), ("compressed", packed)] {
        let key = chunk::chunk_key(&r.hash);
        let file = chunk_file(&fx, &r.hash);
        let good_file = std::fs::read(&file).unwrap();
        let good = fx.store.get(&key).await.unwrap();
        // The local store's file is the body, then "CBTC" and the body's crc32c (LE).
        assert_eq!(good_file.len(), good.len() + 8);
        let mut store_crc = good_file.clone();
        let n = store_crc.len();
        store_crc[n - 1] ^= 0x40;
        let mut flipped = good_file.clone();
        flipped[chunk::HEADER_LEN + 7] ^= 1;
        let mut trailer = good.to_vec();
        let t = trailer.len() - 1;
        trailer[t] ^= 0x40;
        let cases: [(&str, Damage, Expect); 3] = [
            ("store checksum", Damage::File(store_crc), stored_crc),
            ("flipped byte", Damage::File(flipped), stored_crc),
            (
                "chunk trailer",
                Damage::Put(Bytes::from(trailer)),
                object_crc,
            ),
        ];
        for (how, damage, reason_ok) in cases {
            let case = format!("{what}, {how}");
            match damage {
                Damage::File(b) => std::fs::write(&file, b).unwrap(),
                Damage::Put(b) => {
                    put_raw(fx.store.as_ref(), &key, b).await;
                }
            }
            let target = format!("out-{what}-{how}.img");
            assert_restore_refuses(&fx, index, reason_ok, &case, &target).await;
            let at = cbt_store::repo::ChunkContext {
                snapshot: "v/s",
                index,
                offset: 0,
            };
            match fx.repo.fetch_chunk(&r, at).await {
                Err(RepoError::ChunkCorrupt { reason, .. }) if reason_ok(&reason) => {}
                // The chunk's own trailer is not the store's business.
                Ok(_) if how == "chunk trailer" => {}
                other => panic!("{case}: fetch_chunk said {other:?}"),
            }
            let mut buf = Vec::new();
            match fx.repo.read_chunk(&r, at, &mut buf).await {
                Err(RepoError::ChunkCorrupt { reason, .. }) if reason_ok(&reason) => {}
                other => panic!("{case}: read_chunk said {other:?}"),
            }
            let report = verify_data(&fx.repo).await;
            assert!(
                matches!(
                    report.problems.iter().map(|p| (p.index, &p.problem)).collect::<Vec<_>>()[..],
                    [(Some(i), ProblemKind::Corrupt { .. })] if i == index
                ),
                "{case}: {:?}",
                report.problems
            );
            std::fs::write(&file, &good_file).unwrap();
        }
    }
    let target = fx.path("out-good.img");
    restore_file(&fx.repo, &vol("v"), &snap("s"), &target)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), image(SIZE, 5));
}

fn in_place() -> RestoreOptions {
    RestoreOptions {
        overwrite: true,
        in_place: true,
        dry_run: false,
    }
}

/// Backs up `v`/`s` and deletes the file of its last stored chunk; returns that chunk's index.
async fn snapshot_missing_its_last_chunk(fx: &Fixture) -> u64 {
    let src = fx.write("d.img", &image(SIZE, 9));
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    let (index, r) = out
        .manifest
        .as_ref()
        .unwrap()
        .chunks
        .iter_stored()
        .last()
        .unwrap();
    std::fs::remove_file(chunk_file(fx, &r.hash)).unwrap();
    index
}

/// An in-place restore of a snapshot with a missing chunk refuses before it writes anything:
/// the device keeps every byte it had (it used to be zeroed and partly overwritten first).
#[tokio::test]
async fn an_in_place_restore_checks_every_chunk_before_the_first_write() {
    let fx = Fixture::new().await;
    let index = snapshot_missing_its_last_chunk(&fx).await;

    let device = fx.write("device.img", &vec![0xAA; SIZE]);
    let err = engine::restore(
        &fx.repo,
        &vol("v"),
        &snap("s"),
        &device,
        &in_place(),
        &opts(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, RepoError::ChunkMissing { index: i, .. } if i == index),
        "{err:?}"
    );
    assert!(
        std::fs::read(&device).unwrap().iter().all(|b| *b == 0xAA),
        "the device was written before the restore knew it could finish"
    );
    // The shared lock the restore took is gone again.
    assert!(fx.repo.list_locks().await.unwrap().is_empty());
}

/// A restore to a new file does not ask the store about each chunk before it starts (the
/// fetch reports a missing chunk as well, and the partial file is removed): the same typed
/// error, no file left behind, no existence requests, the lock released.
#[tokio::test]
async fn a_new_file_restore_finds_a_missing_chunk_by_fetching_it() {
    use cbt_store::store::Op;
    let fx = Fixture::new().await;
    let index = snapshot_missing_its_last_chunk(&fx).await;
    let (counting, repo) = fx.through_faults().await;
    counting.reset_counts();
    let target = fx.path("new.img");
    let err = engine::restore(
        &repo,
        &vol("v"),
        &snap("s"),
        &target,
        &RestoreOptions::default(),
        &opts(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, RepoError::ChunkMissing { index: i, .. } if i == index),
        "{err:?}"
    );
    assert!(!target.exists(), "a partial image was left behind");
    assert_eq!(counting.calls(Op::Head), 0, "{:?}", counting.call_counts());
    assert!(repo.list_locks().await.unwrap().is_empty());
}

/// A chunk whose stored bytes are damaged (same size, so only reading it tells) fails an
/// in-place restore midway; the error says which ranges hold the snapshot, and they do.
#[tokio::test]
async fn a_failed_in_place_restore_says_which_ranges_hold_the_snapshot() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 13);
    let src = fx.write("d.img", &img);
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    let (index, r) = nth_stored(&out, 2);
    let path = chunk_file(&fx, &r.hash);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[60] ^= 0x01;
    // Re-frame with a valid store trailer: the damage is visible only to the chunk format.
    let body_len = bytes.len() - 8;
    let crc = crc32c::crc32c(&bytes[..body_len]);
    bytes[body_len + 4..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();

    let device = fx.write("device.img", &vec![0xAA; SIZE]);
    let mut one = opts();
    one.transfers = 1;
    let err = engine::restore(&fx.repo, &vol("v"), &snap("s"), &device, &in_place(), &one)
        .await
        .unwrap_err();
    let RepoError::RestoreIncomplete {
        restored,
        volume_size,
        source,
        ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert!(
        matches!(**source, RepoError::ChunkCorrupt { index: i, .. } if i == index),
        "{source:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert_eq!(*volume_size, SIZE as u64);
    let bad = out
        .manifest
        .as_ref()
        .unwrap()
        .chunks
        .geometry()
        .chunk_range(index)
        .unwrap();
    assert!(!restored.contains(bad.start()));
    assert!(restored.total_bytes() > 0);
    let now = std::fs::read(&device).unwrap();
    for range in restored {
        let r = range.start() as usize..range.end() as usize;
        assert!(
            now[r.clone()] == img[r.clone()],
            "{r:?} does not hold the snapshot"
        );
    }
    assert!(err.to_string().contains("hold the snapshot"));
}

/// Unreferenced chunks written within the grace period survive GC; older ones go. A caller
/// clock running ahead does not shorten the grace: the store's clock is consulted too.
#[tokio::test]
async fn gc_keeps_unreferenced_chunks_younger_than_the_grace_period() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 21);
    let src = fx.write("d.img", &img);
    let out = full_backup(&fx.repo, &src, "v", "s", 1).await;
    fx.repo
        .delete_snapshot(&vol("v"), &snap("s"))
        .await
        .unwrap();
    let unique: Vec<_> = out
        .manifest
        .as_ref()
        .unwrap()
        .chunks
        .unique_chunks()
        .into_keys()
        .collect();
    assert!(unique.len() >= 4);
    let real_now = Timestamp::from_system_time(SystemTime::now());
    let gc = |now: Timestamp| {
        let repo = fx.repo.clone();
        async move {
            repo.gc(&GcOptions {
                now,
                dry_run: false,
                grace: Duration::from_secs(24 * 3600),
            })
            .await
            .unwrap()
        }
    };
    // Just written: nothing is deleted, even by a caller whose clock is a month ahead.
    let month_ahead = Timestamp(real_now.0 + 30 * 86_400_000);
    let report = gc(month_ahead).await;
    assert_eq!(report.deleted_chunks, 0);
    assert_eq!(report.recent_chunks, unique.len() as u64);
    // Half of them aged two days (by the store's own clock): those go, the rest stay.
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    let (old, young) = unique.split_at(unique.len() / 2);
    for h in old {
        set_mtime(&chunk_file(&fx, h), two_days_ago);
    }
    let report = gc(real_now).await;
    assert_eq!(report.deleted_chunks, old.len() as u64);
    assert_eq!(report.recent_chunks, young.len() as u64);
    for h in old {
        assert!(!chunk_file(&fx, h).exists());
    }
    for h in young {
        assert!(chunk_file(&fx, h).exists());
    }
}

/// A writer whose clock ran a year ahead recorded its snapshot as created next year; the
/// store received it before two newer snapshots. `keep-last 2` keeps the two newer ones.
#[tokio::test]
async fn retention_orders_by_a_time_the_store_vouches_for() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 23);
    let src = fx.write("d.img", &img);
    let now = SystemTime::now();
    let ts = |t: SystemTime| Timestamp::from_system_time(t);
    let hour = Duration::from_secs(3600);
    let mut r = request("v", "rogue", full(), 0);
    r.created = ts(now + 365 * 24 * hour);
    backup_file(&fx.repo, &src, r).await.unwrap();
    set_mtime(
        &fx.local
            .path_of(&manifest_key(&vol("v"), &snap("rogue")))
            .unwrap(),
        now - 3 * hour,
    );
    for (name, ago) in [("a", 2), ("b", 1)] {
        let mut r = request("v", name, full(), 0);
        r.created = ts(now - ago * hour);
        backup_file(&fx.repo, &src, r).await.unwrap();
    }
    let report = fx
        .repo
        .prune(&PruneOptions {
            policy: RetentionPolicy {
                keep_last: Some(2),
                keep_within: None,
            },
            now: ts(now),
            volume: None,
            dry_run: true,
            gc_grace: Duration::ZERO,
        })
        .await
        .unwrap();
    assert_eq!(report.removed, vec!["v/rogue".to_string()]);
}

/// A lock that was broken and then taken by someone else is not deleted when its first
/// holder releases (or drops) it.
#[tokio::test]
async fn releasing_a_broken_lock_leaves_the_new_holders_lock_alone() {
    let fx = Fixture::new().await;
    let first = fx
        .repo
        .lock_exclusive("prune 1", Timestamp(1))
        .await
        .unwrap();
    let first_id = first.info().id.clone();
    fx.repo
        .break_lock(&first_id, BreakMode::Force)
        .await
        .unwrap()
        .unwrap();
    let second = fx
        .repo
        .lock_exclusive("prune 2", Timestamp(2))
        .await
        .unwrap();
    assert!(!first.still_held().await.unwrap());
    first.release().await.unwrap();
    let locks = fx.repo.list_locks().await.unwrap();
    assert_eq!(locks.len(), 1);
    assert_eq!(locks[0].id, second.info().id);
    assert!(second.still_held().await.unwrap());
    second.release().await.unwrap();
    assert!(fx.repo.list_locks().await.unwrap().is_empty());
}

/// `(reading started, may read)` and the condition variable signalling changes of either.
type Gate = Arc<(Mutex<(bool, bool)>, Condvar)>;

/// A block source that stops before its first read until released, so a test can act while
/// a backup is running.
struct Gated {
    inner: FileSource,
    gate: Gate,
}

impl Gated {
    fn new(path: &std::path::Path) -> (Arc<Self>, Gate) {
        let gate = Arc::new((Mutex::new((false, false)), Condvar::new()));
        let src = Arc::new(Gated {
            inner: FileSource::open(path).unwrap(),
            gate: gate.clone(),
        });
        (src, gate)
    }
}

impl BlockSource for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let (lock, cv) = &*self.gate;
        let mut state = lock.lock().unwrap();
        state.0 = true; // reading started
        cv.notify_all();
        while !state.1 {
            state = cv.wait(state).unwrap();
        }
        drop(state);
        self.inner.read_exact_at(buf, offset)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

async fn wait_started(gate: &Gate) {
    loop {
        if gate.0.lock().unwrap().0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn open_gate(gate: &Gate) {
    gate.0.lock().unwrap().1 = true;
    gate.1.notify_all();
}

/// Runs the backup `req` of the file at `path`, held at its first read of the source until
/// `meanwhile` has run, and returns how it ended.
async fn backup_held_while(
    repo: &Repository,
    path: &Path,
    req: BackupRequest,
    meanwhile: impl Future<Output = ()>,
) -> Result<BackupOutcome, RepoError> {
    let (src, gate) = Gated::new(path);
    let held = repo.clone();
    let running = tokio::spawn(async move { engine::backup(&held, src, req, &opts()).await });
    wait_started(&gate).await;
    meanwhile.await;
    open_gate(&gate);
    running.await.unwrap()
}

/// A backup of `child` in the mode `mode` makes of a fresh full backup `parent`, whose parent
/// is deleted while it runs, fails before committing (the parent's existence is checked again
/// before the commit) and leaves no snapshot.
async fn parent_deleted_while_backing_up(
    fx: &Fixture,
    path: &Path,
    (parent, child, t): (&str, &str, i64),
    mode: impl FnOnce(BackupOutcome) -> BackupMode,
) {
    let p = backup_file(&fx.repo, path, request("v", parent, full(), t))
        .await
        .unwrap();
    let req = request("v", child, mode(p), t + 1);
    let delete = async {
        fx.repo
            .delete_snapshot(&vol("v"), &snap(parent))
            .await
            .unwrap();
    };
    let err = backup_held_while(&fx.repo, path, req, delete)
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::InvalidRequest { .. }), "{err:?}");
    assert!(
        !fx.repo
            .snapshot_exists(&vol("v"), &snap(child))
            .await
            .unwrap()
    );
}

/// A store that deletes one chunk object when its metadata is asked for the second time: a
/// backup asks once to deduplicate and once more to check, before committing, that it is
/// still stored, so the deletion lands after the deduplication decision and before the commit.
#[derive(Debug)]
struct DeleteAtRecheck {
    victim: String,
    heads: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl StoreHook for DeleteAtRecheck {
    async fn before(
        &self,
        inner: &dyn ObjectStore,
        call: &Call<'_>,
    ) -> Result<(), cbt_store::store::StoreError> {
        // The first HEAD is the deduplication lookup, the second the check before commit.
        if *call == (Call::Head { key: &self.victim })
            && self.heads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1
        {
            inner.delete(&self.victim).await?;
        }
        Ok(())
    }
}

/// A backup that deduplicates against chunks already stored fails before committing when one
/// of them disappears while it runs (here deleted by hand; in life, a prune after its lock
/// was broken): committing would publish a snapshot that cannot be restored.
#[tokio::test]
async fn a_backup_does_not_commit_when_a_chunk_it_deduplicated_against_is_gone() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 31);
    let path = fx.write("d.img", &img);
    let first = full_backup(&fx.repo, &path, "v", "s1", 1).await;
    let (_, gone) = nth_stored(&first, 1);
    let store: Arc<dyn ObjectStore> = Arc::new(HookedStore::new(
        fx.store.clone(),
        DeleteAtRecheck {
            victim: chunk::chunk_key(&gone.hash),
            heads: Default::default(),
        },
    ));
    let repo = Repository::open(store).await.unwrap();
    // The same data again, as an unrelated full backup: every chunk is found stored.
    let err = backup_file(&repo, &path, request("w", "s2", full(), 2))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::ChunkMissing { .. }), "{err:?}");
    assert!(
        !fx.repo
            .snapshot_exists(&vol("w"), &snap("s2"))
            .await
            .unwrap()
    );
    assert!(fx.repo.list_locks().await.unwrap().is_empty());
}

/// A backup whose lock is broken while it runs fails before committing, even when nothing it
/// uses was deleted (it cannot know that), and leaves no snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_whose_lock_was_broken_does_not_commit() {
    let fx = Fixture::new().await;
    let img = image(SIZE, 33);
    let path = fx.write("d.img", &img);
    let break_lock = async {
        let locks = fx.repo.list_locks().await.unwrap();
        assert_eq!(locks.len(), 1);
        fx.repo
            .break_lock(&locks[0].id, BreakMode::Force)
            .await
            .unwrap()
            .unwrap();
    };
    let err = backup_held_while(&fx.repo, &path, request("v", "s", full(), 1), break_lock)
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::LockLost { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert!(
        !fx.repo
            .snapshot_exists(&vol("v"), &snap("s"))
            .await
            .unwrap()
    );
    // An incremental on a parent deleted meanwhile fails the same way.
    parent_deleted_while_backing_up(&fx, &path, ("p", "c", 2), |parent| {
        BackupMode::Incremental {
            parent: Box::new(parent.manifest.unwrap()),
            changed: cbt_core::RangeSet::try_from_extents([(0, 10)]).unwrap(),
        }
    })
    .await;
    // So does a full backup reading a parent's map in order beside it (format 2, same
    // geometry).
    parent_deleted_while_backing_up(&fx, &path, ("p2", "f", 4), |parent| {
        BackupMode::FullWithParent {
            allocated: None,
            parent: parent.head.as_parent(),
        }
    })
    .await;
}

/// The hand-built frames of the bomb test are real zstd: the reference decoder agrees.
#[test]
fn bomb_frames_decode_with_the_reference_decoder() {
    let f = bomb_frame(b"abc", b'x', 300_000);
    let out = zstd::stream::decode_all(&f[..]).unwrap();
    assert_eq!(out.len(), 300_003);
    assert!(out.starts_with(b"abcxxx"));
}

/// With many distinct chunks, the check before the first write lists `chunks/` page by page
/// instead of asking for each chunk, and still finds the missing one.
#[tokio::test]
async fn the_preflight_of_a_large_snapshot_lists_instead_of_asking_each_chunk() {
    use cbt_store::store::Op;
    let fx = Fixture::new().await;
    let img = noise(77, 1100 * 4096);
    let src = fx.write("d.img", &img);
    let mut req = request("v", "s", full(), 1);
    req.chunk_size = Some(4096);
    let out = backup_file(&fx.repo, &src, req).await.unwrap();
    assert!(out.manifest.as_ref().unwrap().chunks.unique_chunks().len() > 1024);
    let (index, r) = nth_stored(&out, 700);
    std::fs::remove_file(chunk_file(&fx, &r.hash)).unwrap();
    let (counting, repo) = fx.through_faults().await;
    counting.reset_counts();
    let device = fx.write("device.img", &vec![0xAA; img.len()]);
    let err = engine::restore(&repo, &vol("v"), &snap("s"), &device, &in_place(), &opts())
        .await
        .unwrap_err();
    assert!(
        matches!(err, RepoError::ChunkMissing { index: i, .. } if i == index),
        "{err:?}"
    );
    assert!(std::fs::read(&device).unwrap().iter().all(|b| *b == 0xAA));
    assert!(
        counting.calls(Op::Head) < 10,
        "{:?}",
        counting.call_counts()
    );
    assert!(
        counting.calls(Op::List) >= 2,
        "{:?}",
        counting.call_counts()
    );
}
