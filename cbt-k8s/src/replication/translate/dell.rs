//! Dell PowerStore: csi-addons replication through DellCSIReplicationGroups.
//!
//! Owns: mapping a csi-addons desired state onto the one-shot `spec.action`
//! verbs of the protection group's RG, making sure a verb is requested at most
//! once per transition, and mapping the RG's link state and action results to
//! csi-addons terms.
//!
//! The group is native: the Dell sidecar makes one RG per protection group
//! (PowerStore: a volume group) and labels its PVCs with
//! `replication.storage.dell.com/replicationGroupName`. We never create or
//! delete RGs; we only set `spec.action`, which the sidecar executes and clears.
//! Because Dell fails over whole protection groups, the subject must select
//! exactly the PVCs of one RG (a VolumeReplication only when the group has a
//! single PVC). A selected PVC not labelled yet is pending, not refused: the
//! group reports its labelled members and names it until the sidecar labels it.
//!
//! Verbs (this side's view; PowerStore advertises `FAILOVER_REMOTE`,
//! `UNPLANNED_FAILOVER_LOCAL`, `REPROTECT_LOCAL`, `SUSPEND`, `RESUME`, `SYNC`):
//! primary on a non-source site: `UNPLANNED_FAILOVER_LOCAL`; primary on a
//! failed-over source: `REPROTECT_LOCAL` (csi-addons' primary "enables
//! mirroring", and PowerStore reprotects only from the new source);
//! secondary on a source with a synchronised link: `FAILOVER_REMOTE` (planned
//! failover hands the source role to the peer), preceded by `REPROTECT_LOCAL`
//! when the source is failed over (not replicating); a suspended link: `RESUME`
//! (on a secondary only with `autoResync` or `resync`; never when a person
//! suspended it); resync on a secondary: `SYNC`. We never send `SUSPEND`.
//!
//! Never twice: the verb goes out in one merge patch together with our ledger
//! annotation (`replication.cbt.io/dell-actions`: owner, class, transition =
//! `<desired>@<generation>`, verbs sent), guarded by `resourceVersion`. A verb
//! in the ledger is not sent again for that transition, whatever happens; a
//! pending `spec.action`, an `*_IN_PROGRESS` state, an unknown result of our
//! last verb, or a link state polled before the last action finished all mean
//! "wait". To retry a verb that failed, remove the ledger annotation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::conditions::Report;
use super::{
    Backend, BackendWrite, ClassView, DellObserved, Event, EventType, ObjectKey, Plan, Rejection,
    Request, SubjectKind, annotations, finish, members, pvc, reject,
};
use crate::replication::types::{DellCSIReplicationGroup, ReplicationState};

/// Dell PowerStore's CSI driver name.
pub const DRIVER: &str = "csi-powerstore.dellemc.com";
/// PVC label the Dell sidecar sets to the PVC's RG.
pub const RG_LABEL: &str = "replication.storage.dell.com/replicationGroupName";
/// RG annotation where we record the verbs we sent (JSON [`Ledger`]).
pub const LEDGER_ANNOTATION: &str = "replication.cbt.io/dell-actions";
/// Protection group attribute naming the remote system.
pub const REMOTE_SYSTEM_ATTRIBUTE: &str = "remoteSystemName";

/// Class parameters read for PowerStore (the StorageClass keys, repeated on the replication class).
pub mod params {
    /// Remote PowerStore system (required).
    pub const REMOTE_SYSTEM: &str = "remoteSystem";
    /// `ASYNC` (default) or `SYNC`; `METRO` has no failover verbs.
    pub const MODE: &str = "mode";
    /// Recovery point objective (required for ASYNC).
    pub const RPO: &str = "rpo";
    /// RPO values PowerStore accepts for ASYNC.
    pub const RPO_VALUES: [&str; 7] = [
        "Five_Minutes",
        "Fifteen_Minutes",
        "Thirty_Minutes",
        "One_Hour",
        "Six_Hours",
        "Twelve_Hours",
        "One_Day",
    ];
}

/// The verbs PowerStore supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DellAction {
    /// Planned failover to the peer, run on the source.
    FailoverRemote,
    /// Unplanned failover to this site, run on the target.
    UnplannedFailoverLocal,
    /// Restart replication from this site (the new source) to the peer.
    ReprotectLocal,
    /// Pause replication (never sent by us).
    Suspend,
    /// Resume paused replication.
    Resume,
    /// Synchronise now.
    Sync,
}

