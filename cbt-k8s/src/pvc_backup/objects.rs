//! The objects `cbt backup --pvc` and `cbt restore --to-pvc` create, built as values (pure): a
//! VolumeSnapshot, a temporary block PVC restored from it, and the data-mover Job; a restore
//! target PVC and its mover Job. `--dry-run` prints exactly these.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, ProjectedVolumeSource,
    SecretKeySelector, SecurityContext, ServiceAccountTokenProjection, TypedLocalObjectReference,
    Volume, VolumeDevice, VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::mover::{MoverSpec, SPEC_ENV};
use crate::quantity;
use crate::snapshot::{VolumeSnapshot, VolumeSnapshotSource, VolumeSnapshotSpec};

/// Label on every object this tool creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "cbt";
/// Label naming the uid of the PVC a snapshot was cut from (retention works per PVC).
pub const PVC_UID_LABEL: &str = "cbt.io/pvc-uid";
/// Label naming the role of an object (`snapshot`, `source`, `mover`, `restore-target`).
pub const ROLE_LABEL: &str = "cbt.io/role";
/// Annotation saying which command created the object (owner of its lifecycle).
pub const OWNER_ANNOTATION: &str = "cbt.io/created-by";
/// Annotation naming the repository volume an object belongs to.
pub const VOLUME_ANNOTATION: &str = "cbt.io/volume";
/// Where the mover sees the attached block device.
pub const DEVICE_PATH: &str = "/dev/cbt-volume";
/// Where the projected metadata token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/cbt";
/// File name of the token inside [`TOKEN_DIR`].
pub const TOKEN_FILE: &str = "metadata-token";
/// Keys of the S3 credentials Secret, passed to the mover as the standard AWS variables, plus
/// the optional password of an encrypted repository (`CBT_PASSWORD`; not passed when the
/// repository is opened with a key file, see [`KEY_FILE_SECRET_KEY`]).
pub const S3_SECRET_KEYS: [(&str, bool); 4] = [
    ("AWS_ACCESS_KEY_ID", false),
    ("AWS_SECRET_ACCESS_KEY", false),
    ("AWS_SESSION_TOKEN", true),
    ("CBT_PASSWORD", true),
];

/// Key of the S3 credentials Secret holding the key file of an encrypted repository opened with
/// one (`kubectl create secret generic S3_SECRET --from-file=CBT_KEY_FILE=repo.key ...`).
pub const KEY_FILE_SECRET_KEY: &str = "CBT_KEY_FILE";
/// Variable through which the mover gets the key file's contents (the Secret's
/// [`KEY_FILE_SECRET_KEY`]): a reference, required, so a Secret without it stops the Job at
/// once with `CreateContainerConfigError` instead of a mover that cannot open the repository.
pub const KEY_FILE_ENV: &str = "CBT_MOVER_KEY_FILE";

/// Labels and annotations marking an object as ours.
fn ours(role: &str, pvc_uid: Option<&str>, volume: &str, created_by: &str) -> ObjectMeta {
    let mut labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (ROLE_LABEL.to_string(), role.to_string()),
    ]);
    if let Some(uid) = pvc_uid.filter(|u| !u.is_empty()) {
        labels.insert(PVC_UID_LABEL.to_string(), uid.to_string());
    }
    ObjectMeta {
        labels: Some(labels),
        annotations: Some(BTreeMap::from([
            (OWNER_ANNOTATION.to_string(), created_by.to_string()),
            (VOLUME_ANNOTATION.to_string(), volume.to_string()),
        ])),
        ..ObjectMeta::default()
    }
}

/// The VolumeSnapshot of `pvc` a backup cuts.
pub fn volume_snapshot(
    name: &str,
    namespace: &str,
    pvc: &str,
    pvc_uid: &str,
    class: Option<&str>,
    volume: &str,
) -> VolumeSnapshot {
    let mut vs = VolumeSnapshot::new(
        name,
        VolumeSnapshotSpec {
            source: VolumeSnapshotSource {
                persistent_volume_claim_name: Some(pvc.to_string()),
                volume_snapshot_content_name: None,
            },
            volume_snapshot_class_name: class.map(str::to_string),
        },
    );
    let meta = ours("snapshot", Some(pvc_uid), volume, "cbt backup --pvc");
    vs.metadata.namespace = Some(namespace.to_string());
    vs.metadata.labels = meta.labels;
    vs.metadata.annotations = meta.annotations;
    vs
}

