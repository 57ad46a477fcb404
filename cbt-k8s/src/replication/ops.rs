//! What `cbt replication status|promote|demote|resync` does, for people at a terminal.
//!
//! Owns reading VolumeReplications / VolumeGroupReplications into rows (desired, observed,
//! backend, last sync, lag, conditions in words), and changing `spec.replicationState`
//! then waiting for the result and describing what changed on the backend. It never writes
//! backend objects or status: the controller does.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::Serialize;
use serde_json::{Value, json};

use super::controller::OWNER_UID_LABEL;
use super::translate::conditions::{ramen_accepts_primary, ramen_accepts_secondary, types};
use super::translate::{Backend, SubjectKind, dell};
use super::types::{
    DellCSIReplicationGroup, ReplicationState, TridentMirrorRelationship, VolumeGroupReplication,
    VolumeGroupReplicationClass, VolumeReplication, VolumeReplicationClass,
    VolumeReplicationStatus,
};
use crate::Error;
use crate::error::ns_name;

/// One line of `cbt replication status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusRow {
    /// `VolumeReplication` or `VolumeGroupReplication`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.replicationState`.
    pub desired: String,
    /// `status.state` (`-` before the first status).
    pub observed: String,
    /// Backend serving the class (`unknown` if the class or driver is unknown).
    pub backend: String,
    /// Class name.
    pub class: String,
    /// Members (the PVC, or the group's PVCs).
    pub pvcs: Vec<String>,
    /// `status.lastSyncTime`.
    pub last_sync: Option<String>,
    /// Seconds since the last sync, at the time of reading.
    pub lag_seconds: Option<i64>,
    /// True when the status describes the current generation.
    pub current: bool,
    /// Conditions in words.
    pub conditions: String,
    /// `status.message`.
    pub message: String,
}

fn describe_conditions(conds: &[Condition]) -> String {
    let mut words = Vec::new();
    for c in conds {
        let t = c.status == "True";
        let w = match (c.type_.as_str(), t) {
            (types::COMPLETED, true) => format!("completed ({})", c.reason),
            (types::COMPLETED, false) => format!("not completed ({})", c.reason),
            (types::DEGRADED, true) => format!("DEGRADED ({}: {})", c.reason, c.message),
            (types::DEGRADED, false) => "healthy".into(),
            (types::RESYNCING, true) => "resyncing".into(),
            (types::RESYNCING, false) => continue,
            (types::VALIDATED, true) => continue,
            (types::VALIDATED, false) => format!("INVALID: {}", c.message),
            (types::REPLICATING, true) => "replicating".into(),
            (types::REPLICATING, false) => "not replicating".into(),
            (other, _) => format!("{other}={}", c.status),
        };
        words.push(w);
    }
    if words.is_empty() {
        "no status yet".into()
    } else {
        words.join("; ")
    }
}

