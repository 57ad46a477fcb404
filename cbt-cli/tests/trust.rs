//! "Trust nothing you read", end to end: a backup racing `cbt lock break` and `cbt prune` run
//! as separate processes, and repository text printed with its control characters escaped.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cbt_core::testing::XorShift;
use cbt_core::{RangeSet, SnapshotName, Timestamp, VolumeName};
use cbt_store::engine::{self, BackupMode, BackupRequest, BlockSource, EngineOptions, FileSource};
use cbt_store::repo::{RepoError, Repository};
use cbt_store::store::{LocalStore, ObjectStore, PutMode};
use support::Cbt;

const CHUNK: usize = 64 * 1024;

fn image(path: &Path) -> Vec<u8> {
    let data = XorShift::from_state(0x0123_4567_89ab_cdef).low_bytes(16 * CHUNK);
    std::fs::write(path, &data).unwrap();
    data
}

/// A source that blocks its first read until the test opens the gate.
struct Gated {
    inner: FileSource,
    gate: Arc<(Mutex<(bool, bool)>, Condvar)>,
}

impl BlockSource for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let (lock, cv) = &*self.gate;
        let mut state = lock.lock().unwrap();
        state.0 = true;
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

/// An incremental backup is running (this process) when an operator, from other processes,
/// force-breaks its lock, deletes its parent and prunes with no grace period, removing the
/// chunks the backup inherits. The backup must fail instead of committing a snapshot that
/// cannot be restored; without --force the break is refused while the holder is alive.
#[test]
fn a_backup_racing_lock_break_and_prune_fails_instead_of_committing() {
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let cbt = Cbt::local(&repo_dir);
    let img = work.path().join("disk.img");
    image(&img);
    cbt.ok(&["repo", "init", "--chunk-size", "64K"]);
    let img_s = img.to_str().unwrap();
    cbt.ok(&[
        "backup",
        "--device",
        img_s,
        "--volume",
        "v",
        "--snapshot",
        "s1",
        "--full",
    ]);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&repo_dir).unwrap());
    let repo = rt.block_on(Repository::open(store)).unwrap();
    let vol = VolumeName::new("v").unwrap();
    let parent = rt
        .block_on(repo.load_manifest(&vol, &SnapshotName::new("s1").unwrap()))
        .unwrap();
    let gate = Arc::new((Mutex::new((false, false)), Condvar::new()));
    let src = Arc::new(Gated {
        inner: FileSource::open(&img).unwrap(),
        gate: gate.clone(),
    });
    let req = BackupRequest {
        volume: vol.clone(),
        snapshot: SnapshotName::new("s2").unwrap(),
        mode: BackupMode::Incremental {
            parent: Box::new(parent),
            changed: RangeSet::try_from_extents([(0, 100)]).unwrap(),
        },
        created: Timestamp::from_unix_secs(2),
        source_info: Default::default(),
        labels: Default::default(),
        chunk_size: None,
        volume_size: None,
    };
    let repo2 = repo.clone();
    let running =
        rt.spawn(async move { engine::backup(&repo2, src, req, &EngineOptions::default()).await });
    while !gate.0.lock().unwrap().0 {
        std::thread::sleep(Duration::from_millis(10));
    }

    // The operator's side, as separate processes.
    let locks: serde_json::Value =
        serde_json::from_str(&cbt.ok(&["-o", "json", "lock", "list"])).unwrap();
    let id = locks[0]["id"].as_str().unwrap().to_string();
    let refused = cbt.cmd(&["lock", "break", &id]);
    assert_eq!(refused.status.code(), Some(6), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--force"));
    let forced = cbt.cmd(&["lock", "break", &id, "--force"]);
    assert!(forced.status.success(), "{forced:?}");
    assert!(String::from_utf8_lossy(&forced.stderr).contains("warning"));
    cbt.ok(&["delete", "--volume", "v", "--snapshot", "s1"]);
    let pruned: serde_json::Value = serde_json::from_str(&cbt.ok(&[
        "-o",
        "json",
        "prune",
        "--keep-last",
        "1",
        "--gc-grace",
        "0s",
    ]))
    .unwrap();
    assert!(pruned["gc"]["deleted_chunks"].as_u64().unwrap() > 0);

    {
        let (lock, cv) = &*gate;
        lock.lock().unwrap().1 = true;
        cv.notify_all();
    }
    let err = rt.block_on(running).unwrap().unwrap_err();
    assert!(matches!(err, RepoError::LockLost { .. }), "{err:?}");
    let list: serde_json::Value = serde_json::from_str(&cbt.ok(&["-o", "json", "list"])).unwrap();
    assert_eq!(list, serde_json::json!([]), "no snapshot was committed");
    cbt.ok(&["verify", "--read-data"]);
}

/// Labels, lock holders' hosts and purposes come from whoever can write the repository;
/// printed for people, their control characters are escaped (a terminal never sees them).
#[test]
fn repository_text_is_printed_with_control_characters_escaped() {
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let cbt = Cbt::local(&repo_dir);
    let img = work.path().join("disk.img");
    image(&img);
    cbt.ok(&["repo", "init", "--chunk-size", "64K"]);
    cbt.ok(&[
        "backup",
        "--device",
        img.to_str().unwrap(),
        "--volume",
        "v",
        "--snapshot",
        "s1",
        "--full",
        "--label",
        "note=\u{1b}[2Jgone\nFAKE: all good",
    ]);
    let show = cbt.ok(&["show", "--volume", "v", "--snapshot", "s1"]);
    assert!(!show.contains('\u{1b}'), "{show:?}");
    assert!(
        show.contains("note=\\u{1b}[2Jgone\\nFAKE: all good"),
        "{show}"
    );
    // JSON keeps the exact text (JSON escapes control characters itself).
    let json: serde_json::Value =
        serde_json::from_str(&cbt.ok(&["-o", "json", "show", "--volume", "v", "--snapshot", "s1"]))
            .unwrap();
    assert_eq!(json["labels"]["note"], "\u{1b}[2Jgone\nFAKE: all good");

    // A planted lock object with a hostile host and purpose.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = LocalStore::new(&repo_dir).unwrap();
    let lock = serde_json::json!({
        "id": "planted",
        "kind": "exclusive",
        "purpose": "prune\r\u{1b}[31mOK",
        "host": "evil\u{7}\u{202e}host",
        "pid": 1,
        "created": 0,
    });
    rt.block_on(store.put(
        "locks/exclusive",
        Bytes::from(serde_json::to_vec(&lock).unwrap()),
        PutMode::Overwrite,
    ))
    .unwrap();
    let list = cbt.ok(&["lock", "list"]);
    assert!(
        !list.chars().any(|c| c.is_control() && c != '\n'),
        "{list:?}"
    );
    assert!(list.contains("prune\\r\\u{1b}[31mOK"), "{list}");
    assert!(list.contains("evil\\u{7}\\u{202e}host"), "{list}");
    // The same text inside an error message (the lock blocks a backup) is escaped too.
    let out = cbt.cmd(&["prune", "--keep-last", "1"]);
    assert_eq!(out.status.code(), Some(6));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}') && !stderr.contains('\u{7}'),
        "{stderr:?}"
    );
    assert!(stderr.contains("evil\\u{7}"), "{stderr}");
}
