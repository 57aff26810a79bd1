//! `--otlp`: an OTLP/gRPC trace collector inside this tool, so that the platform runs as
//! docker-compose runs it, every process exporting its spans (there to Jaeger). The sink only
//! decodes and counts what it receives, by `service.name`; a real collector costs more, and
//! on a shared machine that cost is not counted here.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
};
use tonic::transport::server::TcpIncoming;

/// Spans received so far, by `service.name`.
#[derive(Debug, Clone, Default)]
pub struct Sink {
    spans: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Sink {
    /// Serves OTLP/gRPC on a free local port, for as long as this process runs.
    pub async fn start() -> anyhow::Result<(Self, SocketAddr)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the OTLP sink")?;
        let addr = listener.local_addr()?;
        let sink = Self::default();
        let server = tonic::transport::Server::builder().add_service(TraceServiceServer::new(sink.clone()));
        tokio::spawn(async move {
            if let Err(e) = server.serve_with_incoming(TcpIncoming::from(listener)).await {
                eprintln!("warning: the OTLP sink stopped: {e}");
            }
        });
        Ok((sink, addr))
    }

    /// Spans received so far, by service.
    pub fn received(&self) -> BTreeMap<String, u64> {
        self.spans.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Spans received between two readings, in all and by service: `12,345 (sluice-gateway 2,000, ...)`.
    pub fn describe(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> (u64, String) {
        let by: Vec<(String, u64)> =
            after.iter().map(|(service, n)| (service.clone(), n - before.get(service).copied().unwrap_or(0))).collect();
        let total = by.iter().map(|(_, n)| n).sum();
        let parts: Vec<String> = by.iter().map(|(service, n)| format!("{service} {n}")).collect();
        (total, parts.join(", "))
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(&self, request: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut counted = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| "?".into());
            let spans: usize = resource_spans.scope_spans.iter().map(|scope| scope.spans.len()).sum();
            counted.push((service, spans as u64));
        }
        let mut totals = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        for (service, spans) in counted {
            *totals.entry(service).or_default() += spans;
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}
