//! API discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}` and `/apis/{group}/{version}`,
//! derived from the types served at the moment of the request (built-ins, `serve`d extras and
//! established CRDs), so a client can ask "is this resource served?" the way kubectl and
//! client-go do. Only the legacy (non-aggregated) JSON documents are served.
//!
//! It must not decide authorization: the server authorizes discovery paths as non-resource
//! requests (every authenticated user may read them, as the bootstrap `system:discovery`
//! ClusterRole grants).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::store::{ApiError, ResourceType};

/// Kubernetes version priority: GA before beta before alpha, higher numbers first, anything
/// else last in name order (as the API server sorts a group's versions).
fn priority(version: &str) -> (u8, i64, i64, String) {
    let parse = || -> Option<(u8, i64, i64)> {
        let rest = version.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: i64 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((0, -major, 0));
        }
        for (level, word) in [(1u8, "beta"), (2u8, "alpha")] {
            if let Some(n) = tail.strip_prefix(word) {
                let minor: i64 = n.parse().ok()?;
                return Some((level, -major, -minor));
            }
        }
        None
    };
    match parse() {
        Some((level, major, minor)) => (level, major, minor, String::new()),
        None => (3, 0, 0, version.to_string()),
    }
}

fn verbs(rt: &ResourceType) -> Vec<&'static str> {
    match (rt.group, rt.plural) {
        ("authorization.k8s.io", _) | ("authentication.k8s.io", "tokenreviews") => vec!["create"],
        _ => vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ],
    }
}

fn resource_list(group_version: &str, types: &[&ResourceType]) -> Value {
    let mut resources = Vec::new();
    for rt in types {
        resources.push(json!({
            "name": rt.plural, "singularName": rt.kind.to_ascii_lowercase(),
            "namespaced": rt.namespaced, "kind": rt.kind, "verbs": verbs(rt),
        }));
        let mut subs: Vec<(&str, &str, Vec<&str>)> = Vec::new();
        if rt.status_subresource {
            subs.push(("status", rt.kind, vec!["get", "patch", "update"]));
        }
        if crate::subresources::serves(rt, "token") {
            subs.push(("token", "TokenRequest", vec!["create"]));
        }
        if crate::subresources::serves(rt, "log") {
            subs.push(("log", "Pod", vec!["get"]));
        }
        for (sub, kind, verbs) in subs {
            resources.push(json!({
                "name": format!("{}/{sub}", rt.plural), "singularName": "",
                "namespaced": rt.namespaced, "kind": kind, "verbs": verbs,
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
           "resources": resources})
}

/// Versions of each named group, best first.
fn groups(types: &[&'static ResourceType]) -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for rt in types.iter().filter(|t| !t.group.is_empty()) {
        let versions = out.entry(rt.group).or_default();
        if !versions.contains(&rt.version) {
            versions.push(rt.version);
        }
    }
    for versions in out.values_mut() {
        versions.sort_by_key(|v| priority(v));
    }
    out
}

fn group_doc(name: &str, versions: &[&str]) -> Value {
    let gv: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": gv, "preferredVersion": gv.first().cloned().unwrap_or(Value::Null)})
}

/// The discovery document for `path`; `None` if `path` is not a discovery path (the caller
/// routes it as a resource request), `Some(Err)` 404 for an unknown group or version.
pub(crate) fn answer(
    path: &str,
    types: &[&'static ResourceType],
) -> Option<Result<Value, ApiError>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let served = |group: &str, version: &str| -> Vec<&ResourceType> {
        types
            .iter()
            .copied()
            .filter(|t| t.group == group && t.version == version)
            .collect()
    };
    Some(match segs.as_slice() {
        ["version"] => Ok(json!({
            "major": "1", "minor": "36", "gitVersion": "v1.36.0-fake-kube",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25", "compiler": "gc",
            "platform": "linux/amd64",
        })),
        ["api"] => Ok(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]})),
        ["api", "v1"] => Ok(resource_list("v1", &served("", "v1"))),
        ["api", _] => Err(ApiError::no_route()),
        ["apis"] => {
            let list: Vec<Value> = groups(types)
                .iter()
                .map(|(g, vs)| group_doc(g, vs))
                .collect();
            Ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}))
        }
        ["apis", group] => match groups(types).get(group) {
            Some(vs) => {
                let mut doc = group_doc(group, vs);
                doc["kind"] = json!("APIGroup");
                doc["apiVersion"] = json!("v1");
                Ok(doc)
            }
            None => Err(ApiError::no_route()),
        },
        ["apis", group, version] => {
            let rts = served(group, version);
            if rts.is_empty() {
                Err(ApiError::no_route())
            } else {
                Ok(resource_list(&format!("{group}/{version}"), &rts))
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_by_kubernetes_priority() {
        let mut v = vec![
            "v1alpha1", "v1beta1", "v2beta1", "v1", "v10", "foo", "v1beta2",
        ];
        v.sort_by_key(|x| priority(x));
        assert_eq!(
            v,
            [
                "v10", "v1", "v2beta1", "v1beta2", "v1beta1", "v1alpha1", "foo"
            ]
        );
    }

    #[test]
    fn discovery_follows_the_served_types() {
        let types: Vec<&'static ResourceType> = crate::store::TYPES.to_vec();
        let doc = answer("/apis/snapshot.storage.k8s.io/v1", &types)
            .unwrap()
            .unwrap();
        let names: Vec<&str> = doc["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"volumesnapshots") && names.contains(&"volumesnapshots/status"));
        assert_eq!(
            answer("/apis/snapshot.storage.k8s.io/v1beta1", &types)
                .unwrap()
                .unwrap_err()
                .code,
            404
        );
        assert_eq!(
            answer("/apis/snapshot.storage.k8s.io", &types)
                .unwrap()
                .unwrap()["preferredVersion"]["version"],
            "v1"
        );
        assert!(answer("/apis/snapshot.storage.k8s.io/v1/volumesnapshots", &types).is_none());
    }
}
