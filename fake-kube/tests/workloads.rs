//! Drives the workload simulation through kube::Client: data-backed block volumes,
//! ServiceAccount tokens, Secrets, and Jobs whose pods run as real child processes.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use fake_kube::{FakeKube, SharedBackend};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount,
};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

const NS: &str = "apps";

async fn client_for(server: &FakeKube) -> kube::Client {
    let kc = Kubeconfig::from_yaml(&server.kubeconfig_yaml("ctx")).unwrap();
    let opts = KubeConfigOptions {
        context: Some("ctx".into()),
        ..Default::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .unwrap();
    config.default_retry = false;
    kube::Client::try_from(config).unwrap()
}

fn typed<T: k8s_openapi::serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

/// Polls `f` every 20 ms for up to `secs` seconds.
async fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A cluster with a data-backed backend, the standard classes and `busybox` -> /bin/sh.
async fn cluster(data: &Path) -> FakeKube {
    let backend = SharedBackend::with_data_dir(data).unwrap();
    let k = FakeKube::builder()
        .backend(backend)
        .image("busybox", "/bin/sh")
        .start()
        .await
        .unwrap();
    k.seed_standard(NS).unwrap();
    wait_for("the default ServiceAccount", 5, || {
        k.get("v1", "ServiceAccount", NS, "default")
    })
    .await;
    k
}

fn block_pvc(name: &str, size: &str) -> PersistentVolumeClaim {
    typed(json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                 "resources": {"requests": {"storage": size}}},
    }))
}

fn restore_pvc(name: &str, size: &str, snapshot: &str) -> PersistentVolumeClaim {
    typed(json!({
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                 "resources": {"requests": {"storage": size}},
                 "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot}},
    }))
}

async fn wait_bound(k: &FakeKube, name: &str) -> Value {
    wait_for(&format!("PVC {name} bound"), 5, || {
        k.get("v1", "PersistentVolumeClaim", NS, name)
            .filter(|p| p["status"]["phase"] == "Bound")
    })
    .await
}

fn job_phase(k: &FakeKube, name: &str) -> Option<(String, String)> {
    let job = k.get("batch/v1", "Job", NS, name)?;
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| (c["type"] == "Complete" || c["type"] == "Failed") && c["status"] == "True")
        .map(|c| {
            (
                c["type"].as_str().unwrap().to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
            )
        })
}

async fn wait_job_finished(k: &FakeKube, name: &str, secs: u64) -> (String, String) {
    wait_for(&format!("job {name} to finish"), secs, || {
        job_phase(k, name)
    })
    .await
}

async fn job_pods(client: &kube::Client, job: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await
        .unwrap()
        .items
}

fn terminated(pod: &Pod) -> Value {
    let v = serde_json::to_value(pod).unwrap();
    v["status"]["containerStatuses"][0]["state"]["terminated"].clone()
}

/// A Job running `script` under `sh -c` in busybox, with extra template fields merged in.
fn sh_job(name: &str, script: &str, extra: Value) -> Job {
    let mut job = json!({
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "mover", "image": "busybox", "command": ["sh", "-c", script]}],
        }}},
    });
    merge(&mut job, &extra);
    typed(job)
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// True while `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

