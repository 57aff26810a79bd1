//! `TestApp::spawn`: the gateway and all four services in-process, on a fresh vhost and fresh
//! databases, talking over real sockets to the real broker.

pub mod broker;
pub mod database;
pub mod load;
pub mod proxy;
pub mod tls;

use std::{future::Future, net::SocketAddr, time::Duration};

pub use database::Backend;
use sluice::bus::{RpcClient, Tap};
use sluice::config::{BusConfig, ServiceConfig};
use sluice::events::OrderItem;
use sluice::pb::{
    GetOrderRequest, GetStockReply, GetStockRequest, Order, OrderStatus, PlaceOrderRequest, PlaceOrderResponse,
    order_service_client::OrderServiceClient,
};
use sluice::shutdown::Shutdown;
use sluice::telemetry::{LogFormat, TelemetryConfig};
use sluice_inventory::{Catalog, CatalogItem};
use tonic::{Status, transport::Channel};

/// How long a test waits for the platform to reach a state before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A port free on 127.0.0.1 now, for a child process to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running platform for one test.
pub struct TestApp {
    pub gateway: OrderServiceClient<Channel>,
    pub addr: SocketAddr,
    /// The test's own view of the broker (direct, never through the proxy).
    pub bus: BusConfig,
    pub rpc: RpcClient,
    /// Between the platform and RabbitMQ, when spawned with `Options::proxy`.
    pub proxy: Option<proxy::Proxy>,
    /// The TLS proxy every platform connection goes through, when spawned with `Options::amqps`.
    pub amqps: Option<tls::Amqps>,
    services: Vec<Service>,
    shutdown: Shutdown,
    // Declared last: dropped after the platform stopped.
    databases: database::Databases,
    _vhost: broker::Vhost,
    _broker: broker::BrokerGuard,
}

/// How to spawn a test platform.
pub struct Options {
    pub backend: Backend,
    pub catalog: Catalog,
    /// Route every platform connection through a controllable TCP proxy.
    pub proxy: bool,
    /// Take the broker for this test alone (it restarts the broker or raises alarms).
    pub exclusive: bool,
    /// Services the test runs itself (as processes, see `service_env`), not in-process.
    pub external: Vec<&'static str>,
    /// Reach the broker over `amqps://` through a TLS-terminating proxy, trusting a CA made
    /// for the test (`SLUICE_AMQP_CA_FILE`).
    pub amqps: bool,
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Self { backend, catalog: test_catalog(), proxy: false, exclusive: false, external: Vec::new(), amqps: false }
    }
}

/// A catalog for tests: plenty of SKU-1, and SKU-LIMITED with 5 units.
pub fn test_catalog() -> Catalog {
    let item = |sku: &str, price_cents, stock| CatalogItem { sku: sku.into(), name: format!("{sku} name"), price_cents, stock };
    Catalog::new(vec![item("SKU-1", 1_800, 1_000_000), item("SKU-2", 1_200, 1_000), item("SKU-LIMITED", 2_500, 5)]).unwrap()
}

/// Writes `catalog` as the JSON file `SLUICE_CATALOG` names (`[{"sku","name","price_cents","stock"}]`).
pub fn write_catalog(catalog: &Catalog, path: &std::path::Path) {
    let items: Vec<serde_json::Value> = catalog
        .items()
        .iter()
        .map(|i| serde_json::json!({"sku": i.sku, "name": i.name, "price_cents": i.price_cents, "stock": i.stock}))
        .collect();
    std::fs::write(path, serde_json::to_string(&items).expect("JSON")).expect("writing the catalog");
}

/// A valid order for `quantity` units of `sku`.
pub fn an_order(sku: &str, quantity: u32, token: &str) -> PlaceOrderRequest {
    PlaceOrderRequest {
        customer_id: "c-1".into(),
        items: vec![OrderItem { sku: sku.into(), quantity }],
        payment_token: token.into(),
        idempotency_key: String::new(),
    }
}

fn quiet_telemetry(name: &str) -> TelemetryConfig {
    TelemetryConfig { service_name: name.into(), otlp_endpoint: None, log_format: LogFormat::Json }
}

/// Logs for a failing test: `TEST_LOG=1 cargo test ...`.
fn init_test_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber_init();
    }
    sluice::telemetry::init_propagation();
}

