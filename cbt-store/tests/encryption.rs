//! Encrypted repositories through the library interface: round trips on the local store and
//! on S3, wrong keys, tampered chunks, manifests and key slots, hostile KDF parameters, key
//! slot management, and that nothing readable about the data reaches the store.
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::sync::Arc;

use cbt_core::Timestamp;
use cbt_store::chunk;
use cbt_store::crypto::{KdfParams, KeyFile, MasterKey, Password, SealError, SlotKind};
use cbt_store::repo::{
    ENCRYPTED_REPO_FORMAT_VERSION, InitOptions, NewKey, ProblemKind, RepoError, RepoKey, Repository,
};
use cbt_store::store::{ErrorKind, LocalStore, ObjectStore, PutMode, list_all};
use cbt_store::testing::S3TestServer;
use cbt_store::testing::hooked::{Call, HookedStore, StoreHook};
use engine_support::*;

/// Small enough that every open takes milliseconds in tests; the bounds are the same.
const FAST: KdfParams = KdfParams {
    memory_kib: 256,
    iterations: 1,
    parallelism: 1,
};
const TEXT: &[u8] = b"block volumes deserve good backups ";

fn pw(s: &str) -> RepoKey {
    RepoKey::Password(Password::new(s).unwrap())
}

async fn init_enc(store: Arc<dyn ObjectStore>, password: &str) -> Repository {
    Repository::init_encrypted(
        store,
        InitOptions {
            chunk_size: Some(CS),
            now: Timestamp::from_unix_secs(1_000),
        },
        &Password::new(password).unwrap(),
        FAST,
    )
    .await
    .unwrap()
}

struct Enc {
    fx: Fixture,
    store: Arc<dyn ObjectStore>,
    local: LocalStore,
    repo: Repository,
}

async fn enc_fixture() -> Enc {
    Enc::new_with_password("hunter2").await
}

impl Enc {
    async fn new_with_password(password: &str) -> Enc {
        let fx = Fixture::new().await; // its own repository is unused; only the temp dir
        let local = LocalStore::new(fx.dir.path().join("enc")).unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(local.clone());
        let repo = init_enc(store.clone(), password).await;
        Enc {
            fx,
            store,
            local,
            repo,
        }
    }
}

/// Backs up `img` as `pvc/one`, then a changed copy as the incremental `pvc/two`.
async fn two_snapshots(repo: &Repository, fx: &Fixture) -> (Vec<u8>, Vec<u8>, cbt_core::Manifest) {
    let size = 20 * CS as usize + 777;
    let mut img = image(size, 5);
    let v1 = img.clone();
    let src = fx.write("enc.img", &img);
    let first = full_backup(repo, &src, "pvc", "one", 1).await;
    let changed = mutate(&mut img, 3, 3000, 9);
    std::fs::write(&src, &img).unwrap();
    let mode = incremental(&first, changed);
    backup_file(repo, &src, request("pvc", "two", mode, 2))
        .await
        .unwrap();
    (v1, img, first.manifest.unwrap())
}

async fn restore_eq(repo: &Repository, fx: &Fixture, name: &str, expected: &[u8]) {
    let out = fx.path(&format!("{name}.out"));
    let _ = std::fs::remove_file(&out);
    restore_file(repo, &vol("pvc"), &snap(name), &out)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == expected, "{name} differs");
}

/// Loading the manifest of `pvc/name` fails authentication: an integrity error.
async fn refused_as_unauthentic(repo: &Repository, name: &str) {
    let e = repo
        .load_manifest(&vol("pvc"), &snap(name))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            RepoError::Sealed {
                source: SealError::Authentication,
                ..
            }
        ),
        "{name}: {e}"
    );
    assert_eq!(e.kind(), ErrorKind::Integrity, "{name}");
}

/// Every object of a store (key, bytes), in key order.
async fn all_objects(store: &dyn ObjectStore) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for o in list_all(store, "").await.unwrap() {
        out.push((o.key.clone(), store.get(&o.key).await.unwrap().to_vec()));
    }
    out
}

