//! The `cbt-replicator` reconciler: reads csi-addons objects and backend
//! objects from the cluster, asks the pure [`crate::replication::translate::plan`]
//! what to do, and does it.
//!
//! Owns every write the controller makes: backend objects (with our owner
//! annotation and the [`OWNER_UID_LABEL`] index label), the csi-addons status
//! subresource, PVC owner annotations as csi-addons writes them, our
//! finalizer, and Events. It decides nothing the planner decides; it adds only
//! what needs the cluster or a clock: ownership (which objects this process
//! serves), claiming PVCs before any backend write, the convergence timeout
//! (Degraded with the reason, retried with backoff), and conflict handling.
//!
//! # Guarantees
//! - State lives in the cluster only: every reconcile reads the subject and its
//!   backend objects from the API and its class and PVCs from watch caches (see
//!   the `read` module), so a restart at any point continues where the cluster
//!   is. In memory there is only the retry count that sets the backoff.
//! - The status patch carries the subject's `resourceVersion` as read, so a
//!   status is never computed from an older object than the one it lands on.
//! - Only the leader writes ([`Leadership`]); a follower's reconcile reads and
//!   returns.
//! - A patch computed from a stale read carries its `resourceVersion` and fails
//!   with 409; the reconcile then stops writing and is retried shortly, from a
//!   new read. A 410 on a watch makes kube-runtime's watcher list again.
//! - Nothing is written to a backend for a rejected subject.

pub mod content;
pub mod leader;
pub mod metrics;
pub mod process;
mod read;
pub mod serve;
#[cfg(feature = "testing")]
pub mod testing;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Event as KubeEvent, EventSource, ObjectReference, PersistentVolumeClaim,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};

use super::translate::conditions::{reasons, types as cond_types};
use super::translate::{
    Backend, BackendObject, BackendWrite, ClassView, EventType, MANAGED_BY, MANAGED_BY_LABEL,
    OWNER_ANNOTATION, ObjectKey, Plan, Request, Subject, SubjectKind, SubjectStatus, dell, members,
    plan,
};
use super::types::{
    DellCSIReplicationGroup, PVC_VGR_ANNOTATION, PVC_VGR_FINALIZER, PVC_VR_ANNOTATION,
    PVC_VR_FINALIZER, ReplicatedState, TridentActionMirrorUpdate, TridentMirrorRelationship,
    VolumeGroupReplication, VolumeGroupReplicationClass, VolumeGroupReplicationContent,
    VolumeReplication, VolumeReplicationClass, VolumeReplicationStatus,
};
use crate::Error;
use crate::error::ns_name;

pub use leader::Leadership;
pub use metrics::Metrics;
use read::{Caches, Reader};

/// Finalizer we put on every VolumeReplication / VolumeGroupReplication we serve.
pub const FINALIZER: &str = "replication.cbt.io/protection";
/// Label on backend objects we create: the UID of the csi-addons object they serve (an index
/// for listing; ownership itself is the owner annotation).
pub const OWNER_UID_LABEL: &str = "replication.cbt.io/owner-uid";
/// Reason of the Degraded condition set when a backend does not converge in time.
pub const NOT_CONVERGING_REASON: &str = reasons::ERROR;
/// Event `source.component` / `reportingComponent`.
pub const COMPONENT: &str = "cbt-replicator";

/// Reads the time (injected so tests control the convergence timeout).
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Time;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Time {
        Time(k8s_openapi::jiff::Timestamp::now())
    }
}

/// What the controller serves and how patiently.
#[derive(Clone, Debug)]
pub struct Config {
    /// CSI driver names whose classes this controller serves.
    pub provisioners: Vec<String>,
    /// Also report (Validated=False) objects whose class is missing or names a driver no
    /// backend knows, instead of leaving them to some other controller.
    pub report_unknown: bool,
    /// How long a transition may stay in progress before `Degraded=True`.
    pub converge_timeout: Duration,
    /// Re-read converged objects this often (backend changes also trigger through watches).
    pub resync: Duration,
    /// First retry delay of a subject that is in progress, rejected or failing.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Retry delay after a conflict (a stale read).
    pub conflict_retry: Duration,
}

impl Config {
    /// Production defaults for the given drivers.
    pub fn new(provisioners: Vec<String>) -> Self {
        Self {
            provisioners,
            report_unknown: true,
            converge_timeout: Duration::from_secs(600),
            resync: Duration::from_secs(300),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            conflict_retry: Duration::from_millis(200),
        }
    }

    fn serves(&self, provisioner: &str) -> bool {
        self.provisioners.iter().any(|p| p == provisioner)
    }
}

/// Everything a reconcile needs.
pub struct Context {
    /// Client of the cluster.
    pub client: kube::Client,
    /// Name of the cluster in messages.
    pub cluster: String,
    /// What to serve.
    pub config: Config,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Whether we may write.
    pub leadership: Leadership,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    attempts: Mutex<HashMap<String, u32>>,
    in_flight: AtomicUsize,
}

impl Context {
    /// A context with the system clock.
    pub fn new(
        client: kube::Client,
        cluster: &str,
        config: Config,
        metrics: Arc<Metrics>,
        leadership: Leadership,
    ) -> Self {
        Self::with_clock(
            client,
            cluster,
            config,
            metrics,
            leadership,
            Arc::new(SystemClock),
        )
    }

    /// A context with an injected clock.
    pub fn with_clock(
        client: kube::Client,
        cluster: &str,
        config: Config,
        metrics: Arc<Metrics>,
        leadership: Leadership,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            client,
            cluster: cluster.to_string(),
            config,
            metrics,
            leadership,
            clock,
            attempts: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn backoff(&self, key: &str) -> Duration {
        let mut map = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key.to_string()).or_insert(0);
        let delay = self
            .config
            .retry_base
            .saturating_mul(1u32 << (*n).min(16))
            .min(self.config.retry_max);
        *n = n.saturating_add(1);
        delay
    }

