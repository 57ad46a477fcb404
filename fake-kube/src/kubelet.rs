//! The simulated scheduler and kubelet: pods run as real child processes of the test.
//!
//! # What a pod becomes
//! Only the pod's first container runs (init and sidecar containers are not simulated). Its
//! `image` must have been registered with [`crate::FakeKubeBuilder::image`] as a host
//! executable; an unknown image leaves the container waiting with `ErrImagePull`, then
//! `ImagePullBackOff`, forever. The command rule: no `command` runs the image's executable with
//! `args`; otherwise `command[0]` must name the image's entrypoint (the executable's file name,
//! e.g. `sh` for `/bin/sh`, bare or as any absolute path ending in it, or the registered path
//! itself) and the rest of `command` plus `args` are its arguments; anything else fails like a
//! missing binary (`StartError`, exit 128). `argv[0]` is `command[0]` (or the entrypoint name),
//! so multi-call binaries such as busybox work. `$(VAR)` references are expanded as upstream.
//!
//! A per-pod temporary directory holds everything the container sees at an in-container path:
//! `volumeDevices` of a `persistentVolumeClaim` volume are symlinks to the claim's backing file
//! (the claim must exist, be Bound and be `volumeMode: Block`; a missing or unbound claim keeps
//! the pod Pending as unschedulable). A device is still a regular file: opening it with
//! truncation or writing past its end changes its size, which a real device would not; the
//! kubelet sets the size back when the container exits and records a `BlockDeviceResized`
//! warning event on the pod; `volumeMounts` of `secret`, `configMap`, `emptyDir` and
//! `projected` (secret, configMap, serviceAccountToken) volumes are materialized as files,
//! tokens minted through the cluster's [`crate::TokenRegistry`] for the pod's ServiceAccount and
//! bound to the pod; `terminationMessagePath` is an empty file. Every occurrence of such a path
//! in the command, args, env values and workingDir is rewritten to the host path (longest
//! path first, only at path boundaries). The process gets exactly the container's env plus
//! `PATH` (the host's) and `HOME` (the pod directory), which is also its working directory
//! unless `workingDir` says otherwise.
//!
//! stdout and stderr go to one log file served as the pod log. On exit the container is
//! terminated with its exit code (128 + signal when killed), reason Completed, Error or
//! OOMKilled, and the termination message: the last 4096 bytes of the termination file, or
//! with `FallbackToLogsOnError` and an empty file on failure the last 80 lines of the log
//! (at most 2048 bytes). The pod is Succeeded or Failed: every restartPolicy is treated as
//! Never. Deleting a pod kills its process group at once (SIGKILL, no grace period); dropping
//! the [`crate::FakeKube`] kills every process it started.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::State;
use crate::kinds::{CONFIG_MAPS, PODS, SECRETS, SERVICE_ACCOUNTS, record_event, secret_bytes};
use crate::store::{NAMESPACES, PVCS, Selector, Store};
use crate::tokens::{BoundObject, ServiceAccountId};
use crate::values::rfc3339_now;

/// How much of the termination file becomes the message (the kubelet's limit).
const MAX_TERMINATION_MESSAGE: usize = 4096;
/// Log lines used as the message under FallbackToLogsOnError.
const FALLBACK_LOG_LINES: usize = 80;
/// Log bytes used as the message under FallbackToLogsOnError.
const FALLBACK_LOG_BYTES: usize = 2048;
/// The node every pod is scheduled to.
const NODE: &str = "fake-node";
/// How long a failed pull shows as `ErrImagePull` before `ImagePullBackOff` (shortened from
/// the kubelet's 10 s back-off so tests see both states quickly).
const IMAGE_PULL_BACKOFF: Duration = Duration::from_millis(200);

/// Why the kubelet killed a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KillReason {
    /// The pod was deleted.
    Deleted,
    /// The OOM fault fired.
    OomKilled,
}

/// A launched container's process.
struct PodRuntime {
    dir: PathBuf,
    log: PathBuf,
    container: String,
    /// Process group while running; None once it exited.
    pgid: Option<i32>,
    kill: Option<oneshot::Sender<KillReason>>,
}

/// The node agent of one fake cluster, plus the Job controller's retry state.
pub(crate) struct Kubelet {
    images: BTreeMap<String, PathBuf>,
    root: tempfile::TempDir,
    pods: Mutex<BTreeMap<String, PodRuntime>>,
    /// When each pod's image pull first failed, by pod uid.
    pull_failed: Mutex<BTreeMap<String, std::time::Instant>>,
    pub(crate) jobs: crate::jobs::JobController,
}

fn kill_group(pgid: i32) {
    use rustix::process::{Pid, Signal, kill_process_group};
    // pgid 1 would address init's group: never ours.
    if pgid > 1
        && let Some(pid) = Pid::from_raw(pgid)
    {
        // ESRCH just means the group is already gone.
        let _ = kill_process_group(pid, Signal::KILL);
    }
}

impl Kubelet {
    /// A kubelet running `images` (name to host executable), with its pod directories in a
    /// fresh temporary directory.
    pub(crate) fn new(
        images: BTreeMap<String, PathBuf>,
        job_backoff: Duration,
    ) -> std::io::Result<Self> {
        Ok(Self {
            images,
            root: tempfile::Builder::new().prefix("fake-kubelet-").tempdir()?,
            pods: Mutex::new(BTreeMap::new()),
            pull_failed: Mutex::new(BTreeMap::new()),
            jobs: crate::jobs::JobController::new(job_backoff),
        })
    }

    fn pods(&self) -> MutexGuard<'_, BTreeMap<String, PodRuntime>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kills every running container (used when the fake cluster is dropped).
    pub(crate) fn kill_all(&self) {
        for rt in self.pods().values_mut() {
            if let Some(pgid) = rt.pgid {
                kill_group(pgid);
            }
            rt.kill = None;
        }
    }

    /// The log file of a launched pod (by uid) and its container's name.
    pub(crate) fn log_of(&self, uid: &str) -> Option<(PathBuf, String)> {
        self.pods()
            .get(uid)
            .map(|r| (r.log.clone(), r.container.clone()))
    }

    /// Host pid (= process group) of a pod's running container, by pod uid.
    fn pid_of(&self, uid: &str) -> Option<i32> {
        self.pods().get(uid).and_then(|r| r.pgid)
    }
}

