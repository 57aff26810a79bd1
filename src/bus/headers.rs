//! The wire format of a Sluice message: AMQP properties, CloudEvents binary-mode headers,
//! W3C trace context and Sluice's own bookkeeping headers (DESIGN §4).

use std::time::SystemTime;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use opentelemetry::{
    propagation::{Extractor, Injector},
    trace::TraceContextExt,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::events::Event;

/// `content_type` of every event body.
pub const CONTENT_TYPE: &str = "application/protobuf";
/// Delivery attempt of this copy (1 for the first delivery), set on retried copies.
pub const ATTEMPT: &str = "x-sluice-attempt";
/// Dead-letter headers: why, what failed, how often, from where, when.
pub const DEAD_LETTER_REASON: &str = "x-sluice-dead-letter-reason";
/// The error text that caused the dead-lettering.
pub const DEAD_LETTER_ERROR: &str = "x-sluice-error";
/// The queue the message was dead-lettered from.
pub const ORIGINAL_QUEUE: &str = "x-sluice-original-queue";
/// The routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-sluice-original-routing-key";
/// When the message was dead-lettered (RFC 3339).
pub const DEAD_LETTERED_AT: &str = "x-sluice-dead-lettered-at";
/// Error text of a failed request/reply call.
pub const RPC_ERROR: &str = "x-sluice-rpc-error";

/// The W3C trace context of the span that produced a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent` header, if the producer was inside a sampled or remote trace.
    pub traceparent: Option<String>,
    /// `tracestate` header.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The context of the current `tracing` span, through the global propagator.
    pub fn current() -> Self {
        Self::of(&tracing::Span::current())
    }

    /// The context of `span`, as W3C trace context: what [`TraceContextPropagator`], the
    /// global propagator, would inject, written directly (the propagator's `format!` and its
    /// global lookup were about 3,000 instructions of each publish).
    ///
    /// [`TraceContextPropagator`]: opentelemetry_sdk::propagation::TraceContextPropagator
    pub fn of(span: &tracing::Span) -> Self {
        Self::of_span_context(span.context().span().span_context())
    }

    fn of_span_context(span: &opentelemetry::trace::SpanContext) -> Self {
        if !span.is_valid() {
            return Self::default();
        }
        // `00-<trace id>-<span id>-<flags>`: version 00, and of the flags only `sampled`.
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let written = hex::encode_to_slice(span.trace_id().to_bytes(), &mut text[3..35])
            .and_then(|()| hex::encode_to_slice(span.span_id().to_bytes(), &mut text[36..52]));
        if span.is_sampled() {
            text[54] = b'1';
        }
        let state = span.trace_state().header();
        Self {
            traceparent: written.ok().and_then(|()| String::from_utf8(text.to_vec()).ok()),
            tracestate: (!state.is_empty()).then_some(state),
        }
    }

    /// The context carried by a message's headers, as an OpenTelemetry parent (see
    /// [`TraceContext::parent`]).
    pub fn extract(headers: &FieldTable) -> opentelemetry::Context {
        Self::parent(header_str(headers, "traceparent"), header_str(headers, "tracestate"))
    }

    /// The current context with the remote parent that `traceparent` and `tracestate` name, or
    /// the current context alone if they name none: what [`TraceContextPropagator`], the global
    /// propagator, extracts (a test compares them), read directly, without the global lookup
    /// and the propagator's `Vec` of parts.
    ///
    /// [`TraceContextPropagator`]: opentelemetry_sdk::propagation::TraceContextPropagator
    pub fn parent(traceparent: Option<&str>, tracestate: Option<&str>) -> opentelemetry::Context {
        let current = opentelemetry::Context::current();
        match remote_span_context(traceparent, tracestate) {
            Some(span) => current.with_remote_span_context(span),
            None => current,
        }
    }
}

