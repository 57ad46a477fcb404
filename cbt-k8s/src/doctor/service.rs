//! Checks of a driver's metadata service as the cluster describes it: the
//! SnapshotMetadataService CRD and CR, the sidecar container in the driver's pods, and the
//! Service and endpoints the CR's address names. Then, per driver, it runs the CA, TLS and
//! token checks in order, skipping what a failed prerequisite makes meaningless.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};

use super::snapshots::{is_running, pod_name};
use super::tls::Reach;
use super::{Check, CheckId, Ctx};
use crate::metadata_service::{
    GROUP, MetadataEndpoint, SnapshotMetadataService, VERSION, split_address,
};

/// Name of the CRD.
const CRD_NAME: &str = "snapshotmetadataservices.cbt.storage.k8s.io";
/// Container name and image name of the external-snapshot-metadata sidecar.
const SIDECAR: &str = "csi-snapshot-metadata";
/// Label an EndpointSlice carries naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

const DEPLOY_SIDECAR: &str = "deploy the driver with the external-snapshot-metadata sidecar (v1.0.0 or later) and its SnapshotMetadataService; until then only full backups work (cbt backup --fallback-full)";

/// Judges the versions the CRD serves (pure). `source` says where they were read.
fn judge_crd_versions(served: &[String], source: &str) -> (Check, bool) {
    let id = CheckId::MetadataCrd;
    let list = if served.is_empty() {
        "no version".to_string()
    } else {
        served.join(", ")
    };
    if served.iter().any(|v| v == VERSION) {
        return (
            Check::pass(id, format!("{CRD_NAME} serves {list}{source}")),
            true,
        );
    }
    let upgrade = "upgrade external-snapshot-metadata to v1.0.0 or later: install its v1beta1 CRD and sidecar; v1alpha1 objects are not converted, so re-create the SnapshotMetadataService";
    if served.iter().any(|v| v == "v1alpha1") {
        return (
            Check::fail(
                id,
                format!(
                    "{CRD_NAME} serves only {list}{source}: this is external-snapshot-metadata older than v1.0.0 (v0.1/v0.2), which current sidecars and clients do not speak"
                ),
                upgrade,
            ),
            false,
        );
    }
    (
        Check::fail(
            id,
            format!("{CRD_NAME} serves {list}{source}, not {VERSION}"),
            upgrade,
        ),
        false,
    )
}

/// (3) The SnapshotMetadataService CRD serves v1beta1. Reads the CRD; if that is forbidden,
/// asks API discovery (open to everyone) which versions of the group are served.
pub(crate) async fn metadata_crd(ctx: &Ctx<'_>) -> (Check, bool) {
    let id = CheckId::MetadataCrd;
    let not_installed = |how: &str| {
        (
            Check::fail(
                id,
                format!("{CRD_NAME} is not installed{how}"),
                format!(
                    "install the CRD of external-snapshot-metadata v1.0.0 or later (client/config/crd/{GROUP}_snapshotmetadataservices.yaml); {DEPLOY_SIDECAR}"
                ),
            ),
            false,
        )
    };
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client());
    match crds.get_opt(CRD_NAME).await {
        Ok(Some(crd)) => {
            let served: Vec<String> = crd
                .spec
                .versions
                .iter()
                .filter(|v| v.served)
                .map(|v| v.name.clone())
                .collect();
            judge_crd_versions(&served, "")
        }
        Ok(None) => not_installed(""),
        Err(e) if crate::error::is_forbidden(&e) => match ctx.client().list_api_groups().await {
            Ok(groups) => match groups.groups.iter().find(|g| g.name == GROUP) {
                Some(g) => {
                    let served: Vec<String> =
                        g.versions.iter().map(|v| v.version.clone()).collect();
                    judge_crd_versions(
                        &served,
                        " (from API discovery: you may not read CustomResourceDefinitions)",
                    )
                }
                None => not_installed(" (API discovery lists no cbt.storage.k8s.io group)"),
            },
            Err(e) => (Check::unchecked(id, "get discovery /apis", &e), false),
        },
        Err(e) => (
            Check::unchecked(id, "get customresourcedefinitions.apiextensions.k8s.io", &e),
            false,
        ),
    }
}

