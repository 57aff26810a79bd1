//! `sluice.v1.OrderService`: PlaceOrder turns a command into a confirmed `order.created`;
//! GetOrder asks the orders service (request/reply) for its read model.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use sluice::bus::{Error as BusError, Publisher, RpcClient};
use sluice::events::{Event as _, OrderCreated};
use sluice::pb::{GetOrderRequest, Order, OrderStatus, PlaceOrderRequest, PlaceOrderResponse, order_service_server::OrderService};
use tonic::{Request, Response, Status};
use tonic_types::FieldViolation;
use uuid::Uuid;

use crate::{auth, catalog::KnownSkus, error::GatewayError, validation};

/// Namespace of idempotency-key-derived ids: the same key always names the same order.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x2b8e_41d7_9c3a_4f6e_a1b5_0c9d_8e7f_6a5b);

/// The order API.
#[derive(Clone)]
pub struct Orders {
    publisher: Publisher,
    rpc: RpcClient,
    skus: Arc<KnownSkus>,
    query_timeout: Duration,
    /// Ends WatchOrder streams at shutdown (graceful shutdown waits for open streams).
    shutdown: CancellationToken,
    auth: auth::Auth,
}

impl Orders {
    /// One order from the read model.
    async fn fetch(&self, order_id: &str, budget: Duration, caller_limited: bool) -> Result<Order, GatewayError> {
        if order_id.trim().is_empty() || order_id.len() > validation::MAX_ID_LEN {
            let violation = FieldViolation::new("order_id", format!("must be 1 to {} bytes", validation::MAX_ID_LEN));
            return Err(GatewayError::InvalidArgument(vec![violation]));
        }
        let request = GetOrderRequest { order_id: order_id.to_owned() };
        let deadline = tokio::time::Instant::now() + budget;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply = self.rpc.call(&request, left).await.map_err(|e| map_wait_error(e, caller_limited, "the orders service"))?;
            if let Some(order) = reply.order {
                return Ok(order);
            }
            // An order placed a moment ago may not be in the read model yet (it follows the
            // events): ask again while the order is that recent and the call has time left.
            if !placed_recently(order_id, SystemTime::now()) || tokio::time::Instant::now() + 2 * NOT_YET_POLL >= deadline {
                return Err(GatewayError::NotFound(format!("order {order_id}")));
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return Err(GatewayError::Unavailable("the gateway is shutting down".into())),
                () = tokio::time::sleep(NOT_YET_POLL) => {}
            }
        }
    }

    /// Publishes through `publisher` and asks other services through `rpc`, waiting at most
    /// `query_timeout` for them.
    pub fn new(publisher: Publisher, rpc: RpcClient, query_timeout: Duration, shutdown: CancellationToken) -> Self {
        Self { publisher, rpc, skus: Arc::default(), query_timeout, shutdown, auth: None }
    }

    /// Requires bearer tokens with the right grants (see `auth`).
    pub fn with_auth(self, auth: auth::Auth) -> Self {
        Self { auth, ..self }
    }

    /// How long a call may wait on another service: our own limit, or the caller's deadline
    /// (`grpc-timeout`) if sooner. The flag says whether the caller's deadline is the limit.
    fn wait_budget<T>(&self, request: &Request<T>) -> (Duration, bool) {
        match request.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout) {
            // Answer a little before the caller gives up, so it gets our DEADLINE_EXCEEDED
            // rather than its own cancellation.
            Some(caller) if caller < self.query_timeout => (caller - (caller / 10).min(Duration::from_millis(50)), true),
            _ => (self.query_timeout, false),
        }
    }
}

/// Parses a `grpc-timeout` header value (`100m`, `5S`, ...).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn order_ids(request: &PlaceOrderRequest) -> (String, String) {
    if request.idempotency_key.is_empty() {
        // Time-ordered (UUIDv7): every service's indexes on order and event ids then grow at
        // one end instead of touching a random page per insert.
        return (Uuid::now_v7().to_string(), Uuid::now_v7().to_string());
    }
    // Keys are scoped by customer: two customers cannot collide on a key.
    let seed = format!("{}\u{0}{}", request.customer_id, request.idempotency_key);
    let order_id = Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, format!("order\u{0}{seed}").as_bytes());
    let event_id = Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, format!("event\u{0}{seed}").as_bytes());
    (order_id.to_string(), event_id.to_string())
}

/// How long after PlaceOrder issued an order id GetOrder and WatchOrder wait for the read model
/// to have the order, rather than answer NOT_FOUND (see [`placed_recently`]).
const JUST_PLACED: Duration = Duration::from_secs(10);
/// How often they ask the read model again meanwhile.
const NOT_YET_POLL: Duration = Duration::from_millis(50);

/// Whether `order_id` was issued by PlaceOrder less than [`JUST_PLACED`] before `now`: such ids
/// are UUIDv7, which carry the time they were made (ids from an idempotency key do not, and
/// neither does anything a client made up).
fn placed_recently(order_id: &str, now: SystemTime) -> bool {
    let Ok(id) = Uuid::parse_str(order_id) else { return false };
    let Some(issued) = id.get_timestamp().filter(|_| id.get_version_num() == 7) else { return false };
    let (seconds, nanos) = issued.to_unix();
    let issued = UNIX_EPOCH + Duration::new(seconds, nanos);
    // Another gateway's clock may be a little ahead of this one's.
    match now.duration_since(issued) {
        Ok(age) => age < JUST_PLACED,
        Err(ahead) => ahead.duration() < JUST_PLACED,
    }
}