/// The W3C trace context in `traceparent` and `tracestate`, by the rules of
/// `TraceContextPropagator` (opentelemetry_sdk 0.33): a version of 00 to fe (00 with exactly
/// four parts), lower-case ids, only the `sampled` flag kept, a `tracestate` that does not
/// parse taken as empty, and a valid context or none.
fn remote_span_context(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let mut parts = traceparent.unwrap_or("").trim().split_terminator('-');
    let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let version = u8::from_str_radix(version, 16).ok()?;
    if version == u8::MAX || (version == 0 && parts.next().is_some()) {
        return None;
    }
    let lower = |part: &str| !part.chars().any(|c| c.is_ascii_uppercase());
    if !(lower(trace_id) && lower(span_id) && lower(flags)) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED;
    let state: TraceState = tracestate.map(|s| s.parse().unwrap_or_default()).unwrap_or_default();
    let span = SpanContext::new(trace_id, span_id, flags, true, state);
    span.is_valid().then_some(span)
}

/// The propagator writes straight into the two fields (no map in between). An empty
/// `tracestate` (the propagator always sets one) means none, and is not sent.
impl Injector for TraceContext {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

/// Reads W3C trace-context headers out of an AMQP header table.
pub struct AmqpExtractor<'a>(pub &'a FieldTable);

impl Extractor for AmqpExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        header_str(self.0, key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// A string header, whether sent as a long or short string.
pub fn header_str<'a>(headers: &'a FieldTable, key: &str) -> Option<&'a str> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// An integer header of any AMQP integer width.
pub fn header_u32(headers: &FieldTable, key: &str) -> Option<u32> {
    let value: i64 = match headers.inner().get(key)? {
        AMQPValue::ShortShortUInt(v) => (*v).into(),
        AMQPValue::ShortUInt(v) => (*v).into(),
        AMQPValue::LongUInt(v) => (*v).into(),
        AMQPValue::ShortShortInt(v) => (*v).into(),
        AMQPValue::ShortInt(v) => (*v).into(),
        AMQPValue::LongInt(v) => (*v).into(),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    u32::try_from(value).ok()
}

/// Sets a string header.
pub fn set_str(headers: &mut FieldTable, key: &str, value: &str) {
    headers.insert(ShortString::from(key), AMQPValue::LongString(value.into()));
}

/// Current time as a Protobuf timestamp.
pub fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(SystemTime::now())
}

/// `ts` as RFC 3339 text in UTC (`2026-12-07T00:51:56.08734434Z`), as the `cloudEvents_time`
/// header and the outbox carry it; prost's `Timestamp` parses it back exactly. Formatted by
/// `time`, in about a quarter of the instructions of prost's `Display` (seven padded integers
/// through `core::fmt`), which it falls back to for years `time` does not format (beyond 0–9999).
pub fn rfc3339(ts: &prost_types::Timestamp) -> String {
    let nanos = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ts.to_string())
}

/// An event ready to publish: body plus everything that goes into properties and headers.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The event id, sent as `message_id` and `cloudEvents_id`.
    pub event_id: String,
    /// Routing key on `sluice.events`.
    pub routing_key: String,
    /// Full Protobuf name, sent as `type` and `cloudEvents_type`.
    pub type_name: String,
    /// The order id for order flows, sent as `correlation_id`.
    pub correlation_id: Option<String>,
    /// When the event happened, sent as `timestamp` and `cloudEvents_time`.
    pub occurred_at: prost_types::Timestamp,
    /// Trace context of the producing span.
    pub trace: TraceContext,
    /// Protobuf encoding of the event.
    pub body: Vec<u8>,
}

impl Envelope {
    /// Wraps a typed event, capturing the current trace context.
    pub fn of<E: Event>(event: &E, event_id: impl Into<String>) -> Self {
        Self::traced(event, event_id, TraceContext::current())
    }

    /// [`Envelope::of`], carrying `trace`.
    pub(crate) fn traced<E: Event>(event: &E, event_id: impl Into<String>, trace: TraceContext) -> Self {
        Self {
            event_id: event_id.into(),
            routing_key: E::ROUTING_KEY.to_owned(),
            type_name: E::FULL_NAME.to_owned(),
            correlation_id: event.order_id().filter(|id| !id.is_empty()).map(str::to_owned),
            occurred_at: now(),
            trace,
            body: event.encode_to_vec(),
        }
    }

