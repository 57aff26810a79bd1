//! Spans of the OpenTelemetry messaging conventions for RabbitMQ: a PRODUCER span per publish
//! (`send <exchange>:<routing key>`), a CONSUMER span per delivery (`process <queue>`) whose
//! parent is the context carried in the message headers, and an INTERNAL span per handler
//! call. JSON log lines inside any of them carry its trace and span ids (see `telemetry`).
//!
//! When nothing reads their descriptive attributes ([`crate::telemetry::span_attributes`]: no
//! exporter, logs quieter than `info`), the spans carry only `event_id` and `order_id`, the
//! ids log lines show; their trace context is the same.

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
    producer_span(exchange, routing_key, message_id, order_id, server, crate::telemetry::span_attributes())
}

/// The span itself, with its descriptive attributes if `described`; set its parent before
/// anything reads its context (that fixes its ids).
fn producer_span(exchange: &str, routing_key: &str, message_id: &str, order_id: Option<&str>, server: &Server, described: bool) -> Span {
    if !described {
        return tracing::info_span!("send", event_id = message_id, order_id = order_id.unwrap_or(""));
    }
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
    let span = producer_span(exchange, routing_key, message_id, order_id, server, crate::telemetry::span_attributes());
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
    consumer_span(delivered, headers, server, crate::telemetry::span_attributes())
}

/// [`consumer`], with its descriptive attributes if `described`.
fn consumer_span(delivered: &Delivered<'_>, headers: &FieldTable, server: &Server, described: bool) -> Span {
    let span = if described {
        let name = format!("process {}", delivered.queue);
        tracing::info_span!(
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
        )
    } else {
        tracing::info_span!("process", event_id = delivered.message_id, order_id = delivered.order_id)
    };
    let _ = span.set_parent(TraceContext::extract(headers));
    span
}

/// The span of one handler call, inside the CONSUMER span.
pub(crate) fn handler(name: &str) -> Span {
    if !crate::telemetry::span_attributes() {
        return tracing::info_span!("handle");
    }
    let otel_name = format!("{name} handle");
    tracing::info_span!("handle", otel.name = otel_name.as_str(), handler = name)
}

/// Marks a span failed, with the error recorded on it.
pub(crate) fn fail(span: &Span, error: &str) {
    span.set_status(Status::error(error.to_owned()));
    span.set_attribute("error.type", "handler");
    span.set_attribute("error.message", error.to_owned());
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;
    use crate::telemetry::{
        LogFormat, dispatch, init_propagation,
        tests::{Logs, ids},
    };

    /// A delivery's CONSUMER span without its descriptive attributes (what a process with no
    /// exporter and `RUST_LOG=warn` makes) has the same trace context as one with them: the
    /// producer's trace, an id of its own that its warn line and the events it emits carry, and
    /// the delivery's `order_id` and `event_id` on that line.
    #[test]
    fn spans_without_their_attributes_keep_their_trace_and_their_log_ids() {
        init_propagation();
        let producer_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let mut headers = FieldTable::default();
        super::super::headers::set_str(&mut headers, "traceparent", &format!("00-{producer_trace}-00f067aa0ba902b7-01"));
        let delivered = Delivered {
            queue: "inventory.reserve-stock",
            routing_key: "order.created",
            message_id: "e-1",
            order_id: "o-1",
            handler: "reserve-stock",
            attempt: 1,
        };
        for described in [true, false] {
            let logs = Logs::default();
            let writer = logs.clone();
            let provider = SdkTracerProvider::builder().build();
            let dispatch = dispatch(LogFormat::Json, Some("warn"), provider.tracer("test"), move || writer.clone());
            let (consumer, emitted) = tracing::dispatcher::with_default(&dispatch, || {
                let span = consumer_span(&delivered, &headers, &Server::default(), described);
                let _entered = span.enter();
                tracing::warn!("handler failed; retrying later");
                let consumer = TraceContext::of(&span).traceparent;
                let producer = producer_span("sluice.events", "inventory.reserved", "e-2", Some("o-1"), &Server::default(), described);
                (consumer, TraceContext::of(&producer).traceparent)
            });
            let consumer = consumer.expect("the CONSUMER span has a trace context");
            let (trace_id, span_id) = ids(&consumer);
            assert_eq!(trace_id, producer_trace, "described {described}: the CONSUMER span continues the producer's trace");
            let emitted = emitted.expect("the PRODUCER span has a trace context");
            assert_eq!(ids(&emitted).0, producer_trace, "described {described}: so does the event it emits");
            assert_ne!(ids(&emitted).1, span_id, "described {described}: under a span of its own");
            let lines = logs.lines();
            assert_eq!(lines.len(), 1, "described {described}: {lines:?}");
            assert_eq!(lines[0]["trace_id"], producer_trace, "described {described}: {lines:?}");
            assert_eq!(lines[0]["span_id"], span_id, "described {described}: {lines:?}");
            assert_eq!(lines[0]["order_id"], "o-1", "described {described}: {lines:?}");
            assert_eq!(lines[0]["event_id"], "e-1", "described {described}: {lines:?}");
        }
    }
}