#[tokio::test]
async fn encrypted_round_trip_on_the_local_store_leaks_no_content() {
    let Enc {
        fx,
        store,
        local,
        repo,
    } = enc_fixture().await;
    assert!(repo.is_encrypted());
    assert_eq!(repo.config().version, ENCRYPTED_REPO_FORMAT_VERSION);
    let (v1, v2, first) = two_snapshots(&repo, &fx).await;

    let reopened = Repository::open_with_key(store.clone(), &pw("hunter2"))
        .await
        .unwrap();
    assert!(reopened.opened_slot().is_some());
    restore_eq(&reopened, &fx, "one", &v1).await;
    restore_eq(&reopened, &fx, "two", &v2).await;
    let listed = reopened.list_snapshots(None).await.unwrap();
    assert_eq!(listed.len(), 2);
    let report = verify_data(&reopened).await;
    assert!(report.is_ok(), "{:?}", report.problems);

    // Chunk names are keyed: no stored chunk is named by the plain hash of its content.
    let raw_chunks: Vec<&[u8]> = v1.chunks(CS as usize).collect();
    for (_, r) in first.chunks.iter_stored() {
        assert!(local.path_of(&chunk::chunk_key(&r.hash)).unwrap().exists());
    }
    for raw in &raw_chunks {
        let plain = chunk::chunk_key(&chunk::hash_raw(raw));
        assert!(
            !local.path_of(&plain).unwrap().exists(),
            "{plain} is stored"
        );
    }
    // Nothing stored contains the image's text, the labels' words or plain chunk hashes.
    let plain_hashes: Vec<[u8; 32]> = raw_chunks.iter().map(|c| chunk::hash_raw(c).0).collect();
    for (path, bytes) in all_objects(store.as_ref()).await {
        if path == "config" || path.starts_with("keys/") || path.starts_with("locks") {
            continue;
        }
        assert_eq!(&bytes[..4], b"CBEN", "{path} is not sealed");
        assert!(
            !bytes.windows(TEXT.len()).any(|w| w == TEXT),
            "{path} holds plaintext"
        );
        for h in &plain_hashes {
            assert!(
                !bytes.windows(32).any(|w| w == h),
                "{path} holds a plain hash"
            );
        }
    }
    let config = String::from_utf8(store.get("config").await.unwrap().to_vec()).unwrap();
    assert!(config.contains("\"encryption\""));

    // Deduplication still works within the repository.
    let again = full_backup(&reopened, &fx.path("enc.img"), "pvc", "three", 3).await;
    assert_eq!(again.stats.objects_written, 0);
    assert!(again.stats.chunks_deduplicated > 0);
}

#[tokio::test]
async fn encrypted_round_trip_over_s3() {
    let server = S3TestServer::start().await.unwrap();
    server.create_bucket("backups").unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(server.store("backups", "enc/repo").await.unwrap());
    let repo = init_enc(store.clone(), "s3 password").await;
    let fx = Fixture::new().await;
    let (v1, v2, _) = two_snapshots(&repo, &fx).await;
    let reopened = Repository::open_with_key(store.clone(), &pw("s3 password"))
        .await
        .unwrap();
    restore_eq(&reopened, &fx, "one", &v1).await;
    restore_eq(&reopened, &fx, "two", &v2).await;
    let report = verify_data(&reopened).await;
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(matches!(
        Repository::open_with_key(store, &pw("wrong")).await,
        Err(RepoError::WrongPassword { slots: 1, .. })
    ));
}