    /// AMQP properties and headers for this envelope, produced by `app_id`.
    pub fn properties(&self, app_id: &str) -> BasicProperties {
        self.properties_in(app_id, &self.trace)
    }

    /// [`Envelope::properties`], carrying `trace` instead of the envelope's own context.
    pub(crate) fn properties_in(&self, app_id: &str, trace: &TraceContext) -> BasicProperties {
        let mut headers = FieldTable::default();
        set_str(&mut headers, "cloudEvents_specversion", "1.0");
        set_str(&mut headers, "cloudEvents_id", &self.event_id);
        set_str(&mut headers, "cloudEvents_source", &format!("/sluice/{app_id}"));
        set_str(&mut headers, "cloudEvents_type", &self.type_name);
        set_str(&mut headers, "cloudEvents_time", &rfc3339(&self.occurred_at));
        if let Some(traceparent) = &trace.traceparent {
            set_str(&mut headers, "traceparent", traceparent);
        }
        if let Some(tracestate) = &trace.tracestate {
            set_str(&mut headers, "tracestate", tracestate);
        }
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(ShortString::from(lossy_short(&self.type_name)))
            .with_message_id(ShortString::from(lossy_short(&self.event_id)))
            .with_timestamp(u64::try_from(self.occurred_at.seconds).unwrap_or(0))
            .with_app_id(ShortString::from(lossy_short(app_id)))
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(correlation_id) = &self.correlation_id {
            properties = properties.with_correlation_id(ShortString::from(lossy_short(correlation_id)));
        }
        properties
    }
}