/// Judges a SnapshotMetadataService (pure): address and audience; the CA has its own check.
fn judge_sms(driver: &str, sms: &SnapshotMetadataService) -> (Check, Option<MetadataEndpoint>) {
    let id = CheckId::MetadataService;
    let address = sms.spec.address.trim().to_string();
    let Some((host, _)) = split_address(&address) else {
        return (
            Check::fail(
                id,
                format!("spec.address {address:?} is not host:port"),
                "set spec.address to the sidecar Service's host:port, e.g. csi-snapshot-metadata.kube-system:6443",
            ),
            None,
        );
    };
    if sms.spec.audience.trim().is_empty() {
        return (
            Check::fail(
                id,
                "spec.audience is empty",
                "set spec.audience to the audience the sidecar expects in tokens (its --audience, or any agreed string)",
            ),
            None,
        );
    }
    let endpoint = MetadataEndpoint {
        driver: driver.to_string(),
        address: address.clone(),
        audience: sms.spec.audience.clone(),
        ca_pem: sms.spec.ca_cert.0.clone(),
        server_name: host,
    };
    (
        Check::pass(
            id,
            format!("address {address}, audience {:?}", sms.spec.audience),
        ),
        Some(endpoint),
    )
}

/// (4) A SnapshotMetadataService named after the driver exists and is usable.
async fn metadata_service(ctx: &Ctx<'_>, driver: &str) -> (Check, Option<MetadataEndpoint>) {
    let id = CheckId::MetadataService;
    let api: Api<SnapshotMetadataService> = Api::all(ctx.client());
    match api.get_opt(driver).await {
        Ok(Some(sms)) => judge_sms(driver, &sms),
        Ok(None) => {
            let others: Vec<String> = api
                .list(&ListParams::default())
                .await
                .map(|l| {
                    l.items
                        .into_iter()
                        .filter_map(|s| s.metadata.name)
                        .collect()
                })
                .unwrap_or_default();
            let existing = if others.is_empty() {
                "no SnapshotMetadataService exists at all".to_string()
            } else {
                format!("existing ones: {}", others.join(", "))
            };
            (
                Check::fail(
                    id,
                    format!(
                        "no SnapshotMetadataService named {driver} ({existing}): the driver was deployed without the external-snapshot-metadata sidecar, so nothing serves its changed blocks"
                    ),
                    DEPLOY_SIDECAR,
                ),
                None,
            )
        }
        Err(kube::Error::SerdeError(e)) => (
            Check::fail(
                id,
                format!("SnapshotMetadataService {driver} cannot be read: {e}"),
                "spec needs address, audience and caCert (the base64 of a PEM CA bundle)",
            ),
            None,
        ),
        Err(e) => (
            Check::unchecked(id, "get snapshotmetadataservices.cbt.storage.k8s.io", &e),
            None,
        ),
    }
}

/// The Service a host names, if it is a Service DNS name: `svc.ns`, `svc.ns.svc` or
/// `svc.ns.svc.<cluster domain>` (pure). IP addresses and single labels are not.
pub(crate) fn service_of_host(host: &str) -> Option<(String, String)> {
    if host.parse::<IpAddr>().is_ok() {
        return None;
    }
    let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
    let dns_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    match labels.as_slice() {
        [svc, ns] | [svc, ns, "svc", ..] if dns_label(svc) && dns_label(ns) => {
            Some((svc.to_string(), ns.to_string()))
        }
        _ => None,
    }
}

fn has_sidecar(p: &Pod) -> Option<String> {
    p.spec.as_ref()?.containers.iter().find_map(|c| {
        let image = c.image.clone().unwrap_or_default();
        (c.name == SIDECAR || image.contains(SIDECAR)).then_some(image)
    })
}