impl DellAction {
    /// Every verb.
    pub const ALL: [DellAction; 6] = [
        Self::FailoverRemote,
        Self::UnplannedFailoverLocal,
        Self::ReprotectLocal,
        Self::Suspend,
        Self::Resume,
        Self::Sync,
    ];

    /// The `spec.action` text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailoverRemote => "FAILOVER_REMOTE",
            Self::UnplannedFailoverLocal => "UNPLANNED_FAILOVER_LOCAL",
            Self::ReprotectLocal => "REPROTECT_LOCAL",
            Self::Suspend => "SUSPEND",
            Self::Resume => "RESUME",
            Self::Sync => "SYNC",
        }
    }

    /// Reads a verb (case-insensitive, as the sidecar does).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s.trim()))
    }
}

/// `status.replicationLinkState.state` of an RG.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// Replicating, in sync.
    Synchronized,
    /// A transfer runs.
    SyncInProgress,
    /// Paused.
    Suspended,
    /// Failed over; not replicating until reprotected.
    FailedOver,
    /// The session is in error.
    Invalid,
    /// The driver could not tell.
    Unknown,
    /// No session.
    Empty,
    /// Not polled yet (`""`) or unrecognised text.
    Other(String),
}

impl LinkState {
    /// Every named value, plus the empty string.
    pub const NAMED: [LinkState; 7] = [
        Self::Synchronized,
        Self::SyncInProgress,
        Self::Suspended,
        Self::FailedOver,
        Self::Invalid,
        Self::Unknown,
        Self::Empty,
    ];

    /// Reads the text the sidecar writes.
    pub fn parse(s: &str) -> Self {
        match s {
            "SYNCHRONIZED" => Self::Synchronized,
            "SYNC_IN_PROGRESS" => Self::SyncInProgress,
            "SUSPENDED" => Self::Suspended,
            "FAILEDOVER" => Self::FailedOver,
            "INVALID" => Self::Invalid,
            "UNKNOWN" => Self::Unknown,
            "EMPTY" => Self::Empty,
            other => Self::Other(other.to_string()),
        }
    }

    /// The sidecar's text.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Synchronized => "SYNCHRONIZED",
            Self::SyncInProgress => "SYNC_IN_PROGRESS",
            Self::Suspended => "SUSPENDED",
            Self::FailedOver => "FAILEDOVER",
            Self::Invalid => "INVALID",
            Self::Unknown => "UNKNOWN",
            Self::Empty => "EMPTY",
            Self::Other(s) => s,
        }
    }
}

/// `status.state` of an RG.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RgState {
    /// `Ready` or `""` (accepts actions).
    Ready,
    /// `<ACTION>_IN_PROGRESS`.
    InProgress(String),
    /// The last action failed finally (still accepts actions).
    Error,
    /// No protection group id.
    Invalid,
    /// Being deleted.
    Deleting,
    /// Unrecognised text.
    Other(String),
}

impl RgState {
    /// Reads the text the sidecar writes.
    pub fn parse(s: &str) -> Self {
        match s {
            "" | "Ready" => Self::Ready,
            "Error" => Self::Error,
            "Invalid" => Self::Invalid,
            "Deleting" => Self::Deleting,
            other => match other.strip_suffix("_IN_PROGRESS") {
                Some(action) => Self::InProgress(action.to_string()),
                None => Self::Other(other.to_string()),
            },
        }
    }
}

/// What became of a verb, as the RG tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerbResult {
    /// No result recorded for it.
    Unknown,
    /// It succeeded (when, if recorded).
    Succeeded(Option<Time>),
    /// It failed finally (the error).
    Failed(String),
}

/// Our record on the RG of the verbs we sent (value of [`LEDGER_ANNOTATION`]).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    /// `Kind/namespace/name` of the subject driving the RG.
    pub owner: String,
    /// Class it was bound to.
    pub class: String,
    /// `<desired>@<generation>` the verbs belong to.
    pub transition: String,
    /// Verbs sent for that transition, in order.
    pub sent: Vec<String>,
}