    fn reset(&self, key: &str) {
        self.attempts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// How a reconcile ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The object does not exist (any more).
    Gone,
    /// Not ours: another controller serves its class.
    NotServed,
    /// We are not the leader: nothing was written.
    NotLeader,
    /// Input refused; status and event written, nothing sent to the backend.
    Rejected,
    /// A write met a newer object (409): retried shortly from a fresh read.
    Conflict,
    /// The backend is working on it (or we just asked it to).
    InProgress,
    /// The backend has not converged within the timeout: Degraded, retried with backoff.
    NotConverging,
    /// Desired state reached.
    Converged,
    /// The object is being deleted and cleanup goes on.
    Deleting,
    /// Deletion finished: our finalizer is gone.
    Released,
}

impl Verdict {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Gone => "gone",
            Self::NotServed => "not_served",
            Self::NotLeader => "not_leader",
            Self::Rejected => "rejected",
            Self::Conflict => "conflict",
            Self::InProgress => "in_progress",
            Self::NotConverging => "not_converging",
            Self::Converged => "converged",
            Self::Deleting => "deleting",
            Self::Released => "released",
        }
    }
}

/// What one reconcile did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// How it ended.
    pub result: Verdict,
    /// The plan it executed (empty for Gone / NotServed).
    pub plan: Plan,
    /// When to look again.
    pub requeue: Option<Duration>,
}

impl Outcome {
    fn bare(result: Verdict, requeue: Option<Duration>) -> Self {
        Self {
            result,
            plan: Plan::default(),
            requeue,
        }
    }
}

/// The subject as read, typed.
enum Object {
    Volume(Box<VolumeReplication>),
    Group(Box<VolumeGroupReplication>),
}

