//! The Kubernetes API permissions `cbt backup --pvc` and `cbt restore --to-pvc` use, as data:
//! one list that `cbt doctor` asks SelfSubjectAccessReviews about and the tests compare with
//! the requests the flows really make (so a new API call without a new entry, or a stale
//! entry, fails a test). The mover's own identity is not here: it makes no API request, and
//! what the metadata sidecar asks about it is [`MOVER_PERMISSION`].

use serde::Serialize;

/// Where a permission applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// In the namespace of the PVCs (a Role is enough).
    Namespace,
    /// Cluster-scoped resources (needs a ClusterRole).
    Cluster,
}

/// Whether a flow fails without a permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Need {
    /// The flow fails (403) without it.
    Required,
    /// The flow degrades without it (e.g. polls instead of watching, or loses a log tail).
    Optional,
}

/// One verb on one resource that a flow uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Permission {
    /// API verb (get, list, watch, create, delete).
    pub verb: &'static str,
    /// API group ("" for core).
    pub group: &'static str,
    /// Plural resource.
    pub resource: &'static str,
    /// Subresource ("" for none), e.g. `log`.
    pub subresource: &'static str,
    /// Namespace or cluster scope.
    pub scope: Scope,
    /// What happens without it.
    pub need: Need,
    /// What it is used for.
    pub used_for: &'static str,
}

impl Permission {
    /// `resource[/subresource][.group]` as `kubectl auth can-i` takes it.
    pub fn resource_name(&self) -> String {
        let base = if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        if self.subresource.is_empty() {
            base
        } else {
            format!("{base}/{}", self.subresource)
        }
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource_name())?;
        if self.scope == Scope::Cluster {
            f.write_str(" (cluster-wide)")?;
        }
        Ok(())
    }
}

const fn p(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    scope: Scope,
    need: Need,
    used_for: &'static str,
) -> Permission {
    Permission {
        verb,
        group,
        resource,
        subresource: "",
        scope,
        need,
        used_for,
    }
}

const SNAP: &str = "snapshot.storage.k8s.io";
const NS: Scope = Scope::Namespace;
const CLUSTER: Scope = Scope::Cluster;
const REQ: Need = Need::Required;

/// Every permission the identity running `cbt backup --pvc` / `cbt restore --to-pvc` uses
/// (the orchestrator; the data mover runs as its own ServiceAccount).
pub const ORCHESTRATOR_PERMISSIONS: &[Permission] = &[
    p(
        "get",
        "",
        "persistentvolumeclaims",
        NS,
        REQ,
        "read the PVC to back up; refuse restoring over an existing one",
    ),
    p(
        "list",
        "",
        "persistentvolumeclaims",
        NS,
        REQ,
        "backup --selector",
    ),
    p(
        "create",
        "",
        "persistentvolumeclaims",
        NS,
        REQ,
        "the temporary source PVC from the snapshot; the restore target",
    ),
    p(
        "delete",
        "",
        "persistentvolumeclaims",
        NS,
        REQ,
        "remove the temporary source PVC (and a failed restore target)",
    ),
    p(
        "get",
        "",
        "persistentvolumes",
        CLUSTER,
        REQ,
        "the bound PV's CSI driver and volume handle",
    ),
    p(
        "get",
        "cbt.storage.k8s.io",
        "snapshotmetadataservices",
        CLUSTER,
        REQ,
        "find the driver's metadata sidecar",
    ),
    p(
        "list",
        SNAP,
        "volumesnapshotclasses",
        CLUSTER,
        REQ,
        "find the driver's default snapshot class",
    ),
    p(
        "get",
        SNAP,
        "volumesnapshotclasses",
        CLUSTER,
        REQ,
        "check a class named with --snapshot-class",
    ),
    p(
        "create",
        SNAP,
        "volumesnapshots",
        NS,
        REQ,
        "cut the snapshot",
    ),
    p(
        "get",
        SNAP,
        "volumesnapshots",
        NS,
        REQ,
        "wait for readyToUse",
    ),
    p(
        "watch",
        SNAP,
        "volumesnapshots",
        NS,
        Need::Optional,
        "wait for readyToUse without polling",
    ),
    p(
        "list",
        SNAP,
        "volumesnapshots",
        NS,
        REQ,
        "retention of the snapshots cbt cut",
    ),
    p(
        "delete",
        SNAP,
        "volumesnapshots",
        NS,
        REQ,
        "retention; remove the snapshot of a failed backup",
    ),
    p(
        "get",
        SNAP,
        "volumesnapshotcontents",
        CLUSTER,
        REQ,
        "the snapshot's CSI handle",
    ),
    p("create", "batch", "jobs", NS, REQ, "run the data mover"),
    p("get", "batch", "jobs", NS, REQ, "follow the data mover"),
    p("delete", "batch", "jobs", NS, REQ, "remove the data mover"),
    p(
        "list",
        "",
        "pods",
        NS,
        REQ,
        "follow the data mover's pod and read its report",
    ),
    Permission {
        verb: "get",
        group: "",
        resource: "pods",
        subresource: "log",
        scope: NS,
        need: Need::Optional,
        used_for: "the log tail of a failed data mover",
    },
];