/// One RG, reduced to what decisions and the tables read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgView {
    /// `status.state`.
    pub state: RgState,
    /// `status.replicationLinkState.isSource`.
    pub is_source: bool,
    /// `status.replicationLinkState.state`.
    pub link: LinkState,
    /// `status.replicationLinkState.errorMessage`.
    pub link_error: String,
    /// `spec.action` when non-empty (not yet picked up by the sidecar).
    pub pending: Option<String>,
    /// The last action recorded by the sidecar was a `SUSPEND` (we never send one: a person did).
    pub hand_suspended: bool,
    /// False when the link state was polled before the last action finished.
    pub link_fresh: bool,
    /// The last action recorded and its result.
    pub last_result: Option<(String, VerbResult)>,
}

impl RgView {
    /// Reads an RG.
    pub fn of(rg: &DellCSIReplicationGroup) -> Self {
        let status = rg.status.clone().unwrap_or_default();
        let link = &status.replication_link_state;
        let sidecar = rg.sidecar_action();
        let last_result = match &sidecar {
            Some(a) if a.completed => Some((
                a.name.to_ascii_uppercase(),
                if a.final_error.is_empty() {
                    VerbResult::Succeeded(status.last_action.time.clone())
                } else {
                    VerbResult::Failed(a.final_error.clone())
                },
            )),
            _ => parse_condition(&status.last_action.condition).map(|(verb, ok)| {
                (
                    verb,
                    if ok {
                        VerbResult::Succeeded(status.last_action.time.clone())
                    } else {
                        VerbResult::Failed(status.last_action.error_message.clone())
                    },
                )
            }),
        };
        let link_fresh = match (&link.last_successful_update, &status.last_action.time) {
            (Some(polled), Some(acted)) => polled >= acted,
            (None, Some(_)) => false,
            _ => true,
        };
        Self {
            state: RgState::parse(&status.state),
            is_source: link.is_source,
            link: LinkState::parse(&link.state),
            link_error: link.error_message.clone(),
            pending: Some(rg.spec.action.trim().to_string()).filter(|a| !a.is_empty()),
            hand_suspended: last_result
                .as_ref()
                .is_some_and(|(verb, _)| verb == DellAction::Suspend.as_str()),
            link_fresh,
            last_result,
        }
    }

    /// The recorded result of `verb`.
    pub fn result_of(&self, verb: DellAction) -> VerbResult {
        match &self.last_result {
            Some((v, r)) if v == verb.as_str() => r.clone(),
            _ => VerbResult::Unknown,
        }
    }
}

/// `Action X succeeded` / `Action X failed with error ...` -> (X, succeeded).
fn parse_condition(text: &str) -> Option<(String, bool)> {
    let rest = text.strip_prefix("Action ")?;
    let (verb, tail) = rest.split_once(' ')?;
    let ok = tail.starts_with("succeeded");
    (ok || tail.starts_with("failed")).then(|| (verb.to_ascii_uppercase(), ok))
}

/// What the desired state needs from an RG, before the never-twice rule.
#[derive(Clone, Debug, PartialEq)]
pub enum Need {
    /// This verb.
    Verb(DellAction),
    /// No verb: this is where things stand.
    Done(Report),
    /// The desired state cannot be reached from here.
    Conflict(String),
}

