//! An in-process fake Kubernetes API server for tests, with a simulated
//! snapshot controller, CSI driver, job controller and kubelet.
//!
//! What it serves (plain HTTP on loopback, so `kube::Client` talks to it exactly
//! as to a cluster, through a kubeconfig this crate writes):
//! namespaces, PersistentVolumeClaims, PersistentVolumes, CSIDrivers, StorageClasses,
//! VolumeSnapshots, VolumeSnapshotContents, VolumeSnapshotClasses, ServiceAccounts, Secrets,
//! ConfigMaps, Events, Pods, batch/v1 Jobs, Services, EndpointSlices and
//! CustomResourceDefinitions; get, list (label selectors; field selectors on
//! `metadata.name`/`namespace`, `involvedObject.*`, `reason`, `type`, `status.phase`,
//! `spec.nodeName`...), watch (from a resourceVersion, JSON lines), create, replace, patch
//! (merge, JSON patch; strategic merge for built-ins), delete, `/status`, server-side
//! `dryRun=All`. Subresources: `serviceaccounts/{name}/token` (TokenRequest), `pods/{name}/log`
//! (`container`, `tailLines`, `limitBytes`), and create-only `tokenreviews`. Errors are
//! metav1.Status bodies with the real codes (404 NotFound, 409 AlreadyExists/Conflict, 422
//! Invalid with causes, 410 Expired, 403 Forbidden from the ServiceAccount admission check).
//!
//! Several instances may share one [`SharedBackend`]: their simulated drivers
//! then see each other's snapshot handles, like two clusters attached to one
//! storage array. [`Faults`] injects HTTP errors, driver misbehaviour, forbidden
//! TokenRequests and OOM kills.
//!
//! # Volumes with bytes
//! A backend made with [`SharedBackend::with_data_dir`] keeps block volumes as sparse files and
//! snapshots as hole-preserving copies named by handle (the directory `cbt serve-metadata`
//! serves); the simulated external-provisioner then creates a PersistentVolume and a volume
//! file for every Pending claim of the driver's StorageClasses (empty, restored from a
//! snapshot, or cloned; with `WaitForFirstConsumer` only once a pod uses the claim), refuses
//! restores smaller than the snapshot with a `ProvisioningFailed` event, and reclaims PVs and
//! files when claims go. See [`FakeKube::pvc_backing_file`].
//! Without a data directory no PV objects exist and only restores bind, as before.
//!
//! # Tokens
//! TokenRequests mint random opaque tokens held in the cluster's [`TokenRegistry`]
//! (audiences, expiry on an adjustable clock, optional pod binding); TokenReview authenticates
//! them as `system:serviceaccount:<ns>:<name>` while the account (and bound pod) exists.
//!
//! # Workloads
//! Every namespace gets a `default` ServiceAccount. A Job gets pods `<job>-<xxxxx>` from its
//! template (labels `batch.kubernetes.io/job-name`, `job-name`, controller uid; owner
//! reference), retried with back-off ([`FakeKubeBuilder::job_backoff`]) up to `backoffLimit`,
//! bounded by `activeDeadlineSeconds`. The kubelet runs a pod's first container as a real
//! child process: its image maps to a host executable ([`FakeKubeBuilder::image`]), claims
//! attached as `volumeDevices` are the claims' files, secret/configMap/projected
//! (serviceAccountToken) volumes and the termination-message file live in a per-pod temporary
//! directory, and in-container paths in command, args, env and workingDir are rewritten to
//! host paths. The exit code, termination message (or log tail) and log are reported as a
//! kubelet would. The rules are in the `kubelet` module docs (rendered with
//! `--document-private-items`).
//!
//! # Group snapshots
//! With [`FakeKubeBuilder::group_snapshot_api`] the `groupsnapshot.storage.k8s.io/v1` kinds are
//! served too and a VolumeGroupSnapshot with a selector and a class of this driver is cut like
//! external-snapshotter v8 does it: every selected bound claim's backend snapshot at one
//! instant (volume files copied under the store lock), a VolumeGroupSnapshotContent listing the
//! volume/snapshot handle pairs, and one member VolumeSnapshot + VolumeSnapshotContent per
//! claim (owned by the group, `status.volumeGroupSnapshotName`, the in-group finalizer).
//! Deleting the group deletes the members. The rules are in the `groups` module docs.
//!
//! Extra resource types (e.g. SnapshotMetadataService) can be served with
//! [`FakeKubeBuilder::serve`], or by creating their CustomResourceDefinition
//! (`apiextensions.k8s.io/v1`; [`FakeKube::install_yaml`] with the upstream manifests in
//! [`crds::upstream`]): its served versions are routed while the CRD exists. For such types
//! objects are checked against the version's `openAPIV3Schema` like a structural schema (unknown fields pruned; types, required, enums, item and length bounds; the `self == oldSelf` immutability rules of CEL, no other CEL). With [`FakeKubeBuilder::replication_api`] the replication CRDs are installed and simulated backends run (module `replication`).
//!
//! # Network objects and discovery
//! Services (with a cluster IP and port defaults) and `discovery.k8s.io/v1` EndpointSlices are
//! stored and validated; no controller derives slices from pods and nothing listens on a
//! cluster IP, so tests write the slices themselves. `/version` and API discovery (`/api`, `/api/v1`, `/apis`,
//! `/apis/{group}`, `/apis/{group}/{version}`) lists what is served at that moment.
//!
//! RBAC is opt-in: with [`FakeKubeBuilder::rbac`] every request is authorized against
//! Roles, ClusterRoles and bindings (e.g. parsed from a tool's manifests with
//! [`rbac::Policy::from_yaml`]) for the identity its bearer token maps to
//! ([`FakeKubeBuilder::user`]); a denial is the apiserver's 403 Forbidden Status. The
//! builder's own token stays an administrator (`system:masters`), and the `seed_*`, `get`,
//! `create`... methods of [`FakeKube`] act as the cluster itself, unchecked. Every request's
//! identity, attributes and decision are kept in [`FakeKube::access_log`].
//!
//! Not simulated: server-side apply, admission webhooks, aggregated ClusterRoles, pagination (`limit`/`continue`
//! are ignored; every list is one page); finalizers other than user-set ones (no
//! pvc-protection, so a claim in use can be deleted); static PV binding; containers other
//! than a pod's first (no init or sidecar containers), restarts (every restartPolicy is Never),
//! graceful termination (deletion is SIGKILL at once), resources and probes, `follow` on
//! logs; Job parallelism beyond counts, Indexed jobs, podFailurePolicy, suspend semantics
//! beyond creating no pods, ttlSecondsAfterFinished; Foreground deletion (collected like
//! Background). Containers are not isolated: they see the host file system and network, and
//! only paths that appear in command, args, env or workingDir are translated, so a program
//! that hard-codes an in-container path (say `/dev/termination-log`) would miss its mount.
//! Devices are regular files behind symlinks: size changes a real device cannot make are
//! undone after the container exits and reported as a `BlockDeviceResized` warning event.
//! [`Faults::set_controller_paused`] pauses the job controller and kubelet too (running
//! processes keep running).