/// A block PVC of `size_bytes`: restored from VolumeSnapshot `from_snapshot` when given.
#[allow(clippy::too_many_arguments)] // one value per field of the object, all required
pub fn block_pvc(
    name: &str,
    namespace: &str,
    size_bytes: u64,
    storage_class: Option<&str>,
    access_modes: &[String],
    from_snapshot: Option<&str>,
    role: &str,
    volume: &str,
    created_by: &str,
) -> PersistentVolumeClaim {
    let mut meta = ours(role, None, volume, created_by);
    meta.name = Some(name.to_string());
    meta.namespace = Some(namespace.to_string());
    let modes = if access_modes.is_empty() {
        vec!["ReadWriteOnce".to_string()]
    } else {
        access_modes.to_vec()
    };
    PersistentVolumeClaim {
        metadata: meta,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(modes),
            volume_mode: Some("Block".into()),
            storage_class_name: storage_class.map(str::to_string),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    quantity::from_bytes(size_bytes),
                )])),
                ..Default::default()
            }),
            data_source: from_snapshot.map(|s| TypedLocalObjectReference {
                api_group: Some(crate::snapshot::GROUP.into()),
                kind: "VolumeSnapshot".into(),
                name: s.to_string(),
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// How a mover Job runs: image, identity, credentials, limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoverRuntime {
    /// Container image holding the `cbt` binary.
    pub image: String,
    /// ServiceAccount the pod runs as (the backup identity the metadata sidecar authorizes).
    pub service_account: String,
    /// Secret with the S3 credentials ([`S3_SECRET_KEYS`]); `None` for a local repository.
    pub s3_secret: Option<String>,
    /// The repository is opened with a key file: the mover gets it from the Secret's
    /// [`KEY_FILE_SECRET_KEY`] (as [`KEY_FILE_ENV`]) instead of `CBT_PASSWORD`.
    pub key_file: bool,
    /// Audience of the projected metadata token (backups only).
    pub token_audience: Option<String>,
    /// Seconds before the Job is stopped.
    pub active_deadline_seconds: i64,
}

/// The mover Job running `spec` with PVC `pvc` attached as a raw block device.
#[allow(clippy::too_many_arguments)] // one value per part of the object, all required
pub fn mover_job(
    name: &str,
    namespace: &str,
    pvc: &str,
    spec: &MoverSpec,
    rt: &MoverRuntime,
    role: &str,
    volume: &str,
    created_by: &str,
) -> Job {
    let mut meta = ours(role, None, volume, created_by);
    meta.name = Some(name.to_string());
    meta.namespace = Some(namespace.to_string());
    let spec_json = serde_json::to_string(spec).unwrap_or_default();
    let mut env = vec![EnvVar {
        name: SPEC_ENV.into(),
        value: Some(spec_json),
        value_from: None,
    }];
    if let Some(secret) = &rt.s3_secret {
        let from_secret = |name: &str, key: &str, optional: bool| EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.clone(),
                    key: key.into(),
                    optional: optional.then_some(true),
                }),
                ..Default::default()
            }),
        };
        for (key, optional) in S3_SECRET_KEYS {
            if rt.key_file && key == "CBT_PASSWORD" {
                continue;
            }
            env.push(from_secret(key, key, optional));
        }
        if rt.key_file {
            env.push(from_secret(KEY_FILE_ENV, KEY_FILE_SECRET_KEY, false));
        }
    }
    let mut volumes = vec![Volume {
        name: "volume".into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: pvc.to_string(),
            read_only: None,
        }),
        ..Default::default()
    }];
    let mut mounts = Vec::new();
    if let Some(audience) = &rt.token_audience {
        volumes.push(Volume {
            name: "metadata-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(audience.clone()),
                        expiration_seconds: Some(3600),
                        path: TOKEN_FILE.into(),
                    }),
                    ..Default::default()
                }]),
                default_mode: None,
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "metadata-token".into(),
            mount_path: TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let container = Container {
        name: "mover".into(),
        image: Some(rt.image.clone()),
        command: Some(vec!["cbt".into()]),
        args: Some(vec![
            "mover".into(),
            "--result-file".into(),
            "/dev/termination-log".into(),
        ]),
        env: Some(env),
        volume_devices: Some(vec![VolumeDevice {
            name: "volume".into(),
            device_path: DEVICE_PATH.into(),
        }]),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        termination_message_path: Some("/dev/termination-log".into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // A raw block device node is owned by root (mode 0660, group disk): the mover opens it
        // as uid 0, without any capability, so one image serves the orchestrator (non-root)
        // and the mover alike.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut pod_labels = meta.labels.clone().unwrap_or_default();
    pod_labels.insert("cbt.io/job".into(), name.to_string());
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(rt.active_deadline_seconds),
            ttl_seconds_after_finished: Some(3600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    service_account_name: Some(rt.service_account.clone()),
                    automount_service_account_token: Some(false),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// A short stable hex digest (FNV-1a, 64 bits) for object names; not for security.
pub fn short_hash(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.as_bytes().iter().chain(std::iter::once(&0u8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// `prefix-<name>-<suffix>` cut to `max` bytes (DNS label rules: lowercase, digits, `-`).
pub fn object_name(prefix: &str, name: &str, suffix: &str, max: usize) -> String {
    let room = max.saturating_sub(prefix.len() + suffix.len() + 2);
    let mut middle: String = name.chars().take(room).collect();
    while middle.ends_with(['-', '.']) {
        middle.pop();
    }
    let middle = middle.replace('.', "-");
    if middle.is_empty() {
        format!("{prefix}-{suffix}")
    } else {
        format!("{prefix}-{middle}-{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mover::{MOVER_SPEC_VERSION, MoverTask, RestoreTask};

    #[test]
    fn names_fit_their_limits() {
        let n = object_name("cbt-backup", &"x".repeat(300), "0123456789abcdef", 63);
        assert_eq!(n.len(), 63);
        assert!(n.starts_with("cbt-backup-x") && n.ends_with("-0123456789abcdef"));
        assert_eq!(object_name("a", "db.data", "1", 63), "a-db-data-1");
        assert_ne!(short_hash(&["a", "bc"]), short_hash(&["ab", "c"]));
    }

    #[test]
    fn the_mover_job_carries_no_secret_and_attaches_the_volume_raw() {
        let spec = MoverSpec {
            version: MOVER_SPEC_VERSION,
            repo: "s3://b/p".into(),
            s3_endpoint: None,
            s3_region: None,
            device: DEVICE_PATH.into(),
            task: MoverTask::Restore(RestoreTask {
                volume: "v".into(),
                snapshot: "s".into(),
            }),
        };
        let rt = MoverRuntime {
            image: "cbt:dev".into(),
            service_account: "cbt-mover".into(),
            s3_secret: Some("s3-creds".into()),
            key_file: false,
            token_audience: Some("aud".into()),
            active_deadline_seconds: 60,
        };
        let job = mover_job("j", "ns", "pvc", &spec, &rt, "mover", "v", "test");
        let json = serde_json::to_value(&job).expect("serializes");
        let c = &json["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["volumeDevices"][0]["devicePath"], DEVICE_PATH);
        assert_eq!(
            c["env"][1]["valueFrom"]["secretKeyRef"]["name"], "s3-creds",
            "credentials by reference only"
        );
        assert!(c["env"][1]["value"].is_null());
        let vols = &json["spec"]["template"]["spec"]["volumes"];
        assert_eq!(
            vols[1]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "aud"
        );
        assert_eq!(json["spec"]["backoffLimit"], 0);
        let names = |json: &serde_json::Value| -> Vec<String> {
            json["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap_or(&Vec::new())
                .iter()
                .filter_map(|e| e["name"].as_str().map(str::to_string))
                .collect()
        };
        assert!(names(&json).contains(&"CBT_PASSWORD".to_string()));
        assert!(!names(&json).contains(&KEY_FILE_ENV.to_string()));

        // Opened with a key file: the mover gets it (required) instead of the password.
        let rt = MoverRuntime {
            key_file: true,
            ..rt
        };
        let job = mover_job("j", "ns", "pvc", &spec, &rt, "mover", "v", "test");
        let json = serde_json::to_value(&job).expect("serializes");
        assert!(!names(&json).contains(&"CBT_PASSWORD".to_string()));
        let env = json["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let kf = env
            .iter()
            .find(|e| e["name"] == KEY_FILE_ENV)
            .expect("key file variable");
        assert!(kf["value"].is_null(), "by reference only");
        assert_eq!(kf["valueFrom"]["secretKeyRef"]["key"], KEY_FILE_SECRET_KEY);
        assert!(kf["valueFrom"]["secretKeyRef"]["optional"].is_null());
    }
}
