//! Drives the fake API server with kube::Client (through a kubeconfig, over HTTP)
//! and with raw HTTP, checking the REST semantics and the simulated controllers.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fake_kube::{FakeKube, HttpFault, SharedBackend};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ar(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", kind),
        plural,
    )
}

async fn client_for(server: &FakeKube, context: &str) -> kube::Client {
    let kc = Kubeconfig::from_yaml(&server.kubeconfig_yaml(context)).unwrap();
    let opts = KubeConfigOptions {
        context: Some(context.into()),
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .unwrap();
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

fn dyn_obj(ar: &ApiResource, v: Value) -> DynamicObject {
    let mut v = v;
    v["apiVersion"] = json!(ar.api_version);
    v["kind"] = json!(ar.kind);
    serde_json::from_value(v).unwrap()
}

async fn raw(server: &FakeKube, method: &str, path: &str, ctype: &str, body: &str) -> (u16, Value) {
    let addr = server.url().trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer fake-token\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code: u16 = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn wait_ready(api: &Api<DynamicObject>, name: &str) -> DynamicObject {
    for _ in 0..200 {
        let o = api.get(name).await.unwrap();
        if o.data["status"]["readyToUse"] == json!(true) {
            return o;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never became ready");
}

#[tokio::test]
async fn dynamic_and_prebound_snapshots_across_two_clusters() {
    let backend = SharedBackend::new();
    let a = FakeKube::builder()
        .backend(backend.clone())
        .start()
        .await
        .unwrap();
    let b = FakeKube::builder()
        .backend(backend.clone())
        .start()
        .await
        .unwrap();
    a.seed_standard("apps").unwrap();
    b.seed_standard("dr").unwrap();
    a.seed_pvc(
        "apps",
        "data",
        "2Gi",
        "Block",
        &["ReadWriteOnce"],
        &[("app", "db")],
    )
    .unwrap();
    let ca = client_for(&a, "origin").await;
    let cb = client_for(&b, "dest").await;

    let vs_ar = ar("VolumeSnapshot", "volumesnapshots");
    let vsc_ar = ar("VolumeSnapshotContent", "volumesnapshotcontents");
    let vs_a: Api<DynamicObject> = Api::namespaced_with(ca.clone(), "apps", &vs_ar);
    vs_a.create(
        &PostParams::default(),
        &dyn_obj(&vs_ar, json!({"metadata": {"name": "s1"}, "spec": {"source": {"persistentVolumeClaimName": "data"}}})),
    )
    .await
    .unwrap();
    let ready = wait_ready(&vs_a, "s1").await;
    assert_eq!(ready.data["status"]["restoreSize"], "2Gi");
    let cname = ready.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap()
        .to_string();
    let vsc_a: Api<DynamicObject> = Api::all_with(ca.clone(), &vsc_ar);
    let content = vsc_a.get(&cname).await.unwrap();
    let handle = content.data["status"]["snapshotHandle"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(content.data["spec"]["sourceVolumeMode"], "Block");
    assert_eq!(content.data["status"]["restoreSize"], 2i64 << 30);
    assert_eq!(backend.handles(), vec![handle.clone()]);

    // Destination: a pre-bound Retain content for the same handle, then its snapshot.
    let vsc_b: Api<DynamicObject> = Api::all_with(cb.clone(), &vsc_ar);
    let vs_b: Api<DynamicObject> = Api::namespaced_with(cb.clone(), "dr", &vs_ar);
    vsc_b.create(&PostParams::default(), &dyn_obj(&vsc_ar, json!({
        "metadata": {"name": "moved"},
        "spec": {"volumeSnapshotRef": {"name": "s1", "namespace": "dr"}, "deletionPolicy": "Retain",
                 "driver": "hostpath.csi.k8s.io", "source": {"snapshotHandle": handle}, "sourceVolumeMode": null,
                 "volumeSnapshotClassName": "csi-snapclass"}
    }))).await.unwrap();
    let created = vs_b
        .create(&PostParams::default(), &dyn_obj(&vs_ar, json!({"metadata": {"name": "s1"}, "spec": {"source": {"volumeSnapshotContentName": "moved"}}})))
        .await
        .unwrap();
    let ready_b = wait_ready(&vs_b, "s1").await;
    assert_eq!(
        ready_b.data["status"]["boundVolumeSnapshotContentName"],
        "moved"
    );
    let moved = vsc_b.get("moved").await.unwrap();
    assert_eq!(
        moved.data["spec"]["volumeSnapshotRef"]["uid"].as_str(),
        created.metadata.uid.as_deref()
    );

    // Restores: a PVC naming no class gets the default (admission) and binds; one whose class
    // another driver provisions, or that opts out of classes with "", stays Pending.
    b.seed_storage_class("other-sc", "other.csi.example.com", false)
        .unwrap();
    for (name, class) in [
        ("r-default", None),
        ("r-other", Some("other-sc")),
        ("r-none", Some("")),
    ] {
        let mut pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": "dr"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}},
                     "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "s1"}}});
        if let Some(class) = class {
            pvc["spec"]["storageClassName"] = json!(class);
        }
        b.create(pvc).unwrap();
    }
    let phase = |name: &str| {
        b.get("v1", "PersistentVolumeClaim", "dr", name).unwrap()["status"]["phase"]
            .as_str()
            .map(str::to_string)
    };
    for _ in 0..100 {
        if phase("r-default").as_deref() == Some("Bound") && phase("r-other").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let restored = b
        .get("v1", "PersistentVolumeClaim", "dr", "r-default")
        .unwrap();
    assert_eq!(restored["spec"]["storageClassName"], "csi-hostpath-sc");
    assert_eq!(phase("r-default").as_deref(), Some("Bound"));
    assert_eq!(phase("r-other").as_deref(), Some("Pending"));
    assert_eq!(phase("r-none").as_deref(), Some("Pending"));

    // Unknown handle: error status, never ready.
    vsc_b.create(&PostParams::default(), &dyn_obj(&vsc_ar, json!({
        "metadata": {"name": "ghost"},
        "spec": {"volumeSnapshotRef": {"name": "g", "namespace": "dr"}, "deletionPolicy": "Retain",
                 "driver": "hostpath.csi.k8s.io", "source": {"snapshotHandle": "nope"}}
    }))).await.unwrap();
    let mut ghost = None;
    for _ in 0..100 {
        let g = vsc_b.get("ghost").await.unwrap();
        if g.data["status"]["error"].is_object() {
            ghost = Some(g);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ghost = ghost.expect("unknown handle must produce an error status");
    assert_eq!(ghost.data["status"]["readyToUse"], false);

    // Retain keeps the backend snapshot; Delete (the dynamic one) removes it.
    vs_b.delete("s1", &DeleteParams::default()).await.unwrap();
    vsc_b
        .delete("moved", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(backend.handles(), vec![handle.clone()]);
    vs_a.delete("s1", &DeleteParams::default()).await.unwrap();
    assert!(backend.handles().is_empty());
    assert!(vsc_a.get_opt(&cname).await.unwrap().is_none());
}

#[tokio::test]
async fn status_codes_selectors_patches_and_watch() {
    let a = FakeKube::builder().start().await.unwrap();
    a.seed_standard("apps").unwrap();
    let c = client_for(&a, "ctx").await;
    let vs_ar = ar("VolumeSnapshot", "volumesnapshots");
    let vsc_ar = ar("VolumeSnapshotContent", "volumesnapshotcontents");
    let vs: Api<DynamicObject> = Api::namespaced_with(c.clone(), "apps", &vs_ar);

    // 404 with a Status body.
    match vs.get("missing").await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected 404, got {other:?}"),
    }
    // Namespace that does not exist.
    let vs_nowhere: Api<DynamicObject> = Api::namespaced_with(c.clone(), "nowhere", &vs_ar);
    let obj = dyn_obj(
        &vs_ar,
        json!({"metadata": {"name": "x", "labels": {"app": "db"}}, "spec": {"source": {"persistentVolumeClaimName": "p"}}}),
    );
    match vs_nowhere.create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 404);
            assert!(
                s.message.contains("namespaces \"nowhere\" not found"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 404, got {other:?}"),
    }
    vs.create(&PostParams::default(), &obj).await.unwrap();
    match vs.create(&PostParams::default(), &obj).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "AlreadyExists")),
        other => panic!("expected 409, got {other:?}"),
    }
    // 422 with causes.
    let vsc: Api<DynamicObject> = Api::all_with(c.clone(), &vsc_ar);
    let bad = dyn_obj(
        &vsc_ar,
        json!({"metadata": {"name": "bad"}, "spec": {"deletionPolicy": "Keep", "source": {}}}),
    );
    match vsc.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            let fields: Vec<String> = s
                .details
                .unwrap()
                .causes
                .iter()
                .map(|c| c.field.clone())
                .collect();
            for f in [
                "spec.volumeSnapshotRef",
                "spec.deletionPolicy",
                "spec.driver",
                "spec.source",
            ] {
                assert!(fields.contains(&f.to_string()), "{fields:?} lacks {f}");
            }
        }
        other => panic!("expected 422, got {other:?}"),
    }
    // Label selectors.
    let obj2 = dyn_obj(
        &vs_ar,
        json!({"metadata": {"name": "y", "labels": {"app": "web"}}, "spec": {"source": {"persistentVolumeClaimName": "p"}}}),
    );
    vs.create(&PostParams::default(), &obj2).await.unwrap();
    let names = |l: kube::core::ObjectList<DynamicObject>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|o| o.metadata.name.unwrap())
            .collect()
    };
    assert_eq!(
        names(
            vs.list(&ListParams::default().labels("app=db"))
                .await
                .unwrap()
        ),
        ["x"]
    );
    assert_eq!(
        names(
            vs.list(&ListParams::default().labels("app in (db,web)"))
                .await
                .unwrap()
        ),
        ["x", "y"]
    );

    // Merge patch (kube) and JSON patch (raw HTTP), then a stale-resourceVersion replace.
    let patched = vs
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "gold"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.labels.as_ref().unwrap()["tier"], "gold");
    let (code, body) = raw(
        &a,
        "PATCH",
        "/apis/snapshot.storage.k8s.io/v1/namespaces/apps/volumesnapshots/x",
        "application/json-patch+json",
        r#"[{"op":"remove","path":"/metadata/labels/tier"}]"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body["metadata"]["labels"].get("tier").is_none());
    let (code, body) = raw(
        &a,
        "PATCH",
        "/apis/snapshot.storage.k8s.io/v1/namespaces/apps/volumesnapshots/x",
        "application/strategic-merge-patch+json",
        "{}",
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let mut stale = patched.clone();
    stale.metadata.labels = None;
    match vs.replace("x", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected 409 Conflict, got {other:?}"),
    }
    // Immutable source.
    let mut current = vs.get("x").await.unwrap();
    current.data["spec"]["source"] = json!({"persistentVolumeClaimName": "other"});
    match vs.replace("x", &PostParams::default(), &current).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 422),
        other => panic!("expected 422, got {other:?}"),
    }

    // Watch from a resourceVersion sees only later changes.
    let rv = vs
        .get("y")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let wp = WatchParams::default().fields("metadata.name=y").timeout(5);
    let mut stream = vs.watch(&wp, &rv).await.unwrap().boxed();
    vs.patch(
        "y",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"seen": "1"}}})),
    )
    .await
    .unwrap();
    vs.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"other": "1"}}})),
    )
    .await
    .unwrap();
    vs.delete("y", &DeleteParams::default()).await.unwrap();
    let first = stream.try_next().await.unwrap().unwrap();
    match first {
        WatchEvent::Modified(o) => assert_eq!(o.metadata.labels.unwrap()["seen"], "1"),
        other => panic!("expected Modified, got {other:?}"),
    }
    assert!(matches!(
        stream.try_next().await.unwrap().unwrap(),
        WatchEvent::Deleted(_)
    ));

    // Faults: 429 on the next request, then a dropped connection.
    let ns: Api<Namespace> = Api::all(c.clone());
    a.faults().add_http(HttpFault::status(429, 1));
    match ns.get("apps").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 429),
        other => panic!("expected 429, got {other:?}"),
    }
    a.faults()
        .add_http(HttpFault::status(500, 1).method("GET").reset());
    assert!(ns.get("apps").await.is_err());
    assert!(ns.get("apps").await.is_ok());
    a.faults().fail_nth_request(2, 503);
    assert!(ns.get("apps").await.is_ok());
    assert!(ns.get("apps").await.is_err());
    assert!(ns.get("apps").await.is_ok());

    // Missing token is refused.
    let (code, _) = {
        let addr = a.url().trim_start_matches("http://").to_string();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        (out[9..12].parse::<u16>().unwrap(), ())
    };
    assert_eq!(code, 401);
}

