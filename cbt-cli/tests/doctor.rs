//! `cbt doctor` through the real binary against the fake cluster (human lines, one JSON
//! document, exit 0 or 5), and the proof that `ORCHESTRATOR_PERMISSIONS` is what backup and
//! restore really use: the flows run end to end as a user holding exactly those permissions
//! (Roles built from the list), nothing is denied, and every required entry was exercised.
//! The per-check scenarios live in `cbt-k8s/tests/doctor.rs`.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use cbt_csi::server::RunningServer;
use cbt_k8s::pvc_backup::permissions::{Need, Scope};
use cbt_k8s::pvc_backup::{MOVER_PERMISSION, ORCHESTRATOR_PERMISSIONS, rbac_objects};
use cbt_store::testing::S3TestServer;
use fake_kube::crds::upstream;
use fake_kube::rbac::{Policy, UserInfo};
use fake_kube::{FakeKube, SharedBackend};
use serde_json::{Value, json};
use support::DRIVER;

const NS: &str = "db";
const AUDIENCE: &str = "cbt-doctor-cli";
const IMAGE: &str = "registry.example/cbt:doctor";
const PLUGIN_IMAGE: &str = "registry.k8s.io/sig-storage/hostpathplugin:v1.17.0";
const OPERATOR: &str = "backup-operator";
const OPERATOR_TOKEN: &str = "backup-operator-token";

struct Env {
    t: tempfile::TempDir,
    kube: FakeKube,
    s3: S3TestServer,
    _sidecar: RunningServer,
    admin: PathBuf,
    operator: PathBuf,
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..400 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

impl Env {
    /// A healthy cluster whose SnapshotMetadataService names the sidecar by `address`
    /// (`None`: the Service DNS name the fixture certificate carries, reached through the
    /// Service's EndpointSlice; `Some("localhost")`: directly, as the mover pods need here).
    async fn start(service_address: bool) -> Self {
        let t = tempfile::tempdir().unwrap();
        let backend = SharedBackend::with_data_dir(t.path().join("array")).unwrap();
        let kube = FakeKube::builder()
            .driver(DRIVER)
            .backend(backend)
            .image(IMAGE, env!("CARGO_BIN_EXE_cbt"))
            .image(PLUGIN_IMAGE, "/usr/bin/sleep")
            .user(OPERATOR_TOKEN, UserInfo::new(OPERATOR, &[]))
            .start()
            .await
            .unwrap();
        kube.seed_standard(NS).unwrap();
        kube.seed_namespace("cbt-test").unwrap();
        kube.seed_namespace("kube-system").unwrap();
        kube.install_yaml(upstream::SNAPSHOT_METADATA_SERVICES)
            .unwrap();
        kube.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "cbt-mover", "namespace": NS}}))
            .unwrap();
        let admin = t.path().join("admin");
        kube.write_kubeconfig(&admin, "fake").unwrap();
        let operator = t.path().join("operator");
        kube.write_kubeconfig_as(&operator, "fake", OPERATOR_TOKEN)
            .unwrap();

        let s3 = support::s3_server().await;
        support::create_s3_secret(&kube, &s3, NS, "s3-creds");
        kube.create(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "bad-creds", "namespace": NS},
            "stringData": {"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "wrong"}}))
            .unwrap();

        let sidecar = support::start_sidecar(&kube, &admin, AUDIENCE).await;
        let port = sidecar.local_addr().unwrap().port();

        // The driver's pod with the sidecar, its Service and the slice the endpoint-slice
        // controller would write (loopback, where the in-process sidecar listens).
        wait_for("the default ServiceAccount", || {
            kube.get("v1", "ServiceAccount", "cbt-test", "default")
                .is_some()
        })
        .await;
        kube.create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "csi-hostpathplugin-0", "namespace": "cbt-test",
                         "labels": {"app": "csi-hostpathplugin"}},
            "spec": {"containers": [
                {"name": "hostpath", "image": PLUGIN_IMAGE, "args": ["3600"]},
                {"name": "csi-snapshot-metadata", "image": "registry.k8s.io/sig-storage/csi-snapshot-metadata:v1.1.0"}]}}))
            .unwrap();
        wait_for("the default ServiceAccount", || {
            kube.get("v1", "ServiceAccount", "kube-system", "default")
                .is_some()
        })
        .await;
        kube.create(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "snapshot-controller-0", "namespace": "kube-system",
                         "labels": {"app": "snapshot-controller"}},
            "spec": {"containers": [{"name": "snapshot-controller", "image": PLUGIN_IMAGE, "args": ["3600"]}]}}))
            .unwrap();
        kube.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "snapshot-metadata", "namespace": "cbt-test"},
            "spec": {"selector": {"app": "csi-hostpathplugin"}, "ports": [{"port": 6443, "targetPort": 50051}]}}))
            .unwrap();
        kube.create(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "snapshot-metadata-1", "namespace": "cbt-test",
                         "labels": {"kubernetes.io/service-name": "snapshot-metadata"}},
            "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"]}],
            "ports": [{"port": port}]}),
        )
        .unwrap();
        let address = if service_address {
            "snapshot-metadata.cbt-test.svc:6443".to_string()
        } else {
            format!("localhost:{port}")
        };
        let ca = std::fs::read(support::csi_fixture("ca.pem")).unwrap();
        kube.create(json!({
            "apiVersion": "cbt.storage.k8s.io/v1beta1", "kind": "SnapshotMetadataService",
            "metadata": {"name": DRIVER},
            "spec": {"address": address, "audience": AUDIENCE,
                     "caCert": serde_json::to_value(k8s_openapi::ByteString(ca)).unwrap()},
        }))
        .unwrap();
        for (ns, pod) in [
            ("cbt-test", "csi-hostpathplugin-0"),
            ("kube-system", "snapshot-controller-0"),
        ] {
            wait_for(pod, || {
                kube.get("v1", "Pod", ns, pod)
                    .is_some_and(|p| p["status"]["phase"] == "Running")
            })
            .await;
        }
        Env {
            t,
            kube,
            s3,
            _sidecar: sidecar,
            admin,
            operator,
        }
    }

    async fn cbt(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cbt"));
        cmd.args([
            "--repo",
            "s3://backups/cluster-a",
            "--s3-endpoint",
            &self.s3.endpoint(),
        ]);
        cmd.args(args);
        cmd.env_remove("CBT_REPO").env_remove("KUBECONFIG");
        for (k, v) in self.s3.env() {
            cmd.env(k, v);
        }
        cmd.output().await.unwrap()
    }

    async fn ok(&self, args: &[&str]) -> Value {
        support::succeeded(&format!("cbt {args:?}"), &self.cbt(args).await)
    }

    /// A block PVC with data and a ready VolumeSnapshot `snap` of it.
    async fn snapshot(&self) {
        self.kube
            .seed_pvc(
                NS,
                "data",
                "8Mi",
                "Block",
                &["ReadWriteOnce"],
                &[("app", "pg")],
            )
            .unwrap();
        let file = self.kube.pvc_backing_file(NS, "data").unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&[7u8; 100_000], 1 << 20).unwrap();
        self.kube
            .create(
                json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                "metadata": {"name": "snap", "namespace": NS},
                "spec": {"source": {"persistentVolumeClaimName": "data"}}}),
            )
            .unwrap();
        wait_for("the snapshot", || {
            self.kube
                .get("snapshot.storage.k8s.io/v1", "VolumeSnapshot", NS, "snap")
                .is_some_and(|v| v["status"]["readyToUse"] == true)
        })
        .await;
    }
}