async fn events_for(client: &kube::Client, name: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), NS);
    events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn block_volumes_are_files_and_snapshots_copy_data_and_holes() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(c.clone(), NS);
    pvcs.create(&PostParams::default(), &block_pvc("data", "8Mi"))
        .await
        .unwrap();
    let bound = wait_bound(&k, "data").await;
    let pv_name = bound["spec"]["volumeName"].as_str().unwrap().to_string();
    assert_eq!(
        pv_name,
        format!("pvc-{}", bound["metadata"]["uid"].as_str().unwrap())
    );
    assert_eq!(bound["status"]["capacity"]["storage"], "8Mi");
    assert_eq!(bound["status"]["accessModes"], json!(["ReadWriteOnce"]));

    // The PV, as the external-provisioner writes it.
    let pv = Api::<PersistentVolume>::all(c.clone())
        .get(&pv_name)
        .await
        .unwrap();
    let spec = pv.spec.unwrap();
    let csi = spec.csi.unwrap();
    assert_eq!(csi.driver, "hostpath.csi.k8s.io");
    assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Delete")
    );
    assert_eq!(spec.storage_class_name.as_deref(), Some("csi-hostpath-sc"));
    assert_eq!(
        spec.claim_ref.unwrap().uid.as_deref(),
        bound["metadata"]["uid"].as_str()
    );
    assert_eq!(pv.status.unwrap().phase.as_deref(), Some("Bound"));

    // The volume is a sparse file of the requested size; write data at both ends.
    let file = k.pvc_backing_file(NS, "data").unwrap();
    assert!(file.ends_with(&csi.volume_handle));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 8 << 20);
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(b"ABCDEFGH", 0).unwrap();
    f.write_all_at(&[0x5a; 4096], 6 << 20).unwrap();
    drop(f);

    let vs_ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    );
    let vs: Api<kube::api::DynamicObject> = Api::namespaced_with(c.clone(), NS, &vs_ar);
    let snap: kube::api::DynamicObject = typed(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "s1"}, "spec": {"source": {"persistentVolumeClaimName": "data"}},
    }));
    vs.create(&PostParams::default(), &snap).await.unwrap();
    let ready = wait_for("snapshot ready", 5, || {
        k.get("snapshot.storage.k8s.io/v1", "VolumeSnapshot", NS, "s1")
            .filter(|v| v["status"]["readyToUse"] == true)
    })
    .await;
    assert_eq!(ready["status"]["restoreSize"], "8Mi");
    let content = k
        .get(
            "snapshot.storage.k8s.io/v1",
            "VolumeSnapshotContent",
            "",
            ready["status"]["boundVolumeSnapshotContentName"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    let handle = content["status"]["snapshotHandle"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        content["spec"]["source"]["volumeHandle"],
        csi.volume_handle.as_str()
    );

    // The snapshot is a byte-identical copy that kept the holes, named by handle.
    let snap_file = k.volume_snapshot_file(NS, "s1").unwrap();
    assert_eq!(snap_file, k.snapshots_dir().unwrap().join(&handle));
    assert_eq!(
        std::fs::read(&snap_file).unwrap(),
        std::fs::read(&file).unwrap()
    );
    assert!(
        std::fs::metadata(&snap_file).unwrap().blocks() * 512 < 1 << 20,
        "holes were copied as data"
    );
    let mut listing: Vec<String> = std::fs::read_dir(k.snapshots_dir().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listing.sort();
    assert_eq!(listing, [handle.clone(), format!("{handle}.meta.json")]);
    let meta: Value = serde_json::from_slice(
        &std::fs::read(
            k.snapshots_dir()
                .unwrap()
                .join(format!("{handle}.meta.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(meta, json!({"volume_id": csi.volume_handle}));

    // Later writes to the volume do not reach the snapshot.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(b"zzzz", 0).unwrap();
    drop(f);
    assert_eq!(&std::fs::read(&snap_file).unwrap()[..4], b"ABCD");

    // A larger restore has the snapshot's bytes, then zeros.
    pvcs.create(&PostParams::default(), &restore_pvc("big", "16Mi", "s1"))
        .await
        .unwrap();
    wait_bound(&k, "big").await;
    let restored = std::fs::read(k.pvc_backing_file(NS, "big").unwrap()).unwrap();
    assert_eq!(restored.len(), 16 << 20);
    assert_eq!(
        &restored[..8 << 20],
        &std::fs::read(&snap_file).unwrap()[..]
    );
    assert!(restored[8 << 20..].iter().all(|&b| b == 0));

    // A restore smaller than restoreSize stays Pending with the provisioner's reason.
    pvcs.create(&PostParams::default(), &restore_pvc("small", "4Mi", "s1"))
        .await
        .unwrap();
    let failed = wait_for("ProvisioningFailed event", 5, || {
        let pvc = k.get("v1", "PersistentVolumeClaim", NS, "small")?;
        let uid = pvc["metadata"]["uid"].clone();
        k.list("v1", "Event")
            .into_iter()
            .find(|e| e["involvedObject"]["uid"] == uid && e["reason"] == "ProvisioningFailed")
    })
    .await;
    assert!(
        failed["message"].as_str().unwrap().contains(
            "requested volume size 4194304 is less than the size 8388608 for the source snapshot s1"
        ),
        "{failed}"
    );
    assert_eq!(failed["type"], "Warning");
    let listed = events_for(&c, "small").await;
    assert!(
        listed
            .iter()
            .any(|e| e.reason.as_deref() == Some("ProvisioningFailed"))
    );
    assert_eq!(
        pvcs.get("small")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Pending")
    );

    // Deleting the claim deletes its PV and file (Delete policy); the snapshot stays.
    pvcs.delete("data", &DeleteParams::default()).await.unwrap();
    wait_for("PV deleted", 5, || {
        k.get("v1", "PersistentVolume", "", &pv_name)
            .is_none()
            .then_some(())
    })
    .await;
    assert!(!file.exists());
    assert!(snap_file.exists());
    // Deleting the snapshot (Delete class) removes its image and meta file.
    vs.delete("s1", &DeleteParams::default()).await.unwrap();
    assert!(!snap_file.exists());
    assert_eq!(
        std::fs::read_dir(k.snapshots_dir().unwrap())
            .unwrap()
            .count(),
        0
    );

    // Retain: the PV is Released and the file kept.
    k.create(json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "keep"}, "provisioner": "hostpath.csi.k8s.io", "reclaimPolicy": "Retain"}))
        .unwrap();
    let mut kept = block_pvc("kept", "1Mi");
    kept.spec.as_mut().unwrap().storage_class_name = Some("keep".into());
    pvcs.create(&PostParams::default(), &kept).await.unwrap();
    let kept = wait_bound(&k, "kept").await;
    let kept_file = k.pvc_backing_file(NS, "kept").unwrap();
    pvcs.delete("kept", &DeleteParams::default()).await.unwrap();
    let pv = wait_for("PV released", 5, || {
        k.get(
            "v1",
            "PersistentVolume",
            "",
            kept["spec"]["volumeName"].as_str().unwrap(),
        )
        .filter(|pv| pv["status"]["phase"] == "Released")
    })
    .await;
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
    assert!(kept_file.exists());
}

#[tokio::test]
async fn secrets_configmaps_and_service_accounts() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let secrets: Api<Secret> = Api::namespaced(c.clone(), NS);
    let s: Secret = typed(
        json!({"metadata": {"name": "s3-creds", "labels": {"app": "cbt"}},
        "data": {"region": "ZXUtd2VzdC0x"},
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIA", "region": "us-east-1"}}),
    );
    let created = secrets.create(&PostParams::default(), &s).await.unwrap();
    assert!(created.string_data.is_none());
    let d = created.data.unwrap();
    assert_eq!(d["AWS_ACCESS_KEY_ID"].0, b"AKIA");
    assert_eq!(d["region"].0, b"us-east-1", "stringData wins over data");
    assert_eq!(created.type_.as_deref(), Some("Opaque"));
    let listed = secrets
        .list(&ListParams::default().labels("app=cbt"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let patched = secrets
        .patch(
            "s3-creds",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"AWS_SECRET_ACCESS_KEY": "sek"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["AWS_SECRET_ACCESS_KEY"].0, b"sek");

    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), NS);
    cms.create(
        &PostParams::default(),
        &typed(json!({"metadata": {"name": "cfg"}, "data": {"k": "v"}})),
    )
    .await
    .unwrap();
    assert_eq!(cms.get("cfg").await.unwrap().data.unwrap()["k"], "v");
    cms.delete("cfg", &DeleteParams::default()).await.unwrap();
    assert!(cms.get_opt("cfg").await.unwrap().is_none());

    let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), NS);
    sas.create(
        &PostParams::default(),
        &typed(json!({"metadata": {"name": "backup"}})),
    )
    .await
    .unwrap();
    let names: Vec<String> = sas
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.metadata.name.unwrap())
        .collect();
    assert_eq!(names, ["backup", "default"]);
}

#[tokio::test]
async fn token_request_and_token_review() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), NS);
    sas.create(
        &PostParams::default(),
        &typed(json!({"metadata": {"name": "backup"}})),
    )
    .await
    .unwrap();
    let request = |secs: i64| -> TokenRequest {
        typed(json!({"spec": {"audiences": ["cbt-sms"], "expirationSeconds": secs}}))
    };
    let minted = sas
        .create_token_request("backup", &PostParams::default(), &request(600))
        .await
        .unwrap();
    let status = minted.status.unwrap();
    let token = status.token.clone().unwrap();
    assert!(token.len() >= 32);
    let expires = status.expiration_timestamp.unwrap().0;
    let lifetime = expires.as_second() - k8s_openapi::jiff::Timestamp::now().as_second();
    assert!((590..=601).contains(&lifetime), "{lifetime}");

    for bad in [599, (1 << 32) + 1] {
        match sas
            .create_token_request("backup", &PostParams::default(), &request(bad))
            .await
        {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422);
                assert_eq!(s.details.unwrap().causes[0].field, "spec.expirationSeconds");
            }
            other => panic!("expected 422 for {bad}, got {other:?}"),
        }
    }
    match sas
        .create_token_request("nobody", &PostParams::default(), &request(600))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected 404, got {other:?}"),
    }
    k.faults().set_token_request_forbidden(true);
    match sas
        .create_token_request("backup", &PostParams::default(), &request(600))
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden")),
        other => panic!("expected 403, got {other:?}"),
    }
    k.faults().set_token_request_forbidden(false);

    let reviews: Api<TokenReview> = Api::all(c.clone());
    let review = |token: &str, aud: &[&str]| -> TokenReview {
        typed(json!({"spec": {"token": token, "audiences": aud}}))
    };
    let ok = reviews
        .create(&PostParams::default(), &review(&token, &["cbt-sms", "x"]))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(ok.authenticated, Some(true));
    assert_eq!(ok.audiences.unwrap(), ["cbt-sms"]);
    let user = ok.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:apps:backup")
    );
    assert_eq!(
        user.groups.unwrap(),
        [
            "system:serviceaccounts",
            "system:serviceaccounts:apps",
            "system:authenticated"
        ]
    );
    assert_eq!(
        user.uid,
        sas.get("backup").await.unwrap().metadata.uid,
        "uid is the ServiceAccount's"
    );
    let other = reviews
        .create(&PostParams::default(), &review(&token, &["other"]))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(other.authenticated, Some(false));
    assert!(other.error.unwrap().contains("audiences"));
    let garbage = reviews
        .create(&PostParams::default(), &review("not-a-token", &["cbt-sms"]))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(garbage.authenticated, Some(false));

    // Expiry on the injected clock, explicit expiry, revocation, deleted account.
    assert_eq!(k.tokens().minted().len(), 1);
    let t2 = sas
        .create_token_request("backup", &PostParams::default(), &request(3600))
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .unwrap();
    let authenticated = |t: String| {
        let reviews = reviews.clone();
        async move {
            reviews
                .create(&PostParams::default(), &review(&t, &["cbt-sms"]))
                .await
                .unwrap()
                .status
                .unwrap()
                .authenticated
                == Some(true)
        }
    };
    k.tokens().advance_clock(Duration::from_secs(601));
    assert!(!authenticated(token.clone()).await, "600 s token expired");
    assert!(authenticated(t2.clone()).await);
    assert!(k.tokens().expire(&t2));
    assert!(!authenticated(t2.clone()).await);
    let t3 = sas
        .create_token_request("backup", &PostParams::default(), &request(3600))
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .unwrap();
    assert!(authenticated(t3.clone()).await);
    sas.delete("backup", &DeleteParams::default())
        .await
        .unwrap();
    assert!(!authenticated(t3.clone()).await, "account deleted");
    assert!(
        matches!(
            k.tokens().review(&t3, &["cbt-sms".into()]),
            Ok(fake_kube::Authenticated { .. })
        ),
        "the registry alone does not know about the store"
    );
    assert!(k.tokens().revoke(&t3));
    assert_eq!(
        k.tokens().review(&t3, &["cbt-sms".into()]),
        Err(fake_kube::TokenRejection::Unknown)
    );
}

