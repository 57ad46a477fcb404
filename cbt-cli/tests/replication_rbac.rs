//! `cbt replication status|promote|demote|resync` under exactly the RBAC of
//! `examples/replication/cli-rbac.yaml`: the CLI authenticates as a member of the group the
//! example binds, against fake-kube with the real CRDs and the controller running (as an
//! administrator: its own rights are proved by `cbt-k8s/tests/replication_rbac.rs`).
//!
//! Proves the manifest complete (no request of any subcommand is denied), minimal (every granted
//! verb is used), and that a user missing one of those verbs gets exit class `config` with the
//! `kubectl auth can-i` line to check, and nothing changed.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cbt_core::exit::ExitClass;
use cbt_k8s::replication::controller::testing::Running;
use fake_kube::FakeKube;
use fake_kube::rbac::{Policy, UserInfo};
use serde_json::{Value, json};
use support::replication::{
    TRIDENT, VR_API, assert_exit, cbt, ontap_pvc, primary_vr, seed_trident, start_controller, text,
    until_primary,
};

const NS: &str = "app";
const OPERATOR_TOKEN: &str = "operator-token";
const LIMITED_TOKEN: &str = "limited-token";

fn cli_rbac() -> String {
    let p: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/replication/cli-rbac.yaml");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The example's role without `patch` on VolumeReplications, bound to group `limited`.
fn limited_objects() -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(&cli_rbac()).unwrap();
    let mut out = Vec::new();
    for mut d in docs.into_iter().filter(|d| !d.is_null()) {
        d["metadata"]["name"] = json!("limited");
        if d["kind"] == "ClusterRole" {
            let rules = d["rules"].as_array_mut().unwrap();
            for r in rules.iter_mut() {
                if r["resources"]
                    .as_array()
                    .unwrap()
                    .contains(&json!("volumereplications"))
                {
                    r["verbs"] = json!(["get", "list"]);
                }
            }
        } else {
            d["roleRef"]["name"] = json!("limited");
            d["subjects"][0]["name"] = json!("limited");
        }
        out.push(d);
    }
    out
}

struct Env {
    fake: FakeKube,
    _dir: tempfile::TempDir,
    operator: PathBuf,
    limited: PathBuf,
    operator_user: UserInfo,
    _controller: Running,
}

async fn env() -> Env {
    let example = Policy::from_yaml(&cli_rbac()).unwrap();
    let mut policy = example.clone();
    for o in limited_objects() {
        policy.add_object(&o).unwrap();
    }
    let operator_user = UserInfo::new("alice", &["replication-operators"]);
    let fake = FakeKube::builder()
        .replication_api()
        .rbac(policy)
        .user(OPERATOR_TOKEN, operator_user.clone())
        .user(LIMITED_TOKEN, UserInfo::new("bob", &["limited"]))
        .start()
        .await
        .unwrap();
    seed_trident(&fake, NS);
    fake.create(
        json!({"apiVersion": VR_API, "kind": "VolumeGroupReplicationClass",
        "metadata": {"name": "trident-group"}, "spec": {"provisioner": TRIDENT}}),
    )
    .unwrap();
    ontap_pvc(&fake, NS, "data", json!({}));
    ontap_pvc(&fake, NS, "pg-data", json!({"app": "pg"}));
    primary_vr(&fake, NS, "data", "svm1:trident_app_data");
    fake.create(
        json!({"apiVersion": VR_API, "kind": "VolumeGroupReplication",
        "metadata": {"name": "pg", "namespace": NS},
        "spec": {"volumeGroupReplicationClassName": "trident-group", "replicationState": "primary",
                 "source": {"selector": {"matchLabels": {"app": "pg"}}}, "autoResync": false,
                 "external": true}}),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin");
    fake.write_kubeconfig(&admin, "test").unwrap();
    let operator = dir.path().join("operator");
    fake.write_kubeconfig_as(&operator, "test", OPERATOR_TOKEN)
        .unwrap();
    let limited = dir.path().join("limited");
    fake.write_kubeconfig_as(&limited, "test", LIMITED_TOKEN)
        .unwrap();
    let controller = start_controller(&admin).await;
    Env {
        fake,
        _dir: dir,
        operator,
        limited,
        operator_user,
        _controller: controller,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_works_with_exactly_the_example_rbac() {
    let e = env().await;
    until_primary(&e.fake, NS, "VolumeReplication", "data").await;
    until_primary(&e.fake, NS, "VolumeGroupReplication", "pg").await;
    let runs: [&[&str]; 5] = [
        &["replication", "status", "-n", NS],
        &["replication", "demote", "data", "-n", NS, "--timeout", "20"],
        &["replication", "resync", "data", "-n", NS, "--timeout", "20"],
        &[
            "replication",
            "promote",
            "data",
            "-n",
            NS,
            "--timeout",
            "20",
        ],
        &["replication", "promote", "pg", "-n", NS, "--timeout", "20"],
    ];
    for args in runs {
        let out = cbt(&e.operator, args).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let denied = e.fake.denied();
    assert!(
        denied.is_empty(),
        "cli-rbac.yaml does not grant: {denied:#?}"
    );
    let used: BTreeSet<(String, String, String)> = e
        .fake
        .access_log()
        .into_iter()
        .filter(|r| r.user == e.operator_user.name)
        .map(|r| {
            (
                r.attributes.api_group.clone(),
                r.attributes.combined_resource(),
                r.attributes.verb.clone(),
            )
        })
        .collect();
    let example = Policy::from_yaml(&cli_rbac()).unwrap();
    assert!(!example.has_wildcards());
    let example = example.grants();
    let unused: Vec<_> = example.difference(&used).collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
    assert_eq!(used, example);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_verb_is_a_config_error_naming_the_permission() {
    let e = env().await;
    until_primary(&e.fake, NS, "VolumeReplication", "data").await;
    // Reading is granted: status works.
    let out = cbt(&e.limited, &["replication", "status", "-n", NS]).await;
    assert!(out.status.success(), "{}", text(&out));
    let before = e.fake.get(VR_API, "VolumeReplication", NS, "data").unwrap();
    let out = cbt(
        &e.limited,
        &["replication", "demote", "data", "-n", NS, "--timeout", "5"],
    )
    .await;
    assert_exit(&out, ExitClass::Config);
    let t = text(&out);
    assert!(t.contains("Permission denied"), "{t}");
    assert!(
        t.contains("auth can-i patch volumereplications.replication.storage.openshift.io"),
        "{t}"
    );
    let after = e.fake.get(VR_API, "VolumeReplication", NS, "data").unwrap();
    assert_eq!(before["spec"], after["spec"]);
}
