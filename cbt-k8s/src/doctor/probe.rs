//! (13) The end-to-end proof: GetMetadataAllocated on a ready VolumeSnapshot through the
//! sidecar, with a token of the mover's ServiceAccount for the service's audience, exactly as
//! a backup's mover asks. Reports the ranges and bytes of a clean stream.

use std::time::Duration;

use kube::api::Api;

use super::tls::Reach;
use super::{Check, CheckId, Ctx};
use crate::snapshot::{SnapshotState, VolumeSnapshot, VolumeSnapshotContent};

/// The CSI driver of a VolumeSnapshot in the namespace (through its bound content), if it can
/// be read.
pub(crate) async fn snapshot_driver(ctx: &Ctx<'_>, name: &str) -> Option<String> {
    let vss: Api<VolumeSnapshot> = Api::namespaced(ctx.client(), &ctx.opts.namespace);
    let vs = vss.get_opt(name).await.ok().flatten()?;
    let content = vs.bound_content()?.to_string();
    let vscs: Api<VolumeSnapshotContent> = Api::all(ctx.client());
    Some(vscs.get_opt(&content).await.ok().flatten()?.spec.driver)
}

fn fix_for(e: &cbt_csi::CsiError) -> &'static str {
    use cbt_csi::CsiError as E;
    match e {
        E::Unauthenticated { .. } => {
            "the sidecar rejected the token: its --audience (or the CR's spec.audience it reads) must match spec.audience"
        }
        E::PermissionDenied { .. } => {
            "grant the mover's ServiceAccount get on volumesnapshots in the namespace (see mover-access)"
        }
        E::SnapshotUnavailable { .. } => {
            "the sidecar cannot use the snapshot: check it is readyToUse with a bound content, that the driver's snapshot class exists (one default, or named on the snapshot), and the sidecar's RBAC on volumesnapshotclasses"
        }
        _ => "check the sidecar's and the driver's logs",
    }
}

/// Probes `name` through the sidecar of `driver`, reached as `reach` (from metadata-tls).
pub(crate) async fn probe(ctx: &Ctx<'_>, driver: &str, name: &str, reach: Option<&Reach>) -> Check {
    let id = CheckId::MetadataProbe;
    let ns = &ctx.opts.namespace;
    let object = format!("{ns}/{name}");
    let vss: Api<VolumeSnapshot> = Api::namespaced(ctx.client(), ns);
    let vs = match vss.get_opt(name).await {
        Ok(Some(vs)) => vs,
        Ok(None) => {
            return Check::fail(
                id,
                format!("VolumeSnapshot {object} does not exist"),
                "name a ready VolumeSnapshot of the namespace with --snapshot",
            );
        }
        Err(e) => return Check::unchecked(id, "get volumesnapshots.snapshot.storage.k8s.io", &e),
    };
    if !vs.is_ready() {
        return Check::fail(
            id,
            format!(
                "VolumeSnapshot {object} is not readyToUse{}",
                vs.error_message()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            ),
            "wait for it to become ready (or fix what its status.error says), then probe again",
        );
    }
    if let Some(other) = snapshot_driver(ctx, name).await
        && other != driver
    {
        return Check::skip(
            id,
            format!("VolumeSnapshot {object} belongs to driver {other}, not {driver}"),
        );
    }
    let Some(reach) = reach else {
        return Check::skip(id, "the sidecar was not reached (see metadata-tls)");
    };
    let Some(token) = &reach.token else {
        return Check::skip(
            id,
            "no token for the mover's ServiceAccount (see token-request)",
        );
    };
    let t = ctx.opts.network_timeout;
    let mut config = cbt_csi::ClientConfig::new(reach.endpoint.clone())
        .with_ca_pem(reach.ca_pem.clone())
        .with_server_name(reach.server_name.clone())
        .with_token(token.clone())
        .with_deadline(t * 10)
        .with_retry(cbt_csi::RetryPolicy::none());
    config.connect_timeout = t;
    let query = cbt_csi::Query::K8sAllocated {
        namespace: ns.clone(),
        snapshot_name: name.to_string(),
    };
    let call = async {
        let client = cbt_csi::MetadataClient::connect(config).await?;
        client.collect(cbt_csi::MetadataRequest::new(query)).await
    };
    match tokio::time::timeout(t * 10 + Duration::from_secs(1), call).await {
        Ok(Ok(result)) => {
            let s = result.summary;
            Check::pass(
                id,
                format!(
                    "GetMetadataAllocated {object} via {}: clean stream, {} range(s), {} byte(s) allocated of {} ({} message(s))",
                    reach.via,
                    s.ranges,
                    s.bytes,
                    s.volume_capacity_bytes
                        .map(|c| format!("{c} bytes"))
                        .unwrap_or_else(|| "an unreported size".into()),
                    s.messages
                ),
            )
        }
        Ok(Err(e)) => Check::fail(
            id,
            format!(
                "GetMetadataAllocated {object} via {} failed: {e}",
                reach.via
            ),
            fix_for(&e),
        ),
        Err(_) => Check::fail(
            id,
            format!(
                "GetMetadataAllocated {object} via {} did not finish in {:?}",
                reach.via,
                t * 10
            ),
            "check the sidecar's and the driver's logs",
        ),
    }
}
