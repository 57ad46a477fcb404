//! Typed objects of volume replication: the csi-addons kinds users write
//! (`replication.storage.openshift.io/v1alpha1`) and the backend kinds we write
//! or read (Trident `TridentMirrorRelationship` and `TridentActionMirrorUpdate`,
//! Dell `DellCSIReplicationGroup`).
//!
//! Field names, casing and `omitempty` behaviour follow the upstream Go types
//! (contracts §6 and §8), so an object we read and write back is the object
//! the API server served. Where the Go type and the served CRD disagree the
//! served CRD wins (Dell `lastAction.actionAttributes` is pruned by the CRD
//! and is therefore absent here; VGR `source.selector` is required by the CRD
//! and therefore not optional here). `tests/replication_crds.rs` checks every
//! field against the CRD files in `shared/crds/`.
//!
//! These types only describe objects; reading and writing them is done with
//! `kube::Api` by callers. The CRDs are installed by csi-addons, Trident and
//! Dell, never by us, so no schema is derived.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    LocalObjectReference, ObjectReference, TypedLocalObjectReference,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use serde::{Deserialize, Deserializer, Serialize};

/// API group of the csi-addons replication kinds.
pub const GROUP: &str = "replication.storage.openshift.io";
/// The only served version of the csi-addons replication kinds.
pub const VERSION: &str = "v1alpha1";
/// Most PVCs a VolumeGroupReplication may hold (csi-addons limit).
pub const MAX_GROUP_PVCS: usize = 100;
/// API group of the Trident kinds.
pub const TRIDENT_GROUP: &str = "trident.netapp.io";
/// API group of the Dell replication kinds.
pub const DELL_GROUP: &str = "replication.storage.dell.com";

/// PVC annotation csi-addons sets to the VolumeReplication that owns the PVC.
pub const PVC_VR_ANNOTATION: &str = "replication.storage.openshift.io/volume-replication-name";
/// PVC annotation csi-addons sets to the VolumeGroupReplication that owns the PVC.
pub const PVC_VGR_ANNOTATION: &str =
    "replication.storage.openshift.io/volume-group-replication-name";
/// Finalizer csi-addons puts on the PVC of a VolumeReplication (we do the same).
pub const PVC_VR_FINALIZER: &str = "replication.storage.openshift.io/pvc-protection";
/// Finalizer csi-addons puts on the PVCs of a VolumeGroupReplication (we do the same).
pub const PVC_VGR_FINALIZER: &str = "replication.storage.openshift.io/vgr-protection";
/// Class parameter prefix csi-addons reserves for itself (never sent to a driver).
pub const RESERVED_PARAMETER_PREFIX: &str = "replication.storage.openshift.io/";

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Reads JSON `null` as the type's default: Go writes nil slices and maps as `null`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

// ---------------------------------------------------------------------------
// csi-addons: shared enums and status
// ---------------------------------------------------------------------------

/// `spec.replicationState`: what the user asks of the volume (CRD enum, lower case).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationState {
    /// Enable mirroring and promote the volume to primary.
    Primary,
    /// Demote to secondary; resync if out of sync.
    Secondary,
    /// Resync the volume from the primary.
    Resync,
}

impl ReplicationState {
    /// Every value, in CRD order.
    pub const ALL: [ReplicationState; 3] = [Self::Primary, Self::Secondary, Self::Resync];

    /// The string the CRD uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Secondary => "secondary",
            Self::Resync => "resync",
        }
    }
}

impl fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `status.state`: what the volume is (not CRD-enforced, so unknown text reads as `Unknown`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicatedState {
    /// The volume is the writable source.
    Primary,
    /// The volume is a replication target.
    Secondary,
    /// Not known (also any value this crate does not recognise).
    #[serde(other)]
    Unknown,
}

impl ReplicatedState {
    /// The string csi-addons uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "Primary",
            Self::Secondary => "Secondary",
            Self::Unknown => "Unknown",
        }
    }
}

/// A Go `metav1.Duration` as served (`"1m30s"`), kept verbatim so odd values never fail a read.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(transparent)]
pub struct GoDuration(pub String);

