//! csi-addons status vocabulary and how a backend observation becomes a status.
//!
//! Owns: the condition types and reasons (csi-addons constants, plus three
//! in-progress reasons of our own, since csi-addons drivers answer
//! synchronously and have none), the [`Report`] rows every backend maps its
//! observation to, and merging a report into the current status the way
//! csi-addons' `setStatusCondition` does (the transition time changes only
//! when a condition's status changes). It knows no backend.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{Event, EventType, Rejection, Subject};
use crate::replication::types::{ReplicatedState, ReplicationState, VolumeReplicationStatus};

/// Condition types (csi-addons `Condition*` constants).
pub mod types {
    /// The requested state change finished.
    pub const COMPLETED: &str = "Completed";
    /// Replication is impaired.
    pub const DEGRADED: &str = "Degraded";
    /// The volume is being resynced.
    pub const RESYNCING: &str = "Resyncing";
    /// The inputs were checked.
    pub const VALIDATED: &str = "Validated";
    /// Data is flowing to the secondary.
    pub const REPLICATING: &str = "Replicating";
    /// The destination volume id is known (newer csi-addons; not set by us).
    pub const DESTINATION_INFO_AVAILABLE: &str = "DestinationInfoAvailable";
}

/// Condition reasons.
pub mod reasons {
    /// csi-addons: operation succeeded.
    pub const SUCCESS: &str = "Success";
    /// csi-addons: promoted.
    pub const PROMOTED: &str = "Promoted";
    /// csi-addons: demoted.
    pub const DEMOTED: &str = "Demoted";
    /// csi-addons: promotion failed.
    pub const FAILED_TO_PROMOTE: &str = "FailedToPromote";
    /// csi-addons: demotion failed.
    pub const FAILED_TO_DEMOTE: &str = "FailedToDemote";
    /// csi-addons: error.
    pub const ERROR: &str = "Error";
    /// csi-addons: volume degraded.
    pub const VOLUME_DEGRADED: &str = "VolumeDegraded";
    /// csi-addons: healthy.
    pub const HEALTHY: &str = "Healthy";
    /// csi-addons: resync triggered.
    pub const RESYNC_TRIGGERED: &str = "ResyncTriggered";
    /// csi-addons: resync failed.
    pub const FAILED_TO_RESYNC: &str = "FailedToResync";
    /// csi-addons: not resyncing.
    pub const NOT_RESYNCING: &str = "NotResyncing";
    /// csi-addons: prerequisites met.
    pub const PREREQUISITE_MET: &str = "PrerequisiteMet";
    /// csi-addons: prerequisites not met.
    pub const PREREQUISITE_NOT_MET: &str = "PrerequisiteNotMet";
    /// csi-addons: replicating.
    pub const REPLICATING: &str = "Replicating";
    /// csi-addons: not replicating.
    pub const NOT_REPLICATING: &str = "NotReplicating";
    /// csi-addons: destination info updated.
    pub const DESTINATION_INFO_UPDATED: &str = "DestinationInfoUpdated";
    /// csi-addons: destination info pending.
    pub const DESTINATION_INFO_PENDING: &str = "DestinationInfoPending";
    /// csi-addons: destination info failed.
    pub const FAILED_TO_GET_DESTINATION_INFO: &str = "FailedToGetDestinationInfo";
    /// Ours: a promotion was requested from the backend and has not finished.
    pub const PROMOTION_IN_PROGRESS: &str = "PromotionInProgress";
    /// Ours: a demotion was requested from the backend and has not finished.
    pub const DEMOTION_IN_PROGRESS: &str = "DemotionInProgress";
    /// Ours: a resync was requested from the backend and has not finished.
    pub const RESYNC_IN_PROGRESS: &str = "ResyncInProgress";

