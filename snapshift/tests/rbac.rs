//! The real `snapshift` binary as the ServiceAccount of `examples/snapshift/`, against two
//! fake clusters that enforce those manifests (read from disk, so editing them changes this
//! test): every command of the README works with exactly those rights, a missing required
//! right stops with the API server's message before anything is cut, and a missing optional
//! one is a warning. The exhaustive per-rule proof is in `cbt-k8s/tests/snapshift_rbac.rs`.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use fake_kube::rbac::{Policy, UserInfo};
use fake_kube::{ClusterPair, FakeKube, SharedBackend};
use serde_json::Value;

const TOKEN: &str = "snapshift-sa-token";

fn manifest(name: &str) -> Policy {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/snapshift")
        .join(name);
    Policy::from_yaml(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The manifest without the rule granting `verb` on `resource`.
fn without(mut policy: Policy, resource: &str, verb: &str) -> Policy {
    let before: usize = policy.roles.iter().map(|r| r.rules.len()).sum();
    for role in &mut policy.roles {
        role.rules
            .retain(|r| !(r.resources == [resource] && r.verbs == [verb]));
    }
    let after: usize = policy.roles.iter().map(|r| r.rules.len()).sum();
    assert_eq!(
        before,
        after + 1,
        "exactly one rule grants {verb} {resource}"
    );
    policy
}

struct Env {
    backend: SharedBackend,
    east: FakeKube,
    west: FakeKube,
    dir: tempfile::TempDir,
}

async fn env(origin: Policy, dest: Policy) -> Env {
    let account = &origin.service_accounts[0];
    let sa = UserInfo::service_account(&account.namespace, &account.name);
    let ClusterPair {
        backend,
        east,
        west,
    } = ClusterPair::start(
        FakeKube::builder()
            .rbac(origin.clone())
            .user(TOKEN, sa.clone()),
        FakeKube::builder().rbac(dest).user(TOKEN, sa),
    )
    .await
    .unwrap();
    east.seed_standard("apps").unwrap();
    west.seed_standard("dr").unwrap();
    for (name, size, labels) in [("db", "2Gi", "db"), ("web", "1Gi", "web")] {
        east.seed_pvc(
            "apps",
            name,
            size,
            "Filesystem",
            &["ReadWriteOnce"],
            &[("app", labels)],
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    east.write_kubeconfig_as(&dir.path().join("east.yaml"), "east", TOKEN)
        .unwrap();
    west.write_kubeconfig_as(&dir.path().join("west.yaml"), "west", TOKEN)
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
async fn snapshift(home: &Path, args: &[&str]) -> Run {
    let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let east = home.join("east.yaml").display().to_string();
    let west = home.join("west.yaml").display().to_string();
    full.extend([
        "--from-kubeconfig".into(),
        east,
        "--to-kubeconfig".into(),
        west,
    ]);
    let home = home.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_snapshift"))
            .args(&full)
            .env("HOME", &home)
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
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

const MIGRATE_DB: [&str; 8] = [
    "migrate",
    "--pvc",
    "db",
    "-n",
    "apps",
    "--to-namespace",
    "dr",
    "--create-pvc",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_dry_run_rerun_and_verify_work_with_exactly_the_example_rights() {
    let env = env(manifest("origin.yaml"), manifest("destination.yaml")).await;
    let home = env.dir.path();
    let ok = |run: &Run, what: &str| {
        assert_eq!(
            run.code, 0,
            "{what}\nstdout:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        );
        assert!(
            !run.stderr.contains("not allowed to"),
            "{what}: no check skipped\n{}",
            run.stderr
        );
    };

    let mut dry = MIGRATE_DB.to_vec();
    dry.push("--dry-run");
    let run = snapshift(home, &dry).await;
    ok(&run, "dry run");
    assert!(
        run.stdout
            .contains("would create VolumeSnapshotContent snapshift-dr.db-snapshift"),
        "{}",
        run.stdout
    );
    assert_eq!((writes(&env.east), writes(&env.west)), (0, 0));

    let run = snapshift(home, &MIGRATE_DB).await;
    ok(&run, "migrate --create-pvc");
    assert!(run.stdout.contains("migrated"), "{}", run.stdout);
    assert_eq!(env.backend.handles().len(), 1);

    let mut again = MIGRATE_DB.to_vec();
    again.extend(["-o", "json"]);
    let run = snapshift(home, &again).await;
    ok(&run, "re-run");
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["items"][0]["result"], "already-migrated");

    let run = snapshift(
        home,
        &[
            "migrate",
            "--pvc",
            "web",
            "-n",
            "apps",
            "--to-namespace",
            "dr",
        ],
    )
    .await;
    ok(&run, "migrate without --create-pvc");

    let run = snapshift(home, &["verify", "--to-namespace", "dr"]).await;
    ok(&run, "verify");
    assert!(
        run.stdout.contains("2 snapshot(s), 0 with problems"),
        "{}",
        run.stdout
    );
    let run = snapshift(
        home,
        &[
            "verify",
            "--to-namespace",
            "dr",
            "--snapshot",
            "db-snapshift",
        ],
    )
    .await;
    ok(&run, "verify --snapshot");

    assert!(env.east.denied().is_empty(), "{:?}", env.east.denied());
    assert!(env.west.denied().is_empty(), "{:?}", env.west.denied());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_required_right_stops_before_cutting_and_a_missing_optional_one_warns() {
    // The report that started this: no `get` on destination PVCs. The conflict check needs
    // it, so the run stops with the API server's message, before a snapshot is cut.
    let env = env(
        manifest("origin.yaml"),
        without(
            manifest("destination.yaml"),
            "persistentvolumeclaims",
            "get",
        ),
    )
    .await;
    let run = snapshift(env.dir.path(), &MIGRATE_DB).await;
    assert_eq!(run.code, 5, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(
            "persistentvolumeclaims \"db\" is forbidden: User \"system:serviceaccount:snapshift:snapshift\" cannot get resource \"persistentvolumeclaims\" in API group \"\" in the namespace \"dr\""
        ),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("kubectl --context west auth can-i get persistentvolumeclaims"),
        "{}",
        run.stderr
    );
    assert!(env.backend.handles().is_empty(), "nothing was cut");
    assert_eq!(writes(&env.west), 0);

    // Without `get namespaces` the preflight skips that check, says what is lost, and the
    // migration completes.
    let env = env_without_namespaces().await;
    let run = snapshift(env.dir.path(), &MIGRATE_DB).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(
            "warning: pvc apps/db: not allowed to get namespaces in cluster \"west\", so a missing destination namespace is noticed only when the VolumeSnapshot is created there"
        ),
        "{}",
        run.stderr
    );
    assert_eq!(
        env.west
            .denied()
            .iter()
            .map(|r| (r.attributes.verb.as_str(), r.attributes.resource.as_str()))
            .collect::<Vec<_>>(),
        [("get", "namespaces")],
        "asked once, not again after the snapshot was cut"
    );
}

async fn env_without_namespaces() -> Env {
    env(
        manifest("origin.yaml"),
        without(manifest("destination.yaml"), "namespaces", "get"),
    )
    .await
}