fn tracing_subscriber_init() -> Result<(), Box<dyn std::error::Error>> {
    let config = TelemetryConfig { service_name: "test".into(), otlp_endpoint: None, log_format: LogFormat::Pretty };
    std::mem::forget(sluice::telemetry::init(&config)?);
    Ok(())
}

/// One in-process service, which a test can stop and start again.
struct Service {
    name: &'static str,
    config: ServiceConfig,
    catalog: Option<Catalog>,
    shutdown: Shutdown,
}

impl Service {
    async fn start(&mut self, parent: &Shutdown) {
        let consumer = match self.name {
            "inventory" => {
                let config = sluice_inventory::Config { service: self.config.clone(), catalog: self.catalog.clone().unwrap() };
                sluice_inventory::start(&config).await
            }
            "payment" => sluice_payment::start(&self.config).await,
            "notification" => sluice_notification::start(&self.config).await,
            "orders" => sluice_orders::start(&self.config).await,
            other => panic!("unknown service {other}"),
        }
        .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.shutdown = parent.child();
        let shutdown = self.shutdown.clone();
        self.shutdown.spawn(consumer.run(shutdown));
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_opts(Options::new(backend)).await
    }

    pub async fn spawn_opts(options: Options) -> Self {
        init_test_logs();
        let guard = if options.exclusive { broker::exclusive().await } else { broker::shared().await };
        let vhost = broker::Vhost::create();
        let mut bus = BusConfig::for_url(vhost.url());
        bus.retry.base = Duration::from_millis(200);
        bus.retry.max_delay = Duration::from_secs(2);
        bus.retry.max_attempts = 8;
        let proxy = if options.proxy { Some(proxy::Proxy::start(broker::amqp_addr()).await) } else { None };
        let mut platform_bus = bus.clone();
        if options.backend == Backend::Postgres {
            // Each service's pool may grow to 16 PostgreSQL connections when its queues have
            // that many handlers running; with a few tests at once that exhausts the server's
            // 100 (`too many clients`), and deliveries fail until they are dead-lettered. Eight
            // handlers per queue keep a test's platform well under its share.
            platform_bus.prefetch = Some(8);
        }
        if let Some(proxy) = &proxy {
            platform_bus.url = proxy.url(&vhost.name);
            platform_bus.confirm_timeout = Duration::from_secs(2);
        }
        let amqps = if options.amqps { Some(tls::Amqps::start().await) } else { None };
        if let Some(amqps) = &amqps {
            platform_bus.url = amqps.proxy.url(&vhost.name);
            platform_bus = platform_bus.with_ca_file(amqps.pki.ca_file()).expect("the test CA is usable");
        }
        let mut databases = database::Databases::new(options.backend);
        let shutdown = Shutdown::new();
        let mut services = Vec::new();
        for name in ["inventory", "payment", "notification", "orders"] {
            let config = ServiceConfig {
                bus: platform_bus.clone(),
                database_url: databases.url_for(name).await,
                telemetry: quiet_telemetry(name),
                ops_addr: None,
            };
            let catalog = (name == "inventory").then(|| options.catalog.clone());
            let mut service = Service { name, config, catalog, shutdown: Shutdown::new() };
            if !options.external.contains(&name) {
                service.start(&shutdown).await;
            }
            services.push(service);
        }
        let mut gateway_config = sluice_gateway::Config::for_bus(platform_bus.clone());
        if proxy.is_some() {
            gateway_config.query_timeout = Duration::from_secs(2);
        }
        let gateway = sluice_gateway::Gateway::bind(gateway_config).await.expect("binding the gateway");
        let addr = gateway.local_addr();
        shutdown.spawn(gateway.run(shutdown.clone()));
        let client = OrderServiceClient::connect(format!("http://{addr}")).await.expect("connecting to the gateway");
        let rpc = RpcClient::connect(&bus, "test").await.expect("connecting an rpc client");
        Self {
            gateway: client,
            addr,
            bus,
            rpc,
            proxy,
            amqps,
            services,
            shutdown,
            databases,
            _vhost: vhost,
            _broker: guard,
        }
    }

