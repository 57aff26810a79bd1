//! Dead-letter queues, for operators: count, inspect, replay and purge the messages that a
//! consumer gave up on (`<queue>.dlq`, written by [`consumer`](super::consumer) with the
//! `x-sluice-*` failure headers). The `sluice dlq` command is a thin shell over this module.
//!
//! Every operation takes the name of a dead-letter queue and refuses any other name, so a
//! typo can never purge or drain a live handler queue.
//!
//! Reading without consuming: [`DeadLetters::show`] and the scan of [`DeadLetters::replay`]
//! take messages with `basic.get` and keep them unacknowledged until the scan ends, then
//! return the ones they leave with `basic.nack` (requeue). While a message is held the broker
//! does not hand it out again, so a scan sees each message once. It ends when the queue has
//! nothing more to give, at `show`'s limit, or (`replay`) at the first message that this very
//! run sent back and that failed again (its copies carry the run's [`REPLAY_RUN`] header). On
//! a quorum queue, `basic.nack` does not count as a failed delivery from RabbitMQ 4.3 on; on
//! 4.0 to 4.2 every return counts toward the queue's delivery limit (20 by default).
//!
//! What this module does not do: decide why a message failed, or change its body. A replay
//! sends the message back exactly as it was dead-lettered, minus the failure headers.

use std::{str::FromStr, time::Duration};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ErrorKind,
    message::Delivery,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
    uri::AMQPUri,
};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde::Serialize;

use super::{Error, admin::Admin, headers, topology};
use crate::config::{BusConfig, redact};

/// Set on every replayed copy: the id of the replay run that sent it. A run that meets its own
/// id in the dead-letter queue has gone full circle and stops there.
pub const REPLAY_RUN: &str = "x-sluice-replay-run";

/// AMQP's "no such queue" reply code.
const NOT_FOUND: u16 = 404;

/// A connection for operating on dead-letter queues.
pub struct DeadLetters {
    connection: Connection,
    /// Parsed once: the vhost and credentials also address the management API.
    uri: AMQPUri,
    confirm_timeout: Duration,
}

/// A dead-letter queue and how many messages wait in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// The dead-letter queue.
    pub queue: String,
    /// Messages ready in it (not counting any held unacknowledged by a running scan).
    pub messages: u32,
}

/// One dead-lettered message, as `sluice dlq show` prints it (one JSON object per line).
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The event id (`message_id`).
    pub message_id: Option<String>,
    /// The full Protobuf name (`type`).
    #[serde(rename = "type")]
    pub type_name: Option<String>,
    /// The order id of order flows (`correlation_id`).
    pub correlation_id: Option<String>,
    /// The event's routing key: `x-sluice-original-routing-key`, or else the key the message
    /// reached the dead-letter queue with.
    pub routing_key: String,
    /// Why and where it failed.
    pub headers: Failure,
    /// The body, decoded when possible.
    #[serde(flatten)]
    pub body: Body,
}

/// The failure headers the consumer writes when it dead-letters a message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// `rejected`, `retries-exhausted`, `undecodable`, `unknown-type`, `missing-message-id`.
    #[serde(rename = "x-sluice-dead-letter-reason")]
    pub reason: Option<String>,
    /// The error text.
    #[serde(rename = "x-sluice-error")]
    pub error: Option<String>,
    /// The delivery attempt that failed.
    #[serde(rename = "x-sluice-attempt")]
    pub attempt: Option<u32>,
    /// The handler queue the message was dead-lettered from (where a replay sends it).
    #[serde(rename = "x-sluice-original-queue")]
    pub original_queue: Option<String>,
    /// The routing key the event was first published with.
    #[serde(rename = "x-sluice-original-routing-key")]
    pub original_routing_key: Option<String>,
    /// When it was dead-lettered (RFC 3339).
    #[serde(rename = "x-sluice-dead-lettered-at")]
    pub dead_lettered_at: Option<String>,
}

/// A message body: Protobuf decoded to JSON through the descriptor set, or the raw bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Body {
    /// The canonical Protobuf JSON of the message named by `type` (proto field names, with
    /// default values shown, because a zero is often the reason a message was refused).
    Decoded {
        /// The message as JSON.
        body: serde_json::Value,
    },
    /// Bytes that are not a message of the type the properties name.
    Undecodable {
        /// The body, base64 (standard alphabet, padded).
        body_base64: String,
        /// Why it could not be decoded.
        decode_error: String,
    },
}