#[tokio::test]
async fn wrong_or_missing_keys_are_typed_errors_and_change_nothing() {
    let Enc {
        fx, store, repo, ..
    } = enc_fixture().await;
    two_snapshots(&repo, &fx).await;
    let before = all_objects(store.as_ref()).await;

    let e = Repository::open(store.clone()).await.unwrap_err();
    assert!(matches!(e, RepoError::KeyRequired), "{e}");
    // A missing password is setup, like any missing credential.
    assert_eq!(e.kind(), ErrorKind::Config);
    let e = Repository::open_with_key(store.clone(), &pw("hunter3"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RepoError::WrongPassword { slots: 1, invalid } if invalid.is_empty()),
        "{e}"
    );
    // Another key entirely (a tool's own key for another repository).
    let e = Repository::open_with_key(
        store.clone(),
        &RepoKey::Master(MasterKey::generate().unwrap()),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RepoError::KeyMismatch { .. }), "{e}");
    // The master key itself opens it (embedding tools that keep the key).
    let master = repo.master_key().unwrap().clone();
    let by_key = Repository::open_with_key(store.clone(), &RepoKey::Master(master))
        .await
        .unwrap();
    assert_eq!(by_key.list_snapshots(None).await.unwrap().len(), 2);
    assert_eq!(by_key.opened_slot(), None);
    assert_eq!(before, all_objects(store.as_ref()).await);

    // A password against an unencrypted repository is refused too (no silent downgrade).
    let e = Repository::open_with_key(fx.store.clone(), &pw("hunter2"))
        .await
        .unwrap_err();
    assert!(matches!(e, RepoError::NotEncrypted), "{e}");
    // And an unencrypted repository is what it was: version 1, no encryption section.
    let plain = Repository::open(fx.store.clone()).await.unwrap();
    assert!(!plain.is_encrypted());
    assert_eq!(plain.config().version, 1);
    assert!(plain.config().encryption.is_none());
}

/// Flips one ciphertext byte of the object at `key`, then (if `fix_crc`) recomputes the trailing
/// crc32c, as someone editing the object on purpose would.
async fn tamper(store: &dyn ObjectStore, key: &str, fix_crc: bool) {
    let mut b = store.get(key).await.unwrap().to_vec();
    b[50] ^= 0x01;
    if fix_crc {
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }
    store.put(key, b.into(), PutMode::Overwrite).await.unwrap();
}

#[tokio::test]
async fn tampered_chunks_and_manifests_are_integrity_errors() {
    let Enc {
        fx, store, repo, ..
    } = enc_fixture().await;
    let (_, _, first) = two_snapshots(&repo, &fx).await;
    let mut stored = first
        .chunks
        .iter_stored()
        .map(|(_, r)| *r)
        .collect::<Vec<_>>();
    stored.dedup_by_key(|r| r.hash);
    let (a, b) = (stored[0], stored[1]);
    tamper(store.as_ref(), &chunk::chunk_key(&a.hash), true).await;
    tamper(store.as_ref(), &chunk::chunk_key(&b.hash), false).await;

    let out = fx.path("t.out");
    let e = restore_file(&repo, &vol("pvc"), &snap("one"), &out)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
    assert!(matches!(e, RepoError::ChunkCorrupt { .. }), "{e}");
    let report = verify_data(&repo).await;
    let corrupt: Vec<&str> = report
        .problems
        .iter()
        .filter(|p| matches!(p.problem, ProblemKind::Corrupt { .. }))
        .map(|p| p.key.as_str())
        .collect();
    for r in [&a, &b] {
        assert!(
            corrupt.contains(&chunk::chunk_key(&r.hash).as_str()),
            "{:?}",
            report.problems
        );
    }
    let mut buf = Vec::new();
    let body = store.get(&chunk::chunk_key(&a.hash)).await.unwrap();
    let e = repo
        .codec()
        .decode_chunk(
            body,
            &a,
            cbt_store::repo::ChunkContext {
                snapshot: "pvc/one",
                index: 0,
                offset: 0,
            },
            &mut buf,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            RepoError::ChunkCorrupt {
                reason: chunk::ChunkDecodeError::Sealed(SealError::Authentication),
                ..
            }
        ),
        "{e}"
    );

    // A manifest edited in place fails authentication; one copied over another snapshot's
    // name does too (the object key is authenticated).
    let key_two = cbt_store::repo::manifest_key(&vol("pvc"), &snap("two"));
    tamper(store.as_ref(), &key_two, true).await;
    refused_as_unauthentic(&repo, "two").await;
    let one = store
        .get(&cbt_store::repo::manifest_key(&vol("pvc"), &snap("one")))
        .await
        .unwrap();
    let key_moved = cbt_store::repo::manifest_key(&vol("pvc"), &snap("moved"));
    store.put(&key_moved, one, PutMode::IfAbsent).await.unwrap();
    refused_as_unauthentic(&repo, "moved").await;
}

