//! Drives the real `snapshift` binary against two fake clusters sharing one
//! storage backend; kubeconfigs are written to disk and resolved as kubectl would.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fake_kube::{ClusterPair, FakeKube, HttpFault, SharedBackend};
use serde_json::{Value, json};

const SNAP: &str = "snapshot.storage.k8s.io/v1";

struct Env {
    backend: SharedBackend,
    east: FakeKube,
    west: FakeKube,
    dir: tempfile::TempDir,
}

impl Env {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

async fn env() -> Env {
    let pair = ClusterPair::start(FakeKube::builder(), FakeKube::builder())
        .await
        .unwrap();
    pair.east.seed_standard("apps").unwrap();
    pair.west.seed_standard("dr").unwrap();
    pair.seed_db_and_web("apps").unwrap();
    let ClusterPair {
        backend,
        east,
        west,
    } = pair;
    let dir = tempfile::tempdir().unwrap();
    east.write_kubeconfig(&dir.path().join("east.yaml"), "east")
        .unwrap();
    west.write_kubeconfig(&dir.path().join("west.yaml"), "west")
        .unwrap();
    std::fs::write(
        dir.path().join("both.yaml"),
        fake_kube::kubeconfig_yaml(&[(&east, "east"), (&west, "west")], "east"),
    )
    .unwrap();
    Env {
        backend,
        east,
        west,
        dir,
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary off the runtime threads so the fake servers keep serving.
async fn snapshift(home: &Path, kubeconfig_env: Option<String>, args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let home = home.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_snapshift"));
        cmd.args(&args).env("HOME", &home).env_remove("RUST_LOG");
        match kubeconfig_env {
            Some(v) => cmd.env("KUBECONFIG", v),
            None => cmd.env_remove("KUBECONFIG"),
        };
        let out = cmd.output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

fn writes(server: &FakeKube) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.method != "GET")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flow_through_a_kubeconfig_list_then_rerun_and_verify() {
    let env = env().await;
    // kubectl skips listed files that do not exist; so do we.
    let list = std::env::join_paths([
        env.path("absent.yaml"),
        env.path("east.yaml"),
        env.path("west.yaml"),
    ])
    .unwrap()
    .into_string()
    .unwrap();
    let args = [
        "migrate",
        "--pvc",
        "db",
        "-n",
        "apps",
        "--from-context",
        "east",
        "--to-context",
        "west",
        "--to-namespace",
        "dr",
        "--create-pvc",
        "--pvc-name",
        "db-copy",
        "--timeout",
        "20s",
    ];
    let run = snapshift(env.dir.path(), Some(list.clone()), &args).await;
    assert_eq!(
        run.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    assert!(run.stdout.contains("pvc apps/db"), "{}", run.stdout);
    assert!(run.stdout.contains("migrated"), "{}", run.stdout);
    assert!(run.stdout.contains("dr/db-snapshift"), "{}", run.stdout);
    assert!(
        run.stderr
            .contains("waiting for destination snapshot dr/db-snapshift"),
        "{}",
        run.stderr
    );
    let handle = env.backend.handles()[0].clone();
    assert!(run.stdout.contains(&handle));
    let vsc = env
        .west
        .get(
            SNAP,
            "VolumeSnapshotContent",
            "",
            "snapshift-dr.db-snapshift",
        )
        .unwrap();
    assert_eq!(vsc["spec"]["source"]["snapshotHandle"], handle.as_str());
    assert_eq!(vsc["spec"]["deletionPolicy"], "Retain");
    let mut bound = false;
    for _ in 0..100 {
        let pvc = env
            .west
            .get("v1", "PersistentVolumeClaim", "dr", "db-copy")
            .unwrap();
        if pvc["status"]["phase"] == "Bound" {
            assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "2Gi");
            bound = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bound, "restored PVC binds once the moved snapshot is ready");

    // Same command again: already migrated, nothing written.
    let before = writes(&env.west);
    let mut json_args = args.to_vec();
    json_args.extend(["-o", "json"]);
    let run = snapshift(env.dir.path(), Some(list.clone()), &json_args).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["items"][0]["result"], "already-migrated");
    assert_eq!(doc["failed"], 0);
    assert_eq!(writes(&env.west), before);

    let run = snapshift(
        env.dir.path(),
        Some(list),
        &[
            "verify",
            "--from-context",
            "east",
            "--to-context",
            "west",
            "--to-namespace",
            "dr",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("db-snapshift") && run.stdout.contains("ok"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_yaml_and_creates_nothing() {
    let env = env().await;
    let east = env.path("east.yaml");
    let west = env.path("west.yaml");
    let args = [
        "migrate",
        "--pvc",
        "db",
        "-n",
        "apps",
        "--to-namespace",
        "dr",
        "--create-pvc",
        "--dry-run",
        "--from-kubeconfig",
        east.to_str().unwrap(),
        "--to-kubeconfig",
        west.to_str().unwrap(),
    ];
    let run = snapshift(env.dir.path(), None, &args).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    for needle in [
        "# origin (context east): would create VolumeSnapshot apps/db-snapshift",
        "# destination (context west): would create VolumeSnapshotContent snapshift-dr.db-snapshift",
        "# destination (context west): would create PersistentVolumeClaim dr/db",
        "kind: VolumeSnapshotContent",
        "deletionPolicy: Retain",
        "volumeSnapshotContentName: snapshift-dr.db-snapshift",
    ] {
        assert!(
            run.stdout.contains(needle),
            "missing {needle:?} in\n{}",
            run.stdout
        );
    }
    assert_eq!(writes(&env.east), 0);
    assert_eq!(writes(&env.west), 0);
    assert!(env.backend.handles().is_empty());

    let mut json_args = args.to_vec();
    json_args.extend(["-o", "json"]);
    let run = snapshift(env.dir.path(), None, &json_args).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["failed"], 0);
    let objects = doc["items"][0]["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 4);
    assert_eq!(objects[1]["object"]["spec"]["deletionPolicy"], "Retain");
    assert_eq!(objects[2]["object"]["metadata"]["labels"]["app"], "db");
    assert_eq!(objects[3]["object"]["metadata"]["labels"]["app"], "db");
    assert_eq!(
        objects[2]["object"]["metadata"]["annotations"]["snapshift.cbt.io/origin-context"],
        "east"
    );
    assert_eq!(writes(&env.west), 0);

    // Label/annotation filters: a skipped prefix stays behind, an allow-list keeps only its own.
    for (flag, prefix, copied) in [
        ("--skip-prefix", "ap", false),
        ("--copy-prefix", "team.", false),
        ("--copy-prefix", "app", true),
    ] {
        let mut filtered = json_args.clone();
        filtered.extend([flag, prefix]);
        let run = snapshift(env.dir.path(), None, &filtered).await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        let doc: Value = serde_json::from_str(&run.stdout).unwrap();
        for o in doc["items"][0]["objects"].as_array().unwrap() {
            if o["kind"] == "VolumeSnapshotContent" {
                continue;
            }
            let labels = &o["object"]["metadata"]["labels"];
            assert_eq!(
                labels.get("app").is_some(),
                copied,
                "{flag} {prefix}: {} {labels}",
                o["name"]
            );
            if o["side"] == "Destination" {
                assert_eq!(
                    labels["snapshift.cbt.io/migrated"], "true",
                    "always stamped"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_map_to_exit_codes_with_actionable_messages() {
    let env = env().await;
    let kc = env.path("both.yaml").to_str().unwrap().to_string();
    let base = [
        "migrate",
        "--kubeconfig",
        kc.as_str(),
        "--from-context",
        "east",
        "--to-context",
        "west",
        "-n",
        "apps",
    ];

    // Missing destination namespace: configuration error.
    let mut args = base.to_vec();
    args.extend(["--pvc", "db", "--to-namespace", "nowhere"]);
    let run = snapshift(env.dir.path(), None, &args).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr.contains("namespace nowhere does not exist"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("kubectl --context west create namespace nowhere"),
        "{}",
        run.stderr
    );

    // No kubeconfig anywhere (no flag, no KUBECONFIG, empty HOME).
    let run = snapshift(env.dir.path(), None, &["migrate", "--pvc", "db"]).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("no kubeconfig found: KUBECONFIG is unset and")
            && run.stderr.contains(".kube/config does not exist"),
        "{}",
        run.stderr
    );
    // KUBECONFIG naming only files that do not exist.
    let run = snapshift(
        env.dir.path(),
        Some(env.path("gone.yaml").to_str().unwrap().to_string()),
        &["migrate", "--pvc", "db"],
    )
    .await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr.contains("none of the files in KUBECONFIG=") && run.stderr.contains("gone.yaml"),
        "{}",
        run.stderr
    );
    // An explicit kubeconfig that does not exist is an error, not skipped.
    let gone = env.path("gone.yaml");
    let run = snapshift(
        env.dir.path(),
        None,
        &[
            "migrate",
            "--kubeconfig",
            gone.to_str().unwrap(),
            "--pvc",
            "db",
        ],
    )
    .await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr.contains("no kubeconfig found: ")
            && run
                .stderr
                .contains("gone.yaml does not exist; check the path"),
        "{}",
        run.stderr
    );

    // Unknown context.
    let run = snapshift(
        env.dir.path(),
        None,
        &[
            "migrate",
            "--kubeconfig",
            &kc,
            "--from-context",
            "north",
            "--pvc",
            "db",
        ],
    )
    .await;
    assert_eq!(run.code, 5);
    assert!(
        run.stderr.contains("context \"north\" not found"),
        "{}",
        run.stderr
    );

    // Forgetting the destination: both sides fall back to current-context.
    let run = snapshift(
        env.dir.path(),
        None,
        &["migrate", "--kubeconfig", &kc, "-n", "apps", "--pvc", "db"],
    )
    .await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr.contains("are the same cluster"),
        "{}",
        run.stderr
    );

    // Stale credentials for the destination: say which context and what to do.
    let stale = env.path("west-stale.yaml");
    std::fs::write(
        &stale,
        std::fs::read_to_string(env.path("west.yaml"))
            .unwrap()
            .replace("fake-token", "stale-token"),
    )
    .unwrap();
    let east = env.path("east.yaml");
    let run = snapshift(
        env.dir.path(),
        None,
        &[
            "migrate",
            "--from-kubeconfig",
            east.to_str().unwrap(),
            "--to-kubeconfig",
            stale.to_str().unwrap(),
            "-n",
            "apps",
            "--to-namespace",
            "dr",
            "--pvc",
            "db",
        ],
    )
    .await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("credentials of context \"west\" were rejected: refresh them"),
        "{}",
        run.stderr
    );

    // RBAC: the command to check the missing permission is spelled out.
    env.west.faults().add_http(
        HttpFault::status(403, 1)
            .method("POST")
            .path_contains("volumesnapshotcontents"),
    );
    let mut args = base.to_vec();
    args.extend(["--pvc", "db", "--to-namespace", "dr"]);
    let run = snapshift(env.dir.path(), None, &args).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "kubectl --context west auth can-i create volumesnapshotcontents.snapshot.storage.k8s.io"
        ),
        "{}",
        run.stderr
    );
    env.east
        .delete(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
        .unwrap();

    // A selector the API server cannot parse is the user's input, not a bug.
    let mut args = base.to_vec();
    args.extend(["--to-namespace", "dr", "-l", "app in (db"]);
    let run = snapshift(env.dir.path(), None, &args).await;
    assert_eq!(run.code, 5, "{}", run.stderr);
    assert!(
        run.stderr.contains("invalid label selector \"app in (db\""),
        "{}",
        run.stderr
    );

    // Conflict.
    env.west
        .create(json!({"apiVersion": SNAP, "kind": "VolumeSnapshot",
            "metadata": {"name": "web-snapshift", "namespace": "dr"},
            "spec": {"source": {"volumeSnapshotContentName": "other"}}}))
        .unwrap();
    let mut args = base.to_vec();
    args.extend(["--pvc", "web", "--to-namespace", "dr"]);
    let run = snapshift(env.dir.path(), None, &args).await;
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("already exists in cluster \"west\" and differs"),
        "{}",
        run.stderr
    );

    // Timeout: cleanup is reported, exit code says "retry later".
    env.west.faults().set_never_ready(true);
    let mut args = base.to_vec();
    args.extend(["--pvc", "db", "--to-namespace", "dr", "--timeout", "1s"]);
    let run = snapshift(env.dir.path(), None, &args).await;
    assert_eq!(run.code, 4, "{}", run.stderr);
    assert!(run.stderr.contains("timed out"), "{}", run.stderr);
    assert!(run.stderr.contains("removed from the destination: VolumeSnapshot dr/db-snapshift, VolumeSnapshotContent snapshift-dr.db-snapshift"), "{}", run.stderr);
    assert!(
        env.west
            .get(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
            .is_none()
    );
    assert_eq!(env.backend.handles().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_by_selector_reports_each_item_and_survives_transient_errors() {
    let env = env().await;
    // A PVC that matches but is not bound: its snapshot fails.
    env.east
        .create(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "cache", "namespace": "apps", "labels": {"app": "db"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "csi-hostpath-sc",
                     "resources": {"requests": {"storage": "1Gi"}}}}))
        .unwrap();
    env.west
        .faults()
        .add_http(HttpFault::status(429, 1).method("POST"));
    env.west.faults().add_http(
        HttpFault::status(500, 1)
            .method("GET")
            .reset()
            .path_contains("/csidrivers/"),
    );
    env.east.faults().fail_nth_request(3, 503);
    let kc = env.path("both.yaml").to_str().unwrap().to_string();
    let run = snapshift(
        env.dir.path(),
        None,
        &[
            "migrate",
            "--kubeconfig",
            &kc,
            "--from-context",
            "east",
            "--to-context",
            "west",
            "-n",
            "apps",
            "--to-namespace",
            "dr",
            "-l",
            "app=db",
            "--concurrency",
            "2",
            "-o",
            "json",
            "--retry-backoff",
            "20ms",
        ],
    )
    .await;
    assert_eq!(
        run.code, 8,
        "backend failure of one item\n{}\n{}",
        run.stdout, run.stderr
    );
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    let items = doc["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["item"], "pvc apps/cache");
    assert_eq!(items[0]["result"], "failed");
    assert_eq!(items[0]["error"]["kind"], "backend");
    assert!(
        items[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not yet bound")
    );
    assert_eq!(items[1]["item"], "pvc apps/db");
    assert_eq!(items[1]["result"], "migrated");
    assert!(items[1]["seconds"].as_f64().is_some());
    assert_eq!(doc["failed"], 1);
    assert!(
        env.west
            .get(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
            .is_some()
    );
    assert!(
        env.west
            .get(SNAP, "VolumeSnapshot", "dr", "cache-snapshift")
            .is_none()
    );
    assert!(
        run.stderr.contains("retrying"),
        "retries are logged: {}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_removes_what_the_run_created_and_exits_130() {
    use std::io::{BufRead, BufReader, Read};
    let env = env().await;
    env.west.faults().set_never_ready(true);
    let kc = env.path("both.yaml");
    let home = env.dir.path().to_path_buf();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_snapshift"))
            .args(["migrate", "--kubeconfig"])
            .arg(&kc)
            .args([
                "--from-context",
                "east",
                "--to-context",
                "west",
                "-n",
                "apps",
                "--to-namespace",
                "dr",
                "--pvc",
                "db",
                "--timeout",
                "2m",
            ])
            .env("HOME", &home)
            .env_remove("KUBECONFIG")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "{seen}");
            seen.push_str(&line);
            if line.contains("waiting for destination snapshot") {
                break;
            }
        }
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        reader.read_to_string(&mut seen).unwrap();
        let code = child.wait().unwrap().code().unwrap_or(-1);
        (code, seen)
    })
    .await
    .unwrap();
    assert_eq!(code, 130, "{stderr}");
    assert!(stderr.contains("interrupted; removing"), "{stderr}");
    assert!(
        stderr.contains("removed from the destination: VolumeSnapshot dr/db-snapshift, VolumeSnapshotContent snapshift-dr.db-snapshift"),
        "{stderr}"
    );
    assert!(env.west.list(SNAP, "VolumeSnapshot").is_empty());
    assert_eq!(env.backend.handles().len(), 1);
}

#[test]
fn help_prints_the_toolkits_one_exit_code_table() {
    for flag in ["-h", "--help"] {
        let out = Command::new(env!("CARGO_BIN_EXE_snapshift"))
            .arg(flag)
            .output()
            .unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(help.contains(cbt_core::exit::HELP), "{flag}: {help}");
    }
}