#[tokio::test]
async fn job_pod_reads_the_device_and_a_secret_and_reports_through_its_termination_message() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(c.clone(), NS);
    pvcs.create(&PostParams::default(), &block_pvc("restore-tmp", "1Mi"))
        .await
        .unwrap();
    wait_bound(&k, "restore-tmp").await;
    let dev = k.pvc_backing_file(NS, "restore-tmp").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .unwrap()
        .write_all_at(b"CBT1rest", 0)
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(c.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &typed(json!({"metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "AKIA123"}})),
        )
        .await
        .unwrap();

    let script = "head -c 4 /dev/xvda > /dev/termination-log; \
                  echo \"key=$AWS_ACCESS_KEY_ID pod=$POD_NAME dev=$DEV\"; \
                  env | sort | cut -d= -f1 | tr '\\n' ' '; echo; \
                  echo \"mounted=$(cat /etc/s3/AWS_ACCESS_KEY_ID) ns=$NS\"; echo to-stderr >&2";
    let job = sh_job(
        "backup-data",
        script,
        json!({"spec": {"template": {"spec": {
            "volumes": [{"name": "src", "persistentVolumeClaim": {"claimName": "restore-tmp"}},
                        {"name": "creds", "secret": {"secretName": "s3-creds"}}],
            "containers": [{"name": "mover", "image": "busybox", "command": ["sh", "-c", script],
                "volumeDevices": [{"name": "src", "devicePath": "/dev/xvda"}],
                "volumeMounts": [{"name": "creds", "mountPath": "/etc/s3", "readOnly": true}],
                "env": [
                    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "DEV", "value": "/dev/xvda"},
                    {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                ]}],
        }}}}),
    );
    let jobs: Api<Job> = Api::namespaced(c.clone(), NS);
    jobs.create(&PostParams::default(), &job).await.unwrap();
    // Jobs are watchable: kube-runtime's waiter sees the Complete condition arrive.
    let complete = tokio::time::timeout(
        Duration::from_secs(10),
        kube::runtime::wait::await_condition(jobs.clone(), "backup-data", |j: Option<&Job>| {
            j.and_then(|j| j.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Complete" && c.status == "True")
                })
        }),
    )
    .await
    .expect("the job completes")
    .unwrap()
    .unwrap();
    assert_eq!(complete.status.unwrap().succeeded, Some(1));
    assert_eq!(
        wait_job_finished(&k, "backup-data", 10).await,
        ("Complete".to_string(), "CompletionsReached".to_string())
    );
    let status = jobs.get("backup-data").await.unwrap().status.unwrap();
    assert_eq!(
        (status.succeeded, status.failed, status.active),
        (Some(1), Some(0), Some(0))
    );
    assert!(status.start_time.is_some() && status.completion_time.is_some());

    let pods = job_pods(&c, "backup-data").await;
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    let name = pod.metadata.name.clone().unwrap();
    assert!(name.starts_with("backup-data-") && name.len() == "backup-data-".len() + 5);
    let labels = pod.metadata.labels.clone().unwrap();
    let job_uid = jobs.get("backup-data").await.unwrap().metadata.uid.unwrap();
    assert_eq!(labels["batch.kubernetes.io/controller-uid"], job_uid);
    assert_eq!(labels["controller-uid"], job_uid);
    assert_eq!(labels["job-name"], "backup-data");
    let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("Job", job_uid.as_str(), Some(true))
    );
    assert_eq!(
        pod.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded")
    );
    let term = terminated(pod);
    assert_eq!(term["exitCode"], 0);
    assert_eq!(term["reason"], "Completed");
    assert_eq!(term["message"], "CBT1", "the first 4 bytes of the device");
    assert!(term["startedAt"].is_string() && term["finishedAt"].is_string());

    // The log: stdout and stderr, env rewritten to the host device path, nothing else leaked.
    let api: Api<Pod> = Api::namespaced(c.clone(), NS);
    let log = api.logs(&name, &LogParams::default()).await.unwrap();
    // $DEV was rewritten to a host path that is a link to the claim's file.
    let shown = log
        .lines()
        .next()
        .and_then(|l| l.split(" dev=").nth(1))
        .unwrap()
        .to_string();
    assert!(
        log.starts_with(&format!("key=AKIA123 pod={name} dev=/")),
        "{log}"
    );
    assert_eq!(
        std::fs::canonicalize(&shown).unwrap(),
        std::fs::canonicalize(&dev).unwrap()
    );
    assert!(log.contains("mounted=AKIA123 ns=apps\n"), "{log}");
    let env_line = log.lines().nth(1).unwrap();
    let names: Vec<&str> = env_line.split_whitespace().collect();
    for expected in ["AWS_ACCESS_KEY_ID", "DEV", "HOME", "NS", "PATH", "POD_NAME"] {
        assert!(names.contains(&expected), "{env_line}");
    }
    for leaked in ["CARGO", "USER", "RUST_TEST_THREADS", "CARGO_TARGET_DIR"] {
        assert!(
            !names.contains(&leaked),
            "{leaked} leaked into the container: {env_line}"
        );
    }
    assert!(log.ends_with("to-stderr\n"), "{log}");
    let last = api
        .logs(
            &name,
            &LogParams {
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(last, "to-stderr\n");
    let first = api
        .logs(
            &name,
            &LogParams {
                limit_bytes: Some(7),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first, "key=AKI");
    assert!(
        api.logs(
            &name,
            &LogParams {
                container: Some("nope".into()),
                ..Default::default()
            }
        )
        .await
        .is_err()
    );
    assert_eq!(k.pod_log(NS, &name).unwrap(), log);
}

#[tokio::test]
async fn failures_report_log_tail_and_the_job_stops_at_its_backoff_limit() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let script = "for i in $(seq 1 100); do echo line$i; done; echo boom >&2; exit 3";
    let job = sh_job(
        "flaky",
        script,
        json!({"spec": {"backoffLimit": 2, "template": {"spec": {"containers": [
            {"name": "mover", "image": "busybox", "command": ["sh", "-c", script],
             "terminationMessagePolicy": "FallbackToLogsOnError"}]}}}}),
    );
    Api::<Job>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    assert_eq!(
        wait_job_finished(&k, "flaky", 10).await,
        ("Failed".to_string(), "BackoffLimitExceeded".to_string())
    );
    let job = k.get("batch/v1", "Job", NS, "flaky").unwrap();
    assert_eq!(job["status"]["failed"], 3, "backoffLimit + 1 pods failed");
    assert_eq!(job["status"]["active"], 0);
    let pods = job_pods(&c, "flaky").await;
    assert_eq!(pods.len(), 3, "each retry is a new pod");
    for pod in &pods {
        assert_eq!(
            pod.status.as_ref().unwrap().phase.as_deref(),
            Some("Failed")
        );
        let term = terminated(pod);
        assert_eq!(
            (term["exitCode"].as_i64(), term["reason"].as_str()),
            (Some(3), Some("Error"))
        );
        // The last 80 lines of the log (at most 2048 bytes), since the file was empty.
        let msg = term["message"].as_str().unwrap();
        assert!(
            msg.starts_with("line22\n") && msg.ends_with("line100\nboom\n"),
            "{msg}"
        );
    }
    // No more pods appear later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(job_pods(&c, "flaky").await.len(), 3);
    assert!(
        events_for(&c, "flaky")
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("BackoffLimitExceeded"))
    );
}

#[tokio::test]
async fn missing_secret_is_create_container_config_error_until_it_exists() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let script = "echo -n \"$KEY\" > /dev/termination-log";
    let job = sh_job(
        "needs-secret",
        script,
        json!({"spec": {"template": {"spec": {"containers": [
            {"name": "mover", "image": "busybox", "command": ["sh", "-c", script],
             "env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "k"}}}]}]}}}}),
    );
    Api::<Job>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    let waiting = wait_for("CreateContainerConfigError", 5, || {
        let pod = k
            .list("v1", "Pod")
            .into_iter()
            .find(|p| p["metadata"]["labels"]["job-name"] == "needs-secret")?;
        let w = pod["status"]["containerStatuses"][0]["state"]["waiting"].clone();
        (w["reason"] == "CreateContainerConfigError").then_some((pod, w))
    })
    .await;
    assert_eq!(waiting.1["message"], "secret \"s3-creds\" not found");
    assert_eq!(waiting.0["status"]["phase"], "Pending");
    let pod_name = waiting.0["metadata"]["name"].as_str().unwrap().to_string();
    assert!(k.pod_pid(NS, &pod_name).is_none(), "no process was started");

    // A secret without the key: the kubelet's other message.
    let secrets: Api<Secret> = Api::namespaced(c.clone(), NS);
    secrets
        .create(
            &PostParams::default(),
            &typed(json!({"metadata": {"name": "s3-creds"}, "stringData": {"other": "x"}})),
        )
        .await
        .unwrap();
    wait_for("missing key message", 5, || {
        let pod = k.get("v1", "Pod", NS, &pod_name)?;
        (pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            == "couldn't find key k in Secret apps/s3-creds")
            .then_some(())
    })
    .await;
    secrets
        .patch(
            "s3-creds",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"k": "v1"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        wait_job_finished(&k, "needs-secret", 10).await.0,
        "Complete"
    );
    let pod = Api::<Pod>::namespaced(c, NS).get(&pod_name).await.unwrap();
    assert_eq!(terminated(&pod)["message"], "v1");
}

#[tokio::test]
async fn unknown_image_is_err_image_pull_then_back_off_and_never_completes() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let mut job = sh_job("no-image", "true", json!({}));
    job.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .image = Some("ghcr.io/example/cbt:v9".into());
    Api::<Job>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let pod = wait_for("ImagePullBackOff", 5, || {
        let pod = k
            .list("v1", "Pod")
            .into_iter()
            .find(|p| p["metadata"]["labels"]["job-name"] == "no-image")?;
        let w = pod["status"]["containerStatuses"][0]["state"]["waiting"].clone();
        let reason = w["reason"].as_str()?.to_string();
        if seen.last() != Some(&reason) {
            seen.push(reason.clone());
        }
        (reason == "ImagePullBackOff").then_some(pod)
    })
    .await;
    assert_eq!(
        seen.first().map(String::as_str),
        Some("ErrImagePull"),
        "{seen:?}"
    );
    let msg = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap();
    assert!(msg.contains("ghcr.io/example/cbt:v9"), "{msg}");
    assert_eq!(pod["status"]["phase"], "Pending");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        job_phase(&k, "no-image").is_none(),
        "the job never completes"
    );
    assert_eq!(
        k.get("batch/v1", "Job", NS, "no-image").unwrap()["status"]["active"],
        1
    );
}

#[tokio::test]
async fn active_deadline_fails_the_job_and_kills_the_process() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let job = sh_job(
        "slow",
        "exec sleep 60",
        json!({"spec": {"activeDeadlineSeconds": 1}}),
    );
    Api::<Job>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    let (pod_name, pid) = wait_for("the container running", 5, || {
        let pod = k
            .list("v1", "Pod")
            .into_iter()
            .find(|p| p["metadata"]["labels"]["job-name"] == "slow")?;
        let name = pod["metadata"]["name"].as_str()?.to_string();
        let pid = k.pod_pid(NS, &name)?;
        Some((name, pid))
    })
    .await;
    assert!(alive(pid));
    assert_eq!(
        wait_job_finished(&k, "slow", 5).await,
        ("Failed".to_string(), "DeadlineExceeded".to_string())
    );
    wait_for("the process killed", 5, || (!alive(pid)).then_some(())).await;
    assert!(
        k.get("v1", "Pod", NS, &pod_name).is_none(),
        "active pods are deleted"
    );
}

#[tokio::test]
async fn oom_fault_kills_the_next_pod_and_the_job_retries() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    k.faults().oom_kill_next_pods(1);
    let job = sh_job(
        "oom",
        "echo -n done > /dev/termination-log",
        json!({"spec": {"backoffLimit": 1}}),
    );
    Api::<Job>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    assert_eq!(wait_job_finished(&k, "oom", 10).await.0, "Complete");
    let mut pods = job_pods(&c, "oom").await;
    assert_eq!(pods.len(), 2);
    // Killed first (creation times have one-second resolution, so order by outcome).
    pods.sort_by_key(|p| terminated(p)["exitCode"].as_i64() == Some(0));
    let killed = terminated(&pods[0]);
    assert_eq!(
        (killed["exitCode"].as_i64(), killed["reason"].as_str()),
        (Some(137), Some("OOMKilled"))
    );
    assert_eq!(
        pods[0].status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    assert_eq!(terminated(&pods[1])["message"], "done");
    let status = k.get("batch/v1", "Job", NS, "oom").unwrap()["status"].clone();
    assert_eq!(
        (status["failed"].as_i64(), status["succeeded"].as_i64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn projected_token_passes_review_only_for_its_audience() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    Api::<ServiceAccount>::namespaced(c.clone(), NS)
        .create(
            &PostParams::default(),
            &typed(json!({"metadata": {"name": "cbt-backup"}})),
        )
        .await
        .unwrap();
    let script =
        "cat /var/run/secrets/cbt/token > /dev/termination-log; ls -l /var/run/secrets/cbt";
    let job = sh_job(
        "tok",
        script,
        json!({"spec": {"template": {"spec": {
            "serviceAccountName": "cbt-backup",
            "volumes": [{"name": "sms-token", "projected": {"sources": [
                {"serviceAccountToken": {"audience": "cbt-sms-audience", "expirationSeconds": 600, "path": "token"}}]}}],
            "containers": [{"name": "mover", "image": "busybox", "command": ["sh", "-c", script],
                "volumeMounts": [{"name": "sms-token", "mountPath": "/var/run/secrets/cbt", "readOnly": true}]}],
        }}}}),
    );
    Api::<Job>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    assert_eq!(wait_job_finished(&k, "tok", 10).await.0, "Complete");
    let pod = job_pods(&c, "tok").await.remove(0);
    let token = terminated(&pod)["message"].as_str().unwrap().to_string();
    let minted = k.tokens().minted();
    assert_eq!(minted.len(), 1);
    assert_eq!(minted[0].token, token);
    assert_eq!(minted[0].audiences, ["cbt-sms-audience"]);
    assert_eq!(minted[0].expires_at_unix - minted[0].issued_at_unix, 600);
    assert_eq!(
        minted[0].bound_object.as_ref().map(|b| b.name.as_str()),
        pod.metadata.name.as_deref()
    );

    let reviews: Api<TokenReview> = Api::all(c.clone());
    let review =
        |aud: &str| -> TokenReview { typed(json!({"spec": {"token": token, "audiences": [aud]}})) };
    let ok = reviews
        .create(&PostParams::default(), &review("cbt-sms-audience"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(ok.authenticated, Some(true));
    let user = ok.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:apps:cbt-backup")
    );
    assert_eq!(
        user.extra.unwrap()["authentication.kubernetes.io/pod-name"],
        [pod.metadata.name.clone().unwrap()]
    );
    let wrong = reviews
        .create(&PostParams::default(), &review("another-audience"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(wrong.authenticated, Some(false));
    assert!(wrong.error.is_some());

    // The token is bound to the pod: deleting the pod invalidates it.
    Api::<Pod>::namespaced(c.clone(), NS)
        .delete(
            pod.metadata.name.as_deref().unwrap(),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let after = reviews
        .create(&PostParams::default(), &review("cbt-sms-audience"))
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(after.authenticated, Some(false));
}

#[tokio::test]
async fn deleting_a_job_in_background_kills_its_process_and_orphaning_keeps_it() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let jobs: Api<Job> = Api::namespaced(c.clone(), NS);
    let running = |job: &'static str| {
        let k = &k;
        async move {
            wait_for("the container running", 5, || {
                let pod = k
                    .list("v1", "Pod")
                    .into_iter()
                    .find(|p| p["metadata"]["labels"]["job-name"] == job)?;
                let name = pod["metadata"]["name"].as_str()?.to_string();
                Some((name.clone(), k.pod_pid(NS, &name)?))
            })
            .await
        }
    };
    jobs.create(
        &PostParams::default(),
        &sh_job("bg", "exec sleep 60", json!({})),
    )
    .await
    .unwrap();
    let (pod, pid) = running("bg").await;
    jobs.delete("bg", &DeleteParams::background())
        .await
        .unwrap();
    wait_for("the process killed", 5, || (!alive(pid)).then_some(())).await;
    assert!(k.get("v1", "Pod", NS, &pod).is_none());

    // The API default for Jobs orphans the pod: it keeps running, without its owner.
    jobs.create(
        &PostParams::default(),
        &sh_job("orphan", "exec sleep 60", json!({})),
    )
    .await
    .unwrap();
    let (pod, pid) = running("orphan").await;
    jobs.delete("orphan", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid));
    let orphan = k.get("v1", "Pod", NS, &pod).unwrap();
    assert_eq!(orphan["metadata"]["ownerReferences"], json!([]));
    // Deleting a running pod kills its process.
    Api::<Pod>::namespaced(c.clone(), NS)
        .delete(&pod, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the orphan killed", 5, || (!alive(pid)).then_some(())).await;
}

#[tokio::test]
async fn dropping_the_cluster_kills_its_processes() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    // The shell forks a child: the whole process group must die, not just the leader.
    Api::<Job>::namespaced(c.clone(), NS)
        .create(
            &PostParams::default(),
            &sh_job(
                "long",
                "sleep 60 & echo $! > /dev/termination-log; wait",
                json!({}),
            ),
        )
        .await
        .unwrap();
    let pid = wait_for("the container running", 5, || {
        let pod = k
            .list("v1", "Pod")
            .into_iter()
            .find(|p| p["metadata"]["labels"]["job-name"] == "long")?;
        k.pod_pid(NS, pod["metadata"]["name"].as_str()?)
    })
    .await;
    let children = wait_for("the forked sleep", 5, || {
        let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        let kids: Vec<u32> = list
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        (!kids.is_empty()).then_some(kids)
    })
    .await;
    drop(k);
    wait_for("everything killed", 5, || {
        (!alive(pid) && children.iter().all(|c| !alive(*c))).then_some(())
    })
    .await;
}

#[tokio::test]
async fn pods_wait_for_their_claims_and_bad_commands_fail_to_start() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    let pods: Api<Pod> = Api::namespaced(c.clone(), NS);
    let pod: Pod = typed(
        json!({"metadata": {"name": "p"}, "spec": {"restartPolicy": "Never",
        "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "later"}}],
        "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "printf xyz 1<> /dev/block; wc -c < /dev/block > /dev/termination-log"],
                        "volumeDevices": [{"name": "v", "devicePath": "/dev/block"}]}]}}),
    );
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let cond = wait_for("unschedulable", 5, || {
        let p = k.get("v1", "Pod", NS, "p")?;
        let c = p["status"]["conditions"][0].clone();
        (c["reason"] == "Unschedulable").then_some(c)
    })
    .await;
    assert_eq!(cond["type"], "PodScheduled");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("persistentvolumeclaim \"later\" not found")
    );
    // Once the claim exists and binds, the pod runs.
    Api::<PersistentVolumeClaim>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &block_pvc("later", "1Mi"))
        .await
        .unwrap();
    wait_bound(&k, "later").await;
    let done = wait_for("pod succeeded", 5, || {
        k.get("v1", "Pod", NS, "p")
            .filter(|p| p["status"]["phase"] == "Succeeded")
    })
    .await;
    // The container wrote through its device into the claim's file (a write, not truncation).
    let message = done["status"]["containerStatuses"][0]["state"]["terminated"]["message"].clone();
    assert_eq!(message.as_str().map(str::trim), Some("1048576"));
    let backing = k.pvc_backing_file(NS, "later").unwrap();
    let bytes = std::fs::read(&backing).unwrap();
    assert_eq!((&bytes[..3], bytes.len()), (&b"xyz"[..], 1 << 20));

    // `>` on a device path truncates the backing file, which no block device does: the kubelet
    // restores the size and says so in a warning event.
    let trunc: Pod = typed(
        json!({"metadata": {"name": "trunc"}, "spec": {"restartPolicy": "Never",
        "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "later"}}],
        "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "printf abc > /dev/block"],
                        "volumeDevices": [{"name": "v", "devicePath": "/dev/block"}]}]}}),
    );
    pods.create(&PostParams::default(), &trunc).await.unwrap();
    wait_for("trunc succeeded", 5, || {
        k.get("v1", "Pod", NS, "trunc")
            .filter(|p| p["status"]["phase"] == "Succeeded")
    })
    .await;
    let warned = events_for(&c, "trunc").await;
    let resized = warned
        .iter()
        .find(|e| e.reason.as_deref() == Some("BlockDeviceResized"))
        .expect("a BlockDeviceResized event");
    assert!(
        resized
            .message
            .as_deref()
            .unwrap()
            .contains("from 1048576 to 3 bytes")
    );
    assert_eq!(std::fs::metadata(&backing).unwrap().len(), 1 << 20);
    assert_eq!(done["spec"]["nodeName"], "fake-node");

    // A command the image does not have: StartError, exit 128, no retry by the kubelet.
    let bad: Pod = typed(
        json!({"metadata": {"name": "bad"}, "spec": {"restartPolicy": "Never",
        "containers": [{"name": "c", "image": "busybox", "command": ["/usr/bin/cbt", "backup"]}]}}),
    );
    pods.create(&PostParams::default(), &bad).await.unwrap();
    let failed = wait_for("start error", 5, || {
        k.get("v1", "Pod", NS, "bad")
            .filter(|p| p["status"]["phase"] == "Failed")
    })
    .await;
    let term = &failed["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (term["exitCode"].as_i64(), term["reason"].as_str()),
        (Some(128), Some("StartError"))
    );
    assert!(
        term["message"]
            .as_str()
            .unwrap()
            .contains("\"/usr/bin/cbt\": executable file not found")
    );

    // A pod naming a ServiceAccount that does not exist is refused at admission.
    let nosa: Pod = typed(
        json!({"metadata": {"name": "nosa"}, "spec": {"serviceAccountName": "ghost",
        "containers": [{"name": "c", "image": "busybox"}]}}),
    );
    match pods.create(&PostParams::default(), &nosa).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403);
            assert!(
                s.message.contains("serviceaccount \"ghost\" not found"),
                "{}",
                s.message
            );
        }
        other => panic!("expected 403, got {other:?}"),
    }
}

