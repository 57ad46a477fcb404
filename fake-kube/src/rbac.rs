//! RBAC authorization as the API server does it (`rbac.authorization.k8s.io/v1`):
//! who a request comes from ([`UserInfo`]), what it asks for ([`RequestAttributes`],
//! derived from method, path and query exactly like the apiserver's RequestInfo), and
//! whether a set of Roles, ClusterRoles and bindings ([`Policy`]) allows it
//! ([`Policy::allows`]).
//!
//! Pure: no HTTP and no store. `server` asks it about every request when a policy is
//! loaded and answers a denial with [`forbidden`]; anything else that needs "may X do Y"
//! (a SelfSubjectAccessReview, a test comparing manifests with requests) calls it directly.
//!
//! Semantics kept: apiGroups, resources with `resource/subresource` and `*/subresource`,
//! verbs with `*`, resourceNames, nonResourceURLs with a trailing `*`, Roles only in their
//! namespace, a RoleBinding that references a ClusterRole granting it in the binding's
//! namespace only, User/Group/ServiceAccount subjects (a ServiceAccount subject without a
//! namespace means the binding's), and the `system:masters` group bypassing RBAC.
//! The bootstrap grants every real cluster has for authenticated users (discovery, and
//! "may I" reviews) apply on top of any loaded policy ([`bootstrap_allows`]).
//! Not simulated: aggregated ClusterRoles (`aggregationRule`), escalation checks on
//! writes to RBAC objects, impersonation.

use serde_json::Value;

/// The group whose members the apiserver never denies (cluster-admin by construction).
pub const SUPERUSER_GROUP: &str = "system:masters";
/// Group of every authenticated user.
pub const AUTHENTICATED_GROUP: &str = "system:authenticated";

/// An authenticated identity: a user name and its groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    /// User name, e.g. `system:serviceaccount:snapshift:snapshift`.
    pub name: String,
    /// Groups, e.g. `system:serviceaccounts`.
    pub groups: Vec<String>,
}

impl UserInfo {
    /// A user with these groups (plus `system:authenticated`, which every token user has).
    pub fn new(name: &str, groups: &[&str]) -> Self {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        if !groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
            groups.push(AUTHENTICATED_GROUP.to_string());
        }
        Self {
            name: name.to_string(),
            groups,
        }
    }

    /// The identity a ServiceAccount token authenticates as, with the groups the apiserver adds.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self::new(
            &format!("system:serviceaccount:{namespace}:{name}"),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{namespace}"),
            ],
        )
    }

    /// A cluster administrator (`system:masters`), never denied.
    pub fn admin() -> Self {
        Self::new("system:admin", &[SUPERUSER_GROUP])
    }

    /// True if RBAC is bypassed for this user.
    pub fn is_superuser(&self) -> bool {
        self.groups.iter().any(|g| g == SUPERUSER_GROUP)
    }
}

/// What a request asks for, in the terms RBAC rules are written in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestAttributes {
    /// True for `/api/...` and `/apis/...` resource paths; false for e.g. `/version`.
    pub resource_request: bool,
    /// get, list, watch, create, update, patch, delete, deletecollection
    /// (for non-resource requests: the lower-case HTTP method).
    pub verb: String,
    /// API group ("" for core).
    pub api_group: String,
    /// API version.
    pub api_version: String,
    /// Plural resource, e.g. `volumesnapshots`.
    pub resource: String,
    /// Subresource, e.g. `status`; empty if none.
    pub subresource: String,
    /// Namespace; empty for cluster-scoped requests.
    pub namespace: String,
    /// Object name; empty for collections (unless a list/watch selects one by `metadata.name`).
    pub name: String,
    /// URL path (what nonResourceURLs match).
    pub path: String,
}

// Go's strconv.ParseBool, which the apiserver uses for `watch`.
fn parse_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