#[tokio::test]
async fn tampered_and_hostile_key_slots_are_refused_at_bounded_cost() {
    let Enc {
        fx: _fx,
        store,
        repo,
        ..
    } = enc_fixture().await;
    let id = repo.opened_slot().unwrap().to_string();
    let slot_key = format!("keys/{id}");
    let original = store.get(&slot_key).await.unwrap().to_vec();
    let put = |body: Vec<u8>| {
        let (store, key) = (store.clone(), slot_key.clone());
        async move {
            store
                .put(&key, body.into(), PutMode::Overwrite)
                .await
                .unwrap();
        }
    };
    let mut slot: serde_json::Value = serde_json::from_slice(&original).unwrap();

    // A wrapped key edited: the right password no longer opens it.
    let mut edited = slot.clone();
    let w = edited["wrapped_key"].as_str().unwrap().to_string();
    let flipped = format!("{}{}", if w.starts_with('0') { "1" } else { "0" }, &w[1..]);
    edited["wrapped_key"] = flipped.into();
    put(serde_json::to_vec(&edited).unwrap()).await;
    let e = Repository::open_with_key(store.clone(), &pw("hunter2"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, RepoError::WrongPassword { slots: 1, .. }),
        "{e}"
    );

    // Parameters that would demand 4 TiB of memory or a million passes: refused without
    // deriving anything, and named.
    for (field, value) in [("memory_kib", u32::MAX), ("iterations", 1_000_000)] {
        slot["params"][field] = value.into();
        put(serde_json::to_vec(&slot).unwrap()).await;
        let e = Repository::open_with_key(store.clone(), &pw("hunter2"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, RepoError::WrongPassword { slots: 0, invalid } if invalid.len() == 1),
            "{e}"
        );
        slot = serde_json::from_slice(&original).unwrap();
    }
    // A slot that is not a slot, and one far larger than any slot.
    put(b"{\"format\": \"cbt-key\"".to_vec()).await;
    assert!(matches!(
        Repository::open_with_key(store.clone(), &pw("hunter2")).await,
        Err(RepoError::WrongPassword { slots: 0, .. })
    ));
    put(vec![b' '; 1 << 20]).await;
    assert!(matches!(
        Repository::open_with_key(store.clone(), &pw("hunter2")).await,
        Err(RepoError::WrongPassword { slots: 0, .. })
    ));
    // A hostile slot beside a good one does not stop the good one.
    put(original.clone()).await;
    let mut hostile = slot.clone();
    hostile["id"] = "ffffffffffffffffffff".into();
    hostile["params"]["memory_kib"] = u32::MAX.into();
    store
        .put(
            "keys/ffffffffffffffffffff",
            serde_json::to_vec(&hostile).unwrap().into(),
            PutMode::IfAbsent,
        )
        .await
        .unwrap();
    let ok = Repository::open_with_key(store.clone(), &pw("hunter2"))
        .await
        .unwrap();
    let listed = ok.list_keys().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|s| s.problem.is_some()));
    // No slot at all: a clear error, not "wrong password".
    store.delete(&slot_key).await.unwrap();
    store.delete("keys/ffffffffffffffffffff").await.unwrap();
    assert!(matches!(
        Repository::open_with_key(store, &pw("hunter2")).await,
        Err(RepoError::NoKeySlot)
    ));
}