mod access_review;
mod backend;
mod controller;
pub mod crds;
mod discovery;
mod faults;
mod groups;
mod jobs;
mod kinds;
mod kubelet;
mod network;
mod pair;
pub mod rbac;
mod replication;
mod schema;
mod server;
mod store;
mod subresources;
mod tokens;
mod values;
mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

pub use backend::{BackendError, BackendSnapshot, SharedBackend};
pub use faults::{FaultAction, Faults, HttpFault};
pub use pair::ClusterPair;
pub use replication::{REPLICATION_CRDS, ReplicationSim};
pub use store::{ApiError, Cause, ResourceType};
pub use tokens::{
    API_SERVER_AUDIENCE, Authenticated, BoundObject, MintedToken, ServiceAccountId, TokenRegistry,
    TokenRejection, TokenUser,
};
pub use values::{format_quantity, parse_quantity};

use rbac::{Policy, RequestAttributes, UserInfo};

use store::{Selector, Store, TYPES, find_type_by_kind};

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// Raw query string.
    pub query: String,
}

/// One authorization decision: who asked for what, and whether it was allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRecord {
    /// The authenticated user name.
    pub user: String,
    /// What the request asked for.
    pub attributes: RequestAttributes,
    /// False if RBAC denied it (answered 403).
    pub allowed: bool,
}