impl Object {
    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Volume(o) => &o.metadata,
            Self::Group(o) => &o.metadata,
        }
    }

    fn status_json(&self) -> Value {
        match self {
            Self::Volume(o) => serde_json::to_value(&o.status).unwrap_or(Value::Null),
            Self::Group(o) => serde_json::to_value(&o.status).unwrap_or(Value::Null),
        }
    }

    fn object_ref(&self) -> ObjectReference {
        match self {
            Self::Volume(o) => o.object_ref(&()),
            Self::Group(o) => o.object_ref(&()),
        }
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Reconciles one VolumeReplication or VolumeGroupReplication, once.
///
/// # Errors
/// API errors other than conflicts (which end as [`Verdict::Conflict`]).
///
/// # Guarantees
/// See the module docs.
pub async fn reconcile_once(
    ctx: &Context,
    kind: SubjectKind,
    namespace: &str,
    name: &str,
) -> Result<Outcome, Error> {
    reconcile_with(ctx, Reader::Api(ctx), kind, namespace, name).await
}

/// One reconcile reading through `reader` (the API, or the running controller's caches).
async fn reconcile_with(
    ctx: &Context,
    reader: Reader<'_>,
    kind: SubjectKind,
    namespace: &str,
    name: &str,
) -> Result<Outcome, Error> {
    let obj = reader.subject(kind, namespace, name).await?;
    let key = format!("{}/{namespace}/{name}", kind.kind());
    let Some(obj) = obj else {
        ctx.metrics.set_state(kind.kind(), &key, None);
        ctx.reset(&key);
        return Ok(Outcome::bare(Verdict::Gone, None));
    };
    let subject = match &obj {
        Object::Volume(vr) => Subject::from_volume(vr),
        Object::Group(vgr) => Subject::from_group(vgr),
    }
    .map_err(|e| Error::InvalidInput {
        what: kind.kind().to_string(),
        reason: e.to_string(),
    })?;
    let class = reader.class(&subject).await?;
    let has_finalizer = obj
        .meta()
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER);
    if !owned(&ctx.config, &subject, class.as_ref(), has_finalizer) {
        return Ok(Outcome::bare(Verdict::NotServed, None));
    }
    if subject.deleting && !has_finalizer {
        // Deleted before we ever served it, or already released.
        return Ok(Outcome::bare(Verdict::Released, None));
    }
    let backend = class
        .as_ref()
        .and_then(|c| Backend::for_provisioner(&c.provisioner));
    let pvcs = reader.pvc_infos(&subject, backend).await?;
    let mut req = Request {
        subject,
        class,
        pvcs,
        now: ctx.clock.now(),
    };
    let member_names = backend
        .and_then(|b| members(&req, b).ok())
        .unwrap_or_default();
    let observed = reader.observed(&req, backend, &member_names).await?;
    let the_plan = plan(&req, &observed).map_err(|e| Error::InvalidInput {
        what: kind.kind().to_string(),
        reason: e.to_string(),
    })?;
    if !ctx.leadership.is_leader() {
        return Ok(Outcome {
            result: Verdict::NotLeader,
            plan: the_plan,
            requeue: Some(ctx.config.retry_max),
        });
    }
    let reference = obj.object_ref();
    if req.subject.deleting {
        return finish_deletion(ctx, reader, &req, &obj, the_plan, &reference, &key).await;
    }
    // The status patch is guarded by this: a status computed from a stale read is refused.
    let mut subject_rv = obj.meta().resource_version.clone();
    if !has_finalizer {
        match add_finalizer(ctx, &obj, kind).await? {
            Some(meta) => subject_rv = meta.resource_version,
            None => {
                return Ok(Outcome {
                    result: Verdict::Conflict,
                    plan: the_plan,
                    requeue: Some(ctx.config.conflict_retry),
                });
            }
        }
    }
    // Claim PVCs before any backend write: a concurrent claim by another object then fails
    // with a conflict here instead of both driving the backend.
    if the_plan.rejection.is_none() && backend.is_some_and(|b| b != Backend::CephRbd) {
        let claimed = claim_pvcs(ctx, &req, &member_names).await?;
        if !claimed {
            return Ok(Outcome {
                result: Verdict::Conflict,
                plan: the_plan,
                requeue: Some(ctx.config.conflict_retry),
            });
        }
    }
    let mut events = the_plan.events.clone();
    if let (Object::Group(vgr), Some(class), true) = (
        &obj,
        req.class.as_ref(),
        the_plan.rejection.is_none() && backend.is_some_and(|b| b != Backend::CephRbd),
    ) {
        // The content lists the group the plan reports (on PowerStore a selected PVC the
        // sidecar has not put in the protection group yet is not replicated, so not listed).
        let listed: Vec<String> = match &the_plan.status {
            Some(SubjectStatus::Group(g)) => g
                .persistent_volume_claims_ref_list
                .iter()
                .map(|r| r.name.clone())
                .collect(),
            _ => req
                .subject
                .group_pvcs
                .iter()
                .map(|r| r.name.clone())
                .collect(),
        };
        let volumes = reader
            .volume_handles(&req.subject.namespace, &listed, &class.provisioner)
            .await?;
        if let Some(want) = content::desired(vgr, &class.provisioner, &volumes) {
            match content::apply(ctx, vgr, subject_rv.as_deref(), &want).await? {
                content::Applied::Done => {}
                content::Applied::Foreign(message) => {
                    events.push(super::translate::Event {
                        type_: EventType::Warning,
                        reason: "VolumeGroupReplicationContentTaken".into(),
                        message,
                    });
                }
                // The group's generation moved (its spec now names the content): the status
                // is computed by the reconcile that change triggers, from a fresh read.
                content::Applied::GroupChanged | content::Applied::Conflict => {
                    return Ok(Outcome {
                        result: Verdict::Conflict,
                        plan: the_plan,
                        requeue: Some(ctx.config.conflict_retry),
                    });
                }
            }
        }
    }
    for w in &the_plan.writes {
        if !execute(ctx, &req.subject, w).await? {
            return Ok(Outcome {
                result: Verdict::Conflict,
                plan: the_plan,
                requeue: Some(ctx.config.conflict_retry),
            });
        }
    }
    // Ceph: csi-addons owns the status.
    let ours = backend != Some(Backend::CephRbd);
    let mut result = classify(&the_plan, &req.subject.status);
    if ours {
        let current = req.subject.status.clone();
        let mut status = match &the_plan.status {
            Some(s) => s.clone(),
            None => match &obj {
                Object::Volume(_) => SubjectStatus::Volume(current.clone()),
                Object::Group(g) => SubjectStatus::Group(g.status.clone().unwrap_or_default()),
            },
        };
        if matches!(result, Verdict::InProgress)
            && let Some(ev) = overlay_timeout(ctx, &mut status, &req.now)
        {
            result = Verdict::NotConverging;
            if !is_true(&current.conditions, cond_types::DEGRADED) {
                events.push(ev);
            }
        }
        let new_json = match &status {
            SubjectStatus::Volume(s) => serde_json::to_value(s),
            SubjectStatus::Group(s) => serde_json::to_value(s),
        }
        .unwrap_or(Value::Null);
        let old_json = obj.status_json();
        if new_json != old_json
            && !write_status(
                ctx,
                kind,
                &req.subject,
                subject_rv.as_deref(),
                &old_json,
                &new_json,
            )
            .await?
        {
            return Ok(Outcome {
                result: Verdict::Conflict,
                plan: the_plan,
                requeue: Some(ctx.config.conflict_retry),
            });
        }
        let state = status
            .replication()
            .state
            .map_or("Unknown", ReplicatedState::as_str);
        ctx.metrics.set_state(kind.kind(), &key, Some(state));
        req.subject.status = status.replication().clone();
    }
    for ev in &events {
        record_event(ctx, &reference, ev).await;
    }
    let requeue = match result {
        Verdict::Converged => {
            ctx.reset(&key);
            ctx.config.resync
        }
        _ => ctx.backoff(&key),
    };
    Ok(Outcome {
        result,
        plan: the_plan,
        requeue: Some(requeue),
    })
}

fn classify(plan: &Plan, before: &VolumeReplicationStatus) -> Verdict {
    if plan.rejection.is_some() {
        return Verdict::Rejected;
    }
    let status = plan
        .status
        .as_ref()
        .map_or(before, SubjectStatus::replication);
    if plan.writes.is_empty() && is_true(&status.conditions, cond_types::COMPLETED) {
        Verdict::Converged
    } else {
        Verdict::InProgress
    }
}

fn is_true(conds: &[Condition], type_: &str) -> bool {
    conds.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// Adds `Degraded=True` when the transition has been in progress longer than the timeout.
fn overlay_timeout(
    ctx: &Context,
    status: &mut SubjectStatus,
    now: &Time,
) -> Option<super::translate::Event> {
    let replication = match status {
        SubjectStatus::Volume(s) => s,
        SubjectStatus::Group(s) => &mut s.replication,
    };
    let completed = replication
        .conditions
        .iter()
        .find(|c| c.type_ == cond_types::COMPLETED && c.status == "False")?
        .clone();
    let since = completed.last_transition_time.0;
    let waited = now.0.as_second().saturating_sub(since.as_second());
    let limit = i64::try_from(ctx.config.converge_timeout.as_secs()).unwrap_or(i64::MAX);
    if waited < limit {
        return None;
    }
    let message = format!(
        "not converged after {waited}s (limit {limit}s): {}; still retrying with backoff. Check the backend objects' status and the storage system",
        completed.message
    );
    let generation = replication.observed_generation;
    let cond = Condition {
        type_: cond_types::DEGRADED.into(),
        status: "True".into(),
        reason: NOT_CONVERGING_REASON.into(),
        message: message.clone(),
        observed_generation: Some(generation),
        last_transition_time: replication
            .conditions
            .iter()
            .find(|c| c.type_ == cond_types::DEGRADED && c.status == "True")
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone()),
    };
    replication
        .conditions
        .retain(|c| c.type_ != cond_types::DEGRADED);
    replication.conditions.push(cond);
    Some(super::translate::Event {
        type_: EventType::Warning,
        reason: "NotConverging".into(),
        message,
    })
}

