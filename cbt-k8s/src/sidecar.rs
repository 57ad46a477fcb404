//! The cluster side of a SnapshotMetadata sidecar, for `cbt serve-metadata --kubernetes`: a
//! [`cbt_csi::server::SidecarAuthority`] that checks a caller's token with a TokenReview for the
//! service's audience and its right to read VolumeSnapshots with a SubjectAccessReview, and
//! resolves a VolumeSnapshot name to its CSI handle, as external-snapshot-metadata does per call
//! (contracts §2). With it, the file-backed server answers the Kubernetes API exactly as the
//! real sidecar would in front of a driver whose snapshots are image files named by handle.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Client;
use kube::api::{Api, PostParams};
use tonic::Status;

use crate::snapshot::{SnapshotState, VolumeSnapshot, VolumeSnapshotContent};

/// Checks tokens and resolves VolumeSnapshots through the Kubernetes API.
#[derive(Clone)]
pub struct KubeSidecar {
    client: Client,
    audience: String,
    driver: String,
}

impl std::fmt::Debug for KubeSidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSidecar")
            .field("audience", &self.audience)
            .field("driver", &self.driver)
            .finish()
    }
}

impl KubeSidecar {
    /// A sidecar for `driver` whose callers' tokens must carry `audience`.
    pub fn new(client: Client, audience: &str, driver: &str) -> Self {
        Self {
            client,
            audience: audience.to_string(),
            driver: driver.to_string(),
        }
    }
}

#[async_trait::async_trait]
impl cbt_csi::server::SidecarAuthority for KubeSidecar {
    async fn authorize(&self, token: &str, namespace: &str) -> Result<(), Status> {
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::internal(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        let audience_ok = status
            .audiences
            .as_ref()
            .is_some_and(|a| a.contains(&self.audience));
        if status.authenticated != Some(true) || !audience_ok {
            return Err(Status::unauthenticated(format!(
                "token not authenticated for audience {:?}{}",
                self.audience,
                status.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        let user = status.user.unwrap_or_default();
        let sars: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_string()),
                    verb: Some("get".into()),
                    group: Some(crate::snapshot::GROUP.into()),
                    version: Some("v1".into()),
                    resource: Some("volumesnapshots".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = sars
            .create(&PostParams::default(), &sar)
            .await
            .map_err(|e| Status::internal(format!("SubjectAccessReview failed: {e}")))?;
        if answer.status.is_some_and(|s| s.allowed) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{} may not get volumesnapshots in namespace {namespace}",
                user.username.unwrap_or_default()
            )))
        }
    }

    async fn resolve(&self, namespace: &str, name: &str) -> Result<String, Status> {
        let unavailable = |why: String| Status::unavailable(why);
        let vss: Api<VolumeSnapshot> = Api::namespaced(self.client.clone(), namespace);
        let vs = vss
            .get_opt(name)
            .await
            .map_err(|e| Status::internal(format!("get VolumeSnapshot {namespace}/{name}: {e}")))?
            .ok_or_else(|| unavailable(format!("VolumeSnapshot {namespace}/{name} not found")))?;
        if !vs.is_ready() {
            return Err(unavailable(format!(
                "VolumeSnapshot {namespace}/{name} is not ready"
            )));
        }
        let content = vs.bound_content().ok_or_else(|| {
            unavailable(format!(
                "VolumeSnapshot {namespace}/{name} has no bound content"
            ))
        })?;
        let vscs: Api<VolumeSnapshotContent> = Api::all(self.client.clone());
        let vsc = vscs
            .get_opt(content)
            .await
            .map_err(|e| Status::internal(format!("get VolumeSnapshotContent {content}: {e}")))?
            .ok_or_else(|| unavailable(format!("VolumeSnapshotContent {content} not found")))?;
        if vsc.spec.driver != self.driver {
            return Err(Status::invalid_argument(format!(
                "VolumeSnapshot {namespace}/{name} belongs to driver {}, not {}",
                vsc.spec.driver, self.driver
            )));
        }
        match (vsc.is_ready(), vsc.snapshot_handle()) {
            (true, Some(h)) => Ok(h.to_string()),
            _ => Err(unavailable(format!(
                "VolumeSnapshotContent {content} is not ready or has no snapshot handle"
            ))),
        }
    }
}