impl RequestAttributes {
    /// A resource request, e.g. `("get", "", "persistentvolumeclaims", "dr", "data")`.
    pub fn resource(
        verb: &str,
        api_group: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Self {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        Self {
            resource_request: true,
            verb: verb.to_string(),
            api_group: api_group.to_string(),
            api_version: String::new(),
            resource: resource.to_string(),
            subresource: subresource.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            path: String::new(),
        }
    }

    /// Derives the attributes of an HTTP request the way the apiserver's RequestInfoFactory does:
    /// GET on an item is `get`, on a collection `list`, or `watch` with `watch=true`; POST is
    /// `create`, PUT `update`, PATCH `patch`, DELETE on an item `delete`, on a collection
    /// `deletecollection`. A list or watch selecting `metadata.name=<n>` carries that name.
    pub fn from_request(method: &str, path: &str, query: &str) -> Self {
        let verb = match method.to_ascii_uppercase().as_str() {
            "POST" => "create",
            "GET" | "HEAD" => "get",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            other => return Self::non_resource(&other.to_ascii_lowercase(), path),
        };
        let parts: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (api_group, api_version, rest) = match parts.as_slice() {
            ["api", version, rest @ ..] if !rest.is_empty() => ("", *version, rest),
            ["apis", group, version, rest @ ..] if !rest.is_empty() => (*group, *version, rest),
            _ => return Self::non_resource(&method.to_ascii_lowercase(), path),
        };
        let mut attrs = Self {
            resource_request: true,
            verb: verb.to_string(),
            api_group: api_group.to_string(),
            api_version: api_version.to_string(),
            path: path.to_string(),
            ..Self::default()
        };
        let mut rest: &[&str] = rest;
        // `namespaces/<ns>/status` and `/finalize` are subresources of the namespace itself.
        if rest[0] == "namespaces" && rest.len() > 1 {
            attrs.namespace = rest[1].to_string();
            if rest.len() > 2 && rest[2] != "status" && rest[2] != "finalize" {
                rest = &rest[2..];
            }
        }
        if rest.len() >= 3 {
            attrs.subresource = rest[2].to_string();
        }
        if rest.len() >= 2 {
            attrs.name = rest[1].to_string();
        }
        attrs.resource = rest[0].to_string();
        if attrs.name.is_empty() && attrs.verb == "get" {
            let watch = crate::server::query_param(query, "watch").is_some_and(|v| parse_bool(&v));
            attrs.verb = if watch { "watch" } else { "list" }.to_string();
            if let Some(fields) = crate::server::query_param(query, "fieldSelector") {
                let exact: Vec<&str> = fields
                    .split(',')
                    .filter_map(|f| {
                        let f = f.trim();
                        f.strip_prefix("metadata.name==")
                            .or_else(|| f.strip_prefix("metadata.name="))
                    })
                    .collect();
                if let [name] = exact.as_slice()
                    && !name.is_empty()
                    && !name.contains('/')
                {
                    attrs.name = name.to_string();
                }
            }
        }
        if attrs.name.is_empty() && attrs.verb == "delete" {
            attrs.verb = "deletecollection".to_string();
        }
        attrs
    }

    fn non_resource(verb: &str, path: &str) -> Self {
        Self {
            resource_request: false,
            verb: verb.to_string(),
            path: path.to_string(),
            ..Self::default()
        }
    }

    /// `resource` or `resource/subresource`, as rules name it.
    pub fn combined_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// One rule of a Role or ClusterRole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    /// Verbs (`*` = all).
    pub verbs: Vec<String>,
    /// API groups (`""` = core, `*` = all).
    pub api_groups: Vec<String>,
    /// Resources, `resource/subresource`, `*/subresource` or `*`.
    pub resources: Vec<String>,
    /// Object names; empty = any.
    pub resource_names: Vec<String>,
    /// Non-resource URL paths, `*` suffix = prefix match.
    pub non_resource_urls: Vec<String>,
}

fn has(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

impl PolicyRule {
    /// The one `(api group, resource, verb)` of a rule written in the shape least-privilege
    /// manifests keep to: one group, one resource and one verb, no wildcard, no resource names
    /// and no non-resource URLs. `None` for any other rule.
    pub fn single_grant(&self) -> Option<(&str, &str, &str)> {
        let ([group], [resource], [verb]) = (
            self.api_groups.as_slice(),
            self.resources.as_slice(),
            self.verbs.as_slice(),
        ) else {
            return None;
        };
        let wildcard = [group, resource, verb].iter().any(|v| v.contains('*'));
        (!wildcard && self.resource_names.is_empty() && self.non_resource_urls.is_empty())
            .then_some((group.as_str(), resource.as_str(), verb.as_str()))
    }

    /// True if this rule grants the request (the apiserver's `RuleAllows`).
    pub fn allows(&self, attrs: &RequestAttributes) -> bool {
        if !has(&self.verbs, &attrs.verb) {
            return false;
        }
        if !attrs.resource_request {
            return self.non_resource_urls.iter().any(|u| {
                u == "*"
                    || u == &attrs.path
                    || u.strip_suffix('*')
                        .is_some_and(|p| attrs.path.starts_with(p))
            });
        }
        let combined = attrs.combined_resource();
        let resource_ok = self.resources.iter().any(|r| {
            r == "*"
                || *r == combined
                || (!attrs.subresource.is_empty() && *r == format!("*/{}", attrs.subresource))
        });
        has(&self.api_groups, &attrs.api_group)
            && resource_ok
            && (self.resource_names.is_empty() || self.resource_names.contains(&attrs.name))
    }
}

/// A Role (namespaced) or a ClusterRole (`namespace` is `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// Name.
    pub name: String,
    /// Namespace of a Role; `None` for a ClusterRole.
    pub namespace: Option<String>,
    /// Its rules.
    pub rules: Vec<PolicyRule>,
}

/// Kind of a binding subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectKind {
    /// A user name.
    User,
    /// A group name.
    Group,
    /// A ServiceAccount (`namespace` defaults to the binding's).
    ServiceAccount,
}