/// Whether this controller serves the subject.
fn owned(config: &Config, s: &Subject, class: Option<&ClassView>, has_finalizer: bool) -> bool {
    if has_finalizer {
        return true;
    }
    match class {
        Some(c) if config.serves(&c.provisioner) => true,
        Some(c) if Backend::for_provisioner(&c.provisioner).is_some() => false,
        // Missing class or unknown driver: nobody else will say so.
        _ => (s.kind == SubjectKind::Group && s.external) || config.report_unknown,
    }
}

/// Adds our finalizer; the subject's new metadata, None on a conflict.
async fn add_finalizer(
    ctx: &Context,
    obj: &Object,
    kind: SubjectKind,
) -> Result<Option<ObjectMeta>, Error> {
    let meta = obj.meta();
    let mut finalizers = meta.finalizers.clone().unwrap_or_default();
    finalizers.push(FINALIZER.to_string());
    let patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": meta.resource_version}});
    patch_subject(ctx, kind, meta, &patch).await
}

/// Removes our finalizer; false on a conflict.
async fn remove_finalizer(ctx: &Context, obj: &Object, kind: SubjectKind) -> Result<bool, Error> {
    let meta = obj.meta();
    let finalizers: Vec<String> = meta
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let mut patch =
        json!({"metadata": {"finalizers": finalizers, "resourceVersion": meta.resource_version}});
    // The content is gone: the group no longer names it (as csi-addons' content controller).
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(content::VGR_CONTENT_ANNOTATION))
    {
        patch["metadata"]["annotations"] = json!({content::VGR_CONTENT_ANNOTATION: null});
    }
    Ok(patch_subject(ctx, kind, meta, &patch).await?.is_some())
}

/// Merge-patches the subject: its new metadata, None on a conflict (or if it is gone).
async fn patch_subject(
    ctx: &Context,
    kind: SubjectKind,
    meta: &ObjectMeta,
    patch: &Value,
) -> Result<Option<ObjectMeta>, Error> {
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let pp = PatchParams::default();
    let res = match kind {
        SubjectKind::Volume => Api::<VolumeReplication>::namespaced(ctx.client.clone(), &ns)
            .patch(&name, &pp, &Patch::Merge(patch))
            .await
            .map(|o| o.metadata),
        SubjectKind::Group => Api::<VolumeGroupReplication>::namespaced(ctx.client.clone(), &ns)
            .patch(&name, &pp, &Patch::Merge(patch))
            .await
            .map(|o| o.metadata),
    };
    match res {
        Ok(meta) => Ok(Some(meta)),
        Err(e) if is_code(&e, 409) || is_code(&e, 404) => Ok(None),
        Err(e) => Err(Error::api(
            &ctx.cluster,
            "patch",
            kind.kind(),
            ns_name(&ns, &name),
            e,
        )),
    }
}

/// Writes the status subresource, guarded by `resource_version` (the subject as read); false
/// on a conflict.
async fn write_status(
    ctx: &Context,
    kind: SubjectKind,
    s: &Subject,
    resource_version: Option<&str>,
    old: &Value,
    new: &Value,
) -> Result<bool, Error> {
    // A merge patch keeps keys it does not name: null out what the new status drops.
    let mut body = new.clone();
    if let (Some(o), Some(b)) = (old.as_object(), body.as_object_mut()) {
        for k in o.keys() {
            if !b.contains_key(k) {
                b.insert(k.clone(), Value::Null);
            }
        }
    }
    let patch = json!({ "metadata": {"resourceVersion": resource_version}, "status": body });
    let pp = PatchParams::default();
    let res = match kind {
        SubjectKind::Volume => {
            Api::<VolumeReplication>::namespaced(ctx.client.clone(), &s.namespace)
                .patch_status(&s.name, &pp, &Patch::Merge(&patch))
                .await
                .map(|_| ())
        }
        SubjectKind::Group => {
            Api::<VolumeGroupReplication>::namespaced(ctx.client.clone(), &s.namespace)
                .patch_status(&s.name, &pp, &Patch::Merge(&patch))
                .await
                .map(|_| ())
        }
    };
    match res {
        Ok(()) => Ok(true),
        Err(e) if is_code(&e, 404) => Ok(true),
        Err(e) if is_code(&e, 409) => Ok(false),
        Err(e) => Err(Error::api(
            &ctx.cluster,
            "patch status of",
            kind.kind(),
            ns_name(&s.namespace, &s.name),
            e,
        )),
    }
}