/// Why a Go duration string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a Go duration (like 1h2m3.5s): {problem}")]
pub struct GoDurationError {
    /// The text that was read.
    pub text: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl GoDuration {
    /// Formats a duration the way Go's `time.Duration.String` does (`1m30s`, `1.5s`, `250ms`, `0s`).
    pub fn from_std(d: Duration) -> Self {
        Self(format_go_duration(d))
    }

    /// Parses the string as Go's `time.ParseDuration` does (non-negative values only).
    ///
    /// # Errors
    /// [`GoDurationError`] when the text is not a non-negative Go duration.
    pub fn to_std(&self) -> Result<Duration, GoDurationError> {
        parse_go_duration(&self.0)
    }
}

fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    // Below one second Go picks the largest unit that keeps the integer part non-zero.
    if nanos < 1_000_000_000 {
        let (unit, scale) = if nanos < 1_000 {
            ("ns", 1u128)
        } else if nanos < 1_000_000 {
            ("µs", 1_000)
        } else {
            ("ms", 1_000_000)
        };
        return format!("{}{unit}", fixed(nanos, scale));
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let frac = u128::from(s) * 1_000_000_000 + u128::from(d.subsec_nanos());
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", fixed(frac, 1_000_000_000)));
    out
}

/// `value / scale` as a decimal with trailing zeros dropped (Go's fmtFrac).
fn fixed(value: u128, scale: u128) -> String {
    let int = value / scale;
    let mut rem = value % scale;
    if rem == 0 {
        return int.to_string();
    }
    let mut digits = String::new();
    let mut s = scale;
    while rem > 0 {
        s /= 10;
        digits.push(char::from(b'0' + u8::try_from(rem / s).unwrap_or(0)));
        rem %= s;
    }
    format!("{int}.{digits}")
}

fn parse_go_duration(text: &str) -> Result<Duration, GoDurationError> {
    let bad = |problem| GoDurationError {
        text: text.to_string(),
        problem,
    };
    let s = text.strip_prefix('+').unwrap_or(text);
    if s.starts_with('-') {
        return Err(bad("negative durations are not accepted here"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        if num.is_empty() || num == "." {
            return Err(bad("expected a number"));
        }
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(bad("missing unit")),
            _ => return Err(bad("unknown unit")),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad("number too large"))?
        };
        let mut part = int.checked_mul(scale).ok_or_else(|| bad("overflow"))?;
        let mut div = 1u128;
        for c in frac.chars() {
            div = div.saturating_mul(10);
            let digit = u128::from(c.to_digit(10).ok_or_else(|| bad("two decimal points"))?);
            part += digit * scale / div;
        }
        total = total.checked_add(part).ok_or_else(|| bad("overflow"))?;
        rest = next;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| bad("overflow"))?;
    let nanos = u32::try_from(total % 1_000_000_000).map_err(|_| bad("overflow"))?;
    Ok(Duration::new(secs, nanos))
}

/// `status` of a VolumeReplication (and, inlined, of a VolumeGroupReplication).
///
/// Every field is `omitempty` upstream: absent when unset.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeReplicationStatus {
    /// What the volume is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ReplicatedState>,
    /// Human-readable summary of the last operation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Standard conditions (`Completed`, `Degraded`, `Resyncing`, `Validated`, `Replicating`, ...).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub conditions: Vec<Condition>,
    /// `metadata.generation` the status describes (0 = never, and then omitted as in Go).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub observed_generation: i64,
    /// When the last operation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_start_time: Option<Time>,
    /// When the last operation completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_completion_time: Option<Time>,
    /// When data last reached the secondary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Bytes moved by the last sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_bytes: Option<i64>,
    /// How long the last sync took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_duration: Option<GoDuration>,
    /// Volume id on the destination side, when it differs (newer csi-addons only).
    #[serde(
        default,
        rename = "destinationVolumeID",
        skip_serializing_if = "Option::is_none"
    )]
    pub destination_volume_id: Option<String>,
}

// ---------------------------------------------------------------------------
// csi-addons: VolumeReplication and its class
// ---------------------------------------------------------------------------

/// `spec` of a VolumeReplication: replicate one PVC (or, made by csi-addons, one group).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "replication.storage.openshift.io",
    version = "v1alpha1",
    kind = "VolumeReplication",
    plural = "volumereplications",
    shortname = "vr",
    namespaced,
    status = "VolumeReplicationStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeReplicationSpec {
    /// Name of the VolumeReplicationClass (immutable).
    pub volume_replication_class: String,
    /// What the user asks of the volume.
    pub replication_state: ReplicationState,
    /// The PVC (core) or VolumeGroupReplication being replicated (immutable, same namespace).
    pub data_source: TypedLocalObjectReference,
    /// Resync automatically when secondary (CRD default false; always written, as in Go).
    #[serde(default)]
    pub auto_resync: bool,
    /// Existing replication id; Go has no `omitempty`, so `""` is written when unset.
    #[serde(default)]
    pub replication_handle: String,
}

