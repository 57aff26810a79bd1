//! Logs and traces: `tracing` with JSON lines (or a human format), exported to OpenTelemetry
//! over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C trace-context propagation.
//!
//! With no exporter configured nothing is exported, but spans are still OpenTelemetry spans (their
//! ids travel in `traceparent` and appear in log lines), and that costs: 18-27 % of the gateway's
//! CPU under load, see docs/benchmarks.md. What nobody reads is left out: with no exporter and
//! logs quieter than `info`, spans carry their ids and no descriptive attributes
//! ([`span_attributes`]).
//!
//! `RUST_LOG` decides which events are logged, not what is traced: spans at `info` and above
//! are always recorded (so trace context still propagates, and a `warn` line still carries its
//! span's trace id, when the logs are set to `warn`).

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    global,
    trace::{TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider},
};
use tracing::{
    Dispatch, Level, Metadata,
    dispatcher::WeakDispatch,
    field::{Field, Visit},
    span::{self, Attributes, Record},
};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, LevelFilter, filter_fn},
    fmt::MakeWriter,
    layer::{Context, SubscriberExt},
    registry::{LookupSpan, Registry},
    util::SubscriberInitExt,
};

use crate::config::{ConfigError, Source};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, with the current span's fields (the default).
    Json,
    /// Human-readable lines, for a terminal.
    Pretty,
}

/// How a process reports what it does.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of the spans (`OTEL_SERVICE_NAME`, default: the binary's name).
    pub service_name: String,
    /// OTLP/gRPC collector (`OTEL_EXPORTER_OTLP_ENDPOINT`); `None` means no export.
    pub otlp_endpoint: Option<String>,
    /// `SLUICE_LOG_FORMAT`: `json` (default) or `pretty`.
    pub log_format: LogFormat,
}

impl TelemetryConfig {
    /// Reads `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_ENDPOINT` and `SLUICE_LOG_FORMAT`.
    pub fn from_source(source: &impl Source, default_service_name: &str) -> Result<Self, ConfigError> {
        let log_format = match source.get("SLUICE_LOG_FORMAT").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError::new("SLUICE_LOG_FORMAT", other, "expected `json` or `pretty`"));
            }
        };
        let otlp_endpoint = source.get("OTEL_EXPORTER_OTLP_ENDPOINT");
        if let Some(endpoint) = otlp_endpoint.as_ref().filter(|e| !(e.starts_with("http://") || e.starts_with("https://"))) {
            return Err(ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone(), "expected an http:// or https:// URL"));
        }
        Ok(Self {
            service_name: source.get("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service_name.to_owned()),
            otlp_endpoint,
            log_format,
        })
    }
}

/// Flushes and stops the exporter: call [`TelemetryGuard::shutdown`] at the end of `main`.
#[must_use = "call `shutdown().await` at the end of main, or the last spans may be lost"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports the spans still queued, then stops the exporter.
    ///
    /// The OTLP exporter's gRPC channel runs on this runtime, so the runtime must keep running
    /// while the batch processor flushes: the flush waits on a blocking thread, and this task
    /// awaits it. (Blocking the runtime's only thread instead, as a `Drop` must on a
    /// current-thread runtime, starves the channel: the services lost their last spans at every
    /// stop, after a 5 s timeout.)
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "flushing spans at shutdown");
            }
        }
    }
}