/// How often WatchOrder asks the read model for changes.
const WATCH_POLL: Duration = Duration::from_millis(100);

fn is_terminal(status: OrderStatus) -> bool {
    matches!(status, OrderStatus::Completed | OrderStatus::Rejected | OrderStatus::Declined)
}

fn map_wait_error(error: BusError, caller_limited: bool, what: &'static str) -> GatewayError {
    match error {
        BusError::NoReply { .. } if caller_limited => GatewayError::DeadlineExceeded(what),
        other => other.into(),
    }
}

#[tonic::async_trait]
impl OrderService for Orders {
    async fn place_order(&self, request: Request<PlaceOrderRequest>) -> Result<Response<PlaceOrderResponse>, Status> {
        auth::may_publish(&self.auth, request.metadata(), OrderCreated::ROUTING_KEY)?;
        let (budget, caller_limited) = self.wait_budget(&request);
        let request = request.into_inner();
        let mut violations = validation::place_order(&request);
        if !violations.is_empty() {
            return Err(GatewayError::InvalidArgument(violations).into());
        }
        let skus: Vec<&str> = request.items.iter().map(|i| i.sku.as_str()).collect();
        let unknown = self
            .skus
            .unknown(&self.rpc, &skus, budget)
            .await
            .map_err(|e| map_wait_error(e, caller_limited, "the inventory service"))?;
        for (i, item) in request.items.iter().enumerate() {
            if unknown.contains(&item.sku) {
                violations.push(FieldViolation::new(format!("items[{i}].sku"), format!("unknown sku {:?}", item.sku)));
            }
        }
        if !violations.is_empty() {
            return Err(GatewayError::InvalidArgument(violations).into());
        }
        let (order_id, event_id) = order_ids(&request);
        tracing::record_all!(tracing::Span::current(), order_id = order_id.as_str(), event_id = event_id.as_str());
        let event = OrderCreated {
            order_id: order_id.clone(),
            customer_id: request.customer_id,
            items: request.items,
            payment_token: request.payment_token,
            created_at: Some(sluice::bus::headers::now()),
        };
        self.publisher.publish(&event, &event_id).await.map_err(GatewayError::from)?;
        tracing::info!("order accepted");
        Ok(Response::new(PlaceOrderResponse { order_id, event_id }))
    }

    async fn get_order(&self, request: Request<GetOrderRequest>) -> Result<Response<Order>, Status> {
        auth::may_subscribe(&self.auth, request.metadata(), &[OrderCreated::ROUTING_KEY.to_owned()])?;
        let (budget, caller_limited) = self.wait_budget(&request);
        let request = request.into_inner();
        tracing::Span::current().record("order_id", request.order_id.as_str());
        Ok(Response::new(self.fetch(&request.order_id, budget, caller_limited).await?))
    }

    type WatchOrderStream = Pin<Box<dyn Stream<Item = Result<Order, Status>> + Send>>;

    async fn watch_order(&self, request: Request<GetOrderRequest>) -> Result<Response<Self::WatchOrderStream>, Status> {
        auth::may_subscribe(&self.auth, request.metadata(), &[OrderCreated::ROUTING_KEY.to_owned()])?;
        let order_id = request.into_inner().order_id;
        tracing::Span::current().record("order_id", order_id.as_str());
        // An unknown order is NOT_FOUND (see `fetch`), not an empty stream.
        let first = self.fetch(&order_id, self.query_timeout, false).await?;
        let (tx, rx) = mpsc::channel(8);
        let orders = self.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while !is_terminal(last.status()) {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = orders.shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("the gateway is shutting down"))).await;
                        return;
                    }
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                }
                match orders.fetch(&order_id, orders.query_timeout, false).await {
                    Ok(order) if order != last => {
                        last = order;
                        if tx.send(Ok(last.clone())).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        let _ = tx.send(Err(error.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_name_the_same_order_per_customer() {
        let request = |customer: &str, key: &str| PlaceOrderRequest {
            customer_id: customer.into(),
            idempotency_key: key.into(),
            ..Default::default()
        };
        assert_eq!(order_ids(&request("c", "k")), order_ids(&request("c", "k")));
        assert_ne!(order_ids(&request("c", "k")).0, order_ids(&request("d", "k")).0);
        assert_ne!(order_ids(&request("c", "")).0, order_ids(&request("c", "")).0);
        let (order_id, event_id) = order_ids(&request("c", "k"));
        assert_ne!(order_id, event_id);
    }

    #[test]
    fn only_ids_placeorder_issued_lately_are_waited_for() {
        let (placed, _) = order_ids(&PlaceOrderRequest::default());
        let now = SystemTime::now();
        assert!(placed_recently(&placed, now));
        assert!(placed_recently(&placed, now - Duration::from_secs(1)), "a clock a little behind the issuer's");
        assert!(!placed_recently(&placed, now + JUST_PLACED + Duration::from_secs(1)), "issued too long ago");
        let keyed = order_ids(&PlaceOrderRequest { idempotency_key: "k".into(), ..Default::default() }).0;
        assert!(!placed_recently(&keyed, now), "an id from an idempotency key carries no time");
        assert!(!placed_recently(&Uuid::new_v4().to_string(), now));
        assert!(!placed_recently("nope", now));
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }
}