pub(crate) struct State {
    store: Mutex<Store>,
    faults: Faults,
    requests: Mutex<Vec<RecordedRequest>>,
    backend: SharedBackend,
    driver: String,
    token: Option<String>,
    users: HashMap<String, UserInfo>,
    policy: Mutex<Option<Policy>>,
    access: Mutex<Vec<AccessRecord>>,
    changed: Notify,
    /// Built-in and `serve`d types; CRD-defined ones come from the store (see `served_types`).
    types: Vec<&'static ResourceType>,
    crd_types: crds::CrdTypes,
    tokens: TokenRegistry,
    kubelet: kubelet::Kubelet,
    replication: Option<ReplicationSim>,
}

impl State {
    fn lock_store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every type served right now: the built-ins first (they win over a CRD serving the same
    /// resource), then the versions established CRDs serve. Locks the store briefly: never
    /// call it while holding the store lock.
    pub(crate) fn served_types(&self) -> Vec<&'static ResourceType> {
        let crd_types = self.crd_types.served(&self.lock_store());
        let mut all = self.types.clone();
        for t in crd_types {
            if !all
                .iter()
                .any(|b| (b.group, b.version, b.plural) == (t.group, t.version, t.plural))
            {
                all.push(t);
            }
        }
        all
    }

    fn record(&self, r: RecordedRequest) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(r);
    }

    /// The identity a bearer token authenticates as; `None` = 401. The builder's token is an
    /// administrator; without one, unknown callers are anonymous (as with anonymous auth on).
    pub(crate) fn authenticate(&self, authorization: Option<&str>) -> Option<UserInfo> {
        let bearer = authorization.and_then(|h| h.strip_prefix("Bearer "));
        if let Some(user) = bearer.and_then(|t| self.users.get(t)) {
            return Some(user.clone());
        }
        match &self.token {
            Some(token) if bearer == Some(token.as_str()) => Some(UserInfo::admin()),
            Some(_) => None,
            None => Some(UserInfo {
                name: "system:anonymous".into(),
                groups: vec!["system:unauthenticated".into()],
            }),
        }
    }

    /// Decides (when a policy is loaded) and records one request; true if it may proceed.
    /// What the RBAC policy says (everything is allowed without one), unrecorded: for access
    /// reviews, which ask about a request rather than make one.
    pub(crate) fn policy_allows(&self, user: &UserInfo, attributes: &RequestAttributes) -> bool {
        self.policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|p| p.allows(user, attributes) || rbac::bootstrap_allows(user, attributes))
    }

    pub(crate) fn authorize(&self, user: &UserInfo, attributes: RequestAttributes) -> bool {
        let allowed = self
            .policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_none_or(|p| {
                p.allows(user, &attributes) || rbac::bootstrap_allows(user, &attributes)
            });
        self.access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(AccessRecord {
                user: user.name.clone(),
                attributes,
                allowed,
            });
        allowed
    }
}

/// Configures a fake cluster before it starts.
pub struct FakeKubeBuilder {
    extra_types: Vec<ResourceType>,
    snapshot_api: bool,
    driver: String,
    backend: SharedBackend,
    token: Option<String>,
    users: HashMap<String, UserInfo>,
    policy: Option<Policy>,
    log_cap: usize,
    images: BTreeMap<String, PathBuf>,
    job_backoff: Duration,
    group_snapshot_api: bool,
    replication_api: bool,
}

impl FakeKubeBuilder {
    /// Registers a container image: pods using `image` run `host_executable` as a child
    /// process (see the kubelet rules in the crate docs).
    pub fn image(mut self, image: &str, host_executable: impl Into<PathBuf>) -> Self {
        self.images
            .insert(image.to_string(), host_executable.into());
        self
    }

    /// Base of the Job controller's retry back-off after a failed pod, doubled per failure
    /// (default 10 ms to keep tests fast; real clusters use 10 s).
    pub fn job_backoff(mut self, base: Duration) -> Self {
        self.job_backoff = base;
        self
    }

    /// Name of the simulated CSI driver (default `hostpath.csi.k8s.io`).
    pub fn driver(mut self, driver: &str) -> Self {
        self.driver = driver.to_string();
        self
    }