impl crate::FakeKube {
    /// The host pid of a pod's container while it runs (it leads its own process group).
    pub fn pod_pid(&self, ns: &str, name: &str) -> Option<u32> {
        let uid = self.get("v1", "Pod", ns, name)?["metadata"]["uid"]
            .as_str()?
            .to_string();
        self.state
            .kubelet
            .pid_of(&uid)
            .and_then(|p| u32::try_from(p).ok())
    }

    /// Everything a launched pod's container wrote to stdout and stderr so far.
    pub fn pod_log(&self, ns: &str, name: &str) -> Option<String> {
        let uid = self.get("v1", "Pod", ns, name)?["metadata"]["uid"]
            .as_str()?
            .to_string();
        let (path, _) = self.state.kubelet.log_of(&uid)?;
        std::fs::read(path)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|x| !x.is_empty())
}

/// Runs the ServiceAccount controller, the Job controller and the kubelet once.
pub(crate) fn reconcile(state: &Arc<State>, store: &mut Store) -> bool {
    let mut changed = default_service_accounts(store);
    changed |= crate::jobs::reconcile(state, store);
    changed |= reap_deleted(state, store);
    for pod in store.list(&PODS, None, &Selector::default()) {
        changed |= sync_pod(state, store, &pod);
    }
    changed
}

/// The ServiceAccount controller: every active namespace has a `default` account.
fn default_service_accounts(store: &mut Store) -> bool {
    let mut changed = false;
    for ns in store.list(&NAMESPACES, None, &Selector::default()) {
        let Some(name) = s(&ns, &["metadata", "name"]) else {
            continue;
        };
        if ns["metadata"].get("deletionTimestamp").is_some()
            || store.get(&SERVICE_ACCOUNTS, name, "default").is_ok()
        {
            continue;
        }
        let name = name.to_string();
        store.controller_create(
            &SERVICE_ACCOUNTS,
            &name,
            json!({"metadata": {"name": "default", "namespace": name}}),
        );
        changed = true;
    }
    changed
}

/// Kills the processes of deleted pods and forgets finished ones that are gone.
fn reap_deleted(state: &State, store: &Store) -> bool {
    let live: std::collections::BTreeSet<String> = store
        .list(&PODS, None, &Selector::default())
        .iter()
        .filter_map(|p| s(p, &["metadata", "uid"]).map(str::to_string))
        .collect();
    state
        .kubelet
        .pull_failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|uid, _| live.contains(uid));
    let mut pods = state.kubelet.pods();
    let gone: Vec<String> = pods
        .keys()
        .filter(|u| !live.contains(*u))
        .cloned()
        .collect();
    for uid in gone {
        let Some(rt) = pods.get_mut(&uid) else {
            continue;
        };
        if rt.pgid.is_some() {
            if let Some(kill) = rt.kill.take() {
                let _ = kill.send(KillReason::Deleted);
            }
        } else if let Some(rt) = pods.remove(&uid) {
            // Best effort: the directory lives under the kubelet's temp dir, removed at the end.
            let _ = std::fs::remove_dir_all(&rt.dir);
        }
    }
    false
}

