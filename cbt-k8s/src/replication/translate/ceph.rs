//! Ceph RBD: ceph-csi serves the csi-addons replication API itself.
//!
//! Owns: recognising ceph-csi RBD drivers and checking the class parameters
//! ceph-csi reads (contracts §8.3), so a mistake is reported as an event before
//! ceph-csi fails on it. It must never write: no backend objects (there are
//! none; the csi-addons controller calls ceph-csi over gRPC) and no status
//! (the csi-addons controller owns it). Double-driving a Ceph volume is
//! impossible by construction: every Ceph plan has no writes and no status.

use super::{Backend, ClassView, Event, EventType, Plan, Rejection, Request, SubjectKind};

/// ceph-csi's default RBD driver name (Rook prefixes it: `<namespace>.rbd.csi.ceph.com`).
pub const DRIVER: &str = "rbd.csi.ceph.com";

/// Class parameters ceph-csi reads for replication.
pub mod params {
    /// `snapshot` (default) or `journal`.
    pub const MIRRORING_MODE: &str = "mirroringMode";
    /// `<n>m`, `<n>h` or `<n>d` (snapshot mode only).
    pub const SCHEDULING_INTERVAL: &str = "schedulingInterval";
    /// ISO 8601 start time (only with an interval).
    pub const SCHEDULING_START_TIME: &str = "schedulingStartTime";
    /// `never` (default) or `force`.
    pub const FLATTEN_MODE: &str = "flattenMode";
    /// `true` or `false` (force on disable).
    pub const FORCE: &str = "force";
    /// Ceph cluster id (group classes).
    pub const CLUSTER_ID: &str = "clusterID";
    /// RBD pool (group classes).
    pub const POOL: &str = "pool";
}

/// True for ceph-csi RBD driver names (`rbd.csi.ceph.com`, `<prefix>.rbd.csi.ceph.com`).
pub fn is_rbd_driver(provisioner: &str) -> bool {
    provisioner == DRIVER
        || provisioner
            .strip_suffix(DRIVER)
            .is_some_and(|p| p.ends_with('.') && p.len() > 1)
}

/// Checks a Ceph subject and its class; reports problems as events, writes nothing.
pub fn plan(req: &Request, class: &ClassView) -> Plan {
    let rejection = check(req, class).err();
    let events = rejection
        .iter()
        .map(|r| Event {
            type_: EventType::Warning,
            reason: "InvalidCephReplication".into(),
            message: r.to_string(),
        })
        .collect();
    Plan {
        backend: Some(Backend::CephRbd),
        writes: Vec::new(),
        status: None,
        events,
        rejection,
        deletion_complete: req.subject.deleting,
    }
}

/// The first problem ceph-csi would hit with this subject and class.
///
/// # Errors
/// The [`Rejection`] describing it.
pub fn check(req: &Request, class: &ClassView) -> Result<(), Rejection> {
    let s = &req.subject;
    if s.kind == SubjectKind::Group && s.external {
        return Err(Rejection::ExternalOnCeph {
            class: class.name.clone(),
        });
    }
    let invalid = |key: &str, value: &str, expected: &str| Rejection::InvalidParameter {
        class: class.name.clone(),
        key: key.into(),
        value: value.into(),
        expected: expected.into(),
    };
    let mode = class.param(params::MIRRORING_MODE).unwrap_or("snapshot");
    if !matches!(mode, "snapshot" | "journal") {
        return Err(invalid(params::MIRRORING_MODE, mode, "snapshot or journal"));
    }
    let interval = class.param(params::SCHEDULING_INTERVAL);
    if let Some(i) = interval {
        let ok = i
            .strip_suffix(['m', 'h', 'd'])
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(invalid(
                params::SCHEDULING_INTERVAL,
                i,
                "<number> followed by m, h or d (e.g. 5m)",
            ));
        }
        if mode == "journal" {
            return Err(invalid(
                params::SCHEDULING_INTERVAL,
                i,
                "no interval with mirroringMode journal (schedules are for snapshot mode)",
            ));
        }
    }
    if let Some(t) = class.param(params::SCHEDULING_START_TIME)
        && interval.is_none()
    {
        return Err(invalid(
            params::SCHEDULING_START_TIME,
            t,
            "a start time only together with schedulingInterval",
        ));
    }
    if let Some(f) = class.param(params::FLATTEN_MODE)
        && !matches!(f, "never" | "force")
    {
        return Err(invalid(params::FLATTEN_MODE, f, "never or force"));
    }
    if let Some(f) = class.param(params::FORCE)
        && !matches!(f, "true" | "false")
    {
        return Err(invalid(params::FORCE, f, "true or false"));
    }
    if s.kind == SubjectKind::Group {
        for key in [params::CLUSTER_ID, params::POOL] {
            if class.param(key).is_none() {
                return Err(Rejection::MissingParameter {
                    class: class.name.clone(),
                    key: key.into(),
                    why: "ceph-csi needs the Ceph cluster and pool to make a volume group".into(),
                });
            }
        }
    }
    Ok(())
}