#[tokio::test]
async fn key_slots_are_added_and_removed_without_rewriting_data() {
    let Enc {
        fx, store, repo, ..
    } = enc_fixture().await;
    let (v1, _, _) = two_snapshots(&repo, &fx).await;
    let data_before: Vec<_> = all_objects(store.as_ref())
        .await
        .into_iter()
        .filter(|(p, _)| p.starts_with("chunks") || p.starts_with("snapshots"))
        .collect();
    let first = repo.opened_slot().unwrap().to_string();
    let added = repo
        .add_key(
            &Password::new("second").unwrap(),
            FAST,
            Timestamp::from_unix_secs(5),
        )
        .await
        .unwrap();
    let listed = repo.list_keys().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|s| s.id == first && s.current));
    assert!(listed.iter().any(|s| s.id == added.id && !s.current));

    // Both passwords open it; the slot in use cannot be removed.
    let by_second = Repository::open_with_key(store.clone(), &pw("second"))
        .await
        .unwrap();
    assert_eq!(by_second.opened_slot(), Some(added.id.as_str()));
    assert!(matches!(
        by_second
            .remove_key(&added.id, Timestamp::from_unix_secs(7))
            .await,
        Err(RepoError::KeyInUse { .. })
    ));
    assert!(matches!(
        by_second
            .remove_key("0123456789abcdef0123", Timestamp::from_unix_secs(7))
            .await,
        Err(RepoError::KeySlotNotFound { .. })
    ));
    // Rotation: remove the first password using the second.
    by_second
        .remove_key(&first, Timestamp::from_unix_secs(7))
        .await
        .unwrap();
    assert!(matches!(
        Repository::open_with_key(store.clone(), &pw("hunter2")).await,
        Err(RepoError::WrongPassword { .. })
    ));
    restore_eq(&by_second, &fx, "one", &v1).await;
    // Opened by master key (no slot in use), the last slot still cannot go.
    let master = RepoKey::Master(by_second.master_key().unwrap().clone());
    let by_key = Repository::open_with_key(store.clone(), &master)
        .await
        .unwrap();
    let e = by_key
        .remove_key(&added.id, Timestamp::from_unix_secs(7))
        .await
        .unwrap_err();
    assert!(matches!(e, RepoError::LastKeySlot { .. }), "{e}");
    // Hostile parameters are refused when adding too.
    let e = by_key
        .add_key(
            &Password::new("x").unwrap(),
            KdfParams {
                memory_kib: u32::MAX,
                ..FAST
            },
            Timestamp::from_unix_secs(6),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, RepoError::Crypto(_)), "{e}");

    let data_after: Vec<_> = all_objects(store.as_ref())
        .await
        .into_iter()
        .filter(|(p, _)| p.starts_with("chunks") || p.starts_with("snapshots"))
        .collect();
    assert_eq!(data_before, data_after, "key changes must not rewrite data");
    // Key management needs an encrypted repository.
    assert!(matches!(
        fx.repo.list_keys().await,
        Err(RepoError::NotEncrypted)
    ));
}

#[tokio::test]
async fn two_repositories_name_the_same_data_differently() {
    let a = enc_fixture().await;
    let b = enc_fixture().await;
    let img = image(4 * CS as usize, 3);
    let src = a.fx.write("same.img", &img);
    let ma = full_backup(&a.repo, &src, "pvc", "x", 1)
        .await
        .manifest
        .unwrap();
    let mb = full_backup(&b.repo, &src, "pvc", "x", 1)
        .await
        .manifest
        .unwrap();
    let names = |m: &cbt_core::Manifest| {
        m.chunks
            .iter_stored()
            .map(|(_, r)| r.hash)
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert!(!names(&ma).is_empty());
    assert!(names(&ma).is_disjoint(&names(&mb)));
}

#[tokio::test]
async fn lock_objects_are_sealed_and_still_block_when_unreadable() {
    let Enc {
        fx: _fx,
        store,
        repo,
        ..
    } = enc_fixture().await;
    let lock = repo
        .lock_shared("backup secret-volume/snap", Timestamp::from_unix_secs(7))
        .await
        .unwrap();
    let key = format!("locks/shared/{}", lock.info().id);
    let raw = store.get(&key).await.unwrap();
    assert_eq!(&raw[..4], b"CBEN");
    assert!(!raw.windows(13).any(|w| w == b"secret-volume"));
    let listed = repo.list_locks().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].purpose, "backup secret-volume/snap");
    assert!(lock.still_held().await.unwrap());

    // A lock written under another key (or damaged) cannot be opened, but still blocks GC.
    let other = Enc::new_with_password("other").await;
    let foreign = other
        .repo
        .lock_shared("foreign", Timestamp::from_unix_secs(8))
        .await
        .unwrap();
    let fkey = format!("locks/shared/{}", foreign.info().id);
    let body = other.store.get(&fkey).await.unwrap();
    store.put(&fkey, body, PutMode::IfAbsent).await.unwrap();
    lock.release().await.unwrap();
    let listed = repo.list_locks().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].purpose.contains("unreadable"), "{:?}", listed[0]);
    let e = repo
        .lock_exclusive("prune", Timestamp::from_unix_secs(9))
        .await
        .unwrap_err();
    assert!(matches!(e, RepoError::Locked { .. }), "{e}");
}