/// The condition list entry, keeping `lastTransitionTime` while the status is unchanged.
fn cond(old: &Value, ty: &str, status: &str, reason: Option<&str>, message: Option<&str>) -> Value {
    let prev = old["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == ty));
    let ts = match prev {
        Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
        _ => json!(rfc3339_now()),
    };
    let mut c =
        json!({"type": ty, "status": status, "lastProbeTime": null, "lastTransitionTime": ts});
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    if let Some(m) = message {
        c["message"] = json!(m);
    }
    c
}

fn container_status(pod: &Value, c: &Value, state: Value, ready: bool, started: bool) -> Value {
    let uid = s(pod, &["metadata", "uid"]).unwrap_or("");
    let mut st = json!({
        "name": c["name"], "image": c["image"], "imageID": "",
        "ready": ready, "started": started, "restartCount": 0,
        "state": state, "lastState": {},
    });
    if state_is_started(&st["state"]) {
        st["containerID"] = json!(format!("fake://{uid}"));
        st["imageID"] = json!(format!(
            "fake-image://{}",
            c["image"].as_str().unwrap_or("")
        ));
    }
    st
}

fn state_is_started(state: &Value) -> bool {
    state["running"].is_object() || state["terminated"].is_object()
}

fn scheduled_base(old: &Value) -> Value {
    let start = old["startTime"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(rfc3339_now);
    json!({"hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "podIP": "127.0.0.1",
           "podIPs": [{"ip": "127.0.0.1"}], "qosClass": "BestEffort", "startTime": start})
}

fn update_status(store: &mut Store, pod: &Value, status: Value) -> bool {
    let ns = s(pod, &["metadata", "namespace"]).unwrap_or("").to_string();
    let name = s(pod, &["metadata", "name"]).unwrap_or("").to_string();
    let uid = pod["metadata"]["uid"].clone();
    store.controller_update(&PODS, &ns, &name, |o| {
        if o["metadata"]["uid"] == uid {
            o["status"] = status;
        }
    })
}

/// Pending, not scheduled: a claim is missing or unbound.
fn set_unschedulable(store: &mut Store, pod: &Value, why: &str) -> bool {
    let message = format!(
        "0/1 nodes are available: {why}. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
    );
    let old = &pod["status"];
    let status = json!({
        "phase": "Pending", "qosClass": "BestEffort",
        "conditions": [cond(old, "PodScheduled", "False", Some("Unschedulable"), Some(&message))],
    });
    let mut changed = update_status(store, pod, status);
    changed |= record_event(
        store,
        pod,
        "Warning",
        "FailedScheduling",
        &message,
        "default-scheduler",
    );
    changed
}

/// Scheduled, container not running: waiting with `reason`.
fn set_waiting(
    store: &mut Store,
    pod: &Value,
    c: &Value,
    reason: &str,
    message: Option<&str>,
) -> bool {
    let old = &pod["status"];
    let mut waiting = json!({"reason": reason});
    if let Some(m) = message {
        waiting["message"] = json!(m);
    }
    let cname = c["name"].as_str().unwrap_or("");
    let unready = format!("containers with unready status: [{cname}]");
    let mut status = scheduled_base(old);
    status["phase"] = json!("Pending");
    status["conditions"] = json!([
        cond(old, "PodReadyToStartContainers", "True", None, None),
        cond(old, "Initialized", "True", None, None),
        cond(
            old,
            "Ready",
            "False",
            Some("ContainersNotReady"),
            Some(&unready)
        ),
        cond(
            old,
            "ContainersReady",
            "False",
            Some("ContainersNotReady"),
            Some(&unready)
        ),
        cond(old, "PodScheduled", "True", None, None),
    ]);
    status["containerStatuses"] = json!([container_status(
        pod,
        c,
        json!({"waiting": waiting}),
        false,
        false
    )]);
    update_status(store, pod, status)
}

/// Terminated: the pod's final status.
fn terminated_status(old: &Value, pod: &Value, c: &Value, term: &Value) -> Value {
    let ok = term["exitCode"] == json!(0);
    let reason = if ok { "PodCompleted" } else { "PodFailed" };
    let mut status = scheduled_base(old);
    status["phase"] = json!(if ok { "Succeeded" } else { "Failed" });
    status["conditions"] = json!([
        cond(old, "PodReadyToStartContainers", "False", None, None),
        cond(old, "Initialized", "True", Some(reason), None),
        cond(old, "Ready", "False", Some(reason), None),
        cond(old, "ContainersReady", "False", Some(reason), None),
        cond(old, "PodScheduled", "True", None, None),
    ]);
    status["containerStatuses"] = json!([container_status(
        pod,
        c,
        json!({"terminated": term}),
        false,
        false
    )]);
    status
}

/// What fills a file of a secret, configMap or projected volume.
enum Content {
    Bytes(Vec<u8>),
    Token { audience: String, expiration: i64 },
}

/// One file to write into a volume directory.
struct VolumeFile {
    path: String,
    content: Content,
    mode: u32,
}

/// How a volume is materialized in the pod directory.
enum VolumePlan {
    Files(Vec<VolumeFile>),
    EmptyDir,
}

/// Volume name to how it is materialized.
type VolumePlans = BTreeMap<String, VolumePlan>;
/// devicePath to the backing file.
type Devices = Vec<(String, PathBuf)>;

/// Everything needed to start the container, decided before any file is written.
struct Plan {
    exe: PathBuf,
    arg0: String,
    argv: Vec<String>,
    env: Vec<(String, Vec<u8>)>,
    working_dir: Option<String>,
    devices: Devices,
    volumes: VolumePlans,
    /// (mountPath, volume name, subPath).
    mounts: Vec<(String, String, Option<String>)>,
    termination_path: String,
    fallback_to_logs: bool,
}

/// Why a container cannot start yet.
enum Blocked {
    Unschedulable(String),
    /// A WaitForFirstConsumer claim is being provisioned for the pod: nothing to report yet.
    Binding,
    Waiting {
        reason: &'static str,
        message: Option<String>,
        event: Option<(&'static str, String)>,
    },
    /// It can never start: terminated with `StartError`.
    StartError(String),
}

fn items_or_all(
    data: BTreeMap<String, Vec<u8>>,
    items: &Value,
    mode: u32,
) -> Result<Vec<VolumeFile>, String> {
    match items.as_array() {
        Some(items) => items
            .iter()
            .map(|it| {
                let key = it["key"].as_str().unwrap_or("");
                let bytes = data.get(key).cloned().ok_or_else(|| {
                    format!("configmap references non-existent config key: {key}")
                })?;
                Ok(VolumeFile {
                    path: it["path"].as_str().unwrap_or(key).to_string(),
                    content: Content::Bytes(bytes),
                    mode: it["mode"]
                        .as_u64()
                        .and_then(|m| u32::try_from(m).ok())
                        .unwrap_or(mode),
                })
            })
            .collect(),
        None => Ok(data
            .into_iter()
            .map(|(k, v)| VolumeFile {
                path: k,
                content: Content::Bytes(v),
                mode,
            })
            .collect()),
    }
}

fn secret_data(secret: &Value) -> BTreeMap<String, Vec<u8>> {
    secret["data"]
        .as_object()
        .map(|m| {
            m.keys()
                .filter_map(|k| secret_bytes(secret, k).map(|v| (k.clone(), v)))
                .collect()
        })
        .unwrap_or_default()
}

fn config_map_data(cm: &Value) -> BTreeMap<String, Vec<u8>> {
    use base64::Engine as _;
    let mut out = BTreeMap::new();
    if let Some(m) = cm["data"].as_object() {
        for (k, v) in m {
            out.insert(k.clone(), v.as_str().unwrap_or("").as_bytes().to_vec());
        }
    }
    if let Some(m) = cm["binaryData"].as_object() {
        for (k, v) in m {
            if let Ok(b) =
                base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or(""))
            {
                out.insert(k.clone(), b);
            }
        }
    }
    out
}

/// Files of a secret or configMap volume source; Ok(None) for a missing optional source.
fn source_files(
    store: &Store,
    ns: &str,
    src: &Value,
    is_secret: bool,
    default_mode: u32,
) -> Result<Option<Vec<VolumeFile>>, String> {
    let name_key = if is_secret { "secretName" } else { "name" };
    // Projected sources name secrets with `name`, volumes with `secretName`.
    let name = s(src, &[name_key])
        .or_else(|| s(src, &["name"]))
        .unwrap_or("");
    let optional = src["optional"] == json!(true);
    let (rt, what) = if is_secret {
        (&SECRETS, "secret")
    } else {
        (&CONFIG_MAPS, "configmap")
    };
    let Ok(obj) = store.get(rt, ns, name) else {
        return if optional {
            Ok(None)
        } else {
            Err(format!("{what} \"{name}\" not found"))
        };
    };
    let data = if is_secret {
        secret_data(&obj)
    } else {
        config_map_data(&obj)
    };
    let mode = src["defaultMode"]
        .as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .unwrap_or(default_mode);
    items_or_all(data, &src["items"], mode).map(Some)
}

fn plan_volumes(
    store: &Store,
    ns: &str,
    spec: &Value,
    c: &Value,
    backend: &crate::SharedBackend,
) -> Result<(VolumePlans, Devices), Blocked> {
    let volumes: BTreeMap<String, &Value> = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(|n| (n.to_string(), v)))
        .collect();
    let mount_failed = |vol: &str, msg: String| Blocked::Waiting {
        reason: "ContainerCreating",
        message: None,
        event: Some((
            "FailedMount",
            format!("MountVolume.SetUp failed for volume \"{vol}\" : {msg}"),
        )),
    };
    let mut devices = Vec::new();
    for d in c["volumeDevices"].as_array().into_iter().flatten() {
        let vol = d["name"].as_str().unwrap_or("");
        let claim = volumes
            .get(vol)
            .and_then(|v| s(v, &["persistentVolumeClaim", "claimName"]))
            .unwrap_or("");
        let pvc = store.get(&PVCS, ns, claim).ok();
        if pvc.as_ref().and_then(|p| s(p, &["spec", "volumeMode"])) != Some("Block") {
            return Err(Blocked::Waiting {
                reason: "ContainerCreating",
                message: None,
                event: Some((
                    "FailedMapVolume",
                    format!(
                        "MapVolume.SetUpDevice failed for volume \"{vol}\" : volume {claim} has volumeMode Filesystem, but is specified in volumeDevices"
                    ),
                )),
            });
        }
        let file = crate::volumes::volume_handle_of_pvc(store, ns, claim)
            .and_then(|h| backend.volume_path(&h))
            .filter(|p| p.is_file());
        let Some(file) = file else {
            return Err(Blocked::Waiting {
                reason: "ContainerCreating",
                message: None,
                event: Some((
                    "FailedMapVolume",
                    format!(
                        "MapVolume.SetUpDevice failed for volume \"{vol}\" : no backing file for claim {claim} (a SharedBackend with a data directory provisions block volumes as files)"
                    ),
                )),
            });
        };
        devices.push((d["devicePath"].as_str().unwrap_or("").to_string(), file));
    }
    let mut plans = BTreeMap::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or("").to_string();
        if plans.contains_key(&name) {
            continue;
        }
        let Some(v) = volumes.get(&name) else {
            continue;
        };
        let plan = if v["emptyDir"].is_object() {
            VolumePlan::EmptyDir
        } else if v["secret"].is_object() {
            let files = source_files(store, ns, &v["secret"], true, 0o644)
                .map_err(|e| mount_failed(&name, e))?;
            VolumePlan::Files(files.unwrap_or_default())
        } else if v["configMap"].is_object() {
            let files = source_files(store, ns, &v["configMap"], false, 0o644)
                .map_err(|e| mount_failed(&name, e))?;
            VolumePlan::Files(files.unwrap_or_default())
        } else if v["projected"].is_object() {
            let mode = v["projected"]["defaultMode"]
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(0o644);
            let mut files = Vec::new();
            for src in v["projected"]["sources"].as_array().into_iter().flatten() {
                if src["secret"].is_object() {
                    let f = source_files(store, ns, &src["secret"], true, mode)
                        .map_err(|e| mount_failed(&name, e))?;
                    files.extend(f.unwrap_or_default());
                } else if src["configMap"].is_object() {
                    let f = source_files(store, ns, &src["configMap"], false, mode)
                        .map_err(|e| mount_failed(&name, e))?;
                    files.extend(f.unwrap_or_default());
                } else if src["serviceAccountToken"].is_object() {
                    let t = &src["serviceAccountToken"];
                    files.push(VolumeFile {
                        path: t["path"].as_str().unwrap_or("token").to_string(),
                        content: Content::Token {
                            audience: t["audience"].as_str().unwrap_or("").to_string(),
                            expiration: t["expirationSeconds"]
                                .as_i64()
                                .unwrap_or(crate::tokens::DEFAULT_EXPIRATION_SECONDS),
                        },
                        mode,
                    });
                } else {
                    return Err(mount_failed(
                        &name,
                        "fake-kube projects only secret, configMap and serviceAccountToken sources"
                            .into(),
                    ));
                }
            }
            VolumePlan::Files(files)
        } else {
            return Err(mount_failed(
                &name,
                "fake-kube mounts only secret, configMap, projected and emptyDir volumes (claims only as volumeDevices)".into(),
            ));
        };
        plans.insert(name, plan);
    }
    Ok((plans, devices))
}