fn statuses(doc: &Value) -> Vec<(String, String)> {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_prints_one_line_per_check_and_exits_5_when_cbt_cannot_work() {
    let env = Env::start(true).await;
    env.snapshot().await;
    let kc = env.admin.to_str().unwrap();
    let args = ["doctor", "-n", NS, "--kubeconfig", kc, "--snapshot", "snap"];

    let doc = env.ok(&[&["-o", "json"][..], &args[..]].concat()).await;
    assert_eq!(doc["cbt_usable"], true, "{doc:#}");
    let all = statuses(&doc);
    assert_eq!(all.len(), 15, "{all:?}");
    assert!(all.iter().all(|(_, s)| s == "pass"), "{doc:#}");

    let out = env.cbt(&args).await;
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 16, "{text}");
    assert!(
        lines[..15].iter().all(|l| l.starts_with("PASS  ")),
        "{text}"
    );

    // The ODF case: the driver's SnapshotMetadataService is gone.
    env.kube
        .delete(
            "cbt.storage.k8s.io/v1beta1",
            "SnapshotMetadataService",
            "",
            DRIVER,
        )
        .unwrap();
    let out = env.cbt(&[&["-o", "json"][..], &args[..]].concat()).await;
    assert_eq!(out.status.code(), Some(5));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["cbt_usable"], false);
    let failed: Vec<String> = statuses(&doc)
        .into_iter()
        .filter(|(_, s)| s == "fail")
        .map(|(id, _)| id)
        .collect();
    assert_eq!(failed, ["metadata-service"]);
    assert!(doc.get("error").is_none(), "one document only");

    let out = env.cbt(&args).await;
    assert_eq!(out.status.code(), Some(5));
    let text = String::from_utf8(out.stdout).unwrap();
    let fail = text.lines().position(|l| l.starts_with("FAIL  ")).unwrap();
    assert!(
        text.lines()
            .nth(fail + 1)
            .unwrap()
            .starts_with("      fix: "),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("SKIP  ")), "{text}");
}

