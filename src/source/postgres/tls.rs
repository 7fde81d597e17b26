//! TLS to PostgreSQL, for the replication connection and the SQL sessions alike, with libpq's
//! `sslmode` meanings: `disable`, `prefer` (TLS when the server offers it, unverified), `require`
//! (TLS, unverified), `verify-ca` (the chain must lead to `sslrootcert`), `verify-full` (and the
//! certificate must name the host).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::tls::{provider, roots_from_pem};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }
}

/// The TLS part of the PostgreSQL settings.
#[derive(Clone)]
pub struct PgTls {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    config: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} (root cert {:?})", self.mode, self.root_cert)
    }
}

impl PgTls {
    pub fn new(mode: SslMode, root_cert: Option<PathBuf>) -> Result<Self, String> {
        let config = match mode {
            SslMode::Disable => None,
            _ => Some(Arc::new(client_config(mode, root_cert.as_deref())?)),
        };
        Ok(PgTls {
            mode,
            root_cert,
            config,
        })
    }

    /// The rustls configuration, unless TLS is disabled.
    pub fn client_config(&self) -> Option<Arc<ClientConfig>> {
        self.config.clone()
    }
}

fn client_config(mode: SslMode, root_cert: Option<&Path>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => Arc::new(AcceptAny(provider())),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let path = root_cert.ok_or_else(|| {
                "sslmode verify-ca and verify-full need the CA certificate: --pg-sslrootcert FILE (or sslrootcert= in the URL)".to_string()
            })?;
            let roots = roots_from_pem(path)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The server name to verify against: an IP address or a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))
}

/// `sslmode=require` as libpq means it: encrypted, not authenticated.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to the root, whatever name the certificate carries.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end, intermediates, name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(CertificateError::NotValidForName))
            | Err(TlsError::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            })) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Takes `sslmode` and `sslrootcert` out of a URL or key=value string (tokio-postgres knows only
/// some sslmodes and no sslrootcert) and returns the rest with them.
pub fn split_tls_params(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    if let Some((base, query)) = url.split_once('?') {
        let mut kept = Vec::new();
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("sslmode", v)) => mode = Some(v.to_string()),
                Some(("sslrootcert", v)) => root = Some(v.to_string()),
                _ => kept.push(kv),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, mode, root);
    }
    if url.contains("://") {
        return (url.to_string(), None, None);
    }
    let mut kept = Vec::new();
    for kv in url.split_whitespace() {
        match kv.split_once('=') {
            Some(("sslmode", v)) => mode = Some(v.to_string()),
            Some(("sslrootcert", v)) => root = Some(v.to_string()),
            _ => kept.push(kv),
        }
    }
    (kept.join(" "), mode, root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_come_out_of_urls() {
        let (rest, mode, root) = split_tls_params(
            "postgres://u@h/db?sslmode=verify-full&application_name=x&sslrootcert=/ca.pem",
        );
        assert_eq!(rest, "postgres://u@h/db?application_name=x");
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/ca.pem"));
        let (rest, mode, _) = split_tls_params("host=h user=u sslmode=require");
        assert_eq!(
            (rest.as_str(), mode.as_deref()),
            ("host=h user=u", Some("require"))
        );
        assert!(SslMode::parse("verify-everything").is_err());
        assert!(
            PgTls::new(SslMode::VerifyFull, None).is_err(),
            "verify-full without a CA is refused"
        );
    }
}