/// Resolves `env` and `envFrom`; the error is the kubelet's CreateContainerConfigError message.
fn resolve_env(
    store: &Store,
    ns: &str,
    pod: &Value,
    c: &Value,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut env: Vec<(String, Vec<u8>)> = Vec::new();
    for from in c["envFrom"].as_array().into_iter().flatten() {
        let prefix = from["prefix"].as_str().unwrap_or("");
        let (src, is_secret) = if from["secretRef"].is_object() {
            (&from["secretRef"], true)
        } else {
            (&from["configMapRef"], false)
        };
        let name = src["name"].as_str().unwrap_or("");
        let (rt, what) = if is_secret {
            (&SECRETS, "secret")
        } else {
            (&CONFIG_MAPS, "configmap")
        };
        match store.get(rt, ns, name) {
            Ok(obj) => {
                let data = if is_secret {
                    secret_data(&obj)
                } else {
                    config_map_data(&obj)
                };
                env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)));
            }
            Err(_) if src["optional"] == json!(true) => {}
            Err(_) => return Err(format!("{what} \"{name}\" not found")),
        }
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or("").to_string();
        let vf = &e["valueFrom"];
        let value: Option<Vec<u8>> = if vf.is_object() {
            if vf["secretKeyRef"].is_object() || vf["configMapKeyRef"].is_object() {
                let is_secret = vf["secretKeyRef"].is_object();
                let r = if is_secret {
                    &vf["secretKeyRef"]
                } else {
                    &vf["configMapKeyRef"]
                };
                let (obj_name, key) = (
                    r["name"].as_str().unwrap_or(""),
                    r["key"].as_str().unwrap_or(""),
                );
                let optional = r["optional"] == json!(true);
                let (rt, what, kind) = if is_secret {
                    (&SECRETS, "secret", "Secret")
                } else {
                    (&CONFIG_MAPS, "configmap", "ConfigMap")
                };
                match store.get(rt, ns, obj_name) {
                    Err(_) if optional => None,
                    Err(_) => return Err(format!("{what} \"{obj_name}\" not found")),
                    Ok(obj) => {
                        let data = if is_secret {
                            secret_data(&obj)
                        } else {
                            config_map_data(&obj)
                        };
                        match data.get(key) {
                            Some(v) => Some(v.clone()),
                            None if optional => None,
                            None => {
                                return Err(format!(
                                    "couldn't find key {key} in {kind} {ns}/{obj_name}"
                                ));
                            }
                        }
                    }
                }
            } else if let Some(path) = vf["fieldRef"]["fieldPath"].as_str() {
                Some(field_ref(pod, path)?.into_bytes())
            } else {
                // resourceFieldRef: no resources are simulated.
                Some(Vec::new())
            }
        } else {
            let raw = e["value"].as_str().unwrap_or("");
            Some(expand(raw, &env).into_bytes())
        };
        if let Some(v) = value {
            env.retain(|(k, _)| *k != name);
            env.push((name, v));
        }
    }
    Ok(env)
}