#[tokio::test]
async fn wait_for_first_consumer_claims_bind_when_a_pod_uses_them() {
    let data = tempfile::tempdir().unwrap();
    let k = cluster(data.path()).await;
    let c = client_for(&k).await;
    k.create(
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "late"}, "provisioner": "hostpath.csi.k8s.io",
        "reclaimPolicy": "Delete", "volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .unwrap();
    let mut pvc = block_pvc("late-claim", "1Mi");
    pvc.spec.as_mut().unwrap().storage_class_name = Some("late".into());
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(c.clone(), NS);
    pvcs.create(&PostParams::default(), &pvc).await.unwrap();
    wait_for("WaitForFirstConsumer event", 5, || {
        k.list("v1", "Event")
            .into_iter()
            .find(|e| e["reason"] == "WaitForFirstConsumer")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        pvcs.get("late-claim")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Pending"),
        "no binding before a consumer exists"
    );
    let job = sh_job(
        "consumer",
        "wc -c < /dev/vol > /dev/termination-log",
        json!({"spec": {"template": {"spec": {
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "late-claim"}}],
            "containers": [{"name": "mover", "image": "busybox",
                "command": ["sh", "-c", "wc -c < /dev/vol > /dev/termination-log"],
                "volumeDevices": [{"name": "v", "devicePath": "/dev/vol"}]}]}}}}),
    );
    Api::<Job>::namespaced(c.clone(), NS)
        .create(&PostParams::default(), &job)
        .await
        .unwrap();
    assert_eq!(wait_job_finished(&k, "consumer", 10).await.0, "Complete");
    let pod = job_pods(&c, "consumer").await.remove(0);
    assert_eq!(
        terminated(&pod)["message"].as_str().map(str::trim),
        Some("1048576")
    );
    assert_eq!(
        pvcs.get("late-claim")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase
            .as_deref(),
        Some("Bound")
    );
}
