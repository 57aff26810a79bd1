//! Prometheus metrics of this process, served as text on the ops endpoint's `/metrics`.
//!
//! One registry per process (the metrics describe the process): publishes, confirms, returns,
//! nacks and confirm latency; deliveries, handler latency, retries, dead letters and in-flight
//! handlers per queue; broker connection state per link; gRPC requests by method and code.

use std::sync::OnceLock;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Label: a routing key (or, for retry and dead-letter moves, the target queue).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    /// The routing key.
    pub routing_key: String,
}

/// Label: a consumer queue.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Queue {
    /// The queue name.
    pub queue: String,
}

/// Labels: a dead-lettered message's queue and reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetter {
    /// The queue it came from.
    pub queue: String,
    /// Why (`rejected`, `retries-exhausted`, `undecodable`, ...).
    pub reason: String,
}

/// Label: a supervised broker connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Link {
    /// Its name (`gateway.publisher`, `inventory.consumer`, ...).
    pub link: String,
}

/// Labels: a gRPC method and the status code it answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rpc {
    /// `/package.Service/Method`.
    pub method: String,
    /// The numeric `grpc-status`.
    pub code: String,
}

fn latency_buckets() -> Histogram {
    // 0.1 ms .. ~3.3 s
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// Every metric of the process.
pub struct Metrics {
    /// Publishes attempted.
    pub published: Family<Route, Counter>,
    /// Publishes the broker confirmed.
    pub confirmed: Family<Route, Counter>,
    /// Mandatory publishes the broker returned as unroutable.
    pub returned: Family<Route, Counter>,
    /// Publishes the broker refused.
    pub nacked: Family<Route, Counter>,
    /// Seconds from publish to confirm.
    pub confirm_latency: Histogram,
    /// Deliveries received.
    pub deliveries: Family<Queue, Counter>,
    /// Database transactions that handled deliveries (one per batch; deliveries / batches is
    /// the mean batch size).
    pub batches: Family<Queue, Counter>,
    /// Seconds spent handling a delivery (decode to outcome).
    pub handler_latency: Family<Queue, Histogram, fn() -> Histogram>,
    /// Deliveries sent for a delayed retry.
    pub retries: Family<Queue, Counter>,
    /// Deliveries dead-lettered.
    pub dead_lettered: Family<DeadLetter, Counter>,
    /// Inbox records deleted after the retention (`SLUICE_INBOX_RETENTION_SECS`).
    pub inbox_pruned: Counter,
    /// Deliveries being handled now.
    pub in_flight: Family<Queue, Gauge>,
    /// 1 while a broker connection is up, 0 otherwise.
    pub connection_up: Family<Link, Gauge>,
    /// gRPC requests answered.
    pub requests: Family<Rpc, Counter>,
    /// Bytes of PublishStream events the gateway is publishing.
    pub stream_buffered_bytes: Gauge,
    /// Bytes of request messages of the gateway's other calls, held until each call answers.
    pub request_buffered_bytes: Gauge,
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let metrics = Self {
            published: Family::default(),
            confirmed: Family::default(),
            returned: Family::default(),
            nacked: Family::default(),
            confirm_latency: latency_buckets(),
            deliveries: Family::default(),
            batches: Family::default(),
            handler_latency: Family::new_with_constructor(latency_buckets),
            retries: Family::default(),
            dead_lettered: Family::default(),
            inbox_pruned: Counter::default(),
            in_flight: Family::default(),
            connection_up: Family::default(),
            requests: Family::default(),
            stream_buffered_bytes: Gauge::default(),
            request_buffered_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("published", "Publishes attempted", metrics.published.clone());
        registry.register("confirmed", "Publishes confirmed by the broker", metrics.confirmed.clone());
        registry.register("returned", "Publishes returned as unroutable", metrics.returned.clone());
        registry.register("nacked", "Publishes refused by the broker", metrics.nacked.clone());
        registry.register("confirm_latency_seconds", "Publish to confirm", metrics.confirm_latency.clone());
        registry.register("deliveries", "Deliveries received", metrics.deliveries.clone());
        registry.register("batches", "Batches of deliveries handled in one database transaction", metrics.batches.clone());
        registry.register("handler_latency_seconds", "Handling of one delivery", metrics.handler_latency.clone());
        registry.register("retries", "Deliveries sent for a delayed retry", metrics.retries.clone());
        registry.register("dead_lettered", "Deliveries dead-lettered", metrics.dead_lettered.clone());
        registry.register("inbox_pruned", "Inbox records deleted after the retention", metrics.inbox_pruned.clone());
        registry.register("in_flight", "Deliveries being handled", metrics.in_flight.clone());
        registry.register("connection_up", "Broker connection state", metrics.connection_up.clone());
        registry.register("grpc_requests", "gRPC requests by method and code", metrics.requests.clone());
        registry.register(
            "stream_buffered_bytes",
            "Bytes of PublishStream events being published",
            metrics.stream_buffered_bytes.clone(),
        );
        registry.register(
            "request_buffered_bytes",
            "Bytes of request messages held by the gateway's calls (PublishStream's events apart)",
            metrics.request_buffered_bytes.clone(),
        );
        Self { registry, ..metrics }
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &metrics().registry);
    text
}

/// A label for a routing key or queue.
pub fn route(routing_key: &str) -> Route {
    Route { routing_key: routing_key.to_owned() }
}

/// A label for a queue.
pub fn queue(queue: &str) -> Queue {
    Queue { queue: queue.to_owned() }
}