/// Defines a class kind of csi-addons (VolumeReplicationClass and VolumeGroupReplicationClass
/// have the same shape).
macro_rules! replication_class {
    ($(#[$doc:meta])* $spec:ident, $kind:tt, $plural:tt, $short:tt) => {
        $(#[$doc])*
        #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
        #[kube(
            group = "replication.storage.openshift.io",
            version = "v1alpha1",
            kind = $kind,
            plural = $plural,
            shortname = $short,
            schema = "disabled",
            derive = "PartialEq"
        )]
        #[serde(rename_all = "camelCase")]
        pub struct $spec {
            /// CSI driver name (immutable).
            pub provisioner: String,
            /// Driver parameters (immutable). `Some(empty)` and `None` differ: the CRD
            /// forbids adding or removing the map later, so its presence is kept.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub parameters: Option<BTreeMap<String, String>>,
        }
    };
}

replication_class!(
    /// `spec` of a VolumeReplicationClass (cluster scoped): which driver, with which parameters.
    VolumeReplicationClassSpec,
    "VolumeReplicationClass",
    "volumereplicationclasses",
    "vrc"
);

// ---------------------------------------------------------------------------
// csi-addons: VolumeGroupReplication, its class and content
// ---------------------------------------------------------------------------

/// `spec` of a VolumeGroupReplication: replicate the PVCs a selector picks, as one group.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "replication.storage.openshift.io",
    version = "v1alpha1",
    kind = "VolumeGroupReplication",
    plural = "volumegroupreplications",
    shortname = "vgr",
    namespaced,
    status = "VolumeGroupReplicationStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupReplicationSpec {
    /// Name of the VolumeGroupReplicationClass (immutable).
    pub volume_group_replication_class_name: String,
    /// Class of the VolumeReplication csi-addons makes for the group (immutable; no `omitempty`).
    #[serde(default)]
    pub volume_replication_class_name: String,
    /// Name of that VolumeReplication (immutable; csi-addons default `vr-<uid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_replication_name: Option<String>,
    /// Name of the VolumeGroupReplicationContent (immutable; default `vgrcontent-<uid>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_replication_content_name: Option<String>,
    /// Which PVCs form the group (immutable).
    pub source: VolumeGroupReplicationSource,
    /// What the user asks of the group.
    pub replication_state: ReplicationState,
    /// Resync automatically when secondary (CRD default false; always written).
    #[serde(default)]
    pub auto_resync: bool,
    /// True: a vendor controller (such as ours) reconciles it and csi-addons
    /// leaves it alone (immutable; newer csi-addons, so omitted when false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub external: bool,
}

/// `spec.source` of a VolumeGroupReplication.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupReplicationSource {
    /// Label query over PVCs of the namespace (required by the CRD).
    pub selector: LabelSelector,
}

/// `status` of a VolumeGroupReplication: the VolumeReplication status plus the member PVCs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupReplicationStatus {
    /// The inlined VolumeReplication status.
    #[serde(flatten)]
    pub replication: VolumeReplicationStatus,
    /// PVCs in the group (at most [`MAX_GROUP_PVCS`]).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub persistent_volume_claims_ref_list: Vec<LocalObjectReference>,
}

replication_class!(
    /// `spec` of a VolumeGroupReplicationClass (cluster scoped).
    VolumeGroupReplicationClassSpec,
    "VolumeGroupReplicationClass",
    "volumegroupreplicationclasses",
    "vgrc"
);

/// `spec` of a VolumeGroupReplicationContent (cluster scoped): the backend group.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "replication.storage.openshift.io",
    version = "v1alpha1",
    kind = "VolumeGroupReplicationContent",
    plural = "volumegroupreplicationcontents",
    shortname = "vgrcontent",
    status = "VolumeGroupReplicationContentStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupReplicationContentSpec {
    /// The bound VolumeGroupReplication (name, namespace and uid all set, or unset to auto-bind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_replication_ref: Option<ObjectReference>,
    /// Backend group id; Go has no `omitempty`, so `""` is written when unset.
    #[serde(default)]
    pub volume_group_replication_handle: String,
    /// CSI driver name.
    pub provisioner: String,
    /// Class the group was made from.
    pub volume_group_replication_class_name: String,
    /// Group context from the driver (immutable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_attributes: Option<BTreeMap<String, String>>,
    /// Backend volumes in the group.
    pub source: VolumeGroupReplicationContentSource,
}