/// Puts the csi-addons owner annotation on every member PVC that lacks it, and takes it off
/// PVCs that left a group. False on a conflict.
async fn claim_pvcs(ctx: &Context, req: &Request, members: &[String]) -> Result<bool, Error> {
    let s = &req.subject;
    let (key, _) = owner_annotation(s.kind);
    let me = s.csi_addons_owner();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &s.namespace);
    let finalizer = pvc_finalizer(s.kind);
    for pvc in &req.pvcs {
        let has = pvc.annotations.get(key) == Some(&me);
        let protected = pvc.finalizers.iter().any(|f| f == finalizer);
        let member = members.contains(&pvc.name);
        let value = match (member, has) {
            (true, false) => Value::String(me.clone()),
            (true, true) if !protected => Value::String(me.clone()),
            (false, true) => Value::Null,
            _ => continue,
        };
        if !patch_pvc(ctx, &api, &s.namespace, &pvc.name, s.kind, value).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Takes our csi-addons owner annotation off every PVC that carries it.
async fn release_pvcs(ctx: &Context, reader: Reader<'_>, s: &Subject) -> Result<bool, Error> {
    let (key, _) = owner_annotation(s.kind);
    let me = s.csi_addons_owner();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &s.namespace);
    for name in reader.pvcs_annotated(&s.namespace, key, &me).await? {
        if !patch_pvc(ctx, &api, &s.namespace, &name, s.kind, Value::Null).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Claims (`value` the owner) or releases (`value` null) a PVC as csi-addons does: the owner
/// annotation and the protection finalizer of `kind`.
async fn patch_pvc(
    ctx: &Context,
    api: &Api<PersistentVolumeClaim>,
    ns: &str,
    name: &str,
    kind: SubjectKind,
    value: Value,
) -> Result<bool, Error> {
    let (key, _) = owner_annotation(kind);
    let finalizer = pvc_finalizer(kind);
    // Guarded by the resourceVersion we read, so two objects cannot both claim one PVC.
    let current = match api.get_opt(name).await {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(true),
        Err(e) => {
            return Err(Error::api(
                &ctx.cluster,
                "get",
                "PersistentVolumeClaim",
                ns_name(ns, name),
                e,
            ));
        }
    };
    let mut finalizers = current.metadata.finalizers.clone().unwrap_or_default();
    let before = finalizers.len();
    finalizers.retain(|f| f != finalizer);
    if !value.is_null() {
        finalizers.push(finalizer.to_string());
    }
    let mut patch = json!({"metadata": {
        "annotations": {key: value},
        "resourceVersion": current.metadata.resource_version,
    }});
    if finalizers.len() != before || !value.is_null() {
        patch["metadata"]["finalizers"] = json!(finalizers);
    }
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_code(&e, 409) => Ok(false),
        Err(e) if is_code(&e, 404) => Ok(true),
        Err(e) => Err(Error::api(
            &ctx.cluster,
            "patch",
            "PersistentVolumeClaim",
            ns_name(ns, name),
            e,
        )),
    }
}

/// The finalizer csi-addons puts on a PVC claimed by a subject of `kind`.
fn pvc_finalizer(kind: SubjectKind) -> &'static str {
    match kind {
        SubjectKind::Volume => PVC_VR_FINALIZER,
        SubjectKind::Group => PVC_VGR_FINALIZER,
    }
}

fn owner_annotation(kind: SubjectKind) -> (&'static str, &'static str) {
    match kind {
        SubjectKind::Volume => (PVC_VR_ANNOTATION, PVC_VGR_ANNOTATION),
        SubjectKind::Group => (PVC_VGR_ANNOTATION, PVC_VR_ANNOTATION),
    }
}

/// Performs one backend write; false on a conflict (409: stale read, or the name is taken).
async fn execute(ctx: &Context, s: &Subject, w: &BackendWrite) -> Result<bool, Error> {
    let target = w.target();
    let object = target.to_string();
    let pp = PostParams::default();
    let res = match w {
        BackendWrite::Create(BackendObject::MirrorRelationship(tmr)) => {
            let mut tmr = (**tmr).clone();
            index_label(&mut tmr.metadata, s);
            api_for::<TridentMirrorRelationship>(ctx, &target)
                .create(&pp, &tmr)
                .await
                .map(|_| ())
        }
        BackendWrite::Create(BackendObject::MirrorUpdate(tamu)) => {
            let mut tamu = (**tamu).clone();
            index_label(&mut tamu.metadata, s);
            api_for::<TridentActionMirrorUpdate>(ctx, &target)
                .create(&pp, &tamu)
                .await
                .map(|_| ())
        }
        BackendWrite::Patch { patch, .. } => {
            let pp = PatchParams::default();
            match target.kind.as_str() {
                "TridentMirrorRelationship" => api_for::<TridentMirrorRelationship>(ctx, &target)
                    .patch(&target.name, &pp, &Patch::Merge(patch))
                    .await
                    .map(|_| ()),
                "DellCSIReplicationGroup" => {
                    Api::<DellCSIReplicationGroup>::all(ctx.client.clone())
                        .patch(&target.name, &pp, &Patch::Merge(patch))
                        .await
                        .map(|_| ())
                }
                other => {
                    return Err(Error::InvalidInput {
                        what: "planned write".into(),
                        reason: format!("no executor for a patch of {other}"),
                    });
                }
            }
        }
        BackendWrite::Delete { .. } => {
            let dp = DeleteParams::default();
            let res = match target.kind.as_str() {
                "TridentMirrorRelationship" => api_for::<TridentMirrorRelationship>(ctx, &target)
                    .delete(&target.name, &dp)
                    .await
                    .map(|_| ()),
                "TridentActionMirrorUpdate" => api_for::<TridentActionMirrorUpdate>(ctx, &target)
                    .delete(&target.name, &dp)
                    .await
                    .map(|_| ()),
                other => {
                    return Err(Error::InvalidInput {
                        what: "planned write".into(),
                        reason: format!("no executor for a delete of {other}"),
                    });
                }
            };
            match res {
                Err(e) if is_code(&e, 404) => Ok(()),
                other => other,
            }
        }
    };
    match res {
        Ok(()) => {
            tracing::info!(target = %object, "backend write done");
            Ok(true)
        }
        Err(e) if is_code(&e, 409) => {
            tracing::debug!(target = %object, "conflict; retrying from a fresh read");
            Ok(false)
        }
        Err(e) => Err(Error::api(
            &ctx.cluster,
            match w {
                BackendWrite::Create(_) => "create",
                BackendWrite::Patch { .. } => "patch",
                BackendWrite::Delete { .. } => "delete",
            },
            match target.kind.as_str() {
                "TridentMirrorRelationship" => "TridentMirrorRelationship",
                "TridentActionMirrorUpdate" => "TridentActionMirrorUpdate",
                _ => "DellCSIReplicationGroup",
            },
            object,
            e,
        )),
    }
}

