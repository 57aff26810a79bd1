//! A fresh RabbitMQ vhost per test, created and deleted through the management API
//! ([`sluice::bus::admin`]), so tests run in parallel against one broker and leave nothing
//! behind.

use sluice::bus::admin::Admin;

/// Where the broker is. Override with `SLUICE_TEST_AMQP` (`amqp://user:pass@host:port`, no
/// vhost) and `SLUICE_TEST_RABBITMQ_API` (`http://host:15672`).
pub fn amqp_base() -> String {
    std::env::var("SLUICE_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

pub fn api_base() -> String {
    std::env::var("SLUICE_TEST_RABBITMQ_API").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// The management API, as the test user.
pub fn admin() -> &'static Admin {
    static ADMIN: std::sync::LazyLock<Admin> =
        std::sync::LazyLock::new(|| Admin::new(&amqp_base(), &api_base()).expect("SLUICE_TEST_AMQP is an AMQP URL"));
    &ADMIN
}

/// The broker is shared by every test; a test that restarts it or raises an alarm takes it
/// alone. Every other test holds a shared guard while it uses the broker.
static BROKER: std::sync::LazyLock<std::sync::Arc<tokio::sync::RwLock<()>>> = std::sync::LazyLock::new(Default::default);

/// Held while a test uses the broker.
pub enum BrokerGuard {
    Shared(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>),
}

/// The broker, shared with other tests.
pub async fn shared() -> BrokerGuard {
    BrokerGuard::Shared(BROKER.clone().read_owned().await)
}

/// The broker, for this test alone.
pub async fn exclusive() -> BrokerGuard {
    BrokerGuard::Exclusive(BROKER.clone().write_owned().await)
}

/// host:port of the AMQP listener.
pub fn amqp_addr() -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let uri: lapin::uri::AMQPUri = amqp_base().parse().expect("SLUICE_TEST_AMQP is an AMQP URL");
    (uri.authority.host.as_str(), uri.authority.port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .expect("SLUICE_TEST_AMQP names a reachable host:port")
}

/// The routing keys bound to `exchange` in `vhost`, as the management API lists them
/// (bindings are listed at once, unlike the API's statistics); none while the exchange does
/// not exist.
pub fn binding_keys(vhost: &str, exchange: &str) -> Vec<String> {
    match admin().bindings(vhost, exchange) {
        Ok(bindings) => bindings.into_iter().map(|b| b.routing_key).collect(),
        Err(e) if e.status().is_some() => Vec::new(),
        Err(e) => panic!("listing bindings: {e}"),
    }
}

/// A vhost that exists for the lifetime of this value.
#[derive(Debug)]
pub struct Vhost {
    pub name: String,
}

impl Vhost {
    /// Creates `sluice-test-<uuid>` and grants the test user everything on it.
    pub fn create() -> Self {
        let name = format!("sluice-test-{}", uuid::Uuid::new_v4().simple());
        admin().create_vhost(&name).unwrap_or_else(|e| panic!("creating vhost {name}: {e}"));
        Self { name }
    }

    /// The AMQP URL of this vhost.
    pub fn url(&self) -> String {
        format!("{}/{}", amqp_base(), self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = admin().delete_vhost(&self.name);
    }
}
