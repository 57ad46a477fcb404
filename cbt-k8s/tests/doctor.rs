//! `cbt doctor` through the library against the fake cluster: a fully healthy cluster (the
//! upstream CRDs installed, a snapshot-controller pod, the driver's pod with the
//! csi-snapshot-metadata sidecar behind a Service whose EndpointSlice leads to the in-process
//! TLS metadata server in sidecar mode, the SnapshotMetadataService with the right CA, the
//! mover's ServiceAccount, a default snapshot class) where every check passes, then each
//! broken piece shown failing with its own check id while the rest stay sensible.
//!
//! Assertions are on check ids and statuses (and typed values), never on message text.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cbt_csi::server::{FileMetadataService, Listen, RunningServer, ServerOptions, TlsIdentity};
use cbt_k8s::doctor::{
    CheckId, DoctorOptions, DoctorReport, Status, denied_permissions, run_doctor,
};
use cbt_k8s::pvc_backup::{MOVER_PERMISSION, ORCHESTRATOR_PERMISSIONS, Permission, rbac_objects};
use cbt_k8s::{ClusterTarget, connect};
use fake_kube::crds::upstream;
use fake_kube::rbac::{Policy, UserInfo};
use fake_kube::{FakeKube, SharedBackend};
use serde_json::{Value, json};

const NS: &str = "db";
const DRIVER: &str = "hostpath.csi.k8s.io";
const AUDIENCE: &str = "cbt-doctor-test";
/// The sidecar's namespace and Service; the fixture certificate has this DNS name.
const SIDECAR_NS: &str = "cbt-test";
const SERVICE: &str = "snapshot-metadata";
const ADDRESS: &str = "snapshot-metadata.cbt-test.svc:6443";
/// Images the simulated kubelet runs as `sleep` (only a pod's first container runs).
const PLUGIN_IMAGE: &str = "registry.k8s.io/sig-storage/hostpathplugin:v1.17.0";
const CONTROLLER_IMAGE: &str = "registry.k8s.io/sig-storage/snapshot-controller:v8.2.0";
const SIDECAR_IMAGE: &str = "registry.k8s.io/sig-storage/csi-snapshot-metadata:v1.1.0";
const DOCTOR_TOKEN: &str = "backup-operator-token";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../cbt-csi/tests/fixtures")
        .join(name)
}

/// Which SnapshotMetadataService CRD is installed.
#[derive(Clone, Copy, PartialEq)]
enum SmsCrd {
    Beta,
    AlphaOnly,
}

/// What the fake cluster has; `Setup::default()` is healthy.
#[derive(Clone)]
struct Setup {
    snapshot_api: bool,
    sms_crd: SmsCrd,
    /// None: no controller pod; Some(true) running; Some(false) stuck pulling its image.
    controller: Option<bool>,
    cr: bool,
    ca: &'static str,
    sidecar_container: bool,
    service: bool,
    endpoints: bool,
    default_classes: usize,
    mover_account: bool,
    /// Run doctor as a non-admin user under this RBAC policy (None: as the admin, no policy).
    rbac: Option<Policy>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            snapshot_api: true,
            sms_crd: SmsCrd::Beta,
            controller: Some(true),
            cr: true,
            ca: "ca.pem",
            sidecar_container: true,
            service: true,
            endpoints: true,
            default_classes: 1,
            mover_account: true,
            rbac: None,
        }
    }
}

struct Env {
    _t: tempfile::TempDir,
    kube: FakeKube,
    _sidecar: RunningServer,
    kubeconfig: PathBuf,
}