/// `spec.source` of a VolumeGroupReplicationContent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupReplicationContentSource {
    /// Backend volume handles (required; written even when empty).
    #[serde(deserialize_with = "null_as_default")]
    pub volume_handles: Vec<String>,
}

/// `status` of a VolumeGroupReplicationContent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeGroupReplicationContentStatus {
    /// PVs of the group (deprecated upstream in favour of the mapping list).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub persistent_volume_ref_list: Vec<LocalObjectReference>,
    /// PVs with their source and destination handles (newer csi-addons).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub persistent_volume_mapping_list: Vec<PersistentVolumeMapping>,
    /// Group id on the destination side (newer csi-addons).
    #[serde(
        default,
        rename = "destinationVolumeGroupID",
        skip_serializing_if = "Option::is_none"
    )]
    pub destination_volume_group_id: Option<String>,
}

/// One PV of a group with its handles on both sides.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PersistentVolumeMapping {
    /// PV name.
    pub name: String,
    /// CSI volume handle on this side.
    pub volume_handle: String,
    /// CSI volume handle on the destination, when the driver reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_volume_handle: Option<String>,
}

// ---------------------------------------------------------------------------
// Trident
// ---------------------------------------------------------------------------

/// `spec.state` of a TridentMirrorRelationship (CRD enum).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MirrorState {
    /// No desired state.
    #[default]
    #[serde(rename = "")]
    Unset,
    /// This end is the writable source (failover / source of a new mirror).
    Promoted,
    /// This end is the destination of a new SnapMirror relationship.
    Established,
    /// Resync this end from the remote (after a failover; overwrites local data).
    Reestablished,
}

impl MirrorState {
    /// Every value, in CRD order.
    pub const ALL: [MirrorState; 4] = [
        Self::Unset,
        Self::Promoted,
        Self::Established,
        Self::Reestablished,
    ];

    /// The string Trident uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unset => "",
            Self::Promoted => "promoted",
            Self::Established => "established",
            Self::Reestablished => "reestablished",
        }
    }
}

/// `status.conditions[].state` of a TridentMirrorRelationship (free text upstream).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(from = "String", into = "String")]
pub enum MirrorStatusState {
    /// No relationship (yet).
    #[default]
    Empty,
    /// Source, or failed over.
    Promoted,
    /// Breaking the relationship (failover in progress).
    Promoting,
    /// Destination, transfers running.
    Established,
    /// Initial transfer in progress.
    Establishing,
    /// Destination again after a resync.
    Reestablished,
    /// Resync in progress.
    Reestablishing,
    /// The desired state was not reached.
    Failed,
    /// The spec can never work.
    Invalid,
    /// Any other text (kept verbatim).
    Other(String),
}

impl MirrorStatusState {
    /// Every named value (without `Other`).
    pub const NAMED: [MirrorStatusState; 9] = [
        Self::Empty,
        Self::Promoted,
        Self::Promoting,
        Self::Established,
        Self::Establishing,
        Self::Reestablished,
        Self::Reestablishing,
        Self::Failed,
        Self::Invalid,
    ];

    /// The string Trident uses.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Empty => "",
            Self::Promoted => "promoted",
            Self::Promoting => "promoting",
            Self::Established => "established",
            Self::Establishing => "establishing",
            Self::Reestablished => "reestablished",
            Self::Reestablishing => "reestablishing",
            Self::Failed => "failed",
            Self::Invalid => "invalid",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for MirrorStatusState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "" => Self::Empty,
            "promoted" => Self::Promoted,
            "promoting" => Self::Promoting,
            "established" => Self::Established,
            "establishing" => Self::Establishing,
            "reestablished" => Self::Reestablished,
            "reestablishing" => Self::Reestablishing,
            "failed" => Self::Failed,
            "invalid" => Self::Invalid,
            _ => Self::Other(s),
        }
    }
}

impl From<MirrorStatusState> for String {
    fn from(s: MirrorStatusState) -> Self {
        s.as_str().to_string()
    }
}

