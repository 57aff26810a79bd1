//! The gateway's configuration, from the environment.

use std::{net::SocketAddr, time::Duration};

use sluice::config::{BusConfig, ConfigError, Env, Source, parse_or};
use sluice::telemetry::TelemetryConfig;

use crate::tls::ServerTls;

/// Everything the gateway needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// `SLUICE_GRPC_ADDR` (default `0.0.0.0:50051`); port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// Broker connection.
    pub bus: BusConfig,
    /// Logs and trace export.
    pub telemetry: TelemetryConfig,
    /// `SLUICE_QUERY_TIMEOUT_MS`: longest wait for another service's reply (default 5000).
    pub query_timeout: Duration,
    /// `SLUICE_REQUEST_TIMEOUT_MS`: longest any RPC may run (default 30000).
    pub request_timeout: Duration,
    /// `SLUICE_MAX_CONCURRENT_REQUESTS`: in-flight RPCs before new ones are shed (default 1024).
    pub max_concurrent_requests: usize,
    /// `SLUICE_STREAM_BUFFER_BYTES`: bytes of PublishStream events being published, all
    /// streams together, before the gateway stops reading from them (default 8 MiB; at
    /// least one largest message, [`crate::MAX_MESSAGE_BYTES`]).
    pub stream_buffer_bytes: u32,
    /// `SLUICE_REQUEST_BUFFER_BYTES`: bytes of the request messages of every other call, held
    /// from when a message starts to arrive until its call answers; a call whose message does
    /// not fit is refused with `RESOURCE_EXHAUSTED` (default 8 MiB; at least one largest message).
    pub request_buffer_bytes: u32,
    /// `SLUICE_OPS_ADDR`: the health endpoint (default `0.0.0.0:9600`, `off` disables it).
    pub ops_addr: Option<SocketAddr>,
    /// `SLUICE_AUTH_TOKENS`: a JSON file of token hashes and grants; unset means no auth.
    pub auth_tokens: Option<String>,
    /// `SLUICE_TLS_CERT` and `SLUICE_TLS_KEY`: serve gRPC over TLS; unset means plaintext.
    pub tls: Option<ServerTls>,
}

/// Default of `SLUICE_STREAM_BUFFER_BYTES` and `SLUICE_REQUEST_BUFFER_BYTES`.
pub const DEFAULT_BUFFER_BYTES: u32 = 8 * 1024 * 1024;

/// A byte budget `name`, which must hold one largest message.
fn buffer_bytes(source: &impl Source, name: &'static str) -> Result<u32, ConfigError> {
    let bytes = parse_or(source, name, DEFAULT_BUFFER_BYTES)?;
    if (bytes as usize) < crate::MAX_MESSAGE_BYTES {
        return Err(ConfigError::new(name, bytes.to_string(), "must hold one largest message, 1048576 bytes"));
    }
    Ok(bytes)
}

/// Default port of the gateway's health endpoint.
pub const OPS_PORT: u16 = 9600;

impl Config {
    /// Reads the environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&Env)
    }

    /// Reads `source`.
    pub fn from_source(source: &impl Source) -> Result<Self, ConfigError> {
        let max_concurrent_requests = parse_or(source, "SLUICE_MAX_CONCURRENT_REQUESTS", 1024usize)?;
        if max_concurrent_requests == 0 {
            return Err(ConfigError::new("SLUICE_MAX_CONCURRENT_REQUESTS", "0", "must be at least 1"));
        }
        Ok(Self {
            grpc_addr: parse_or(source, "SLUICE_GRPC_ADDR", SocketAddr::from(([0, 0, 0, 0], 50051)))?,
            bus: BusConfig::from_source(source)?,
            telemetry: TelemetryConfig::from_source(source, "sluice-gateway")?,
            query_timeout: Duration::from_millis(parse_or(source, "SLUICE_QUERY_TIMEOUT_MS", 5_000u64)?.max(1)),
            request_timeout: Duration::from_millis(parse_or(source, "SLUICE_REQUEST_TIMEOUT_MS", 30_000u64)?.max(1)),
            max_concurrent_requests,
            stream_buffer_bytes: buffer_bytes(source, "SLUICE_STREAM_BUFFER_BYTES")?,
            request_buffer_bytes: buffer_bytes(source, "SLUICE_REQUEST_BUFFER_BYTES")?,
            ops_addr: sluice::ops::ops_addr(source, OPS_PORT)?,
            auth_tokens: source.get("SLUICE_AUTH_TOKENS"),
            tls: ServerTls::from_source(source)?,
        })
    }

    /// Defaults for a gateway on `127.0.0.1:0` against `bus` (tests).
    pub fn for_bus(bus: BusConfig) -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            bus,
            telemetry: TelemetryConfig { service_name: "sluice-gateway".into(), otlp_endpoint: None, log_format: sluice::telemetry::LogFormat::Json },
            query_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            stream_buffer_bytes: DEFAULT_BUFFER_BYTES,
            request_buffer_bytes: DEFAULT_BUFFER_BYTES,
            ops_addr: None,
            auth_tokens: None,
            tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_address_names_its_variable() {
        let err = Config::from_source(&[("SLUICE_GRPC_ADDR", "localhost")]).unwrap_err();
        assert_eq!(err.name, "SLUICE_GRPC_ADDR");
        let config = Config::from_source(&[("SLUICE_GRPC_ADDR", "127.0.0.1:6000")]).unwrap();
        assert_eq!(config.grpc_addr.port(), 6000);
    }

    #[test]
    fn a_stream_buffer_smaller_than_one_message_is_refused() {
        let err = Config::from_source(&[("SLUICE_STREAM_BUFFER_BYTES", "1000")]).unwrap_err();
        assert_eq!(err.name, "SLUICE_STREAM_BUFFER_BYTES");
        assert_eq!(Config::from_source(&[("SLUICE_STREAM_BUFFER_BYTES", "1048576")]).unwrap().stream_buffer_bytes, 1_048_576);
        let defaults = Config::from_source(&[("SLUICE_GRPC_ADDR", "127.0.0.1:6000")]).unwrap();
        assert_eq!((defaults.stream_buffer_bytes, defaults.request_buffer_bytes), (DEFAULT_BUFFER_BYTES, DEFAULT_BUFFER_BYTES));
        assert_eq!(Config::from_source(&[("SLUICE_REQUEST_BUFFER_BYTES", "1048575")]).unwrap_err().name, "SLUICE_REQUEST_BUFFER_BYTES");
    }
}
