//! The simulated group snapshot controller through kube::Client: members cut at one instant
//! with the volumes' bytes, the upstream object shapes, deletion cascading, faults, and the
//! CRDs' validation.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::time::Duration;

use fake_kube::{FakeKube, SharedBackend};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

const NS: &str = "db";
const DRIVER: &str = "hostpath.csi.k8s.io";
const MIB: u64 = 1 << 20;

fn ar(group: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural)
}

fn vgs_ar() -> ApiResource {
    ar(
        "groupsnapshot.storage.k8s.io",
        "VolumeGroupSnapshot",
        "volumegroupsnapshots",
    )
}

fn vgsc_ar() -> ApiResource {
    ar(
        "groupsnapshot.storage.k8s.io",
        "VolumeGroupSnapshotContent",
        "volumegroupsnapshotcontents",
    )
}

fn vs_ar() -> ApiResource {
    ar(
        "snapshot.storage.k8s.io",
        "VolumeSnapshot",
        "volumesnapshots",
    )
}

fn vsc_ar() -> ApiResource {
    ar(
        "snapshot.storage.k8s.io",
        "VolumeSnapshotContent",
        "volumesnapshotcontents",
    )
}

async fn client_for(server: &FakeKube) -> kube::Client {
    let kc = Kubeconfig::from_yaml(&server.kubeconfig_yaml("fake")).unwrap();
    let opts = KubeConfigOptions {
        context: Some("fake".into()),
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .unwrap();
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

fn group(name: &str, selector: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "groupsnapshot.storage.k8s.io/v1", "kind": "VolumeGroupSnapshot",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"source": {"selector": selector}},
    }))
    .unwrap()
}