/// In an encrypted repository too, the store's checksum of a chunk is compared in the pass
/// that checks the envelope's: a store checksum rewritten over intact sealed bytes is refused
/// as [`chunk::ChunkDecodeError::StoredCrc`] by restore and `verify --read-data`, and an
/// envelope whose own checksum disagrees with bytes the store vouches for as
/// [`SealError::Crc`].
#[tokio::test]
async fn a_sealed_chunk_whose_store_checksum_and_envelope_disagree_is_refused() {
    let Enc {
        fx,
        store,
        local,
        repo,
    } = enc_fixture().await;
    let (v1, _, first) = two_snapshots(&repo, &fx).await;
    let (index, r) = first.chunks.iter_stored().next().unwrap();
    let r = *r;
    let key = chunk::chunk_key(&r.hash);
    let file = local.path_of(&key).unwrap();
    let good_file = std::fs::read(&file).unwrap();
    let good = store.get(&key).await.unwrap();
    let mut bad_store_crc = good_file.clone();
    let n = bad_store_crc.len();
    bad_store_crc[n - 1] ^= 0x10;
    let mut bad_envelope = good.to_vec();
    let t = bad_envelope.len() - 1;
    bad_envelope[t] ^= 0x10;
    for how in ["store checksum", "envelope checksum"] {
        if how == "store checksum" {
            std::fs::write(&file, &bad_store_crc).unwrap();
        } else {
            let body = bytes::Bytes::from(bad_envelope.clone());
            store.put(&key, body, PutMode::Overwrite).await.unwrap();
        }
        let right = |reason: &chunk::ChunkDecodeError| match how {
            "store checksum" => matches!(reason, chunk::ChunkDecodeError::StoredCrc { .. }),
            _ => matches!(
                reason,
                chunk::ChunkDecodeError::Sealed(SealError::Crc { .. })
            ),
        };
        let out = fx.path("sc.out");
        match restore_file(&repo, &vol("pvc"), &snap("one"), &out).await {
            Err(RepoError::ChunkCorrupt {
                index: i, reason, ..
            }) if i == index && right(&reason) => {}
            other => panic!("{how}: restore said {other:?}"),
        }
        let mut buf = Vec::new();
        let at = cbt_store::repo::ChunkContext {
            snapshot: "pvc/one",
            index,
            offset: 0,
        };
        match repo.read_chunk(&r, at, &mut buf).await {
            Err(RepoError::ChunkCorrupt { reason, .. }) if right(&reason) => {}
            other => panic!("{how}: read_chunk said {other:?}"),
        }
        let report = verify_data(&repo).await;
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.key == key && matches!(p.problem, ProblemKind::Corrupt { .. })),
            "{how}: {:?}",
            report.problems
        );
        std::fs::write(&file, &good_file).unwrap();
    }
    restore_eq(&repo, &fx, "one", &v1).await;
}

#[tokio::test]
async fn sealed_chunks_carry_the_checksum_of_their_stored_bytes() {
    let Enc { fx: _fx, repo, .. } = enc_fixture().await;
    for raw in [image(CS as usize, 1), vec![b'x'; 5000]] {
        let e = repo.codec().encode_chunk(&raw, 3).unwrap();
        assert_eq!(e.body_crc32c, crc32c::crc32c(&e.body));
        assert_eq!(e.chunk.stored_size, e.body.len() as u64);
    }
}

