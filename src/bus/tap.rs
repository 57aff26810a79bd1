//! A live, transient view of events matching routing patterns (`order.*`, `#`).
//!
//! Backed by a server-named, exclusive, auto-delete queue: it exists only while the tap's
//! connection does, so a tap never leaves garbage on the broker. Used by operators' tools,
//! the gateway's event stream and tests.
//!
//! Memory stays bounded however slowly the reader reads: deliveries are acknowledged only as
//! the reader takes them (so at most `PREFETCH` wait in this process), and the queue itself
//! keeps at most `MAX_BACKLOG` messages, dropping the oldest past that.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use lapin::{
    Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

/// Deliveries buffered in this process before the reader takes them.
const PREFETCH: u16 = 256;
/// Messages the broker keeps for a slow tap before dropping the oldest.
const MAX_BACKLOG: i64 = 10_000;

use super::{Error, headers, topology};
use crate::{config::BusConfig, events::Event};

/// One event seen by a tap.
#[derive(Debug, Clone)]
pub struct Tapped {
    /// Routing key it was published with.
    pub routing_key: String,
    /// `type` property (full Protobuf name).
    pub type_name: String,
    /// `message_id` property.
    pub event_id: String,
    /// `traceparent` header, if any.
    pub traceparent: Option<String>,
    /// `correlation_id` property (the order id for order flows).
    pub correlation_id: Option<String>,
    /// `app_id` property (the producing service).
    pub app_id: Option<String>,
    /// `content_type` property.
    pub content_type: Option<String>,
    /// `delivery_mode` property (2: persistent).
    pub delivery_mode: Option<u8>,
    /// Every string-valued header.
    pub headers: BTreeMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Tapped {
    /// Decodes the body as `E`, if it is one.
    pub fn decode<E: Event>(&self) -> Option<E> {
        (self.type_name == E::FULL_NAME).then(|| E::decode(self.body.as_slice()).ok()).flatten()
    }
}

/// A live subscription to events matching some routing patterns.
pub struct Tap {
    connection: Connection,
    channel: lapin::Channel,
    stream: lapin::Consumer,
}

impl Tap {
    /// Opens a tap. Events published after this returns are seen.
    pub async fn open(config: &BusConfig, patterns: &[&str]) -> Result<Self, Error> {
        let connection = super::connection::connect(&config.url, "sluice.tap").await?;
        let channel = connection.create_channel().await?;
        topology::declare_exchange(&channel).await?;
        channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(MAX_BACKLOG));
        arguments.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
        let queue = channel
            .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, arguments)
            .await?;
        for pattern in patterns {
            channel
                .queue_bind(queue.name().clone(), topology::EXCHANGE.into(), topology::short(pattern)?, QueueBindOptions::default(), FieldTable::default())
                .await?;
        }
        let stream = channel
            .basic_consume(queue.name().clone(), "".into(), BasicConsumeOptions { exclusive: true, ..Default::default() }, FieldTable::default())
            .await?;
        Ok(Self { connection, channel, stream })
    }

    /// The next event, or `None` once the connection is gone.
    pub async fn next(&mut self) -> Option<Tapped> {
        match self.stream.next().await? {
            Ok(delivery) => {
                // Taken by the reader: make room for the next one.
                delivery.acker.ack(BasicAckOptions::default()).await.ok()?;
                Some(tapped(delivery))
            }
            Err(_) => None,
        }
    }

    /// Closes the tap (its queue disappears with the connection).
    pub async fn close(self) {
        super::connection::closed("sluice.tap", "closing the tap's channel", self.channel.close(200, "tap closed".into())).await;
        super::connection::closed("sluice.tap", "closing the tap's connection", self.connection.close(200, "tap closed".into())).await;
    }
}

fn tapped(delivery: Delivery) -> Tapped {
    let p = &delivery.properties;
    Tapped {
        routing_key: delivery.routing_key.to_string(),
        type_name: p.kind().as_ref().map(|s| s.to_string()).unwrap_or_default(),
        event_id: p.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default(),
        traceparent: p.headers().as_ref().and_then(|h| headers::header_str(h, "traceparent")).map(str::to_owned),
        correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
        app_id: p.app_id().as_ref().map(|s| s.to_string()),
        content_type: p.content_type().as_ref().map(|s| s.to_string()),
        delivery_mode: *p.delivery_mode(),
        headers: p
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .keys()
                    .filter_map(|k| headers::header_str(h, k.as_str()).map(|v| (k.to_string(), v.to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
        body: delivery.data,
    }
}
