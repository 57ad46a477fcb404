//! `cbt backup --pvc` and `cbt restore --to-pvc` end to end against the fake cluster: the real
//! `cbt` binary orchestrates through the Kubernetes API, the simulated kubelet runs the mover
//! Jobs as written (the same binary, the PVC's backing file as the raw device, S3 credentials
//! from a Secret, a projected audience token), the metadata comes from the file-backed server in
//! sidecar mode over TLS (TokenReview, SubjectAccessReview, VolumeSnapshot -> handle), found
//! through the SnapshotMetadataService object, and the repository is the in-process S3 server.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cbt_csi::server::{FileMetadataService, Listen, RunningServer, ServerOptions, TlsIdentity};
use cbt_store::testing::S3TestServer;
use fake_kube::{FakeKube, ResourceType, SharedBackend};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const NS: &str = "db";
const DRIVER: &str = "hostpath.csi.k8s.io";
const AUDIENCE: &str = "cbt-e2e";
const IMAGE: &str = "registry.example/cbt:e2e";

fn sms() -> ResourceType {
    ResourceType {
        group: "cbt.storage.k8s.io",
        version: "v1beta1",
        plural: "snapshotmetadataservices",
        kind: "SnapshotMetadataService",
        namespaced: false,
        status_subresource: false,
        crd: true,
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cbt-csi/tests/fixtures")
        .join(name)
}

struct Env {
    t: tempfile::TempDir,
    kube: FakeKube,
    s3: S3TestServer,
    _sidecar: RunningServer,
    kubeconfig: PathBuf,
    repo: String,
}

impl Env {
    async fn start() -> Self {
        let t = tempfile::tempdir().unwrap();
        let backend = SharedBackend::with_data_dir(t.path().join("array")).unwrap();
        let kube = FakeKube::builder()
            .driver(DRIVER)
            .backend(backend)
            .serve(sms())
            .image(IMAGE, env!("CARGO_BIN_EXE_cbt"))
            .start()
            .await
            .unwrap();
        kube.seed_standard(NS).unwrap();
        kube.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "cbt-mover", "namespace": NS}}))
            .unwrap();
        let kubeconfig = t.path().join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig, "fake").unwrap();

        // The repository and the mover's credentials, by reference in a Secret.
        let s3 = S3TestServer::start().await.unwrap();
        s3.create_bucket("backups").unwrap();
        let creds: serde_json::Map<String, Value> = s3
            .env()
            .into_iter()
            .filter(|(k, _)| k.starts_with("AWS_ACCESS") || k.starts_with("AWS_SECRET"))
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        kube.create(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s3-creds", "namespace": NS}, "stringData": creds}))
            .unwrap();

        // The metadata sidecar: the file server over the array's snapshot files, checking
        // tokens and names through the cluster, over TLS with the test CA.
        let cluster = cbt_k8s::connect(&cbt_k8s::ClusterTarget {
            kubeconfig: Some(kubeconfig.clone()),
            context: None,
        })
        .await
        .unwrap();
        let mut opts = ServerOptions::new(kube.snapshots_dir().unwrap());
        opts.block_size = 64 * 1024;
        opts.driver_name = DRIVER.into();
        opts.sidecar = Some(Arc::new(cbt_k8s::sidecar::KubeSidecar::new(
            cluster.client,
            AUDIENCE,
            DRIVER,
        )));
        let sidecar = cbt_csi::server::spawn(
            FileMetadataService::new(opts).unwrap(),
            Listen::Tcp("127.0.0.1:0".parse().unwrap()),
            Some(TlsIdentity {
                cert_pem: std::fs::read(fixture("server.pem")).unwrap(),
                key_pem: std::fs::read(fixture("server.key")).unwrap(),
            }),
        )
        .await
        .unwrap();
        let port = sidecar.local_addr().unwrap().port();
        let ca = std::fs::read(fixture("ca.pem")).unwrap();
        kube.create(json!({
            "apiVersion": "cbt.storage.k8s.io/v1beta1", "kind": "SnapshotMetadataService",
            "metadata": {"name": DRIVER},
            "spec": {"address": format!("localhost:{port}"), "audience": AUDIENCE,
                     "caCert": serde_json::to_value(k8s_openapi::ByteString(ca)).unwrap()},
        }))
        .unwrap();
        let repo = "s3://backups/cluster-a".to_string();
        Env {
            t,
            kube,
            s3,
            _sidecar: sidecar,
            kubeconfig,
            repo,
        }
    }

    /// Runs the `cbt` binary with the repository, the S3 endpoint and the kubeconfig.
    async fn cbt(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cbt"));
        cmd.args(["--repo", &self.repo, "--s3-endpoint", &self.s3.endpoint()]);
        cmd.args(args);
        cmd.env_remove("CBT_REPO").env_remove("KUBECONFIG");
        for (k, v) in self.s3.env() {
            cmd.env(k, v);
        }
        cmd.output().await.unwrap()
    }

    async fn ok(&self, args: &[&str]) -> Value {
        let out = self.cbt(args).await;
        assert!(
            out.status.success(),
            "cbt {args:?} failed ({:?})\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    fn kube_args(&self) -> Vec<String> {
        [
            "-n",
            NS,
            "--kubeconfig",
            self.kubeconfig.to_str().unwrap(),
            "--image",
            IMAGE,
            "--s3-secret",
            "s3-creds",
            "--service-account",
            "cbt-mover",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Objects of a kind in the namespace that this tool created.
    fn ours(&self, api_version: &str, kind: &str) -> Vec<String> {
        self.kube
            .list(api_version, kind)
            .into_iter()
            .filter(|o| o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cbt")
            .map(|o| o["metadata"]["name"].as_str().unwrap_or("").to_string())
            .collect()
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

    let mut args: Vec<String> = vec![
        "-o".into(),
        "json".into(),
        "backup".into(),
        "--pvc".into(),
        "data".into(),
    ];
    args.extend(env.kube_args());
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
    let mut args: Vec<String> = [
        "-o",
        "json",
        "restore",
        "--volume",
        "db.data",
        "--snapshot",
        &snap,
        "--to-pvc",
        "restored",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(env.kube_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let restored = env.ok(&argv).await;
    assert!(
        restored["mover"]["chunks_verified"].as_u64().unwrap() > 0,
        "{restored:#}"
    );
    let target = env.kube.pvc_backing_file(NS, "restored").unwrap();
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&device).unwrap()
    );
    assert!(env.ours("batch/v1", "Job").is_empty());
    // A second restore to the same name is refused and changes nothing.
    let out = env.cbt(&argv).await;
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(env.t);
}