/// Which messages [`DeadLetters::replay`] sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every message that was in the queue when the replay started.
    All,
    /// Every message with this `message_id`.
    MessageId(String),
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages republished, confirmed, and removed from the dead-letter queue.
    pub replayed: usize,
    /// Selected messages left in the dead-letter queue, with the reason.
    pub skipped: Vec<Skipped>,
}

/// A selected message that a replay left where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its `message_id`, if it has one.
    pub message_id: Option<String>,
    /// Why it was not replayed.
    pub reason: String,
}

impl DeadLetters {
    /// Connects to the broker of `config` (URL and confirm timeout).
    pub async fn connect(config: &BusConfig) -> Result<Self, Error> {
        let uri = AMQPUri::from_str(&config.url)
            .map_err(|e| Error::InvalidName(format!("AMQP URL {}: {e}", redact(&config.url))))?;
        let connection = super::connection::connect(&config.url, "sluice-dlq").await?;
        Ok(Self { connection, uri, confirm_timeout: config.confirm_timeout })
    }

    /// Every dead-letter queue of the vhost that holds messages. Queue names come from the
    /// RabbitMQ management API at `api` (`http://host:15672`, with the AMQP URL's credentials);
    /// the counts come from the broker itself, because the API's statistics lag by seconds.
    #[tracing::instrument(skip(self))]
    pub async fn list(&self, api: &str) -> Result<Vec<QueueDepth>, Error> {
        let names = self.discover(api).await?;
        let mut depths = Vec::new();
        for name in names {
            match self.depth(&name).await {
                Ok(depth) if depth.messages > 0 => depths.push(depth),
                Ok(_) => {}
                // Deleted since the API listed it: nothing waits in it any more.
                Err(Error::InvalidName(reason)) => tracing::debug!(queue = %name, %reason, "queue vanished"),
                Err(error) => return Err(error),
            }
        }
        Ok(depths)
    }

    /// The message count of each of these dead-letter queues, empty ones included.
    pub async fn depths(&self, queues: &[String]) -> Result<Vec<QueueDepth>, Error> {
        let mut depths = Vec::with_capacity(queues.len());
        for queue in queues {
            depths.push(self.depth(queue).await?);
        }
        Ok(depths)
    }