/// `spec` of a TridentMirrorRelationship: one end of one SnapMirror relationship.
///
/// Trident's Go type has no `omitempty`: every string is written, `""` when unset.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "trident.netapp.io",
    version = "v1",
    kind = "TridentMirrorRelationship",
    plural = "tridentmirrorrelationships",
    shortname = "tmr",
    namespaced,
    status = "TridentMirrorRelationshipStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct TridentMirrorRelationshipSpec {
    /// Desired state of this end.
    #[serde(default)]
    pub state: MirrorState,
    /// ONTAP SnapMirror policy (fixed once in status, except when promoting).
    #[serde(default)]
    pub replication_policy: String,
    /// ONTAP job schedule (fixed once in status, except when promoting).
    #[serde(default)]
    pub replication_schedule: String,
    /// Exactly one mapping (CRD minItems 1, maxItems 1).
    #[serde(deserialize_with = "null_as_default")]
    pub volume_mappings: Vec<TridentVolumeMapping>,
}

/// `spec.volumeMappings[]` of a TridentMirrorRelationship.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TridentVolumeMapping {
    /// Remote volume as `<svm>:<volume internal name>`; needed for (re)established, immutable once set.
    #[serde(default)]
    pub remote_volume_handle: String,
    /// The local PVC (immutable).
    #[serde(rename = "localPVCName")]
    pub local_pvc_name: String,
    /// Snapshot to wait for before promoting (planned failover); only with `promoted`.
    #[serde(default)]
    pub promoted_snapshot_handle: String,
}

/// `status` of a TridentMirrorRelationship: one condition per mapping.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TridentMirrorRelationshipStatus {
    /// Per-mapping state (Go writes `null` when empty).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub conditions: Vec<TridentMirrorCondition>,
}

/// `status.conditions[]` of a TridentMirrorRelationship.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TridentMirrorCondition {
    /// Reached state (`promoted`, `establishing`, `failed`, ...).
    #[serde(default)]
    pub state: MirrorStatusState,
    /// Trident's explanation.
    #[serde(default)]
    pub message: String,
    /// When the state last changed (free-form string upstream).
    #[serde(default)]
    pub last_transition_time: String,
    /// TMR generation this condition describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// The local PVC.
    #[serde(default, rename = "localPVCName")]
    pub local_pvc_name: String,
    /// Local volume as `<svm>:<name>` (what the peer uses as its remote handle).
    #[serde(default)]
    pub local_volume_handle: String,
    /// Remote volume as `<svm>:<name>`.
    #[serde(default)]
    pub remote_volume_handle: String,
    /// Policy in effect.
    #[serde(default)]
    pub replication_policy: String,
    /// Schedule in effect.
    #[serde(default)]
    pub replication_schedule: String,
}

/// `spec` of a TridentActionMirrorUpdate: one SnapMirror transfer now, for an (re)established TMR.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "trident.netapp.io",
    version = "v1",
    kind = "TridentActionMirrorUpdate",
    plural = "tridentactionmirrorupdates",
    shortname = "tamu",
    namespaced,
    status = "TridentActionMirrorUpdateStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct TridentActionMirrorUpdateSpec {
    /// The TMR to update.
    #[serde(default)]
    pub trident_mirror_relationship_name: String,
    /// Snapshot to transfer (`""`: a new one).
    #[serde(default)]
    pub snapshot_handle: String,
}

/// `status` of a TridentActionMirrorUpdate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TridentActionMirrorUpdateStatus {
    /// Local volume handle.
    #[serde(default)]
    pub local_volume_handle: String,
    /// Remote volume handle.
    #[serde(default)]
    pub remote_volume_handle: String,
    /// Snapshot transferred.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot_handle: String,
    /// `Succeeded`, `In progress` or `Failed`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// Trident's explanation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the action finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// When the previous transfer ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_transfer_time: Option<Time>,
}

/// `status.state` values of a TridentActionMirrorUpdate.
pub mod tamu_state {
    /// The transfer finished.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The transfer runs.
    pub const IN_PROGRESS: &str = "In progress";
    /// The transfer failed.
    pub const FAILED: &str = "Failed";
}

// ---------------------------------------------------------------------------
// Dell
// ---------------------------------------------------------------------------