    /// Every csi-addons reason.
    pub const CSI_ADDONS: [&str; 18] = [
        SUCCESS,
        PROMOTED,
        DEMOTED,
        FAILED_TO_PROMOTE,
        FAILED_TO_DEMOTE,
        ERROR,
        VOLUME_DEGRADED,
        HEALTHY,
        RESYNC_TRIGGERED,
        FAILED_TO_RESYNC,
        NOT_RESYNCING,
        PREREQUISITE_MET,
        PREREQUISITE_NOT_MET,
        REPLICATING,
        NOT_REPLICATING,
        DESTINATION_INFO_UPDATED,
        DESTINATION_INFO_PENDING,
        FAILED_TO_GET_DESTINATION_INFO,
    ];
    /// Reasons of our own (in-progress states of asynchronous backends).
    pub const OWN: [&str; 3] = [
        PROMOTION_IN_PROGRESS,
        DEMOTION_IN_PROGRESS,
        RESYNC_IN_PROGRESS,
    ];
}

/// Condition types this translation sets; others on the object are left alone.
pub const MANAGED_TYPES: [&str; 5] = [
    types::COMPLETED,
    types::DEGRADED,
    types::RESYNCING,
    types::VALIDATED,
    types::REPLICATING,
];

/// `metav1.ConditionStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CondStatus {
    /// `True`.
    True,
    /// `False`.
    False,
    /// `Unknown`.
    Unknown,
}

impl CondStatus {
    /// The string Kubernetes uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// One condition to set (without time and generation, which the merge adds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CondSpec {
    /// Condition type.
    pub type_: &'static str,
    /// Status.
    pub status: CondStatus,
    /// Reason.
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

/// How far the subject got, in csi-addons terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReportKind {
    /// The requested role is reached and replication is healthy.
    Converged,
    /// The requested role is reached but replication is impaired.
    ConvergedDegraded,
    /// Secondary, data flowing in (initial transfer or resync).
    Resyncing,
    /// The backend is working on the change.
    InProgress,
    /// The backend failed to make the change.
    Failed,
    /// The backend says the request can never work.
    Invalid,
    /// Our validation refused the input; nothing was written.
    Rejected,
}

/// `status.state` of a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateReport {
    /// Set this state.
    Known(ReplicatedState),
    /// Keep the current state (a change is in flight).
    Previous,
}

/// What an observation means in csi-addons terms: one row of the mapping tables.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Classification (drives the RamenDR rules).
    pub kind: ReportKind,
    /// `status.state`.
    pub state: StateReport,
    /// `status.message`.
    pub message: String,
    /// Conditions of [`MANAGED_TYPES`] to set; managed types not listed are removed.
    pub conditions: Vec<CondSpec>,
    /// `status.lastSyncTime`, when the backend tells.
    pub last_sync_time: Option<Time>,
}

fn c(type_: &'static str, status: CondStatus, reason: &'static str, msg: &str) -> CondSpec {
    CondSpec {
        type_,
        status,
        reason,
        message: msg.to_string(),
    }
}

fn validated() -> CondSpec {
    c(
        types::VALIDATED,
        CondStatus::True,
        reasons::PREREQUISITE_MET,
        "volume is validated and met all prerequisites",
    )
}

fn not_resyncing() -> CondSpec {
    c(
        types::RESYNCING,
        CondStatus::False,
        reasons::NOT_RESYNCING,
        "is not resyncing",
    )
}

fn replicating() -> CondSpec {
    c(
        types::REPLICATING,
        CondStatus::True,
        reasons::REPLICATING,
        "is replicating",
    )
}

fn not_replicating(detail: &str) -> CondSpec {
    c(
        types::REPLICATING,
        CondStatus::False,
        reasons::NOT_REPLICATING,
        detail,
    )
}

fn failed_reason(desired: ReplicationState) -> &'static str {
    match desired {
        ReplicationState::Primary => reasons::FAILED_TO_PROMOTE,
        ReplicationState::Secondary => reasons::FAILED_TO_DEMOTE,
        ReplicationState::Resync => reasons::FAILED_TO_RESYNC,
    }
}

fn in_progress_reason(desired: ReplicationState) -> &'static str {
    match desired {
        ReplicationState::Primary => reasons::PROMOTION_IN_PROGRESS,
        ReplicationState::Secondary => reasons::DEMOTION_IN_PROGRESS,
        ReplicationState::Resync => reasons::RESYNC_IN_PROGRESS,
    }
}