#[tokio::test]
async fn key_files_open_a_repository_and_a_wrong_one_changes_nothing() {
    let fx = Fixture::new().await;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(fx.dir.path().join("kf")).unwrap());
    let kf = KeyFile::generate().unwrap();
    let password = Password::new("also a password").unwrap();
    let init = InitOptions {
        chunk_size: Some(CS),
        now: Timestamp::from_unix_secs(1_000),
    };
    // No key at all is refused before anything is written.
    assert!(matches!(
        Repository::init_encrypted_with(store.clone(), init, &[]).await,
        Err(RepoError::InvalidRequest { .. })
    ));
    assert!(all_objects(store.as_ref()).await.is_empty());
    let repo = Repository::init_encrypted_with(
        store.clone(),
        init,
        &[NewKey::KeyFile(&kf), NewKey::Password(&password, FAST)],
    )
    .await
    .unwrap();
    let (v1, v2, _) = two_snapshots(&repo, &fx).await;

    // The key file read back from disk opens it, at the slot made for it.
    let path = fx.path("repo.key");
    kf.write_new(&path).unwrap();
    let by_file = Repository::open_with_key(
        store.clone(),
        &RepoKey::KeyFile(KeyFile::from_file(&path).unwrap()),
    )
    .await
    .unwrap();
    restore_eq(&by_file, &fx, "one", &v1).await;
    restore_eq(&by_file, &fx, "two", &v2).await;
    let slots = by_file.list_keys().await.unwrap();
    assert_eq!(slots.len(), 2);
    let file_slot = slots
        .iter()
        .find(|s| s.kind == Some(SlotKind::KeyFile))
        .unwrap();
    assert!(file_slot.current);
    assert_eq!(file_slot.key_file_id.as_deref(), Some(kf.id()));
    assert!(file_slot.params.is_none());
    assert_eq!(by_file.opened_slot(), Some(file_slot.id.as_str()));
    let pw_slot = slots
        .iter()
        .find(|s| s.kind == Some(SlotKind::Password))
        .unwrap();
    assert!(!pw_slot.current && pw_slot.params.is_some());

    // Another key file: a typed error naming it, and nothing changed in the store.
    let before = all_objects(store.as_ref()).await;
    let other = KeyFile::generate().unwrap();
    let e = Repository::open_with_key(store.clone(), &RepoKey::KeyFile(other.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RepoError::WrongKeyFile { key_file_id, slots: 0, others: 2, invalid }
            if key_file_id == other.id() && invalid.is_empty()),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Config);
    assert_eq!(all_objects(store.as_ref()).await, before);

    // A key-file slot whose wrapped key was edited: refused as damaged, not opened.
    let slot_key = format!("keys/{}", file_slot.id);
    let mut slot: serde_json::Value =
        serde_json::from_slice(&store.get(&slot_key).await.unwrap()).unwrap();
    let wrapped = slot["wrapped_key"].as_str().unwrap().to_string();
    let flipped = if wrapped.ends_with('0') { "1" } else { "0" };
    slot["wrapped_key"] = format!("{}{flipped}", &wrapped[..wrapped.len() - 1]).into();
    let original = store.get(&slot_key).await.unwrap();
    store.delete(&slot_key).await.unwrap();
    store
        .put(
            &slot_key,
            serde_json::to_vec(&slot).unwrap().into(),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    let e = Repository::open_with_key(store.clone(), &RepoKey::KeyFile(kf.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RepoError::WrongKeyFile { slots: 1, invalid, .. } if invalid.len() == 1),
        "{e}"
    );
    store
        .put(&slot_key, original, PutMode::Overwrite)
        .await
        .unwrap();

    // A key file that already opens it is not added twice.
    let e = by_file
        .add_key_file(&kf, Timestamp::from_unix_secs(1_999))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RepoError::KeyFileAlreadyAdded { slot, .. } if *slot == file_slot.id),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Conflict);
    assert_eq!(by_file.list_keys().await.unwrap().len(), 2);

    // Rotation to a new key file: add it, drop the password and the old file with it.
    let new_kf = KeyFile::generate().unwrap();
    let added = by_file
        .add_key_file(&new_kf, Timestamp::from_unix_secs(2_000))
        .await
        .unwrap();
    assert_eq!(added.kind, Some(SlotKind::KeyFile));
    let by_new = Repository::open_with_key(store.clone(), &RepoKey::KeyFile(new_kf))
        .await
        .unwrap();
    let now = Timestamp::from_unix_secs(2_001);
    by_new.remove_key(&pw_slot.id, now).await.unwrap();
    by_new.remove_key(&file_slot.id, now).await.unwrap();
    assert!(matches!(
        by_new.remove_key(&added.id, now).await,
        Err(RepoError::KeyInUse { .. })
    ));
    assert!(matches!(
        Repository::open_with_key(store.clone(), &RepoKey::KeyFile(kf)).await,
        Err(RepoError::WrongKeyFile {
            slots: 0,
            others: 1,
            ..
        })
    ));
    assert!(matches!(
        Repository::open_with_key(store.clone(), &RepoKey::Password(password)).await,
        Err(RepoError::WrongPassword { slots: 0, .. })
    ));
    restore_eq(&by_new, &fx, "two", &v2).await;
    // No key-change lock is left behind.
    assert!(by_new.list_locks().await.unwrap().is_empty());
}