#[tokio::test]
async fn driver_faults_error_and_never_ready() {
    let a = FakeKube::builder().start().await.unwrap();
    a.seed_standard("apps").unwrap();
    a.seed_pvc("apps", "data", "1Gi", "Filesystem", &["ReadWriteOnce"], &[])
        .unwrap();
    let c = client_for(&a, "ctx").await;
    let vs_ar = ar("VolumeSnapshot", "volumesnapshots");
    let vs: Api<DynamicObject> = Api::namespaced_with(c, "apps", &vs_ar);
    a.faults().set_snapshot_error(Some("array offline"));
    vs.create(&PostParams::default(), &dyn_obj(&vs_ar, json!({"metadata": {"name": "e"}, "spec": {"source": {"persistentVolumeClaimName": "data"}}})))
        .await
        .unwrap();
    let mut err = None;
    for _ in 0..100 {
        let o = vs.get("e").await.unwrap();
        if let Some(m) = o.data["status"]["error"]["message"].as_str() {
            err = Some(m.to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(err.unwrap().contains("array offline"));
    a.faults().set_snapshot_error(None);
    a.faults().set_never_ready(true);
    vs.create(&PostParams::default(), &dyn_obj(&vs_ar, json!({"metadata": {"name": "n"}, "spec": {"source": {"persistentVolumeClaimName": "data"}}})))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let o = vs.get("n").await.unwrap();
    assert!(o.data["status"]["boundVolumeSnapshotContentName"].is_string());
    assert_eq!(o.data["status"]["readyToUse"], false);
    a.faults().set_never_ready(false);
    wait_ready(&vs, "n").await;
}

#[tokio::test]
async fn watch_from_a_compacted_resource_version_gets_410_expired() {
    let a = FakeKube::builder()
        .event_log_capacity(2)
        .start()
        .await
        .unwrap();
    for ns in ["a", "b", "c", "d"] {
        a.seed_namespace(ns).unwrap();
    }
    let c = client_for(&a, "ctx").await;
    let ns: Api<Namespace> = Api::all(c);
    let mut stream = ns
        .watch(&WatchParams::default().timeout(2), "1")
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // From the current version the watch works and sees new objects.
    let rv = ns
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = ns
        .watch(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    a.seed_namespace("e").unwrap();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(n) => assert_eq!(n.metadata.name.as_deref(), Some("e")),
        other => panic!("expected Added, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_runtime_await_condition_works_against_the_fake() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let a = FakeKube::builder().start().await.unwrap();
    a.seed_standard("apps").unwrap();
    a.faults().set_controller_paused(true);
    let c = client_for(&a, "ctx").await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(c, "apps");
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data", "namespace": "apps"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .unwrap();
    pvcs.create(&PostParams::default(), &pvc).await.unwrap();
    let waiter = tokio::spawn(kube::runtime::wait::await_condition(
        pvcs.clone(),
        "data",
        |p: Option<&PersistentVolumeClaim>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                == Some("Bound")
        },
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    a.set_status(
        "v1",
        "PersistentVolumeClaim",
        "apps",
        "data",
        json!({"phase": "Bound"}),
    );
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("watcher saw the change")
        .unwrap()
        .unwrap();
    assert_eq!(got.unwrap().status.unwrap().phase.as_deref(), Some("Bound"));
}

#[tokio::test]
async fn extra_resource_types_can_be_served() {
    let a = FakeKube::builder()
        .serve(fake_kube::ResourceType {
            group: "cbt.storage.k8s.io",
            version: "v1beta1",
            plural: "snapshotmetadataservices",
            kind: "SnapshotMetadataService",
            namespaced: false,
            status_subresource: false,
            crd: true,
        })
        .start()
        .await
        .unwrap();
    let c = client_for(&a, "ctx").await;
    let sms_ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cbt.storage.k8s.io", "v1beta1", "SnapshotMetadataService"),
        "snapshotmetadataservices",
    );
    let api: Api<DynamicObject> = Api::all_with(c, &sms_ar);
    api.create(
        &PostParams::default(),
        &dyn_obj(
            &sms_ar,
            json!({"metadata": {"name": "hostpath.csi.k8s.io"},
                   "spec": {"address": "svc.ns:6443", "audience": "aud", "caCert": "Y2E="}}),
        ),
    )
    .await
    .unwrap();
    let got = api.get("hostpath.csi.k8s.io").await.unwrap();
    assert_eq!(got.data["spec"]["audience"], "aud");
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
    assert!(
        a.get(
            "cbt.storage.k8s.io/v1beta1",
            "SnapshotMetadataService",
            "",
            "hostpath.csi.k8s.io"
        )
        .is_some()
    );
}

#[tokio::test]
async fn finalizers_hold_a_deleted_object_until_the_last_one_is_removed() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let a = FakeKube::builder().start().await.unwrap();
    a.seed_standard("apps").unwrap();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client_for(&a, "a").await, "apps");
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "held", "finalizers": ["kubernetes.io/pvc-protection"]},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    pvcs.create(&PostParams::default(), &pvc).await.unwrap();
    let rv = pvcs
        .get("held")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    // DELETE answers 200 with the object, now terminating; it stays readable and its name taken.
    let answer = pvcs.delete("held", &DeleteParams::default()).await.unwrap();
    let terminating = answer.left().unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert!(
        pvcs.get("held")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
    let err = pvcs.create(&PostParams::default(), &pvc).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"));
    // A client cannot unset deletionTimestamp.
    pvcs.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"deletionTimestamp": null, "labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    assert!(
        pvcs.get("held")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );

    // Removing the last finalizer completes the deletion; a watch sees MODIFIED, then DELETED.
    pvcs.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(pvcs.get_opt("held").await.unwrap().is_none());
    let events: Vec<String> = pvcs
        .watch(
            &WatchParams::default()
                .fields("metadata.name=held")
                .timeout(1),
            &rv,
        )
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            match e {
                WatchEvent::Added(_) => "ADDED",
                WatchEvent::Modified(_) => "MODIFIED",
                WatchEvent::Deleted(_) => "DELETED",
                _ => "OTHER",
            }
            .to_string()
        })
        .collect();
    assert_eq!(
        events.last().map(String::as_str),
        Some("DELETED"),
        "{events:?}"
    );
    assert!(
        events[..events.len() - 1].iter().all(|e| e == "MODIFIED"),
        "{events:?}"
    );
}