/// `spec` of a DellCSIReplicationGroup (cluster scoped): one protection group on one side.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "replication.storage.dell.com",
    version = "v1",
    kind = "DellCSIReplicationGroup",
    plural = "dellcsireplicationgroups",
    shortname = "rg",
    status = "DellCSIReplicationGroupStatus",
    schema = "disabled",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct DellCSIReplicationGroupSpec {
    /// CSI driver name.
    pub driver_name: String,
    /// DellCSIReplicationGroup parameters class, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_parameters_class: String,
    /// One-shot verb; the sidecar clears it when done (required by the CRD: `""` = none).
    pub action: String,
    /// Remote cluster id (`self` for single-cluster replication).
    pub remote_cluster_id: String,
    /// Local protection group id.
    pub protection_group_id: String,
    /// Local protection group attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub protection_group_attributes: BTreeMap<String, String>,
    /// Remote protection group id.
    pub remote_protection_group_id: String,
    /// Remote protection group attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub remote_protection_group_attributes: BTreeMap<String, String>,
}

/// `status` of a DellCSIReplicationGroup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DellCSIReplicationGroupStatus {
    /// `""`, `Ready`, `<ACTION>_IN_PROGRESS`, `Error`, `Invalid` or `Deleting`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// Unused upstream.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub remote_state: String,
    /// Polled link state (a struct in Go, so always written).
    #[serde(default)]
    pub replication_link_state: ReplicationLinkState,
    /// Result of the last action (a struct in Go, so always written).
    #[serde(default)]
    pub last_action: LastAction,
    /// Recent action results (at most 20).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub conditions: Vec<LastAction>,
}

/// `status.replicationLinkState` of a DellCSIReplicationGroup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationLinkState {
    /// `SYNCHRONIZED`, `SYNC_IN_PROGRESS`, `SUSPENDED`, `FAILEDOVER`, `INVALID`, `UNKNOWN`, `EMPTY`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    /// True when this side is the replication source (required by the CRD).
    pub is_source: bool,
    /// When the link state was last polled successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_update: Option<Time>,
    /// Last polling error.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_message: String,
}

/// `status.lastAction` (and `status.conditions[]`) of a DellCSIReplicationGroup.
///
/// The Go type also has `actionAttributes`, but the served CRD (v1.14.0) lacks
/// it, so the API server prunes it and it is not modelled.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastAction {
    /// `Action X succeeded` or `Action X failed with error ...`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub condition: String,
    /// First time this action failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<Time>,
    /// When the result was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// Error text of a failure.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_message: String,
}

/// RG annotation where the Dell sidecar records the action it ran (JSON).
pub const DELL_ACTION_ANNOTATION: &str = "Action";

/// Value of [`DELL_ACTION_ANNOTATION`], written by the Dell sidecar when it clears `spec.action`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DellActionAnnotation {
    /// The verb.
    #[serde(default)]
    pub name: String,
    /// True once the verb finished (success or final error).
    #[serde(default)]
    pub completed: bool,
    /// The final error, `""` on success.
    #[serde(default)]
    pub final_error: String,
    /// JSON of the finish time.
    #[serde(default)]
    pub finish_time: String,
    /// JSON of the protection group status the driver returned.
    #[serde(default)]
    pub protection_group_status: String,
}

