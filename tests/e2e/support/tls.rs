//! Certificates made in the test, and a TLS-terminating proxy in front of the broker.
//!
//! `TestPki` is a private CA and a server certificate for `localhost` and `127.0.0.1` signed
//! by it, written as PEM files in a temporary directory. The local RabbitMQ has no TLS
//! listener, so `TlsProxy` accepts TLS with that certificate (rustls on ring) and forwards the
//! plaintext to the broker's AMQP port, counting the handshakes it completed.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    },
};
use tokio_util::sync::CancellationToken;

/// A CA and a server certificate it signed, as PEM text and files.
pub struct TestPki {
    dir: PathBuf,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    /// A new CA, and a certificate for `localhost` / `127.0.0.1` signed by it.
    pub fn generate() -> Self {
        Self::generate_named("Sluice test CA")
    }

    /// Like [`TestPki::generate`], with the CA's common name.
    pub fn generate_named(ca_name: &str) -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, ca_name);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let mut server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        server.distinguished_name.push(DnType::CommonName, "localhost");
        server.use_authority_key_identifier_extension = true;
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().unwrap();
        let server_cert = server.signed_by(&server_key, &issuer).unwrap();

        let dir = std::env::temp_dir().join(format!("sluice-pki-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Self { dir, ca_pem: ca_cert.pem(), cert_pem: server_cert.pem(), key_pem: server_key.serialize_pem() };
        std::fs::write(pki.ca_file(), &pki.ca_pem).unwrap();
        std::fs::write(pki.cert_file(), &pki.cert_pem).unwrap();
        std::fs::write(pki.key_file(), &pki.key_pem).unwrap();
        pki
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate (PEM).
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key (PEM, PKCS#8).
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// A file in this PKI's directory (removed with it).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn server_config(&self) -> ServerConfig {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        ServerConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A CA, and a TLS proxy in front of the test broker presenting a certificate it signed.
pub struct Amqps {
    pub proxy: TlsProxy,
    pub pki: TestPki,
}

impl Amqps {
    pub async fn start() -> Self {
        let pki = TestPki::generate();
        let proxy = TlsProxy::start(super::broker::amqp_addr(), &pki).await;
        Self { proxy, pki }
    }
}

/// Accepts TLS, forwards plaintext to `upstream`.
pub struct TlsProxy {
    pub addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl TlsProxy {
    pub async fn start(upstream: SocketAddr, pki: &TestPki) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the TLS proxy");
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(pki.server_config()));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, acceptor, upstream, handshakes.clone(), stop.clone()));
        Self { addr, handshakes, stop }
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// The `amqps://` URL of `vhost` through this proxy (no CA in it).
    pub fn url(&self, vhost: &str) -> String {
        format!("amqps://guest:guest@localhost:{}/{vhost}", self.addr.port())
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept(listener: TcpListener, acceptor: TlsAcceptor, upstream: SocketAddr, handshakes: Arc<AtomicUsize>, stop: CancellationToken) {
    loop {
        let client = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => client,
                Err(_) => return,
            },
        };
        let (acceptor, handshakes, stop) = (acceptor.clone(), handshakes.clone(), stop.clone());
        tokio::spawn(async move {
            // A client that does not trust the certificate fails here, and is not counted.
            let Ok(mut tls) = acceptor.accept(client).await else { return };
            handshakes.fetch_add(1, Ordering::SeqCst);
            let Ok(mut server) = TcpStream::connect(upstream).await else { return };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut tls, &mut server) => {}
            }
        });
    }
}
