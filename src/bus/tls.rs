//! TLS to the broker (`amqps://`): rustls on ring, trusting the system's root certificates
//! and, for a private CA, the PEM file named by the URL's `cacertfile` query parameter
//! (RabbitMQ's URI convention; `SLUICE_AMQP_CA_FILE` sets it, see `config`).
//!
//! The CA file travels in the URL so that every connection a process opens (publisher,
//! consumer, request/reply, tap) trusts the same CA without another parameter. It is read
//! again on every (re)connect, so a renewed CA file needs no restart.

use std::path::{Path, PathBuf};

use lapin::tcp::OwnedTLSConfig;
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject as _},
};
use url::Url;

/// The URL query parameter naming a PEM file of extra trusted CA certificates.
pub const CA_FILE_PARAM: &str = "cacertfile";

/// Reads `path` as PEM CA certificates: at least one, each usable as a trust anchor.
pub fn read_ca_file(path: &Path) -> Result<String, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    let mut roots = RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(certs);
    if unusable > 0 {
        return Err(format!("{}: {unusable} certificate(s) cannot be used as a trust anchor", path.display()));
    }
    Ok(pem)
}

/// `url` with `cacertfile=<path>` set (replacing any earlier one).
pub fn with_ca_file(url: &str, path: &Path) -> Result<String, String> {
    let mut parsed = Url::parse(url).map_err(|e| e.to_string())?;
    remove_ca_file(&mut parsed);
    parsed.query_pairs_mut().append_pair(CA_FILE_PARAM, &path.to_string_lossy());
    Ok(parsed.into())
}

/// Removes `cacertfile` from the query, and the query itself if nothing else is left.
fn remove_ca_file(url: &mut Url) {
    let others: Vec<(String, String)> =
        url.query_pairs().filter(|(k, _)| k != CA_FILE_PARAM).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    if others.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(others);
    }
}

/// The `cacertfile` of `url`, if it names one.
pub fn ca_file_of(url: &str) -> Option<PathBuf> {
    let parsed = Url::parse(url).ok()?;
    parsed.query_pairs().find(|(k, _)| k == CA_FILE_PARAM).map(|(_, v)| PathBuf::from(v.into_owned()))
}

/// What lapin needs to connect to `url`: the URL without Sluice's own parameter, and the TLS
/// settings (the CA file's certificates, read now, on top of the system's roots).
pub(crate) fn client_config(url: &str) -> Result<(String, OwnedTLSConfig), super::Error> {
    let Some(path) = ca_file_of(url) else { return Ok((url.to_owned(), OwnedTLSConfig::default())) };
    let cert_chain = read_ca_file(&path).map_err(super::Error::Tls)?;
    let mut parsed = Url::parse(url).map_err(|e| super::Error::Tls(e.to_string()))?;
    remove_ca_file(&mut parsed);
    Ok((parsed.into(), OwnedTLSConfig { identity: None, cert_chain: Some(cert_chain) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_file_rides_in_the_url_and_is_taken_out_before_connecting() {
        let url = with_ca_file("amqps://u:p@broker:5671/%2f?heartbeat=10", Path::new("/etc/ca dir/ca.pem")).unwrap();
        assert_eq!(ca_file_of(&url), Some(PathBuf::from("/etc/ca dir/ca.pem")));
        assert!(url.starts_with("amqps://u:p@broker:5671/%2f?"), "the vhost stays escaped: {url}");
        let again = with_ca_file(&url, Path::new("/other.pem")).unwrap();
        assert_eq!(ca_file_of(&again), Some(PathBuf::from("/other.pem")), "replaced, not repeated");
        assert_eq!(again.matches(CA_FILE_PARAM).count(), 1);
        // Lapin's own parser accepts the URL and keeps its parameters.
        let uri: lapin::uri::AMQPUri = again.parse().unwrap();
        assert_eq!(uri.query.heartbeat, Some(10));
        assert_eq!(uri.vhost, "/");
        assert_eq!(ca_file_of("amqps://u:p@broker/v"), None);
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("sluice-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        assert!(read_ca_file(&missing).unwrap_err().contains("cannot read"));
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(read_ca_file(&empty).unwrap_err().contains("no PEM certificate"));
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        assert!(read_ca_file(&garbage).is_err());
        let url = with_ca_file("amqps://u:p@broker/v", &missing).unwrap();
        assert!(matches!(client_config(&url), Err(super::super::Error::Tls(_))));
        let (plain, tls) = client_config("amqp://u:p@broker/v").unwrap();
        assert_eq!(plain, "amqp://u:p@broker/v");
        assert!(tls.cert_chain.is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