fn create(kube: &FakeKube, obj: Value) {
    kube.create(obj.clone())
        .unwrap_or_else(|e| panic!("{obj}: {e:?}"));
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..400 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

fn pod_phase(kube: &FakeKube, ns: &str, name: &str) -> String {
    kube.get("v1", "Pod", ns, name)
        .and_then(|p| p["status"]["phase"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A pod once its namespace's default ServiceAccount exists (the fake makes it asynchronously).
async fn create_pod(kube: &FakeKube, pod: Value) {
    let ns = pod["metadata"]["namespace"].as_str().unwrap().to_string();
    wait_for("the default ServiceAccount", || {
        kube.get("v1", "ServiceAccount", &ns, "default").is_some()
    })
    .await;
    create(kube, pod);
}

/// Everything a policy must grant the doctor user besides the orchestrator's permissions: the
/// reads its checks make, TokenRequest for the mover, and SubjectAccessReviews.
fn doctor_reads() -> Vec<Value> {
    let read = |group: &str, resources: &[&str]| json!({"apiGroups": [group], "resources": resources, "verbs": ["get", "list"]});
    let rules = vec![
        read(
            "",
            &[
                "pods",
                "services",
                "serviceaccounts",
                "persistentvolumeclaims",
                "persistentvolumes",
            ],
        ),
        read("discovery.k8s.io", &["endpointslices"]),
        read("storage.k8s.io", &["csidrivers", "storageclasses"]),
        read("apiextensions.k8s.io", &["customresourcedefinitions"]),
        read("cbt.storage.k8s.io", &["snapshotmetadataservices"]),
        read(
            "snapshot.storage.k8s.io",
            &[
                "volumesnapshots",
                "volumesnapshotcontents",
                "volumesnapshotclasses",
            ],
        ),
        json!({"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}),
        json!({"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}),
    ];
    vec![
        json!({"kind": "ClusterRole", "metadata": {"name": "doctor-reads"}, "rules": rules}),
        json!({"kind": "ClusterRoleBinding", "metadata": {"name": "doctor-reads"},
               "roleRef": {"kind": "ClusterRole", "name": "doctor-reads"},
               "subjects": [{"kind": "User", "name": "backup-operator"}]}),
    ]
}

/// A policy granting the doctor user `orchestrator` (plus its own reads) and the mover
/// `mover` permissions.
fn policy(orchestrator: &[Permission], mover: &[Permission]) -> Policy {
    let mut p = Policy::new();
    let user = json!({"kind": "User", "name": "backup-operator"});
    let sa = json!({"kind": "ServiceAccount", "name": "cbt-mover", "namespace": NS});
    for o in rbac_objects(orchestrator, NS, "cbt-backup", &user)
        .iter()
        .chain(rbac_objects(mover, NS, "cbt-mover", &sa).iter())
        .chain(doctor_reads().iter())
    {
        p.add_object(o).unwrap();
    }
    p
}

impl Env {
    async fn start(s: Setup) -> Self {
        let t = tempfile::tempdir().unwrap();
        let backend = SharedBackend::with_data_dir(t.path().join("array")).unwrap();
        let mut builder = FakeKube::builder()
            .driver(DRIVER)
            .backend(backend)
            .image(PLUGIN_IMAGE, "/usr/bin/sleep")
            .image(CONTROLLER_IMAGE, "/usr/bin/sleep")
            .user(DOCTOR_TOKEN, UserInfo::new("backup-operator", &[]));
        if !s.snapshot_api {
            builder = builder.without_snapshot_api();
        }
        let kube = builder.start().await.unwrap();
        if s.snapshot_api {
            kube.seed_standard(NS).unwrap();
        } else {
            kube.seed_namespace(NS).unwrap();
            kube.seed_csidriver(DRIVER).unwrap();
            kube.seed_storage_class("csi-hostpath-sc", DRIVER, true)
                .unwrap();
        }
        kube.seed_namespace(SIDECAR_NS).unwrap();
        kube.seed_namespace("kube-system").unwrap();
        if s.snapshot_api {
            for crd in [
                upstream::VOLUME_SNAPSHOTS,
                upstream::VOLUME_SNAPSHOT_CONTENTS,
                upstream::VOLUME_SNAPSHOT_CLASSES,
            ] {
                kube.install_yaml(crd).unwrap();
            }
            if s.default_classes == 0 {
                kube.delete(
                    "snapshot.storage.k8s.io/v1",
                    "VolumeSnapshotClass",
                    "",
                    "csi-snapclass",
                )
                .unwrap();
            }
            for i in 1..s.default_classes {
                kube.seed_snapshot_class(&format!("csi-snapclass-{i}"), DRIVER, true)
                    .unwrap();
            }
        }
        match s.sms_crd {
            SmsCrd::Beta => {
                kube.install_yaml(upstream::SNAPSHOT_METADATA_SERVICES)
                    .unwrap();
            }
            // The v0.1/v0.2 releases: the same CRD at v1alpha1 only.
            SmsCrd::AlphaOnly => {
                kube.install_yaml(
                    &upstream::SNAPSHOT_METADATA_SERVICES.replace("v1beta1", "v1alpha1"),
                )
                .unwrap();
            }
        }
        if s.mover_account {
            create(
                &kube,
                json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": "cbt-mover", "namespace": NS}}),
            );
        }
        let admin_kubeconfig = t.path().join("admin-kubeconfig");
        kube.write_kubeconfig(&admin_kubeconfig, "fake").unwrap();
        let kubeconfig = match &s.rbac {
            Some(policy) => {
                kube.set_rbac(Some(policy.clone()));
                let path = t.path().join("kubeconfig");
                kube.write_kubeconfig_as(&path, "fake", DOCTOR_TOKEN)
                    .unwrap();
                path
            }
            None => admin_kubeconfig.clone(),
        };

        // The metadata server in sidecar mode (TokenReview, SubjectAccessReview, VS -> handle)
        // over TLS with the fixture certificate (DNS name snapshot-metadata.cbt-test.svc).
        let admin = connect(&ClusterTarget {
            kubeconfig: Some(admin_kubeconfig),
            context: None,
        })
        .await
        .unwrap();
        let mut opts = ServerOptions::new(kube.snapshots_dir().unwrap());
        opts.block_size = 64 * 1024;
        opts.driver_name = DRIVER.into();
        opts.sidecar = Some(Arc::new(cbt_k8s::sidecar::KubeSidecar::new(
            admin.client,
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

        // The driver's pod: the plugin (run as `sleep`) and, normally, the sidecar container.
        let mut containers =
            vec![json!({"name": "hostpath", "image": PLUGIN_IMAGE, "args": ["3600"]})];
        if s.sidecar_container {
            containers.push(json!({"name": "csi-snapshot-metadata", "image": SIDECAR_IMAGE,
                "args": ["--csi-address=/csi/csi.sock", "--tls-cert=/tls/tls.crt", "--tls-key=/tls/tls.key"]}));
        }
        create_pod(
            &kube,
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "csi-hostpathplugin-0", "namespace": SIDECAR_NS,
                         "labels": {"app.kubernetes.io/name": "csi-hostpathplugin"}},
            "spec": {"containers": containers}}),
        )
        .await;
        if let Some(running) = s.controller {
            let image = if running {
                CONTROLLER_IMAGE
            } else {
                "registry.example/missing:v0"
            };
            create_pod(&kube, json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "snapshot-controller-0", "namespace": "kube-system",
                             "labels": {"app.kubernetes.io/name": "snapshot-controller"}},
                "spec": {"containers": [{"name": "snapshot-controller", "image": image, "args": ["3600"]}]}}))
            .await;
        }
        if s.service {
            create(
                &kube,
                json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": SERVICE, "namespace": SIDECAR_NS},
                "spec": {"selector": {"app.kubernetes.io/name": "csi-hostpathplugin"},
                         "ports": [{"name": "grpc", "port": 6443, "targetPort": 50051}]}}),
            );
        }
        if s.endpoints {
            // What the endpoint-slice controller would write; the pod "IP" is loopback, where
            // the in-process sidecar listens.
            create(
                &kube,
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{SERVICE}-x1"), "namespace": SIDECAR_NS,
                             "labels": {"kubernetes.io/service-name": SERVICE}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true},
                               "targetRef": {"kind": "Pod", "name": "csi-hostpathplugin-0", "namespace": SIDECAR_NS}}],
                "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}]}),
            );
        }
        if s.cr {
            let ca = std::fs::read(fixture(s.ca)).unwrap_or_else(|_| s.ca.as_bytes().to_vec());
            let version = match s.sms_crd {
                SmsCrd::Beta => "v1beta1",
                SmsCrd::AlphaOnly => "v1alpha1",
            };
            create(
                &kube,
                json!({
                    "apiVersion": format!("cbt.storage.k8s.io/{version}"), "kind": "SnapshotMetadataService",
                    "metadata": {"name": DRIVER},
                    "spec": {"address": ADDRESS, "audience": AUDIENCE,
                             "caCert": serde_json::to_value(k8s_openapi::ByteString(ca)).unwrap()},
                }),
            );
        }
        wait_for("the driver pod to run", || {
            pod_phase(&kube, SIDECAR_NS, "csi-hostpathplugin-0") == "Running"
        })
        .await;
        if s.controller == Some(true) {
            wait_for("the snapshot controller to run", || {
                pod_phase(&kube, "kube-system", "snapshot-controller-0") == "Running"
            })
            .await;
        }
        Env {
            _t: t,
            kube,
            _sidecar: sidecar,
            kubeconfig,
        }
    }

    /// A block PVC with some data and a ready VolumeSnapshot `snap` of it.
    async fn snapshot(&self) {
        self.kube
            .seed_pvc(NS, "data", "8Mi", "Block", &["ReadWriteOnce"], &[])
            .unwrap();
        let file = self.kube.pvc_backing_file(NS, "data").unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 128 * 1024], 1 << 20).unwrap();
        create(
            &self.kube,
            json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "snap", "namespace": NS},
            "spec": {"volumeSnapshotClassName": "csi-snapclass", "source": {"persistentVolumeClaimName": "data"}}}),
        );
        wait_for("the snapshot to be ready", || {
            self.kube
                .get("snapshot.storage.k8s.io/v1", "VolumeSnapshot", NS, "snap")
                .is_some_and(|v| v["status"]["readyToUse"] == true)
        })
        .await;
    }

    async fn doctor_with(&self, f: impl FnOnce(&mut DoctorOptions)) -> DoctorReport {
        let cluster = connect(&ClusterTarget {
            kubeconfig: Some(self.kubeconfig.clone()),
            context: None,
        })
        .await
        .unwrap();
        let mut opts = DoctorOptions::new(NS);
        opts.driver = Some(DRIVER.into());
        f(&mut opts);
        run_doctor(&cluster, &opts).await
    }

    async fn doctor(&self) -> DoctorReport {
        self.doctor_with(|_| {}).await
    }
}