fn field_ref(pod: &Value, path: &str) -> Result<String, String> {
    let meta = &pod["metadata"];
    let subscript = |prefix: &str, map: &Value| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map[key].as_str().unwrap_or("").to_string())
    };
    let v = match path {
        "metadata.name" => meta["name"].as_str().unwrap_or("").to_string(),
        "metadata.namespace" => meta["namespace"].as_str().unwrap_or("").to_string(),
        "metadata.uid" => meta["uid"].as_str().unwrap_or("").to_string(),
        "spec.nodeName" => NODE.to_string(),
        "spec.serviceAccountName" => pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        "status.podIP" | "status.hostIP" => "127.0.0.1".to_string(),
        _ => subscript("metadata.labels['", &meta["labels"])
            .or_else(|| subscript("metadata.annotations['", &meta["annotations"]))
            .ok_or_else(|| format!("unsupported fieldPath: {path}"))?,
    };
    Ok(v)
}

/// Expands `$(VAR)` from `env` as the kubelet does: `$$` escapes, unknown references stay.
fn expand(input: &str, env: &[(String, Vec<u8>)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(&String::from_utf8_lossy(v)),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The host executable and argv for the container; Err is a StartError message.
fn resolve_command(
    exe: &Path,
    c: &Value,
    env: &[(String, Vec<u8>)],
) -> Result<(String, Vec<String>), String> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|x| expand(x.as_str().unwrap_or(""), env))
            .collect()
    };
    let command = strings(&c["command"]);
    let args = strings(&c["args"]);
    let entry = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(first) = command.first() else {
        return Ok((entry, args));
    };
    let named = Path::new(first)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let matches = *first == entry
        || Path::new(first) == exe
        || (first.starts_with('/') && named.as_deref() == Some(entry.as_str()));
    if !matches {
        return Err(format!(
            "failed to create containerd task: failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: exec: \"{first}\": executable file not found in $PATH: unknown"
        ));
    }
    let mut argv: Vec<String> = command[1..].to_vec();
    argv.extend(args);
    Ok((first.clone(), argv))
}

fn plan(state: &State, store: &Store, pod: &Value, c: &Value) -> Result<Plan, Blocked> {
    let ns = s(pod, &["metadata", "namespace"]).unwrap_or("");
    let spec = &pod["spec"];
    // Scheduling: every claim must exist and be bound.
    for v in spec["volumes"].as_array().into_iter().flatten() {
        if let Some(claim) = s(v, &["persistentVolumeClaim", "claimName"]) {
            match store.get(&PVCS, ns, claim) {
                Err(_) => {
                    return Err(Blocked::Unschedulable(format!(
                        "persistentvolumeclaim \"{claim}\" not found"
                    )));
                }
                Ok(p) if s(&p, &["status", "phase"]) != Some("Bound") => {
                    // A delayed-binding claim is provisioned for this pod; the scheduler waits.
                    if crate::volumes::waits_for_consumer(store, &p) {
                        return Err(Blocked::Binding);
                    }
                    return Err(Blocked::Unschedulable(
                        "pod has unbound immediate PersistentVolumeClaims".into(),
                    ));
                }
                Ok(_) => {}
            }
        }
    }
    let image = c["image"].as_str().unwrap_or("");
    let Some(exe) = state.kubelet.images.get(image).cloned() else {
        let uid = s(pod, &["metadata", "uid"]).unwrap_or("").to_string();
        let first_failure = *state
            .kubelet
            .pull_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid)
            .or_insert_with(std::time::Instant::now);
        let backoff = first_failure.elapsed() >= IMAGE_PULL_BACKOFF;
        return Err(if backoff {
            Blocked::Waiting {
                reason: "ImagePullBackOff",
                message: Some(format!("Back-off pulling image \"{image}\"")),
                event: Some(("BackOff", format!("Back-off pulling image \"{image}\""))),
            }
        } else {
            let msg = format!(
                "failed to pull and unpack image \"{image}\": no executable is registered for this image (FakeKubeBuilder::image)"
            );
            Blocked::Waiting {
                reason: "ErrImagePull",
                message: Some(msg.clone()),
                event: Some(("Failed", format!("Failed to pull image \"{image}\": {msg}"))),
            }
        });
    };
    let (volumes, devices) = plan_volumes(store, ns, spec, c, &state.backend)?;
    let env = resolve_env(store, ns, pod, c).map_err(|m| Blocked::Waiting {
        reason: "CreateContainerConfigError",
        message: Some(m.clone()),
        event: Some(("Failed", format!("Error: {m}"))),
    })?;
    let (arg0, argv) = resolve_command(&exe, c, &env).map_err(Blocked::StartError)?;
    let mounts = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["mountPath"].as_str()?.to_string(),
                m["name"].as_str()?.to_string(),
                s(m, &["subPath"]).map(str::to_string),
            ))
        })
        .collect();
    Ok(Plan {
        exe,
        arg0,
        argv,
        env,
        working_dir: s(c, &["workingDir"]).map(|w| expand(w, &[])),
        devices,
        volumes,
        mounts,
        termination_path: s(c, &["terminationMessagePath"])
            .unwrap_or("/dev/termination-log")
            .to_string(),
        fallback_to_logs: s(c, &["terminationMessagePolicy"]) == Some("FallbackToLogsOnError"),
    })
}