/// Waits until `check` holds for the object's JSON, or panics with its last state.
async fn wait(api: &Api<DynamicObject>, name: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        if let Some(o) = api.get_opt(name).await.unwrap() {
            last = serde_json::to_value(&o).unwrap();
            if check(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never reached the state: {last:#}");
}

async fn cluster(data: &std::path::Path) -> FakeKube {
    let backend = SharedBackend::with_data_dir(data).unwrap();
    let k = FakeKube::builder()
        .driver(DRIVER)
        .backend(backend)
        .group_snapshot_api()
        .start()
        .await
        .unwrap();
    k.seed_standard(NS).unwrap();
    k
}

#[tokio::test]
async fn a_group_cuts_every_selected_volume_at_one_instant_and_goes_with_its_members() {
    let t = tempfile::tempdir().unwrap();
    let k = cluster(t.path()).await;
    k.seed_group_snapshot_class("csi-group", DRIVER, true)
        .unwrap();
    let mut at_cut = Vec::new();
    for (i, name) in ["data", "wal", "conf"].iter().enumerate() {
        k.seed_pvc(
            NS,
            name,
            "4Mi",
            "Block",
            &["ReadWriteOnce"],
            &[("app", "pg")],
        )
        .unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(k.pvc_backing_file(NS, name).unwrap())
            .unwrap();
        f.write_all_at(&vec![i as u8 + 1; 70_000], i as u64 * MIB)
            .unwrap();
    }
    k.seed_pvc(NS, "other", "4Mi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();
    for name in ["data", "wal", "conf"] {
        at_cut.push((
            name,
            std::fs::read(k.pvc_backing_file(NS, name).unwrap()).unwrap(),
        ));
    }

    let client = client_for(&k).await;
    let groups: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vgs_ar());
    let created = groups
        .create(
            &PostParams::default(),
            &group("nightly", json!({"matchLabels": {"app": "pg"}})),
        )
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let vgs = wait(&groups, "nightly", |o| o["status"]["readyToUse"] == true).await;
    assert_eq!(vgs["spec"]["volumeGroupSnapshotClassName"], "csi-group");
    let content_name = vgs["status"]["boundVolumeGroupSnapshotContentName"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(content_name, format!("groupsnapcontent-{uid}"));
    assert!(vgs["status"]["creationTime"].is_string());

    // The content lists each volume with its snapshot, and points back at the group.
    let contents: Api<DynamicObject> = Api::all_with(client.clone(), &vgsc_ar());
    let content = serde_json::to_value(contents.get(&content_name).await.unwrap()).unwrap();
    assert_eq!(
        content["spec"]["volumeGroupSnapshotRef"]["uid"],
        uid.as_str()
    );
    assert_eq!(content["spec"]["deletionPolicy"], "Delete");
    assert_eq!(content["spec"]["driver"], DRIVER);
    let infos = content["status"]["volumeSnapshotInfoList"]
        .as_array()
        .unwrap();
    assert_eq!(infos.len(), 3);
    assert_eq!(
        content["spec"]["source"]["volumeHandles"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let cut_times: Vec<&Value> = infos.iter().map(|i| &i["creationTime"]).collect();
    assert!(
        cut_times.iter().all(|t| *t == cut_times[0]),
        "one instant: {cut_times:?}"
    );

    // One member per selected claim, shaped as the upstream controller makes them.
    let vss: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vs_ar());
    let vscs: Api<DynamicObject> = Api::all_with(client.clone(), &vsc_ar());
    let members = vss.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(members.len(), 3);
    for m in &members {
        let m = serde_json::to_value(m).unwrap();
        let name = m["metadata"]["name"].as_str().unwrap();
        assert!(
            name.starts_with("snapshot-") && name.len() == 9 + 64,
            "{name}"
        );
        assert_eq!(m["metadata"]["ownerReferences"][0]["uid"], uid.as_str());
        assert_eq!(
            m["metadata"]["ownerReferences"][0]["kind"],
            "VolumeGroupSnapshot"
        );
        assert_eq!(
            m["metadata"]["finalizers"][0],
            "snapshot.storage.kubernetes.io/volumesnapshot-in-group-protection"
        );
        assert_eq!(m["status"]["volumeGroupSnapshotName"], "nightly");
        assert_eq!(m["status"]["readyToUse"], true);
        let pvc = m["spec"]["source"]["persistentVolumeClaimName"]
            .as_str()
            .unwrap();
        let vsc = serde_json::to_value(
            vscs.get(
                m["status"]["boundVolumeSnapshotContentName"]
                    .as_str()
                    .unwrap(),
            )
            .await
            .unwrap(),
        )
        .unwrap();
        let handle = vsc["status"]["snapshotHandle"].as_str().unwrap();
        let volume = vsc["spec"]["source"]["volumeHandle"].as_str().unwrap();
        assert!(
            infos
                .iter()
                .any(|i| i["snapshotHandle"] == handle && i["volumeHandle"] == volume),
            "{vsc:#}"
        );
        assert_eq!(
            vsc["status"]["volumeGroupSnapshotHandle"],
            format!("groupsnap-{uid}")
        );
        assert_eq!(vsc["spec"]["volumeSnapshotRef"]["name"], name);
        // The member's bytes are the claim's at the cut.
        let expected = &at_cut.iter().find(|(n, _)| *n == pvc).unwrap().1;
        let image = k.volume_snapshot_file(NS, name).unwrap();
        assert_eq!(&std::fs::read(&image).unwrap(), expected, "{pvc}");
    }
    // Writes after the cut do not reach the members.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(k.pvc_backing_file(NS, "data").unwrap())
        .unwrap();
    f.write_all_at(&[9; 4096], 0).unwrap();
    let data_member = members
        .iter()
        .find(|m| m.data["spec"]["source"]["persistentVolumeClaimName"] == "data")
        .unwrap();
    let name = data_member.metadata.name.clone().unwrap();
    assert_eq!(
        std::fs::read(k.volume_snapshot_file(NS, &name).unwrap()).unwrap(),
        at_cut[0].1
    );

    // A member cannot go on its own: the in-group finalizer holds it.
    vss.delete(&name, &DeleteParams::default()).await.unwrap();
    let held = vss.get(&name).await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    assert_eq!(k.backend().handles().len(), 3);

    // Deleting the group takes the members, their contents and the backend snapshots along.
    groups
        .delete("nightly", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        vss.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        vscs.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(contents.get_opt(&content_name).await.unwrap().is_none());
    assert!(k.backend().handles().is_empty());
    let left = std::fs::read_dir(k.snapshots_dir().unwrap())
        .unwrap()
        .count();
    assert_eq!(left, 0, "snapshot files left");
}

#[tokio::test]
async fn group_failures_and_faults_show_in_the_status() {
    let t = tempfile::tempdir().unwrap();
    let k = cluster(t.path()).await;
    k.seed_pvc(
        NS,
        "data",
        "4Mi",
        "Block",
        &["ReadWriteOnce"],
        &[("app", "pg")],
    )
    .unwrap();
    let client = client_for(&k).await;
    let groups: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vgs_ar());
    let vss: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &vs_ar());
    let pp = PostParams::default();
    let errored = |o: &Value| o["status"]["error"]["message"].is_string();

    // No default group class for the driver.
    groups
        .create(
            &pp,
            &group("noclass", json!({"matchLabels": {"app": "pg"}})),
        )
        .await
        .unwrap();
    let o = wait(&groups, "noclass", errored).await;
    assert_eq!(
        o["status"]["error"]["message"],
        "cannot find default group snapshot class"
    );
    assert_eq!(o["status"]["readyToUse"], false);

    k.seed_group_snapshot_class("csi-group", DRIVER, true)
        .unwrap();
    // A selector matching nothing.
    groups
        .create(
            &pp,
            &group("empty", json!({"matchLabels": {"app": "nope"}})),
        )
        .await
        .unwrap();
    let o = wait(&groups, "empty", errored).await;
    assert_eq!(
        o["status"]["error"]["message"],
        "label selector app=nope for group snapshot not applied to any PVC"
    );

    // The driver failing: the message, and nothing cut.
    k.faults().set_snapshot_error(Some("array busy"));
    groups
        .create(
            &pp,
            &group(
                "busy",
                json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["pg"]}]}),
            ),
        )
        .await
        .unwrap();
    let o = wait(&groups, "busy", errored).await;
    assert!(
        o["status"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("array busy"),
        "{o:#}"
    );
    assert!(
        vss.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(k.backend().handles().is_empty());
    k.faults().set_snapshot_error(None);

    // Never ready until healed: the group, its content and its members follow.
    k.faults().set_never_ready(true);
    groups
        .create(&pp, &group("slow", json!({"matchLabels": {"app": "pg"}})))
        .await
        .unwrap();
    let o = wait(&groups, "slow", |o| {
        o["status"]["boundVolumeGroupSnapshotContentName"].is_string()
    })
    .await;
    assert_eq!(o["status"]["readyToUse"], false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        groups.get("slow").await.unwrap().data["status"]["readyToUse"],
        false
    );
    let member = vss.list(&ListParams::default()).await.unwrap().items[0]
        .metadata
        .name
        .clone()
        .unwrap();
    assert_eq!(
        vss.get(&member).await.unwrap().data["status"]["readyToUse"],
        false
    );
    k.faults().set_never_ready(false);
    wait(&groups, "slow", |o| o["status"]["readyToUse"] == true).await;
    let m = wait(&vss, &member, |o| o["status"]["readyToUse"] == true).await;
    assert_eq!(m["status"]["volumeGroupSnapshotName"], "slow");

    // The CRDs' rules: exactly one source, no empty class name, an immutable source.
    let mut both = group("both", json!({"matchLabels": {"app": "pg"}}));
    both.data["spec"]["source"]["volumeGroupSnapshotContentName"] = json!("c");
    let err = groups.create(&pp, &both).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "{err}"
    );
    let mut empty_class = group("emptyclass", json!({"matchLabels": {"app": "pg"}}));
    empty_class.data["spec"]["volumeGroupSnapshotClassName"] = json!("");
    let err = groups.create(&pp, &empty_class).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "{err}"
    );
    let mut changed = groups.get("slow").await.unwrap();
    changed.data["spec"]["source"]["selector"] = json!({"matchLabels": {"app": "other"}});
    let err = groups.replace("slow", &pp, &changed).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "{err}"
    );
}

#[tokio::test]
async fn without_the_group_api_its_paths_are_not_found() {
    let k = FakeKube::builder().start().await.unwrap();
    k.seed_standard(NS).unwrap();
    let client = client_for(&k).await;
    let groups: Api<DynamicObject> = Api::namespaced_with(client, NS, &vgs_ar());
    let err = groups.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404),
        "{err}"
    );
}