/// The verb (or report) for a desired state on an RG, from its source role and link state.
pub fn need(desired: ReplicationState, auto_resync: bool, view: &RgView) -> Need {
    use LinkState as L;
    use ReplicationState::{Primary, Resync, Secondary};
    let link = view.link.as_str();
    let impaired = || {
        if view.link_error.is_empty() {
            format!("link state is {link:?}")
        } else {
            format!("link state is {link:?}: {}", view.link_error)
        }
    };
    let by_hand = "replication was suspended by a person (spec.action SUSPEND); set spec.action RESUME on the RG to resume it";
    match (desired, view.is_source, &view.link) {
        (Primary, false, _) => Need::Verb(DellAction::UnplannedFailoverLocal),
        (Primary, true, L::FailedOver) => Need::Verb(DellAction::ReprotectLocal),
        (Primary, true, L::Suspended) if view.hand_suspended => {
            Need::Done(Report::primary_degraded(by_hand))
        }
        (Primary, true, L::Suspended) => Need::Verb(DellAction::Resume),
        (Primary, true, L::Synchronized | L::SyncInProgress) => Need::Done(Report::primary(
            Some(true),
            &format!("link state is {link:?}"),
        )),
        (Primary, true, _) => Need::Done(Report::primary_degraded(&impaired())),
        (Resync, true, _) => Need::Conflict(
            "resync takes this site's data from the peer, but this site is the replication source; set replicationState: secondary first (a planned failover hands the source role to the peer)"
                .into(),
        ),
        (Secondary, true, L::Synchronized) => Need::Verb(DellAction::FailoverRemote),
        (Secondary, true, L::Suspended) if view.hand_suspended => Need::Done(Report::failed(
            Secondary,
            &format!("a planned failover needs replication running; {by_hand}"),
        )),
        (Secondary, true, L::Suspended) => Need::Verb(DellAction::Resume),
        (Secondary, true, L::SyncInProgress) => Need::Done(Report::in_progress(
            Secondary,
            "waiting for the running sync to finish before the planned failover",
        )),
        // Failed over to this site: replication must run from here before the
        // source role can be handed back with a planned failover.
        (Secondary, true, L::FailedOver) => Need::Verb(DellAction::ReprotectLocal),
        (Secondary, true, _) => Need::Done(Report::failed(
            Secondary,
            &format!(
                "a planned failover needs a healthy link, but the {}; repair it, or promote the peer (unplanned failover)",
                impaired()
            ),
        )),
        (_, false, L::Synchronized) if desired == Resync => Need::Verb(DellAction::Sync),
        (_, false, L::Synchronized) => Need::Done(Report::secondary(&format!("link state is {link:?}"))),
        (_, false, L::SyncInProgress) => {
            Need::Done(Report::secondary_resyncing("a sync is in progress"))
        }
        (_, false, L::FailedOver) => Need::Done(Report::secondary_resyncing(
            "failed over to the peer; waiting for it to reprotect (REPROTECT_LOCAL on the primary site)",
        )),
        (_, false, L::Suspended) if view.hand_suspended => {
            Need::Done(Report::secondary_degraded(by_hand))
        }
        (_, false, L::Suspended) if auto_resync || desired == Resync => {
            Need::Verb(DellAction::Resume)
        }
        (_, false, L::Suspended) => Need::Done(Report::secondary_degraded(
            "replication is suspended; set autoResync: true or replicationState: resync to resume it",
        )),
        (_, false, _) => Need::Done(Report::secondary_degraded(&impaired())),
    }
}

/// The outcome for one RG.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Send this verb now.
    Request(DellAction),
    /// Send nothing; report this.
    Report(Report),
    /// Bad input or a hand-made change: report it, send nothing.
    Reject(Rejection),
}

/// Decides for one RG, given the verbs already sent for this transition.
pub fn decide(
    desired: ReplicationState,
    auto_resync: bool,
    view: &RgView,
    sent: &[String],
    ever_sent: &[String],
    rg_name: &str,
) -> Decision {
    let retry = format!(
        "remove annotation {LEDGER_ANNOTATION} from RG {rg_name} to let cbt-replicator retry"
    );
    if let Some(p) = &view.pending {
        let p = p.to_ascii_uppercase();
        if ever_sent.contains(&p) {
            return Decision::Report(Report::in_progress(
                desired,
                &format!("{p} requested; waiting for the Dell sidecar to run it"),
            ));
        }
        return Decision::Reject(Rejection::ChangedByHand {
            object: format!("DellCSIReplicationGroup {rg_name}"),
            detail: format!(
                "spec.action is {p:?}, which cbt-replicator did not request; let it finish or clear it"
            ),
        });
    }
    match &view.state {
        RgState::Invalid => {
            return Decision::Report(Report::invalid(
                desired,
                &format!("Dell reports RG {rg_name} Invalid (no protection group id)"),
            ));
        }
        RgState::Deleting => {
            return Decision::Report(Report::in_progress(
                desired,
                &format!("RG {rg_name} is being deleted"),
            ));
        }
        RgState::InProgress(action) => {
            return Decision::Report(Report::in_progress(
                desired,
                &format!("{action} is running"),
            ));
        }
        RgState::Ready | RgState::Error | RgState::Other(_) => {}
    }
    // Our last verb has no recorded result yet: its outcome decides what comes next.
    if let Some(last) = sent.last()
        && let Some(verb) = DellAction::parse(last)
        && view.result_of(verb) == VerbResult::Unknown
    {
        return Decision::Report(Report::in_progress(
            desired,
            &format!(
                "{last} requested, no result recorded yet (if the Dell sidecar refused it, see the RG's events, then {retry})"
            ),
        ));
    }
    if !view.link_fresh {
        return Decision::Report(Report::in_progress(
            desired,
            "waiting for the Dell sidecar to poll the link state after the last action",
        ));
    }
    match need(desired, auto_resync, view) {
        Need::Conflict(detail) => Decision::Reject(Rejection::ConflictingState { detail }),
        Need::Done(report) => Decision::Report(report),
        Need::Verb(verb) if sent.iter().any(|s| s == verb.as_str()) => match view.result_of(verb) {
            VerbResult::Failed(err) => Decision::Report(Report::failed(
                desired,
                &format!("{} failed: {err}; {retry}", verb.as_str()),
            )),
            VerbResult::Succeeded(at) if verb == DellAction::Sync => {
                Decision::Report(Report::secondary("resync (SYNC) done").with_last_sync(at))
            }
            VerbResult::Succeeded(_) => Decision::Report(Report::in_progress(
                desired,
                &format!(
                    "{} succeeded but the link state does not show it; {retry} if it stays so",
                    verb.as_str()
                ),
            )),
            VerbResult::Unknown => Decision::Report(Report::in_progress(
                desired,
                &format!("{} requested", verb.as_str()),
            )),
        },
        Need::Verb(verb) => Decision::Request(verb),
    }
}