/// In-container path prefixes and the host paths they stand for.
struct MountTable(Vec<(String, String)>);

fn path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

impl MountTable {
    fn new(mut entries: Vec<(String, String)>) -> Self {
        // Longest first, so `/data/sub` wins over `/data`.
        entries.retain(|(c, _)| c.starts_with('/') && c.len() > 1);
        entries.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Self(entries)
    }

    /// Rewrites every mapped path in `input` that starts and ends at a path boundary.
    fn rewrite(&self, input: &str) -> String {
        let mut out = String::with_capacity(input.len());
        let mut i = 0;
        let mut prev: Option<char> = None;
        'outer: while i < input.len() {
            let rest = &input[i..];
            if prev.is_none_or(|p| !path_char(p)) {
                for (cpath, host) in &self.0 {
                    if let Some(after) = rest.strip_prefix(cpath.as_str())
                        && after.chars().next().is_none_or(|n| !path_char(n))
                    {
                        out.push_str(host);
                        i += cpath.len();
                        prev = cpath.chars().last();
                        continue 'outer;
                    }
                }
            }
            let Some(ch) = rest.chars().next() else {
                break;
            };
            out.push(ch);
            prev = Some(ch);
            i += ch.len_utf8();
        }
        out
    }
}

fn io_message(what: &str, path: &Path, e: &std::io::Error) -> String {
    format!("{what} {}: {e}", path.display())
}

/// Writes the pod directory; returns the mount table and the host termination file.
fn materialize(
    state: &State,
    store: &Store,
    pod: &Value,
    plan: &Plan,
    dir: &Path,
) -> Result<(MountTable, PathBuf), String> {
    let ns = s(pod, &["metadata", "namespace"]).unwrap_or("");
    let sa_name = s(pod, &["spec", "serviceAccountName"]).unwrap_or("default");
    let sa_uid = store
        .get(&SERVICE_ACCOUNTS, ns, sa_name)
        .ok()
        .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
        .unwrap_or_default();
    let mut table: Vec<(String, String)> = Vec::new();
    let vol_root = dir.join("volumes");
    for (name, vp) in &plan.volumes {
        let vdir = vol_root.join(name);
        std::fs::create_dir_all(&vdir).map_err(|e| io_message("creating", &vdir, &e))?;
        let VolumePlan::Files(files) = vp else {
            continue;
        };
        for f in files {
            let rel = Path::new(&f.path);
            if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
                return Err(format!("invalid volume file path {:?}", f.path));
            }
            let path = vdir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io_message("creating", parent, &e))?;
            }
            let bytes = match &f.content {
                Content::Bytes(b) => b.clone(),
                Content::Token {
                    audience,
                    expiration,
                } => {
                    let sa = ServiceAccountId {
                        namespace: ns.to_string(),
                        name: sa_name.to_string(),
                        uid: sa_uid.clone(),
                    };
                    let bound = BoundObject {
                        kind: "Pod".into(),
                        name: s(pod, &["metadata", "name"]).unwrap_or("").to_string(),
                        uid: s(pod, &["metadata", "uid"]).unwrap_or("").to_string(),
                    };
                    let audiences: Vec<String> = if audience.is_empty() {
                        Vec::new()
                    } else {
                        vec![audience.clone()]
                    };
                    state
                        .tokens
                        .mint(&sa, &audiences, *expiration, Some(bound))
                        .token
                        .into_bytes()
                }
            };
            std::fs::write(&path, bytes).map_err(|e| io_message("writing", &path, &e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode & 0o777))
                .map_err(|e| io_message("chmod", &path, &e))?;
        }
    }
    for (mount_path, name, sub) in &plan.mounts {
        let mut host = vol_root.join(name);
        if let Some(sub) = sub {
            host = host.join(sub);
        }
        table.push((mount_path.clone(), host.to_string_lossy().into_owned()));
    }
    for (device, file) in &plan.devices {
        // A symlink in the pod's own tree, like a device node in the container's /dev:
        // renaming a file over it replaces the link, never the volume.
        let rel = device.trim_start_matches('/');
        if rel.is_empty() || Path::new(rel).components().any(|c| c.as_os_str() == "..") {
            return Err(format!("invalid devicePath {device:?}"));
        }
        let link = dir.join("devices").join(rel);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_message("creating", parent, &e))?;
        }
        std::os::unix::fs::symlink(file, &link).map_err(|e| io_message("linking", &link, &e))?;
        table.push((device.clone(), link.to_string_lossy().into_owned()));
    }
    let term = dir.join("termination-log");
    std::fs::write(&term, b"").map_err(|e| io_message("creating", &term, &e))?;
    table.push((
        plan.termination_path.clone(),
        term.to_string_lossy().into_owned(),
    ));
    Ok((MountTable::new(table), term))
}

fn sync_pod(state: &Arc<State>, store: &mut Store, pod: &Value) -> bool {
    let Some(uid) = s(pod, &["metadata", "uid"]).map(str::to_string) else {
        return false;
    };
    let phase = s(pod, &["status", "phase"]).unwrap_or("");
    if phase == "Succeeded"
        || phase == "Failed"
        || pod["metadata"].get("deletionTimestamp").is_some()
        || state.kubelet.pods().contains_key(&uid)
    {
        return false;
    }
    let Some(c) = pod["spec"]["containers"].get(0).cloned() else {
        return false;
    };
    let plan = match plan(state, store, pod, &c) {
        Ok(p) => p,
        Err(Blocked::Unschedulable(why)) => return set_unschedulable(store, pod, &why),
        Err(Blocked::Binding) => {
            if !pod["status"].is_null() {
                return false;
            }
            return update_status(
                store,
                pod,
                json!({"phase": "Pending", "qosClass": "BestEffort"}),
            );
        }
        Err(Blocked::Waiting {
            reason,
            message,
            event,
        }) => {
            let mut changed = schedule(store, pod);
            let pod = store
                .get(
                    &PODS,
                    s(pod, &["metadata", "namespace"]).unwrap_or(""),
                    s(pod, &["metadata", "name"]).unwrap_or(""),
                )
                .unwrap_or_else(|_| pod.clone());
            changed |= set_waiting(store, &pod, &c, reason, message.as_deref());
            if let Some((ev_reason, ev_message)) = event {
                changed |= record_event(store, &pod, "Warning", ev_reason, &ev_message, "kubelet");
            }
            return changed;
        }
        Err(Blocked::StartError(message)) => {
            schedule(store, pod);
            return finish_without_process(store, pod, &c, &message);
        }
    };
    schedule(store, pod);
    launch(state, store, pod, &c, plan, uid)
}

