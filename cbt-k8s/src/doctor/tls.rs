//! Checks of the sidecar's TLS as a client sees it: the CR's CA bundle parses, and a handshake
//! trusting only that CA, with the host of the CR's address as server name, succeeds and the
//! gRPC health service answers SERVING.
//!
//! The handshake is made with rustls directly (not through the gRPC channel) so that a
//! certificate problem comes back as a typed [`rustls::CertificateError`] that says which fix
//! applies. Outside the cluster a Service DNS name does not resolve; then the Service's ready
//! endpoint is dialled instead, still verifying the certificate against the Service name, and
//! if neither works the result is a Warn ("run doctor inside the cluster"), not a Fail.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, RootCertStore};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{Check, CheckId, Ctx};
use crate::metadata_service::{MetadataEndpoint, split_address};

/// How the sidecar was reached, for the probe.
#[derive(Clone, Debug)]
pub(crate) struct Reach {
    /// What to dial: `https://<resolved or endpoint address>`.
    pub(crate) endpoint: String,
    /// TLS server name (the CR address host).
    pub(crate) server_name: String,
    /// The CR's CA bundle.
    pub(crate) ca_pem: Vec<u8>,
    /// How it was reached, for messages.
    pub(crate) via: String,
    /// A token for the mover's ServiceAccount with the CR's audience, if one could be minted.
    pub(crate) token: Option<String>,
}

/// (7) The CA bundle holds PEM certificates that parse as X.509 trust anchors (pure).
pub(crate) fn metadata_ca(pem: &[u8]) -> (Check, Option<Arc<RootCertStore>>) {
    let id = CheckId::MetadataCa;
    let fix = "set spec.caCert to the base64 of the PEM bundle of the CA that issued the sidecar's certificate";
    let certs: Vec<CertificateDer<'static>> = match CertificateDer::pem_slice_iter(pem).collect() {
        Ok(c) => c,
        Err(e) => {
            return (
                Check::fail(id, format!("spec.caCert is not valid PEM: {e}"), fix),
                None,
            );
        }
    };
    if certs.is_empty() {
        return (
            Check::fail(id, "spec.caCert holds no PEM certificate", fix),
            None,
        );
    }
    let n = certs.len();
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        if let Err(e) = roots.add(cert) {
            return (
                Check::fail(
                    id,
                    format!(
                        "certificate {} of {n} in spec.caCert does not parse as X.509: {e}",
                        i + 1
                    ),
                    fix,
                ),
                None,
            );
        }
    }
    (
        Check::pass(id, format!("{n} CA certificate(s) parse")),
        Some(Arc::new(roots)),
    )
}

/// What a failed handshake means and what to do (pure).
fn explain_handshake(e: &std::io::Error, host: &str) -> (String, String) {
    let rustls_error = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => (
                format!("the served certificate does not chain to spec.caCert ({c:?})"),
                "set spec.caCert to the CA that issued the sidecar's certificate (or reissue the certificate from that CA)".into(),
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
                format!("the served certificate is not valid for {host} ({c:?})"),
                format!("reissue the sidecar's certificate with a DNS name {host} (the host of spec.address), or make spec.address use a name the certificate has"),
            ),
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => (
                format!("the served certificate is outside its validity period ({c:?})"),
                "renew the sidecar's certificate".into(),
            ),
            other => (
                format!("the served certificate is rejected: {other:?}"),
                "reissue the sidecar's certificate from the CA in spec.caCert".into(),
            ),
        },
        Some(other) => (
            format!("TLS handshake failed: {other}"),
            "check that the address serves the sidecar's TLS (not plain gRPC or another service)".into(),
        ),
        None => (
            format!("TLS handshake failed: {e}"),
            "check that the address serves the sidecar's TLS (not plain gRPC or another service)".into(),
        ),
    }
}

/// Where to dial: the address itself if its host resolves from here, else a ready endpoint.
async fn target(
    ctx: &Ctx<'_>,
    address: &str,
    host: &str,
    endpoints: &[SocketAddr],
) -> Option<(SocketAddr, String)> {
    let resolved = timeout(ctx.opts.network_timeout, tokio::net::lookup_host(address))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|mut addrs| addrs.next());
    if let Some(a) = resolved {
        return Some((a, address.to_string()));
    }
    endpoints.first().map(|e| {
        (
            *e,
            format!("endpoint {e} of the Service ({host} does not resolve from here)"),
        )
    })
}