/// Plans a subject whose class is served by Dell PowerStore.
///
/// # Guarantees
/// See [`super::Plan`]; in particular a verb is never requested twice for one
/// transition, even across controller restarts, since the ledger travels in
/// the same patch as the verb.
pub fn plan(req: &Request, class: &ClassView, obs: &DellObserved) -> Plan {
    let backend = Some(Backend::DellPowerStore);
    let s = &req.subject;
    if let Some(rejected) = super::reject_unless_external_group(req, class, Backend::DellPowerStore)
    {
        return rejected;
    }
    if s.deleting {
        // The RG belongs to Dell: replication goes on; nothing of ours to remove.
        return Plan {
            backend,
            events: vec![Event {
                type_: EventType::Normal,
                reason: "ReplicationLeftRunning".into(),
                message: "the DellCSIReplicationGroup belongs to the Dell replication controller; its replication continues".into(),
            }],
            deletion_complete: true,
            ..Plan::default()
        };
    }
    let names = match members(req, Backend::DellPowerStore) {
        Ok(m) => m,
        Err(r) => return reject(req, backend, r),
    };
    if let Err(r) = check_params(class) {
        return reject(req, backend, r);
    }
    let gm = match protection_group(req, &names) {
        Ok(g) => g,
        Err(r) => return reject(req, backend, r),
    };
    let rg_name = gm.group.clone();
    let Some(rg) = obs
        .groups
        .iter()
        .find(|g| g.metadata.name.as_deref() == Some(rg_name.as_str()))
    else {
        let report = Report::in_progress(
            s.desired,
            &format!("waiting for the Dell sidecar to create DellCSIReplicationGroup {rg_name}"),
        );
        return finish_members(req, Vec::new(), Vec::new(), report, &gm);
    };
    if let Err(r) = check_rg(req, class, rg, &rg_name) {
        return reject(req, backend, r);
    }
    let ledger = ledger_of(rg);
    let transition = format!("{}@{}", s.desired, s.generation);
    let ever_sent = ledger.as_ref().map(|l| l.sent.clone()).unwrap_or_default();
    let sent = match &ledger {
        Some(l) if l.transition == transition => l.sent.clone(),
        _ => Vec::new(),
    };
    let view = RgView::of(rg);
    match decide(s.desired, s.auto_resync, &view, &sent, &ever_sent, &rg_name) {
        Decision::Reject(r) => reject(req, backend, r),
        Decision::Report(report) => finish_members(req, Vec::new(), Vec::new(), report, &gm),
        Decision::Request(verb) => {
            let mut now_sent = sent;
            now_sent.push(verb.as_str().to_string());
            let ledger = Ledger {
                owner: s.owner_key(),
                class: class.name.clone(),
                transition,
                sent: now_sent,
            };
            let mut metadata = json!({"annotations": {
                LEDGER_ANNOTATION: serde_json::to_string(&ledger).unwrap_or_default()
            }});
            if let Some(rv) = &rg.metadata.resource_version {
                metadata["resourceVersion"] = json!(rv);
            }
            let write = BackendWrite::Patch {
                target: ObjectKey {
                    api_version: "replication.storage.dell.com/v1".into(),
                    kind: "DellCSIReplicationGroup".into(),
                    namespace: None,
                    name: rg_name.clone(),
                },
                patch: json!({"metadata": metadata, "spec": {"action": verb.as_str()}}),
            };
            let event = Event {
                type_: EventType::Normal,
                reason: "RequestedAction".into(),
                message: format!(
                    "requested {} on DellCSIReplicationGroup {rg_name}",
                    verb.as_str()
                ),
            };
            let report = Report::in_progress(
                s.desired,
                &format!("{} requested on RG {rg_name}", verb.as_str()),
            );
            finish_members(req, vec![write], vec![event], report, &gm)
        }
    }
}

