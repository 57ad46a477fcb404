//! `cbt backup --pvc` and `cbt restore --to-pvc` end to end against the fake cluster: the real
//! `cbt` binary orchestrates through the Kubernetes API, the simulated kubelet runs the mover
//! Jobs as written (the same binary, the PVC's backing file as the raw device, S3 credentials
//! from a Secret, a projected audience token), the metadata comes from the file-backed server in
//! sidecar mode over TLS (TokenReview, SubjectAccessReview, VolumeSnapshot -> handle), found
//! through the SnapshotMetadataService object, and the repository is the in-process S3 server.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;

use fake_kube::{FakeKube, SharedBackend};
use serde_json::{Value, json};
use support::{DRIVER, MOVER_IMAGE, sms};

const MIB: u64 = 1 << 20;
const NS: &str = "db";
const AUDIENCE: &str = "cbt-e2e";
const SLOW_IMAGE: &str = "registry.example/slow:e2e";

type Env = support::Cluster;

impl Env {
    async fn start() -> Self {
        let t = tempfile::tempdir().unwrap();
        let backend = SharedBackend::with_data_dir(t.path().join("array")).unwrap();
        // A mover image that never finishes, to interrupt a run while its Job is running.
        // Named `cbt`, as the Job's command says: the image's entrypoint must be found.
        std::fs::create_dir(t.path().join("slow")).unwrap();
        let slow = t.path().join("slow").join("cbt");
        std::fs::write(&slow, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&slow, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let kube = FakeKube::builder()
            .driver(DRIVER)
            .backend(backend)
            .serve(sms())
            .image(MOVER_IMAGE, env!("CARGO_BIN_EXE_cbt"))
            .image(SLOW_IMAGE, slow)
            .start()
            .await
            .unwrap();
        support::Cluster::from_kube(t, kube, NS, AUDIENCE).await
    }

    /// [`Self::kube_args`] without `--image`, for runs that name another image or none.
    fn kube_args_without_image(&self) -> Vec<String> {
        let mut args = self.kube_args();
        let at = args.iter().position(|a| a == "--image").unwrap();
        args.drain(at..at + 2);
        args
    }

    /// [`Self::kube_args`] with the mover's S3 Secret `secret` instead of `s3-creds`.
    fn kube_args_with_secret(&self, secret: &str) -> Vec<String> {
        let mut args = self.kube_args();
        let at = args.iter().position(|a| a == "s3-creds").unwrap();
        args[at] = secret.into();
        args
    }

    /// `-o json backup --pvc <pvc>` with the cluster flags, the mover reading Secret `secret`.
    fn backup_args(&self, pvc: &str, secret: &str) -> Vec<String> {
        let mut args: Vec<String> = ["-o", "json", "backup", "--pvc", pvc]
            .map(String::from)
            .to_vec();
        args.extend(self.kube_args_with_secret(secret));
        args
    }

    /// `-o json restore` of `db.data` snapshot `snap` into the new PVC `restored`, with the
    /// cluster flags, the mover reading Secret `secret`.
    fn restore_args(&self, snap: &str, secret: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "-o",
            "json",
            "restore",
            "--volume",
            "db.data",
            "--snapshot",
            snap,
            "--to-pvc",
            "restored",
        ]
        .map(String::from)
        .to_vec();
        args.extend(self.kube_args_with_secret(secret));
        args
    }

    /// Asserts that the PVC `restored` holds the bytes of `device`.
    fn assert_restored(&self, device: &Path) {
        let target = self.kube.pvc_backing_file(NS, "restored").unwrap();
        assert_eq!(
            std::fs::read(&target).unwrap(),
            std::fs::read(device).unwrap()
        );
    }
}

