//! Simulated replication backends: a Trident mirror controller and a Dell replication sidecar.
//!
//! With [`crate::FakeKubeBuilder::replication_api`] the cluster installs the real CRDs of
//! csi-addons replication, Trident (TridentMirrorRelationship, TridentActionMirrorUpdate) and
//! Dell (DellCSIReplicationGroup) from `fake-kube/crds/` (objects are then checked against
//! their schemas, see the `schema` module), serves `coordination.k8s.io/v1` Leases, and runs:
//!
//! - **Trident**: for every TMR whose status does not describe its current `spec.state` and
//!   generation, the status condition goes to the `-ing` form (`promoting`, `establishing`,
//!   `reestablishing`) and, after the configured delay, to the state itself, with
//!   `localVolumeHandle` `svm0:trident_<ns>_<pvc>` and the spec's remote handle. Injected
//!   faults: a TMR that fails to promote reports `failed` (and is retried, like Trident's
//!   requeue, once the fault is cleared), a TMR marked invalid reports `invalid`, and
//!   [`ReplicationSim::set_trident_stuck`] keeps every transition in its `-ing` form. A
//!   TridentActionMirrorUpdate is `Succeeded` at once.
//! - **Dell**: the sidecar picks up a non-empty `spec.action` of an RG of driver
//!   `csi-powerstore.dellemc.com`: state `<ACTION>_IN_PROGRESS`, then after the delay it
//!   records annotation `Action`, `lastAction` ("Action X succeeded" / "Action X failed with
//!   error E"), a condition, the new `replicationLinkState` (polled at the same instant) and
//!   clears `spec.action`. Every verb picked up is kept in [`ReplicationSim::dell_actions`], so
//!   tests can prove no verb ran twice.
//!
//! Link changes per verb (this side): `FAILOVER_REMOTE` -> not source, `FAILEDOVER`;
//! `UNPLANNED_FAILOVER_LOCAL` -> source, `FAILEDOVER`; `REPROTECT_LOCAL` -> source,
//! `SYNCHRONIZED`; `SUSPEND` -> `SUSPENDED`; `RESUME`, `SYNC` -> `SYNCHRONIZED`.
//!
//! Two fake clusters whose sims are joined by [`ReplicationSim::pair_dell`] share one
//! PowerStore pair: a verb that succeeds on one side also moves the peer's RG (the one whose
//! `spec.protectionGroupId` is this RG's `spec.remoteProtectionGroupId`), as Dell's sidecar on
//! the peer reports the array's link on its next poll: `FAILOVER_REMOTE` -> peer source,
//! `FAILEDOVER`; `FAILOVER_LOCAL`, `UNPLANNED_FAILOVER_LOCAL` -> peer not source, `FAILEDOVER`;
//! `REPROTECT_LOCAL` -> peer not source, `SYNCHRONIZED`; `SUSPEND`, `RESUME`, `SYNC` -> the same
//! link state on the peer. Only the link state moves there: the peer ran no verb, so its
//! `lastAction` and `spec.action` stay. Unpaired, the peer is not simulated.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::store::{ResourceType, Store};
use crate::values::rfc3339_now;

/// `coordination.k8s.io/v1` Lease (leader election).
pub(crate) static LEASES: ResourceType = ResourceType {
    group: "coordination.k8s.io",
    version: "v1",
    plural: "leases",
    kind: "Lease",
    namespaced: true,
    status_subresource: false,
    crd: false,
};

/// The replication CRDs installed by `replication_api`, byte-identical copies of the upstream
/// manifests (csi-addons v0.14+ HEAD, Trident 71dd716, csm-replication v1.14).
pub const REPLICATION_CRDS: [&str; 8] = [
    include_str!("../crds/replication.storage.openshift.io_volumereplications.yaml"),
    include_str!("../crds/replication.storage.openshift.io_volumereplicationclasses.yaml"),
    include_str!("../crds/replication.storage.openshift.io_volumegroupreplications.yaml"),
    include_str!("../crds/replication.storage.openshift.io_volumegroupreplicationclasses.yaml"),
    include_str!("../crds/replication.storage.openshift.io_volumegroupreplicationcontents.yaml"),
    include_str!("../crds/trident.netapp.io_tridentmirrorrelationships.yaml"),
    include_str!("../crds/trident.netapp.io_tridentactionmirrorupdates.yaml"),
    include_str!("../crds/replication.storage.dell.com_dellcsireplicationgroups.yaml"),
];

