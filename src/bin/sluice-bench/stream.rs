//! Streaming publishes through the gateway: one `EventGateway/PublishStream` carrying
//! `OrderCreated` events (as `Any`), with a fixed window of events awaiting their ack. Each ack
//! comes only after the broker's confirm, so the `order.created` queues must hold exactly one
//! message per acked event; the caller checks that.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::StreamExt;
use prost::Message as _;
use sluice::pb::{OrderCreated, OrderItem, PublishRequest, PublishStreamRequest, event_gateway_client::EventGatewayClient};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Endpoint;

use crate::{platform::SKU, report::{self, GatewayRun}};

/// The `sequence`-th event, its customer id `padding` bytes longer than usual.
pub fn order_created(sequence: u64, padding: usize) -> PublishRequest {
    let event = OrderCreated {
        order_id: uuid::Uuid::new_v4().to_string(),
        customer_id: format!("bench-stream-{sequence}{}", "x".repeat(padding)),
        items: vec![OrderItem { sku: SKU.into(), quantity: 1 }],
        payment_token: "tok_visa".into(),
        created_at: None,
    };
    PublishRequest {
        event: Some(prost_types::Any { type_url: "type.googleapis.com/sluice.v1.OrderCreated".into(), value: event.encode_to_vec() }),
        idempotency_key: String::new(),
    }
}

/// Publishes over one stream for `warmup + duration` with `window` events awaiting their ack.
pub async fn run(addr: SocketAddr, window: usize, padding: usize, warmup: Duration, duration: Duration) -> anyhow::Result<GatewayRun> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true).connect().await.context("connecting to the gateway")?;
    let mut client = EventGatewayClient::new(channel);
    let (tx, rx) = mpsc::channel::<PublishStreamRequest>(window.max(1));
    let outbound = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut acks = client.publish_stream(outbound).await.context("opening PublishStream")?.into_inner();

    let measure_from = Instant::now() + warmup;
    let end = measure_from + duration;
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let slots = Arc::new(Semaphore::new(window.max(1)));
    let sender = {
        let (sent_at, slots) = (sent_at.clone(), slots.clone());
        tokio::spawn(async move {
            let mut sequence = 0u64;
            while Instant::now() < end {
                let Ok(slot) = slots.acquire().await else { break };
                slot.forget();
                sent_at.lock().unwrap_or_else(|p| p.into_inner()).insert(sequence, Instant::now());
                if tx.send(PublishStreamRequest { sequence, publish: Some(order_created(sequence, padding)) }).await.is_err() {
                    break;
                }
                sequence += 1;
            }
            // Dropping `tx` ends the request stream; the gateway then acks what is in flight.
            sequence
        })
    };

    let mut result = GatewayRun { rate: 0.0, latency: report::histogram()?, errors: BTreeMap::new(), accepted: 0, failed: 0 };
    let mut in_window = 0u64;
    while let Some(ack) = acks.next().await {
        let ack = ack.context("PublishStream ended with an error")?;
        let done = Instant::now();
        slots.add_permits(1);
        let Some(sent) = sent_at.lock().unwrap_or_else(|p| p.into_inner()).remove(&ack.sequence) else { continue };
        let measured = sent >= measure_from && done <= end;
        if ack.error_code == 0 && !ack.event_id.is_empty() {
            result.accepted += 1;
            if measured {
                in_window += 1;
                report::record(&mut result.latency, done - sent);
            }
        } else {
            result.failed += 1;
            if measured {
                *result.errors.entry(format!("{:?}", tonic::Code::from(ack.error_code))).or_default() += 1;
            }
        }
    }
    let sent = sender.await.context("the stream's sender panicked")?;
    let unanswered = sent_at.lock().unwrap_or_else(|p| p.into_inner()).len();
    if unanswered > 0 {
        anyhow::bail!("PublishStream ended with {unanswered} of {sent} events unanswered");
    }
    result.rate = in_window as f64 / duration.as_secs_f64();
    Ok(result)
}
