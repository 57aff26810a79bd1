//! Optional server TLS for the gRPC port: a certificate chain and its private key, PEM files
//! named by `SLUICE_TLS_CERT` and `SLUICE_TLS_KEY`. Both are read and checked at start-up
//! (rustls on ring, the same code that will serve), so a bad file stops the process with a
//! message naming its variable instead of failing the first handshake.
//!
//! Health and reflection are served on the same port, so they use TLS too. The ops endpoint
//! (`/health/*`, `/metrics`) stays plain HTTP.

use std::fmt;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use sluice::config::{ConfigError, Source};
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// The variable naming the certificate chain (PEM, the server's certificate first).
pub const CERT_VAR: &str = "SLUICE_TLS_CERT";
/// The variable naming the private key (PEM: PKCS#8, PKCS#1 or SEC1).
pub const KEY_VAR: &str = "SLUICE_TLS_KEY";

/// A checked certificate chain and key.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    /// Secret: never shown (see `Debug`).
    key_pem: Vec<u8>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").field("cert_pem_bytes", &self.cert_pem.len()).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads `SLUICE_TLS_CERT` and `SLUICE_TLS_KEY`: both unset means plaintext; one without
    /// the other is an error.
    pub fn from_source(source: &impl Source) -> Result<Option<Self>, ConfigError> {
        match (source.get(CERT_VAR), source.get(KEY_VAR)) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::new(KEY_VAR, "", format!("must be set together with {CERT_VAR}"))),
            (None, Some(_)) => Err(ConfigError::new(CERT_VAR, "", format!("must be set together with {KEY_VAR}"))),
            (Some(cert), Some(key)) => {
                let read = |name: &'static str, path: &str| {
                    std::fs::read(path).map_err(|e| ConfigError::new(name, path, format!("cannot read the file: {e}")))
                };
                Self::check(read(CERT_VAR, &cert)?, read(KEY_VAR, &key)?, &cert, &key).map(Some)
            }
        }
    }

    /// A checked chain and key from PEM text.
    pub fn from_pem(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Result<Self, ConfigError> {
        Self::check(cert_pem.into(), key_pem.into(), "<pem>", "<pem>")
    }

    fn check(cert_pem: Vec<u8>, key_pem: Vec<u8>, cert_shown: &str, key_shown: &str) -> Result<Self, ConfigError> {
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new(CERT_VAR, cert_shown, format!("not a PEM certificate file: {e}")))?;
        if certs.is_empty() {
            return Err(ConfigError::new(CERT_VAR, cert_shown, "holds no PEM certificate"));
        }
        PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| ConfigError::new(KEY_VAR, key_shown, format!("holds no PEM private key: {e}")))?;
        let tls = Self { cert_pem, key_pem };
        // Builds the acceptor the server will use: this also checks that the key belongs to
        // the certificate.
        Server::builder()
            .tls_config(tls.server_config())
            .map_err(|e| ConfigError::new(KEY_VAR, key_shown, format!("unusable with {CERT_VAR}: {}", source_chain(&e))))?;
        Ok(tls)
    }

    /// The tonic server configuration (HTTP/2 over TLS 1.2 or 1.3, no client certificates).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// `error: its source: ...`, because tonic's transport error shows only its outer layer.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_files_or_neither() {
        assert!(ServerTls::from_source(&[("UNRELATED", "x")]).unwrap().is_none());
        let err = ServerTls::from_source(&[(CERT_VAR, "/tmp/cert.pem")]).unwrap_err();
        assert_eq!(err.name, KEY_VAR);
        let err = ServerTls::from_source(&[(KEY_VAR, "/tmp/key.pem")]).unwrap_err();
        assert_eq!(err.name, CERT_VAR);
        let err = ServerTls::from_source(&[(CERT_VAR, "/nonexistent/cert.pem"), (KEY_VAR, "/nonexistent/key.pem")]).unwrap_err();
        assert_eq!(err.name, CERT_VAR);
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

    #[test]
    fn garbage_is_refused_naming_its_variable() {
        assert_eq!(ServerTls::from_pem("hello", "world").unwrap_err().name, CERT_VAR);
        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert_eq!(ServerTls::from_pem(cert, "world").unwrap_err().name, KEY_VAR);
    }
}
