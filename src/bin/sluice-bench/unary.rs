//! Unary PlaceOrder through the gateway over real gRPC: a closed loop of `concurrency`
//! callers, each sending its next order as soon as the previous one is answered. A call is
//! answered OK only after the broker confirmed `order.created`, so the queues bound to
//! `order.created` must hold exactly one message per accepted order; that is the check.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use sluice::pb::{OrderItem, PlaceOrderRequest, order_service_client::OrderServiceClient};
use tonic::transport::{Channel, Endpoint};

use crate::{platform::SKU, report::{self, GatewayRun}};

/// A valid order for the benchmark SKU; no idempotency key, so every call is a new order.
pub fn an_order(customer: usize) -> PlaceOrderRequest {
    PlaceOrderRequest {
        customer_id: format!("bench-{customer}"),
        items: vec![OrderItem { sku: SKU.into(), quantity: 1 }],
        payment_token: "tok_visa".into(),
        idempotency_key: String::new(),
    }
}

/// `n` gRPC clients, each on its own HTTP/2 connection.
pub async fn clients(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<OrderServiceClient<Channel>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to the gateway at {addr}"))?;
        clients.push(OrderServiceClient::new(channel));
    }
    Ok(clients)
}

struct Worker {
    latency: Histogram<u64>,
    ok_in_window: u64,
    errors: BTreeMap<String, u64>,
    accepted: u64,
    failed: u64,
}

/// Runs `concurrency` callers over `connections` connections for `warmup + duration`.
pub async fn run(addr: SocketAddr, concurrency: usize, connections: usize, warmup: Duration, duration: Duration) -> anyhow::Result<GatewayRun> {
    let clients = clients(addr, connections.clamp(1, concurrency.max(1))).await?;
    let measure_from = Instant::now() + warmup;
    let end = measure_from + duration;
    let mut workers = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let mut client = clients[i % clients.len()].clone();
        let mut worker = Worker { latency: report::histogram()?, ok_in_window: 0, errors: BTreeMap::new(), accepted: 0, failed: 0 };
        workers.spawn(async move {
            let request = an_order(i);
            while Instant::now() < end {
                let sent = Instant::now();
                let answer = client.place_order(request.clone()).await;
                let done = Instant::now();
                let measured = sent >= measure_from && done <= end;
                match answer {
                    Ok(_) => {
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
                        // A caller that keeps failing backs off, as any client would.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            worker
        });
    }
    let mut total = GatewayRun { rate: 0.0, latency: report::histogram()?, errors: BTreeMap::new(), accepted: 0, failed: 0 };
    let mut ok_in_window = 0;
    while let Some(worker) = workers.join_next().await {
        let worker = worker.context("a PlaceOrder caller panicked")?;
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