/// Delays every delete of a key slot, so that two removals racing each other both read the
/// slots before either deletes one (what a key removal without a lock would get wrong).
#[derive(Debug)]
struct SlowKeyDeletes;

#[async_trait::async_trait]
impl StoreHook for SlowKeyDeletes {
    async fn before(
        &self,
        _inner: &dyn ObjectStore,
        call: &Call<'_>,
    ) -> Result<(), cbt_store::store::StoreError> {
        if matches!(call, Call::Delete { key } if key.starts_with("keys/")) {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_key_removals_never_remove_the_last_usable_slot() {
    let fx = Fixture::new().await;
    let store: Arc<dyn ObjectStore> = Arc::new(HookedStore::new(
        Arc::new(LocalStore::new(fx.dir.path().join("race")).unwrap()),
        SlowKeyDeletes,
    ));
    let repo = init_enc(store.clone(), "alpha").await;
    repo.add_key(
        &Password::new("beta").unwrap(),
        FAST,
        Timestamp::from_unix_secs(1),
    )
    .await
    .unwrap();
    // Two operators, each opened with their own password, remove the other's slot at once.
    let by_alpha = Repository::open_with_key(store.clone(), &pw("alpha"))
        .await
        .unwrap();
    let by_beta = Repository::open_with_key(store.clone(), &pw("beta"))
        .await
        .unwrap();
    let alpha_slot = by_alpha.opened_slot().unwrap().to_string();
    let beta_slot = by_beta.opened_slot().unwrap().to_string();
    let now = Timestamp::from_unix_secs(2);
    let (a, b) = tokio::join!(
        by_alpha.remove_key(&beta_slot, now),
        by_beta.remove_key(&alpha_slot, now)
    );
    let outcomes = [&a, &b];
    assert_eq!(
        outcomes.iter().filter(|r| r.is_ok()).count(),
        1,
        "exactly one removal wins: {a:?} {b:?}"
    );
    for r in outcomes {
        if let Err(e) = r {
            assert!(
                matches!(e, RepoError::Locked { .. } | RepoError::LastKeySlot { .. }),
                "{e}"
            );
        }
    }
    let left = by_alpha.list_keys().await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    let survivor = if a.is_ok() { "alpha" } else { "beta" };
    Repository::open_with_key(store.clone(), &pw(survivor))
        .await
        .unwrap();
    assert!(by_alpha.list_locks().await.unwrap().is_empty());
}

#[tokio::test]
async fn key_changes_wait_for_each_other_but_not_for_backups_or_gc() {
    let Enc { fx: _fx, repo, .. } = enc_fixture().await;
    let now = Timestamp::from_unix_secs(3);
    let held = repo.lock_keys("key remove", now).await.unwrap();
    let listed = repo.list_locks().await.unwrap();
    assert!(listed.iter().any(|l| l.id == held.info().id), "{listed:?}");
    assert!(matches!(
        repo.add_key(&Password::new("x").unwrap(), FAST, now).await,
        Err(RepoError::Locked { .. })
    ));
    assert!(matches!(
        repo.add_key_file(&KeyFile::generate().unwrap(), now).await,
        Err(RepoError::Locked { .. })
    ));
    assert_eq!(repo.list_keys().await.unwrap().len(), 1);
    // Independent of the backup/GC locks.
    let shared = repo.lock_shared("backup", now).await.unwrap();
    shared.release().await.unwrap();
    let gc = repo.lock_exclusive("gc", now).await.unwrap();
    gc.release().await.unwrap();
    // A key-change lock left by a dead process is broken by id like any other.
    let id = held.info().id.clone();
    std::mem::forget(held);
    assert!(
        repo.break_lock(&id, cbt_store::repo::BreakMode::Force)
            .await
            .unwrap()
            .is_some()
    );
    repo.add_key(&Password::new("x").unwrap(), FAST, now)
        .await
        .unwrap();
}
