//! Identity checks: a token for the mover's ServiceAccount with the service's audience
//! (TokenRequest), the RBAC of the identity running doctor for every permission the backup
//! and restore flows use (SelfSubjectAccessReview per entry of
//! [`ORCHESTRATOR_PERMISSIONS`]), and the mover's right to read VolumeSnapshots as the sidecar
//! will ask it (SubjectAccessReview).

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec, SubjectAccessReview,
    SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

use super::{Check, CheckId, Ctx};
use crate::error::{Error, describe, is_forbidden};
use crate::metadata_service::request_token;
use crate::pvc_backup::ORCHESTRATOR_PERMISSIONS;
use crate::pvc_backup::permissions::{MOVER_PERMISSION, Need, Permission, Scope};

/// (9) A TokenRequest for the mover's ServiceAccount with the CR's audience succeeds. Returns
/// the token for the probe. Backups themselves do not need TokenRequest (the kubelet projects
/// the mover's token), so being forbidden to ask is a Warn; a missing account is a Fail.
pub(crate) async fn token_request(ctx: &Ctx<'_>, audience: &str) -> (Check, Option<String>) {
    let id = CheckId::TokenRequest;
    let (ns, sa) = (&ctx.opts.namespace, &ctx.opts.service_account);
    let missing = || {
        Check::fail(
            id,
            format!("ServiceAccount {ns}/{sa} does not exist: mover pods cannot start"),
            format!(
                "create it (kubectl -n {ns} create serviceaccount {sa}), or name the mover's account with --service-account"
            ),
        )
    };
    match request_token(
        &ctx.client(),
        &ctx.cluster.context,
        ns,
        sa,
        audience,
        Duration::from_secs(600),
    )
    .await
    {
        Ok((token, _)) => (
            Check::pass(
                id,
                format!("minted a token of {ns}/{sa} for audience {audience:?}"),
            ),
            Some(token),
        ),
        Err(Error::Api { source, .. }) if is_forbidden(&source) => {
            // Tell a missing account apart from a missing permission, if we may look.
            let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client(), ns);
            match accounts.get_opt(sa).await {
                Ok(None) => (missing(), None),
                _ => (
                    Check::warn(
                        id,
                        format!(
                            "cannot check: create serviceaccounts/token ({ns}/{sa}) is forbidden for you; backups do not need it (the kubelet projects the mover's token), but the audience and the probe go unchecked"
                        ),
                        format!(
                            "to check, run doctor as an identity that may create serviceaccounts/token for {ns}/{sa}"
                        ),
                    ),
                    None,
                ),
            }
        }
        Err(Error::Api { source, .. }) if matches!(source.as_ref(), kube::Error::Api(s) if s.code == 404) => {
            (missing(), None)
        }
        Err(Error::Api { source, .. }) => (
            Check::fail(
                id,
                format!(
                    "the API server refused a token of {ns}/{sa} for audience {audience:?}: {}",
                    describe(&source)
                ),
                "check spec.audience of the SnapshotMetadataService and the API server's token settings",
            ),
            None,
        ),
        Err(e) => (
            Check::fail(
                id,
                e.to_string(),
                "check the API server's TokenRequest support",
            ),
            None,
        ),
    }
}

fn attributes(p: &Permission, namespace: &str) -> ResourceAttributes {
    ResourceAttributes {
        verb: Some(p.verb.to_string()),
        group: Some(p.group.to_string()),
        resource: Some(p.resource.to_string()),
        subresource: (!p.subresource.is_empty()).then(|| p.subresource.to_string()),
        namespace: (p.scope == Scope::Namespace).then(|| namespace.to_string()),
        ..Default::default()
    }
}

