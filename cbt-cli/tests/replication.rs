//! `cbt replication status|promote|demote|resync` against fake-kube with the replication
//! controller running in-process and the simulated Trident backend.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;

use cbt_core::exit::ExitClass;
use cbt_k8s::replication::controller::testing::Running;
use fake_kube::FakeKube;
use serde_json::{Value, json};
use support::replication::{
    VR_API, assert_exit, cbt, ontap_pvc, primary_vr, seed_trident, start_controller, text,
    until_primary,
};

const NS: &str = "app";

struct Env {
    fake: FakeKube,
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    _controller: Running,
}

async fn env() -> Env {
    let fake = FakeKube::builder().replication_api().start().await.unwrap();
    seed_trident(&fake, NS);
    ontap_pvc(&fake, NS, "data", json!({}));
    primary_vr(&fake, NS, "data", "");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("config");
    fake.write_kubeconfig(&kubeconfig, "test").unwrap();
    let controller = start_controller(&kubeconfig).await;
    Env {
        fake,
        _dir: dir,
        kubeconfig,
        _controller: controller,
    }
}

async fn primary(e: &Env) {
    until_primary(&e.fake, NS, "VolumeReplication", "data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_desired_observed_backend_and_conditions() {
    let e = env().await;
    primary(&e).await;
    let out = cbt(&e.kubeconfig, &["replication", "status", "-n", NS]).await;
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    let header = table.lines().next().unwrap();
    for col in [
        "NAME",
        "DESIRED",
        "OBSERVED",
        "BACKEND",
        "LAST SYNC",
        "LAG",
        "CONDITIONS",
    ] {
        assert!(header.contains(col), "{table}");
    }
    let line = table.lines().find(|l| l.starts_with("app")).unwrap();
    for word in [
        "data",
        "primary",
        "Primary",
        "NetApp Trident",
        "completed (Promoted)",
        "healthy",
    ] {
        assert!(line.contains(word), "{word:?} missing in {line:?}");
    }
    let out = cbt(&e.kubeconfig, &["replication", "status", "-o", "json"]).await;
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let item = &doc["items"][0];
    assert_eq!(item["name"], "data");
    assert_eq!(item["observed"], "Primary");
    assert_eq!(item["backend"], "NetApp Trident");
    assert_eq!(item["current"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_waits_and_prints_the_backend_change_or_the_refusal() {
    let e = env().await;
    primary(&e).await;
    // No remote handle anywhere: the controller refuses, with what to set.
    let out = cbt(
        &e.kubeconfig,
        &["replication", "demote", "data", "-n", NS, "--timeout", "20"],
    )
    .await;
    assert_exit(&out, ExitClass::Config);
    assert!(text(&out).contains("remoteVolumeHandle"), "{}", text(&out));
    // Back to primary (nothing was written to the backend, so nothing changes there).
    let out = cbt(&e.kubeconfig, &["replication", "promote", "data", "-n", NS]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("backend: no object changed"),
        "{}",
        text(&out)
    );
    e.fake
        .merge_patch(
            VR_API,
            "VolumeReplication",
            NS,
            "data",
            &json!({"spec": {"replicationHandle": "svm1:trident_app_data"}}),
        )
        .unwrap();
    let out = cbt(
        &e.kubeconfig,
        &["replication", "demote", "data", "-n", NS, "--timeout", "20"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("primary -> secondary"), "{t}");
    assert!(
        t.contains("backend: TridentMirrorRelationship app/data: spec.state \"promoted\", status \"promoted\" -> spec.state \"reestablished\", status \"reestablished\""),
        "{t}"
    );
    let out = cbt(
        &e.kubeconfig,
        &["replication", "promote", "data", "-n", NS, "-o", "json"],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["to"], "primary");
    assert_eq!(doc["result"]["observed"], "Primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_and_timeouts_have_their_exit_codes() {
    let e = env().await;
    primary(&e).await;
    let out = cbt(&e.kubeconfig, &["replication", "promote", "nope", "-n", NS]).await;
    assert_exit(&out, ExitClass::Config);
    assert!(text(&out).contains("nope"));
    e.fake
        .merge_patch(
            VR_API,
            "VolumeReplication",
            NS,
            "data",
            &json!({"spec": {"replicationHandle": "svm1:trident_app_data"}}),
        )
        .unwrap();
    let out = cbt(&e.kubeconfig, &["replication", "demote", "data", "-n", NS]).await;
    assert!(out.status.success(), "{}", text(&out));
    // The backend stops moving: promoting cannot finish within the timeout.
    e.fake.replication().unwrap().set_trident_stuck(true);
    let out = cbt(
        &e.kubeconfig,
        &["replication", "promote", "data", "-n", NS, "--timeout", "1"],
    )
    .await;
    assert_exit(&out, ExitClass::Transient);
    assert!(text(&out).contains("timed out"), "{}", text(&out));
}
