//! Spans of the OpenTelemetry messaging conventions for RabbitMQ: a PRODUCER span per publish
//! (`send <exchange>:<routing key>`), a CONSUMER span per delivery (`process <queue>`) whose
//! parent is the context carried in the message headers, and an INTERNAL span per handler
//! call. JSON log lines inside any of them carry its trace and span ids (see `telemetry`).

use lapin::{types::FieldTable, uri::AMQPUri};
use opentelemetry::trace::Status;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::headers::TraceContext;

/// `server.address` and `server.port` of the broker.
#[derive(Debug, Clone, Default)]
pub(crate) struct Server {
    address: String,
    port: u16,
}

impl Server {
    pub(crate) fn of(url: &str) -> Self {
        url.parse::<AMQPUri>()
            .map(|uri| Self { address: uri.authority.host, port: uri.authority.port })
            .unwrap_or_default()
    }
}

/// A PRODUCER span for one publish, child of the current span.
pub(crate) fn producer(exchange: &str, routing_key: &str, message_id: &str, order_id: Option<&str>, server: &Server) -> Span {
    producer_span(exchange, routing_key, message_id, order_id, server)
}

/// The span itself; set its parent before anything reads its context (that fixes its ids).
fn producer_span(exchange: &str, routing_key: &str, message_id: &str, order_id: Option<&str>, server: &Server) -> Span {
    // String fields are given as `&str`, not `%` (Display): each layer then copies the text
    // instead of running the formatter over it (see "What a span costs" in docs/benchmarks.md).
    let name = format!("send {exchange}:{routing_key}");
    tracing::info_span!(
        "send",
        otel.name = name.as_str(),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = exchange,
        messaging.rabbitmq.destination.routing_key = routing_key,
        messaging.message.id = message_id,
        server.address = server.address.as_str(),
        server.port = server.port,
        event_id = message_id,
        order_id = order_id.unwrap_or(""),
    )
}

/// A PRODUCER span continuing a stored context (the outbox relay publishes events that
/// handlers emitted earlier, in their trace).
pub(crate) fn producer_in(parent: &TraceContext, exchange: &str, routing_key: &str, message_id: &str, order_id: Option<&str>, server: &Server) -> Span {
    let span = producer_span(exchange, routing_key, message_id, order_id, server);
    let _ = span.set_parent(TraceContext::parent(parent.traceparent.as_deref(), parent.tracestate.as_deref()));
    span
}

/// What a CONSUMER span describes.
pub(crate) struct Delivered<'a> {
    pub(crate) queue: &'a str,
    pub(crate) routing_key: &'a str,
    pub(crate) message_id: &'a str,
    pub(crate) order_id: &'a str,
    pub(crate) handler: &'a str,
    pub(crate) attempt: u32,
}

/// A CONSUMER span for one delivery, parented to the producer's context from `headers`.
pub(crate) fn consumer(delivered: &Delivered<'_>, headers: &FieldTable, server: &Server) -> Span {
    let name = format!("process {}", delivered.queue);
    let span = tracing::info_span!(
        "process",
        otel.name = name.as_str(),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.destination.name = delivered.queue,
        messaging.rabbitmq.destination.routing_key = delivered.routing_key,
        messaging.message.id = delivered.message_id,
        server.address = server.address.as_str(),
        server.port = server.port,
        event_id = delivered.message_id,
        order_id = delivered.order_id,
        handler = delivered.handler,
        attempt = delivered.attempt,
    );
    let _ = span.set_parent(TraceContext::extract(headers));
    span
}

/// The span of one handler call, inside the CONSUMER span.
pub(crate) fn handler(name: &str) -> Span {
    let otel_name = format!("{name} handle");
    tracing::info_span!("handle", otel.name = otel_name.as_str(), handler = name)
}

/// Marks a span failed, with the error recorded on it.
pub(crate) fn fail(span: &Span, error: &str) {
    span.set_status(Status::error(error.to_owned()));
    span.set_attribute("error.type", "handler");
    span.set_attribute("error.message", error.to_owned());
}