#[tokio::test]
async fn rbac_is_enforced_per_token_with_apiserver_forbidden_answers() {
    use fake_kube::rbac::{Policy, UserInfo};
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;

    let policy = Policy::from_yaml(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: pvc-reader}
rules:
  - apiGroups: [""]
    resources: [persistentvolumeclaims]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: pvc-reader, namespace: apps}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: pvc-reader}
subjects: [{kind: ServiceAccount, name: bot, namespace: tools}]
"#,
    )
    .unwrap();
    let server = FakeKube::builder()
        .rbac(policy)
        .user("bot-token", UserInfo::service_account("tools", "bot"))
        .start()
        .await
        .unwrap();
    server.seed_namespace("apps").unwrap();
    server.seed_namespace("other").unwrap();
    let kc = Kubeconfig::from_yaml(&server.kubeconfig_yaml_as("bot", "bot-token")).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.default_retry = false;
    let bot = kube::Client::try_from(config).unwrap();

    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(bot.clone(), "apps");
    assert!(
        pvcs.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let err = pvcs.get("data").await.unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("{err:?}")
    };
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "persistentvolumeclaims \"data\" is forbidden: User \"system:serviceaccount:tools:bot\" cannot get resource \"persistentvolumeclaims\" in API group \"\" in the namespace \"apps\""
    );
    // The binding is namespaced: the same verb elsewhere is denied.
    let elsewhere: Api<PersistentVolumeClaim> = Api::namespaced(bot.clone(), "other");
    assert!(elsewhere.list(&ListParams::default()).await.is_err());
    // A watch is its own verb, and the denial comes back before any event.
    let stream = pvcs.watch(&WatchParams::default().timeout(1), "0").await;
    assert!(stream.is_ok(), "watch is granted");
    let namespaces: Api<Namespace> = Api::all(bot);
    assert!(matches!(
        namespaces.list(&ListParams::default()).await,
        Err(kube::Error::Api(s)) if s.code == 403
    ));

    let denied: Vec<(String, String, String)> = server
        .denied()
        .into_iter()
        .map(|r| {
            (
                r.attributes.verb,
                r.attributes.resource,
                r.attributes.namespace,
            )
        })
        .collect();
    assert_eq!(
        denied,
        [
            ("get".into(), "persistentvolumeclaims".into(), "apps".into()),
            (
                "list".into(),
                "persistentvolumeclaims".into(),
                "other".into()
            ),
            ("list".into(), "namespaces".into(), "".into()),
        ]
    );
    assert!(
        server
            .access_log()
            .iter()
            .all(|r| r.user == "system:serviceaccount:tools:bot")
    );
    // The builder's own token is an administrator; the seeding methods bypass the API.
    let admin: Api<PersistentVolumeClaim> =
        Api::namespaced(client_for(&server, "admin").await, "other");
    assert!(admin.list(&ListParams::default()).await.is_ok());
    // Policies can be swapped at run time; an unknown token is 401, not 403.
    server.set_rbac(Some(Policy::new()));
    assert!(matches!(
        pvcs.list(&ListParams::default()).await,
        Err(kube::Error::Api(s)) if s.code == 403
    ));
    let (code, _) = raw(&server, "GET", "/api/v1/namespaces", "application/json", "").await;
    assert_eq!(code, 200, "admin token");
    server.set_rbac(None);
    assert!(pvcs.get_opt("data").await.unwrap().is_none());
}