    /// Storage backend, shared with other fake clusters.
    pub fn backend(mut self, backend: SharedBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Bearer token every request must carry (default `fake-token`).
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_string);
        self
    }

    /// Enforces RBAC: every request must be allowed by `policy` for its caller's identity
    /// (the builder's own token is an administrator and always is).
    pub fn rbac(mut self, policy: Policy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Accepts `token` as a bearer token authenticating as `user` (e.g.
    /// [`UserInfo::service_account`]); write a kubeconfig for it with
    /// [`FakeKube::kubeconfig_yaml_as`].
    pub fn user(mut self, token: &str, user: UserInfo) -> Self {
        self.users.insert(token.to_string(), user);
        self
    }

    /// How many events watches can replay from (older resourceVersions get 410).
    pub fn event_log_capacity(mut self, cap: usize) -> Self {
        self.log_cap = cap;
        self
    }

    /// Serves no `snapshot.storage.k8s.io` types, like a cluster without the snapshot CRDs
    /// (their paths answer 404 NotFound, as an API server does for unknown resources).
    pub fn without_snapshot_api(mut self) -> Self {
        self.snapshot_api = false;
        self
    }

    /// Installs the csi-addons replication, Trident and Dell CRDs (objects checked against
    /// their schemas), serves Leases, and runs the simulated Trident mirror controller and Dell
    /// replication sidecar ([`FakeKube::replication`]; rules in the `replication` module docs).
    pub fn replication_api(mut self) -> Self {
        self.replication_api = true;
        self
    }

    /// Also serves the `groupsnapshot.storage.k8s.io/v1` kinds (VolumeGroupSnapshot,
    /// VolumeGroupSnapshotContent, VolumeGroupSnapshotClass), like a cluster with the group
    /// snapshot CRDs and the snapshot-controller's group feature on; the simulated controller
    /// then cuts group snapshots (see the crate docs). Off by default, like the CRDs.
    pub fn group_snapshot_api(mut self) -> Self {
        self.group_snapshot_api = true;
        self
    }

    /// Also serves this resource type (CRUD, list, watch, patch; only `metadata.name` is validated).
    pub fn serve(mut self, rt: ResourceType) -> Self {
        self.extra_types.push(rt);
        self
    }

    /// Binds 127.0.0.1 on a free port and starts serving and reconciling.
    ///
    /// # Errors
    /// When the listener cannot be bound or the kubelet's temporary directory cannot be made.
    pub async fn start(self) -> std::io::Result<FakeKube> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            store: Mutex::new(Store::new(self.log_cap)),
            faults: Faults::default(),
            requests: Mutex::new(Vec::new()),
            backend: self.backend,
            driver: self.driver,
            token: self.token,
            users: self.users,
            policy: Mutex::new(self.policy),
            access: Mutex::new(Vec::new()),
            changed: Notify::new(),
            // Leaked once per test server so routes can hold `&'static` types like the built-ins.
            types: TYPES
                .iter()
                .copied()
                .filter(|t| self.snapshot_api || t.group != "snapshot.storage.k8s.io")
                .chain(
                    groups::GROUP_TYPES
                        .iter()
                        .copied()
                        .filter(|_| self.snapshot_api && self.group_snapshot_api),
                )
                .chain(kinds::WORKLOAD_TYPES.iter().copied())
                .chain(access_review::ACCESS_REVIEW_TYPES.iter().copied())
                .chain(network::NETWORK_TYPES.iter().copied())
                .chain(std::iter::once(&crds::CUSTOM_RESOURCE_DEFINITIONS))
                .chain(std::iter::once(&replication::LEASES).filter(|_| self.replication_api))
                .chain(
                    self.extra_types
                        .into_iter()
                        .map(|t| &*Box::leak(Box::new(t))),
                )
                .collect(),
            crd_types: crds::CrdTypes::default(),
            tokens: TokenRegistry::default(),
            kubelet: kubelet::Kubelet::new(self.images, self.job_backoff)?,
            replication: self.replication_api.then(ReplicationSim::default),
        });
        if self.replication_api {
            let mut store = state.lock_store();
            for text in REPLICATION_CRDS {
                let docs: Vec<Value> = serde_saphyr::from_multiple(text)
                    .map_err(|e| std::io::Error::other(format!("replication CRD: {e}")))?;
                for doc in docs.into_iter().filter(|d| !d.is_null()) {
                    store
                        .create(&crds::CUSTOM_RESOURCE_DEFINITIONS, None, doc, false)
                        .map_err(|e| {
                            std::io::Error::other(format!("replication CRD: {}", e.message))
                        })?;
                }
            }
            crds::reconcile(&mut store);
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, state.clone(), stop_rx));
        let controller = tokio::spawn(controller_loop(state.clone()));
        Ok(FakeKube {
            addr,
            state,
            stop: stop_tx,
            tasks: vec![accept, controller],
        })
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, stop: watch::Receiver<bool>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| server::handle(state.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}

