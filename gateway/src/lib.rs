//! The Sluice gRPC gateway: validates commands and events from clients and publishes them to
//! RabbitMQ, answering only once the broker has confirmed.
//!
//! `Gateway::bind` connects to the broker and binds the listening socket (so `local_addr` is
//! known before serving); `Gateway::run` serves until shutdown, then drains in-flight calls
//! and closes the broker connections.

mod auth;
mod budget;
mod catalog;
mod config;
mod error;
mod events;
mod metrics;
mod orders;
mod shed;
mod tls;
mod validation;

use std::net::SocketAddr;

pub use auth::token_hash;
pub use config::Config;
pub use error::GatewayError;
pub use events::{Events, STREAM_WINDOW};
pub use orders::Orders;
pub use tls::ServerTls;

use sluice::bus::{Publisher, RpcClient};
use sluice::pb::{FILE_DESCRIPTOR_SET, event_gateway_server::EventGatewayServer, order_service_server::OrderServiceServer};
use sluice::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing_opentelemetry_ext::trace_span;

/// Largest request message the gateway decodes; larger ones are refused before any work.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// `app_id` of everything the gateway publishes.
pub const APP_ID: &str = "gateway";

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The broker could not be reached.
    #[error("connecting to the broker: {0}")]
    Bus(#[from] sluice::bus::Error),
    /// The address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed.
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The TLS certificate and key could not be loaded into the server.
    #[error("SLUICE_TLS_CERT/SLUICE_TLS_KEY: {0}")]
    Tls(#[source] tonic::transport::Error),
    /// The token file is unusable.
    #[error("SLUICE_AUTH_TOKENS: {0}")]
    Auth(#[from] auth::AuthConfigError),
}

/// A gateway connected to the broker and bound to its address, not yet serving.
pub struct Gateway {
    auth: auth::Auth,
    listener: TcpListener,
    local_addr: SocketAddr,
    publisher: Publisher,
    rpc: RpcClient,
    config: Config,
}

impl Gateway {
    /// Connects to the broker and binds `config.grpc_addr`.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let auth = match &config.auth_tokens {
            Some(path) => Some(std::sync::Arc::new(auth::Grants::from_file(path)?)),
            None => None,
        };
        let publisher = Publisher::connect(&config.bus, APP_ID).await?;
        let rpc = RpcClient::connect(&config.bus, APP_ID).await?;
        let listener = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| StartError::Bind { addr: config.grpc_addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.grpc_addr, source })?;
        Ok(Self { auth, listener, local_addr, publisher, rpc, config })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown`, then lets in-flight calls finish and closes the connections.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), StartError> {
        let mut server = Server::builder();
        if let Some(tls) = &self.config.tls {
            server = server.tls_config(tls.server_config()).map_err(StartError::Tls)?;
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        let orders = Orders::new(self.publisher.clone(), self.rpc.clone(), self.config.query_timeout, shutdown.token())
            .with_auth(self.auth.clone());
        let events = Events::new(self.publisher.clone(), self.config.bus.clone(), shutdown.token(), self.config.stream_buffer_bytes).with_auth(self.auth.clone());
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // So grpcurl can print google.rpc.BadRequest details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        // Health follows the publishing connection: SERVING only while the broker is reachable
        // and not blocking publishes.
        let mut ready = self.publisher.readiness();
        let health_task = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let status = if *ready.borrow_and_update() { ServingStatus::Serving } else { ServingStatus::NotServing };
                    health.set_service_status("", status).await;
                    health.set_service_status("sluice.v1.OrderService", status).await;
                    health.set_service_status("sluice.v1.EventGateway", status).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            health.set_service_status("", ServingStatus::NotServing).await;
                            return;
                        }
                        changed = ready.changed() => if changed.is_err() { return },
                    }
                }
            })
        };

        if let Some(addr) = self.config.ops_addr {
            let ops = sluice::ops::Ops::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
            let publisher = self.publisher.clone();
            let ops_shutdown = shutdown.clone();
            shutdown.spawn(async move {
                if let Err(error) = ops.run(move || publisher.is_ready(), ops_shutdown).await {
                    tracing::error!(%error, "ops endpoint failed");
                }
            });
        }
        tracing::info!(addr = %self.local_addr, tls = self.config.tls.is_some(), "gateway serving");
        let layers = tower::ServiceBuilder::new()
            .layer(metrics::RequestMetricsLayer)
            .layer(shed::ShedLayer::new(self.config.max_concurrent_requests))
            .layer(budget::RequestBudgetLayer::new(budget::ByteBudget::new(self.config.request_buffer_bytes, budget::Holds::Requests)))
            .into_inner();
        let served = server
            .timeout(self.config.request_timeout)
            .trace_fn(trace_span)
            .layer(layers)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(OrderServiceServer::new(orders).max_decoding_message_size(MAX_MESSAGE_BYTES))
            .add_service(EventGatewayServer::new(events).max_decoding_message_size(MAX_MESSAGE_BYTES))
            .serve_with_incoming_shutdown(no_delay(self.listener), shutdown.cancelled())
            .await;
        let _ = health_task.await;
        // Every call has finished: its confirm was awaited or the call failed. Now close.
        self.publisher.close().await;
        self.rpc.close().await;
        tracing::info!("gateway stopped");
        Ok(served?)
    }
}

/// Server span per call, joined to the caller's trace when it sent `traceparent`. The handlers
/// record the ids they know (`order_id`, `event_id`) on it rather than opening a span of their
/// own: one span per call.
mod tracing_opentelemetry_ext {
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The trace context a caller sent (`traceparent`, `tracestate`), if any.
    pub(crate) fn caller_context(headers: &http::HeaderMap) -> opentelemetry::Context {
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        sluice::bus::TraceContext::parent(header("traceparent"), header("tracestate"))
    }

    /// Whether the caller sent a valid trace context.
    pub(crate) fn caller_traced(headers: &http::HeaderMap) -> bool {
        use opentelemetry::trace::TraceContextExt as _;
        caller_context(headers).span().span_context().is_valid()
    }

    pub(crate) fn trace_span(request: &http::Request<()>) -> tracing::Span {
        let parent = caller_context(request.headers());
        let span = if sluice::telemetry::span_attributes() {
            let path = request.uri().path();
            tracing::info_span!(
                "grpc.request",
                otel.name = path.trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = path,
                order_id = tracing::field::Empty,
                event_id = tracing::field::Empty,
            )
        } else {
            // Nothing reads the RPC attributes (see `span_attributes`): the ids alone.
            tracing::info_span!("grpc.request", order_id = tracing::field::Empty, event_id = tracing::field::Empty)
        };
        let _ = span.set_parent(parent);
        span
    }
}

/// Accepted connections with Nagle's algorithm off. tonic sets `TCP_NODELAY` only on the
/// listeners it binds itself, not on an incoming stream; without it, a response's frames written
/// separately wait for the client's delayed ACK (~40 ms tails at a few calls in flight).
fn no_delay(listener: tokio::net::TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set on a connection");
        }
        Ok(stream)
    })
}