/// `(verb, group, resource[/sub], scope)` as the access log and the list both describe it.
type Key = (String, String, String, Scope);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_and_restore_use_exactly_the_listed_permissions() {
    let env = Env::start(false).await;
    // The operator holds exactly ORCHESTRATOR_PERMISSIONS; the mover may get VolumeSnapshots.
    let mut policy = Policy::new();
    let user = json!({"kind": "User", "name": OPERATOR});
    let sa = json!({"kind": "ServiceAccount", "name": "cbt-mover", "namespace": NS});
    for o in rbac_objects(ORCHESTRATOR_PERMISSIONS, NS, "cbt-backup", &user)
        .iter()
        .chain(rbac_objects(&[MOVER_PERMISSION], NS, "cbt-mover", &sa).iter())
    {
        policy.add_object(o).unwrap();
    }
    env.kube.set_rbac(Some(policy));
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    env.kube
        .seed_pvc(
            NS,
            "data",
            "8Mi",
            "Block",
            &["ReadWriteOnce"],
            &[("app", "pg")],
        )
        .unwrap();
    let device = env.kube.pvc_backing_file(NS, "data").unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap();
    f.write_all_at(&[1u8; 300_000], 0).unwrap();
    let kc = env.operator.to_str().unwrap();
    let kube = [
        "-n",
        NS,
        "--kubeconfig",
        kc,
        "--image",
        IMAGE,
        "--service-account",
        "cbt-mover",
    ];
    let run = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["-o", "json"].iter().map(|s| s.to_string()).collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(kube.iter().map(|s| s.to_string()));
        a
    };

    // Full by selector; incremental naming the class (retention deletes the first snapshot).
    let a = run(&["backup", "--selector", "app=pg", "--s3-secret", "s3-creds"]);
    let first = env
        .ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert_eq!(first["results"][0]["ok"], true, "{first:#}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    f.write_all_at(&[2u8; 1000], 5 << 20).unwrap();
    let a = run(&[
        "backup",
        "--pvc",
        "data",
        "--snapshot-class",
        "csi-snapclass",
        "--s3-secret",
        "s3-creds",
    ]);
    let second = env
        .ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    let report = &second["results"][0]["report"];
    assert_eq!(
        report["mover"]["metadata_call"], "GetMetadataDelta",
        "{second:#}"
    );
    assert_eq!(report["deleted_snapshots"].as_array().unwrap().len(), 1);
    // A mover that fails (wrong S3 credentials): its log tail is read, its snapshot deleted.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = run(&["backup", "--pvc", "data", "--s3-secret", "bad-creds"]);
    let out = env
        .cbt(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert!(!out.status.success());
    // Restore into a new PVC.
    let snap = report["mover"]["snapshot"].as_str().unwrap().to_string();
    let a = run(&[
        "restore",
        "--volume",
        "db.data",
        "--snapshot",
        &snap,
        "--to-pvc",
        "restored",
        "--s3-secret",
        "s3-creds",
    ]);
    env.ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .await;

    let log = env.kube.access_log();
    let mine: Vec<_> = log.iter().filter(|r| r.user == OPERATOR).collect();
    let denied: Vec<_> = mine.iter().filter(|r| !r.allowed).collect();
    assert!(
        denied.is_empty(),
        "the listed permissions are not enough: {denied:#?}"
    );
    let used: BTreeSet<Key> = mine
        .iter()
        .map(|r| {
            let a = &r.attributes;
            let scope = if a.namespace.is_empty() {
                Scope::Cluster
            } else {
                Scope::Namespace
            };
            (
                a.verb.clone(),
                a.api_group.clone(),
                a.combined_resource(),
                scope,
            )
        })
        .collect();
    let listed: BTreeSet<Key> = ORCHESTRATOR_PERMISSIONS
        .iter()
        .map(|p| {
            let resource = if p.subresource.is_empty() {
                p.resource.to_string()
            } else {
                format!("{}/{}", p.resource, p.subresource)
            };
            (p.verb.to_string(), p.group.to_string(), resource, p.scope)
        })
        .collect();
    let unlisted: Vec<&Key> = used.difference(&listed).collect();
    assert!(unlisted.is_empty(), "used but not listed: {unlisted:?}");
    // Every required entry was exercised; an optional one may not be (a snapshot ready at
    // the first look is never watched).
    let unused: Vec<&Key> = listed
        .difference(&used)
        .filter(|k| {
            ORCHESTRATOR_PERMISSIONS.iter().any(|p| {
                p.verb == k.0
                    && p.resource == k.2.split('/').next().unwrap_or("")
                    && p.need == Need::Required
            })
        })
        .collect();
    assert!(unused.is_empty(), "listed but never used: {unused:?}");
    assert!(
        used.iter().any(|k| k.2 == "pods/log"),
        "the failure path ran"
    );

    // Doctor, run as that least-privilege operator, finds its RBAC complete; what it may not
    // look at is a warning, so CBT is usable (exit 0).
    let doc = env
        .ok(&["-o", "json", "doctor", "-n", NS, "--kubeconfig", kc])
        .await;
    let all = statuses(&doc);
    assert!(
        all.contains(&("orchestrator-rbac".into(), "pass".into())),
        "{doc:#}"
    );
    assert!(
        all.contains(&("mover-access".into(), "warn".into())),
        "{doc:#}"
    );
    assert_eq!(doc["cbt_usable"], true);
    drop(env.t);
}