/// Truncates to AMQP's 255-byte short-string limit on a character boundary. Inputs are
/// validated long before this; truncation only guards against a panic in `ShortString::from`.
fn lossy_short(s: &str) -> String {
    if s.len() <= 255 {
        return s.to_owned();
    }
    let mut end = 255;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::OrderCreated;

    #[test]
    fn properties_follow_the_wire_contract() {
        let event = OrderCreated { order_id: "o-1".into(), ..Default::default() };
        let envelope = Envelope::of(&event, "e-1");
        let props = envelope.properties("gateway");
        assert_eq!(props.content_type().as_ref().map(|s| s.as_str()), Some(CONTENT_TYPE));
        assert_eq!(props.kind().as_ref().map(|s| s.as_str()), Some("sluice.v1.OrderCreated"));
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("e-1"));
        assert_eq!(props.correlation_id().as_ref().map(|s| s.as_str()), Some("o-1"));
        assert_eq!(props.app_id().as_ref().map(|s| s.as_str()), Some("gateway"));
        assert_eq!(*props.delivery_mode(), Some(2));
        let headers = props.headers().clone().unwrap_or_default();
        assert_eq!(header_str(&headers, "cloudEvents_specversion"), Some("1.0"));
        assert_eq!(header_str(&headers, "cloudEvents_id"), Some("e-1"));
        assert_eq!(header_str(&headers, "cloudEvents_type"), Some("sluice.v1.OrderCreated"));
        assert_eq!(header_str(&headers, "cloudEvents_source"), Some("/sluice/gateway"));
        let time = header_str(&headers, "cloudEvents_time").unwrap();
        assert!(time.parse::<prost_types::Timestamp>().is_ok(), "{time}");
    }

    #[test]
    fn times_are_rfc_3339_and_parse_back_exactly() {
        for (seconds, nanos, text) in [
            (1_796_604_716, 87_344_340, "2026-12-07T00:51:56.08734434Z"),
            (1_796_604_716, 0, "2026-12-07T00:51:56Z"),
            (0, 1, "1970-01-01T00:00:00.000000001Z"),
            (-1, 500_000_000, "1969-12-31T23:59:59.5Z"),
        ] {
            let ts = prost_types::Timestamp { seconds, nanos };
            assert_eq!(super::rfc3339(&ts), text);
            assert_eq!(text.parse::<prost_types::Timestamp>().unwrap(), ts, "{text}");
        }
        // Beyond what `time` formats: prost's text, which still parses back.
        let far = prost_types::Timestamp { seconds: 253_402_300_800, nanos: 0 };
        assert_eq!(super::rfc3339(&far), far.to_string());
        assert_eq!(super::rfc3339(&far).parse::<prost_types::Timestamp>().unwrap(), far);
    }

    #[test]
    fn trace_context_is_what_the_w3c_propagator_injects() {
        use opentelemetry::{
            propagation::TextMapPropagator,
            trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState},
        };
        let state = TraceState::from_key_value([("vendor", "abc"), ("other", "x-1")]).unwrap();
        let contexts = [
            SpanContext::new(TraceId::from(0x0af7651916cd43dd8448eb211c80319c), SpanId::from(0xb7ad6b7169203331), TraceFlags::SAMPLED, true, state),
            SpanContext::new(TraceId::from(0x1), SpanId::from(0xff00), TraceFlags::default(), false, TraceState::default()),
            SpanContext::new(TraceId::from(u128::MAX), SpanId::from(u64::MAX), TraceFlags::new(0xff), true, TraceState::default()),
            SpanContext::empty_context(),
        ];
        let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        for span in &contexts {
            let mut injected = TraceContext::default();
            propagator.inject_context(&opentelemetry::Context::new().with_remote_span_context(span.clone()), &mut injected);
            assert_eq!(TraceContext::of_span_context(span), injected, "{span:?}");
        }
        let sampled = TraceContext::of_span_context(&contexts[0]);
        assert_eq!(sampled.traceparent.as_deref(), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        assert_eq!(sampled.tracestate.as_deref(), Some("vendor=abc,other=x-1"));
        assert_eq!(TraceContext::of_span_context(&contexts[3]), TraceContext::default());
    }

    #[test]
    fn parents_are_what_the_w3c_propagator_extracts() {
        use opentelemetry::propagation::TextMapPropagator;
        let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        let mut rng = fastrand::Rng::with_seed(11);
        let hex = |rng: &mut fastrand::Rng, n: usize| -> String { (0..n).map(|_| char::from(b"0123456789abcdef"[rng.usize(0..16)])).collect() };
        // An id of `n` digits, or one of the ways to get it wrong (or nearly).
        let id = |rng: &mut fastrand::Rng, n: usize| match rng.u8(0..8) {
            0 => hex(rng, n).to_uppercase(),
            1 => "0".repeat(n),
            2 => hex(rng, n - 1),
            3 => hex(rng, n + 1),
            4 => format!("+{}", hex(rng, n - 1)),
            5 => String::new(),
            _ => hex(rng, n),
        };
        let (mut valid, mut invalid) = (0, 0);
        for _ in 0..20_000 {
            let version = ["00", "01", "fe", "ff", "0", "000", "+0", "zz", "", "0A"][rng.usize(0..10)];
            let (trace_id, span_id) = (id(&mut rng, 32), id(&mut rng, 16));
            let flags = ["00", "01", "03", "ff", "1", "+1", "0A", "0a", "zz", ""][rng.usize(0..10)];
            let rest = ["", "", "", "-", "-extra", "-x-y"][rng.usize(0..6)];
            let (before, after) = [("", ""), (" ", ""), ("", "\t"), (" ", " ")][rng.usize(0..4)];
            let traceparent = format!("{before}{version}-{trace_id}-{span_id}-{flags}{rest}{after}");
            let tracestate = [None, Some("a=1,b=2"), Some("not a state"), Some("")][rng.usize(0..4)];
            let mut headers = FieldTable::default();
            if rng.u8(0..20) != 0 {
                set_str(&mut headers, "traceparent", &traceparent);
            }
            if let Some(state) = tracestate {
                set_str(&mut headers, "tracestate", state);
            }
            let ours = TraceContext::extract(&headers);
            let theirs = propagator.extract(&AmqpExtractor(&headers));
            assert_eq!(ours.span().span_context(), theirs.span().span_context(), "{traceparent:?} {tracestate:?}");
            if ours.span().span_context().is_valid() {
                valid += 1;
            } else {
                invalid += 1;
            }
        }
        assert!(valid > 1_000 && invalid > 1_000, "{valid} valid, {invalid} invalid");
    }

    #[test]
    fn overlong_short_strings_are_cut_not_panicked() {
        assert_eq!(lossy_short(&"é".repeat(200)).len(), 254);
    }
}
