//! `sluice.v1.EventGateway`: publish any registered event (one, or a pipelined stream), and
//! stream live events to subscribers.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::{Stream, StreamExt};
use prost::Message as _;
use tracing::Instrument;
use sluice::bus::{Envelope, Publisher, Tap, TraceContext, headers};
use sluice::config::BusConfig;
use sluice::events::{PayloadError, check_payload};
use sluice::pb::{
    EventEnvelope, PublishRequest, PublishResponse, PublishStreamRequest, PublishStreamResponse, SubscribeRequest,
    event_gateway_server::EventGateway,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, metadata::MetadataMap};
use tonic_types::FieldViolation;
use uuid::Uuid;

use crate::{
    auth,
    budget::{ByteBudget, Holds},
    error::GatewayError,
    validation::MAX_ID_LEN,
};

/// Publishes in flight per PublishStream before the gateway stops reading from it. The bytes
/// in flight have a bound of their own, shared by every stream (`SLUICE_STREAM_BUFFER_BYTES`).
pub const STREAM_WINDOW: usize = 256;
/// Events buffered for a subscriber; one that falls further behind is told so and dropped.
pub const SUBSCRIBER_BUFFER: usize = 256;
/// Most routing patterns per subscription.
const MAX_PATTERNS: usize = 16;

const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x7c1e_93b2_4d5a_4e8f_b6a0_1f2e_3d4c_5b6a);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The generic event API.
#[derive(Clone)]
pub struct Events {
    publisher: Publisher,
    bus: BusConfig,
    /// Ends live subscriptions at shutdown: they never end by themselves, and the server's
    /// graceful shutdown waits for every open stream.
    shutdown: CancellationToken,
    auth: auth::Auth,
    /// Bytes of PublishStream events being published, across streams.
    stream_buffer: ByteBudget,
}

impl Events {
    /// Publishes through `publisher`; subscriptions open taps on `bus` and end with `shutdown`.
    /// PublishStream holds at most `stream_buffer_bytes` of events not yet published.
    pub fn new(publisher: Publisher, bus: BusConfig, shutdown: CancellationToken, stream_buffer_bytes: u32) -> Self {
        Self { publisher, bus, shutdown, auth: None, stream_buffer: ByteBudget::new(stream_buffer_bytes, Holds::StreamEvents) }
    }

    /// Requires bearer tokens with the right grants (see `auth`).
    pub fn with_auth(self, auth: auth::Auth) -> Self {
        Self { auth, ..self }
    }

    /// Validates and publishes one event; `Ok` once confirmed.
    async fn publish_one(&self, request: PublishRequest, metadata: &MetadataMap) -> Result<PublishResponse, Status> {
        let Some(event) = request.event else {
            return Err(GatewayError::InvalidArgument(vec![FieldViolation::new("event", "must be set")]).into());
        };
        if request.idempotency_key.len() > MAX_ID_LEN {
            let violation = FieldViolation::new("idempotency_key", format!("must be at most {MAX_ID_LEN} bytes"));
            return Err(GatewayError::InvalidArgument(vec![violation]).into());
        }
        let type_name = event.type_url.rsplit('/').next().unwrap_or_default().to_owned();
        let checked = check_payload(&type_name, &event.value).map_err(|error| {
            let field = match &error {
                PayloadError::UnknownType(_) => "event.type_url".to_owned(),
                PayloadError::Undecodable { .. } => "event.value".to_owned(),
                PayloadError::MissingField(name) => format!("event.value.{name}"),
            };
            GatewayError::InvalidArgument(vec![FieldViolation::new(field, error.to_string())])
        })?;
        auth::may_publish(&self.auth, metadata, checked.routing_key)?;
        let event_id = if request.idempotency_key.is_empty() {
            // Time-ordered, as PlaceOrder's (see `orders::order_ids`).
            Uuid::now_v7()
        } else {
            Uuid::new_v5(&EVENT_ID_NAMESPACE, format!("{type_name}\u{0}{}", request.idempotency_key).as_bytes())
        }
        .to_string();
        let envelope = Envelope {
            event_id: event_id.clone(),
            routing_key: checked.routing_key.to_owned(),
            type_name,
            correlation_id: checked.order_id,
            occurred_at: headers::now(),
            trace: TraceContext::current(),
            body: event.value,
        };
        self.publisher.publish_envelope_owned(envelope).await.map_err(GatewayError::from)?;
        Ok(PublishResponse { event_id, routing_key: checked.routing_key.to_owned() })
    }
}

/// A routing pattern: dotted words of `[a-z0-9-]`, `*` or `#`.
fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 255
        && pattern.split('.').all(|word| {
            word == "*" || word == "#" || (!word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
        })
}

