//! The fake cluster the Kubernetes tests of `cbt` share: the SnapshotMetadataService resource
//! type, an S3 repository server with its credentials, and the metadata sidecar (the file
//! server over the fake array's snapshots, over TLS with the test CA, checking tokens through
//! the cluster as the real sidecar does). Each test file builds its own `FakeKube` (images,
//! users, RBAC and APIs differ) and takes the rest from here.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report
#![allow(dead_code)] // each test binary uses a part

pub mod replication;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use cbt_csi::server::{FileMetadataService, Listen, RunningServer, ServerOptions, TlsIdentity};
use cbt_store::testing::S3TestServer;
use fake_kube::{FakeKube, ResourceType};
use serde_json::{Value, json};

/// The CSI driver of the fake array.
pub const DRIVER: &str = "hostpath.csi.k8s.io";
/// The bucket every test repository lives in.
pub const BUCKET: &str = "backups";
/// The mover image of the PVC tests (the `cbt` binary under test).
pub const MOVER_IMAGE: &str = "registry.example/cbt:e2e";

/// The SnapshotMetadataService kind, served as a CRD.
pub fn sms() -> ResourceType {
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

/// A file of cbt-csi's test fixtures (the test CA, the sidecar's certificate and key).
pub fn csi_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cbt-csi/tests/fixtures")
        .join(name)
}

/// An S3 server on loopback with the test bucket.
pub async fn s3_server() -> S3TestServer {
    let s3 = S3TestServer::start().await.unwrap();
    s3.create_bucket(BUCKET).unwrap();
    s3
}

/// The server's access key and secret as a Secret's `stringData`.
pub fn s3_credentials(s3: &S3TestServer) -> serde_json::Map<String, Value> {
    s3.env()
        .into_iter()
        .filter(|(k, _)| k.starts_with("AWS_ACCESS") || k.starts_with("AWS_SECRET"))
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

/// Creates Secret `name` in `ns` holding the server's credentials (the mover's, by reference).
pub fn create_s3_secret(kube: &FakeKube, s3: &S3TestServer, ns: &str, name: &str) {
    kube.create(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns}, "stringData": s3_credentials(s3)}))
        .unwrap();
}

/// Starts the metadata sidecar on loopback TCP with TLS; its TokenReview and
/// SubjectAccessReview go to the cluster with the credentials of `admin_kubeconfig`.
pub async fn start_sidecar(
    kube: &FakeKube,
    admin_kubeconfig: &Path,
    audience: &str,
) -> RunningServer {
    let cluster = cbt_k8s::connect(&cbt_k8s::ClusterTarget {
        kubeconfig: Some(admin_kubeconfig.to_path_buf()),
        context: None,
    })
    .await
    .unwrap();
    let mut opts = ServerOptions::new(kube.snapshots_dir().unwrap());
    opts.block_size = 64 * 1024;
    opts.driver_name = DRIVER.into();
    opts.sidecar = Some(Arc::new(cbt_k8s::sidecar::KubeSidecar::new(
        cluster.client,
        audience,
        DRIVER,
    )));
    cbt_csi::server::spawn(
        FileMetadataService::new(opts).unwrap(),
        Listen::Tcp("127.0.0.1:0".parse().unwrap()),
        Some(TlsIdentity {
            cert_pem: std::fs::read(csi_fixture("server.pem")).unwrap(),
            key_pem: std::fs::read(csi_fixture("server.key")).unwrap(),
        }),
    )
    .await
    .unwrap()
}

/// Creates the driver's SnapshotMetadataService pointing at `sidecar` (by `localhost`, the
/// name its certificate carries) with the test CA.
pub fn register_sidecar(kube: &FakeKube, sidecar: &RunningServer, audience: &str) {
    let port = sidecar.local_addr().unwrap().port();
    let ca = std::fs::read(csi_fixture("ca.pem")).unwrap();
    kube.create(json!({
        "apiVersion": "cbt.storage.k8s.io/v1beta1", "kind": "SnapshotMetadataService",
        "metadata": {"name": DRIVER},
        "spec": {"address": format!("localhost:{port}"), "audience": audience,
                 "caCert": serde_json::to_value(k8s_openapi::ByteString(ca)).unwrap()},
    }))
    .unwrap();
}

/// A fake cluster ready for `cbt backup --pvc`: the namespace with the standard classes, the
/// mover's ServiceAccount, an admin kubeconfig, the S3 repository with its Secret `s3-creds`,
/// and the metadata sidecar registered for the driver.
pub struct Cluster {
    /// Holds the array's files and the kubeconfig.
    pub t: tempfile::TempDir,
    /// The API server.
    pub kube: FakeKube,
    /// The repository's S3 server.
    pub s3: S3TestServer,
    /// The metadata sidecar (kept running).
    pub _sidecar: RunningServer,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The repository URL.
    pub repo: String,
    /// The namespace of the PVCs.
    pub ns: String,
}

