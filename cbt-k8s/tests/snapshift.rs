//! SnapShift through the library against two fake clusters that share one
//! storage backend, reached through a kubeconfig with two contexts.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbt_k8s::snapshift::{
    MigrateOptions, MigrationRequest, Outcome, PlannedAction, Progress, Side, SnapShift, Stage,
};
use cbt_k8s::{ClusterTarget, Error, ErrorKind, RetryPolicy, connect};
use fake_kube::{ClusterPair, FakeKube, HttpFault, SharedBackend};
use serde_json::json;

const SNAP: &str = "snapshot.storage.k8s.io/v1";

struct Env {
    backend: SharedBackend,
    east: FakeKube,
    west: FakeKube,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

async fn env() -> Env {
    let pair = ClusterPair::start(FakeKube::builder(), FakeKube::builder())
        .await
        .unwrap();
    pair.east.seed_standard("apps").unwrap();
    pair.west.seed_standard("apps").unwrap();
    pair.west.seed_namespace("dr").unwrap();
    pair.seed_db_and_web("apps").unwrap();
    let ClusterPair {
        backend,
        east,
        west,
    } = pair;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    std::fs::write(
        &kubeconfig,
        fake_kube::kubeconfig_yaml(&[(&east, "east"), (&west, "west")], "east"),
    )
    .unwrap();
    Env {
        backend,
        east,
        west,
        _dir: dir,
        kubeconfig,
    }
}

fn opts() -> MigrateOptions {
    MigrateOptions {
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        ..Default::default()
    }
}

async fn shift(env: &Env, opts: MigrateOptions) -> SnapShift {
    let target = |ctx: &str| ClusterTarget {
        kubeconfig: Some(env.kubeconfig.clone()),
        context: Some(ctx.to_string()),
    };
    let origin = connect(&target("east")).await.unwrap();
    let dest = connect(&target("west")).await.unwrap();
    SnapShift::new(origin, dest, opts)
}

fn to_dr(mut r: MigrationRequest) -> MigrationRequest {
    r.to_namespace = Some("dr".into());
    r
}

fn writes(server: &FakeKube) -> Vec<String> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

#[tokio::test]
async fn migrates_a_pvc_with_a_restored_pvc_and_is_idempotent() {
    let env = env().await;
    let s = shift(&env, opts()).await;
    let mut req = to_dr(MigrationRequest::for_pvc("apps", "db"));
    req.create_pvc = true;
    let report = s.migrate(&req).await;
    let created = match report.result {
        Ok(Outcome::Migrated { created }) => created,
        other => panic!("{other:?}"),
    };
    assert_eq!(created.len(), 3, "{created:?}");
    assert_eq!(report.destination.as_deref(), Some("dr/db-snapshift"));
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("deletionPolicy Delete")),
        "{:?}",
        report.warnings
    );
    let handle = report.handle.unwrap();
    assert_eq!(env.backend.handles(), vec![handle.clone()]);

    let vsc = env
        .west
        .get(
            SNAP,
            "VolumeSnapshotContent",
            "",
            "snapshift-dr.db-snapshift",
        )
        .unwrap();
    assert_eq!(vsc["spec"]["deletionPolicy"], "Retain");
    assert_eq!(vsc["spec"]["source"]["snapshotHandle"], handle.as_str());
    assert_eq!(vsc["spec"]["sourceVolumeMode"], "Block");
    assert_eq!(vsc["spec"]["volumeSnapshotClassName"], "csi-snapclass");
    assert_eq!(vsc["spec"]["volumeSnapshotRef"]["namespace"], "dr");
    assert_eq!(
        vsc["metadata"]["annotations"]["snapshift.cbt.io/origin-context"],
        "east"
    );
    let vs = env
        .west
        .get(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
        .unwrap();
    assert_eq!(vs["status"]["readyToUse"], true);
    assert_eq!(vs["metadata"]["labels"]["app"], "db");
    let pvc = env
        .west
        .get("v1", "PersistentVolumeClaim", "dr", "db")
        .unwrap();
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "2Gi");
    assert_eq!(pvc["spec"]["volumeMode"], "Block");
    assert_eq!(pvc["spec"]["dataSource"]["name"], "db-snapshift");
    let origin_vs = env
        .east
        .get(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
        .unwrap();
    assert_eq!(
        origin_vs["metadata"]["annotations"]["snapshift.cbt.io/created-by"],
        "snapshift"
    );

    // Re-run: nothing new is written to the destination.
    let before = writes(&env.west).len();
    let again = s.migrate(&req).await;
    assert!(
        matches!(again.result, Ok(Outcome::AlreadyMigrated)),
        "{:?}",
        again.result
    );
    assert_eq!(writes(&env.west).len(), before);
    assert_eq!(env.backend.handles().len(), 1, "no second snapshot was cut");

    // verify: healthy, then broken once the origin snapshot is gone.
    let reports = s.verify("dr", &[]).await.unwrap();
    assert_eq!(reports.len(), 1);
    assert!(reports[0].problems.is_empty(), "{:?}", reports[0].problems);
    assert_eq!(reports[0].origin.as_deref(), Some("apps/db-snapshift"));
    env.east
        .delete(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
        .unwrap();
    let reports = s.verify("dr", &["db-snapshift".to_string()]).await.unwrap();
    assert!(
        reports[0]
            .problems
            .iter()
            .any(|p| p.contains("no longer exists")),
        "{:?}",
        reports[0].problems
    );
    // The origin snapshot was Delete-policy: gone from the backend, so the copy cannot be ready any more.
    assert!(env.backend.handles().is_empty());
}

#[tokio::test]
async fn moves_an_existing_snapshot_and_dry_run_writes_nothing() {
    let env = env().await;
    env.east
        .create(json!({"apiVersion": SNAP, "kind": "VolumeSnapshot",
            "metadata": {"name": "nightly", "namespace": "apps",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"}},
            "spec": {"source": {"persistentVolumeClaimName": "web"}}}))
        .unwrap();
    let mut o = opts();
    o.dry_run = true;
    let s = shift(&env, o).await;
    let west_writes = writes(&env.west).len();
    let east_writes = writes(&env.east).len();
    let report = s
        .migrate(&MigrationRequest::for_snapshot("apps", "nightly"))
        .await;
    let objects = match report.result {
        Ok(Outcome::DryRun(objects)) => objects,
        other => panic!("{other:?}"),
    };
    assert_eq!(writes(&env.west).len(), west_writes);
    assert_eq!(writes(&env.east).len(), east_writes);
    let kinds: Vec<(Side, PlannedAction, &str)> =
        objects.iter().map(|o| (o.side, o.action, o.kind)).collect();
    assert_eq!(
        kinds,
        [
            (Side::Origin, PlannedAction::Exists, "VolumeSnapshot"),
            (
                Side::Destination,
                PlannedAction::Create,
                "VolumeSnapshotContent"
            ),
            (Side::Destination, PlannedAction::Create, "VolumeSnapshot"),
        ]
    );
    let handle = env.backend.handles()[0].clone();
    assert_eq!(
        objects[1].object["spec"]["source"]["snapshotHandle"],
        handle.as_str()
    );
    assert_eq!(objects[2].object["metadata"]["annotations"]["team"], "a");
    assert!(
        objects[2].object["metadata"]["annotations"]
            .get("kubectl.kubernetes.io/last-applied-configuration")
            .is_none()
    );

    // Dry run of a PVC: the origin snapshot would be created, handle pending.
    let report = s.migrate(&MigrationRequest::for_pvc("apps", "db")).await;
    let Ok(Outcome::DryRun(objects)) = report.result else {
        panic!("{:?}", report.result)
    };
    assert_eq!(
        (objects[0].side, objects[0].action),
        (Side::Origin, PlannedAction::Create)
    );
    assert!(
        objects[1].object["spec"]["source"]["snapshotHandle"]
            .as_str()
            .unwrap()
            .starts_with('<')
    );
    assert!(
        env.east
            .get(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
            .is_none()
    );

    // The real thing, for the existing snapshot, keeps its name.
    let s = shift(&env, opts()).await;
    let report = s
        .migrate(&MigrationRequest::for_snapshot("apps", "nightly"))
        .await;
    assert!(
        matches!(report.result, Ok(Outcome::Migrated { .. })),
        "{:?}",
        report.result
    );
    assert!(
        env.west
            .get(SNAP, "VolumeSnapshot", "apps", "nightly")
            .is_some()
    );
}

#[tokio::test]
async fn conflicts_are_errors_and_leave_objects_untouched() {
    let env = env().await;
    let foreign = env
        .west
        .create(json!({"apiVersion": SNAP, "kind": "VolumeSnapshot",
            "metadata": {"name": "db-snapshift", "namespace": "dr"},
            "spec": {"source": {"volumeSnapshotContentName": "something-else"}}}))
        .unwrap();
    let s = shift(&env, opts()).await;
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    match &report.result {
        Err(
            e @ Error::Conflict {
                kind,
                object,
                cluster,
                ..
            },
        ) => {
            assert_eq!(
                (*kind, object.as_str(), cluster.as_str()),
                ("VolumeSnapshot", "dr/db-snapshift", "west")
            );
            assert_eq!(e.kind(), ErrorKind::Conflict);
        }
        other => panic!("{other:?}"),
    }
    // The fake controller marks the foreign snapshot as broken; we never wrote to the destination.
    let now = env
        .west
        .get(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
        .unwrap();
    assert_eq!(now["spec"], foreign["spec"]);
    assert!(now["metadata"].get("annotations").is_none());
    assert!(writes(&env.west).is_empty(), "{:?}", writes(&env.west));
    assert!(
        env.west
            .get(
                SNAP,
                "VolumeSnapshotContent",
                "",
                "snapshift-dr.db-snapshift"
            )
            .is_none()
    );

    // An origin snapshot under our default name that snapshift did not cut is a conflict too.
    env.east
        .create(json!({"apiVersion": SNAP, "kind": "VolumeSnapshot",
            "metadata": {"name": "web-snapshift", "namespace": "apps"},
            "spec": {"source": {"persistentVolumeClaimName": "web"}}}))
        .unwrap();
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "web")))
        .await;
    assert!(
        matches!(&report.result, Err(Error::Conflict { cluster, .. }) if cluster == "east"),
        "{:?}",
        report.result
    );
}

#[tokio::test]
async fn preflight_failures_name_the_missing_object_and_create_nothing() {
    let env = env().await;
    let s = shift(&env, opts()).await;
    // Missing namespace.
    let mut req = MigrationRequest::for_pvc("apps", "db");
    req.to_namespace = Some("nowhere".into());
    let report = s.migrate(&req).await;
    match &report.result {
        Err(Error::Preflight {
            cluster,
            problem,
            fix,
        }) => {
            assert_eq!(cluster, "west");
            assert!(problem.contains("namespace nowhere"), "{problem}");
            assert!(fix.contains("create namespace nowhere"), "{fix}");
        }
        other => panic!("{other:?}"),
    }
    // The driver is known from the StorageClass, so no origin snapshot was cut.
    assert!(
        env.east
            .get(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
            .is_none()
    );

    // Named class that does not exist, then one for another driver.
    let mut req = to_dr(MigrationRequest::for_pvc("apps", "db"));
    req.snapshot_class = Some("gold".into());
    let report = s.migrate(&req).await;
    assert!(
        matches!(&report.result, Err(Error::Preflight { problem, .. }) if problem.contains("VolumeSnapshotClass gold does not exist")),
        "{:?}",
        report.result
    );
    env.west
        .seed_snapshot_class("gold", "other.csi.example.com", false)
        .unwrap();
    let report = s.migrate(&req).await;
    assert!(
        matches!(&report.result, Err(Error::Preflight { problem, .. }) if problem.contains("belongs to driver other.csi.example.com")),
        "{:?}",
        report.result
    );

    // A restored PVC needs a StorageClass of the same driver, or it would stay Pending.
    let preflight_problem = |report: cbt_k8s::snapshift::MigrationReport| match report.result {
        Err(Error::Preflight { problem, fix, .. }) => (problem, fix),
        other => panic!("{other:?}"),
    };
    let mut req = to_dr(MigrationRequest::for_pvc("apps", "db"));
    req.create_pvc = true;
    req.storage_class = Some("platinum".into());
    let (problem, fix) = preflight_problem(s.migrate(&req).await);
    assert!(
        problem.contains("StorageClass platinum does not exist"),
        "{problem}"
    );
    assert!(
        fix.contains("provisioned by hostpath.csi.k8s.io: csi-hostpath-sc"),
        "{fix}"
    );
    env.west
        .seed_storage_class("platinum", "other.csi.example.com", false)
        .unwrap();
    let (problem, _) = preflight_problem(s.migrate(&req).await);
    assert!(
        problem.contains("StorageClass platinum is provisioned by other.csi.example.com"),
        "{problem}"
    );
    env.west
        .delete("storage.k8s.io/v1", "StorageClass", "", "csi-hostpath-sc")
        .unwrap();
    env.west
        .seed_storage_class("csi-hostpath-sc", "hostpath.csi.k8s.io", false)
        .unwrap();
    req.storage_class = None;
    let (problem, fix) = preflight_problem(s.migrate(&req).await);
    assert!(
        problem.contains("no StorageClass is marked default"),
        "{problem}"
    );
    assert!(fix.contains("csi-hostpath-sc"), "{fix}");
    // The same request without a PVC does not need one.
    req.create_pvc = false;
    let report = s.migrate(&req).await;
    assert!(report.result.is_ok(), "{:?}", report.result);
    env.west
        .delete(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
        .unwrap();
    env.west
        .delete(
            SNAP,
            "VolumeSnapshotContent",
            "",
            "snapshift-dr.db-snapshift",
        )
        .unwrap();
    env.east
        .delete(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
        .unwrap();

    // No class at all for the driver.
    env.west
        .delete(SNAP, "VolumeSnapshotClass", "", "csi-snapclass")
        .unwrap();
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    assert!(
        matches!(&report.result, Err(Error::Preflight { problem, .. }) if problem.contains("no VolumeSnapshotClass for driver hostpath.csi.k8s.io")),
        "{:?}",
        report.result
    );

    // Missing CSIDriver.
    env.west
        .delete("storage.k8s.io/v1", "CSIDriver", "", "hostpath.csi.k8s.io")
        .unwrap();
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    match &report.result {
        Err(e @ Error::Preflight { problem, .. }) => {
            assert!(
                problem.contains("CSIDriver hostpath.csi.k8s.io is not installed"),
                "{problem}"
            );
            assert_eq!(e.kind(), ErrorKind::Config);
        }
        other => panic!("{other:?}"),
    }
    assert!(env.west.list(SNAP, "VolumeSnapshotContent").is_empty());
    assert!(env.west.list(SNAP, "VolumeSnapshot").is_empty());
    assert!(env.backend.handles().is_empty());
}

/// A destination namespace that does not exist is refused as a configuration error naming
/// it, on the paths the PVC test above does not take: moving an existing snapshot, a dry run
/// (its reads include the preflight), and a PVC whose driver cannot be learned beforehand
/// (its StorageClass is gone, so the snapshot is cut first and the destination checked after).
/// The destination is never written.
#[tokio::test]
async fn a_missing_destination_namespace_is_refused_on_every_path() {
    let env = env().await;
    env.east
        .create(json!({"apiVersion": SNAP, "kind": "VolumeSnapshot",
            "metadata": {"name": "nightly", "namespace": "apps"},
            "spec": {"source": {"persistentVolumeClaimName": "web"}}}))
        .unwrap();
    let refused = |report: cbt_k8s::snapshift::MigrationReport| match report.result {
        Err(e @ Error::Preflight { .. }) => {
            assert_eq!(e.kind(), ErrorKind::Config);
            let Error::Preflight {
                cluster,
                problem,
                fix,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(cluster, "west");
            assert_eq!(problem, "namespace nowhere does not exist");
            assert!(
                fix.contains("kubectl --context west create namespace nowhere"),
                "{fix}"
            );
        }
        other => panic!("{other:?}"),
    };
    let nowhere = |mut r: MigrationRequest| {
        r.to_namespace = Some("nowhere".into());
        r
    };
    let west_writes = writes(&env.west);

    // An existing snapshot.
    let s = shift(&env, opts()).await;
    refused(
        s.migrate(&nowhere(MigrationRequest::for_snapshot("apps", "nightly")))
            .await,
    );
    // A dry run, of an existing snapshot and of a PVC.
    let mut dry = opts();
    dry.dry_run = true;
    let d = shift(&env, dry).await;
    let east_writes = writes(&env.east);
    refused(
        d.migrate(&nowhere(MigrationRequest::for_snapshot("apps", "nightly")))
            .await,
    );
    refused(
        d.migrate(&nowhere(MigrationRequest::for_pvc("apps", "db")))
            .await,
    );
    assert_eq!(writes(&env.east), east_writes, "a dry run writes nothing");

    // A PVC whose StorageClass is gone from the origin: the driver is learned from the
    // snapshot, so the destination is checked once it is ready, and still refused.
    env.east
        .delete("storage.k8s.io/v1", "StorageClass", "", "csi-hostpath-sc")
        .unwrap();
    refused(
        s.migrate(&nowhere(MigrationRequest::for_pvc("apps", "db")))
            .await,
    );
    assert!(
        env.east
            .get(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
            .is_some(),
        "the origin snapshot was cut before the driver was known"
    );

    assert_eq!(
        writes(&env.west),
        west_writes,
        "the destination is never written"
    );
    assert!(env.west.list(SNAP, "VolumeSnapshotContent").is_empty());
    assert!(env.west.list(SNAP, "VolumeSnapshot").is_empty());
}

#[tokio::test]
async fn origin_snapshot_error_is_reported_with_the_driver_message() {
    let env = env().await;
    env.east
        .faults()
        .set_snapshot_error(Some("array is read-only"));
    let s = shift(&env, opts()).await;
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    match &report.result {
        Err(
            e @ Error::SnapshotFailed {
                cluster, message, ..
            },
        ) => {
            assert_eq!(cluster, "east");
            assert!(message.contains("array is read-only"), "{message}");
            assert_eq!(e.kind(), ErrorKind::Backend);
        }
        other => panic!("{other:?}"),
    }
    assert!(env.west.list(SNAP, "VolumeSnapshot").is_empty());
}

#[tokio::test]
async fn timeout_cleans_up_the_destination_but_never_the_storage_snapshot() {
    let env = env().await;
    env.west.faults().set_never_ready(true);
    let mut o = opts();
    o.timeout = Duration::from_millis(1500);
    let s = shift(&env, o).await;
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    match &report.result {
        Err(e @ Error::Timeout { cluster, what, .. }) => {
            assert_eq!(cluster, "west");
            assert!(what.contains("dr/db-snapshift"), "{what}");
            assert_eq!(e.kind(), ErrorKind::Transient);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(report.removed.len(), 2, "{:?}", report.removed);
    assert!(report.kept.is_empty());
    assert!(env.west.list(SNAP, "VolumeSnapshotContent").is_empty());
    assert!(env.west.list(SNAP, "VolumeSnapshot").is_empty());
    assert_eq!(
        env.backend.handles().len(),
        1,
        "Retain: the shared snapshot survives cleanup"
    );
    assert!(
        env.east
            .get(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
            .is_some()
    );

    // --keep-partial leaves them; a later run (driver healthy again) completes from there.
    let mut o = opts();
    o.timeout = Duration::from_millis(1500);
    o.keep_partial = true;
    let s = shift(&env, o).await;
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    assert!(report.result.is_err());
    assert_eq!(report.kept.len(), 2, "{:?}", report.kept);
    assert!(report.removed.is_empty());
    assert_eq!(env.west.list(SNAP, "VolumeSnapshot").len(), 1);
    env.west.faults().set_never_ready(false);
    let s = shift(&env, opts()).await;
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    assert!(
        matches!(report.result, Ok(Outcome::AlreadyMigrated)),
        "{:?}",
        report.result
    );
}

#[tokio::test]
async fn batch_continues_past_a_failing_item() {
    let env = env().await;
    let s = shift(&env, opts()).await;
    assert_eq!(
        s.pvcs_matching("apps", "app in (db,web)").await.unwrap(),
        ["db", "web"]
    );
    let reqs: Vec<MigrationRequest> = ["db", "missing", "web"]
        .iter()
        .map(|p| to_dr(MigrationRequest::for_pvc("apps", p)))
        .collect();
    let reports = s.migrate_all(&reqs, 2).await;
    let items: Vec<&str> = reports.iter().map(|r| r.item.as_str()).collect();
    assert_eq!(items, ["pvc apps/db", "pvc apps/missing", "pvc apps/web"]);
    assert!(reports[0].result.is_ok());
    assert!(matches!(
        &reports[1].result,
        Err(Error::NotFound {
            kind: "PersistentVolumeClaim",
            ..
        })
    ));
    assert!(reports[2].result.is_ok());
    assert_eq!(env.west.list(SNAP, "VolumeSnapshot").len(), 2);
}

/// How many VolumeSnapshotContent creates `server` has received.
fn content_creates(server: &FakeKube) -> usize {
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/volumesnapshotcontents"))
        .count()
}

#[tokio::test]
async fn transient_api_errors_are_retried() {
    let env = env().await;
    env.west.faults().add_http(
        HttpFault::status(429, 2)
            .method("POST")
            .path_contains("volumesnapshotcontents"),
    );
    env.west.faults().add_http(
        HttpFault::status(500, 1)
            .method("GET")
            .path_contains("/csidrivers/"),
    );
    env.west.faults().add_http(
        HttpFault::status(503, 1)
            .method("POST")
            .path_contains("volumesnapshots"),
    );
    env.east.faults().add_http(
        HttpFault::status(500, 1)
            .method("GET")
            .reset()
            .path_contains("persistentvolumeclaims"),
    );
    let s = shift(&env, opts()).await;
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    assert!(
        matches!(report.result, Ok(Outcome::Migrated { .. })),
        "{:?}",
        report.result
    );
    let posts = content_creates(&env.west);
    assert_eq!(posts, 3, "two 429s, then success");

    // A create that lands but whose answer is lost: the retry meets 409 and adopts the object.
    let mut o = opts();
    o.timeout = Duration::from_millis(1500);
    env.west.faults().add_http(
        HttpFault::status(504, 1)
            .method("POST")
            .path_contains("volumesnapshotcontents")
            .after_processing(),
    );
    env.west.faults().set_never_ready(true);
    let s2 = shift(&env, o).await;
    let report = s2
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "web")))
        .await;
    assert!(
        matches!(report.result, Err(Error::Timeout { .. })),
        "{:?}",
        report.result
    );
    let posts = content_creates(&env.west);
    assert_eq!(
        posts,
        3 + 2,
        "db: two 429s + success; web: lost answer + retry"
    );
    // The adopted content counts as created by this run, so cleanup removes it.
    assert!(
        report
            .removed
            .iter()
            .any(|r| r.starts_with("VolumeSnapshotContent snapshift-dr.web-snapshift")),
        "{:?}",
        report.removed
    );
    assert!(
        env.west
            .get(
                SNAP,
                "VolumeSnapshotContent",
                "",
                "snapshift-dr.web-snapshift"
            )
            .is_none()
    );
    env.west.faults().set_never_ready(false);

    // A permanent error is not retried, and classified.
    let mut o = opts();
    o.retry.max_attempts = 2;
    let s = shift(&env, o).await;
    env.west.faults().add_http(
        HttpFault::status(500, 5)
            .method("GET")
            .path_contains("/namespaces/dr"),
    );
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "web")))
        .await;
    match &report.result {
        Err(e @ Error::Api { cluster, .. }) => {
            assert_eq!(cluster, "west");
            assert_eq!(e.kind(), ErrorKind::Transient);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unknown_context_and_bad_kubeconfig_are_config_errors() {
    let env = env().await;
    let err = connect(&ClusterTarget {
        kubeconfig: Some(env.kubeconfig.clone()),
        context: Some("north".into()),
    })
    .await
    .unwrap_err();
    match &err {
        Error::ContextNotFound { available, .. } => assert_eq!(available, "east, west"),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = connect(&ClusterTarget {
        kubeconfig: Some(env.kubeconfig.with_extension("missing")),
        context: None,
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NoKubeconfig { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Config);
    // A file that exists but is not a kubeconfig.
    let garbage = env.kubeconfig.with_extension("garbage");
    std::fs::write(&garbage, "clusters: [unterminated").unwrap();
    let err = connect(&ClusterTarget {
        kubeconfig: Some(garbage),
        context: None,
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Kubeconfig { .. }), "{err:?}");
    // current-context is used when none is named.
    let c = connect(&ClusterTarget {
        kubeconfig: Some(env.kubeconfig.clone()),
        context: None,
    })
    .await
    .unwrap();
    assert_eq!(c.context, "east");
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, Stage)>>);

impl Progress for Recorder {
    fn stage(&self, item: &str, stage: &Stage) {
        self.0
            .lock()
            .unwrap()
            .push((item.to_string(), stage.clone()));
    }
}

#[tokio::test]
async fn concurrency_one_runs_items_one_after_another() {
    let env = env().await;
    let recorder = Arc::new(Recorder::default());
    let s = shift(&env, opts()).await.with_progress(recorder.clone());
    let reqs: Vec<MigrationRequest> = ["db", "web"]
        .iter()
        .map(|p| to_dr(MigrationRequest::for_pvc("apps", p)))
        .collect();
    let reports = s.migrate_all(&reqs, 1).await;
    assert!(reports.iter().all(|r| r.result.is_ok()));
    let items: Vec<String> = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(i, _)| i.clone())
        .collect();
    let first_web = items.iter().position(|i| i == "pvc apps/web").unwrap();
    assert!(items[..first_web].iter().all(|i| i == "pvc apps/db"));
    assert!(
        items[first_web..].iter().all(|i| i == "pvc apps/web"),
        "{items:?}"
    );
    let recorded = recorder.0.lock().unwrap();
    assert!(
        recorded
            .iter()
            .any(|(_, s)| matches!(s, Stage::WaitingDestination(d) if d == "dr/web-snapshift"))
    );
}

#[tokio::test]
async fn readiness_is_awaited_with_a_watch_from_the_resource_version() {
    let env = env().await;
    env.west.faults().set_controller_paused(true);
    let s = shift(&env, opts()).await;
    let req = to_dr(MigrationRequest::for_pvc("apps", "db"));
    let run = tokio::spawn(async move { s.migrate(&req).await });
    // Hold the destination snapshot unready until the client is watching it.
    let mut watch_query = None;
    for _ in 0..500 {
        watch_query = env
            .west
            .requests()
            .into_iter()
            .find(|r| {
                r.query.contains("watch=true") && r.path.ends_with("/namespaces/dr/volumesnapshots")
            })
            .map(|r| r.query);
        if watch_query.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let query = watch_query.expect("the client watches the destination snapshot");
    assert!(
        query.contains("fieldSelector=metadata.name%3Ddb-snapshift"),
        "{query}"
    );
    let vs = env
        .west
        .get(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
        .unwrap();
    let rv = vs["metadata"]["resourceVersion"].as_str().unwrap();
    assert!(
        query.contains(&format!("resourceVersion={rv}")),
        "{query} should resume from {rv}"
    );
    env.west.faults().set_controller_paused(false);
    let report = run.await.unwrap();
    assert!(
        matches!(report.result, Ok(Outcome::Migrated { .. })),
        "{:?}",
        report.result
    );
}

#[tokio::test]
async fn longest_names_give_valid_objects_and_bad_names_touch_nothing() {
    let env = env().await;
    // A PVC name at the 253-character limit: every derived name must stay a valid object name
    // (the fake API server rejects invalid ones with 422, as the real one does).
    let long = format!("{}-db", "p".repeat(250));
    assert_eq!(long.len(), 253);
    env.east
        .seed_pvc("apps", &long, "1Gi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();
    let s = shift(&env, opts()).await;
    let mut req = to_dr(MigrationRequest::for_pvc("apps", &long));
    req.create_pvc = true;
    let report = s.migrate(&req).await;
    let created = match report.result {
        Ok(Outcome::Migrated { created }) => created,
        other => panic!("{other:?}"),
    };
    assert_eq!(created.len(), 3, "{created:?}");
    let vs = env.west.list(SNAP, "VolumeSnapshot");
    let vs_name = vs[0]["metadata"]["name"].as_str().unwrap();
    assert!(
        vs_name.len() <= 253 && vs_name.starts_with("ppp"),
        "{vs_name}"
    );
    assert_eq!(vs[0]["status"]["readyToUse"], true);
    let vsc = env.west.list(SNAP, "VolumeSnapshotContent");
    let vsc_name = vsc[0]["metadata"]["name"].as_str().unwrap();
    assert!(vsc_name.len() <= 253, "{vsc_name}");
    assert!(
        env.west
            .get("v1", "PersistentVolumeClaim", "dr", &long)
            .is_some()
    );
    assert!(matches!(
        s.migrate(&req).await.result,
        Ok(Outcome::AlreadyMigrated)
    ));

    // Invalid names are refused before any API call.
    let (east_before, west_before) = (env.east.requests().len(), env.west.requests().len());
    for bad in ["DB", "db_1", "../db", &"x".repeat(254)] {
        let report = s
            .migrate(&to_dr(MigrationRequest::for_pvc("apps", bad)))
            .await;
        match &report.result {
            Err(e @ Error::InvalidInput { what, .. }) => {
                assert!(what.contains("PVC name"), "{e}");
                assert_eq!(e.kind(), ErrorKind::Config);
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(env.east.requests().len(), east_before);
    assert_eq!(env.west.requests().len(), west_before);
}

#[tokio::test]
async fn same_cluster_and_namespace_on_both_sides_is_refused() {
    let env = env().await;
    // Both contexts left to current-context: the same cluster twice.
    let target = ClusterTarget {
        kubeconfig: Some(env.kubeconfig.clone()),
        context: None,
    };
    let s = SnapShift::new(
        connect(&target).await.unwrap(),
        connect(&target).await.unwrap(),
        opts(),
    );
    let report = s.migrate(&MigrationRequest::for_pvc("apps", "db")).await;
    match &report.result {
        Err(e @ Error::InvalidInput { reason, .. }) => {
            assert!(
                reason.contains("same cluster") && reason.contains("namespace apps"),
                "{e}"
            );
            assert_eq!(e.kind(), ErrorKind::Config);
        }
        other => panic!("{other:?}"),
    }
    assert!(writes(&env.east).is_empty(), "{:?}", writes(&env.east));
    assert!(env.backend.handles().is_empty(), "no snapshot was cut");

    // The same cluster into another namespace is a legitimate move.
    env.east.seed_namespace("dr").unwrap();
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    assert!(
        matches!(report.result, Ok(Outcome::Migrated { .. })),
        "{:?}",
        report.result
    );
    let moved = env
        .east
        .get(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
        .unwrap();
    assert_eq!(moved["status"]["readyToUse"], true);
}

#[tokio::test]
async fn a_malformed_selector_is_a_config_error_naming_it() {
    let env = env().await;
    let s = shift(&env, opts()).await;
    let err = s.pvcs_matching("apps", "app in (db").await.unwrap_err();
    match &err {
        Error::InvalidInput { what, .. } => assert!(what.contains("app in (db"), "{err}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Config);

    // verify puts its inputs into request paths too: they are checked first.
    let before = env.west.requests().len();
    for (ns, names) in [("../kube-system", vec![]), ("dr", vec!["a/b".to_string()])] {
        assert!(
            matches!(s.verify(ns, &names).await, Err(Error::InvalidInput { .. })),
            "{ns} {names:?}"
        );
    }
    assert_eq!(env.west.requests().len(), before);
}

#[tokio::test]
async fn a_destination_without_the_snapshot_api_is_named_as_such() {
    let env = env().await;
    let bare = FakeKube::builder()
        .backend(env.backend.clone())
        .without_snapshot_api()
        .start()
        .await
        .unwrap();
    bare.seed_namespace("apps").unwrap();
    bare.seed_csidriver("hostpath.csi.k8s.io").unwrap();
    let path = env.kubeconfig.with_file_name("bare.yaml");
    std::fs::write(
        &path,
        fake_kube::kubeconfig_yaml(&[(&env.east, "east"), (&bare, "bare")], "east"),
    )
    .unwrap();
    let target = |ctx: &str| ClusterTarget {
        kubeconfig: Some(path.clone()),
        context: Some(ctx.to_string()),
    };
    let s = SnapShift::new(
        connect(&target("east")).await.unwrap(),
        connect(&target("bare")).await.unwrap(),
        opts(),
    );
    for class in [None, Some("csi-snapclass")] {
        let mut req = MigrationRequest::for_pvc("apps", "db");
        req.snapshot_class = class.map(str::to_string);
        match s.migrate(&req).await.result {
            Err(e @ Error::Preflight { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("snapshot.storage.k8s.io/v1 API is not served")
                        && msg.contains("install the external-snapshotter CRDs"),
                    "{msg}"
                );
            }
            other => panic!("{class:?}: {other:?}"),
        }
    }
    assert!(env.backend.handles().is_empty(), "no snapshot was cut");
}

/// Requests cancellation as soon as a migration starts waiting for the destination snapshot.
struct CancelWhileWaiting(tokio::sync::watch::Sender<bool>);

impl Progress for CancelWhileWaiting {
    fn stage(&self, _item: &str, stage: &Stage) {
        if matches!(stage, Stage::WaitingDestination(_)) {
            let _ = self.0.send(true);
        }
    }
}

#[tokio::test]
async fn cancelling_stops_the_wait_and_removes_what_the_run_created() {
    let env = env().await;
    env.west.faults().set_never_ready(true);
    let (tx, rx) = tokio::sync::watch::channel(false);
    // A long timeout: only the cancellation can end this wait quickly.
    let mut o = opts();
    o.timeout = Duration::from_secs(120);
    let s = shift(&env, o)
        .await
        .with_progress(Arc::new(CancelWhileWaiting(tx)))
        .with_cancel(rx);
    let reqs = [
        to_dr(MigrationRequest::for_pvc("apps", "db")),
        to_dr(MigrationRequest::for_pvc("apps", "web")),
    ];
    let started = std::time::Instant::now();
    let reports = s.migrate_all(&reqs, 1).await;
    assert!(started.elapsed() < Duration::from_secs(60));
    for r in &reports {
        match &r.result {
            Err(e @ Error::Cancelled) => assert_eq!(e.kind(), ErrorKind::Cancelled),
            other => panic!("{}: {other:?}", r.item),
        }
    }
    assert_eq!(
        reports[0].removed,
        [
            "VolumeSnapshot dr/db-snapshift",
            "VolumeSnapshotContent snapshift-dr.db-snapshift"
        ]
    );
    // The second item never started: nothing cut, nothing created.
    assert!(reports[1].removed.is_empty() && reports[1].kept.is_empty());
    assert!(
        env.east
            .get(SNAP, "VolumeSnapshot", "apps", "web-snapshift")
            .is_none()
    );
    assert!(env.west.list(SNAP, "VolumeSnapshot").is_empty());
    assert!(env.west.list(SNAP, "VolumeSnapshotContent").is_empty());
    assert_eq!(
        env.backend.handles().len(),
        1,
        "the storage snapshot is never removed"
    );
}

#[tokio::test]
async fn a_failed_cleanup_reports_what_was_left_and_why() {
    let env = env().await;
    env.west.faults().set_never_ready(true);
    env.west.faults().add_http(
        HttpFault::status(403, 1)
            .method("DELETE")
            .path_contains("/volumesnapshots/"),
    );
    let mut o = opts();
    o.timeout = Duration::from_millis(800);
    let s = shift(&env, o).await;
    let report = s
        .migrate(&to_dr(MigrationRequest::for_pvc("apps", "db")))
        .await;
    assert!(
        matches!(report.result, Err(Error::Timeout { .. })),
        "{:?}",
        report.result
    );
    assert!(report.removed.is_empty(), "{:?}", report.removed);
    assert_eq!(report.kept.len(), 2, "{:?}", report.kept);
    assert!(
        report.kept[0].starts_with("VolumeSnapshot dr/db-snapshift (delete failed: ")
            && report.kept[0].contains("HTTP 403"),
        "{:?}",
        report.kept
    );
    assert_eq!(
        report.kept[1],
        "VolumeSnapshotContent snapshift-dr.db-snapshift (its VolumeSnapshot could not be removed)"
    );
    assert_eq!(env.west.list(SNAP, "VolumeSnapshot").len(), 1);
    assert_eq!(env.west.list(SNAP, "VolumeSnapshotContent").len(), 1);
}

#[tokio::test]
async fn an_object_still_being_deleted_is_reported_not_reused() {
    let env = env().await;
    let s = shift(&env, opts()).await;
    let req = to_dr(MigrationRequest::for_pvc("apps", "db"));
    assert!(s.migrate(&req).await.result.is_ok());
    // Someone deletes the moved snapshot; a finalizer holds it.
    env.west
        .merge_patch(
            SNAP,
            "VolumeSnapshot",
            "dr",
            "db-snapshift",
            &json!({"metadata": {"finalizers": ["example.com/hold"]}}),
        )
        .unwrap();
    env.west
        .delete(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
        .unwrap();
    let before = writes(&env.west).len();
    let report = s.migrate(&req).await;
    match &report.result {
        Err(
            e @ Error::Terminating {
                cluster,
                kind,
                object,
                finalizers,
            },
        ) => {
            assert_eq!(
                (cluster.as_str(), *kind, object.as_str()),
                ("west", "VolumeSnapshot", "dr/db-snapshift")
            );
            assert_eq!(finalizers, "example.com/hold");
            assert_eq!(e.kind(), ErrorKind::Transient);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(writes(&env.west).len(), before, "nothing written");

    // Once it is gone, the kept content is still bound to the old snapshot's uid: a dry run
    // says it would be re-bound, and a re-run re-creates just the snapshot, which binds.
    env.west
        .merge_patch(
            SNAP,
            "VolumeSnapshot",
            "dr",
            "db-snapshift",
            &json!({"metadata": {"finalizers": null}}),
        )
        .unwrap();
    let mut dry = opts();
    dry.dry_run = true;
    let planned = match shift(&env, dry).await.migrate(&req).await.result {
        Ok(Outcome::DryRun(objects)) => objects,
        other => panic!("{other:?}"),
    };
    let actions: Vec<(&str, PlannedAction)> = planned.iter().map(|o| (o.kind, o.action)).collect();
    assert_eq!(
        actions,
        [
            ("VolumeSnapshot", PlannedAction::Exists),
            ("VolumeSnapshotContent", PlannedAction::Rebind),
            ("VolumeSnapshot", PlannedAction::Create),
        ]
    );
    let report = s.migrate(&req).await;
    match report.result {
        Ok(Outcome::Migrated { created }) => {
            assert_eq!(created, ["VolumeSnapshot dr/db-snapshift"])
        }
        other => panic!("{other:?}"),
    }
    let moved = env
        .west
        .get(SNAP, "VolumeSnapshot", "dr", "db-snapshift")
        .unwrap();
    assert_eq!(moved["status"]["readyToUse"], true);
    let content = env
        .west
        .get(
            SNAP,
            "VolumeSnapshotContent",
            "",
            "snapshift-dr.db-snapshift",
        )
        .unwrap();
    assert_eq!(
        content["spec"]["volumeSnapshotRef"]["uid"],
        moved["metadata"]["uid"]
    );

    // The origin snapshot being deleted is refused the same way, before anything is written.
    env.east
        .merge_patch(
            SNAP,
            "VolumeSnapshot",
            "apps",
            "db-snapshift",
            &json!({"metadata": {"finalizers": ["example.com/hold"]}}),
        )
        .unwrap();
    env.east
        .delete(SNAP, "VolumeSnapshot", "apps", "db-snapshift")
        .unwrap();
    let report = s.migrate(&req).await;
    assert!(
        matches!(&report.result, Err(Error::Terminating { cluster, .. }) if cluster == "east"),
        "{:?}",
        report.result
    );
}