/// Judges the pods searched for the sidecar (pure). `scope` names where they were searched.
fn judge_sidecar(pods: &[Pod], scope: &str) -> Check {
    let id = CheckId::MetadataSidecar;
    let with: Vec<(&Pod, String)> = pods
        .iter()
        .filter_map(|p| has_sidecar(p).map(|i| (p, i)))
        .collect();
    if with.is_empty() {
        return Check::fail(
            id,
            format!(
                "no pod {scope} has a {SIDECAR} container: the SnapshotMetadataService points at a sidecar that is not deployed"
            ),
            format!(
                "add the {SIDECAR} sidecar to the driver's controller pod (external-snapshot-metadata deploy/), or correct spec.address"
            ),
        );
    }
    if let Some((p, image)) = with.iter().find(|(p, _)| is_running(p)) {
        return Check::pass(id, format!("{} runs {image}", pod_name(p)));
    }
    let names: Vec<String> = with.iter().map(|(p, _)| pod_name(p)).collect();
    Check::fail(
        id,
        format!(
            "pods with the sidecar are not running: {}",
            names.join(", ")
        ),
        "find out why with kubectl describe pod; the sidecar must run for CBT",
    )
}

/// (5) The pods behind the CR's Service (else of its namespace, else of the cluster) carry
/// the sidecar, and one of them runs.
async fn metadata_sidecar(
    ctx: &Ctx<'_>,
    service_ref: Option<&(String, String)>,
    service: Option<&Service>,
) -> Check {
    let (pods, scope, list_params) = match service_ref {
        Some((name, ns)) => {
            let api: Api<Pod> = Api::namespaced(ctx.client(), ns);
            let selector = service
                .and_then(|s| s.spec.as_ref())
                .and_then(|s| s.selector.clone())
                .filter(|s| !s.is_empty());
            match selector {
                Some(sel) => {
                    let labels: Vec<String> = sel.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    (
                        api,
                        format!("behind Service {ns}/{name}"),
                        ListParams::default().labels(&labels.join(",")),
                    )
                }
                None => (api, format!("in namespace {ns}"), ListParams::default()),
            }
        }
        None => (
            Api::all(ctx.client()),
            "in the cluster".to_string(),
            ListParams::default(),
        ),
    };
    match pods.list(&list_params).await {
        Ok(list) => judge_sidecar(&list.items, &scope),
        Err(e) => Check::unchecked(CheckId::MetadataSidecar, "list pods", &e),
    }
}

/// Ready endpoint addresses of a Service port in its EndpointSlices (pure): the slice port
/// named like the Service port, endpoints not marked unready.
pub(crate) fn ready_endpoints(
    port_name: Option<&str>,
    slices: &[EndpointSlice],
) -> Vec<SocketAddr> {
    let want = port_name.unwrap_or("");
    let mut out = Vec::new();
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == want)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for e in slice.endpoints.iter().flatten() {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            for a in &e.addresses {
                if let Ok(ip) = a.parse::<IpAddr>() {
                    out.push(SocketAddr::new(ip, port));
                }
            }
        }
    }
    out
}