/// Binds the pod to the node (what the scheduler does); true if it changed.
fn schedule(store: &mut Store, pod: &Value) -> bool {
    if s(pod, &["spec", "nodeName"]).is_some() {
        return false;
    }
    let ns = s(pod, &["metadata", "namespace"]).unwrap_or("").to_string();
    let name = s(pod, &["metadata", "name"]).unwrap_or("").to_string();
    let changed = store.controller_update(&PODS, &ns, &name, |o| {
        o["spec"]["nodeName"] = json!(NODE);
    });
    if changed {
        record_event(
            store,
            pod,
            "Normal",
            "Scheduled",
            &format!("Successfully assigned {ns}/{name} to {NODE}"),
            "default-scheduler",
        );
    }
    changed
}

/// The container could not be started at all: terminated with StartError, exit 128.
fn finish_without_process(store: &mut Store, pod: &Value, c: &Value, message: &str) -> bool {
    let now = rfc3339_now();
    let term = json!({"exitCode": 128, "reason": "StartError", "message": message,
                      "startedAt": "1970-01-01T00:00:00Z", "finishedAt": now});
    let pod = store
        .get(
            &PODS,
            s(pod, &["metadata", "namespace"]).unwrap_or(""),
            s(pod, &["metadata", "name"]).unwrap_or(""),
        )
        .unwrap_or_else(|_| pod.clone());
    let status = terminated_status(&pod["status"], &pod, c, &term);
    let changed = update_status(store, &pod, status);
    record_event(
        store,
        &pod,
        "Warning",
        "Failed",
        &format!("Error: {message}"),
        "kubelet",
    );
    changed
}

fn launch(
    state: &Arc<State>,
    store: &mut Store,
    pod: &Value,
    c: &Value,
    plan: Plan,
    uid: String,
) -> bool {
    let ns = s(pod, &["metadata", "namespace"]).unwrap_or("").to_string();
    let name = s(pod, &["metadata", "name"]).unwrap_or("").to_string();
    let dir = state.kubelet.root.path().join(&uid);
    let log = dir.join("container.log");
    let prepared = std::fs::create_dir_all(&dir)
        .map_err(|e| io_message("creating", &dir, &e))
        .and_then(|()| materialize(state, store, pod, &plan, &dir));
    let (table, term) = match prepared {
        Ok(t) => t,
        Err(m) => return finish_without_process(store, pod, c, &m),
    };
    let log_file = match std::fs::File::create(&log) {
        Ok(f) => f,
        Err(e) => return finish_without_process(store, pod, c, &io_message("creating", &log, &e)),
    };
    let log_err = match log_file.try_clone() {
        Ok(f) => f,
        Err(e) => return finish_without_process(store, pod, c, &io_message("opening", &log, &e)),
    };
    let mut cmd = tokio::process::Command::new(&plan.exe);
    cmd.arg0(&plan.arg0)
        .args(plan.argv.iter().map(|a| table.rewrite(a)))
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(log_err))
        // Own process group: a kill reaches whatever the container forked.
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in &plan.env {
        let value = match std::str::from_utf8(v) {
            Ok(text) => OsString::from(table.rewrite(text)),
            Err(_) => OsString::from_vec(v.clone()),
        };
        cmd.env(k, value);
    }
    let cwd = plan
        .working_dir
        .as_deref()
        .map(|w| PathBuf::from(table.rewrite(w)))
        .filter(|p| p.is_dir())
        .unwrap_or_else(|| dir.clone());
    cmd.current_dir(cwd);
    // Sizes before the process can touch the files.
    let devices = plan
        .devices
        .iter()
        .filter_map(|(path, file)| {
            let size = std::fs::metadata(file).ok()?.len();
            Some((path.clone(), file.clone(), size))
        })
        .collect();
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return finish_without_process(
                store,
                pod,
                c,
                &format!("starting {}: {e}", plan.exe.display()),
            );
        }
    };
    let pgid = child.id().and_then(|p| i32::try_from(p).ok());
    let (kill_tx, kill_rx) = oneshot::channel();
    let started_at = rfc3339_now();
    let cname = c["name"].as_str().unwrap_or("").to_string();
    state.kubelet.pods().insert(
        uid.clone(),
        PodRuntime {
            dir: dir.clone(),
            log: log.clone(),
            container: cname.clone(),
            pgid,
            kill: Some(kill_tx),
        },
    );
    let pod = store.get(&PODS, &ns, &name).unwrap_or_else(|_| pod.clone());
    let old = &pod["status"];
    let mut status = scheduled_base(old);
    status["phase"] = json!("Running");
    status["conditions"] = json!([
        cond(old, "PodReadyToStartContainers", "True", None, None),
        cond(old, "Initialized", "True", None, None),
        cond(old, "Ready", "True", None, None),
        cond(old, "ContainersReady", "True", None, None),
        cond(old, "PodScheduled", "True", None, None),
    ]);
    status["containerStatuses"] = json!([container_status(
        &pod,
        c,
        json!({"running": {"startedAt": started_at}}),
        true,
        true
    )]);
    update_status(store, &pod, status);
    record_event(
        store,
        &pod,
        "Normal",
        "Started",
        &format!("Started container {cname}"),
        "kubelet",
    );
    let oom = state.faults.take_oom_kill();
    let exit = Exit {
        devices,
        state: Arc::downgrade(state),
        uid,
        ns,
        name,
        container: c.clone(),
        started_at,
        log,
        term,
        fallback_to_logs: plan.fallback_to_logs,
        pgid,
    };
    tokio::spawn(supervise(child, kill_rx, oom, exit));
    true
}