const DELL_DRIVER: &str = "csi-powerstore.dellemc.com";

#[derive(Default)]
struct SimState {
    trident_delay: Duration,
    trident_stuck: bool,
    trident_fail_promote: BTreeSet<String>,
    trident_invalid: BTreeMap<String, String>,
    dell_delay: Duration,
    dell_fail: BTreeMap<String, String>,
    dell_paused: bool,
    /// When an object's transition completes, by (plural, namespace, name).
    ready_at: HashMap<(&'static str, String, String), Instant>,
    dell_history: Vec<(String, String)>,
    /// The store's resourceVersion up to which changes were looked at.
    seen_rv: u64,
    /// A knob changed: look at every object once (a cleared fault affects objects that did
    /// not change).
    rescan: bool,
    /// The paired cluster's inbox ([`ReplicationSim::pair_dell`]).
    peer: Option<Inbox>,
}

/// A link change the paired cluster's array made, for this cluster's RG of protection group
/// `protection_group`.
#[derive(Clone, Debug)]
struct PeerMove {
    protection_group: String,
    is_source: Option<bool>,
    link: String,
}

type Inbox = Arc<Mutex<Vec<PeerMove>>>;

/// Timing and fault knobs of the simulated replication backends, shared with the test.
#[derive(Clone, Default)]
pub struct ReplicationSim {
    inner: Arc<Mutex<SimState>>,
    /// Link changes from the paired cluster, applied on the next pass.
    inbox: Inbox,
}

impl ReplicationSim {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the knobs to change one: the next pass looks at every object.
    fn knob(&self) -> MutexGuard<'_, SimState> {
        let mut s = self.lock();
        s.rescan = true;
        s
    }

    /// How long a TMR transition stays in its `-ing` state (default 0: next controller pass).
    pub fn set_trident_delay(&self, d: Duration) {
        self.knob().trident_delay = d;
    }

    /// Keeps every TMR transition in its `-ing` state (a backend that never converges).
    pub fn set_trident_stuck(&self, stuck: bool) {
        self.knob().trident_stuck = stuck;
    }

    /// Makes promoting TMR `ns/name` fail (`failed`) until called again with `false`.
    pub fn fail_trident_promotion(&self, ns: &str, name: &str, fail: bool) {
        let key = format!("{ns}/{name}");
        let mut s = self.knob();
        if fail {
            s.trident_fail_promote.insert(key);
        } else {
            s.trident_fail_promote.remove(&key);
        }
    }

    /// Makes TMR `ns/name` report `invalid` with `message` (None clears it).
    pub fn set_trident_invalid(&self, ns: &str, name: &str, message: Option<&str>) {
        let key = format!("{ns}/{name}");
        let mut s = self.knob();
        match message {
            Some(m) => {
                s.trident_invalid.insert(key, m.to_string());
            }
            None => {
                s.trident_invalid.remove(&key);
            }
        }
    }

    /// How long a Dell action runs (default 0).
    pub fn set_dell_delay(&self, d: Duration) {
        self.knob().dell_delay = d;
    }

    /// Makes Dell verb `action` fail finally with `error` (None: succeed again).
    pub fn fail_dell_action(&self, action: &str, error: Option<&str>) {
        let mut s = self.knob();
        match error {
            Some(e) => {
                s.dell_fail.insert(action.to_string(), e.to_string());
            }
            None => {
                s.dell_fail.remove(action);
            }
        }
    }

    /// Stops the Dell sidecar (actions stay pending) until resumed.
    pub fn set_dell_paused(&self, paused: bool) {
        self.knob().dell_paused = paused;
    }

    /// Joins this cluster's simulated PowerStore to `peer`'s: from now on a verb that succeeds
    /// on one side also moves the other side's RG of the same protection-group pair (see the
    /// module docs).
    pub fn pair_dell(&self, peer: &ReplicationSim) {
        self.lock().peer = Some(peer.inbox.clone());
        peer.lock().peer = Some(self.inbox.clone());
    }