impl Report {
    /// Primary, promoted, healthy. `replicating`: whether data is known to flow out.
    pub fn primary(replicating: Option<bool>, detail: &str) -> Self {
        let mut conditions = vec![
            c(
                types::COMPLETED,
                CondStatus::True,
                reasons::PROMOTED,
                "is promoted to primary and replicating to secondary",
            ),
            c(
                types::DEGRADED,
                CondStatus::False,
                reasons::HEALTHY,
                "is healthy",
            ),
            not_resyncing(),
            validated(),
        ];
        conditions.extend(replicating_cond(replicating));
        Self {
            kind: ReportKind::Converged,
            state: StateReport::Known(ReplicatedState::Primary),
            message: format!("volume is promoted to primary; {detail}"),
            conditions,
            last_sync_time: None,
        }
    }

    /// Primary, promoted, but replication impaired (suspended, failed over, link down).
    pub fn primary_degraded(detail: &str) -> Self {
        Self {
            kind: ReportKind::ConvergedDegraded,
            state: StateReport::Known(ReplicatedState::Primary),
            message: format!("volume is primary but not replicating: {detail}"),
            conditions: vec![
                c(
                    types::COMPLETED,
                    CondStatus::True,
                    reasons::PROMOTED,
                    "is promoted to primary",
                ),
                c(types::DEGRADED, CondStatus::True, reasons::ERROR, detail),
                not_resyncing(),
                validated(),
                not_replicating(detail),
            ],
            last_sync_time: None,
        }
    }

    /// Secondary, in sync, data flowing in.
    pub fn secondary(detail: &str) -> Self {
        Self {
            kind: ReportKind::Converged,
            state: StateReport::Known(ReplicatedState::Secondary),
            message: format!("volume is demoted to secondary; {detail}"),
            conditions: vec![
                c(
                    types::COMPLETED,
                    CondStatus::True,
                    reasons::DEMOTED,
                    "is demoted to secondary",
                ),
                c(
                    types::DEGRADED,
                    CondStatus::False,
                    reasons::HEALTHY,
                    "is healthy",
                ),
                not_resyncing(),
                validated(),
                replicating(),
            ],
            last_sync_time: None,
        }
    }

    /// Secondary, (re)synchronising from the primary.
    pub fn secondary_resyncing(detail: &str) -> Self {
        Self {
            kind: ReportKind::Resyncing,
            state: StateReport::Known(ReplicatedState::Secondary),
            message: format!("volume is secondary and resyncing: {detail}"),
            conditions: vec![
                c(
                    types::COMPLETED,
                    CondStatus::True,
                    reasons::DEMOTED,
                    "is demoted to secondary",
                ),
                c(
                    types::DEGRADED,
                    CondStatus::True,
                    reasons::VOLUME_DEGRADED,
                    "is degraded",
                ),
                c(
                    types::RESYNCING,
                    CondStatus::True,
                    reasons::RESYNC_TRIGGERED,
                    "is resyncing changes from primary to secondary",
                ),
                validated(),
            ],
            last_sync_time: None,
        }
    }

    /// Secondary, but not receiving data (suspended, link down).
    pub fn secondary_degraded(detail: &str) -> Self {
        Self {
            kind: ReportKind::ConvergedDegraded,
            state: StateReport::Known(ReplicatedState::Secondary),
            message: format!("volume is secondary but not replicating: {detail}"),
            conditions: vec![
                c(
                    types::COMPLETED,
                    CondStatus::True,
                    reasons::DEMOTED,
                    "is demoted to secondary",
                ),
                c(
                    types::DEGRADED,
                    CondStatus::True,
                    reasons::VOLUME_DEGRADED,
                    detail,
                ),
                not_resyncing(),
                validated(),
                not_replicating(detail),
            ],
            last_sync_time: None,
        }
    }

