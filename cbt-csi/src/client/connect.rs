//! Builds the gRPC channel for an endpoint: unix socket, plain TCP, or TLS with a private CA and
//! an optional server-name override.

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::ClientConfig;
use crate::error::CsiError;

enum Target {
    Unix,
    Plain(String),
    Tls(String),
}

fn classify(endpoint: &str) -> Result<Target, CsiError> {
    let invalid = |reason: &str| CsiError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    if let Some(path) = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
    {
        if path.is_empty() {
            return Err(invalid("empty socket path"));
        }
        return Ok(Target::Unix);
    }
    if let Some(rest) = endpoint.strip_prefix("https://") {
        return Ok(Target::Tls(rest.to_string()));
    }
    if let Some(rest) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("tcp://"))
    {
        return Ok(Target::Plain(rest.to_string()));
    }
    if endpoint.contains("://") {
        return Err(invalid("unsupported scheme"));
    }
    // A bare `host:port`, as in a SnapshotMetadataService `spec.address`: TLS, as the sidecar serves.
    if endpoint
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
    {
        return Ok(Target::Tls(endpoint.to_string()));
    }
    Err(invalid(
        "expected unix:///path, https://host:port, http://host:port or host:port",
    ))
}

fn host_of(authority: &str) -> String {
    let hostport = authority.split('/').next().unwrap_or(authority);
    if let Some(rest) = hostport.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    hostport
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(hostport)
        .to_string()
}

/// Connects according to `config`.
pub(super) async fn connect(config: &ClientConfig) -> Result<Channel, CsiError> {
    let ep_str = config.endpoint.as_str();
    let invalid = |reason: String| CsiError::InvalidEndpoint {
        endpoint: ep_str.to_string(),
        reason,
    };
    let endpoint = match classify(ep_str)? {
        Target::Unix => {
            if config.ca_pem.is_some() || config.server_name.is_some() {
                return Err(CsiError::Tls {
                    endpoint: ep_str.to_string(),
                    reason: "TLS settings (CA, server name) cannot be used on a unix socket".into(),
                });
            }
            Endpoint::from_shared(ep_str.to_string()).map_err(|e| invalid(e.to_string()))?
        }
        Target::Plain(authority) => Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| invalid(e.to_string()))?,
        Target::Tls(authority) => {
            let mut tls = ClientTlsConfig::new();
            match &config.ca_pem {
                Some(pem) => {
                    if !String::from_utf8_lossy(pem).contains("-----BEGIN CERTIFICATE-----") {
                        return Err(CsiError::Tls {
                            endpoint: ep_str.to_string(),
                            reason: "the CA bundle contains no PEM certificate (expected -----BEGIN CERTIFICATE-----)".into(),
                        });
                    }
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                None => tls = tls.with_native_roots(),
            }
            let name = config
                .server_name
                .clone()
                .unwrap_or_else(|| host_of(&authority));
            tls = tls.domain_name(name);
            Endpoint::from_shared(format!("https://{authority}"))
                .map_err(|e| invalid(e.to_string()))?
                .tls_config(tls)
                .map_err(|e| CsiError::Tls {
                    endpoint: ep_str.to_string(),
                    reason: error_chain(&e),
                })?
        }
    };
    endpoint
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| {
            let reason = error_chain(&e);
            // A certificate the CA does not vouch for (or for another name) will not change on
            // retry: it is configuration (the CA bundle or the server name), not a network fault.
            if is_certificate_rejection(&reason) {
                CsiError::Tls {
                    endpoint: ep_str.to_string(),
                    reason: format!(
                        "{reason}; the server's certificate does not chain to the given CA or is not for this server name"
                    ),
                }
            } else {
                CsiError::Connect {
                    endpoint: ep_str.to_string(),
                    reason,
                }
            }
        })
}

/// True when a connection failed because rustls refused the server's certificate.
fn is_certificate_rejection(chain: &str) -> bool {
    chain.contains("invalid peer certificate")
}

/// Joins an error and its sources: tonic's top-level transport error says little on its own.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_classified() {
        assert!(matches!(
            classify("unix:///run/csi/socket"),
            Ok(Target::Unix)
        ));
        assert!(
            matches!(classify("https://svc.ns:6443"), Ok(Target::Tls(a)) if a == "svc.ns:6443")
        );
        assert!(matches!(classify("svc.ns:6443"), Ok(Target::Tls(_))));
        assert!(matches!(
            classify("tcp://127.0.0.1:1"),
            Ok(Target::Plain(_))
        ));
        assert!(classify("unix://").is_err());
        assert!(classify("ftp://x:1").is_err());
        assert!(classify("nonsense").is_err());
        assert_eq!(host_of("svc.ns:6443"), "svc.ns");
        assert_eq!(host_of("[::1]:6443"), "::1");
    }
}