    /// The environment that runs `name` as a process (`sluice-<name>` reads the same
    /// variables), on this test's vhost and database.
    pub fn service_env(&self, name: &str) -> Vec<(String, String)> {
        let service = self.services.iter().find(|s| s.name == name).expect("a known service");
        let bus = &service.config.bus;
        let mut env = vec![
            ("SLUICE_AMQP_URL".to_owned(), bus.url.clone()),
            ("DATABASE_URL".to_owned(), service.config.database_url.clone()),
            ("SLUICE_RETRY_BASE_MS".to_owned(), bus.retry.base.as_millis().to_string()),
            ("SLUICE_RETRY_MAX_DELAY_MS".to_owned(), bus.retry.max_delay.as_millis().to_string()),
            ("SLUICE_RETRY_MAX_ATTEMPTS".to_owned(), bus.retry.max_attempts.to_string()),
            ("SLUICE_OPS_ADDR".to_owned(), "off".to_owned()),
        ];
        if let Some(prefetch) = bus.prefetch {
            env.push(("SLUICE_PREFETCH".to_owned(), prefetch.to_string()));
        }
        if let Some(amqps) = &self.amqps {
            // As an operator configures it: the plain amqps:// URL, and the CA file beside it.
            let url = env.iter_mut().find(|(name, _)| name == "SLUICE_AMQP_URL").expect("the URL is set");
            url.1 = amqps.proxy.url(&self._vhost.name);
            env.push(("SLUICE_AMQP_CA_FILE".to_owned(), amqps.pki.ca_file().display().to_string()));
        }
        if let Some(catalog) = &service.catalog {
            let path = self.databases.file("catalog.json");
            write_catalog(catalog, &path);
            env.push(("SLUICE_CATALOG".to_owned(), path.display().to_string()));
        }
        env
    }

    /// The database URL of service `name` (for reading its tables in assertions).
    pub fn database_url(&self, name: &str) -> String {
        self.services.iter().find(|s| s.name == name).expect("a known service").config.database_url.clone()
    }

    /// The test's vhost.
    pub fn vhost(&self) -> &str {
        &self._vhost.name
    }

    /// Stops one service cleanly (SIGTERM-like) and waits for it.
    pub async fn stop_service(&mut self, name: &str) {
        let service = self.services.iter_mut().find(|s| s.name == name).expect("a known service");
        service.shutdown.trigger();
        tokio::time::timeout(DEADLINE, service.shutdown.wait()).await.expect("the service did not stop in time");
    }

    /// Starts a stopped service again, on the same database.
    pub async fn start_service(&mut self, name: &str) {
        let shutdown = self.shutdown.clone();
        let service = self.services.iter_mut().find(|s| s.name == name).expect("a known service");
        service.start(&shutdown).await;
    }

    /// Places an order through the gateway.
    pub async fn place(&self, request: PlaceOrderRequest) -> Result<PlaceOrderResponse, Status> {
        self.gateway.clone().place_order(request).await.map(|r| r.into_inner())
    }

    /// GetOrder through the gateway.
    pub async fn get(&self, order_id: &str) -> Result<Order, Status> {
        self.gateway.clone().get_order(GetOrderRequest { order_id: order_id.into() }).await.map(|r| r.into_inner())
    }

    /// Waits until the order satisfies `done`, or panics with its last state.
    pub async fn wait_for(&self, order_id: &str, done: impl Fn(&Order) -> bool) -> Order {
        self.try_wait_for(order_id, done)
            .await
            .unwrap_or_else(|last| panic!("order {order_id} did not reach the expected state; last seen: {last:#?}"))
    }

    /// Waits until the order satisfies `done`; `Err` holds its last state if it never did.
    pub async fn try_wait_for(&self, order_id: &str, done: impl Fn(&Order) -> bool) -> Result<Order, Option<Order>> {
        let mut last = None;
        let found = eventually(
            || {
                let order_id = order_id.to_owned();
                async move { self.get(&order_id).await.ok() }
            },
            &done,
            &mut last,
        )
        .await;
        found.ok_or(last)
    }

    /// Waits for a terminal status with the full history of that outcome projected.
    pub async fn wait_for_outcome(&self, order_id: &str) -> Order {
        self.try_wait_for_outcome(order_id)
            .await
            .unwrap_or_else(|last| panic!("order {order_id} did not reach a terminal status; last seen: {last:#?}"))
    }