/// Finishes a plan of the labelled members; pending PVCs are named in `status.message`
/// (and an event when that changes) but leave the conditions alone: the array's group is
/// what it was, and RamenDR must keep seeing it as done (contracts §8.4).
fn finish_members(
    req: &Request,
    writes: Vec<BackendWrite>,
    mut events: Vec<Event>,
    mut report: Report,
    gm: &GroupMembers,
) -> Plan {
    if let Some(note) = pending_note(gm) {
        report.message = format!("{}; {note}", report.message);
        // Once per wait (or change of the pending set), not once per reconcile.
        if !req.subject.status.message.ends_with(&note) {
            events.push(Event {
                type_: EventType::Normal,
                reason: PENDING_EVENT_REASON.into(),
                message: note,
            });
        }
    }
    finish(
        req,
        Some(Backend::DellPowerStore),
        writes,
        events,
        &report,
        Some(&gm.labelled),
    )
}

/// Event reason when selected PVCs wait for the Dell sidecar to add them to the protection group.
pub const PENDING_EVENT_REASON: &str = "WaitingForProtectionGroup";

/// The `status.message` note naming PVCs not yet in the protection group, if any.
pub fn pending_note(gm: &GroupMembers) -> Option<String> {
    let list = gm.pending.join(", ");
    let (pvcs, verb) = match gm.pending.as_slice() {
        [] => return None,
        [_] => (format!("PVC {list}"), "joins"),
        _ => (format!("PVCs {list}"), "join"),
    };
    Some(format!(
        "{pvcs} not yet in protection group {}: the Dell sidecar has not labelled {RG_LABEL} (the StorageClass needs isReplicationEnabled: \"true\"); {verb} the group once labelled",
        gm.group
    ))
}

fn ledger_of(rg: &DellCSIReplicationGroup) -> Option<Ledger> {
    annotations(&rg.metadata)
        .get(LEDGER_ANNOTATION)
        .and_then(|raw| serde_json::from_str(raw).ok())
}

fn check_params(class: &ClassView) -> Result<(), Rejection> {
    let missing = |key: &str, why: &str| Rejection::MissingParameter {
        class: class.name.clone(),
        key: key.into(),
        why: why.into(),
    };
    let invalid = |key: &str, value: &str, expected: &str| Rejection::InvalidParameter {
        class: class.name.clone(),
        key: key.into(),
        value: value.into(),
        expected: expected.into(),
    };
    if class.param(params::REMOTE_SYSTEM).is_none() {
        return Err(missing(
            params::REMOTE_SYSTEM,
            "PowerStore replicates to a named remote system; copy remoteSystem from the StorageClass",
        ));
    }
    let mode = class.param(params::MODE).unwrap_or("ASYNC");
    let rpo = class.param(params::RPO);
    match mode {
        "ASYNC" => match rpo {
            None => Err(missing(
                params::RPO,
                "ASYNC replication needs a recovery point objective; copy rpo from the StorageClass",
            )),
            Some(r) if !params::RPO_VALUES.contains(&r) => {
                Err(invalid(params::RPO, r, &params::RPO_VALUES.join(", ")))
            }
            Some(_) => Ok(()),
        },
        "SYNC" => match rpo {
            Some(r) if r != "Zero" => Err(invalid(params::RPO, r, "Zero (or unset) for SYNC")),
            _ => Ok(()),
        },
        other => Err(invalid(
            params::MODE,
            other,
            "ASYNC or SYNC (METRO has no failover verbs)",
        )),
    }
}