    /// Every Dell verb the sidecar picked up, as (RG name, verb), in order.
    pub fn dell_actions(&self) -> Vec<(String, String)> {
        self.lock().dell_history.clone()
    }
}

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(n) => cur = n,
            None => return "",
        }
    }
    cur.as_str().unwrap_or("")
}

/// Runs both simulated backends once; true if anything changed.
pub(crate) fn reconcile(
    store: &mut Store,
    types: &[&'static ResourceType],
    sim: &ReplicationSim,
) -> bool {
    let find = |plural: &str| types.iter().copied().find(|t| t.plural == plural);
    // Our own writes of this pass come after this resourceVersion: the next pass sees them.
    let since = {
        let mut s = sim.lock();
        let since = (!std::mem::take(&mut s.rescan)).then_some(s.seen_rv);
        s.seen_rv = store.resource_version();
        since
    };
    let mut changed = false;
    if let Some(rt) = find("tridentmirrorrelationships") {
        let todo = candidates(store, rt, since, sim);
        changed |= trident(store, rt, sim, todo);
    }
    if let Some(rt) = find("tridentactionmirrorupdates") {
        let todo = candidates(store, rt, since, sim);
        changed |= mirror_updates(store, rt, todo);
    }
    if let Some(rt) = find("dellcsireplicationgroups") {
        changed |= peer_moves(store, rt, sim);
        let todo = candidates(store, rt, since, sim);
        changed |= dell(store, rt, sim, todo);
    }
    changed
}

/// The objects of `rt` a pass looks at, as (namespace, name): those changed since `since`
/// and those waiting on a timer; every object when `since` is None (a knob changed) or the
/// change log no longer reaches back to it. A pass thus costs what changed, not what exists.
fn candidates(
    store: &Store,
    rt: &'static ResourceType,
    since: Option<u64>,
    sim: &ReplicationSim,
) -> BTreeSet<(String, String)> {
    let key = |o: &Value| {
        (
            text(o, &["metadata", "namespace"]).to_string(),
            text(o, &["metadata", "name"]).to_string(),
        )
    };
    let mut out: BTreeSet<(String, String)> = match since.and_then(|rv| store.changes_since(rv)) {
        Some(events) => events
            .filter(|e| e.rt.plural == rt.plural && e.kind != "DELETED")
            .map(|e| key(&e.object))
            .collect(),
        None => store.iter_type(rt).map(key).collect(),
    };
    out.extend(
        sim.lock()
            .ready_at
            .keys()
            .filter(|(plural, _, _)| *plural == rt.plural)
            .map(|(_, ns, name)| (ns.clone(), name.clone())),
    );
    out
}

fn trident(
    store: &mut Store,
    rt: &'static ResourceType,
    sim: &ReplicationSim,
    todo: BTreeSet<(String, String)>,
) -> bool {
    let mut changed = false;
    let now = Instant::now();
    for (ns, name) in todo {
        let timer = (rt.plural, ns.clone(), name.clone());
        let Ok(tmr) = store.get(rt, &ns, &name) else {
            sim.lock().ready_at.remove(&timer);
            continue;
        };
        if tmr["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        let key = format!("{ns}/{name}");
        let generation = tmr["metadata"]["generation"].as_i64().unwrap_or(1);
        let desired = text(&tmr, &["spec", "state"]).to_string();
        let cond = tmr["status"]["conditions"][0].clone();
        let cur = text(&cond, &["state"]).to_string();
        let cur_gen = cond["observedGeneration"].as_i64().unwrap_or(0);
        let mut s = sim.lock();
        let ing = match desired.as_str() {
            "promoted" => "promoting",
            "established" => "establishing",
            "reestablished" => "reestablishing",
            _ => "",
        };
        let (next, message) = if let Some(m) = s.trident_invalid.get(&key) {
            ("invalid".to_string(), m.clone())
        } else if desired.is_empty() {
            (String::new(), String::new())
        } else if cur_gen == generation && cur == desired {
            continue;
        } else if cur_gen == generation && cur == "failed" {
            if s.trident_fail_promote.contains(&key) {
                continue;
            }
            // Trident requeues a failed relationship: retry once the fault is gone.
            let at = now + s.trident_delay;
            s.ready_at.insert(timer, at);
            (ing.to_string(), String::new())
        } else if cur_gen == generation && cur == ing {
            if s.trident_stuck || s.ready_at.get(&timer).is_some_and(|t| now < *t) {
                continue;
            }
            s.ready_at.remove(&timer);
            if desired == "promoted" && s.trident_fail_promote.contains(&key) {
                (
                    "failed".to_string(),
                    "Failed to promote volume: SnapMirror break failed (injected fault)"
                        .to_string(),
                )
            } else {
                (desired.clone(), String::new())
            }
        } else {
            let at = now + s.trident_delay;
            s.ready_at.insert(timer, at);
            (ing.to_string(), String::new())
        };
        drop(s);
        if cur == next && cur_gen == generation {
            continue;
        }
        let mapping = &tmr["spec"]["volumeMappings"][0];
        let pvc = text(mapping, &["localPVCName"]).to_string();
        let status = json!({"conditions": [{
            "state": next,
            "message": message,
            "lastTransitionTime": rfc3339_now(),
            "observedGeneration": generation,
            "localPVCName": pvc,
            "localVolumeHandle": format!("svm0:trident_{}_{}", ns.replace('-', "_"), pvc.replace('-', "_")),
            "remoteVolumeHandle": text(mapping, &["remoteVolumeHandle"]),
            "replicationPolicy": text(&tmr, &["spec", "replicationPolicy"]),
            "replicationSchedule": text(&tmr, &["spec", "replicationSchedule"]),
        }]});
        changed |= store.controller_update(rt, &ns, &name, |o| o["status"] = status);
    }
    changed
}

fn mirror_updates(
    store: &mut Store,
    rt: &'static ResourceType,
    todo: BTreeSet<(String, String)>,
) -> bool {
    let mut changed = false;
    for (ns, name) in todo {
        let Ok(u) = store.get(rt, &ns, &name) else {
            continue;
        };
        if !text(&u, &["status", "state"]).is_empty() {
            continue;
        }
        let now = rfc3339_now();
        changed |= store.controller_update(rt, &ns, &name, |o| {
            o["status"] = json!({
                "state": "Succeeded",
                "completionTime": now,
                "previousTransferTime": now,
                "localVolumeHandle": "",
                "remoteVolumeHandle": "",
            });
        });
    }
    changed
}

/// Applies the paired cluster's link changes to the RGs of their protection groups.
fn peer_moves(store: &mut Store, rt: &'static ResourceType, sim: &ReplicationSim) -> bool {
    let moves = std::mem::take(&mut *sim.inbox.lock().unwrap_or_else(|p| p.into_inner()));
    let mut changed = false;
    for mv in moves {
        let names: Vec<String> = store
            .iter_type(rt)
            .filter(|o| {
                text(o, &["spec", "driverName"]) == DELL_DRIVER
                    && text(o, &["spec", "protectionGroupId"]) == mv.protection_group
            })
            .map(|o| text(o, &["metadata", "name"]).to_string())
            .collect();
        let at = rfc3339_now();
        for name in names {
            changed |= store.controller_update(rt, "", &name, |o| {
                let was = o["status"]["replicationLinkState"]["isSource"]
                    .as_bool()
                    .unwrap_or(false);
                o["status"]["replicationLinkState"] = json!({
                    "state": mv.link,
                    "isSource": mv.is_source.unwrap_or(was),
                    "lastSuccessfulUpdate": at,
                });
            });
        }
    }
    changed
}

/// What a verb that succeeded on one side does to the paired side's link.
fn peer_move(action: &str, remote_pg: &str) -> Option<PeerMove> {
    let (is_source, link) = match action {
        "FAILOVER_REMOTE" => (Some(true), "FAILEDOVER"),
        "UNPLANNED_FAILOVER_LOCAL" | "FAILOVER_LOCAL" => (Some(false), "FAILEDOVER"),
        "REPROTECT_LOCAL" => (Some(false), "SYNCHRONIZED"),
        "SUSPEND" => (None, "SUSPENDED"),
        "RESUME" | "SYNC" => (None, "SYNCHRONIZED"),
        _ => return None,
    };
    (!remote_pg.is_empty()).then(|| PeerMove {
        protection_group: remote_pg.to_string(),
        is_source,
        link: link.to_string(),
    })
}

fn dell(
    store: &mut Store,
    rt: &'static ResourceType,
    sim: &ReplicationSim,
    todo: BTreeSet<(String, String)>,
) -> bool {
    let mut changed = false;
    let now = Instant::now();
    for (_, name) in todo {
        let key = (rt.plural, String::new(), name.clone());
        let Ok(rg) = store.get(rt, "", &name) else {
            sim.lock().ready_at.remove(&key);
            continue;
        };
        if text(&rg, &["spec", "driverName"]) != DELL_DRIVER {
            continue;
        }
        let action = text(&rg, &["spec", "action"]).trim().to_ascii_uppercase();
        let state = text(&rg, &["status", "state"]).to_string();
        let mut s = sim.lock();
        if s.dell_paused || action.is_empty() {
            continue;
        }
        if !state.ends_with("_IN_PROGRESS") {
            s.dell_history.push((name.clone(), action.clone()));
            let at = now + s.dell_delay;
            s.ready_at.insert(key, at);
            drop(s);
            let st = format!("{action}_IN_PROGRESS");
            changed |= store.controller_update(rt, "", &name, |o| o["status"]["state"] = json!(st));
            continue;
        }
        if s.ready_at.get(&key).is_some_and(|t| now < *t) {
            continue;
        }
        s.ready_at.remove(&key);
        let failure = s.dell_fail.get(&action).cloned();
        drop(s);
        let at = rfc3339_now();
        let mut is_source = rg["status"]["replicationLinkState"]["isSource"]
            .as_bool()
            .unwrap_or(false);
        let mut link = text(&rg, &["status", "replicationLinkState", "state"]).to_string();
        let condition = match &failure {
            Some(e) => format!("Action {action} failed with error {e}"),
            None => {
                match action.as_str() {
                    "FAILOVER_REMOTE" => {
                        is_source = false;
                        link = "FAILEDOVER".into();
                    }
                    "UNPLANNED_FAILOVER_LOCAL" | "FAILOVER_LOCAL" => {
                        is_source = true;
                        link = "FAILEDOVER".into();
                    }
                    "REPROTECT_LOCAL" => {
                        is_source = true;
                        link = "SYNCHRONIZED".into();
                    }
                    "SUSPEND" => link = "SUSPENDED".into(),
                    "RESUME" | "SYNC" => link = "SYNCHRONIZED".into(),
                    _ => {}
                }
                format!("Action {action} succeeded")
            }
        };
        if failure.is_none()
            && let Some(mv) = peer_move(&action, text(&rg, &["spec", "remoteProtectionGroupId"]))
            && let Some(peer) = sim.lock().peer.clone()
        {
            peer.lock().unwrap_or_else(|p| p.into_inner()).push(mv);
        }
        let error = failure.clone().unwrap_or_default();
        let annotation = json!({
            "name": action.to_ascii_lowercase(),
            "completed": true,
            "finalError": error,
            "finishTime": at,
            "protectionGroupStatus": "",
        })
        .to_string();
        changed |= store.controller_update(rt, "", &name, |o| {
            o["metadata"]["annotations"]["Action"] = json!(annotation);
            o["spec"]["action"] = json!("");
            let last = json!({"condition": condition, "time": at, "errorMessage": error});
            let mut conds = o["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            conds.insert(0, last.clone());
            conds.truncate(20);
            o["status"]["state"] = json!(if failure.is_some() { "Error" } else { "Ready" });
            o["status"]["lastAction"] = last;
            o["status"]["conditions"] = json!(conds);
            o["status"]["replicationLinkState"] = json!({
                "state": link,
                "isSource": is_source,
                "lastSuccessfulUpdate": at,
            });
        });
    }
    changed
}