async fn controller_loop(state: Arc<State>) {
    let mut scan = controller::ProvisionerScan::default();
    loop {
        tokio::select! {
            _ = state.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if state.faults.controller_paused() {
            continue;
        }
        let mut store = state.lock_store();
        // A few passes so chains (content -> snapshot -> PVC) settle in one wake-up.
        for _ in 0..4 {
            let crds = crds::reconcile(&mut store);
            let replicated = match &state.replication {
                Some(sim) => {
                    let types = state.crd_types.served(&store);
                    replication::reconcile(&mut store, &types, sim)
                }
                None => false,
            };
            let snapshots = controller::reconcile(
                &mut store,
                &state.backend,
                &state.faults,
                &state.driver,
                &mut scan,
            );
            if !(kubelet::reconcile(&state, &mut store) | snapshots | crds | replicated) {
                break;
            }
        }
    }
}

/// A running fake cluster. Dropping it stops the server.
pub struct FakeKube {
    addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        // No container process outlives its cluster.
        self.state.kubelet.kill_all();
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A snapshot class (single or group, by `(apiVersion, kind)`) of `driver` with policy
/// `Delete`, marked default by `default_annotation` when given.
fn class_object(
    (api_version, kind): (&str, &str),
    name: &str,
    driver: &str,
    default_annotation: Option<&str>,
) -> Value {
    let mut class = json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"name": name}, "driver": driver, "deletionPolicy": "Delete",
    });
    if let Some(annotation) = default_annotation {
        class["metadata"]["annotations"] = json!({ annotation: "true" });
    }
    class
}

fn type_of(
    state: &State,
    api_version: &str,
    kind: &str,
) -> Result<&'static store::ResourceType, ApiError> {
    find_type_by_kind(&state.served_types(), api_version, kind).ok_or_else(|| {
        ApiError::bad_request(format!("fake-kube does not serve {api_version} {kind}"))
    })
}

impl FakeKube {
    /// A builder with defaults (driver `hostpath.csi.k8s.io`, own backend, token `fake-token`).
    pub fn builder() -> FakeKubeBuilder {
        FakeKubeBuilder {
            extra_types: Vec::new(),
            snapshot_api: true,
            driver: "hostpath.csi.k8s.io".into(),
            backend: SharedBackend::new(),
            token: Some("fake-token".into()),
            users: HashMap::new(),
            policy: None,
            log_cap: 10_000,
            images: BTreeMap::new(),
            job_backoff: Duration::from_millis(10),
            group_snapshot_api: false,
            replication_api: false,
        }
    }

    /// Base URL, e.g. `http://127.0.0.1:43121`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The simulated driver's name.
    pub fn driver(&self) -> &str {
        &self.state.driver
    }

    /// The storage backend.
    pub fn backend(&self) -> &SharedBackend {
        &self.state.backend
    }

