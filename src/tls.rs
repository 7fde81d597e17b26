//! TLS pieces the PostgreSQL and ClickHouse clients share: one crypto provider (ring, so no C
//! toolchain beyond what the build already needs) and trust anchors, either from a CA file the
//! operator names or from the system's store. Kafka's TLS lives inside librdkafka (OpenSSL).

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file as trust anchors.
pub fn roots_from_pem(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: holds no certificate", path.display()));
    }
    Ok(roots)
}

/// The system's trust store (`/etc/ssl/certs` on Debian), for servers with public certificates.
pub fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(format!(
            "no CA certificates in the system store ({}); name a CA file instead",
            found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "empty".into())
        ));
    }
    Ok(roots)
}

/// A client configuration that verifies the server's chain and name against `ca_file`, or against
/// the system's store without one.
pub fn verifying_client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let roots = match ca_file {
        Some(path) => roots_from_pem(path)?,
        None => system_roots()?,
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether a TLS handshake failed somewhere in the causes. tokio-rustls and hyper-rustls wrap the
/// rustls error in `io::Error`s, whose `source` skips the wrapped error, so look inside those.
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        if is_tls_failure(inner) {
            return true;
        }
    }
    e.source().is_some_and(is_tls_failure)
}