/// Judges the denied permissions (pure).
fn judge_rbac(namespace: &str, total: usize, denied: &[Permission]) -> Check {
    let id = CheckId::OrchestratorRbac;
    let (required, optional): (Vec<&Permission>, Vec<&Permission>) =
        denied.iter().partition(|p| p.need == Need::Required);
    let list = |ps: &[&Permission]| {
        ps.iter()
            .map(|p| format!("{p} ({})", p.used_for))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let grant = |ps: &[&Permission]| {
        let (ns, cluster): (Vec<&&Permission>, Vec<&&Permission>) =
            ps.iter().partition(|p| p.scope == Scope::Namespace);
        let show = |v: &[&&Permission]| {
            v.iter()
                .map(|p| format!("{} {}", p.verb, p.resource_name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !ns.is_empty() {
            parts.push(format!("a Role in {namespace} with {}", show(&ns)));
        }
        if !cluster.is_empty() {
            parts.push(format!("a ClusterRole with {}", show(&cluster)));
        }
        format!(
            "grant the identity that runs cbt backup/restore {} (check with kubectl auth can-i)",
            parts.join(" and ")
        )
    };
    if !required.is_empty() {
        let mut all = required.clone();
        all.extend(optional.iter());
        return Check::fail(id, format!("you may not: {}", list(&required)), grant(&all));
    }
    if !optional.is_empty() {
        return Check::warn(
            id,
            format!(
                "you may not (backups still work, degraded): {}",
                list(&optional)
            ),
            grant(&optional),
        );
    }
    Check::pass(
        id,
        format!(
            "all {total} permissions backup and restore use are granted in namespace {namespace}"
        ),
    )
}

/// The permissions of `permissions` the caller (the identity of `client`) lacks in
/// `namespace`, asked with one SelfSubjectAccessReview each.
///
/// # Errors
/// The first failed review (e.g. 403 if even "may I" questions are forbidden).
pub async fn denied_permissions(
    client: &kube::Client,
    namespace: &str,
    permissions: &[Permission],
) -> Result<Vec<Permission>, kube::Error> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for p in permissions {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(attributes(p, namespace)),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = reviews.create(&PostParams::default(), &review).await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            denied.push(*p);
        }
    }
    Ok(denied)
}

/// (11) The identity running doctor may do everything backup and restore do.
pub(crate) async fn orchestrator_rbac(ctx: &Ctx<'_>) -> Check {
    let ns = &ctx.opts.namespace;
    match denied_permissions(&ctx.client(), ns, ORCHESTRATOR_PERMISSIONS).await {
        Ok(denied) => judge_rbac(ns, ORCHESTRATOR_PERMISSIONS.len(), &denied),
        Err(e) => Check::unchecked(
            CheckId::OrchestratorRbac,
            "create selfsubjectaccessreviews.authorization.k8s.io",
            &e,
        ),
    }
}

/// (12) The mover's ServiceAccount may get VolumeSnapshots in the namespace: the sidecar's
/// SubjectAccessReview of its token, asked the same way.
pub(crate) async fn mover_access(ctx: &Ctx<'_>) -> Check {
    let id = CheckId::MoverAccess;
    let (ns, sa) = (&ctx.opts.namespace, &ctx.opts.service_account);
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.clone()),
            // The groups the API server gives every ServiceAccount token.
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(attributes(&MOVER_PERMISSION, ns)),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SubjectAccessReview> = Api::all(ctx.client());
    match reviews.create(&PostParams::default(), &review).await {
        Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {
            Check::pass(id, format!("{user} may get volumesnapshots in {ns}"))
        }
        Ok(_) => Check::fail(
            id,
            format!(
                "{user} may not get volumesnapshots in {ns}: the sidecar will refuse the mover's token (PERMISSION_DENIED)"
            ),
            format!(
                "bind a Role in {ns} granting get on volumesnapshots.snapshot.storage.k8s.io to ServiceAccount {ns}/{sa}"
            ),
        ),
        Err(e) => Check::unchecked(id, "create subjectaccessreviews.authorization.k8s.io", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn denied_permissions_are_named_and_granted_by_scope() {
        let find = |verb: &str, resource: &str| {
            *ORCHESTRATOR_PERMISSIONS
                .iter()
                .find(|p| p.verb == verb && p.resource == resource && p.subresource.is_empty())
                .unwrap_or(&ORCHESTRATOR_PERMISSIONS[0])
        };
        let all = ORCHESTRATOR_PERMISSIONS.len();
        assert_eq!(judge_rbac("db", all, &[]).status, Status::Pass);
        let c = judge_rbac(
            "db",
            all,
            &[find("delete", "jobs"), find("get", "persistentvolumes")],
        );
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("delete jobs.batch"), "{}", c.detail);
        let fix = c.fix.unwrap_or_default();
        assert!(fix.contains("a Role in db with delete jobs.batch"), "{fix}");
        assert!(
            fix.contains("a ClusterRole with get persistentvolumes"),
            "{fix}"
        );
        let watch = judge_rbac("db", all, &[find("watch", "volumesnapshots")]);
        assert_eq!(watch.status, Status::Warn);
    }

    #[test]
    fn cluster_scoped_permissions_are_asked_without_a_namespace() {
        let pv = ORCHESTRATOR_PERMISSIONS
            .iter()
            .find(|p| p.resource == "persistentvolumes")
            .map(|p| attributes(p, "db"));
        assert_eq!(pv.and_then(|a| a.namespace), None);
        let log = ORCHESTRATOR_PERMISSIONS
            .iter()
            .find(|p| p.subresource == "log")
            .map(|p| attributes(p, "db"))
            .unwrap_or_default();
        assert_eq!(
            (log.namespace.as_deref(), log.subresource.as_deref()),
            (Some("db"), Some("log"))
        );
    }
}
