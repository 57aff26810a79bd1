//! Names and declarations of everything Sluice creates on the broker. The only place where
//! exchange and queue names are built from strings.
//!
//! ```text
//! sluice.events (topic) ──<routing key>──▶ <service>.<handler>        (quorum, durable)
//!                                           │ retry: publish a copy to
//!                                           ▼
//!                  sluice.retry.<ms>ms (fanout) ──▶ sluice.retry.<ms>ms (TTL <ms>)
//!                                           │ expires, dead-lettered via the default exchange
//!                                           └──────────────▶ back to <service>.<handler>
//!                  failures that will never succeed ──▶ <service>.<handler>.dlq
//! ```

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

use super::Error;
use crate::config::QueueType;

/// The topic exchange every event is published to.
pub const EXCHANGE: &str = "sluice.events";

/// A queue or exchange name, checked against AMQP's 255-byte limit.
pub(crate) fn short(name: &str) -> Result<ShortString, Error> {
    ShortString::try_new(name).map_err(|_| Error::InvalidName(name.chars().take(64).collect()))
}

/// `<service>.<handler>`: the durable queue of one subscription endpoint.
pub fn handler_queue(service: &str, handler: &str) -> String {
    format!("{service}.{handler}")
}

/// `<queue>.dlq`: where a queue's dead letters wait for an operator.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// `sluice.retry.<ms>ms`: the delay exchange and queue for one backoff step.
pub fn retry_exchange(delay: Duration) -> String {
    format!("sluice.retry.{}ms", delay.as_millis())
}

/// `ReserveStock` → `reserve-stock`: handler names become queue names.
pub fn kebab_case(type_name: &str) -> String {
    let base = type_name.split('<').next().unwrap_or(type_name);
    let base = base.rsplit("::").next().unwrap_or(base);
    let mut out = String::with_capacity(base.len() + 4);
    for (i, c) in base.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else if c == '_' {
            out.push('-');
        } else {
            out.push(c);
        }
    }
    out
}

fn durable_queue_arguments(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    let kind = match queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    args
}

/// Declares the durable topic exchange.
pub(crate) async fn declare_exchange(channel: &Channel) -> Result<(), Error> {
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Declares a handler queue bound to `routing_key`, and its dead-letter queue.
pub(crate) async fn declare_handler_queue(
    channel: &Channel,
    queue: &str,
    routing_key: &str,
    queue_type: QueueType,
) -> Result<(), Error> {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel
        .queue_declare(short(queue)?, durable, durable_queue_arguments(queue_type))
        .await?;
    channel
        .queue_bind(short(queue)?, EXCHANGE.into(), short(routing_key)?, QueueBindOptions::default(), FieldTable::default())
        .await?;
    channel
        .queue_declare(short(&dead_letter_queue(queue))?, durable, durable_queue_arguments(queue_type))
        .await?;
    Ok(())
}

/// Declares one delay exchange + queue per backoff step. A message published to
/// `sluice.retry.<ms>ms` with routing key `<queue>` returns to `<queue>` after `<ms>`.
/// Each queue holds a single delay, so expiry is strictly first-in first-out: a long delay
/// never holds back a short one (the head-of-line problem of per-message TTLs).
pub(crate) async fn declare_retry_queues(channel: &Channel, delays: &[Duration]) -> Result<(), Error> {
    for delay in delays {
        let name = retry_exchange(*delay);
        channel
            .exchange_declare(
                short(&name)?,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let mut args = FieldTable::default();
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        // The default exchange: with no dead-letter routing key set, the message's own routing
        // key (the target queue's name) routes it home.
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        channel
            .queue_declare(short(&name)?, QueueDeclareOptions { durable: true, ..Default::default() }, args)
            .await?;
        channel
            .queue_bind(short(&name)?, short(&name)?, "".into(), QueueBindOptions::default(), FieldTable::default())
            .await?;
    }
    Ok(())
}

/// Declares the queue that serves one request type (request/reply). Requests are
/// short-lived (they carry a per-message expiration), so a classic queue is enough.
pub(crate) async fn declare_request_queue(channel: &Channel, queue: &str) -> Result<(), Error> {
    channel
        .queue_declare(short(queue)?, QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_follow_the_contract() {
        assert_eq!(handler_queue("inventory", &kebab_case("my_crate::handlers::ReserveStock")), "inventory.reserve-stock");
        assert_eq!(dead_letter_queue("inventory.reserve-stock"), "inventory.reserve-stock.dlq");
        assert_eq!(retry_exchange(Duration::from_secs(2)), "sluice.retry.2000ms");
        assert_eq!(kebab_case("Projector<sluice::events::OrderCreated>"), "projector");
    }

    #[test]
    fn overlong_names_are_an_error_not_a_panic() {
        assert!(matches!(short(&"x".repeat(300)), Err(Error::InvalidName(_))));
    }
}