    /// [`TestApp::wait_for_outcome`], with the order's last state as `Err` if it never got there.
    pub async fn try_wait_for_outcome(&self, order_id: &str) -> Result<Order, Option<Order>> {
        self.try_wait_for(order_id, |o| match o.status() {
            OrderStatus::Completed => has_events(o, &["order.created", "inventory.reserved", "payment.captured", "notification.sent"]),
            OrderStatus::Rejected => has_events(o, &["order.created", "inventory.rejected", "notification.sent"]),
            // The release and the notification both react to the decline: either may come first.
            OrderStatus::Declined => {
                let mut events: Vec<&str> = o.history.iter().map(|h| h.event.as_str()).collect();
                if events.len() > 3 {
                    events[3..].sort_unstable();
                }
                events == ["order.created", "inventory.reserved", "payment.declined", "inventory.released", "notification.sent"]
            }
            _ => false,
        })
        .await
    }

    /// Every queue of this test's vhost with its ready messages and consumers (a passive
    /// declare each, on the test's own connection): what a failing test prints to show where
    /// the flow stopped.
    pub async fn queue_report(&self) -> String {
        let names = broker::admin().queue_names(self.vhost()).unwrap_or_default();
        let Ok(connection) = lapin::Connection::connect(&self.bus.url, lapin::ConnectionProperties::default()).await else {
            return "(no connection to the broker)".into();
        };
        let mut report = Vec::new();
        for name in names {
            let line = match connection.create_channel().await {
                Ok(channel) => {
                    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
                    match channel.queue_declare(name.as_str().into(), passive, lapin::types::FieldTable::default()).await {
                        Ok(q) => format!("{name}: {} ready, {} consumers", q.message_count(), q.consumer_count()),
                        Err(e) => format!("{name}: {e}"),
                    }
                }
                Err(e) => format!("{name}: {e}"),
            };
            report.push(line);
        }
        let _ = connection.close(200, "done".into()).await;
        report.join("\n")
    }

    /// Current stock of `sku`, asked of the inventory service.
    pub async fn stock(&self, sku: &str) -> GetStockReply {
        self.rpc.call(&GetStockRequest { sku: sku.into() }, Duration::from_secs(5)).await.expect("asking inventory for stock")
    }

    /// A tap on this test's broker.
    pub async fn tap(&self, patterns: &[&str]) -> Tap {
        Tap::open(&self.bus, patterns).await.expect("opening a tap")
    }

    /// Stops every process cleanly and waits for them.
    pub async fn stop(self) {
        self.shutdown.trigger();
        for service in &self.services {
            tokio::time::timeout(DEADLINE, service.shutdown.wait()).await.expect("a service did not stop in time");
        }
        tokio::time::timeout(DEADLINE, self.shutdown.wait()).await.expect("the platform did not stop in time");
        self.rpc.close().await;
    }
}

/// Whether the order's history holds exactly these events, in this order.
pub fn has_events(order: &Order, events: &[&str]) -> bool {
    order.history.iter().map(|h| h.event.as_str()).collect::<Vec<_>>() == events
}

/// Polls `probe` until `done` holds or [`DEADLINE`] passes; `last` keeps the last value seen.
pub async fn eventually<T, F, Fut>(probe: F, done: impl Fn(&T) -> bool, last: &mut Option<T>) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut interval = tokio::time::interval(Duration::from_millis(50));
    while tokio::time::Instant::now() < deadline {
        interval.tick().await;
        if let Some(value) = probe().await {
            if done(&value) {
                return Some(value);
            }
            *last = Some(value);
        }
    }
    None
}

/// Takes the next message from `queue`, waiting up to [`DEADLINE`] for one to arrive.
pub async fn take_next(channel: &lapin::Channel, queue: &str) -> lapin::message::Delivery {
    let mut last = None;
    let found = eventually(
        || async {
            channel
                .basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
                .map(|m| m.delivery)
        },
        |_| true,
        &mut last,
    )
    .await;
    found.unwrap_or_else(|| panic!("no message in {queue}"))
}

/// Generates one test per backend from `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}
