//! A fresh RabbitMQ vhost per test, created and deleted through the management API, so tests
//! run in parallel against one broker and leave nothing behind.

use std::time::Duration;

use base64::Engine as _;

/// Where the broker is. Override with `SLUICE_TEST_AMQP` (`amqp://user:pass@host:port`, no
/// vhost) and `SLUICE_TEST_RABBITMQ_API` (`http://host:15672`).
fn amqp_base() -> String {
    std::env::var("SLUICE_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

fn api_base() -> String {
    std::env::var("SLUICE_TEST_RABBITMQ_API").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

fn credentials() -> (String, String) {
    let base = amqp_base();
    let userinfo = base.split("://").nth(1).and_then(|rest| rest.split('@').next()).unwrap_or("guest:guest");
    let (user, pass) = userinfo.split_once(':').unwrap_or(("guest", "guest"));
    (user.to_owned(), pass.to_owned())
}

fn authorization() -> String {
    let (user, pass) = credentials();
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).http_status_as_error(false).build().into()
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
    let base = amqp_base();
    let hostport = base.rsplit('@').next().unwrap_or("127.0.0.1:5672").trim_end_matches('/');
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    use std::net::ToSocketAddrs;
    hostport.to_socket_addrs().ok().and_then(|mut a| a.next()).expect("SLUICE_TEST_AMQP names a reachable host:port")
}

/// The routing keys bound to `exchange` in `vhost`, as the management API lists them
/// (bindings are listed at once, unlike the API's statistics).
pub fn binding_keys(vhost: &str, exchange: &str) -> Vec<String> {
    let mut response = agent()
        .get(format!("{}/api/exchanges/{vhost}/{exchange}/bindings/source", api_base()))
        .header("Authorization", authorization())
        .call()
        .expect("listing bindings");
    let bindings: Vec<serde_json::Value> = response.body_mut().read_json().unwrap_or_default();
    bindings.iter().filter_map(|b| b["routing_key"].as_str().map(str::to_owned)).collect()
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
        let agent = agent();
        let response = agent
            .put(format!("{}/api/vhosts/{name}", api_base()))
            .header("Authorization", authorization())
            .header("content-type", "application/json")
            .send("{}")
            .unwrap_or_else(|e| {
                panic!("RabbitMQ management API unreachable at {} ({e}); run `rabbitmq-plugins enable rabbitmq_management`", api_base())
            });
        assert!(response.status().is_success(), "creating vhost {name}: HTTP {}", response.status());
        let (user, _) = credentials();
        let response = agent
            .put(format!("{}/api/permissions/{name}/{user}", api_base()))
            .header("Authorization", authorization())
            .header("content-type", "application/json")
            .send(r#"{"configure":".*","write":".*","read":".*"}"#)
            .expect("granting permissions");
        assert!(response.status().is_success(), "granting permissions on {name}: HTTP {}", response.status());
        Self { name }
    }

    /// The AMQP URL of this vhost.
    pub fn url(&self) -> String {
        format!("{}/{}", amqp_base(), self.name)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = agent()
            .delete(format!("{}/api/vhosts/{}", api_base(), self.name))
            .header("Authorization", authorization())
            .call();
    }
}