fn index_label(meta: &mut ObjectMeta, s: &Subject) {
    if let Some(uid) = &s.uid {
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(OWNER_UID_LABEL.to_string(), uid.clone());
    }
}

fn api_for<K>(ctx: &Context, target: &ObjectKey) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::namespaced(
        ctx.client.clone(),
        target.namespace.as_deref().unwrap_or("default"),
    )
}

async fn finish_deletion(
    ctx: &Context,
    reader: Reader<'_>,
    req: &Request,
    obj: &Object,
    the_plan: Plan,
    reference: &ObjectReference,
    key: &str,
) -> Result<Outcome, Error> {
    for w in &the_plan.writes {
        if !execute(ctx, &req.subject, w).await? {
            return Ok(Outcome {
                result: Verdict::Conflict,
                plan: the_plan,
                requeue: Some(ctx.config.conflict_retry),
            });
        }
    }
    for ev in &the_plan.events {
        record_event(ctx, reference, ev).await;
    }
    if !the_plan.deletion_complete {
        let delay = ctx.backoff(key);
        return Ok(Outcome {
            result: Verdict::Deleting,
            plan: the_plan,
            requeue: Some(delay),
        });
    }
    let content_released = match obj {
        Object::Group(vgr) => content::release(ctx, vgr).await?,
        Object::Volume(_) => true,
    };
    if !content_released
        || !release_pvcs(ctx, reader, &req.subject).await?
        || !remove_finalizer(ctx, obj, req.subject.kind).await?
    {
        return Ok(Outcome {
            result: Verdict::Conflict,
            plan: the_plan,
            requeue: Some(ctx.config.conflict_retry),
        });
    }
    ctx.metrics.set_state(req.subject.kind.kind(), key, None);
    ctx.reset(key);
    Ok(Outcome {
        result: Verdict::Released,
        plan: the_plan,
        requeue: None,
    })
}

/// Records a core/v1 Event on the subject (failures are logged: events are best effort).
async fn record_event(ctx: &Context, reference: &ObjectReference, ev: &super::translate::Event) {
    let ns = reference.namespace.clone().unwrap_or_default();
    let now = ctx.clock.now();
    let event = KubeEvent {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", reference.name.clone().unwrap_or_default())),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        involved_object: reference.clone(),
        reason: Some(ev.reason.clone()),
        message: Some(ev.message.clone()),
        type_: Some(
            match ev.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: None,
        }),
        reporting_component: Some(COMPONENT.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..KubeEvent::default()
    };
    let api: Api<KubeEvent> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        tracing::warn!(error = %e, reason = %ev.reason, "cannot record event");
    }
}

// ---------------------------------------------------------------------------
// kube-runtime wiring
// ---------------------------------------------------------------------------

/// Why a reconcile failed, for kube-runtime (the library [`Error`] boxed).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ReconcileError(#[from] Box<Error>);

/// What the running controllers share: the context and the caches they read from.
struct Running {
    ctx: Arc<Context>,
    caches: Caches,
}

async fn reconcile_vr(
    obj: Arc<VolumeReplication>,
    run: Arc<Running>,
) -> Result<Action, ReconcileError> {
    reconcile_arc(run, SubjectKind::Volume, obj.namespace(), obj.name_any()).await
}

async fn reconcile_vgr(
    obj: Arc<VolumeGroupReplication>,
    run: Arc<Running>,
) -> Result<Action, ReconcileError> {
    reconcile_arc(run, SubjectKind::Group, obj.namespace(), obj.name_any()).await
}

async fn reconcile_arc(
    run: Arc<Running>,
    kind: SubjectKind,
    ns: Option<String>,
    name: String,
) -> Result<Action, ReconcileError> {
    let ctx = &run.ctx;
    let started = Instant::now();
    let ns = ns.unwrap_or_default();
    ctx.in_flight.fetch_add(1, Ordering::SeqCst);
    let res = reconcile_with(ctx, Reader::Cache(ctx, &run.caches), kind, &ns, &name).await;
    ctx.in_flight.fetch_sub(1, Ordering::SeqCst);
    match res {
        Ok(outcome) => {
            ctx.metrics
                .reconciled(kind.kind(), outcome.result.label(), started.elapsed());
            Ok(match outcome.requeue {
                Some(d) => Action::requeue(d),
                None => Action::await_change(),
            })
        }
        Err(e) => {
            ctx.metrics
                .reconciled(kind.kind(), "error", started.elapsed());
            ctx.metrics
                .error(kind.kind(), &format!("{:?}", e.kind()).to_lowercase());
            tracing::warn!(kind = kind.kind(), namespace = %ns, name = %name, error = %e, "reconcile failed");
            Err(ReconcileError(Box::new(e)))
        }
    }
}

fn error_policy<K>(_obj: Arc<K>, _err: &ReconcileError, run: Arc<Running>) -> Action {
    // The per-object backoff is kept by the reconcile; errors use the base delay doubled.
    Action::requeue(run.ctx.config.retry_base.saturating_mul(2))
}