impl Drop for TelemetryGuard {
    /// A fallback for a guard that was never shut down (a panic, say): it flushes what it can.
    /// On a multi-threaded runtime the other workers carry the export; on a current-thread one
    /// it times out after 5 s and the queued spans are lost.
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("building the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("installing the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Whether spans carry what only an exporter or a log line's span fields show (see
/// [`span_attributes`]); set by [`init`].
static SPAN_ATTRIBUTES: AtomicBool = AtomicBool::new(true);

/// Whether the spans Sluice makes should carry their descriptive attributes: the OpenTelemetry
/// messaging and RPC attributes, `otel.name` and `otel.kind`, a delivery's handler and attempt.
/// Only two things read them: an exporter, and the log lines' `span` and `spans` fields, which
/// the log layer keeps only for the spans `RUST_LOG` enables. With neither (no
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, and `RUST_LOG` quieter than `info`), [`init`] turns them off,
/// and a span carries only the `order_id` and `event_id` its log lines show at the top level.
/// Its trace and span ids, its parent and the `traceparent` it passes on are the same either
/// way. `true` until [`init`] decides (a process that installs its own subscriber keeps them).
pub fn span_attributes() -> bool {
    SPAN_ATTRIBUTES.load(Ordering::Relaxed)
}

/// Whether anything reads spans' descriptive attributes: an exporter, or logs under
/// `directives` that may keep an `info` span's fields.
fn attributes_read(exporting: bool, directives: Option<&str>) -> bool {
    exporting || logged(directives).max_level_hint().is_none_or(|max| max >= LevelFilter::INFO)
}

/// Installs W3C trace-context propagation only (what the bus needs to carry `traceparent`).
pub fn init_propagation() {
    global::set_text_map_propagator(TraceContextPropagator::new());
}

/// The log lines `RUST_LOG` asks for (default `info`).
fn logged(directives: Option<&str>) -> EnvFilter {
    directives.and_then(|d| EnvFilter::try_new(d).ok()).unwrap_or_else(|| EnvFilter::new("info"))
}

/// Spans traced whatever `RUST_LOG` says: `info` and above.
fn traced_span(meta: &Metadata<'_>) -> bool {
    meta.is_span() && *meta.level() <= Level::INFO
}

/// Log lines to `writer` as `format`, filtered by `directives` (`RUST_LOG` syntax), and spans to
/// `tracer`.
///
/// The log level does not switch tracing off: every span at `info` and above is traced whatever
/// `RUST_LOG` says. The log layer keeps the fields only of the spans `RUST_LOG` enables (keeping
/// them costs every span, logged in or not); a JSON line inside any traced span carries its
/// OpenTelemetry `trace_id` and `span_id`, read when the line is written, and the nearest
/// `order_id` and `event_id` of the spans it is in, at the top level.
pub(crate) fn dispatch<W>(format: LogFormat, directives: Option<&str>, tracer: SdkTracer, writer: W) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // The ids live with the OpenTelemetry layer, reached through the dispatcher itself, which
    // exists only once the subscriber is built; inside an event it is not the "current" one.
    let this: Arc<OnceLock<WeakDispatch>> = Arc::default();
    let fmt_layer = match format {
        LogFormat::Json => {
            let mut layer = json_subscriber::fmt::layer().with_current_span(true).with_span_list(true).with_writer(writer);
            let this = this.clone();
            layer.inner_layer_mut().add_multiple_dynamic_fields(move |event, _, fields| {
                let Some(dispatch) = this.get().and_then(WeakDispatch::upgrade) else { return };
                let span = match event.parent() {
                    Some(parent) => Some(parent.clone()),
                    None if event.is_contextual() => dispatch.current_span().id().cloned(),
                    None => None,
                };
                let Some(span) = span else { return };
                if let Some(context) = tracing_opentelemetry::get_otel_context(&span, &dispatch) {
                    let ids = context.span().span_context().clone();
                    if ids.is_valid() {
                        let _ = fields.write_field("trace_id", ids.trace_id().to_string());
                        let _ = fields.write_field("span_id", ids.span_id().to_string());
                    }
                }
                let Some(span) = dispatch.downcast_ref::<Registry>().and_then(|registry| registry.span(&span)) else { return };
                let (mut order_id, mut event_id) = (None, None);
                for span in span.scope() {
                    if let Some(ids) = span.extensions().get::<NamedIds>() {
                        order_id = order_id.or_else(|| ids.order_id.clone());
                        event_id = event_id.or_else(|| ids.event_id.clone());
                    }
                }
                if let Some(order_id) = order_id {
                    let _ = fields.write_field("order_id", order_id);
                }
                if let Some(event_id) = event_id {
                    let _ = fields.write_field("event_id", event_id);
                }
            });
            layer.boxed()
        }
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    }
    .with_filter(logged(directives));
    let traced = logged(directives)
        .or(filter_fn(traced_span))
        // lapin's connection I/O loop is a span of its own that lives as long as the
        // connection: not part of any request's story, so it is not exported.
        .and(filter_fn(|meta| !meta.target().starts_with("lapin")));
    // Our code reads contexts from `tracing` spans (`OpenTelemetrySpanExt`), never from
    // OpenTelemetry's thread-local current context, so no span needs activating on entry; and
    // busy/idle times and thread attributes are not worth their cost on every span.
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .and_then(KeepIds)
        .with_filter(traced);
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(fmt_layer).with(otel_layer));
    let _ = this.set(dispatch.downgrade());
    dispatch
}

