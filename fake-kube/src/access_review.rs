//! authorization.k8s.io/v1 SubjectAccessReview and SelfSubjectAccessReview: create-only,
//! never stored, answered from the RBAC policy (see [`crate::rbac`]) as the apiserver's
//! authorizer would. Without a policy every review is allowed, as every request is.

use hyper::Method;
use serde_json::{Value, json};

use crate::State;
use crate::rbac::{RequestAttributes, UserInfo};
use crate::server::{Reply, Route};
use crate::store::{ApiError, ResourceType};

/// SubjectAccessReview: "may this user do that?" (used by the snapshot-metadata sidecar).
pub(crate) static SUBJECT_ACCESS_REVIEWS: ResourceType = ResourceType {
    group: "authorization.k8s.io",
    version: "v1",
    plural: "subjectaccessreviews",
    kind: "SubjectAccessReview",
    namespaced: false,
    status_subresource: false,
    crd: false,
};

/// SelfSubjectAccessReview: "may I do that?" (kubectl auth can-i; `cbt doctor`).
pub(crate) static SELF_SUBJECT_ACCESS_REVIEWS: ResourceType = ResourceType {
    group: "authorization.k8s.io",
    version: "v1",
    plural: "selfsubjectaccessreviews",
    kind: "SelfSubjectAccessReview",
    namespaced: false,
    status_subresource: false,
    crd: false,
};

/// The kinds this module serves.
pub(crate) static ACCESS_REVIEW_TYPES: [&ResourceType; 2] =
    [&SUBJECT_ACCESS_REVIEWS, &SELF_SUBJECT_ACCESS_REVIEWS];

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Answers a review; `None` for any other route.
pub(crate) fn dispatch(
    state: &State,
    requester: &UserInfo,
    method: &Method,
    route: &Route,
    body: &[u8],
) -> Option<Result<Reply, ApiError>> {
    let self_review = route.rt == &SELF_SUBJECT_ACCESS_REVIEWS;
    if !self_review && route.rt != &SUBJECT_ACCESS_REVIEWS {
        return None;
    }
    if *method != Method::POST || route.name.is_some() {
        return Some(Err(ApiError::method_not_allowed()));
    }
    Some(review(state, requester, self_review, body).map(|v| Reply::Json(201, v)))
}

fn review(
    state: &State,
    requester: &UserInfo,
    self_review: bool,
    body: &[u8],
) -> Result<Value, ApiError> {
    let mut obj: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    let spec = obj["spec"].clone();
    let ra = &spec["resourceAttributes"];
    if !ra.is_object() {
        return Err(ApiError::bad_request(
            "spec.resourceAttributes is required (non-resource reviews are not simulated)",
        ));
    }
    let user = if self_review {
        requester.clone()
    } else {
        let name = spec["user"].as_str().unwrap_or("");
        let groups = strings(&spec["groups"]);
        if name.is_empty() && groups.is_empty() {
            return Err(ApiError::bad_request(
                "spec.user or spec.groups: at least one of user or group must be specified",
            ));
        }
        UserInfo {
            name: name.to_string(),
            groups,
        }
    };
    let s = |k: &str| ra[k].as_str().unwrap_or("").to_string();
    let resource = match s("subresource").as_str() {
        "" => s("resource"),
        sub => format!("{}/{sub}", s("resource")),
    };
    let attributes = RequestAttributes::resource(
        &s("verb"),
        &s("group"),
        &resource,
        &s("namespace"),
        &s("name"),
    );
    let allowed = state.policy_allows(&user, &attributes);
    obj["apiVersion"] = json!("authorization.k8s.io/v1");
    obj["kind"] = json!(if self_review {
        "SelfSubjectAccessReview"
    } else {
        "SubjectAccessReview"
    });
    obj["status"] = if allowed {
        json!({"allowed": true, "reason": "allowed by the fake's RBAC policy"})
    } else {
        json!({"allowed": false})
    };
    Ok(obj)
}