    /// The backend is working on the change; the state stays what it was.
    pub fn in_progress(desired: ReplicationState, detail: &str) -> Self {
        Self {
            kind: ReportKind::InProgress,
            state: StateReport::Previous,
            message: format!("{desired} requested, in progress: {detail}"),
            conditions: vec![
                c(
                    types::COMPLETED,
                    CondStatus::False,
                    in_progress_reason(desired),
                    detail,
                ),
                validated(),
            ],
            last_sync_time: None,
        }
    }

    /// The backend failed to make the change.
    pub fn failed(desired: ReplicationState, detail: &str) -> Self {
        let mut conditions = vec![
            c(
                types::COMPLETED,
                CondStatus::False,
                failed_reason(desired),
                detail,
            ),
            c(types::DEGRADED, CondStatus::True, reasons::ERROR, detail),
        ];
        if desired == ReplicationState::Resync {
            conditions.push(c(
                types::RESYNCING,
                CondStatus::False,
                reasons::FAILED_TO_RESYNC,
                "failed to resync",
            ));
        } else {
            conditions.push(not_resyncing());
        }
        conditions.push(validated());
        Self {
            kind: ReportKind::Failed,
            state: StateReport::Known(ReplicatedState::Unknown),
            message: format!("{desired} failed: {detail}"),
            conditions,
            last_sync_time: None,
        }
    }

    /// The backend says the request can never work.
    pub fn invalid(desired: ReplicationState, detail: &str) -> Self {
        Self {
            kind: ReportKind::Invalid,
            state: StateReport::Known(ReplicatedState::Unknown),
            message: format!("{desired} cannot be done: {detail}"),
            conditions: vec![
                c(
                    types::COMPLETED,
                    CondStatus::False,
                    failed_reason(desired),
                    detail,
                ),
                c(types::DEGRADED, CondStatus::True, reasons::ERROR, detail),
                c(
                    types::VALIDATED,
                    CondStatus::False,
                    reasons::PREREQUISITE_NOT_MET,
                    detail,
                ),
            ],
            last_sync_time: None,
        }
    }

    /// Our validation refused the input; the state stays what it was.
    pub fn rejected(desired: ReplicationState, rejection: &Rejection) -> Self {
        let detail = rejection.to_string();
        Self {
            kind: ReportKind::Rejected,
            state: StateReport::Previous,
            message: format!("{desired} not attempted: {detail}"),
            conditions: vec![
                c(
                    types::COMPLETED,
                    CondStatus::False,
                    failed_reason(desired),
                    "failed to meet prerequisite",
                ),
                c(
                    types::VALIDATED,
                    CondStatus::False,
                    reasons::PREREQUISITE_NOT_MET,
                    &detail,
                ),
            ],
            last_sync_time: None,
        }
    }

    /// The condition of this type, if the report sets it.
    pub fn condition(&self, type_: &str) -> Option<&CondSpec> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Sets `lastSyncTime`.
    pub fn with_last_sync(mut self, t: Option<Time>) -> Self {
        self.last_sync_time = t;
        self
    }
}

fn replicating_cond(flowing: Option<bool>) -> Option<CondSpec> {
    flowing.map(|r| {
        if r {
            replicating()
        } else {
            not_replicating("is not replicating")
        }
    })
}