/// A span's `order_id` and `event_id`, kept whatever `RUST_LOG` says, so that a JSON line names
/// the order and the event it is about at any log level (the log layer keeps a span's other
/// fields only for the spans `RUST_LOG` enables).
#[derive(Default)]
struct NamedIds {
    order_id: Option<String>,
    event_id: Option<String>,
}

impl NamedIds {
    const FIELDS: [&'static str; 2] = ["order_id", "event_id"];

    fn set(&mut self, field: &Field, value: String) {
        if value.is_empty() {
            return;
        }
        match field.name() {
            "order_id" => self.order_id = Some(value),
            "event_id" => self.event_id = Some(value),
            _ => {}
        }
    }
}

impl Visit for NamedIds {
    fn record_str(&mut self, field: &Field, value: &str) {
        if Self::FIELDS.contains(&field.name()) {
            self.set(field, value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields arrive here, and print as their `Display`.
        if Self::FIELDS.contains(&field.name()) {
            self.set(field, format!("{value:?}"));
        }
    }
}

/// Keeps [`NamedIds`] in the extensions of the traced spans that declare those fields.
///
/// It shares the OpenTelemetry layer's filter (every traced span) and picks the spans with ids
/// itself: each filtered layer looks the span up in the registry on every enter, exit, record
/// and close to ask its filter, and this layer acts only when a span is made or recorded.
struct KeepIds;

impl KeepIds {
    fn keeps(meta: &Metadata<'_>) -> bool {
        traced_span(meta) && NamedIds::FIELDS.iter().any(|name| meta.fields().field(name).is_some())
    }
}

impl<S> Layer<S> for KeepIds
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if !Self::keeps(attrs.metadata()) {
            return;
        }
        let mut ids = NamedIds::default();
        attrs.record(&mut ids);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(ids);
        }
    }

    fn on_record(&self, id: &span::Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(ids) = span.extensions_mut().get_mut::<NamedIds>()
        {
            values.record(ids);
        }
    }
}

/// Runs a process's `body` with telemetry installed ([`init`]), then exports the spans still
/// queued ([`TelemetryGuard::shutdown`]) whatever `body` returned, while the runtime still runs.
pub async fn traced<T>(config: &TelemetryConfig, body: impl Future<Output = T>) -> Result<T, TelemetryError> {
    let guard = init(config)?;
    let outcome = body.await;
    guard.shutdown().await;
    Ok(outcome)
}