/// (6) The CR's address names a Service in its namespace that exposes the port and has ready
/// endpoints. Returns those endpoints (for reaching the sidecar from outside the cluster).
async fn metadata_endpoints(
    ctx: &Ctx<'_>,
    host: &str,
    port: u16,
    service_ref: Option<&(String, String)>,
    service: Option<&Result<Option<Service>, kube::Error>>,
) -> (Check, Vec<SocketAddr>) {
    let id = CheckId::MetadataEndpoints;
    let (Some((name, ns)), Some(lookup)) = (service_ref, service) else {
        return (
            Check::warn(
                id,
                format!(
                    "{host} is not a Service DNS name (service.namespace[.svc[.cluster.local]]): cannot check it through the API"
                ),
                format!("nothing to do if {host}:{port} reaches the sidecar from the mover pods"),
            ),
            Vec::new(),
        );
    };
    let svc = match lookup {
        Ok(Some(s)) => s,
        Ok(None) => {
            return (
                Check::fail(
                    id,
                    format!("Service {ns}/{name} (from spec.address) does not exist"),
                    "create the sidecar's Service (external-snapshot-metadata deploy/: port 6443 to the sidecar's 50051), or correct spec.address",
                ),
                Vec::new(),
            );
        }
        Err(e) => return (Check::unchecked(id, "get services", e), Vec::new()),
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") {
        return (
            Check::warn(
                id,
                format!(
                    "Service {ns}/{name} is an ExternalName: its endpoints are outside the cluster API"
                ),
                "nothing to do if the external name reaches the sidecar",
            ),
            Vec::new(),
        );
    }
    let ports = spec.ports.unwrap_or_default();
    let Some(sp) = ports.iter().find(|p| p.port == i32::from(port)) else {
        let exposed: Vec<String> = ports.iter().map(|p| p.port.to_string()).collect();
        return (
            Check::fail(
                id,
                format!(
                    "Service {ns}/{name} does not expose port {port} (it exposes: {})",
                    if exposed.is_empty() {
                        "none".to_string()
                    } else {
                        exposed.join(", ")
                    }
                ),
                "make spec.address's port one the Service exposes",
            ),
            Vec::new(),
        );
    };
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client(), ns);
    let list = match slices
        .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name}")))
        .await
    {
        Ok(l) => l.items,
        Err(e) => {
            return (
                Check::unchecked(id, "list endpointslices.discovery.k8s.io", &e),
                Vec::new(),
            );
        }
    };
    let ready = ready_endpoints(sp.name.as_deref(), &list);
    if ready.is_empty() {
        return (
            Check::fail(
                id,
                format!("Service {ns}/{name} has no ready endpoints for port {port}"),
                "make the Service's selector match the pod with the sidecar, and check that the pod is Ready",
            ),
            ready,
        );
    }
    let shown: Vec<String> = ready.iter().map(ToString::to_string).collect();
    (
        Check::pass(
            id,
            format!(
                "Service {ns}/{name} port {port} has ready endpoints {}",
                shown.join(", ")
            ),
        ),
        ready,
    )
}

/// The per-driver checks of the metadata path and how the sidecar can be reached.
pub(crate) struct DriverFindings {
    /// metadata-service .. token-request, in order.
    pub(crate) checks: Vec<Check>,
    /// Set when TLS and health passed (with a token if one could be minted).
    pub(crate) reachable: Option<Reach>,
}