/// Asserts the statuses of the checks named; all others must pass (or, for the probe without
/// a snapshot, be skipped).
#[track_caller]
fn expect(r: &DoctorReport, want: &[(CheckId, Status)]) {
    for c in &r.checks {
        // Every Warn and Fail says what to do.
        if matches!(c.status, Status::Warn | Status::Fail) {
            assert!(c.fix.as_deref().is_some_and(|f| !f.is_empty()), "{c:#?}");
        }
        let expected = want
            .iter()
            .find(|(id, _)| *id == c.id)
            .map(|(_, s)| *s)
            .unwrap_or(if c.id == CheckId::MetadataProbe {
                Status::Skip
            } else {
                Status::Pass
            });
        assert_eq!(c.status, expected, "{}: {c:#?}\nall: {r:#?}", c.id);
    }
    for (id, _) in want {
        assert!(r.check(*id).is_some(), "{id} missing");
    }
    let fails = want.iter().any(|(_, s)| *s == Status::Fail);
    assert_eq!(r.cbt_usable, !fails);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_cluster_passes_every_check_including_the_probe() {
    let env = Env::start(Setup::default()).await;
    env.snapshot().await;
    // No --driver: the driver comes from the snapshot.
    let r = env
        .doctor_with(|o| {
            o.driver = None;
            o.snapshot = Some("snap".into());
        })
        .await;
    expect(&r, &[(CheckId::MetadataProbe, Status::Pass)]);
    assert_eq!(r.drivers, [DRIVER]);
    let ids: Vec<CheckId> = r.checks.iter().map(|c| c.id).collect();
    assert_eq!(
        ids,
        [
            CheckId::ApiServer,
            CheckId::CsiDriver,
            CheckId::SnapshotApi,
            CheckId::SnapshotController,
            CheckId::MetadataCrd,
            CheckId::MetadataService,
            CheckId::MetadataSidecar,
            CheckId::MetadataEndpoints,
            CheckId::MetadataCa,
            CheckId::MetadataTls,
            CheckId::TokenRequest,
            CheckId::SnapshotClass,
            CheckId::OrchestratorRbac,
            CheckId::MoverAccess,
            CheckId::MetadataProbe,
        ]
    );
    assert!(r.checks.iter().all(|c| c.fix.is_none()));
    // The drivers of the namespace's block PVCs are found without --driver or --snapshot.
    let r = env.doctor_with(|o| o.driver = None).await;
    assert_eq!(r.drivers, [DRIVER]);
    expect(&r, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_snapshot_crds_the_snapshot_api_fails() {
    let env = Env::start(Setup {
        snapshot_api: false,
        ..Setup::default()
    })
    .await;
    let r = env.doctor_with(|o| o.snapshot = Some("snap".into())).await;
    expect(
        &r,
        &[
            (CheckId::SnapshotApi, Status::Fail),
            (CheckId::SnapshotClass, Status::Skip),
            (CheckId::MetadataProbe, Status::Skip),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_snapshot_controller_warns_and_a_broken_one_fails() {
    let env = Env::start(Setup {
        controller: None,
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[(CheckId::SnapshotController, Status::Warn)],
    );
    let env = Env::start(Setup {
        controller: Some(false),
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[(CheckId::SnapshotController, Status::Fail)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1alpha1_only_crd_is_the_old_release() {
    let env = Env::start(Setup {
        sms_crd: SmsCrd::AlphaOnly,
        ..Setup::default()
    })
    .await;
    let skip = Status::Skip;
    expect(
        &env.doctor().await,
        &[
            (CheckId::MetadataCrd, Status::Fail),
            (CheckId::MetadataService, skip),
            (CheckId::MetadataSidecar, skip),
            (CheckId::MetadataEndpoints, skip),
            (CheckId::MetadataCa, skip),
            (CheckId::MetadataTls, skip),
            (CheckId::TokenRequest, skip),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_snapshot_metadata_service_for_the_driver_is_the_odf_case() {
    let env = Env::start(Setup {
        cr: false,
        sidecar_container: false,
        ..Setup::default()
    })
    .await;
    env.snapshot().await;
    let skip = Status::Skip;
    let r = env.doctor_with(|o| o.snapshot = Some("snap".into())).await;
    expect(
        &r,
        &[
            (CheckId::MetadataService, Status::Fail),
            (CheckId::MetadataSidecar, skip),
            (CheckId::MetadataEndpoints, skip),
            (CheckId::MetadataCa, skip),
            (CheckId::MetadataTls, skip),
            (CheckId::TokenRequest, skip),
            (CheckId::MetadataProbe, skip),
        ],
    );
    assert_eq!(r.failures().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_pod_without_the_sidecar_container_fails() {
    let env = Env::start(Setup {
        sidecar_container: false,
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[(CheckId::MetadataSidecar, Status::Fail)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_service_or_one_without_endpoints_fails() {
    // Without the Service (and its slices) the name resolves nowhere: TLS cannot be tried
    // from here, which is a warning, not a second failure.
    let env = Env::start(Setup {
        service: false,
        endpoints: false,
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[
            (CheckId::MetadataEndpoints, Status::Fail),
            (CheckId::MetadataTls, Status::Warn),
        ],
    );
    let env = Env::start(Setup {
        endpoints: false,
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[
            (CheckId::MetadataEndpoints, Status::Fail),
            (CheckId::MetadataTls, Status::Warn),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_fails_the_handshake_and_a_garbage_one_the_ca_check() {
    let env = Env::start(Setup {
        ca: "other-ca.pem",
        ..Setup::default()
    })
    .await;
    env.snapshot().await;
    let r = env.doctor_with(|o| o.snapshot = Some("snap".into())).await;
    expect(
        &r,
        &[
            (CheckId::MetadataTls, Status::Fail),
            (CheckId::MetadataProbe, Status::Skip),
        ],
    );
    let env = Env::start(Setup {
        ca: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[
            (CheckId::MetadataCa, Status::Fail),
            (CheckId::MetadataTls, Status::Skip),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_token_request_warns_and_a_missing_mover_account_fails() {
    let env = Env::start(Setup::default()).await;
    env.snapshot().await;
    env.kube.faults().set_token_request_forbidden(true);
    let r = env.doctor_with(|o| o.snapshot = Some("snap".into())).await;
    // Backups do not need TokenRequest (the mover's token is projected), but nothing that
    // needs a token can be checked.
    expect(
        &r,
        &[
            (CheckId::TokenRequest, Status::Warn),
            (CheckId::MetadataProbe, Status::Skip),
        ],
    );
    env.kube.faults().set_token_request_forbidden(false);

    let env = Env::start(Setup {
        mover_account: false,
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[(CheckId::TokenRequest, Status::Fail)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_classes_need_exactly_one_default_or_a_named_one() {
    let env = Env::start(Setup {
        default_classes: 0,
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[(CheckId::SnapshotClass, Status::Fail)],
    );
    let env = Env::start(Setup {
        default_classes: 2,
        ..Setup::default()
    })
    .await;
    expect(
        &env.doctor().await,
        &[(CheckId::SnapshotClass, Status::Fail)],
    );
    // Naming one of them is fine; naming a missing one is not.
    let r = env
        .doctor_with(|o| o.snapshot_class = Some("csi-snapclass-1".into()))
        .await;
    expect(&r, &[]);
    let r = env
        .doctor_with(|o| o.snapshot_class = Some("nope".into()))
        .await;
    expect(&r, &[(CheckId::SnapshotClass, Status::Fail)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_rbac_passes_and_one_missing_verb_is_named() {
    let full = policy(ORCHESTRATOR_PERMISSIONS, &[MOVER_PERMISSION]);
    let env = Env::start(Setup {
        rbac: Some(full),
        ..Setup::default()
    })
    .await;
    env.snapshot().await;
    let r = env.doctor_with(|o| o.snapshot = Some("snap".into())).await;
    expect(&r, &[(CheckId::MetadataProbe, Status::Pass)]);
    assert!(env.kube.denied().is_empty(), "{:#?}", env.kube.denied());

    // Without `delete jobs`: the RBAC check fails and names exactly that permission.
    let without: Vec<Permission> = ORCHESTRATOR_PERMISSIONS
        .iter()
        .copied()
        .filter(|p| !(p.verb == "delete" && p.resource == "jobs"))
        .collect();
    env.kube
        .set_rbac(Some(policy(&without, &[MOVER_PERMISSION])));
    let r = env.doctor().await;
    expect(&r, &[(CheckId::OrchestratorRbac, Status::Fail)]);
    let cluster = connect(&ClusterTarget {
        kubeconfig: Some(env.kubeconfig.clone()),
        context: None,
    })
    .await
    .unwrap();
    let denied = denied_permissions(&cluster.client, NS, ORCHESTRATOR_PERMISSIONS)
        .await
        .unwrap();
    assert_eq!(denied.len(), 1);
    assert_eq!(
        (denied[0].verb, denied[0].group, denied[0].resource),
        ("delete", "batch", "jobs")
    );

    // Only an optional permission missing (watch: backups poll instead) is a warning.
    let without_watch: Vec<Permission> = ORCHESTRATOR_PERMISSIONS
        .iter()
        .copied()
        .filter(|p| p.verb != "watch")
        .collect();
    env.kube
        .set_rbac(Some(policy(&without_watch, &[MOVER_PERMISSION])));
    expect(
        &env.doctor().await,
        &[(CheckId::OrchestratorRbac, Status::Warn)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_that_may_not_get_volume_snapshots_fails_and_so_does_the_probe() {
    let env = Env::start(Setup {
        rbac: Some(policy(ORCHESTRATOR_PERMISSIONS, &[])),
        ..Setup::default()
    })
    .await;
    env.snapshot().await;
    let r = env.doctor_with(|o| o.snapshot = Some("snap".into())).await;
    expect(
        &r,
        &[
            (CheckId::MoverAccess, Status::Fail),
            (CheckId::MetadataProbe, Status::Fail),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probing_a_missing_snapshot_fails() {
    let env = Env::start(Setup::default()).await;
    let r = env.doctor_with(|o| o.snapshot = Some("nope".into())).await;
    expect(&r, &[(CheckId::MetadataProbe, Status::Fail)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_doctor_may_not_make_are_warnings_not_failures() {
    // The doctor user has only the orchestrator's permissions: it may not list pods in other
    // namespaces, read CRDs, Services, slices, tokens or SubjectAccessReviews.
    let mut p = Policy::new();
    let user = json!({"kind": "User", "name": "backup-operator"});
    for o in rbac_objects(ORCHESTRATOR_PERMISSIONS, NS, "cbt-backup", &user) {
        p.add_object(&o).unwrap();
    }
    let env = Env::start(Setup {
        rbac: Some(p),
        ..Setup::default()
    })
    .await;
    let r = env.doctor().await;
    let warn = Status::Warn;
    expect(
        &r,
        &[
            (CheckId::CsiDriver, warn),
            (CheckId::SnapshotController, warn),
            // Falls back to API discovery, which everyone may read.
            (CheckId::MetadataCrd, Status::Pass),
            (CheckId::MetadataSidecar, warn),
            (CheckId::MetadataEndpoints, warn),
            // The Service name does not resolve here and its endpoints could not be read.
            (CheckId::MetadataTls, warn),
            (CheckId::TokenRequest, warn),
            (CheckId::MoverAccess, warn),
        ],
    );
}