    /// Up to `limit` messages from the head of `queue`, left in the queue (see the module
    /// docs for how they are read without being consumed).
    #[tracing::instrument(skip(self))]
    pub async fn show(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        checked(queue)?;
        let channel = self.connection.create_channel().await?;
        declare_passive(&channel, queue).await?;
        let pool = DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET);
        let mut held = Vec::new();
        let mut shown = Vec::new();
        let scan = async {
            while held.len() < limit {
                let Some(delivery) = get(&channel, queue).await? else { break };
                shown.push(describe(&delivery, pool.as_ref().map_err(|e| e.to_string())));
                held.push(delivery);
            }
            Ok::<_, Error>(())
        }
        .await;
        let returned = requeue(held).await;
        super::connection::closed("sluice-dlq", "closing a channel", channel.close(200, "shown".into())).await;
        scan?;
        returned?;
        Ok(shown)
    }

    /// Sends the selected messages of `queue` back to the handler queue they failed in
    /// (`x-sluice-original-queue`, through the default exchange). Each copy keeps the body,
    /// the properties (`message_id`, `type`, `correlation_id`...) and the trace and
    /// CloudEvents headers; it loses the failure headers and restarts at attempt 1. The
    /// dead-lettered original is acknowledged only once the broker has confirmed the copy,
    /// so a failure at any point leaves the message in the dead-letter queue, never nowhere.
    ///
    /// A replayed message that fails again lands at the back of the dead-letter queue, marked
    /// with this run's id: the run stops when it meets it, so nothing is replayed twice in one
    /// run.
    #[tracing::instrument(skip(self))]
    pub async fn replay(&self, queue: &str, selection: &Selection) -> Result<ReplayReport, Error> {
        checked(queue)?;
        let channel = self.connection.create_channel().await?;
        declare_passive(&channel, queue).await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        let run = uuid::Uuid::new_v4().to_string();
        let mut report = ReplayReport::default();
        let mut held = Vec::new();
        let scan = async {
            loop {
                let Some(delivery) = get(&channel, queue).await? else { break };
                let hdrs = delivery.properties.headers().as_ref();
                if hdrs.and_then(|h| headers::header_str(h, REPLAY_RUN)) == Some(run.as_str()) {
                    held.push(delivery);
                    break;
                }
                let message_id = delivery.properties.message_id().as_ref().map(|s| s.to_string());
                let selected = match selection {
                    Selection::All => true,
                    Selection::MessageId(id) => message_id.as_deref() == Some(id.as_str()),
                };
                if !selected {
                    held.push(delivery);
                    continue;
                }
                match self.send_back(&channel, queue, &delivery, &run).await {
                    Ok(()) => {
                        delivery.ack(BasicAckOptions::default()).await?;
                        tracing::info!(message_id = message_id.as_deref().unwrap_or(""), "message replayed");
                        report.replayed += 1;
                    }
                    Err(Refusal::Skip(reason)) => {
                        tracing::warn!(message_id = message_id.as_deref().unwrap_or(""), %reason, "message not replayed");
                        report.skipped.push(Skipped { message_id, reason });
                        held.push(delivery);
                    }
                    Err(Refusal::Fail(error)) => {
                        held.push(delivery);
                        return Err(error);
                    }
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        let returned = requeue(held).await;
        super::connection::closed("sluice-dlq", "closing a channel", channel.close(200, "replayed".into())).await;
        scan?;
        returned?;
        Ok(report)
    }

    /// Deletes every ready message of `queue`; returns how many.
    #[tracing::instrument(skip(self))]
    pub async fn purge(&self, queue: &str) -> Result<u32, Error> {
        checked(queue)?;
        let channel = self.connection.create_channel().await?;
        declare_passive(&channel, queue).await?;
        let purged = channel.queue_purge(topology::short(queue)?, QueuePurgeOptions::default()).await?;
        tracing::info!(purged, "queue purged");
        super::connection::closed("sluice-dlq", "closing a channel", channel.close(200, "purged".into())).await;
        Ok(purged)
    }

    /// Closes the connection.
    pub async fn close(self) {
        super::connection::closed("sluice-dlq", "closing the connection", self.connection.close(200, "done".into())).await;
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        checked(queue)?;
        // A passive declare of a missing queue closes its channel: one channel per queue.
        let channel = self.connection.create_channel().await?;
        let messages = declare_passive(&channel, queue).await?;
        super::connection::closed("sluice-dlq", "closing a channel", channel.close(200, "counted".into())).await;
        Ok(QueueDepth { queue: queue.to_owned(), messages })
    }

    /// Names of the vhost's dead-letter queues, from the management API.
    async fn discover(&self, api: &str) -> Result<Vec<String>, Error> {
        let admin = Admin::from_uri(&self.uri, api).with_timeout(Duration::from_secs(10));
        let unreachable = |reason: String| Error::Unavailable(format!("RabbitMQ management API: {reason}"));
        let queues = tokio::task::spawn_blocking(move || admin.queue_names(admin.vhost()))
            .await
            .map_err(|e| unreachable(format!("{api}: {e}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let mut names: Vec<String> = queues.into_iter().filter(|n| is_dead_letter_queue(n)).collect();
        names.sort_unstable();
        Ok(names)
    }

    /// Publishes a replay copy of `delivery` and waits for the broker's confirm.
    async fn send_back(&self, channel: &Channel, queue: &str, delivery: &Delivery, run: &str) -> Result<(), Refusal> {
        let empty = FieldTable::default();
        let original = delivery.properties.headers().as_ref().unwrap_or(&empty);
        let Some(target) = headers::header_str(original, headers::ORIGINAL_QUEUE).map(str::to_owned) else {
            return Err(Refusal::Skip(format!("no {} header", headers::ORIGINAL_QUEUE)));
        };
        if target == queue || is_dead_letter_queue(&target) {
            return Err(Refusal::Skip(format!("{} names a dead-letter queue: {target}", headers::ORIGINAL_QUEUE)));
        }
        let key = topology::short(&target).map_err(Refusal::Fail)?;
        let properties = replay_properties(&delivery.properties, run);
        let timeout = self.confirm_timeout;
        let confirmation = tokio::time::timeout(timeout, async {
            channel
                .basic_publish("".into(), key, BasicPublishOptions { mandatory: true, ..Default::default() }, &delivery.data, properties)
                .await?
                .await
        })
        .await
        .map_err(|_| Refusal::Fail(Error::ConfirmTimeout(timeout)))?
        .map_err(|e| Refusal::Fail(e.into()))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_returned)) => Err(Refusal::Skip(format!("the queue {target} does not exist"))),
            Confirmation::Nack(_) => Err(Refusal::Fail(Error::Nacked)),
            Confirmation::NotRequested => Err(Refusal::Fail(Error::Unavailable("channel is not in confirm mode".into()))),
        }
    }
}

/// Why one message was not replayed: a property of that message, or a broker failure that
/// ends the run.
enum Refusal {
    Skip(String),
    Fail(Error),
}

/// `<queue>.dlq`, as [`topology::dead_letter_queue`] names them.
fn is_dead_letter_queue(name: &str) -> bool {
    name.strip_suffix(".dlq").is_some_and(|base| topology::dead_letter_queue(base) == name && !base.is_empty())
}

/// Refuses any name but a dead-letter queue's, before anything is sent to the broker.
fn checked(queue: &str) -> Result<(), Error> {
    if !is_dead_letter_queue(queue) {
        return Err(Error::InvalidName(format!("{queue} is not a dead-letter queue (<queue>.dlq)")));
    }
    Ok(())
}

/// The ready-message count of `queue`, which must exist.
async fn declare_passive(channel: &Channel, queue: &str) -> Result<u32, Error> {
    let declared = channel
        .queue_declare(topology::short(queue)?, QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await;
    match declared {
        Ok(declared) => Ok(declared.message_count()),
        Err(error) => match error.kind() {
            ErrorKind::ProtocolError(amqp) if amqp.get_id() == NOT_FOUND => {
                Err(Error::InvalidName(format!("no queue {queue} in this vhost")))
            }
            _ => Err(error.into()),
        },
    }
}

async fn get(channel: &Channel, queue: &str) -> Result<Option<Delivery>, Error> {
    let message = channel.basic_get(topology::short(queue)?, BasicGetOptions { no_ack: false }).await?;
    Ok(message.map(|m| m.delivery))
}

/// Returns held messages to their queue, in the order they were read.
async fn requeue(held: Vec<Delivery>) -> Result<(), Error> {
    let mut first_error = None;
    for delivery in held {
        if let Err(error) = delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await {
            // Closing the channel returns it anyway; report the first failure.
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), |e| Err(e.into()))
}

/// The properties of a replayed copy: the original's, without what dead-lettering added, and
/// with the id of the replay `run`.
fn replay_properties(original: &BasicProperties, run: &str) -> BasicProperties {
    let mut copy = FieldTable::default();
    if let Some(headers) = original.headers() {
        for (key, value) in headers.inner() {
            let dropped = [
                headers::DEAD_LETTER_REASON,
                headers::DEAD_LETTER_ERROR,
                headers::DEAD_LETTERED_AT,
                headers::ORIGINAL_QUEUE,
                headers::ATTEMPT,
                // The dead-letter queue's own redelivery count (quorum queues add it); the
                // target queue keeps its own.
                "x-delivery-count",
            ];
            if !dropped.contains(&key.as_str()) {
                copy.insert(key.clone(), value.clone());
            }
        }
    }
    copy.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(1));
    headers::set_str(&mut copy, REPLAY_RUN, run);
    original.clone().with_headers(copy).with_delivery_mode(2)
}

fn describe(delivery: &Delivery, pool: Result<&DescriptorPool, String>) -> DeadLetter {
    let properties = &delivery.properties;
    let empty = FieldTable::default();
    let hdrs = properties.headers().as_ref().unwrap_or(&empty);
    let text = |key: &str| headers::header_str(hdrs, key).map(str::to_owned);
    let headers = Failure {
        reason: text(headers::DEAD_LETTER_REASON),
        error: text(headers::DEAD_LETTER_ERROR),
        attempt: headers::header_u32(hdrs, headers::ATTEMPT),
        original_queue: text(headers::ORIGINAL_QUEUE),
        original_routing_key: text(headers::ORIGINAL_ROUTING_KEY),
        dead_lettered_at: text(headers::DEAD_LETTERED_AT),
    };
    let type_name = properties.kind().as_ref().map(|s| s.to_string());
    DeadLetter {
        message_id: properties.message_id().as_ref().map(|s| s.to_string()),
        correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
        routing_key: headers.original_routing_key.clone().unwrap_or_else(|| delivery.routing_key.to_string()),
        body: decode(pool, type_name.as_deref(), &delivery.data),
        type_name,
        headers,
    }
}

/// Decodes `body` as the Protobuf message `type_name` names, into its JSON mapping.
fn decode(pool: Result<&DescriptorPool, String>, type_name: Option<&str>, body: &[u8]) -> Body {
    let decoded = (|| {
        let pool = pool.map_err(|e| format!("the descriptor set is unusable: {e}"))?;
        let type_name = type_name.ok_or("the message has no type property")?;
        let descriptor = pool.get_message_by_name(type_name).ok_or_else(|| format!("unknown type {type_name}"))?;
        let message = DynamicMessage::decode(descriptor, body).map_err(|e| format!("not a {type_name}: {e}"))?;
        let options = SerializeOptions::new().use_proto_field_name(true).skip_default_fields(false);
        let mut json = message
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| format!("converting {type_name} to JSON: {e}"))?;
        redact_secrets(&mut json);
        Ok(json)
    })();
    match decoded {
        Ok(body) => Body::Decoded { body },
        Err(decode_error) => {
            use base64::Engine as _;
            Body::Undecodable { body_base64: base64::engine::general_purpose::STANDARD.encode(body), decode_error }
        }
    }
}

/// Secrets never leave through `show`: string fields whose name ends in `token` (the
/// payment token of `OrderCreated`) are printed as `***`. Replay sends the original bytes.
fn redact_secrets(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                if name.ends_with("token") && field.is_string() {
                    *field = serde_json::Value::String("***".into());
                } else {
                    redact_secrets(field);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_secrets),
        _ => {}
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn payment_tokens_are_not_shown() {
        let mut json = serde_json::json!({"order_id": "o-1", "payment_token": "tok_visa", "items": [{"sku": "A"}]});
        redact_secrets(&mut json);
        assert_eq!(json["payment_token"], "***");
        assert_eq!(json["order_id"], "o-1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::OrderCreated;
    use prost::Message as _;

    #[test]
    fn only_dead_letter_queues_are_accepted() {
        assert!(is_dead_letter_queue("inventory.reserve-stock.dlq"));
        assert!(!is_dead_letter_queue("inventory.reserve-stock"));
        assert!(!is_dead_letter_queue(".dlq"));
    }

    #[test]
    fn replayed_copies_lose_the_failure_headers_and_restart_at_attempt_one() {
        let mut original = FieldTable::default();
        for key in [headers::DEAD_LETTER_REASON, headers::DEAD_LETTER_ERROR, headers::DEAD_LETTERED_AT, headers::ORIGINAL_QUEUE] {
            headers::set_str(&mut original, key, "x");
        }
        headers::set_str(&mut original, headers::ORIGINAL_ROUTING_KEY, "order.created");
        headers::set_str(&mut original, "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        original.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(5));
        let properties = BasicProperties::default().with_message_id("e-1".into()).with_headers(original);
        let copy = replay_properties(&properties, "run-1");
        let hdrs = copy.headers().clone().unwrap_or_default();
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("e-1"));
        assert_eq!(headers::header_u32(&hdrs, headers::ATTEMPT), Some(1));
        assert_eq!(headers::header_str(&hdrs, headers::ORIGINAL_ROUTING_KEY), Some("order.created"));
        assert!(headers::header_str(&hdrs, "traceparent").is_some());
        let mut keys: Vec<&str> = hdrs.inner().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["traceparent", headers::ATTEMPT, headers::ORIGINAL_ROUTING_KEY, REPLAY_RUN]);
        assert_eq!(headers::header_str(&hdrs, REPLAY_RUN), Some("run-1"));
    }

    #[test]
    fn bodies_decode_to_json_or_fall_back_to_base64() {
        let pool = DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let order = OrderCreated { order_id: "o-1".into(), ..Default::default() }.encode_to_vec();
        let Body::Decoded { body } = decode(Ok(&pool), Some("sluice.v1.OrderCreated"), &order) else { panic!("not decoded") };
        assert_eq!(body["order_id"], "o-1");
        let Body::Undecodable { body_base64, decode_error } = decode(Ok(&pool), Some("acme.v9.Mystery"), b"\x01") else {
            panic!("decoded")
        };
        assert_eq!(body_base64, "AQ==");
        assert!(decode_error.contains("unknown type"), "{decode_error}");
    }

    #[test]
    fn a_dead_letter_prints_as_one_flat_json_object() {
        let letter = DeadLetter {
            message_id: Some("e-1".into()),
            type_name: Some("acme.v9.Mystery".into()),
            correlation_id: None,
            routing_key: "order.created".into(),
            headers: Failure { reason: Some("unknown-type".into()), attempt: Some(1), ..Default::default() },
            body: Body::Undecodable { body_base64: "AQ==".into(), decode_error: "unknown type".into() },
        };
        let json = serde_json::to_value(&letter).unwrap();
        assert_eq!(json["type"], "acme.v9.Mystery");
        assert_eq!(json["headers"]["x-sluice-dead-letter-reason"], "unknown-type");
        assert_eq!(json["headers"]["x-sluice-attempt"], 1);
        assert_eq!(json["body_base64"], "AQ==");
        assert_eq!(json["decode_error"], "unknown type");
    }
}
