//! The operations endpoint every process serves on its own port (`SLUICE_OPS_ADDR`):
//! `/health/live` (the process runs), `/health/ready` (its broker connections are up), for
//! orchestrators' probes, and `/metrics` (Prometheus text). `<binary> health` probes `/health/ready` of a running process, which
//! is what docker-compose's health checks call.

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::{io::{AsyncReadExt, AsyncWriteExt}, net::TcpListener};

use crate::shutdown::Shutdown;

/// A bound, not yet serving, operations endpoint.
pub struct Ops {
    listener: TcpListener,
    local_addr: SocketAddr,
}

impl Ops {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Self { listener, local_addr })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown`. `/health/ready` answers 200 while `ready()` is true.
    pub async fn run(self, ready: impl Fn() -> bool + Send + Sync + 'static, shutdown: Shutdown) -> std::io::Result<()> {
        let ready: Readiness = Arc::new(ready);
        let app = Router::new()
            .route("/health/live", get(|| async { "live\n" }))
            .route("/health/ready", get(readiness))
            .route("/metrics", get(|| async { ([("content-type", "text/plain; version=0.0.4")], crate::metrics::render()) }))
            .with_state(ready);
        axum::serve(self.listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
    }
}

type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

async fn readiness(State(ready): State<Readiness>) -> (StatusCode, &'static str) {
    if ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}

/// Asks a process's ops endpoint whether it is ready: `true` on HTTP 200 within 3 seconds.
pub async fn probe(addr: SocketAddr) -> bool {
    let target = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream.write_all(b"GET /health/ready HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<bool, std::io::Error>(head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"))
    };
    matches!(tokio::time::timeout(Duration::from_secs(3), attempt).await, Ok(Ok(true)))
}

/// If the process was started as `<binary> health`: probes the running process's ops
/// endpoint and returns the exit code (0 ready, 1 not). `None` for a normal start.
pub async fn health_subcommand(ops_addr: Option<SocketAddr>) -> Option<ExitCode> {
    if std::env::args().nth(1).as_deref() != Some("health") {
        return None;
    }
    let ready = match ops_addr {
        Some(addr) => probe(addr).await,
        None => false,
    };
    Some(if ready { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs a service process: its ops endpoint (if configured) and its consumer, until
/// `shutdown`.
pub async fn run_service(
    consumer: crate::bus::Consumer,
    ops_addr: Option<SocketAddr>,
    shutdown: Shutdown,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if let Some(addr) = ops_addr {
        let ops = Ops::bind(addr).await.map_err(|e| format!("binding the ops endpoint {addr}: {e}"))?;
        let readiness = consumer.readiness();
        let ops_shutdown = shutdown.clone();
        shutdown.spawn(async move {
            if let Err(error) = ops.run(readiness, ops_shutdown).await {
                tracing::error!(%error, "ops endpoint failed");
            }
        });
    }
    consumer.run(shutdown.clone()).await?;
    shutdown.wait().await;
    Ok(())
}

/// A service's `main` once it is configured: telemetry, then `start`, then [`run_service`] until
/// SIGTERM or Ctrl-C; then the spans still queued are exported, whether the service started or
/// not, while the runtime still runs (see [`crate::telemetry::traced`]).
pub async fn service_main(
    telemetry: &crate::telemetry::TelemetryConfig,
    ops_addr: Option<SocketAddr>,
    start: impl Future<Output = Result<crate::bus::Consumer, crate::bus::Error>>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    crate::telemetry::traced(telemetry, async {
        let shutdown = Shutdown::on_signals();
        let consumer = start.await?;
        run_service(consumer, ops_addr, shutdown).await
    })
    .await?
}

/// Parses `SLUICE_OPS_ADDR`: an address, `off`, or unset for `0.0.0.0:<default_port>`.
pub fn ops_addr(source: &impl crate::config::Source, default_port: u16) -> Result<Option<SocketAddr>, crate::config::ConfigError> {
    match source.get("SLUICE_OPS_ADDR").as_deref() {
        Some("off") => Ok(None),
        None => Ok(Some(SocketAddr::from(([0, 0, 0, 0], default_port)))),
        Some(raw) => raw.parse().map(Some).map_err(|e| crate::config::ConfigError::new("SLUICE_OPS_ADDR", raw, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_follows_the_connection_state() {
        let ops = Ops::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = ops.local_addr();
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shutdown = Shutdown::new();
        let reader = flag.clone();
        let server = tokio::spawn(ops.run(move || reader.load(std::sync::atomic::Ordering::SeqCst), shutdown.clone()));

        assert!(!probe(addr).await, "not ready while the broker is down");
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(probe(addr).await);

        shutdown.trigger();
        server.await.unwrap().unwrap();
        assert!(!probe(addr).await, "nothing answers after shutdown");
    }
}