    /// The fault switches.
    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the RBAC policy (`None` stops enforcing); takes effect from the next request.
    pub fn set_rbac(&self, policy: Option<Policy>) {
        *self.state.policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// Every authorization decision so far, in request order.
    pub fn access_log(&self) -> Vec<AccessRecord> {
        self.state
            .access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The requests RBAC denied so far.
    pub fn denied(&self) -> Vec<AccessRecord> {
        self.access_log()
            .into_iter()
            .filter(|r| !r.allowed)
            .collect()
    }

    /// A kubeconfig with one context named `context` pointing at this server.
    pub fn kubeconfig_yaml(&self, context: &str) -> String {
        kubeconfig_yaml(&[(self, context)], context)
    }

    /// Like [`Self::kubeconfig_yaml`], authenticating with `token` (see [`FakeKubeBuilder::user`]).
    pub fn kubeconfig_yaml_as(&self, context: &str, token: &str) -> String {
        kubeconfig_yaml_as(&[(self, context, Some(token))], context)
    }

    /// Writes [`Self::kubeconfig_yaml_as`] to `path`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_kubeconfig_as(
        &self,
        path: &Path,
        context: &str,
        token: &str,
    ) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml_as(context, token))
    }

    /// Writes [`Self::kubeconfig_yaml`] to `path`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, path: &Path, context: &str) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml(context))
    }

    /// Creates an object as a client would (validation and status rules apply).
    ///
    /// # Errors
    /// The API error a client would get.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        let rt = type_of(
            &self.state,
            obj["apiVersion"].as_str().unwrap_or(""),
            obj["kind"].as_str().unwrap_or(""),
        )?;
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
        let created = self
            .state
            .lock_store()
            .create(rt, ns.as_deref(), obj, false)?;
        self.state.changed.notify_one();
        Ok(created)
    }

    /// The simulated replication backends' knobs (needs [`FakeKubeBuilder::replication_api`]).
    pub fn replication(&self) -> Option<&ReplicationSim> {
        self.state.replication.as_ref()
    }

    /// Reads an object (`ns` ignored for cluster-scoped kinds).
    pub fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let rt = type_of(&self.state, api_version, kind).ok()?;
        self.state.lock_store().get(rt, ns, name).ok()
    }

    /// Lists all objects of a kind in all namespaces.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        match type_of(&self.state, api_version, kind) {
            Ok(rt) => self.state.lock_store().list(rt, None, &Selector::default()),
            Err(_) => Vec::new(),
        }
    }

    /// Applies a JSON merge patch to an object as a client would (validation applies;
    /// removing the last finalizer of a terminating object completes its deletion).
    ///
    /// # Errors
    /// The API error a client would get.
    pub fn merge_patch(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiError> {
        let rt = type_of(&self.state, api_version, kind)?;
        let patched = self.state.lock_store().patch(
            rt,
            ns,
            name,
            store::PatchType::Merge,
            patch,
            store::Part::Main,
            false,
        )?;
        self.state.changed.notify_one();
        Ok(patched)
    }

    /// Overwrites an object's status, as a controller would.
    pub fn set_status(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
        status: Value,
    ) -> bool {
        let Ok(rt) = type_of(&self.state, api_version, kind) else {
            return false;
        };
        self.state
            .lock_store()
            .controller_update(rt, ns, name, |o| o["status"] = status)
    }

    /// Deletes an object with the controllers' side effects (a Job's pods are then collected,
    /// as with `propagationPolicy: Background`).
    ///
    /// # Errors
    /// The API error a client would get.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let rt = type_of(&self.state, api_version, kind)?;
        let mut store = self.state.lock_store();
        controller::delete_with_effects(
            &mut store,
            &self.state.backend,
            &self.state.driver,
            rt,
            ns,
            name,
            false,
        )
    }

    /// Creates every object of a (multi-document) YAML text, e.g. the upstream CRD manifests
    /// in [`crds::upstream`]; a CustomResourceDefinition starts serving its versions at once.
    ///
    /// # Errors
    /// 400 BadRequest for YAML that does not parse, else as [`Self::create`] (stops at the
    /// first failure).
    pub fn install_yaml(&self, yaml: &str) -> Result<Vec<Value>, ApiError> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml)
            .map_err(|e| ApiError::bad_request(format!("cannot parse YAML: {e}")))?;
        docs.into_iter()
            .filter(|d| !d.is_null())
            .map(|d| self.create(d))
            .collect()
    }

    /// Creates a namespace.
    ///
    /// # Errors
    /// As [`Self::create`].
    pub fn seed_namespace(&self, name: &str) -> Result<Value, ApiError> {
        self.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
    }

    /// Creates a CSIDriver object.
    ///
    /// # Errors
    /// As [`Self::create`].
    pub fn seed_csidriver(&self, name: &str) -> Result<Value, ApiError> {
        self.create(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": {"name": name},
            "spec": {"attachRequired": false, "podInfoOnMount": false, "volumeLifecycleModes": ["Persistent"]},
        }))
    }

    /// Creates a VolumeSnapshotClass (policy `Delete`), optionally the driver's default.
    ///
    /// # Errors
    /// As [`Self::create`].
    pub fn seed_snapshot_class(
        &self,
        name: &str,
        driver: &str,
        default: bool,
    ) -> Result<Value, ApiError> {
        self.create(class_object(
            ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"),
            name,
            driver,
            default.then_some("snapshot.storage.kubernetes.io/is-default-class"),
        ))
    }

    /// Creates a VolumeGroupSnapshotClass (policy `Delete`), optionally the driver's default
    /// (needs [`FakeKubeBuilder::group_snapshot_api`]).
    ///
    /// # Errors
    /// As [`Self::create`].
    pub fn seed_group_snapshot_class(
        &self,
        name: &str,
        driver: &str,
        default: bool,
    ) -> Result<Value, ApiError> {
        self.create(class_object(
            (
                "groupsnapshot.storage.k8s.io/v1",
                "VolumeGroupSnapshotClass",
            ),
            name,
            driver,
            default.then_some("groupsnapshot.storage.kubernetes.io/is-default-class"),
        ))
    }

    /// Creates a bound PVC with the given size, volume mode, access modes and labels; with a
    /// data-backed backend also its PersistentVolume `pv-<name>` and an all-zero volume file.
    ///
    /// # Errors
    /// As [`Self::create`].
    pub fn seed_pvc(
        &self,
        ns: &str,
        name: &str,
        size: &str,
        volume_mode: &str,
        access_modes: &[&str],
        labels: &[(&str, &str)],
    ) -> Result<Value, ApiError> {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let created = self.create(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "accessModes": access_modes, "volumeMode": volume_mode,
                "storageClassName": "csi-hostpath-sc",
                "resources": {"requests": {"storage": size}},
                "volumeName": format!("pv-{name}"),
            },
        }))?;
        self.set_status(
            "v1",
            "PersistentVolumeClaim",
            ns,
            name,
            json!({"phase": "Bound", "capacity": {"storage": size}, "accessModes": access_modes}),
        );
        if self.state.backend.data_dir().is_some() {
            volumes::back_seeded_pvc(
                &mut self.state.lock_store(),
                &self.state.backend,
                &self.state.driver,
                ns,
                name,
            )?;
        }
        Ok(created)
    }

    /// Creates a StorageClass provisioned by `driver`, optionally the cluster's default.
    ///
    /// # Errors
    /// As [`Self::create`].
    pub fn seed_storage_class(
        &self,
        name: &str,
        driver: &str,
        default: bool,
    ) -> Result<Value, ApiError> {
        let mut class = json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
            "provisioner": driver, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
        });
        if default {
            class["metadata"]["annotations"] =
                json!({"storageclass.kubernetes.io/is-default-class": "true"});
        }
        self.create(class)
    }

    /// A cluster ready for snapshots: namespace `ns`, the CSIDriver, the default StorageClass
    /// `csi-hostpath-sc` and a default snapshot class `csi-snapclass` for this server's driver.
    ///
    /// # Errors
    /// As [`Self::create`].
    pub fn seed_standard(&self, ns: &str) -> Result<(), ApiError> {
        let driver = self.state.driver.clone();
        self.seed_namespace(ns)?;
        self.seed_csidriver(&driver)?;
        self.seed_storage_class("csi-hostpath-sc", &driver, true)?;
        self.seed_snapshot_class("csi-snapclass", &driver, true)?;
        Ok(())
    }
}