/// What the metadata sidecar checks (SubjectAccessReview) for the mover's token on every call:
/// `get volumesnapshots` in the snapshot's namespace.
pub const MOVER_PERMISSION: Permission = p(
    "get",
    SNAP,
    "volumesnapshots",
    NS,
    REQ,
    "the sidecar's SubjectAccessReview of the mover's token",
);

/// One RBAC rule granting `p` (JSON, as in a Role or ClusterRole).
fn rule(p: &Permission) -> serde_json::Value {
    serde_json::json!({
        "apiGroups": [p.group],
        "resources": [if p.subresource.is_empty() {
            p.resource.to_string()
        } else {
            format!("{}/{}", p.resource, p.subresource)
        }],
        "verbs": [p.verb],
    })
}

/// Least-privilege RBAC objects granting `permissions` to `subject` (a binding subject, e.g.
/// `{"kind": "ServiceAccount", "name": "backup", "namespace": "ops"}`): a Role and RoleBinding
/// named `name` in `namespace` for the namespaced ones, a ClusterRole and ClusterRoleBinding
/// named `name` for the cluster-scoped ones (omitted when there are none).
pub fn rbac_objects(
    permissions: &[Permission],
    namespace: &str,
    name: &str,
    subject: &serde_json::Value,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for scope in [Scope::Namespace, Scope::Cluster] {
        let rules: Vec<serde_json::Value> = permissions
            .iter()
            .filter(|p| p.scope == scope)
            .map(rule)
            .collect();
        if rules.is_empty() {
            continue;
        }
        let (role_kind, binding_kind) = match scope {
            Scope::Namespace => ("Role", "RoleBinding"),
            Scope::Cluster => ("ClusterRole", "ClusterRoleBinding"),
        };
        let mut meta = serde_json::json!({"name": name});
        if scope == Scope::Namespace {
            meta["namespace"] = serde_json::json!(namespace);
        }
        out.push(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": role_kind,
            "metadata": meta, "rules": rules,
        }));
        out.push(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": binding_kind,
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
            "subjects": [subject],
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_read_like_kubectl() {
        let log = ORCHESTRATOR_PERMISSIONS
            .iter()
            .find(|p| p.subresource == "log")
            .map(ToString::to_string);
        assert_eq!(log.as_deref(), Some("get pods/log"));
        assert_eq!(
            MOVER_PERMISSION.to_string(),
            "get volumesnapshots.snapshot.storage.k8s.io"
        );
        assert_eq!(
            ORCHESTRATOR_PERMISSIONS[4].to_string(),
            "get persistentvolumes (cluster-wide)"
        );
    }

    #[test]
    fn rbac_objects_split_by_scope() {
        let sa = serde_json::json!({"kind": "ServiceAccount", "name": "b", "namespace": "ops"});
        let objs = rbac_objects(ORCHESTRATOR_PERMISSIONS, "db", "cbt", &sa);
        let kinds: Vec<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"]
        );
        assert_eq!(objs[0]["metadata"]["namespace"], "db");
        assert!(objs[2]["metadata"].get("namespace").is_none());
        assert!(
            objs[0]["rules"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["resources"][0] == "pods/log"))
        );
        let mover = rbac_objects(&[MOVER_PERMISSION], "db", "m", &sa);
        assert_eq!(mover.len(), 2);
    }

    #[test]
    fn no_permission_is_listed_twice() {
        let mut keys: Vec<_> = ORCHESTRATOR_PERMISSIONS
            .iter()
            .map(|p| (p.verb, p.group, p.resource, p.subresource))
            .collect();
        keys.sort();
        let n = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), n);
    }
}
