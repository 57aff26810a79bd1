//! Unary calls through the gateway over real gRPC, PlaceOrder or `EventGateway/Publish` of an
//! `OrderCreated`: a closed loop of `concurrency` callers, each sending its next call as soon as
//! the previous one is answered. A call is answered OK only after the broker confirmed
//! `order.created`, so the queues bound to `order.created` must hold exactly one message per
//! accepted call; that is the check.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use sluice::pb::{
    OrderItem, PlaceOrderRequest, PublishRequest, event_gateway_client::EventGatewayClient, order_service_client::OrderServiceClient,
};
use tonic::transport::{Channel, Endpoint};

use crate::{platform::SKU, report::{self, GatewayRun}};

/// A refused caller's first pause before it calls again; it doubles at each refusal in a row,
/// up to [`LAST_PAUSE`], with jitter (half to all of it).
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LAST_PAUSE: Duration = Duration::from_secs(1);

/// A valid order for the benchmark SKU; no idempotency key, so every call is a new order.
pub fn an_order(customer: usize) -> PlaceOrderRequest {
    PlaceOrderRequest {
        customer_id: format!("bench-{customer}"),
        items: vec![OrderItem { sku: SKU.into(), quantity: 1 }],
        payment_token: "tok_visa".into(),
        idempotency_key: String::new(),
    }
}

/// `n` HTTP/2 connections to the gateway.
async fn connections(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to the gateway at {addr}"))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// `n` gRPC clients, each on its own HTTP/2 connection.
pub async fn clients(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<OrderServiceClient<Channel>>> {
    Ok(connections(addr, n).await?.into_iter().map(OrderServiceClient::new).collect())
}

/// What each call of a unary run is.
#[derive(Debug, Clone, Copy)]
pub enum Method {
    /// PlaceOrder of one unit of the benchmark SKU.
    PlaceOrder,
    /// `EventGateway/Publish` of an `OrderCreated`, its customer id `padding` bytes longer than
    /// usual.
    Publish { padding: usize },
}

/// One caller's client and the request it sends again and again.
enum Caller {
    Orders(OrderServiceClient<Channel>, PlaceOrderRequest),
    Events(EventGatewayClient<Channel>, PublishRequest),
}

impl Caller {
    fn new(method: Method, channel: Channel, i: usize) -> Self {
        match method {
            Method::PlaceOrder => Self::Orders(OrderServiceClient::new(channel), an_order(i)),
            Method::Publish { padding } => {
                Self::Events(EventGatewayClient::new(channel), crate::stream::order_created(i as u64, padding))
            }
        }
    }

    async fn call(&mut self) -> Result<(), tonic::Status> {
        match self {
            Self::Orders(client, request) => client.place_order(request.clone()).await.map(drop),
            Self::Events(client, request) => client.publish(request.clone()).await.map(drop),
        }
    }
}

struct Worker {
    latency: Histogram<u64>,
    ok_in_window: u64,
    errors: BTreeMap<String, u64>,
    accepted: u64,
    failed: u64,
}

/// Runs `concurrency` callers of `method` over `connections` connections for `warmup + duration`.
pub async fn run(
    addr: SocketAddr,
    method: Method,
    concurrency: usize,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<GatewayRun> {
    let channels = self::connections(addr, connections.clamp(1, concurrency.max(1))).await?;
    let measure_from = Instant::now() + warmup;
    let end = measure_from + duration;
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let mut caller = Caller::new(method, channels[i % channels.len()].clone(), i);
        let mut worker = Worker { latency: report::histogram()?, ok_in_window: 0, errors: BTreeMap::new(), accepted: 0, failed: 0 };
        workers.spawn(async move {
            let mut pause = FIRST_PAUSE;
            while Instant::now() < end {
                let sent = Instant::now();
                let answer = caller.call().await;
                let done = Instant::now();
                let measured = sent >= measure_from && done <= end;
                match answer {
                    Ok(_) => {
                        pause = FIRST_PAUSE;
                        worker.accepted += 1;
                        if measured {
                            worker.ok_in_window += 1;
                            report::record(&mut worker.latency, done - sent);
                        }
                    }
                    Err(status) => {
                        worker.failed += 1;
                        if measured {
                            *worker.errors.entry(format!("{:?}", status.code())).or_default() += 1;
                        }
                        // A caller that keeps failing backs off, as a good client would: a
                        // fixed 10 ms made every refused caller send again at once, a retry
                        // storm that measured the bench more than the gateway.
                        tokio::time::sleep(pause / 2 + pause.mul_f64(fastrand::f64() / 2.0)).await;
                        pause = (pause * 2).min(LAST_PAUSE);
                    }
                }
            }
            worker
        });
    }
    let mut total = GatewayRun { rate: 0.0, latency: report::histogram()?, errors: BTreeMap::new(), accepted: 0, failed: 0 };
    let mut ok_in_window = 0;
    while let Some(worker) = workers.join_next().await {
        let worker = worker.context("a caller panicked")?;
        total.latency.add(&worker.latency)?;
        ok_in_window += worker.ok_in_window;
        total.accepted += worker.accepted;
        total.failed += worker.failed;
        for (code, n) in worker.errors {
            *total.errors.entry(code).or_default() += n;
        }
    }
    total.rate = ok_in_window as f64 / duration.as_secs_f64();
    Ok(total)
}