/// (8) TLS with only the CR's CA and the address host as name, then gRPC health.
pub(crate) async fn metadata_tls(
    ctx: &Ctx<'_>,
    ep: &MetadataEndpoint,
    roots: Arc<RootCertStore>,
    endpoints: &[SocketAddr],
) -> (Check, Option<Reach>) {
    let id = CheckId::MetadataTls;
    let t = ctx.opts.network_timeout;
    let inside = "run cbt doctor inside the cluster (in a pod), where the Service name resolves";
    let Some((host, _)) = split_address(&ep.address) else {
        return (
            Check::skip(id, "spec.address is not host:port (see metadata-service)"),
            None,
        );
    };
    let Some((addr, via)) = target(ctx, &ep.address, &host, endpoints).await else {
        return (
            Check::warn(
                id,
                format!("{host} does not resolve from here and no ready endpoint of it is known"),
                inside,
            ),
            None,
        );
    };
    let tcp = match timeout(t, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return (
                Check::warn(id, format!("cannot connect to {via}: {e}"), inside),
                None,
            );
        }
        Err(_) => {
            return (
                Check::warn(
                    id,
                    format!("connecting to {via} timed out after {t:?}"),
                    inside,
                ),
                None,
            );
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        Err(e) => {
            return (
                Check::warn(
                    id,
                    format!("cannot set up TLS here: {e}"),
                    "report this as a bug",
                ),
                None,
            );
        }
    };
    let mut config = config;
    // The sidecar serves gRPC: offer HTTP/2 as a gRPC client does.
    config.alpn_protocols = vec![b"h2".to_vec()];
    let Ok(name) = ServerName::try_from(host.clone()) else {
        return (
            Check::fail(
                id,
                format!("{host} is not a valid TLS server name"),
                "make spec.address's host a DNS name or IP address",
            ),
            None,
        );
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match timeout(t, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => drop(stream),
        Ok(Err(e)) => {
            let (detail, fix) = explain_handshake(&e, &host);
            return (Check::fail(id, format!("{via}: {detail}"), fix), None);
        }
        Err(_) => {
            return (
                Check::fail(
                    id,
                    format!("{via}: the TLS handshake timed out after {t:?}"),
                    "check that the address serves the sidecar's TLS",
                ),
                None,
            );
        }
    }
    let reach = Reach {
        endpoint: format!("https://{addr}"),
        server_name: host.clone(),
        ca_pem: ep.ca_pem.clone(),
        via: via.clone(),
        token: None,
    };
    let mut config = cbt_csi::ClientConfig::new(reach.endpoint.clone())
        .with_ca_pem(reach.ca_pem.clone())
        .with_server_name(host.clone());
    config.connect_timeout = t;
    let health = async {
        let client = cbt_csi::MetadataClient::connect(config).await?;
        client.health("").await
    };
    match timeout(t, health).await {
        Ok(Ok(true)) => (
            Check::pass(
                id,
                format!("{via}: the certificate for {host} chains to spec.caCert; health SERVING"),
            ),
            Some(reach),
        ),
        Ok(Ok(false)) => (
            Check::fail(
                id,
                format!("{via}: TLS is fine but the health service reports NOT_SERVING"),
                "the sidecar's CSI driver has not passed Probe or does not report the SNAPSHOT_METADATA_SERVICE capability: check the sidecar's and the driver's logs",
            ),
            None,
        ),
        Ok(Err(e)) => (
            Check::fail(
                id,
                format!("{via}: TLS is fine but the gRPC health check failed: {e}"),
                "check that the address is the csi-snapshot-metadata sidecar (it serves grpc.health.v1)",
            ),
            None,
        ),
        Err(_) => (
            Check::fail(
                id,
                format!("{via}: the gRPC health check timed out after {t:?}"),
                "check the sidecar's logs",
            ),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn ca_bundles_must_hold_parseable_certificates() {
        assert_eq!(metadata_ca(b"").0.status, Status::Fail);
        assert_eq!(metadata_ca(b"not pem at all").0.status, Status::Fail);
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let (c, roots) = metadata_ca(garbage);
        assert_eq!(c.status, Status::Fail, "{}", c.detail);
        assert!(roots.is_none());
    }

    #[test]
    fn handshake_errors_say_which_fix_applies() {
        let io = |c: CertificateError| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(c),
            )
        };
        let (d, f) = explain_handshake(&io(CertificateError::UnknownIssuer), "sm.ns");
        assert!(d.contains("does not chain") && f.contains("spec.caCert"));
        let (d, f) = explain_handshake(&io(CertificateError::NotValidForName), "sm.ns");
        assert!(d.contains("not valid for sm.ns") && f.contains("DNS name sm.ns"));
        let (d, _) = explain_handshake(&std::io::Error::other("reset"), "sm.ns");
        assert!(d.contains("reset"));
    }
}