/// Owner (`Kind/ns/name`) of a backend object we made, from its annotation.
fn owner_of(meta: &ObjectMeta) -> Option<(String, String, String)> {
    let raw = meta.annotations.as_ref()?.get(OWNER_ANNOTATION)?;
    let mut parts = raw.splitn(3, '/');
    Some((
        parts.next()?.to_string(),
        parts.next()?.to_string(),
        parts.next()?.to_string(),
    ))
}

fn dell_owner(rg: &DellCSIReplicationGroup) -> Option<(String, String, String)> {
    let raw = rg
        .metadata
        .annotations
        .as_ref()?
        .get(dell::LEDGER_ANNOTATION)?;
    let v: Value = serde_json::from_str(raw).ok()?;
    let owner = v.get("owner")?.as_str()?;
    let mut parts = owner.splitn(3, '/');
    Some((
        parts.next()?.to_string(),
        parts.next()?.to_string(),
        parts.next()?.to_string(),
    ))
}

fn refs_for<K: Resource<DynamicType = ()>>(
    kind: SubjectKind,
    owner: Option<(String, String, String)>,
) -> Option<ObjectRef<K>> {
    let (k, ns, name) = owner?;
    (k == kind.kind()).then(|| ObjectRef::new(&name).within(&ns))
}

/// What of a csi-addons object triggers a reconcile: its generation (spec changes), the start
/// of its deletion and its finalizers. Status writes (ours, mostly) and annotation changes do
/// not; each reconcile schedules its own next look.
fn spec_or_lifecycle<K: Resource>(obj: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = obj.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    meta.finalizers.hash(&mut h);
    Some(h.finish())
}

/// A cluster-wide kind the controller watches.
trait Watched:
    Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// PVC (namespace, name) -> the VolumeReplications naming it as data source (immutable), so a
/// PVC event finds its VRs without looking at every VR. Entries of deleted VRs are dropped
/// when looked up.
type PvcIndex = Arc<Mutex<HashMap<(String, String), std::collections::BTreeSet<String>>>>;