/// One kubeconfig holding a context per `(server, context name)`; `current` is the current context.
pub fn kubeconfig_yaml(servers: &[(&FakeKube, &str)], current: &str) -> String {
    let with_default_tokens: Vec<(&FakeKube, &str, Option<&str>)> =
        servers.iter().map(|(s, c)| (*s, *c, None)).collect();
    kubeconfig_yaml_as(&with_default_tokens, current)
}

/// Like [`kubeconfig_yaml`], with a bearer token per context (`None` = the server's own token).
pub fn kubeconfig_yaml_as(servers: &[(&FakeKube, &str, Option<&str>)], current: &str) -> String {
    let mut clusters = Vec::new();
    let mut contexts = Vec::new();
    let mut users = Vec::new();
    for (server, ctx, token) in servers {
        clusters
            .push(json!({"name": format!("{ctx}-cluster"), "cluster": {"server": server.url()}}));
        contexts.push(json!({"name": ctx, "context": {"cluster": format!("{ctx}-cluster"), "user": format!("{ctx}-user"), "namespace": "default"}}));
        let user = match token.or(server.state.token.as_deref()) {
            Some(t) => json!({"token": t}),
            None => json!({}),
        };
        users.push(json!({"name": format!("{ctx}-user"), "user": user}));
    }
    // JSON is valid YAML; kubeconfig loaders accept it.
    let doc = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": clusters, "contexts": contexts, "users": users, "preferences": {},
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}