/// Who a binding grants its role to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// User, Group or ServiceAccount.
    pub kind: SubjectKind,
    /// Name.
    pub name: String,
    /// Namespace (ServiceAccounts only).
    pub namespace: Option<String>,
}

impl Subject {
    fn applies_to(&self, user: &UserInfo, binding_namespace: Option<&str>) -> bool {
        match self.kind {
            SubjectKind::User => user.name == self.name,
            SubjectKind::Group => user.groups.contains(&self.name),
            SubjectKind::ServiceAccount => match self.namespace.as_deref().or(binding_namespace) {
                Some(ns) if !ns.is_empty() => {
                    user.name == format!("system:serviceaccount:{ns}:{}", self.name)
                }
                _ => false,
            },
        }
    }
}

/// A RoleBinding (namespaced) or a ClusterRoleBinding (`namespace` is `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Name.
    pub name: String,
    /// Namespace of a RoleBinding; `None` for a ClusterRoleBinding.
    pub namespace: Option<String>,
    /// True if `roleRef` names a ClusterRole, false for a Role.
    pub cluster_role: bool,
    /// `roleRef.name`.
    pub role: String,
    /// Who it applies to.
    pub subjects: Vec<Subject>,
}

/// A ServiceAccount declared alongside the RBAC objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// Why RBAC objects could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    /// The YAML does not parse.
    #[error("cannot parse RBAC manifests: {0}")]
    Yaml(String),
    /// An object lacks a field RBAC needs, or has one of the wrong type.
    #[error("{kind} {name:?}: {problem}")]
    Invalid {
        /// Kind of the object.
        kind: String,
        /// Its name (may be empty).
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// A set of RBAC objects: what the authorizer consults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Roles and ClusterRoles.
    pub roles: Vec<Role>,
    /// RoleBindings and ClusterRoleBindings.
    pub bindings: Vec<Binding>,
    /// ServiceAccounts found among the objects (not used for decisions).
    pub service_accounts: Vec<ServiceAccountRef>,
}

fn strings(obj: &Value, field: &str, kind: &str, name: &str) -> Result<Vec<String>, RbacError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| RbacError::Invalid {
                        kind: kind.to_string(),
                        name: name.to_string(),
                        problem: format!("{field} must be a list of strings"),
                    })
            })
            .collect(),
        Some(_) => Err(RbacError::Invalid {
            kind: kind.to_string(),
            name: name.to_string(),
            problem: format!("{field} must be a list"),
        }),
    }
}