/// The status after applying `report` to the subject's current status.
///
/// Managed conditions the report does not set are removed (so a stale
/// `Replicating` or `Validated=False` cannot linger); others are kept.
/// `started` (a backend write is planned) stamps `lastStartTime`; the first
/// `Completed=True` stamps `lastCompletionTime`.
pub fn merge_status(
    subject: &Subject,
    report: &Report,
    now: &Time,
    started: bool,
) -> VolumeReplicationStatus {
    // The API server stores whole seconds; stamping finer times would make a
    // status we computed differ from the same status read back.
    let now = &Time(k8s_openapi::jiff::Timestamp::from_second(now.0.as_second()).unwrap_or(now.0));
    let current = &subject.status;
    let generation = subject.generation;
    let mut conditions: Vec<Condition> = Vec::new();
    for old in &current.conditions {
        if !MANAGED_TYPES.contains(&old.type_.as_str()) {
            conditions.push(old.clone());
        } else if let Some(new) = report.condition(&old.type_) {
            conditions.push(to_condition(new, Some(old), now, generation));
        }
    }
    for new in &report.conditions {
        if !conditions.iter().any(|c| c.type_ == new.type_) {
            conditions.push(to_condition(new, None, now, generation));
        }
    }
    let was_completed = is_true(&current.conditions, types::COMPLETED);
    let completed_now = report
        .condition(types::COMPLETED)
        .is_some_and(|c| c.status == CondStatus::True);
    VolumeReplicationStatus {
        state: match report.state {
            StateReport::Known(s) => Some(s),
            StateReport::Previous => current.state.or(Some(ReplicatedState::Unknown)),
        },
        message: report.message.clone(),
        conditions,
        observed_generation: generation,
        last_start_time: if started {
            Some(now.clone())
        } else {
            current.last_start_time.clone()
        },
        last_completion_time: if completed_now && !was_completed {
            Some(now.clone())
        } else {
            current.last_completion_time.clone()
        },
        last_sync_time: report
            .last_sync_time
            .clone()
            .or_else(|| current.last_sync_time.clone()),
        last_sync_bytes: current.last_sync_bytes,
        last_sync_duration: current.last_sync_duration.clone(),
        destination_volume_id: current.destination_volume_id.clone(),
    }
}

fn to_condition(new: &CondSpec, old: Option<&Condition>, now: &Time, generation: i64) -> Condition {
    // As csi-addons' setStatusCondition: the transition time moves only when the status does.
    let last_transition_time = match old {
        Some(o) if o.status == new.status.as_str() => o.last_transition_time.clone(),
        _ => now.clone(),
    };
    Condition {
        last_transition_time,
        message: new.message.clone(),
        observed_generation: Some(generation),
        reason: new.reason.to_string(),
        status: new.status.as_str().to_string(),
        type_: new.type_.to_string(),
    }
}

fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// One event per managed condition whose status or reason changed between two statuses.
pub fn transition_events(
    before: &VolumeReplicationStatus,
    after: &VolumeReplicationStatus,
) -> Vec<Event> {
    let mut events = Vec::new();
    for new in &after.conditions {
        if !MANAGED_TYPES.contains(&new.type_.as_str()) {
            continue;
        }
        let changed = before
            .conditions
            .iter()
            .find(|o| o.type_ == new.type_)
            .is_none_or(|o| o.status != new.status || o.reason != new.reason);
        if !changed {
            continue;
        }
        let bad = (new.type_ == types::DEGRADED && new.status == "True")
            || (new.type_ == types::VALIDATED && new.status == "False")
            || new.reason.starts_with("FailedTo");
        events.push(Event {
            type_: if bad {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: new.reason.clone(),
            message: format!("{}={}: {}", new.type_, new.status, new.message),
        });
    }
    events
}

/// RamenDR's acceptance of a primary (contracts §8.4): `Completed` True, `Validated` True or absent.
pub fn ramen_accepts_primary(status: &VolumeReplicationStatus, generation: i64) -> bool {
    status.observed_generation == generation
        && cond(status, types::COMPLETED) == Some("True")
        && matches!(cond(status, types::VALIDATED), None | Some("True"))
}

/// RamenDR's acceptance of a secondary (contracts §8.4): `Completed` True and either
/// (`Resyncing` True and `Degraded` True) or (`Resyncing` False, `Degraded` False, state Secondary).
pub fn ramen_accepts_secondary(status: &VolumeReplicationStatus, generation: i64) -> bool {
    let resyncing = cond(status, types::RESYNCING);
    let degraded = cond(status, types::DEGRADED);
    status.observed_generation == generation
        && cond(status, types::COMPLETED) == Some("True")
        && ((resyncing == Some("True") && degraded == Some("True"))
            || (resyncing == Some("False")
                && degraded == Some("False")
                && status.state == Some(ReplicatedState::Secondary)))
}

fn cond<'a>(status: &'a VolumeReplicationStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| {
            c.observed_generation
                .is_none_or(|g| g == status.observed_generation)
        })
        .map(|c| c.status.as_str())
}