/// Installs logging, tracing export and propagation for this process. Call once, in `main`.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    init_propagation();
    // Spans always get OpenTelemetry ids (so every log line can carry its trace id); they are
    // exported only when an endpoint is configured, by a batch processor on its own thread, so
    // a slow or absent collector never blocks the hot path.
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(config.service_name.clone()).build());
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(std::time::Duration::from_secs(3))
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer(config.service_name.clone());
    let provider = config.otlp_endpoint.is_some().then_some(provider);
    let directives = std::env::var("RUST_LOG").ok();
    SPAN_ATTRIBUTES.store(attributes_read(config.otlp_endpoint.is_some(), directives.as_deref()), Ordering::Relaxed);
    dispatch(config.log_format, directives.as_deref(), tracer, std::io::stdout).try_init()?;
    Ok(TelemetryGuard { provider })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::bus::headers::TraceContext;

    /// Log lines written to memory.
    #[derive(Clone, Default)]
    pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Logs {
        /// The JSON lines written so far.
        pub(crate) fn lines(&self) -> Vec<serde_json::Value> {
            let text = String::from_utf8(self.0.lock().expect("logs").clone()).expect("utf-8 logs");
            text.lines().map(|line| serde_json::from_str(line).expect("a JSON line")).collect()
        }
    }

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("logs").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Logs `warn!` and `info!` inside an info span, under `directives`: (the span's
    /// traceparent, the log lines).
    fn log_in_a_span(directives: &str) -> (String, Vec<serde_json::Value>) {
        init_propagation();
        let provider = SdkTracerProvider::builder().build();
        let logs = Logs::default();
        let writer = logs.clone();
        let dispatch = dispatch(LogFormat::Json, Some(directives), provider.tracer("test"), move || writer.clone());
        let traceparent = tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("process", order_id = "o-1", event_id = %"e-1");
            let _entered = span.enter();
            let span = tracing::info_span!("handle");
            let _entered = span.enter();
            tracing::info!("info line");
            tracing::warn!("warn line");
            TraceContext::current().traceparent
        });
        let traceparent = traceparent.expect("the info span is traced and its context propagates");
        (traceparent, logs.lines())
    }

    /// Spans carry their attributes when an exporter or the log lines' span fields may read
    /// them, and only then.
    #[test]
    fn span_attributes_are_kept_only_where_something_reads_them() {
        for (exporting, directives, read) in [
            (true, Some("warn"), true),
            (true, Some("off"), true),
            (false, None, true),
            (false, Some("info"), true),
            (false, Some("debug"), true),
            (false, Some("warn,sluice=info"), true),
            (false, Some("warn"), false),
            (false, Some("error"), false),
            (false, Some("off"), false),
        ] {
            assert_eq!(attributes_read(exporting, directives), read, "exporting {exporting}, RUST_LOG {directives:?}");
        }
    }

    pub(crate) fn ids(traceparent: &str) -> (&str, &str) {
        match traceparent.split('-').collect::<Vec<_>>()[..] {
            [_, trace_id, span_id, _] => (trace_id, span_id),
            _ => panic!("not a W3C traceparent: {traceparent}"),
        }
    }

    #[test]
    fn logging_at_warn_still_traces_and_warn_lines_carry_the_trace_id() {
        let (traceparent, lines) = log_in_a_span("warn");
        let (trace_id, span_id) = ids(&traceparent);
        assert_eq!(lines.len(), 1, "only the warn line is logged: {lines:?}");
        assert_eq!(lines[0]["fields"]["message"], "warn line");
        assert_eq!(lines[0]["trace_id"], trace_id, "the warn line carries the trace id: {lines:?}");
        assert_eq!(lines[0]["span_id"], span_id, "and the span id: {lines:?}");
        assert_eq!(lines[0]["order_id"], "o-1", "and the order id of the span above: {lines:?}");
        assert_eq!(lines[0]["event_id"], "e-1", "and its event id: {lines:?}");
        assert!(lines[0].get("span").is_none(), "no span fields at warn: {lines:?}");
    }

    #[test]
    fn logging_at_info_lines_carry_the_ids_and_the_span_fields() {
        let (traceparent, lines) = log_in_a_span("info");
        let (trace_id, span_id) = ids(&traceparent);
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            assert_eq!(line["trace_id"], trace_id, "{line}");
            assert_eq!(line["span_id"], span_id, "{line}");
            assert_eq!(line["order_id"], "o-1", "{line}");
            assert_eq!(line["event_id"], "e-1", "{line}");
            assert_eq!(line["span"]["name"], "handle", "{line}");
            assert_eq!(line["spans"][0]["order_id"], "o-1", "{line}");
        }
    }
}