impl Policy {
    /// No objects: allows nothing (except to superusers).
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every RBAC object of a (multi-document) YAML text; other kinds
    /// (Namespace, ServiceAccount, ...) are skipped, ServiceAccounts noted.
    ///
    /// # Errors
    /// Unparseable YAML or an RBAC object missing what the authorizer needs.
    pub fn from_yaml(text: &str) -> Result<Self, RbacError> {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| RbacError::Yaml(e.to_string()))?;
        let mut policy = Self::new();
        for doc in docs.iter().filter(|d| !d.is_null()) {
            policy.add_object(doc)?;
        }
        Ok(policy)
    }

    /// Every `(api group, resource[/subresource], verb)` the roles grant, spelled as written
    /// (wildcards stay `*`): compare with what an access log used to prove a manifest minimal.
    pub fn grants(&self) -> std::collections::BTreeSet<(String, String, String)> {
        let mut out = std::collections::BTreeSet::new();
        for rule in self.roles.iter().flat_map(|r| &r.rules) {
            for g in &rule.api_groups {
                for r in &rule.resources {
                    for v in &rule.verbs {
                        out.insert((g.clone(), r.clone(), v.clone()));
                    }
                }
            }
        }
        out
    }

    /// Whether any rule grants a wildcard group, resource or verb.
    pub fn has_wildcards(&self) -> bool {
        self.grants()
            .iter()
            .any(|(g, r, v)| g.contains('*') || r.contains('*') || v.contains('*'))
    }

    /// Adds the objects of another policy (e.g. a second manifest file).
    pub fn merge(mut self, other: Policy) -> Self {
        self.roles.extend(other.roles);
        self.bindings.extend(other.bindings);
        self.service_accounts.extend(other.service_accounts);
        self
    }

    /// Adds one object given as JSON (`kind: List` items included); non-RBAC kinds are skipped.
    ///
    /// # Errors
    /// An RBAC object missing what the authorizer needs.
    pub fn add_object(&mut self, obj: &Value) -> Result<(), RbacError> {
        let kind = obj["kind"].as_str().unwrap_or("");
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        let namespace = obj["metadata"]["namespace"].as_str().map(str::to_string);
        let invalid = |problem: &str| RbacError::Invalid {
            kind: kind.to_string(),
            name: name.clone(),
            problem: problem.to_string(),
        };
        match kind {
            "List" => {
                for item in obj["items"].as_array().into_iter().flatten() {
                    self.add_object(item)?;
                }
            }
            "ServiceAccount" => self.service_accounts.push(ServiceAccountRef {
                namespace: namespace.unwrap_or_else(|| "default".into()),
                name,
            }),
            "Role" | "ClusterRole" => {
                if name.is_empty() {
                    return Err(invalid("metadata.name is required"));
                }
                let namespace = if kind == "Role" {
                    Some(namespace.ok_or_else(|| {
                        invalid("a Role needs metadata.namespace (the apiserver would default it; manifests should say)")
                    })?)
                } else {
                    None
                };
                let mut rules = Vec::new();
                for rule in obj["rules"].as_array().into_iter().flatten() {
                    let rule = PolicyRule {
                        verbs: strings(rule, "verbs", kind, &name)?,
                        api_groups: strings(rule, "apiGroups", kind, &name)?,
                        resources: strings(rule, "resources", kind, &name)?,
                        resource_names: strings(rule, "resourceNames", kind, &name)?,
                        non_resource_urls: strings(rule, "nonResourceURLs", kind, &name)?,
                    };
                    if rule.verbs.is_empty() {
                        return Err(invalid("a rule without verbs"));
                    }
                    if rule.resources.is_empty() == rule.non_resource_urls.is_empty() {
                        return Err(invalid(
                            "a rule names either resources or nonResourceURLs, not both or neither",
                        ));
                    }
                    rules.push(rule);
                }
                self.roles.push(Role {
                    name,
                    namespace,
                    rules,
                });
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                let role_kind = obj["roleRef"]["kind"].as_str().unwrap_or("");
                let role = obj["roleRef"]["name"].as_str().unwrap_or("").to_string();
                if role.is_empty() || !matches!(role_kind, "Role" | "ClusterRole") {
                    return Err(invalid("roleRef needs kind Role or ClusterRole and a name"));
                }
                if kind == "ClusterRoleBinding" && role_kind == "Role" {
                    return Err(invalid(
                        "a ClusterRoleBinding can only reference a ClusterRole",
                    ));
                }
                let namespace = if kind == "RoleBinding" {
                    Some(
                        namespace
                            .ok_or_else(|| invalid("a RoleBinding needs metadata.namespace"))?,
                    )
                } else {
                    None
                };
                let mut subjects = Vec::new();
                for s in obj["subjects"].as_array().into_iter().flatten() {
                    let kind = match s["kind"].as_str() {
                        Some("User") => SubjectKind::User,
                        Some("Group") => SubjectKind::Group,
                        Some("ServiceAccount") => SubjectKind::ServiceAccount,
                        _ => {
                            return Err(invalid(
                                "subject kind must be User, Group or ServiceAccount",
                            ));
                        }
                    };
                    subjects.push(Subject {
                        kind,
                        name: s["name"].as_str().unwrap_or("").to_string(),
                        namespace: s["namespace"].as_str().map(str::to_string),
                    });
                }
                self.bindings.push(Binding {
                    name,
                    namespace,
                    cluster_role: role_kind == "ClusterRole",
                    role,
                    subjects,
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn role(&self, binding: &Binding) -> Option<&Role> {
        let namespace = if binding.cluster_role {
            None
        } else {
            binding.namespace.as_deref()
        };
        self.roles
            .iter()
            .find(|r| r.name == binding.role && r.namespace.as_deref() == namespace)
    }

    /// Every rule that applies to `user` for requests in `namespace` ("" = cluster scope):
    /// ClusterRoleBindings everywhere, RoleBindings only in their own namespace.
    pub fn rules_for<'a>(
        &'a self,
        user: &'a UserInfo,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a PolicyRule> + 'a {
        self.bindings
            .iter()
            .filter(move |b| match &b.namespace {
                None => true,
                Some(ns) => !namespace.is_empty() && ns == namespace,
            })
            .filter(move |b| {
                b.subjects
                    .iter()
                    .any(|s| s.applies_to(user, b.namespace.as_deref()))
            })
            .filter_map(move |b| self.role(b))
            .flat_map(|r| r.rules.iter())
    }

    /// True if `user` may do what `attrs` describes (superusers always may).
    pub fn allows(&self, user: &UserInfo, attrs: &RequestAttributes) -> bool {
        user.is_superuser()
            || self
                .rules_for(user, &attrs.namespace)
                .any(|rule| rule.allows(attrs))
    }
}

/// What every cluster grants every authenticated user through its bootstrap ClusterRoles,
/// whatever policy is loaded: `system:discovery` (GET on the discovery and version paths) and
/// `system:basic-user` (create SelfSubjectAccessReviews, SelfSubjectRulesReviews and
/// SelfSubjectReviews, i.e. "what may I do" and "who am I").
pub fn bootstrap_allows(user: &UserInfo, attrs: &RequestAttributes) -> bool {
    if !user.groups.iter().any(|g| g == AUTHENTICATED_GROUP) {
        return false;
    }
    if !attrs.resource_request {
        let p = attrs.path.trim_end_matches('/');
        return attrs.verb == "get"
            && (matches!(
                p,
                "/api" | "/apis" | "/version" | "/healthz" | "/livez" | "/readyz"
            ) || p.starts_with("/api/")
                || p.starts_with("/apis/"));
    }
    attrs.verb == "create"
        && attrs.subresource.is_empty()
        && matches!(
            (attrs.api_group.as_str(), attrs.resource.as_str()),
            (
                "authorization.k8s.io",
                "selfsubjectaccessreviews" | "selfsubjectrulesreviews"
            ) | ("authentication.k8s.io", "selfsubjectreviews")
        )
}

/// The apiserver's 403 answer for a denied request: a metav1.Status body with reason
/// `Forbidden` and its message shape, e.g. `persistentvolumeclaims "data" is forbidden:
/// User "u" cannot get resource "persistentvolumeclaims" in API group "" in the namespace "dr"`.
pub fn forbidden(user: &UserInfo, attrs: &RequestAttributes) -> Value {
    let detail = if !attrs.resource_request {
        format!(
            "User {:?} cannot {} path {:?}",
            user.name, attrs.verb, attrs.path
        )
    } else {
        let scope = if attrs.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace {:?}", attrs.namespace)
        };
        format!(
            "User {:?} cannot {} resource {:?} in API group {:?} {scope}",
            user.name,
            attrs.verb,
            attrs.combined_resource(),
            attrs.api_group
        )
    };
    let qualified = match (attrs.resource.as_str(), attrs.api_group.as_str()) {
        ("", _) => String::new(),
        (r, "") => r.to_string(),
        (r, g) => format!("{r}.{g}"),
    };
    let message = match (qualified.is_empty(), attrs.name.is_empty()) {
        (true, _) => format!("forbidden: {detail}"),
        (false, true) => format!("{qualified} is forbidden: {detail}"),
        (false, false) => format!("{qualified} {:?} is forbidden: {detail}", attrs.name),
    };
    let mut details = serde_json::json!({"group": attrs.api_group, "kind": attrs.resource});
    if !attrs.name.is_empty() {
        details["name"] = Value::String(attrs.name.clone());
    }
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": "Forbidden", "details": details, "code": 403,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: bot, namespace: tools}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: snap-reader}
rules:
  - apiGroups: [snapshot.storage.k8s.io]
    resources: [volumesnapshotcontents]
    verbs: [get]
  - apiGroups: [snapshot.storage.k8s.io]
    resources: [volumesnapshots, volumesnapshots/status]
    verbs: [get, list, watch]
  - nonResourceURLs: [/healthz, "/apis/*"]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: snap-reader}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: snap-reader}
subjects: [{kind: Group, name: "system:serviceaccounts:tools"}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: pvc-writer}
rules:
  - apiGroups: [""]
    resources: [persistentvolumeclaims]
    verbs: [create, get]
  - apiGroups: [""]
    resources: [configmaps]
    resourceNames: [settings]
    verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: pvc-writer, namespace: dr}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: pvc-writer}