impl DellCSIReplicationGroup {
    /// The sidecar's record of the last action, if present and readable.
    pub fn sidecar_action(&self) -> Option<DellActionAnnotation> {
        let raw = self
            .metadata
            .annotations
            .as_ref()?
            .get(DELL_ACTION_ANNOTATION)?;
        serde_json::from_str(raw).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_duration_formats_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_micros(1), "1µs"),
            (Duration::from_nanos(10), "10ns"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_secs(3723), "1h2m3s"),
        ];
        for (d, s) in cases {
            assert_eq!(GoDuration::from_std(d).0, s);
            assert_eq!(GoDuration(s.into()).to_std(), Ok(d), "{s}");
        }
        assert_eq!(
            GoDuration("1.5h".into()).to_std(),
            Ok(Duration::from_secs(5400))
        );
        assert!(GoDuration("-1s".into()).to_std().is_err());
        assert!(GoDuration("10".into()).to_std().is_err());
        assert!(GoDuration("1x".into()).to_std().is_err());
    }

    #[test]
    fn vr_spec_writes_empty_replication_handle_and_auto_resync() {
        let spec = VolumeReplicationSpec {
            volume_replication_class: "c".into(),
            replication_state: ReplicationState::Secondary,
            data_source: TypedLocalObjectReference {
                api_group: None,
                kind: "PersistentVolumeClaim".into(),
                name: "p".into(),
            },
            auto_resync: false,
            replication_handle: String::new(),
        };
        let v = serde_json::to_value(&spec).expect("serialize");
        assert_eq!(v["replicationHandle"], "");
        assert_eq!(v["autoResync"], false);
        assert_eq!(v["replicationState"], "secondary");
        // autoResync may be missing on read (older objects): the CRD default applies.
        let back: VolumeReplicationSpec = serde_json::from_value(serde_json::json!({
            "volumeReplicationClass": "c", "replicationState": "primary",
            "dataSource": {"kind": "PersistentVolumeClaim", "name": "p"}
        }))
        .expect("deserialize");
        assert!(!back.auto_resync);
        assert_eq!(back.replication_handle, "");
    }

    #[test]
    fn status_state_reads_unknown_text_as_unknown() {
        let s: VolumeReplicationStatus =
            serde_json::from_value(serde_json::json!({"state": "Weird", "conditions": null}))
                .expect("deserialize");
        assert_eq!(s.state, Some(ReplicatedState::Unknown));
        assert!(s.conditions.is_empty());
        assert_eq!(
            serde_json::to_value(VolumeReplicationStatus::default()).expect("serialize"),
            serde_json::json!({})
        );
    }

    #[test]
    fn vgr_status_inlines_vr_status() {
        let s = VolumeGroupReplicationStatus {
            replication: VolumeReplicationStatus {
                state: Some(ReplicatedState::Primary),
                observed_generation: 3,
                ..Default::default()
            },
            persistent_volume_claims_ref_list: vec![LocalObjectReference { name: "a".into() }],
        };
        let v = serde_json::to_value(&s).expect("serialize");
        assert_eq!(
            v,
            serde_json::json!({"state": "Primary", "observedGeneration": 3,
                "persistentVolumeClaimsRefList": [{"name": "a"}]})
        );
        assert_eq!(
            serde_json::from_value::<VolumeGroupReplicationStatus>(v).expect("deserialize"),
            s
        );
    }

    #[test]
    fn class_parameters_presence_is_kept() {
        let with_empty: VolumeReplicationClassSpec =
            serde_json::from_value(serde_json::json!({"provisioner": "p", "parameters": {}}))
                .expect("deserialize");
        assert_eq!(
            serde_json::to_value(&with_empty).expect("serialize")["parameters"],
            serde_json::json!({})
        );
    }

    #[test]
    fn trident_spec_writes_every_string_like_go() {
        let spec = TridentMirrorRelationshipSpec {
            state: MirrorState::Promoted,
            volume_mappings: vec![TridentVolumeMapping {
                local_pvc_name: "db".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&spec).expect("serialize"),
            serde_json::json!({"state": "promoted", "replicationPolicy": "",
                "replicationSchedule": "", "volumeMappings": [{"remoteVolumeHandle": "",
                "localPVCName": "db", "promotedSnapshotHandle": ""}]})
        );
        let st: TridentMirrorRelationshipStatus =
            serde_json::from_value(serde_json::json!({"conditions": [{"state": "weird"}]}))
                .expect("deserialize");
        assert_eq!(
            st.conditions[0].state,
            MirrorStatusState::Other("weird".into())
        );
    }

    #[test]
    fn dell_status_reads_sidecar_shapes() {
        let rg: DellCSIReplicationGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "replication.storage.dell.com/v1", "kind": "DellCSIReplicationGroup",
            "metadata": {"name": "rg-1", "annotations": {"Action":
                "{\"name\":\"SYNC\",\"completed\":true,\"finalError\":\"\",\"finishTime\":\"\\\"2026-01-01T00:00:00Z\\\"\",\"protectionGroupStatus\":\"\"}"}},
            "spec": {"driverName": "csi-powerstore.dellemc.com", "action": "",
                "remoteClusterId": "self", "protectionGroupId": "pg", "remoteProtectionGroupId": "rpg"},
            "status": {"state": "Ready", "replicationLinkState": {"state": "SYNCHRONIZED", "isSource": true},
                "lastAction": {"condition": "Action SYNC succeeded", "actionAttributes": {"x": "y"}}}
        }))
        .expect("deserialize");
        let action = rg.sidecar_action().expect("annotation");
        assert_eq!(action.name, "SYNC");
        assert!(action.completed);
        let status = rg.status.expect("status");
        assert!(status.replication_link_state.is_source);
        assert_eq!(status.last_action.condition, "Action SYNC succeeded");
    }
}