fn envelope_of(tapped: sluice::bus::Tapped) -> EventEnvelope {
    let time = tapped.headers.get("cloudEvents_time").and_then(|t| t.parse().ok());
    let trace_id = tapped.traceparent.as_deref().and_then(|tp| tp.split('-').nth(1)).unwrap_or_default().to_owned();
    EventEnvelope {
        payload: Some(prost_types::Any { type_url: format!("type.googleapis.com/{}", tapped.type_name), value: tapped.body }),
        r#type: tapped.type_name,
        routing_key: tapped.routing_key,
        event_id: tapped.event_id,
        time,
        trace_id,
        correlation_id: tapped.correlation_id.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl EventGateway for Events {
    async fn publish(&self, request: Request<PublishRequest>) -> Result<Response<PublishResponse>, Status> {
        let metadata = request.metadata().clone();
        Ok(Response::new(self.publish_one(request.into_inner(), &metadata).await?))
    }

    type PublishStreamStream = BoxStream<PublishStreamResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let metadata = Arc::new(request.metadata().clone());
        // A caller that sent a trace context gets its events in that trace, each PRODUCER span
        // a child of this call's server span (README, "Seeing a trace"). Without one, each event
        // starts a trace of its own: a long stream as one trace would be unreadable, and its
        // events are usually unrelated orders.
        let headers: &http::HeaderMap = request.metadata().as_ref();
        let parent = if crate::tracing_opentelemetry_ext::caller_traced(headers) {
            tracing::Span::current()
        } else {
            tracing::Span::none()
        };
        let (tx, rx) = mpsc::channel(STREAM_WINDOW);
        let budget = self.stream_buffer.clone();
        // Read until the caller ends the stream (or it fails), each event once its bytes fit in
        // the streams' budget.
        let admitted = request
            .into_inner()
            .take_while(|item| std::future::ready(item.is_ok()))
            .filter_map(|item| std::future::ready(item.ok()))
            .then(move |item| {
                let budget = budget.clone();
                async move { budget.reserve(item.encoded_len()).await.map(|buffered| (item, buffered)) }
            })
            .take_while(|admitted| std::future::ready(admitted.is_some()))
            .filter_map(std::future::ready);
        let events = self.clone();
        // Up to STREAM_WINDOW events are published at once, all in this one task (a task per
        // event cost about 3,000 instructions of an event's 65,000: docs/benchmarks.md). With
        // the window full, or the streams' bytes, reading stops until an ack is queued, or a
        // publish frees its bytes.
        tokio::spawn(admitted.for_each_concurrent(STREAM_WINDOW, move |(item, buffered)| {
            let (events, tx, metadata, parent) = (events.clone(), tx.clone(), metadata.clone(), parent.clone());
            async move {
                let sequence = item.sequence;
                let response = match item.publish {
                    None => PublishStreamResponse {
                        sequence,
                        error_code: tonic::Code::InvalidArgument as i32,
                        error_message: "publish must be set".into(),
                        ..Default::default()
                    },
                    Some(publish) => match events.publish_one(publish, &metadata).instrument(parent).await {
                        Ok(done) => PublishStreamResponse { sequence, event_id: done.event_id, ..Default::default() },
                        Err(status) => PublishStreamResponse {
                            sequence,
                            error_code: status.code() as i32,
                            error_message: status.message().to_owned(),
                            ..Default::default()
                        },
                    },
                };
                // The event's bytes are gone; its ack is not sent yet.
                drop(buffered);
                let _ = tx.send(Ok(response)).await;
            }
        }));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = BoxStream<EventEnvelope>;

    async fn subscribe(&self, request: Request<SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        let metadata = request.metadata().clone();
        let patterns = request.into_inner().patterns;
        let mut violations = Vec::new();
        if patterns.is_empty() || patterns.len() > MAX_PATTERNS {
            violations.push(FieldViolation::new("patterns", format!("1 to {MAX_PATTERNS} patterns")));
        }
        for (i, pattern) in patterns.iter().enumerate() {
            if !valid_pattern(pattern) {
                violations.push(FieldViolation::new(format!("patterns[{i}]"), "dotted words of [a-z0-9-], `*` or `#`"));
            }
        }
        if !violations.is_empty() {
            return Err(GatewayError::InvalidArgument(violations).into());
        }
        auth::may_subscribe(&self.auth, &metadata, &patterns)?;
        let patterns: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let mut tap = Tap::open(&self.bus, &patterns).await.map_err(GatewayError::from)?;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let lagged = Arc::new(AtomicBool::new(false));
        let flag = lagged.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => break,
                    _ = shutdown.cancelled() => {
                        let _ = tx.try_send(Err(Status::unavailable("the gateway is shutting down")));
                        break;
                    }
                    next = tap.next() => next,
                };
                let Some(event) = next else {
                    let _ = tx.send(Err(Status::unavailable("the broker connection was lost"))).await;
                    break;
                };
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(Ok(envelope_of(event))) {
                    // Too slow: drop the subscription; the client reads what is buffered, then
                    // learns it lagged.
                    flag.store(true, Ordering::SeqCst);
                    break;
                }
            }
            // The stream ends now, whatever closing the tap costs; closing its connection
            // removes its queue.
            drop(tx);
            tap.close().await;
        });
        let told = futures_util::stream::once(async move {
            lagged.load(Ordering::SeqCst).then(|| {
                Err(Status::resource_exhausted(format!("subscriber fell more than {SUBSCRIBER_BUFFER} events behind and was dropped")))
            })
        })
        .filter_map(std::future::ready);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).chain(told))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_topic_patterns() {
        for good in ["order.*", "#", "order.created", "payment.#", "a-b.c1"] {
            assert!(valid_pattern(good), "{good}");
        }
        for bad in ["", "Order.*", "order..x", "order.cr*", &"a".repeat(300)] {
            assert!(!valid_pattern(bad), "{bad}");
        }
    }
}