impl Cluster {
    /// Completes a started `kube` (built over `t`) for namespace `ns`.
    pub async fn from_kube(t: tempfile::TempDir, kube: FakeKube, ns: &str, audience: &str) -> Self {
        kube.seed_standard(ns).unwrap();
        kube.create(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "cbt-mover", "namespace": ns}}))
            .unwrap();
        let kubeconfig = t.path().join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig, "fake").unwrap();
        // The repository and the mover's credentials, by reference in a Secret.
        let s3 = s3_server().await;
        create_s3_secret(&kube, &s3, ns, "s3-creds");
        let sidecar = start_sidecar(&kube, &kubeconfig, audience).await;
        register_sidecar(&kube, &sidecar, audience);
        Cluster {
            t,
            kube,
            s3,
            _sidecar: sidecar,
            kubeconfig,
            repo: format!("s3://{BUCKET}/cluster-a"),
            ns: ns.to_string(),
        }
    }

    /// The cluster flags of a PVC run: the namespace, the admin kubeconfig, the mover image,
    /// its S3 Secret `s3-creds` and ServiceAccount `cbt-mover`.
    pub fn kube_args(&self) -> Vec<String> {
        [
            "-n",
            &self.ns,
            "--kubeconfig",
            self.kubeconfig.to_str().unwrap(),
            "--image",
            MOVER_IMAGE,
            "--s3-secret",
            "s3-creds",
            "--service-account",
            "cbt-mover",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Runs `cbt ARGS` followed by [`Cluster::kube_args`].
    pub async fn cbt_kube(&self, args: &[&str]) -> std::process::Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.kube_args());
        let argv: Vec<&str> = all.iter().map(String::as_str).collect();
        self.cbt(&argv).await
    }

    /// [`Cluster::cbt_kube`] that must succeed; its stdout as JSON (`Null` when it is not JSON).
    pub async fn ok_kube(&self, args: &[&str]) -> Value {
        succeeded(&format!("cbt {args:?}"), &self.cbt_kube(args).await)
    }

    /// Names (sorted) of the objects of a kind that cbt created.
    pub fn ours(&self, api_version: &str, kind: &str) -> Vec<String> {
        self.names(api_version, kind, |o| {
            o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cbt"
        })
    }

    /// Names (sorted) of the objects of a kind that `keep` selects.
    pub fn names(
        &self,
        api_version: &str,
        kind: &str,
        keep: impl Fn(&Value) -> bool,
    ) -> Vec<String> {
        let mut names: Vec<String> = self
            .kube
            .list(api_version, kind)
            .into_iter()
            .filter(|o| keep(o))
            .map(|o| o["metadata"]["name"].as_str().unwrap_or("").to_string())
            .collect();
        names.sort();
        names
    }

    /// The `cbt` command with the repository and the S3 endpoint (and its credentials), for runs
    /// that set more of the environment.
    pub fn command<S: AsRef<OsStr>>(&self, args: &[S]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cbt"));
        cmd.args(["--repo", &self.repo, "--s3-endpoint", &self.s3.endpoint()]);
        cmd.args(args);
        cmd.env_remove("CBT_REPO").env_remove("KUBECONFIG");
        for (k, v) in self.s3.env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the `cbt` binary with the repository and the S3 endpoint (and its credentials).
    pub async fn cbt(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().await.unwrap()
    }

    /// [`Cluster::cbt`] that must succeed; its stdout as JSON (`Null` when it is not JSON).
    pub async fn ok(&self, args: &[&str]) -> Value {
        succeeded(&format!("cbt {args:?}"), &self.cbt(args).await)
    }
}

/// The stdout of `what`, a run that must have succeeded, as JSON (`Null` when it is not JSON).
pub fn succeeded(what: &str, out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// The `cbt` binary run against one repository, with every `CBT_*` variable of the test
/// process removed (a developer's own settings must not leak into a test) and `env` set.
pub struct Cbt {
    /// The `--repo` URL.
    pub repo: String,
    /// Environment variables the runs get.
    pub env: Vec<(&'static str, String)>,
    /// Arguments before each command's own.
    pub extra: Vec<String>,
}

impl Cbt {
    /// Runs against the local repository in `dir`, with no extra environment or arguments.
    pub fn local(dir: &Path) -> Self {
        Cbt {
            repo: format!("file://{}", dir.display()),
            env: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Runs `cbt --repo REPO EXTRA.. ARGS..` to completion.
    pub fn cmd(&self, args: &[&str]) -> std::process::Output {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_cbt"));
        c.arg("--repo").arg(&self.repo);
        c.args(&self.extra);
        c.args(args);
        for var in [
            "CBT_REPO",
            "CBT_PASSWORD",
            "CBT_PASSWORD_FILE",
            "CBT_NEW_PASSWORD",
            "CBT_NEW_PASSWORD_FILE",
            "CBT_KEY_FILE",
            "CBT_MOVER_KEY_FILE",
            "CBT_MOVER_SPEC",
        ] {
            c.env_remove(var);
        }
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "cbt {args:?} failed with {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs with `-o json`, asserts success and parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }
}