/// The trigger stream of a csi-addons kind: a reflector into `writer`, passing objects to
/// `seen` (before filtering) and on only when [`spec_or_lifecycle`] changes.
fn subject_stream<K>(
    api: Api<K>,
    writer: kube::runtime::reflector::store::Writer<K>,
    seen: impl Fn(&K) + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Watched,
{
    use kube::runtime::WatchStreamExt;
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .map(move |r| {
            if let Ok(o) = &r {
                seen(o);
            }
            r
        })
        .predicate_filter(spec_or_lifecycle, Default::default())
}

/// Adds the watches of the backend objects we make (by our label) and of Dell's RGs, mapped
/// back to the subjects of `kind` that own them.
fn backend_watches<K>(
    mut ctl: Controller<K>,
    client: &kube::Client,
    kind: SubjectKind,
    trident: bool,
    dell: bool,
) -> Controller<K>
where
    K: Watched,
{
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    // Backend kinds are watched only for the backends served: their CRDs may be absent.
    if trident {
        ctl = ctl
            .watches(
                Api::<TridentMirrorRelationship>::all(client.clone()),
                ours.clone(),
                move |o| refs_for(kind, owner_of(&o.metadata)),
            )
            .watches(
                Api::<TridentActionMirrorUpdate>::all(client.clone()),
                ours,
                move |o| refs_for(kind, owner_of(&o.metadata)),
            );
    }
    if dell {
        ctl = ctl.watches(
            Api::<DellCSIReplicationGroup>::all(client.clone()),
            watcher::Config::default(),
            move |o| refs_for(kind, dell_owner(&o)),
        );
    }
    ctl
}

/// Runs both controllers (VolumeReplication and VolumeGroupReplication) until `shutdown`
/// resolves.
///
/// # Guarantees
/// Backend objects, PVCs and classes trigger the subjects they concern through watches
/// (backend objects by our label, mapped back through the owner annotation; a PVC to the VRs
/// naming it, through an index, and to the groups whose selector matches it or that claim
/// it); a subject's own status writes do not trigger it. Every subject is also re-read on its
/// own schedule, so a missed event delays but never loses work.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send) {
    let client = ctx.client.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mk_stop = |rx: tokio::sync::watch::Receiver<bool>| async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    };

    let serves_trident = ctx.config.serves(super::translate::trident::DRIVER);
    let serves_dell = ctx.config.serves(dell::DRIVER);

    let index: PvcIndex = Arc::default();
    let (vr_store, vr_writer) = kube::runtime::reflector::store();
    let vr_stream = subject_stream(Api::<VolumeReplication>::all(client.clone()), vr_writer, {
        let index = index.clone();
        move |vr: &VolumeReplication| {
            if vr.spec.data_source.kind == "PersistentVolumeClaim"
                && vr
                    .spec
                    .data_source
                    .api_group
                    .as_deref()
                    .unwrap_or("")
                    .is_empty()
            {
                index
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry((
                        vr.namespace().unwrap_or_default(),
                        vr.spec.data_source.name.clone(),
                    ))
                    .or_default()
                    .insert(vr.name_any());
            }
        }
    });
    let vr_ctl = backend_watches(
        Controller::for_stream(vr_stream, vr_store.clone()),
        &client,
        SubjectKind::Volume,
        serves_trident,
        serves_dell,
    )
    .watches(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
        move |pvc| {
            let ns = pvc.namespace().unwrap_or_default();
            let key = (ns.clone(), pvc.name_any());
            let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
            let Some(names) = index.get_mut(&key) else {
                return Vec::new();
            };
            names.retain(|n| {
                vr_store
                    .get(&ObjectRef::<VolumeReplication>::new(n).within(&ns))
                    .is_some()
            });
            let refs: Vec<ObjectRef<VolumeReplication>> = names
                .iter()
                .map(|n| ObjectRef::new(n).within(&ns))
                .collect();
            if names.is_empty() {
                index.remove(&key);
            }
            refs
        },
    )
    .graceful_shutdown_on(mk_stop(stop_rx.clone()));

    let (vgr_store, vgr_writer) = kube::runtime::reflector::store();
    let vgr_stream = subject_stream(
        Api::<VolumeGroupReplication>::all(client.clone()),
        vgr_writer,
        |_: &VolumeGroupReplication| {},
    );
    let vgr_ctl = backend_watches(
        Controller::for_stream(vgr_stream, vgr_store.clone()),
        &client,
        SubjectKind::Group,
        serves_trident,
        serves_dell,
    )
    .watches(
        Api::<VolumeGroupReplicationContent>::all(client.clone()),
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        |c| {
            // Our contents name their group in the csi-addons annotation.
            let raw = c
                .metadata
                .annotations
                .as_ref()?
                .get(content::VGR_REF_ANNOTATION)?;
            let (ns, name) = raw.split_once('/')?;
            Some(ObjectRef::<VolumeGroupReplication>::new(name).within(ns))
        },
    )
    .watches(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
        move |pvc| {
            // Groups it may join (selector matches) or leave (it carries their claim).
            let ns = pvc.namespace();
            let labels = pvc.labels();
            let claim = pvc.annotations().get(PVC_VGR_ANNOTATION);
            vgr_store
                .state()
                .into_iter()
                .filter(|g| {
                    g.namespace() == ns
                        && (super::translate::selector_matches(&g.spec.source.selector, labels)
                            .unwrap_or(true)
                            || claim.is_some_and(|c| {
                                *c == format!(
                                    "{}/{}",
                                    g.name_any(),
                                    g.namespace().unwrap_or_default()
                                )
                            }))
                })
                .map(|g| ObjectRef::from_obj(&*g))
                .collect::<Vec<_>>()
        },
    )
    .graceful_shutdown_on(mk_stop(stop_rx));

    // Reconciles read from caches, complete before the first one runs.
    let caches = Caches::start(&client, serves_trident);
    tokio::pin!(shutdown);
    let (caches, tasks) = tokio::select! {
        c = caches => c,
        _ = &mut shutdown => return,
    };
    let _stop_caches = AbortOnDrop(tasks);
    let running = Arc::new(Running {
        ctx: ctx.clone(),
        caches,
    });
    let vr = vr_ctl
        .run(reconcile_vr, error_policy, running.clone())
        .for_each(|_| async {});
    let vgr = vgr_ctl
        .run(reconcile_vgr, error_policy, running)
        .for_each(|_| async {});
    let both = futures::future::join(vr, vgr);
    tokio::pin!(both);
    tokio::select! {
        _ = &mut both => {}
        _ = shutdown => {
            let _ = stop_tx.send(true);
            // kube-runtime's graceful shutdown would also wait for every scheduled requeue;
            // wait only for the reconciles running now (each is safe to cut: state is in
            // the cluster), at most SHUTDOWN_GRACE.
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while ctx.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                tokio::select! {
                    _ = &mut both => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    }
}

/// Stops the cache reflectors when `run` returns.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Checks that the API serves every kind the controller needs for `config`.
///
/// # Errors
/// [`Error::Preflight`] naming the missing CustomResourceDefinition and how to install it;
/// API errors otherwise.
pub async fn preflight(client: &kube::Client, cluster: &str, config: &Config) -> Result<(), Error> {
    let lp = ListParams::default().limit(1);
    let mut missing = Vec::new();
    macro_rules! probe {
        ($t:ty, $crd:expr, $fix:expr) => {
            match Api::<$t>::all(client.clone()).list(&lp).await {
                Ok(_) => {}
                Err(e) if is_code(&e, 404) => missing.push(($crd, $fix)),
                Err(e) => return Err(Error::api(cluster, "list", stringify!($t), "", e)),
            }
        };
    }
    let csi_addons =
        "install them: `cbt-replicator crds | kubectl apply -f -` (or install csi-addons)";
    probe!(
        VolumeReplication,
        "volumereplications.replication.storage.openshift.io",
        csi_addons
    );
    probe!(
        VolumeReplicationClass,
        "volumereplicationclasses.replication.storage.openshift.io",
        csi_addons
    );
    probe!(
        VolumeGroupReplication,
        "volumegroupreplications.replication.storage.openshift.io",
        csi_addons
    );
    probe!(
        VolumeGroupReplicationClass,
        "volumegroupreplicationclasses.replication.storage.openshift.io",
        csi_addons
    );
    probe!(
        VolumeGroupReplicationContent,
        "volumegroupreplicationcontents.replication.storage.openshift.io",
        csi_addons
    );
    if config.serves(super::translate::trident::DRIVER) {
        let fix =
            "install Trident 22.10 or later (or drop csi.trident.netapp.io from --provisioners)";
        probe!(
            TridentMirrorRelationship,
            "tridentmirrorrelationships.trident.netapp.io",
            fix
        );
        probe!(
            TridentActionMirrorUpdate,
            "tridentactionmirrorupdates.trident.netapp.io",
            fix
        );
    }
    if config.serves(dell::DRIVER) {
        probe!(
            DellCSIReplicationGroup,
            "dellcsireplicationgroups.replication.storage.dell.com",
            "install Dell CSM replication (or drop csi-powerstore.dellemc.com from --provisioners)"
        );
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Preflight {
        cluster: cluster.to_string(),
        problem: format!(
            "CustomResourceDefinition(s) not served: {}",
            missing
                .iter()
                .map(|(c, _)| *c)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        fix: {
            let mut fixes: Vec<&str> = missing.iter().map(|(_, f)| *f).collect();
            fixes.dedup();
            fixes.join("; ")
        },
    })
}

/// How long a shutdown waits for running reconciles.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