subjects: [{kind: ServiceAccount, name: bot, namespace: tools}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: deleter, namespace: dr}
rules:
  - apiGroups: ["*"]
    resources: ["*/status"]
    verbs: [update]
  - apiGroups: [""]
    resources: [persistentvolumeclaims]
    verbs: [delete, deletecollection]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: deleter, namespace: dr}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: deleter}
subjects: [{kind: ServiceAccount, name: bot}]
"#;

    fn req(method: &str, path: &str, query: &str) -> RequestAttributes {
        RequestAttributes::from_request(method, path, query)
    }

    #[test]
    fn request_attributes_follow_the_apiserver() {
        let a = req(
            "GET",
            "/api/v1/namespaces/dr/persistentvolumeclaims/data",
            "",
        );
        assert_eq!(
            (a.verb.as_str(), a.api_group.as_str(), a.resource.as_str()),
            ("get", "", "persistentvolumeclaims")
        );
        assert_eq!((a.namespace.as_str(), a.name.as_str()), ("dr", "data"));
        let a = req(
            "GET",
            "/apis/snapshot.storage.k8s.io/v1/namespaces/dr/volumesnapshots",
            "labelSelector=a%3Db",
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("list", ""));
        let a = req(
            "GET",
            "/apis/snapshot.storage.k8s.io/v1/namespaces/dr/volumesnapshots",
            "watch=true&fieldSelector=metadata.name%3Ddb-snap&resourceVersion=7",
        );
        assert_eq!((a.verb.as_str(), a.name.as_str()), ("watch", "db-snap"));
        assert_eq!(a.api_group, "snapshot.storage.k8s.io");
        let a = req(
            "GET",
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents",
            "watch=1",
        );
        assert_eq!((a.verb.as_str(), a.namespace.as_str()), ("watch", ""));
        assert_eq!(
            req(
                "POST",
                "/api/v1/namespaces/dr/persistentvolumeclaims",
                "dryRun=All"
            )
            .verb,
            "create"
        );
        assert_eq!(
            req("PUT", "/api/v1/namespaces/dr/persistentvolumeclaims/x", "").verb,
            "update"
        );
        assert_eq!(
            req(
                "PATCH",
                "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/c",
                ""
            )
            .verb,
            "patch"
        );
        assert_eq!(
            req(
                "DELETE",
                "/api/v1/namespaces/dr/persistentvolumeclaims/x",
                ""
            )
            .verb,
            "delete"
        );
        assert_eq!(
            req("DELETE", "/api/v1/namespaces/dr/persistentvolumeclaims", "").verb,
            "deletecollection"
        );
        let a = req(
            "PUT",
            "/apis/snapshot.storage.k8s.io/v1/namespaces/dr/volumesnapshots/s/status",
            "",
        );
        assert_eq!(
            (a.resource.as_str(), a.subresource.as_str()),
            ("volumesnapshots", "status")
        );
        assert_eq!(a.combined_resource(), "volumesnapshots/status");
        // A namespace is its own namespace; its status is a subresource, not a resource.
        let a = req("GET", "/api/v1/namespaces/dr", "");
        assert_eq!(
            (a.resource.as_str(), a.name.as_str(), a.namespace.as_str()),
            ("namespaces", "dr", "dr")
        );
        let a = req("PUT", "/api/v1/namespaces/dr/status", "");
        assert_eq!(
            (a.resource.as_str(), a.subresource.as_str()),
            ("namespaces", "status")
        );
        let a = req("GET", "/api/v1/namespaces", "");
        assert_eq!((a.verb.as_str(), a.namespace.as_str()), ("list", ""));
        for path in ["/version", "/api", "/api/v1", "/apis/storage.k8s.io/v1"] {
            let a = req("GET", path, "");
            assert!(!a.resource_request, "{path}");
            assert_eq!(a.verb, "get");
        }
    }

    #[test]
    fn rules_bindings_and_scopes() {
        let policy = Policy::from_yaml(MANIFEST).unwrap();
        assert_eq!(policy.roles.len(), 3);
        assert_eq!(policy.bindings.len(), 3);
        assert_eq!(
            policy.service_accounts,
            [ServiceAccountRef {
                namespace: "tools".into(),
                name: "bot".into()
            }]
        );
        let bot = UserInfo::service_account("tools", "bot");
        let other = UserInfo::service_account("elsewhere", "bot");
        let allows = |u: &UserInfo, verb: &str, group: &str, res: &str, ns: &str, name: &str| {
            policy.allows(u, &RequestAttributes::resource(verb, group, res, ns, name))
        };
        const SNAP: &str = "snapshot.storage.k8s.io";
        // ClusterRoleBinding to a group: everywhere, cluster-scoped included.
        assert!(allows(&bot, "get", SNAP, "volumesnapshotcontents", "", "c"));
        assert!(allows(&bot, "watch", SNAP, "volumesnapshots", "any", ""));
        assert!(allows(
            &bot,
            "get",
            SNAP,
            "volumesnapshots/status",
            "any",
            "s"
        ));
        assert!(!allows(&bot, "create", SNAP, "volumesnapshots", "any", ""));
        assert!(
            !allows(&bot, "get", "", "volumesnapshotcontents", "", "c"),
            "group must match"
        );
        assert!(!allows(
            &other,
            "get",
            SNAP,
            "volumesnapshotcontents",
            "",
            "c"
        ));
        // RoleBinding to a ClusterRole: only in the binding's namespace.
        assert!(allows(
            &bot,
            "create",
            "",
            "persistentvolumeclaims",
            "dr",
            ""
        ));
        assert!(!allows(
            &bot,
            "create",
            "",
            "persistentvolumeclaims",
            "apps",
            ""
        ));
        assert!(
            !allows(&bot, "get", "", "persistentvolumeclaims", "", "x"),
            "not cluster-wide"
        );
        assert!(!allows(
            &bot,
            "list",
            "",
            "persistentvolumeclaims",
            "dr",
            ""
        ));
        // resourceNames: only that object, and never a nameless create or list.
        assert!(allows(&bot, "delete", "", "configmaps", "dr", "settings"));
        assert!(!allows(&bot, "delete", "", "configmaps", "dr", "other"));
        assert!(!allows(&bot, "list", "", "configmaps", "dr", ""));
        // A Role, and a ServiceAccount subject without namespace (the binding's).
        assert!(!allows(
            &bot,
            "delete",
            "",
            "persistentvolumeclaims",
            "dr",
            "x"
        ));
        let local = UserInfo::service_account("dr", "bot");
        assert!(allows(
            &local,
            "delete",
            "",
            "persistentvolumeclaims",
            "dr",
            "x"
        ));
        assert!(allows(
            &local,
            "deletecollection",
            "",
            "persistentvolumeclaims",
            "dr",
            ""
        ));
        assert!(
            allows(&local, "update", "apps", "deployments/status", "dr", "d"),
            "*/status"
        );
        assert!(!allows(&local, "update", "apps", "deployments", "dr", "d"));
        // Non-resource URLs, with prefix matching.
        let get = |path: &str| policy.allows(&bot, &req("GET", path, ""));
        assert!(get("/healthz") && get("/apis/storage.k8s.io/v1"));
        assert!(!get("/version") && !get("/healthz/etcd"));
        // Superusers are never denied; strangers always are.
        assert!(allows(&UserInfo::admin(), "delete", "", "nodes", "", "n"));
        assert!(!allows(
            &UserInfo::new("eve", &[]),
            "get",
            SNAP,
            "volumesnapshots",
            "dr",
            "s"
        ));
    }

    #[test]
    fn forbidden_message_has_the_apiserver_shape() {
        let bot = UserInfo::service_account("snapshift", "snapshift");
        let v = forbidden(
            &bot,
            &req(
                "GET",
                "/api/v1/namespaces/dr/persistentvolumeclaims/data",
                "",
            ),
        );
        assert_eq!(v["code"], 403);
        assert_eq!(v["reason"], "Forbidden");
        assert_eq!(
            v["message"],
            "persistentvolumeclaims \"data\" is forbidden: User \"system:serviceaccount:snapshift:snapshift\" cannot get resource \"persistentvolumeclaims\" in API group \"\" in the namespace \"dr\""
        );
        assert_eq!(v["details"]["name"], "data");
        let v = forbidden(
            &bot,
            &req(
                "GET",
                "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents",
                "",
            ),
        );
        assert_eq!(
            v["message"],
            "volumesnapshotcontents.snapshot.storage.k8s.io is forbidden: User \"system:serviceaccount:snapshift:snapshift\" cannot list resource \"volumesnapshotcontents\" in API group \"snapshot.storage.k8s.io\" at the cluster scope"
        );
        let v = forbidden(&bot, &req("GET", "/version", ""));
        assert_eq!(
            v["message"],
            "forbidden: User \"system:serviceaccount:snapshift:snapshift\" cannot get path \"/version\""
        );
    }

    #[test]
    fn malformed_objects_are_rejected() {
        for bad in [
            "kind: Role\nmetadata: {name: r}\nrules: []",
            "kind: ClusterRole\nmetadata: {name: r}\nrules: [{verbs: [get]}]",
            "kind: ClusterRole\nmetadata: {name: r}\nrules: [{resources: [pods]}]",
            "kind: ClusterRoleBinding\nmetadata: {name: b}\nroleRef: {kind: Role, name: r}",
            "kind: RoleBinding\nmetadata: {name: b, namespace: n}\nroleRef: {kind: ClusterRole, name: r}\nsubjects: [{kind: Robot, name: x}]",
        ] {
            assert!(
                matches!(Policy::from_yaml(bad), Err(RbacError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(matches!(
            Policy::from_yaml("a: [b"),
            Err(RbacError::Yaml(_))
        ));
    }

    #[test]
    fn a_single_grant_is_one_group_resource_and_verb_without_wildcards_or_names() {
        let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
            api_groups: groups.iter().map(|s| s.to_string()).collect(),
            resources: resources.iter().map(|s| s.to_string()).collect(),
            verbs: verbs.iter().map(|s| s.to_string()).collect(),
            ..PolicyRule::default()
        };
        let one = rule(&[""], &["pods/log"], &["get"]);
        assert_eq!(one.single_grant(), Some(("", "pods/log", "get")));
        for bad in [
            rule(&["", "apps"], &["pods"], &["get"]),
            rule(&[""], &["pods", "secrets"], &["get"]),
            rule(&[""], &["pods"], &["get", "list"]),
            rule(&[""], &["pods"], &[]),
            rule(&["*"], &["pods"], &["get"]),
            rule(&[""], &["*/status"], &["get"]),
            rule(&[""], &["pods"], &["*"]),
            PolicyRule {
                resource_names: vec!["one".into()],
                ..one.clone()
            },
            PolicyRule {
                non_resource_urls: vec!["/healthz".into()],
                ..one.clone()
            },
        ] {
            assert_eq!(bad.single_grant(), None, "{bad:?}");
        }
    }
}
