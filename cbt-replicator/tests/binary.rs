//! The `cbt-replicator` binary against fake-kube: `crds` output installs; `run` serves a
//! VolumeReplication end to end, exposes /metrics and /healthz, elects one leader among two
//! replicas (only it writes; the other takes over when it dies), and releases the Lease on
//! SIGTERM.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fake_kube::FakeKube;
use fake_kube::rbac::UserInfo;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_cbt-replicator");
const NS: &str = "app";
const VR_API: &str = "replication.storage.openshift.io/v1alpha1";

#[test]
fn crds_prints_installable_definitions_and_can_skip_csi_addons() {
    let out = Command::new(BIN).arg("crds").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("--csi-addons-installed"));
    assert!(text.contains("name: volumereplications.replication.storage.openshift.io"));
    assert!(!text.contains("name: tridentmirrorrelationships.trident.netapp.io"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let fake = FakeKube::builder().start().await.unwrap();
        let created = fake.install_yaml(&text).unwrap();
        assert_eq!(created.len(), 5);
    });
    let out = Command::new(BIN)
        .args(["crds", "--csi-addons-installed", "--backends"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("name: volumereplications.replication.storage.openshift.io"));
    assert!(text.contains("name: tridentmirrorrelationships.trident.netapp.io"));
    assert!(text.contains("name: dellcsireplicationgroups.replication.storage.dell.com"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

struct Replica {
    child: Child,
    port: u16,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(kubeconfig: &Path, identity: &str) -> Replica {
    let port = free_port();
    let child = Command::new(BIN)
        .args([
            "run",
            "--lease-namespace",
            NS,
            "--lease-seconds",
            "2",
            "--identity",
            identity,
        ])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Replica { child, port }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn seed(fake: &FakeKube) {
    fake.seed_namespace(NS).unwrap();
    fake.seed_storage_class("ontap", "csi.trident.netapp.io", false)
        .unwrap();
    fake.create(
        json!({"apiVersion": VR_API, "kind": "VolumeReplicationClass",
        "metadata": {"name": "trident"}, "spec": {"provisioner": "csi.trident.netapp.io"}}),
    )
    .unwrap();
}

fn volume(fake: &FakeKube, name: &str) {
    fake.create(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "ontap",
                 "resources": {"requests": {"storage": "1Gi"}}}}))
        .unwrap();
    fake.create(json!({"apiVersion": VR_API, "kind": "VolumeReplication",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"volumeReplicationClass": "trident", "replicationState": "primary",
                 "dataSource": {"kind": "PersistentVolumeClaim", "name": name},
                 "autoResync": false, "replicationHandle": ""}}))
        .unwrap();
}

fn primary(fake: &FakeKube, name: &str) -> bool {
    fake.get(VR_API, "VolumeReplication", NS, name)
        .is_some_and(|v: Value| {
            v["status"]["state"] == "Primary"
                && v["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Completed" && c["status"] == "True")
        })
}

fn holder(fake: &FakeKube) -> Option<String> {
    fake.get("coordination.k8s.io/v1", "Lease", NS, "cbt-replicator")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_serves_metrics_and_fails_over() {
    let fake = FakeKube::builder()
        .replication_api()
        .user("token-a", UserInfo::new("replica-a", &[]))
        .user("token-b", UserInfo::new("replica-b", &[]))
        .start()
        .await
        .unwrap();
    seed(&fake);
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for (token, id) in [("token-a", "replica-a"), ("token-b", "replica-b")] {
        let path = dir.path().join(id);
        fake.write_kubeconfig_as(&path, "test", token).unwrap();
        replicas.push((id, spawn(&path, id)));
    }
    until("a leader", || holder(&fake).is_some()).await;
    volume(&fake, "data");
    until("served", || primary(&fake, "data")).await;
    let leader = holder(&fake).unwrap();
    let writers: std::collections::BTreeSet<String> = fake
        .access_log()
        .into_iter()
        .filter(|r| {
            matches!(
                r.attributes.verb.as_str(),
                "create" | "update" | "patch" | "delete"
            ) && r.attributes.resource != "leases"
                && r.user.starts_with("replica-")
        })
        .map(|r| r.user)
        .collect();
    assert_eq!(
        writers.into_iter().collect::<Vec<_>>(),
        vec![leader.clone()]
    );

    for (id, r) in &replicas {
        let (code, body) = http_get(r.port, "/healthz").unwrap();
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        let (code, mut metrics) = http_get(r.port, "/metrics").unwrap();
        assert_eq!(code, 200);
        // Counters move when a reconcile returns, just after its status write.
        for _ in 0..100 {
            if metrics.contains("result=\"converged\"") || *id != leader.as_str() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            metrics = http_get(r.port, "/metrics").unwrap().1;
        }
        let leads = *id == leader.as_str();
        assert!(
            metrics.contains(&format!("cbt_replicator_leader {}", u8::from(leads))),
            "{id}: {metrics}"
        );
        if leads {
            assert!(metrics.contains("cbt_replicator_reconciles_total{kind=\"VolumeReplication\",result=\"converged\"}"), "{metrics}");
            assert!(
                metrics.contains(
                    "cbt_replicator_objects{kind=\"VolumeReplication\",state=\"Primary\"} 1"
                ),
                "{metrics}"
            );
            assert!(metrics.contains(
                "cbt_replicator_reconcile_duration_seconds_count{kind=\"VolumeReplication\"}"
            ));
        }
    }

    // The leader dies without releasing: the other takes over once the Lease expires.
    let idx = replicas.iter().position(|(id, _)| *id == leader).unwrap();
    drop(replicas.remove(idx));
    volume(&fake, "more");
    until("served by the new leader", || primary(&fake, "more")).await;
    assert_ne!(holder(&fake).unwrap(), leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_and_exits_cleanly() {
    let fake = FakeKube::builder().replication_api().start().await.unwrap();
    seed(&fake);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config");
    fake.write_kubeconfig(&path, "test").unwrap();
    let mut r = spawn(&path, "only");
    until("leader", || holder(&fake).as_deref() == Some("only")).await;
    let status = Command::new("kill")
        .args(["-TERM", &r.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut code = None;
    for _ in 0..200 {
        if let Some(s) = r.child.try_wait().unwrap() {
            code = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(code.unwrap().code(), Some(0));
    assert_eq!(holder(&fake), None);
}

#[test]
fn an_unreachable_kubeconfig_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "--no-leader-election", "--kubeconfig"])
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(cbt_core::exit::ExitClass::Config.code()))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("kubeconfig"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_crds_are_a_config_error_that_says_how_to_install_them() {
    let fake = FakeKube::builder().start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config");
    fake.write_kubeconfig(&path, "test").unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "run",
                "--no-leader-election",
                "--provisioners",
                "csi.trident.netapp.io",
            ])
            .arg("--kubeconfig")
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(cbt_core::exit::ExitClass::Config.code()))
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("volumereplications.replication.storage.openshift.io"),
        "{err}"
    );
    assert!(
        err.contains("tridentmirrorrelationships.trident.netapp.io"),
        "{err}"
    );
    assert!(!err.contains("dellcsireplicationgroups"), "{err}");
    assert!(err.contains("cbt-replicator crds"), "{err}");
}

#[test]
fn help_prints_the_toolkits_one_exit_code_table() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains(cbt_core::exit::HELP)
    );
}