/// The members' protection group, as the Dell sidecar has labelled them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMembers {
    /// RG name.
    pub group: String,
    /// Members labelled with `group` (sorted): what a verb moves.
    pub labelled: Vec<String>,
    /// Selected PVCs the sidecar has not labelled yet (sorted): they join once labelled.
    pub pending: Vec<String>,
}

/// The one RG all labelled members belong to, and no PVC of it left out.
///
/// A selected PVC without the RG label while other members have it is
/// pending, not refused: the sidecar labels a new PVC some time after it is
/// bound, and the array's group is meanwhile what it was (as an unbound PVC of
/// a Trident group, it joins when ready). With no labelled member at all there
/// is no group to report: the first unlabelled PVC is refused.
///
/// # Errors
/// [`Rejection::PvcMissing`], [`Rejection::NotInProtectionGroup`],
/// [`Rejection::SpansProtectionGroups`], [`Rejection::PartialProtectionGroup`].
pub fn protection_group(req: &Request, names: &[String]) -> Result<GroupMembers, Rejection> {
    let mut groups: Vec<String> = Vec::new();
    let mut labelled = Vec::new();
    let mut pending = Vec::new();
    for name in names {
        let Some(p) = pvc(req, name) else {
            return Err(Rejection::PvcMissing {
                pvc: name.clone(),
                hint: "Dell replicates existing volumes: create the PVC with a replication-enabled StorageClass".into(),
            });
        };
        let Some(g) = p.labels.get(RG_LABEL).filter(|g| !g.is_empty()) else {
            pending.push(name.clone());
            continue;
        };
        labelled.push(name.clone());
        if !groups.contains(g) {
            groups.push(g.clone());
        }
    }
    groups.sort();
    let group = match groups.as_slice() {
        [group] => group.clone(),
        [] => {
            return Err(Rejection::NotInProtectionGroup {
                pvc: pending.first().cloned().unwrap_or_default(),
                label: RG_LABEL,
            });
        }
        _ => {
            return Err(Rejection::SpansProtectionGroups {
                groups: groups.join(", "),
            });
        }
    };
    let mut others: Vec<String> = req
        .pvcs
        .iter()
        .filter(|p| p.labels.get(RG_LABEL) == Some(&group) && !names.contains(&p.name))
        .map(|p| p.name.clone())
        .collect();
    if !others.is_empty() {
        others.sort();
        return Err(Rejection::PartialProtectionGroup {
            subject: req.subject.kind,
            group,
            others,
        });
    }
    labelled.sort();
    pending.sort();
    Ok(GroupMembers {
        group,
        labelled,
        pending,
    })
}

fn check_rg(
    req: &Request,
    class: &ClassView,
    rg: &DellCSIReplicationGroup,
    rg_name: &str,
) -> Result<(), Rejection> {
    let object = format!("DellCSIReplicationGroup {rg_name}");
    if rg.spec.driver_name != DRIVER {
        return Err(Rejection::ConflictingState {
            detail: format!(
                "{object} belongs to driver {:?}, not {DRIVER:?}",
                rg.spec.driver_name
            ),
        });
    }
    if let (Some(want), Some(have)) = (
        class.param(params::REMOTE_SYSTEM),
        rg.spec
            .protection_group_attributes
            .get(REMOTE_SYSTEM_ATTRIBUTE),
    ) && want != have
    {
        return Err(Rejection::ConflictingState {
            detail: format!(
                "class {:?} says remoteSystem {want:?} but {object} replicates to {have:?}; use the class that matches the StorageClass",
                class.name
            ),
        });
    }
    if let Some(ledger) = ledger_of(rg) {
        let s = &req.subject;
        if ledger.owner != s.owner_key() {
            return Err(Rejection::ClaimedElsewhere {
                object,
                owner: ledger.owner,
            });
        }
        if ledger.class != class.name {
            return Err(Rejection::ImmutableFieldChanged {
                object,
                field: match s.kind {
                    SubjectKind::Volume => "spec.volumeReplicationClass".into(),
                    SubjectKind::Group => "spec.volumeGroupReplicationClassName".into(),
                },
                was: ledger.class,
                now: class.name.clone(),
            });
        }
    }
    Ok(())
}