/// What the supervisor needs to report a container's end.
struct Exit {
    /// (devicePath, backing file, size at start) of each attached block device.
    devices: Vec<(String, PathBuf, u64)>,
    state: Weak<State>,
    uid: String,
    ns: String,
    name: String,
    container: Value,
    started_at: String,
    log: PathBuf,
    term: PathBuf,
    fallback_to_logs: bool,
    pgid: Option<i32>,
}

async fn supervise(
    mut child: tokio::process::Child,
    kill_rx: oneshot::Receiver<KillReason>,
    oom: bool,
    exit: Exit,
) {
    let killed = if oom {
        if let Some(p) = exit.pgid {
            kill_group(p);
        }
        Some(KillReason::OomKilled)
    } else {
        tokio::select! {
            _ = child.wait() => None,
            reason = kill_rx => {
                if let Some(p) = exit.pgid {
                    kill_group(p);
                }
                // A dropped sender means the cluster is going away: kill all the same.
                Some(reason.unwrap_or(KillReason::Deleted))
            }
        }
    };
    let status = child.wait().await;
    // The container is its whole process group: nothing it forked outlives it.
    if let Some(p) = exit.pgid {
        kill_group(p);
    }
    let code = match &status {
        Ok(st) => st
            .code()
            .or_else(|| st.signal().map(|sig| 128 + sig))
            .unwrap_or(1),
        Err(_) => 1,
    };
    let (code, reason) = match killed {
        Some(KillReason::OomKilled) => (137, "OOMKilled"),
        _ if code == 0 => (0, "Completed"),
        _ => (code, "Error"),
    };
    let resized = restore_device_sizes(&exit.devices);
    let mut message = read_tail(&exit.term, MAX_TERMINATION_MESSAGE);
    if message.is_empty() && exit.fallback_to_logs && code != 0 {
        message = log_tail(&exit.log, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES);
    }
    let Some(state) = exit.state.upgrade() else {
        return;
    };
    if let Some(rt) = state.kubelet.pods().get_mut(&exit.uid) {
        rt.pgid = None;
        rt.kill = None;
    }
    if killed == Some(KillReason::Deleted) {
        // Nobody is left to report to.
        state.changed.notify_one();
        return;
    }
    let mut term = json!({
        "exitCode": code, "reason": reason,
        "startedAt": exit.started_at, "finishedAt": rfc3339_now(),
        "containerID": format!("fake://{}", exit.uid),
    });
    if !message.is_empty() {
        term["message"] = json!(message);
    }
    {
        let mut store = state.lock_store();
        if let Ok(pod) = store.get(&PODS, &exit.ns, &exit.name)
            && pod["metadata"]["uid"].as_str() == Some(exit.uid.as_str())
        {
            let status = terminated_status(&pod["status"], &pod, &exit.container, &term);
            update_status(&mut store, &pod, status);
            for m in &resized {
                record_event(
                    &mut store,
                    &pod,
                    "Warning",
                    "BlockDeviceResized",
                    m,
                    "kubelet",
                );
            }
            if reason == "OOMKilled" {
                record_event(
                    &mut store,
                    &pod,
                    "Warning",
                    "OOMKilling",
                    &format!(
                        "Memory cgroup out of memory: Killed process {}",
                        exit.pgid.unwrap_or(0)
                    ),
                    "kernel-monitor",
                );
            }
        }
    }
    state.changed.notify_one();
}

/// A block device cannot change size, a file can (`>` truncates it, writes past the end grow
/// it): put each backing file back to its size and say what a real device would have done.
fn restore_device_sizes(devices: &[(String, PathBuf, u64)]) -> Vec<String> {
    let mut messages = Vec::new();
    for (path, file, size) in devices {
        let Ok(now) = std::fs::metadata(file).map(|m| m.len()) else {
            continue;
        };
        if now == *size {
            continue;
        }
        let restored = std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .and_then(|f| f.set_len(*size));
        messages.push(format!(
            "the container changed the size of block device {path} from {size} to {now} bytes (truncated on open, or written past its end); a real device keeps its size{}",
            match restored {
                Ok(()) => format!(", so fake-kube set it back to {size} bytes (truncated data is lost)"),
                Err(e) => format!("; restoring the size failed: {e}"),
            }
        ));
    }
    messages
}

/// The last `max` bytes of a file as text ("" if unreadable).
fn read_tail(path: &Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last `lines` lines of a log, then at most `max_bytes` of them (the kubelet's order).
fn log_tail(path: &Path, lines: usize, max_bytes: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let tail = tail_lines(&bytes, lines);
    String::from_utf8_lossy(&tail[..tail.len().min(max_bytes)]).into_owned()
}

/// The last `n` lines of `bytes` (a final line without newline counts).
pub(crate) fn tail_lines(bytes: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_replaces_whole_paths_longest_first() {
        let t = MountTable::new(vec![
            ("/data".into(), "/h/d".into()),
            ("/data/sub".into(), "/h/s".into()),
            ("/dev/xvda".into(), "/h/vol".into()),
        ]);
        assert_eq!(
            t.rewrite(
                "head -c 4 /dev/xvda > /data/sub/x; ls /data /database x/data --dev=/dev/xvda"
            ),
            "head -c 4 /h/vol > /h/s/x; ls /h/d /database x/data --dev=/h/vol"
        );
        assert_eq!(t.rewrite("/dev/xvdab"), "/dev/xvdab");
    }

    #[test]
    fn expansion_and_tails() {
        let env = vec![("A".to_string(), b"1".to_vec())];
        assert_eq!(expand("$(A)-$$(A)-$(B)-$", &env), "1-$(A)-$(B)-$");
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"a\n", 5), b"a\n");
    }

    #[test]
    fn command_rule() {
        let exe = Path::new("/bin/sh");
        let c = json!({"command": ["sh", "-c", "x"], "args": ["y"]});
        assert_eq!(
            resolve_command(exe, &c, &[]).unwrap(),
            (
                "sh".to_string(),
                vec!["-c".to_string(), "x".into(), "y".into()]
            )
        );
        let c = json!({"command": ["/usr/bin/sh"]});
        assert!(resolve_command(exe, &c, &[]).is_ok());
        let c = json!({"command": ["bash"]});
        assert!(resolve_command(exe, &c, &[]).is_err());
        let c = json!({"args": ["-c", "true"]});
        assert_eq!(resolve_command(exe, &c, &[]).unwrap().0, "sh");
    }
}
