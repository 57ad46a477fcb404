//! `cbt backup --selector ... --group` end to end against the fake cluster (same setup as
//! `pvc_e2e.rs`, with the group snapshot API served): one VolumeGroupSnapshot cuts every
//! selected PVC at one instant, each member is backed up incrementally against its own
//! previous backup by a mover Job, older groups go by retention, restores are byte-identical to
//! the cut; preflight errors and member failures leave nothing behind.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fake_kube::{FakeKube, SharedBackend};
use serde_json::{Value, json};
use support::{DRIVER, MOVER_IMAGE, sms};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 256 * 1024;
const NS: &str = "db";
const AUDIENCE: &str = "cbt-e2e";
const GROUP_API: &str = "groupsnapshot.storage.k8s.io/v1";
const VS_API: &str = "snapshot.storage.k8s.io/v1";
const MEMBERS: [&str; 3] = ["conf", "data", "wal"];

type Env = support::Cluster;

impl Env {
    /// The `pvc_e2e` cluster; with `group_api` the group snapshot CRDs are served.
    async fn start(group_api: bool) -> Self {
        let t = tempfile::tempdir().unwrap();
        let backend = SharedBackend::with_data_dir(t.path().join("array")).unwrap();
        let mut builder = FakeKube::builder()
            .driver(DRIVER)
            .backend(backend)
            .serve(sms())
            .image(MOVER_IMAGE, env!("CARGO_BIN_EXE_cbt"));
        if group_api {
            builder = builder.group_snapshot_api();
        }
        let kube = builder.start().await.unwrap();
        support::Cluster::from_kube(t, kube, NS, AUDIENCE).await
    }

    /// `cbt -o json backup --selector app=pg --group <extra> <cluster flags>`: exit code, the
    /// JSON document, stderr.
    async fn group_backup(&self, extra: &[&str]) -> (Option<i32>, Value, String) {
        let mut args = vec!["-o", "json", "backup", "--selector", "app=pg", "--group"];
        args.extend_from_slice(extra);
        let out = self.cbt_kube(&args).await;
        (
            out.status.code(),
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Asserts that no temporary object is left and exactly `groups` group snapshots exist,
    /// with `3 * groups` member VolumeSnapshots (and no other VolumeSnapshot).
    fn assert_clean(&self, groups: usize, case: &str) {
        assert!(self.ours("batch/v1", "Job").is_empty(), "{case}: Job left");
        assert!(self.ours("v1", "Pod").is_empty(), "{case}: Pod left");
        assert!(
            self.ours("v1", "PersistentVolumeClaim").is_empty(),
            "{case}: temporary PVC left"
        );
        assert_eq!(
            self.names(GROUP_API, "VolumeGroupSnapshot", |_| true).len(),
            groups,
            "{case}: VolumeGroupSnapshots"
        );
        assert_eq!(
            self.names(VS_API, "VolumeSnapshot", |_| true).len(),
            3 * groups,
            "{case}: VolumeSnapshots"
        );
    }

    fn seed_members(&self) {
        for name in MEMBERS {
            self.kube
                .seed_pvc(
                    NS,
                    name,
                    "8Mi",
                    "Block",
                    &["ReadWriteOnce"],
                    &[("app", "pg")],
                )
                .unwrap();
        }
        self.kube
            .seed_pvc(NS, "other", "8Mi", "Block", &["ReadWriteOnce"], &[])
            .unwrap();
    }

    fn device(&self, pvc: &str) -> PathBuf {
        self.kube.pvc_backing_file(NS, pvc).unwrap()
    }
}

fn write(path: &Path, offset: u64, byte: u8, len: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len], offset).unwrap();
}