fn write(path: &Path, offset: u64, byte: u8, len: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len], offset).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pvc_is_backed_up_incrementally_and_restored_into_a_new_pvc() {
    let env = Env::start().await;
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    env.kube
        .seed_pvc(
            NS,
            "data",
            "32Mi",
            "Block",
            &["ReadWriteOnce"],
            &[("app", "pg")],
        )
        .unwrap();
    let device = env.kube.pvc_backing_file(NS, "data").unwrap();
    write(&device, 0, 1, 3 * MIB as usize);
    write(&device, 20 * MIB, 2, 100_000);

    let args = env.backup_args("data", "s3-creds");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = env.ok(&argv).await;
    let r = &first["results"][0];
    assert_eq!(r["ok"], true, "{first:#}");
    let report = &r["report"];
    assert_eq!(report["volume"], "db.data");
    assert_eq!(report["mover"]["metadata_call"], "GetMetadataAllocated");
    assert!(report["mover"]["parent"].is_null());
    // Only allocated 256 KiB chunks were read: 3 MiB + one chunk around 20 MiB.
    assert_eq!(
        report["mover"]["bytes_read"],
        3 * MIB + 256 * 1024,
        "{report:#}"
    );
    let first_vs = report["volume_snapshot"].as_str().unwrap().to_string();

    // Nothing temporary is left; the snapshot the next delta needs is kept.
    assert!(env.ours("batch/v1", "Job").is_empty());
    assert_eq!(
        env.ours("v1", "PersistentVolumeClaim"),
        Vec::<String>::new()
    );
    assert_eq!(
        env.ours("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
        vec![first_vs.clone()]
    );

    // Change 2 blocks of 64 KiB in two chunks; the next run is an incremental that reads
    // only those chunks.
    write(&device, 5 * MIB, 9, 64 * 1024);
    write(&device, 31 * MIB, 9, 64 * 1024);
    // Runs are named by the second; make sure the second run gets another name.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let second = env.ok(&argv).await;
    let report = &second["results"][0]["report"];
    assert_eq!(
        report["mover"]["metadata_call"], "GetMetadataDelta",
        "{second:#}"
    );
    assert_eq!(
        report["mover"]["parent"],
        first["results"][0]["report"]["mover"]["snapshot"]
    );
    assert_eq!(report["mover"]["bytes_read"], 2 * 256 * 1024, "{report:#}");
    assert_eq!(report["mover"]["bytes_in_ranges"], 2 * 64 * 1024);
    assert_eq!(report["deleted_snapshots"], json!([first_vs]));
    let second_vs = report["volume_snapshot"].as_str().unwrap().to_string();
    assert_eq!(
        env.ours("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
        vec![second_vs]
    );

    // The manifest records the PVC.
    let snap = report["mover"]["snapshot"].as_str().unwrap().to_string();
    let show = env
        .ok(&[
            "-o",
            "json",
            "show",
            "--volume",
            "db.data",
            "--snapshot",
            &snap,
        ])
        .await;
    assert_eq!(show["source"]["pvc"], "data");
    assert_eq!(show["source"]["namespace"], NS);
    assert_eq!(show["source"]["csi_driver"], DRIVER);
    assert_eq!(show["source"]["volume_mode"], "Block");
    assert_eq!(show["source"]["pvc_labels"]["app"], "pg");
    assert!(
        show["source"]["pvc_uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );
    assert!(
        show["source"]["csi_snapshot_id"]
            .as_str()
            .is_some_and(|h| !h.is_empty())
    );

    // Restore into a new PVC: byte-identical to the source at the second backup.
    let args = env.restore_args(&snap, "s3-creds");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let restored = env.ok(&argv).await;
    assert!(
        restored["mover"]["chunks_verified"].as_u64().unwrap() > 0,
        "{restored:#}"
    );
    env.assert_restored(&device);
    assert!(env.ours("batch/v1", "Job").is_empty());
    // A second restore to the same name is refused and changes nothing.
    let out = env.cbt(&argv).await;
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With --overwrite it writes into the existing PVC (scribbled on first) and verifies.
    let target = env.kube.pvc_backing_file(NS, "restored").unwrap();
    write(&target, 0, 0xee, 4096);
    let mut again = argv.clone();
    again.push("--overwrite");
    let doc = env.ok(&again).await;
    assert!(
        doc["notes"][0].as_str().unwrap().contains("overwrote"),
        "{doc:#}"
    );
    env.assert_restored(&device);
    assert!(
        env.kube
            .get("v1", "PersistentVolumeClaim", NS, "restored")
            .is_some()
    );
    // A size below the backed-up volume is refused before anything is created.
    let mut small = argv.clone();
    let at = small.iter().position(|a| *a == "restored").unwrap();
    small[at] = "small";
    small.extend(["--size", "1M"]);
    let out = env.cbt(&small).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        env.kube
            .get("v1", "PersistentVolumeClaim", NS, "small")
            .is_none()
    );

    // A third run, printed for people: its summary carries the mover's chunk counts. One
    // chunk gets new content (uploaded); another, unallocated until now, becomes a copy of
    // chunk 0 (all ones, already stored: deduplicated). Both differ from the parent.
    write(&device, 12 * MIB, 7, 64 * 1024);
    write(&device, 10 * MIB, 1, 256 * 1024);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let args = env.backup_args("data", "s3-creds");
    let human: Vec<&str> = args[2..].iter().map(String::as_str).collect();
    let out = env.cbt(&human).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chunks = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("chunks:"))
        .unwrap_or_else(|| panic!("no chunk line in:\n{stdout}"));
    assert_eq!(
        chunks.trim(),
        "chunks: 1 uploaded, 1 deduplicated; 512.0 KiB changed; at most 2 map entries held",
        "{stdout}"
    );
    drop(env.t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ctrl_c_at_each_step_cleans_up() {
    let env = Env::start().await;
    env.ok(&["repo", "init"]).await;
    env.kube
        .seed_pvc(NS, "data", "4Mi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();
    // (step, extra flags, what must exist before the interrupt)
    let steps: [(&str, &[&str], (&str, &str)); 2] = [
        (
            "waiting for the snapshot",
            &[],
            ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
        ),
        (
            "waiting for the mover",
            &["--image", SLOW_IMAGE],
            ("v1", "Pod"),
        ),
    ];
    for (step, extra, (api, kind)) in steps {
        env.kube.faults().set_never_ready(extra.is_empty());
        let kube = if extra.is_empty() {
            env.kube_args()
        } else {
            env.kube_args_without_image()
        };
        let child = env
            .command(&["backup", "--pvc", "data"])
            .args(kube)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while env.ours(api, kind).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{step}: no {kind} appeared"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let status = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(130), "{step}: {stderr}");
        assert!(stderr.contains("interrupted"), "{step}: {stderr}");
        env.assert_clean(0, step);
    }
    env.kube.faults().set_never_ready(false);
    let list = env.ok(&["-o", "json", "list"]).await;
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(0),
        "nothing committed: {list:#}"
    );
}

impl Env {
    /// `cbt -o json backup --pvc <pvc> <extra> <cluster flags>`: exit code and the JSON document.
    async fn backup(&self, pvc: &str, extra: &[&str]) -> (Option<i32>, Value, String) {
        let mut args = vec!["-o", "json", "backup", "--pvc", pvc];
        args.extend_from_slice(extra);
        let out = self.cbt_kube(&args).await;
        let doc = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.code(),
            doc,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Asserts that no object created by cbt is left besides `snapshots` VolumeSnapshots.
    fn assert_clean(&self, snapshots: usize, case: &str) {
        // The Job is deleted with background propagation: its pods go when the garbage
        // collector gets to them, as in a real cluster, which a loaded machine delays.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while !self.ours("v1", "Pod").is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(self.ours("batch/v1", "Job").is_empty(), "{case}: Job left");
        assert!(self.ours("v1", "Pod").is_empty(), "{case}: Pod left");
        assert!(
            self.ours("v1", "PersistentVolumeClaim").is_empty(),
            "{case}: temporary PVC left"
        );
        assert_eq!(
            self.ours("snapshot.storage.k8s.io/v1", "VolumeSnapshot")
                .len(),
            snapshots,
            "{case}: VolumeSnapshots"
        );
    }
}

/// The error document of a failed single-PVC run.
fn error_of(doc: &Value) -> &Value {
    &doc["results"][0]["error"]
}

/// The repository snapshot a successful single-PVC backup made.
fn snapshot_of(doc: &Value) -> String {
    let r = &doc["results"][0];
    assert_eq!(r["ok"], true, "{doc:#}");
    r["report"]["mover"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Asserts a failed single-PVC run: exit code `expected`, an error message containing `what`.
fn assert_failed(code: Option<i32>, doc: &Value, expected: i32, what: &str) {
    assert_eq!(code, Some(expected), "{doc:#}");
    assert!(
        error_of(doc)["message"].as_str().unwrap().contains(what),
        "{doc:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_error_and_leaves_nothing_behind() {
    let env = Env::start().await;
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    env.kube
        .seed_pvc(NS, "data", "8Mi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();
    env.kube
        .seed_pvc(NS, "files", "8Mi", "Filesystem", &["ReadWriteOnce"], &[])
        .unwrap();

    // A PVC that does not exist, and a filesystem PVC: configuration errors, nothing created.
    for (pvc, what) in [("nope", "not found"), ("files", "volumeMode Filesystem")] {
        let (code, doc, _) = env.backup(pvc, &[]).await;
        assert_eq!(code, Some(5), "{pvc}: {doc:#}");
        assert_eq!(error_of(&doc)["class"], "config");
        assert!(
            error_of(&doc)["message"].as_str().unwrap().contains(what),
            "{doc:#}"
        );
        env.assert_clean(0, pvc);
    }

    // A PVC that is not bound yet: a configuration error naming the phase, nothing created.
    env.kube
        .create(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "pending", "namespace": NS},
            "spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Block",
                     "storageClassName": "no-such-class",
                     "resources": {"requests": {"storage": "1Mi"}}}}))
        .unwrap();
    let (code, doc, _) = env.backup("pending", &[]).await;
    assert_failed(code, &doc, 5, "not bound");
    env.assert_clean(0, "unbound");

    // No VolumeSnapshotClass for the driver: refused before anything is created.
    let class = env
        .kube
        .get(
            "snapshot.storage.k8s.io/v1",
            "VolumeSnapshotClass",
            "",
            "csi-snapclass",
        )
        .unwrap();
    env.kube
        .delete(
            "snapshot.storage.k8s.io/v1",
            "VolumeSnapshotClass",
            "",
            "csi-snapclass",
        )
        .unwrap();
    let (code, doc, _) = env.backup("data", &[]).await;
    assert_failed(code, &doc, 5, "VolumeSnapshotClass");
    env.assert_clean(0, "no snapshot class");
    let mut class = class;
    class["metadata"] = json!({"name": "csi-snapclass",
        "annotations": class["metadata"]["annotations"].clone()});
    env.kube.create(class).unwrap();

    // A snapshot the driver fails: the controller's message verbatim, the snapshot deleted.
    env.kube
        .faults()
        .set_snapshot_error(Some("backend pool is full"));
    let (code, doc, _) = env.backup("data", &[]).await;
    assert_failed(code, &doc, 8, "backend pool is full");
    env.assert_clean(0, "snapshot error");
    env.kube.faults().set_snapshot_error(None);

    // A snapshot that never becomes ready: a timeout, then the same cleanup.
    env.kube.faults().set_never_ready(true);
    let (code, doc, _) = env.backup("data", &["--snapshot-timeout-secs", "1"]).await;
    assert_failed(code, &doc, 4, "timed out");
    env.assert_clean(0, "never ready");
    env.kube.faults().set_never_ready(false);

    // A mover image that cannot be pulled fails fast, naming the image.
    let mut args = vec!["--image", "registry.example/missing:1"];
    let (code, doc, _) = {
        let mut a: Vec<String> = ["-o", "json", "backup", "--pvc", "data"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(env.kube_args_without_image());
        a.extend(args.drain(..).map(str::to_string));
        let argv: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = env.cbt(&argv).await;
        (
            out.status.code(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null),
            (),
        )
    };
    assert_failed(code, &doc, 5, "ErrImagePull");
    env.assert_clean(0, "image pull");

    // A mover killed by the kernel (OOM): its reason, and the same cleanup.
    env.kube.faults().oom_kill_next_pods(1);
    let (code, doc, _) = env.backup("data", &[]).await;
    assert_failed(code, &doc, 4, "OOMKilled");
    env.assert_clean(0, "OOM");

    // A SnapshotMetadataService whose CA is not the one the sidecar's certificate chains to:
    // the mover's TLS handshake fails, a configuration error, and the same cleanup.
    let good_ca = env
        .kube
        .get(
            "cbt.storage.k8s.io/v1beta1",
            "SnapshotMetadataService",
            "",
            DRIVER,
        )
        .unwrap()["spec"]["caCert"]
        .clone();
    let other = std::fs::read(support::csi_fixture("other-ca.pem")).unwrap();
    env.kube
        .merge_patch(
            "cbt.storage.k8s.io/v1beta1",
            "SnapshotMetadataService",
            "",
            DRIVER,
            &json!({"spec": {"caCert": serde_json::to_value(k8s_openapi::ByteString(other)).unwrap()}}),
        )
        .unwrap();
    let (code, doc, _) = env.backup("data", &[]).await;
    assert_eq!(code, Some(5), "{doc:#}");
    env.assert_clean(0, "wrong CA");
    env.kube
        .merge_patch(
            "cbt.storage.k8s.io/v1beta1",
            "SnapshotMetadataService",
            "",
            DRIVER,
            &json!({"spec": {"caCert": good_ca}}),
        )
        .unwrap();

    // A missing S3 Secret stops the mover before it starts.
    env.kube.delete("v1", "Secret", NS, "s3-creds").unwrap();
    let (code, doc, _) = env.backup("data", &[]).await;
    assert_eq!(code, Some(5), "{doc:#}");
    let message = error_of(&doc)["message"].as_str().unwrap();
    assert!(
        message.contains("CreateContainerConfigError") && message.contains("s3-creds"),
        "{doc:#}"
    );
    env.assert_clean(0, "missing secret");

    // Nothing reached the repository.
    let list = env.ok(&["-o", "json", "list"]).await;
    assert_eq!(
        list["snapshots"].as_array().map(Vec::len).unwrap_or(0),
        0,
        "{list:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_cbt_a_backup_fails_unless_a_full_read_is_allowed() {
    let env = Env::start().await;
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    env.kube
        .seed_pvc(NS, "data", "4Mi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();
    write(&env.kube.pvc_backing_file(NS, "data").unwrap(), 0, 7, 1000);
    // The driver was deployed without the metadata sidecar (no SnapshotMetadataService).
    env.kube
        .delete(
            "cbt.storage.k8s.io/v1beta1",
            "SnapshotMetadataService",
            "",
            DRIVER,
        )
        .unwrap();
    let (code, doc, _) = env.backup("data", &[]).await;
    assert_failed(code, &doc, 5, "SnapshotMetadataService");
    env.assert_clean(0, "no CBT");

    let (code, doc, _) = env.backup("data", &["--fallback-full"]).await;
    assert_eq!(code, Some(0), "{doc:#}");
    let m = &doc["results"][0]["report"]["mover"];
    assert!(m["metadata_call"].is_null(), "{doc:#}");
    // Every chunk holding data is read without ranges from a service (the fake's devices are
    // sparse files, so the device's own data map applies; a real device is read whole).
    assert_eq!(m["bytes_read"], 256 * 1024, "{doc:#}");
    assert!(
        m["notes"].as_array().is_some_and(|n| n.iter().any(|n| n
            .as_str()
            .unwrap_or("")
            .contains("no SnapshotMetadata service"))),
        "{doc:#}"
    );
    env.assert_clean(1, "fallback full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_selector_backs_up_each_pvc_and_dry_run_creates_nothing() {
    let env = Env::start().await;
    env.ok(&["repo", "init", "--chunk-size", "256K"]).await;
    for (i, name) in ["pg-data", "pg-wal", "pg-conf"].iter().enumerate() {
        env.kube
            .seed_pvc(
                NS,
                name,
                "4Mi",
                "Block",
                &["ReadWriteOnce"],
                &[("backup", "cbt")],
            )
            .unwrap();
        let dev = env.kube.pvc_backing_file(NS, name).unwrap();
        write(&dev, (i as u64) * MIB, i as u8 + 1, 5000);
    }
    env.kube
        .seed_pvc(NS, "other", "4Mi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();

    // Without a mover image there is nothing to run: a usage error, nothing created.
    let mut args: Vec<String> = ["backup", "--selector", "backup=cbt"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(env.kube_args_without_image());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = env.cbt(&argv).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--image"));
    env.assert_clean(0, "no image");

    // Dry run: the objects as YAML, nothing created, nothing in the repository.
    let out = env
        .cbt_kube(&["backup", "--selector", "backup=cbt", "--dry-run"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        yaml.matches("\nkind: VolumeSnapshot\n").count(),
        3,
        "{yaml}"
    );
    assert_eq!(yaml.matches("\nkind: Job\n").count(), 3, "{yaml}");
    assert!(yaml.contains("secretKeyRef") && !yaml.contains("AWS_SECRET_ACCESS_KEY\n    value"));
    env.assert_clean(0, "dry run");

    let doc = env
        .ok_kube(&["-o", "json", "backup", "--selector", "backup=cbt"])
        .await;
    let results = doc["results"].as_array().unwrap();
    let mut pvcs: Vec<&str> = results.iter().map(|r| r["pvc"].as_str().unwrap()).collect();
    pvcs.sort();
    assert_eq!(pvcs, ["pg-conf", "pg-data", "pg-wal"]);
    assert!(results.iter().all(|r| r["ok"] == true), "{doc:#}");
    env.assert_clean(3, "selector");
    let list = env.ok(&["-o", "json", "list"]).await;
    assert_eq!(list.as_array().map(Vec::len), Some(3), "{list:#}");
}

/// Figures for the docs (run with `cargo test --release -p cbt-cli --test pvc_e2e --
/// --ignored --nocapture`; size with CBT_MEASURE_MIB, default 1024): wall time of a PVC backup
/// split into snapshot wait / mover start / data, for a full and a 1% incremental, and bytes
/// read per changed byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement, prints figures"]
async fn measure_pvc_backup() {
    let mib: u64 = std::env::var("CBT_MEASURE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let env = Env::start().await;
    env.ok(&["repo", "init", "--chunk-size", "1M"]).await;
    env.kube
        .seed_pvc(
            NS,
            "data",
            &format!("{mib}Mi"),
            "Block",
            &["ReadWriteOnce"],
            &[],
        )
        .unwrap();
    let device = env.kube.pvc_backing_file(NS, "data").unwrap();
    // Half the volume holds incompressible-ish data, the rest is never written.
    let mut stream = cbt_core::testing::XorShift::from_state(0x9e37_79b9_7f4a_7c15);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&device)
        .unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..mib / 2 {
        stream.fill(&mut buf);
        f.write_all_at(&buf, i * 2 * MIB).unwrap();
    }
    drop(f);
    let args = env.backup_args("data", "s3-creds");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = std::time::Instant::now();
    let full = env.ok(&argv).await;
    let full_s = t.elapsed().as_secs_f64();
    // 1% of the volume changed in 64 KiB writes spread over it.
    let writes = (mib * MIB / 100) / (64 * 1024);
    let stride = (mib * MIB) / writes.max(1);
    for i in 0..writes {
        write(&device, i * stride, 0x5a, 64 * 1024);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let t = std::time::Instant::now();
    let incr = env.ok(&argv).await;
    let incr_s = t.elapsed().as_secs_f64();
    for (what, doc, wall) in [("full", &full, full_s), ("1% incremental", &incr, incr_s)] {
        let r = &doc["results"][0]["report"];
        let m = &r["mover"];
        let read = m["bytes_read"].as_f64().unwrap_or(0.0);
        let in_ranges = m["bytes_in_ranges"].as_f64().unwrap_or(1.0);
        println!(
            "{what:>15}: {mib} MiB volume, wall {wall:.2} s = snapshot wait {:.2} s + mover start {:.2} s + data {:.2} s + cleanup {:.2} s (+ orchestration); read {:.1} MiB for {:.1} MiB reported ({:.2} bytes read per changed byte), uploaded {:.1} MiB",
            r["times"]["snapshot_wait_s"].as_f64().unwrap_or(0.0),
            r["times"]["mover_start_s"].as_f64().unwrap_or(0.0),
            r["times"]["data_s"].as_f64().unwrap_or(0.0),
            r["times"]["cleanup_s"].as_f64().unwrap_or(0.0),
            read / MIB as f64,
            in_ranges / MIB as f64,
            read / in_ranges,
            m["bytes_transferred"].as_f64().unwrap_or(0.0) / MIB as f64,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_repository_is_backed_up_and_restored_through_pvcs() {
    let env = Env::start().await;
    // The mover gets the password from the same Secret as the S3 credentials.
    let mut creds = support::s3_credentials(&env.s3);
    creds.insert("CBT_PASSWORD".into(), json!("pvc secret"));
    env.kube
        .create(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s3-enc", "namespace": NS}, "stringData": creds}))
        .unwrap();
    let run = |args: Vec<String>, password: Option<&'static str>| {
        let mut cmd = env.command(&args);
        cmd.env_remove("CBT_PASSWORD_FILE");
        match password {
            Some(p) => cmd.env("CBT_PASSWORD", p),
            None => cmd.env_remove("CBT_PASSWORD"),
        };
        async move { cmd.output().await.unwrap() }
    };
    let ok = |out: std::process::Output| support::succeeded("cbt", &out);
    ok(run(
        ["repo", "init", "--encryption", "--chunk-size", "256K"]
            .map(String::from)
            .to_vec(),
        Some("pvc secret"),
    )
    .await);
    env.kube
        .seed_pvc(NS, "data", "8Mi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();
    let device = env.kube.pvc_backing_file(NS, "data").unwrap();
    write(&device, 0, 7, MIB as usize);

    let doc = ok(run(env.backup_args("data", "s3-enc"), Some("pvc secret")).await);
    let snap = snapshot_of(&doc);

    let args = env.restore_args(&snap, "s3-enc");
    // Without the password the orchestrator stops before creating anything (exit 5).
    let out = run(args.clone(), None).await;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        env.kube
            .get("v1", "PersistentVolumeClaim", NS, "restored")
            .is_none()
    );
    ok(run(args, Some("pvc secret")).await);
    env.assert_restored(&device);
    drop(env.t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repository_opened_with_a_key_file_is_backed_up_and_restored_through_pvcs() {
    let env = Env::start().await;
    let key_file = env.t.path().join("repo.key");
    let run = |args: Vec<String>| {
        let mut cmd = env.command(&args);
        cmd.env_remove("CBT_PASSWORD")
            .env_remove("CBT_PASSWORD_FILE")
            .env("CBT_KEY_FILE", &key_file);
        async move { cmd.output().await.unwrap() }
    };
    let ok = |out: std::process::Output| support::succeeded("cbt", &out);
    // `repo init` writes the key file; CBT_KEY_FILE names it for every later command.
    let mut cmd = env.command(&[
        "repo",
        "init",
        "--encryption",
        "--chunk-size",
        "256K",
        "--key-file-out",
    ]);
    cmd.arg(&key_file)
        .env_remove("CBT_PASSWORD")
        .env_remove("CBT_PASSWORD_FILE")
        .env_remove("CBT_KEY_FILE");
    ok(cmd.output().await.unwrap());

    // One Secret without the key file, one with it (and a password that must not be used).
    let creds = support::s3_credentials(&env.s3);
    let mut with_key = creds.clone();
    with_key.insert(
        "CBT_KEY_FILE".into(),
        json!(std::fs::read_to_string(&key_file).unwrap()),
    );
    with_key.insert(
        "CBT_PASSWORD".into(),
        json!("not this repository's password"),
    );
    for (name, data) in [("s3-nokey", creds), ("s3-kf", with_key)] {
        env.kube
            .create(json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": NS}, "stringData": data}))
            .unwrap();
    }
    env.kube
        .seed_pvc(NS, "data", "8Mi", "Block", &["ReadWriteOnce"], &[])
        .unwrap();
    let device = env.kube.pvc_backing_file(NS, "data").unwrap();
    write(&device, 0, 11, MIB as usize);

    // A Secret without CBT_KEY_FILE stops the mover before it starts: a configuration error
    // naming the key, nothing committed.
    let out = run(env.backup_args("data", "s3-nokey")).await;
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("CBT_KEY_FILE"), "{all}");
    let listed = ok(run(["-o", "json", "list"].map(String::from).to_vec()).await);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");

    let doc = ok(run(env.backup_args("data", "s3-kf")).await);
    let snap = snapshot_of(&doc);
    ok(run(env.restore_args(&snap, "s3-kf")).await);
    env.assert_restored(&device);
    drop(env.t);
}
