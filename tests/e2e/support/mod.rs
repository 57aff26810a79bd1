//! `TestApp::spawn`: the gateway and all four services in-process, on a fresh vhost and fresh
//! databases, talking over real sockets to the real broker.

pub mod broker;
pub mod database;

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

/// A running platform for one test.
pub struct TestApp {
    pub gateway: OrderServiceClient<Channel>,
    pub addr: SocketAddr,
    pub bus: BusConfig,
    pub rpc: RpcClient,
    shutdown: Shutdown,
    // Declared last: dropped after the platform stopped.
    _databases: database::Databases,
    _vhost: broker::Vhost,
}

/// A catalog for tests: plenty of SKU-1, and SKU-LIMITED with 5 units.
pub fn test_catalog() -> Catalog {
    let item = |sku: &str, price_cents, stock| CatalogItem { sku: sku.into(), name: format!("{sku} name"), price_cents, stock };
    Catalog::new(vec![item("SKU-1", 1_800, 1_000_000), item("SKU-2", 1_200, 1_000), item("SKU-LIMITED", 2_500, 5)]).unwrap()
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

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, test_catalog()).await
    }

    pub async fn spawn_with(backend: Backend, catalog: Catalog) -> Self {
        init_test_logs();
        let vhost = broker::Vhost::create();
        let mut bus = BusConfig::for_url(vhost.url());
        bus.retry.base = Duration::from_millis(200);
        bus.retry.max_delay = Duration::from_secs(2);
        let mut databases = database::Databases::new(backend);
        let shutdown = Shutdown::new();
        let service = |name: &'static str, url: String| ServiceConfig {
            bus: bus.clone(),
            database_url: url,
            telemetry: quiet_telemetry(name),
            ops_addr: None,
        };
        let inventory = sluice_inventory::Config { service: service("inventory", databases.url_for("inventory").await), catalog };
        let payment = service("payment", databases.url_for("payment").await);
        let notification = service("notification", databases.url_for("notification").await);
        let orders = service("orders", databases.url_for("orders").await);

        let consumers = vec![
            sluice_inventory::start(&inventory).await.expect("starting inventory"),
            sluice_payment::start(&payment).await.expect("starting payment"),
            sluice_notification::start(&notification).await.expect("starting notification"),
            sluice_orders::start(&orders).await.expect("starting orders"),
        ];
        for consumer in consumers {
            shutdown.spawn(consumer.run(shutdown.clone()));
        }
        let gateway = sluice_gateway::Gateway::bind(sluice_gateway::Config::for_bus(bus.clone())).await.expect("binding the gateway");
        let addr = gateway.local_addr();
        shutdown.spawn(gateway.run(shutdown.clone()));
        let client = OrderServiceClient::connect(format!("http://{addr}")).await.expect("connecting to the gateway");
        let rpc = RpcClient::connect(&bus, "test").await.expect("connecting an rpc client");
        Self { gateway: client, addr, bus, rpc, shutdown, _databases: databases, _vhost: vhost }
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
        let mut last = None;
        let found = eventually(|| {
            let order_id = order_id.to_owned();
            async move { self.get(&order_id).await.ok() }
        }, |order| {
            let ok = done(order);
            ok
        }, &mut last)
        .await;
        found.unwrap_or_else(|| panic!("order {order_id} did not reach the expected state; last seen: {last:#?}"))
    }

    /// Waits for a terminal status with the full history of that outcome projected.
    pub async fn wait_for_outcome(&self, order_id: &str) -> Order {
        self.wait_for(order_id, |o| match o.status() {
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
