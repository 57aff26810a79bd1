//! The broker baseline: raw lapin, no Sluice code. Persistent 200-byte messages to
//! `sluice.events` with `mandatory`, confirmed by the broker, with a fixed window of publishes
//! in flight on one confirm channel (or spread over several, `--baseline-channels`), into quorum
//! queues bound to the routing key. This is the ceiling any publishing path on this broker can
//! reach.
//!
//! The same run with the gateway's own message (`Message::Gateway`: an `order.created` with
//! every property and header the wire contract puts on it) tells how much of the distance to
//! that ceiling is the message itself rather than the code that publishes it.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{StreamExt, stream::FuturesUnordered};
use hdrhistogram::Histogram;
use lapin::{
    BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};

use sluice::bus::{Envelope, TraceContext};
use sluice::events::OrderCreated;

use crate::{
    broker::message_count,
    report::{self, Check},
};

/// The exchange the platform publishes to.
pub const EXCHANGE: &str = "sluice.events";

/// What the baseline publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// 200 bytes of body, `delivery_mode` and `content_type`: the baseline.
    Plain,
    /// What the gateway publishes for a PlaceOrder: the `order.created` body and every AMQP
    /// property and header of the wire contract (CloudEvents attributes, `traceparent`).
    Gateway,
}

impl Message {
    /// Body and properties of every message of the run.
    fn contents(self) -> (Vec<u8>, BasicProperties) {
        match self {
            Self::Plain => (vec![b'x'; 200], BasicProperties::default().with_delivery_mode(2).with_content_type("application/octet-stream".into())),
            Self::Gateway => {
                let order = crate::unary::an_order(0);
                let event = OrderCreated {
                    order_id: uuid::Uuid::new_v4().to_string(),
                    customer_id: order.customer_id,
                    items: order.items,
                    payment_token: order.payment_token,
                    created_at: Some(sluice::bus::headers::now()),
                };
                let mut envelope = Envelope::of(&event, uuid::Uuid::new_v4().to_string());
                // As if published inside a sampled trace, as the gateway's messages are.
                envelope.trace = TraceContext {
                    traceparent: Some(format!("00-{}-{}-01", uuid::Uuid::new_v4().simple(), &uuid::Uuid::new_v4().simple().to_string()[..16])),
                    tracestate: None,
                };
                let properties = envelope.properties(GATEWAY_APP_ID);
                (envelope.body, properties)
            }
        }
    }
}

/// The gateway's `app_id` (`sluice_gateway::APP_ID`; the bench does not link the gateway).
const GATEWAY_APP_ID: &str = "gateway";

/// What one baseline run measured.
pub struct Baseline {
    pub window: usize,
    /// Confirm channels the window is spread over.
    pub channels: usize,
    pub queues: usize,
    pub message: Message,
    /// Bytes of body per message.
    pub body_bytes: usize,
    /// Confirms received inside the measured window, per second.
    pub rate: f64,
    pub latency: Histogram<u64>,
    /// Nacks, returns and failed publishes.
    pub errors: u64,
    pub check: Check,
}

/// Publishes for `warmup + duration` with `window` confirms outstanding, spread over `channels`
/// confirm channels in turn, into `queues` quorum queues bound to one routing key, then checks that every queue holds every confirmed message.
pub async fn run(url: &str, window: usize, channels: usize, queues: usize, message: Message, warmup: Duration, duration: Duration) -> anyhow::Result<Baseline> {
    let connection = Connection::connect(url, ConnectionProperties::default().with_connection_name("sluice-bench.baseline".into()))
        .await
        .context("connecting to the broker")?;
    let mut publishers = Vec::with_capacity(channels.max(1));
    for _ in 0..channels.max(1) {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        publishers.push(channel);
    }
    let channel = publishers[0].clone();
    channel
        .exchange_declare(EXCHANGE.into(), ExchangeKind::Topic, ExchangeDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .context("declaring sluice.events")?;
    let key = format!("bench.baseline.w{window}.q{queues}.{}", if message == Message::Plain { "plain" } else { "gateway" });
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let names: Vec<String> = (1..=queues).map(|i| format!("{key}.{i}")).collect();
    for name in &names {
        channel
            .queue_declare(ShortString::try_new(name.as_str())?, QueueDeclareOptions { durable: true, ..Default::default() }, arguments.clone())
            .await
            .with_context(|| format!("declaring {name}"))?;
        channel
            .queue_bind(ShortString::try_new(name.as_str())?, EXCHANGE.into(), ShortString::try_new(key.as_str())?, QueueBindOptions::default(), FieldTable::default())
            .await?;
    }

    let (body, properties) = message.contents();
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    let routing_key = ShortString::try_new(key.as_str())?;
    let mut latency = report::histogram()?;
    let (mut acked, mut measured, mut errors) = (0u64, 0u64, 0u64);
    let measure_from = Instant::now() + warmup;
    let end = measure_from + duration;
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0usize;
    loop {
        if Instant::now() < end {
            while in_flight.len() < window {
                let sent = Instant::now();
                next = next.wrapping_add(1);
                let confirm = publishers[next % publishers.len()]
                    .basic_publish(EXCHANGE.into(), routing_key.clone(), options, &body, properties.clone())
                    .await
                    .context("publishing")?;
                in_flight.push(async move { (sent, confirm.await) });
            }
        }
        let Some((sent, confirmation)) = in_flight.next().await else { break };
        let done = Instant::now();
        match confirmation {
            Ok(Confirmation::Ack(None)) => {
                acked += 1;
                if sent >= measure_from && done <= end {
                    measured += 1;
                    report::record(&mut latency, done - sent);
                }
            }
            _ => errors += 1,
        }
    }

    let mut check = Check::Ok(format!("{} queue(s) hold all {} confirmed", queues, report::thousands(acked as f64)));
    for name in &names {
        let count = settled_count(&channel, name, acked).await?;
        if u64::from(count) != acked {
            check = Check::Fail(format!("{name} holds {count} messages, {acked} were confirmed"));
        }
        channel.queue_delete(ShortString::try_new(name.as_str())?, QueueDeleteOptions::default()).await?;
    }
    let _ = connection.close(200, "baseline done".into()).await;
    Ok(Baseline { window, channels: publishers.len(), queues, message, body_bytes: body.len(), rate: measured as f64 / duration.as_secs_f64(), latency, errors, check })
}

/// The queue's message count once it reaches `expected`, or its last value after 5 s.
pub async fn settled_count(channel: &lapin::Channel, queue: &str, expected: u64) -> anyhow::Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let count = message_count(channel, queue).await?;
        if u64::from(count) == expected || Instant::now() >= deadline {
            return Ok(count);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