#[allow(clippy::too_many_arguments)]
fn row(
    kind: SubjectKind,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    desired: ReplicationState,
    class: &str,
    provisioner: Option<&String>,
    status: &VolumeReplicationStatus,
    pvcs: Vec<String>,
    now: &Time,
) -> StatusRow {
    let backend = provisioner
        .and_then(|p| Backend::for_provisioner(p))
        .map_or_else(|| "unknown".to_string(), |b| b.name().to_string());
    StatusRow {
        kind: kind.kind().into(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        desired: desired.to_string(),
        observed: status
            .state
            .map_or_else(|| "-".to_string(), |s| s.as_str().to_string()),
        backend,
        class: class.to_string(),
        pvcs,
        last_sync: status.last_sync_time.as_ref().map(|t| t.0.to_string()),
        lag_seconds: status
            .last_sync_time
            .as_ref()
            .map(|t| now.0.as_second().saturating_sub(t.0.as_second())),
        current: status.observed_generation == meta.generation.unwrap_or(0),
        conditions: describe_conditions(&status.conditions),
        message: status.message.clone(),
    }
}

/// Reads every VolumeReplication and VolumeGroupReplication (of `namespace`, or all).
///
/// # Errors
/// API errors (a missing CRD is a 404: csi-addons replication is not installed).
pub async fn status(
    client: &kube::Client,
    cluster: &str,
    namespace: Option<&str>,
    now: &Time,
) -> Result<Vec<StatusRow>, Error> {
    let scope = namespace.unwrap_or("all namespaces");
    let (vrs, vgrs): (Api<VolumeReplication>, Api<VolumeGroupReplication>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let lp = ListParams::default();
    let vr_list = vrs
        .list(&lp)
        .await
        .map_err(|e| Error::api(cluster, "list", "VolumeReplication", scope, e))?;
    let vgr_list = vgrs
        .list(&lp)
        .await
        .map_err(|e| Error::api(cluster, "list", "VolumeGroupReplication", scope, e))?;
    let vrcs: BTreeMap<String, String> = Api::<VolumeReplicationClass>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| Error::api(cluster, "list", "VolumeReplicationClass", "", e))?
        .items
        .into_iter()
        .map(|c| (c.name_any(), c.spec.provisioner))
        .collect();
    let vgrcs: BTreeMap<String, String> = Api::<VolumeGroupReplicationClass>::all(client.clone())
        .list(&lp)
        .await
        .map_err(|e| Error::api(cluster, "list", "VolumeGroupReplicationClass", "", e))?
        .items
        .into_iter()
        .map(|c| (c.name_any(), c.spec.provisioner))
        .collect();
    let mut rows = Vec::new();
    for vr in &vr_list.items {
        let status = vr.status.clone().unwrap_or_default();
        rows.push(row(
            SubjectKind::Volume,
            &vr.metadata,
            vr.spec.replication_state,
            &vr.spec.volume_replication_class,
            vrcs.get(&vr.spec.volume_replication_class),
            &status,
            vec![vr.spec.data_source.name.clone()],
            now,
        ));
    }
    for g in &vgr_list.items {
        let status = g.status.clone().unwrap_or_default();
        rows.push(row(
            SubjectKind::Group,
            &g.metadata,
            g.spec.replication_state,
            &g.spec.volume_group_replication_class_name,
            vgrcs.get(&g.spec.volume_group_replication_class_name),
            &status.replication,
            status
                .persistent_volume_claims_ref_list
                .iter()
                .map(|r| r.name.clone())
                .collect(),
            now,
        ));
    }
    rows.sort_by(|a, b| (&a.namespace, &a.name, &a.kind).cmp(&(&b.namespace, &b.name, &b.kind)));
    Ok(rows)
}

/// Renders rows as an aligned table.
pub fn render_table(rows: &[StatusRow]) -> String {
    let header = [
        "NAMESPACE",
        "NAME",
        "KIND",
        "DESIRED",
        "OBSERVED",
        "BACKEND",
        "LAST SYNC",
        "LAG",
        "CONDITIONS",
    ];
    let lines: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.namespace.clone(),
                r.name.clone(),
                if r.kind == "VolumeReplication" {
                    "vr".into()
                } else {
                    "vgr".into()
                },
                r.desired.clone(),
                if r.current {
                    r.observed.clone()
                } else {
                    format!("{} (stale)", r.observed)
                },
                r.backend.clone(),
                r.last_sync.clone().unwrap_or_else(|| "-".into()),
                r.lag_seconds.map_or_else(|| "-".into(), human_secs),
                r.conditions.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for l in &lines {
        for (i, c) in l.iter().enumerate().take(8) {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut put = |cells: Vec<&str>| {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i < 8 {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    put(header.to_vec());
    for l in &lines {
        put(l.iter().map(String::as_str).collect());
    }
    out
}

fn human_secs(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// What a state change did.
#[derive(Clone, Debug, Serialize)]
pub struct ChangeReport {
    /// Kind of the object changed.
    pub kind: String,
    /// `namespace/name`.
    pub object: String,
    /// State before.
    pub from: String,
    /// State asked for.
    pub to: String,
    /// Generation of the change.
    pub generation: i64,
    /// The status reached (as a row).
    pub result: StatusRow,
    /// Backend objects that changed, one line each.
    pub backend_changes: Vec<String>,
}

/// Backend objects of a subject as `(key, summary)`: TMRs by our owner label, the RGs of its PVCs.
async fn backend_view(
    client: &kube::Client,
    ns: &str,
    uid: &str,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let mut out = BTreeMap::new();
    let tmrs: Api<TridentMirrorRelationship> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("{OWNER_UID_LABEL}={uid}"));
    match tmrs.list(&lp).await {
        Ok(list) => {
            for t in list.items {
                let st = t
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.first())
                    .map(|c| c.state.as_str().to_string())
                    .unwrap_or_default();
                out.insert(
                    format!("TridentMirrorRelationship {ns}/{}", t.name_any()),
                    format!("spec.state {:?}, status {st:?}", t.spec.state.as_str()),
                );
            }
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

async fn dell_view(
    client: &kube::Client,
    owner: &str,
) -> Result<BTreeMap<String, String>, kube::Error> {
    let mut out = BTreeMap::new();
    let rgs: Api<DellCSIReplicationGroup> = Api::all(client.clone());
    match rgs.list(&ListParams::default()).await {
        Ok(list) => {
            for rg in list.items {
                let ledger = rg
                    .annotations()
                    .get(dell::LEDGER_ANNOTATION)
                    .and_then(|l| serde_json::from_str::<dell::Ledger>(l).ok());
                if ledger.as_ref().is_none_or(|l| l.owner != owner) {
                    continue;
                }
                let st = rg.status.clone().unwrap_or_default();
                out.insert(
                    format!("DellCSIReplicationGroup {}", rg.name_any()),
                    format!(
                        "verbs sent {:?}, link {} (source: {}), last action {:?}",
                        ledger.map(|l| l.sent).unwrap_or_default(),
                        st.replication_link_state.state,
                        st.replication_link_state.is_source,
                        st.last_action.condition
                    ),
                );
            }
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e),
    }
    Ok(out)
}

/// Sets `spec.replicationState` of VolumeReplication `name` (or, if none, the
/// VolumeGroupReplication) and waits until the controller reports the result.
///
/// # Errors
/// [`Error::NotFound`] for an unknown name; [`Error::ReplicationRejected`] when the
/// controller refuses the input; [`Error::ReplicationFailed`] when the backend fails;
/// [`Error::Timeout`] when `timeout` passes first; API errors.
pub async fn set_state(
    client: &kube::Client,
    cluster: &str,
    namespace: &str,
    name: &str,
    desired: ReplicationState,
    timeout: Duration,
    now: impl Fn() -> Time,
) -> Result<ChangeReport, Error> {
    let object = ns_name(namespace, name);
    let vrs: Api<VolumeReplication> = Api::namespaced(client.clone(), namespace);
    let vgrs: Api<VolumeGroupReplication> = Api::namespaced(client.clone(), namespace);
    let (kind, from, uid) = match vrs
        .get_opt(name)
        .await
        .map_err(|e| Error::api(cluster, "get", "VolumeReplication", &object, e))?
    {
        Some(vr) => (
            SubjectKind::Volume,
            vr.spec.replication_state,
            vr.metadata.uid.clone().unwrap_or_default(),
        ),
        None => match vgrs
            .get_opt(name)
            .await
            .map_err(|e| Error::api(cluster, "get", "VolumeGroupReplication", &object, e))?
        {
            Some(g) => (
                SubjectKind::Group,
                g.spec.replication_state,
                g.metadata.uid.clone().unwrap_or_default(),
            ),
            None => {
                return Err(Error::NotFound {
                    cluster: cluster.into(),
                    kind: "VolumeReplication",
                    object,
                    hint: "; no VolumeGroupReplication of that name either (see `cbt replication status`)".into(),
                });
            }
        },
    };
    let owner = format!("{}/{namespace}/{name}", kind.kind());
    let view =
        |c: kube::Error| Error::api(cluster, "list", "TridentMirrorRelationship", namespace, c);
    let rgs = |c: kube::Error| Error::api(cluster, "list", "DellCSIReplicationGroup", "", c);
    let mut before = backend_view(client, namespace, &uid).await.map_err(view)?;
    before.extend(dell_view(client, &owner).await.map_err(rgs)?);
    let patch = json!({"spec": {"replicationState": desired.to_string()}});
    let pp = PatchParams::default();
    let generation = match kind {
        SubjectKind::Volume => vrs
            .patch(name, &pp, &Patch::Merge(&patch))
            .await
            .map(|o| o.metadata.generation),
        SubjectKind::Group => vgrs
            .patch(name, &pp, &Patch::Merge(&patch))
            .await
            .map(|o| o.metadata.generation),
    }
    .map_err(|e| Error::api(cluster, "patch", kind.kind(), &object, e))?
    .unwrap_or(0);
    let started = Instant::now();
    loop {
        let (status, meta, class, pvcs) = match kind {
            SubjectKind::Volume => {
                let vr = vrs
                    .get(name)
                    .await
                    .map_err(|e| Error::api(cluster, "get", "VolumeReplication", &object, e))?;
                (
                    vr.status.clone().unwrap_or_default(),
                    vr.metadata.clone(),
                    vr.spec.volume_replication_class.clone(),
                    vec![vr.spec.data_source.name.clone()],
                )
            }
            SubjectKind::Group => {
                let g = vgrs.get(name).await.map_err(|e| {
                    Error::api(cluster, "get", "VolumeGroupReplication", &object, e)
                })?;
                let s = g.status.clone().unwrap_or_default();
                (
                    s.replication.clone(),
                    g.metadata.clone(),
                    g.spec.volume_group_replication_class_name.clone(),
                    s.persistent_volume_claims_ref_list
                        .iter()
                        .map(|r| r.name.clone())
                        .collect(),
                )
            }
        };
        let r = row(kind, &meta, desired, &class, None, &status, pvcs, &now());
        let last = format!("{} ({})", r.conditions, r.message);
        if status.observed_generation >= generation {
            let cond = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
            if cond(types::VALIDATED).is_some_and(|c| c.status == "False") {
                return Err(Error::ReplicationRejected {
                    object,
                    message: cond(types::VALIDATED)
                        .map(|c| c.message.clone())
                        .unwrap_or_default(),
                });
            }
            let done = match desired {
                ReplicationState::Primary => ramen_accepts_primary(&status, generation),
                _ => ramen_accepts_secondary(&status, generation),
            };
            if done {
                let mut after = backend_view(client, namespace, &uid).await.map_err(view)?;
                after.extend(dell_view(client, &owner).await.map_err(rgs)?);
                let mut changes = Vec::new();
                for (k, v) in &after {
                    match before.get(k) {
                        Some(b) if b == v => {}
                        Some(b) => changes.push(format!("{k}: {b} -> {v}")),
                        None => changes.push(format!("{k}: created, {v}")),
                    }
                }
                for k in before.keys().filter(|k| !after.contains_key(*k)) {
                    changes.push(format!("{k}: deleted"));
                }
                return Ok(ChangeReport {
                    kind: kind.kind().into(),
                    object,
                    from: from.to_string(),
                    to: desired.to_string(),
                    generation,
                    result: r,
                    backend_changes: changes,
                });
            }
            let failed = cond(types::COMPLETED)
                .is_some_and(|c| c.status == "False" && c.reason.starts_with("FailedTo"))
                && cond(types::DEGRADED).is_some_and(|c| c.status == "True");
            if failed && status.state == Some(super::types::ReplicatedState::Unknown) {
                return Err(Error::ReplicationFailed {
                    object,
                    message: status.message.clone(),
                });
            }
        }
        if started.elapsed() >= timeout {
            return Err(Error::Timeout {
                cluster: cluster.into(),
                what: format!("{} {object} to become {desired}", kind.kind()),
                waited: timeout,
                last_state: last,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The rows as JSON (`-o json`).
pub fn rows_json(rows: &[StatusRow]) -> Value {
    json!({ "items": rows })
}