/// Runs checks 4 to 9 for one driver, skipping those whose prerequisite failed.
pub(crate) async fn driver_checks(ctx: &Ctx<'_>, driver: &str, v1beta1: bool) -> DriverFindings {
    let skip_all = |first: Check, reason: &str| {
        let mut checks = vec![first];
        for id in [
            CheckId::MetadataSidecar,
            CheckId::MetadataEndpoints,
            CheckId::MetadataCa,
            CheckId::MetadataTls,
            CheckId::TokenRequest,
        ] {
            checks.push(Check::skip(id, reason));
        }
        DriverFindings {
            checks,
            reachable: None,
        }
    };
    if !v1beta1 {
        return skip_all(
            Check::skip(
                CheckId::MetadataService,
                "the v1beta1 SnapshotMetadataService API is not served (see metadata-crd)",
            ),
            "the v1beta1 SnapshotMetadataService API is not served (see metadata-crd)",
        );
    }
    let (cr, endpoint) = metadata_service(ctx, driver).await;
    let Some(endpoint) = endpoint else {
        return skip_all(
            cr,
            "no usable SnapshotMetadataService (see metadata-service)",
        );
    };
    let mut checks = vec![cr];
    let (host, port) = split_address(&endpoint.address).unwrap_or_default();
    let service_ref = service_of_host(&host);
    let service = match &service_ref {
        Some((name, ns)) => {
            let api: Api<Service> = Api::namespaced(ctx.client(), ns);
            Some(api.get_opt(name).await)
        }
        None => None,
    };
    let found = service
        .as_ref()
        .and_then(|r| r.as_ref().ok())
        .and_then(Option::as_ref);
    checks.push(metadata_sidecar(ctx, service_ref.as_ref(), found).await);
    let (eps, ready) =
        metadata_endpoints(ctx, &host, port, service_ref.as_ref(), service.as_ref()).await;
    checks.push(eps);
    let (ca, roots) = super::tls::metadata_ca(&endpoint.ca_pem);
    checks.push(ca);
    let (tls, reach) = match roots {
        Some(roots) => super::tls::metadata_tls(ctx, &endpoint, roots, &ready).await,
        None => (
            Check::skip(
                CheckId::MetadataTls,
                "the CA bundle is unusable (see metadata-ca)",
            ),
            None,
        ),
    };
    checks.push(tls);
    let (token, minted) = super::access::token_request(ctx, &endpoint.audience).await;
    checks.push(token);
    DriverFindings {
        checks,
        reachable: reach.map(|r| Reach { token: minted, ..r }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn service_dns_names_and_others() {
        let s = |h: &str| service_of_host(h);
        let want = Some(("sm".to_string(), "kube-system".to_string()));
        assert_eq!(s("sm.kube-system"), want);
        assert_eq!(s("sm.kube-system.svc"), want);
        assert_eq!(s("sm.kube-system.svc.cluster.local"), want);
        assert_eq!(s("sm.kube-system.svc.cluster.local."), want);
        for other in [
            "localhost",
            "127.0.0.1",
            "::1",
            "a.b.example.com",
            "Sm.ns",
            "sm.ns.pod",
        ] {
            assert_eq!(s(other), None, "{other}");
        }
    }

    #[test]
    fn crd_versions() {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            judge_crd_versions(&v(&["v1beta1"]), "").0.status,
            Status::Pass
        );
        let (old, ok) = judge_crd_versions(&v(&["v1alpha1"]), "");
        assert_eq!((old.status, ok), (Status::Fail, false));
        assert!(old.detail.contains("older than v1.0.0"));
        assert_eq!(judge_crd_versions(&v(&[]), "").0.status, Status::Fail);
    }

    #[test]
    fn endpoints_are_the_ready_ones_on_the_named_port() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"}, "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
            ],
            "ports": [{"name": "grpc", "port": 50051}, {"name": "metrics", "port": 8080}],
        }))
        .unwrap_or_else(|_| EndpointSlice::default());
        let got: Vec<String> = ready_endpoints(Some("grpc"), std::slice::from_ref(&slice))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["10.0.0.1:50051", "10.0.0.3:50051"]);
        assert!(ready_endpoints(None, &[slice]).is_empty());
    }

    #[test]
    fn a_sidecar_is_found_by_container_name_or_image() {
        let pod = |containers: serde_json::Value, phase: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ns"},
                "spec": {"containers": containers}, "status": {"phase": phase},
            }))
            .unwrap_or_default()
        };
        let plugin = serde_json::json!({"name": "hostpath", "image": "registry.k8s.io/sig-storage/hostpathplugin:v1.15.0"});
        let by_image = serde_json::json!({"name": "metadata", "image": "registry.k8s.io/sig-storage/csi-snapshot-metadata:v0.1.0"});
        let none = pod(serde_json::json!([plugin]), "Running");
        assert_eq!(judge_sidecar(&[none], "here").status, Status::Fail);
        let ok = pod(serde_json::json!([plugin, by_image]), "Running");
        assert_eq!(judge_sidecar(&[ok], "here").status, Status::Pass);
        let pending = pod(serde_json::json!([plugin, by_image]), "Pending");
        assert_eq!(judge_sidecar(&[pending], "here").status, Status::Fail);
    }
}