/// The result entry of member `pvc`.
fn member<'a>(doc: &'a Value, pvc: &str) -> &'a Value {
    doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pvc"] == pvc)
        .unwrap_or_else(|| panic!("no result for {pvc}: {doc:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_backs_up_each_member_incrementally_from_one_cut_and_restores_it() {
    let env = Env::start(true).await;
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    env.kube
        .seed_group_snapshot_class("csi-group", DRIVER, true)
        .unwrap();
    env.seed_members();
    write(&env.device("data"), 0, 1, 2 * MIB as usize);
    write(&env.device("wal"), MIB, 2, MIB as usize);
    write(&env.device("conf"), 0, 3, 100_000);

    // Full backups of every member, from one group snapshot.
    let (code, first, err) = env.group_backup(&[]).await;
    assert_eq!(code, Some(0), "{first:#}\n{err}");
    let group1 = first["group"]["group"].as_str().unwrap().to_string();
    assert_eq!(first["group"]["group_class"], "csi-group");
    assert!(first["group"]["cut_time"].is_string(), "{first:#}");
    assert_eq!(first["results"].as_array().unwrap().len(), 3, "{first:#}");
    for (pvc, bytes) in [("data", 2 * MIB), ("wal", MIB), ("conf", CHUNK)] {
        let r = member(&first, pvc);
        assert_eq!(r["ok"], true, "{first:#}");
        let m = &r["report"]["mover"];
        assert_eq!(m["metadata_call"], "GetMetadataAllocated", "{pvc}");
        assert!(m["parent"].is_null(), "{pvc}");
        assert_eq!(m["bytes_read"], bytes, "{pvc}: {first:#}");
        assert_eq!(r["report"]["volume"], format!("{NS}.{pvc}"));
    }
    // The group and its members stay (the next deltas' bases); nothing temporary does.
    env.assert_clean(1, "first run");
    assert_eq!(
        env.ours(GROUP_API, "VolumeGroupSnapshot"),
        vec![group1.clone()]
    );

    // Change one chunk of data and two of wal; conf stays as it was.
    write(&env.device("data"), 5 * MIB, 9, 64 * 1024);
    write(&env.device("wal"), 3 * MIB, 9, 64 * 1024);
    write(&env.device("wal"), 7 * MIB, 9, 64 * 1024);
    let at_cut: Vec<(&str, Vec<u8>)> = MEMBERS
        .iter()
        .map(|p| (*p, std::fs::read(env.device(p)).unwrap()))
        .collect();
    // Runs are named by the second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (code, second, err) = env.group_backup(&[]).await;
    assert_eq!(code, Some(0), "{second:#}\n{err}");
    let group2 = second["group"]["group"].as_str().unwrap().to_string();
    assert_ne!(group1, group2);
    for (pvc, bytes) in [("data", CHUNK), ("wal", 2 * CHUNK), ("conf", 0)] {
        let m = &member(&second, pvc)["report"]["mover"];
        assert_eq!(m["metadata_call"], "GetMetadataDelta", "{pvc}: {second:#}");
        assert_eq!(
            m["parent"],
            member(&first, pvc)["report"]["mover"]["snapshot"],
            "{pvc}: incremental against its own previous backup"
        );
        assert_eq!(m["bytes_read"], bytes, "{pvc}: {second:#}");
    }
    // Retention: the older group went (with its members), the newest stays.
    assert_eq!(second["group"]["deleted_groups"], json!([group1]));
    env.assert_clean(1, "second run");
    assert_eq!(
        env.ours(GROUP_API, "VolumeGroupSnapshot"),
        vec![group2.clone()]
    );
    for vs in env.kube.list(VS_API, "VolumeSnapshot") {
        assert_eq!(vs["status"]["volumeGroupSnapshotName"], group2.as_str());
        assert!(vs["metadata"]["deletionTimestamp"].is_null());
    }

    // Every manifest names the group and the one cut time.
    let cut_time = second["group"]["cut_time"].as_str().unwrap().to_string();
    for pvc in MEMBERS {
        let snap = member(&second, pvc)["report"]["mover"]["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        let volume = format!("{NS}.{pvc}");
        let show = env
            .ok(&[
                "-o",
                "json",
                "show",
                "--volume",
                &volume,
                "--snapshot",
                &snap,
            ])
            .await;
        assert_eq!(show["source"]["volume_group_snapshot"], group2.as_str());
        assert_eq!(show["source"]["pvc"], pvc);
        assert_eq!(
            show["source"]["volume_snapshot"],
            member(&second, pvc)["report"]["volume_snapshot"]
        );
        assert_eq!(show["labels"]["cbt.io/group-cut-time"], cut_time.as_str());
    }

    // Writes after the cut do not reach the backups: each restore is the volume at the cut.
    write(&env.device("data"), 0, 7, 4096);
    for (pvc, bytes) in &at_cut {
        let snap = member(&second, pvc)["report"]["mover"]["snapshot"]
            .as_str()
            .unwrap()
            .to_string();
        let volume = format!("{NS}.{pvc}");
        let target = format!("restored-{pvc}");
        let mut args: Vec<String> = [
            "-o",
            "json",
            "restore",
            "--volume",
            &volume,
            "--snapshot",
            &snap,
            "--to-pvc",
            &target,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(env.kube_args());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        env.ok(&argv).await;
        assert!(
            std::fs::read(env.device(&target)).unwrap() == *bytes,
            "{pvc}: the restore differs from the volume at the cut"
        );
    }
    drop(env.t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_group_support_is_a_config_error_that_creates_nothing() {
    // A cluster without the group snapshot CRDs.
    let env = Env::start(false).await;
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    env.seed_members();
    let (code, doc, err) = env.group_backup(&[]).await;
    assert_eq!(code, Some(5), "{doc:#}\n{err}");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("groupsnapshot.storage.k8s.io/v1") && message.contains("not served"),
        "{doc:#}"
    );
    assert!(env.kube.list(VS_API, "VolumeSnapshot").is_empty());
    drop(env);

    // The CRDs but no VolumeGroupSnapshotClass for the driver.
    let env = Env::start(true).await;
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    env.seed_members();
    let (code, doc, err) = env.group_backup(&[]).await;
    assert_eq!(code, Some(5), "{doc:#}\n{err}");
    assert_eq!(doc["error"]["class"], "config");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no VolumeGroupSnapshotClass for driver hostpath.csi.k8s.io"),
        "{doc:#}"
    );
    env.assert_clean(0, "no group class");

    // A named class that does not exist.
    env.kube
        .seed_group_snapshot_class("csi-group", DRIVER, false)
        .unwrap();
    let (code, doc, _) = env.group_backup(&["--group-snapshot-class", "gold"]).await;
    assert_eq!(code, Some(5), "{doc:#}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("VolumeGroupSnapshotClass gold does not exist"),
        "{doc:#}"
    );
    // A class that is not the default: named, it works; unnamed, the error lists it.
    let (code, doc, _) = env.group_backup(&[]).await;
    assert_eq!(code, Some(5), "{doc:#}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("(classes: csi-group)"),
        "{doc:#}"
    );
    env.assert_clean(0, "no default group class");

    // A selected PVC of another CSI driver: one group is cut by one driver.
    env.kube
        .create(json!({"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pv-foreign"},
            "spec": {"capacity": {"storage": "8Mi"}, "accessModes": ["ReadWriteOnce"],
                     "volumeMode": "Block", "persistentVolumeReclaimPolicy": "Retain",
                     "csi": {"driver": "foreign.csi.example", "volumeHandle": "f-1"}}}))
        .unwrap();
    env.kube
        .create(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "foreign", "namespace": NS, "labels": {"app": "pg"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                     "resources": {"requests": {"storage": "8Mi"}}, "volumeName": "pv-foreign"}}))
        .unwrap();
    env.kube.set_status(
        "v1",
        "PersistentVolumeClaim",
        NS,
        "foreign",
        json!({"phase": "Bound", "capacity": {"storage": "8Mi"}}),
    );
    let (code, doc, _) = env
        .group_backup(&["--group-snapshot-class", "csi-group"])
        .await;
    assert_eq!(code, Some(5), "{doc:#}");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("use different CSI drivers")
            && message.contains("foreign (foreign.csi.example)"),
        "{doc:#}"
    );
    env.kube
        .delete("v1", "PersistentVolumeClaim", NS, "foreign")
        .unwrap();
    env.assert_clean(0, "two drivers");

    // --group needs --selector; --snapshot-class does not apply to it.
    for args in [
        &["backup", "--pvc", "data", "--group"][..],
        &[
            "backup",
            "--full",
            "--group",
            "--device",
            "d",
            "--volume",
            "v",
            "--snapshot",
            "s",
        ][..],
    ] {
        let out = env.cbt(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = env
        .cbt(&["backup", "-l", "app=pg", "--group", "--snapshot-class", "x"])
        .await;
    assert_eq!(out.status.code(), Some(2));

    // Dry run: the group and each member's temporary PVC and Job, nothing created.
    let out = env
        .cbt_kube(&[
            "backup",
            "-l",
            "app=pg",
            "--group",
            "--group-snapshot-class",
            "csi-group",
            "--dry-run",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        yaml.matches("\nkind: VolumeGroupSnapshot\n").count(),
        1,
        "{yaml}"
    );
    assert_eq!(yaml.matches("\nkind: Job\n").count(), 3, "{yaml}");
    env.assert_clean(0, "dry run");

    // Without a default VolumeSnapshotClass the metadata sidecar would refuse every member.
    env.kube
        .delete(VS_API, "VolumeSnapshotClass", "", "csi-snapclass")
        .unwrap();
    let (code, doc, _) = env
        .group_backup(&["--group-snapshot-class", "csi-group"])
        .await;
    assert_eq!(code, Some(5), "{doc:#}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("from the driver's default VolumeSnapshotClass"),
        "{doc:#}"
    );
    env.assert_clean(0, "no default snapshot class");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_group_or_member_fails_the_run_and_cleans_up() {
    let env = Env::start(true).await;
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    env.kube
        .seed_group_snapshot_class("csi-group", DRIVER, true)
        .unwrap();
    env.seed_members();
    for (i, pvc) in MEMBERS.iter().enumerate() {
        write(&env.device(pvc), 0, i as u8 + 1, 300_000);
    }

    // The driver fails the group: its message verbatim, the group deleted.
    env.kube
        .faults()
        .set_snapshot_error(Some("consistency group quota exceeded"));
    let (code, doc, _) = env.group_backup(&[]).await;
    assert_eq!(code, Some(8), "{doc:#}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("consistency group quota exceeded"),
        "{doc:#}"
    );
    assert_eq!(doc["group"]["group_deleted"], true);
    env.assert_clean(0, "group error");
    env.kube.faults().set_snapshot_error(None);

    // A group that never becomes ready: a timeout, then the same cleanup.
    env.kube.faults().set_never_ready(true);
    let (code, doc, _) = env.group_backup(&["--snapshot-timeout-secs", "1"]).await;
    assert_eq!(code, Some(4), "{doc:#}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{doc:#}"
    );
    env.assert_clean(0, "never ready");
    env.kube.faults().set_never_ready(false);

    // The first member's mover is OOM-killed; one at a time, the others are not started: the
    // run fails naming that member, and nothing was committed, so the group goes.
    env.kube.faults().oom_kill_next_pods(1);
    let (code, doc, _) = env.group_backup(&["--concurrency", "1"]).await;
    assert_eq!(code, Some(4), "{doc:#}");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("3 of 3 members") && message.contains("OOMKilled"),
        "{doc:#}"
    );
    let failed: Vec<&Value> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("OOMKilled")
        })
        .collect();
    assert_eq!(failed.len(), 1, "{doc:#}");
    assert!(message.contains(&format!("PVC {NS}/{}", failed[0]["pvc"].as_str().unwrap())));
    assert!(
        message.contains("the group snapshot was deleted"),
        "{doc:#}"
    );
    assert!(
        doc["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["ok"] == false)
    );
    assert_eq!(doc["group"]["group_deleted"], true);
    env.assert_clean(0, "member OOM");
    assert!(
        env.kube.backend().handles().is_empty(),
        "backend snapshots left"
    );
    let list = env.ok(&["-o", "json", "list"]).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list:#}");

    // All at once, one member fails after the others committed: their backups' next delta
    // base is in the new group, so it is kept (and said so) until a later success prunes it.
    env.kube.faults().oom_kill_next_pods(1);
    let (code, doc, _) = env.group_backup(&["--concurrency", "3"]).await;
    assert_eq!(code, Some(4), "{doc:#}");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("1 of 3 members") && message.contains("was kept"),
        "{doc:#}"
    );
    assert_eq!(doc["group"]["group_deleted"], false);
    let kept = doc["group"]["group"].as_str().unwrap().to_string();
    env.assert_clean(1, "partly committed");
    let failed = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ok"] == false)
        .unwrap()["pvc"]
        .as_str()
        .unwrap()
        .to_string();

    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (code, doc, err) = env.group_backup(&[]).await;
    assert_eq!(code, Some(0), "{doc:#}\n{err}");
    for pvc in MEMBERS {
        let m = &member(&doc, pvc)["report"]["mover"];
        if pvc == failed {
            // Its first backup: a full one.
            assert!(m["parent"].is_null(), "{pvc}: {doc:#}");
        } else {
            // Against the backup taken from the kept group, nothing changed since.
            assert_eq!(m["metadata_call"], "GetMetadataDelta", "{pvc}: {doc:#}");
            assert_eq!(m["bytes_read"], 0, "{pvc}: {doc:#}");
        }
    }
    assert_eq!(doc["group"]["deleted_groups"], json!([kept]));
    env.assert_clean(1, "after the kept group");

    // For people: the group, its cut, and a line per member.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let out = env
        .cbt_kube(&["backup", "--selector", "app=pg", "--group"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("VolumeGroupSnapshot {NS}/cbt-group-"))
            && text.contains("(class csi-group, cut at ")
            && text.contains("3 member(s)"),
        "{text}"
    );
    for pvc in MEMBERS {
        assert!(
            text.contains(&format!("{NS}/{pvc}: backup {NS}.{pvc}/"))
                && text.contains("(incremental, parent"),
            "{text}"
        );
    }
    assert!(text.contains("deleted old group snapshots: "), "{text}");
}
