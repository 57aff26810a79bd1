//! Typed configuration, read from the environment once, in `main`.
//!
//! Every variable is parsed at the edge; an invalid value stops the process at start-up with a
//! message naming the variable. Nothing deeper in the code reads `std::env`.

use std::{fmt, path::Path, str::FromStr, time::Duration};

use lapin::uri::{AMQPScheme, AMQPUri};

use crate::bus::tls;

/// Where configuration values come from: the process environment, or a map in tests.
pub trait Source {
    /// The raw value of `name`, if set.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Env;

impl Source for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<const N: usize> Source for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {name}={value:?}: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub name: &'static str,
    /// The offending value (never a secret: URLs are redacted).
    pub value: String,
    /// Why it was refused.
    pub reason: String,
}

impl ConfigError {
    /// A refusal of `value` for `name`.
    pub fn new(name: &'static str, value: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self { name, value: value.into(), reason: reason.to_string() }
    }
}

/// Reads `name` and parses it, or returns `default` when unset.
pub fn parse_or<T>(source: &impl Source, name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    Ok(parse_opt(source, name)?.unwrap_or(default))
}

/// Reads `name` and parses it; `None` when unset.
pub fn parse_opt<T>(source: &impl Source, name: &'static str) -> Result<Option<T>, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    source.get(name).map(|raw| raw.trim().parse().map_err(|e| ConfigError::new(name, raw, e))).transpose()
}

/// Reads `name` as a count of at least 1; `None` when unset.
fn parse_count(source: &impl Source, name: &'static str) -> Result<Option<u16>, ConfigError> {
    match parse_opt(source, name)? {
        Some(0) => Err(ConfigError::new(name, "0", "must be at least 1")),
        count => Ok(count),
    }
}

/// Queue type of the durable per-handler queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Replicated Raft queues: the default, and what RabbitMQ recommends for durable work.
    Quorum,
    /// Classic queues, for single-node brokers that prefer them.
    Classic,
}

impl FromStr for QueueType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quorum" => Ok(Self::Quorum),
            "classic" => Ok(Self::Classic),
            other => Err(format!("expected `quorum` or `classic`, got `{other}`")),
        }
    }
}

/// How a handler's retry outcome is redelivered: exponential backoff, bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay before the first redelivery.
    pub base: Duration,
    /// Growth of the delay per attempt.
    pub factor: u32,
    /// Upper bound of any one delay.
    pub max_delay: Duration,
    /// Total deliveries, the first included, before the message is dead-lettered.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(1_000),
            factor: 2,
            max_delay: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// Delay before redelivering a message whose `attempt`-th delivery (1-based) asked for a
    /// retry, or `None` when attempts are exhausted.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exp = self.factor.saturating_pow(attempt.saturating_sub(1));
        Some(self.base.saturating_mul(exp).min(self.max_delay))
    }

    /// Every distinct delay this policy can produce, each of which gets a delay queue.
    pub fn delays(&self) -> Vec<Duration> {
        let mut delays: Vec<Duration> =
            (1..self.max_attempts).filter_map(|a| self.delay_after(a)).collect();
        delays.dedup();
        delays
    }
}

/// Everything the bus needs to reach RabbitMQ and shape its queues.
#[derive(Clone)]
pub struct BusConfig {
    /// `amqp://user:pass@host:port/vhost`, or `amqps://` for TLS. Holds a password: never
    /// logged (see `Debug`). A private CA rides in it as `?cacertfile=<PEM file>` (see
    /// [`BusConfig::with_ca_file`]), so every connection of the process trusts it.
    pub url: String,
    /// Unacknowledged deliveries per handler queue (`SLUICE_PREFETCH`). `None` picks by
    /// database: 128 on SQLite (they make the batches, see `batch`), 32 on PostgreSQL (the
    /// handlers running at once per queue).
    pub prefetch: Option<u16>,
    /// Most deliveries of one queue handled in one database transaction (`SLUICE_BATCH`).
    /// `None` picks by database: SQLite (one writer) batches up to `prefetch`, one batch at a
    /// time per queue; PostgreSQL runs one transaction per delivery, `prefetch` at a time.
    pub batch: Option<u16>,
    /// How long a delivery that came within this long of the end of its queue's previous batch
    /// waits for more, before its consumer takes the queue's turn at the database
    /// (`SLUICE_BATCH_LINGER_MS`, default 5 ms; 0 never waits). The wait ends as soon as the
    /// batch is full; a delivery after a longer pause does not wait. Only with batches of more
    /// than one delivery.
    pub batch_linger: Duration,
    /// Type of the durable handler queues and dead-letter queues.
    pub queue_type: QueueType,
    /// Retry backoff for handlers that ask to retry.
    pub retry: RetryPolicy,
    /// How long a publish may wait for the broker's confirm before it is an error.
    pub confirm_timeout: Duration,
    /// How long a handled event's inbox record is kept (`SLUICE_INBOX_RETENTION_SECS`, default
    /// 7 days; 0 keeps every record for ever). A redelivery or a dead-letter replay of an
    /// event within this time is recognised and acknowledged without a second effect; after
    /// it, the record is pruned and the event would be handled again.
    pub inbox_retention: Option<Duration>,
}

impl fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusConfig")
            .field("url", &redact(&self.url))
            .field("prefetch", &self.prefetch)
            .field("batch", &self.batch)
            .field("batch_linger", &self.batch_linger)
            .field("queue_type", &self.queue_type)
            .field("retry", &self.retry)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("inbox_retention", &self.inbox_retention)
            .finish()
    }
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &userinfo[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// See [`BusConfig::batch_linger`]. At 500 orders/s end to end, 5 ms took the deliveries per
/// transaction from 2.4–4.8 to 4.5–5.6 and cut the services' CPU by 15 %; see "A batch waits
/// 5 ms for company" in `docs/benchmarks.md`.
const DEFAULT_BATCH_LINGER_MS: u64 = 5;

/// See [`BusConfig::inbox_retention`]: a week, far longer than any redelivery (seconds) and
/// long enough for a dead-lettered event to be looked at and replayed.
const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Default broker URL: the local RabbitMQ, default vhost.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

impl BusConfig {
    /// Reads `SLUICE_AMQP_URL`, `SLUICE_AMQP_CA_FILE`, `SLUICE_PREFETCH`, `SLUICE_BATCH`,
    /// `SLUICE_BATCH_LINGER_MS`, `SLUICE_QUEUE_TYPE`,
    /// `SLUICE_RETRY_BASE_MS`, `SLUICE_RETRY_FACTOR`, `SLUICE_RETRY_MAX_DELAY_MS`,
    /// `SLUICE_RETRY_MAX_ATTEMPTS`, `SLUICE_CONFIRM_TIMEOUT_MS` and `SLUICE_INBOX_RETENTION_SECS`.
    pub fn from_source(source: &impl Source) -> Result<Self, ConfigError> {
        let mut url = source.get("SLUICE_AMQP_URL").unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
        let uri = AMQPUri::from_str(&url)
            .map_err(|e| ConfigError::new("SLUICE_AMQP_URL", redact(&url), e))?;
        if uri.vhost.is_empty() {
            return Err(ConfigError::new("SLUICE_AMQP_URL", redact(&url), "the URL names no vhost"));
        }
        if let Some(ca_file) = source.get("SLUICE_AMQP_CA_FILE") {
            url = trust_ca_file(&url, Path::new(&ca_file), "SLUICE_AMQP_CA_FILE")?;
        } else if let Some(ca_file) = tls::ca_file_of(&url) {
            url = trust_ca_file(&url, &ca_file, "SLUICE_AMQP_URL")?;
        }
        let prefetch = parse_count(source, "SLUICE_PREFETCH")?;
        let defaults = RetryPolicy::default();
        let retry = RetryPolicy {
            base: Duration::from_millis(parse_or(source, "SLUICE_RETRY_BASE_MS", 1_000u64)?),
            factor: parse_or(source, "SLUICE_RETRY_FACTOR", defaults.factor)?,
            max_delay: Duration::from_millis(parse_or(source, "SLUICE_RETRY_MAX_DELAY_MS", 30_000u64)?),
            max_attempts: parse_or(source, "SLUICE_RETRY_MAX_ATTEMPTS", defaults.max_attempts)?,
        };
        if retry.max_attempts == 0 || retry.factor == 0 || retry.base.is_zero() {
            return Err(ConfigError::new(
                "SLUICE_RETRY_*",
                format!("{retry:?}"),
                "base, factor and max attempts must be positive",
            ));
        }
        let confirm_ms: u64 = parse_or(source, "SLUICE_CONFIRM_TIMEOUT_MS", 5_000)?;
        let batch = parse_count(source, "SLUICE_BATCH")?;
        let batch_linger = Duration::from_millis(parse_or(source, "SLUICE_BATCH_LINGER_MS", DEFAULT_BATCH_LINGER_MS)?);
        let retention_secs: u64 = parse_or(source, "SLUICE_INBOX_RETENTION_SECS", DEFAULT_INBOX_RETENTION.as_secs())?;
        Ok(Self {
            url,
            prefetch,
            batch,
            batch_linger,
            queue_type: parse_or(source, "SLUICE_QUEUE_TYPE", QueueType::Quorum)?,
            retry,
            confirm_timeout: Duration::from_millis(confirm_ms.max(1)),
            inbox_retention: (retention_secs > 0).then(|| Duration::from_secs(retention_secs)),
        })
    }

    /// [`BusConfig::from_source`] over the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&Env)
    }

    /// Trusts the CA certificates of the PEM file `path` on top of the system's roots, for an
    /// `amqps://` broker whose certificate a private CA signed. The file is checked now.
    pub fn with_ca_file(self, path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let url = trust_ca_file(&self.url, path.as_ref(), "SLUICE_AMQP_CA_FILE")?;
        Ok(Self { url, ..self })
    }

    /// Defaults, pointed at `url` (tests use a fresh vhost per test).
    pub fn for_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefetch: None,
            batch: None,
            batch_linger: Duration::from_millis(DEFAULT_BATCH_LINGER_MS),
            queue_type: QueueType::Quorum,
            retry: RetryPolicy::default(),
            confirm_timeout: Duration::from_secs(5),
            inbox_retention: Some(DEFAULT_INBOX_RETENTION),
        }
    }
}

/// `url` with the checked CA file `path` in it; a refusal names the variable `name`.
fn trust_ca_file(url: &str, path: &Path, name: &'static str) -> Result<String, ConfigError> {
    let shown = path.display().to_string();
    match AMQPUri::from_str(url) {
        Ok(uri) if uri.scheme == AMQPScheme::AMQPS => {}
        _ => return Err(ConfigError::new(name, shown, "a CA file needs an amqps:// SLUICE_AMQP_URL")),
    }
    tls::read_ca_file(path).map_err(|reason| ConfigError::new(name, shown.clone(), reason))?;
    tls::with_ca_file(url, path).map_err(|reason| ConfigError::new(name, shown, reason))
}

/// Where a service keeps its state.
pub fn database_url(source: &impl Source, service: &str) -> Result<String, ConfigError> {
    let url = source
        .get("DATABASE_URL")
        .unwrap_or_else(|| format!("sqlite://sluice-{service}.db?mode=rwc"));
    if url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(url)
    } else {
        Err(ConfigError::new("DATABASE_URL", redact(&url), "expected a sqlite: or postgres:// URL"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_point_at_the_local_broker() {
        let config = BusConfig::from_source(&[("UNRELATED", "x")]).unwrap();
        assert_eq!(config.url, DEFAULT_AMQP_URL);
        assert_eq!(config.queue_type, QueueType::Quorum);
        assert_eq!(config.prefetch, None);
        assert_eq!(config.batch_linger, Duration::from_millis(5));
        assert_eq!(config.inbox_retention, Some(Duration::from_secs(604_800)));
        let off = BusConfig::from_source(&[("SLUICE_BATCH_LINGER_MS", "0")]).unwrap();
        assert_eq!(off.batch_linger, Duration::ZERO);
        let kept = BusConfig::from_source(&[("SLUICE_INBOX_RETENTION_SECS", "0")]).unwrap();
        assert_eq!(kept.inbox_retention, None);
        let day = BusConfig::from_source(&[("SLUICE_INBOX_RETENTION_SECS", "86400")]).unwrap();
        assert_eq!(day.inbox_retention, Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let err = BusConfig::from_source(&[("SLUICE_PREFETCH", "lots")]).unwrap_err();
        assert_eq!(err.name, "SLUICE_PREFETCH");
        let err = BusConfig::from_source(&[("SLUICE_BATCH_LINGER_MS", "5ms")]).unwrap_err();
        assert_eq!(err.name, "SLUICE_BATCH_LINGER_MS");
        let err = BusConfig::from_source(&[("SLUICE_AMQP_URL", "http://x")]).unwrap_err();
        assert_eq!(err.name, "SLUICE_AMQP_URL");
        let err = BusConfig::from_source(&[("SLUICE_INBOX_RETENTION_SECS", "7d")]).unwrap_err();
        assert_eq!(err.name, "SLUICE_INBOX_RETENTION_SECS");
        let err = BusConfig::from_source(&[("SLUICE_QUEUE_TYPE", "stream")]).unwrap_err();
        assert!(err.to_string().contains("quorum"), "{err}");
        let err = database_url(&[("DATABASE_URL", "mysql://x")], "orders").unwrap_err();
        assert_eq!(err.name, "DATABASE_URL");
    }

    #[test]
    fn a_ca_file_is_checked_at_start_up_and_named_when_refused() {
        let err = BusConfig::from_source(&[("SLUICE_AMQP_CA_FILE", "/nonexistent/ca.pem")]).unwrap_err();
        assert_eq!(err.name, "SLUICE_AMQP_CA_FILE");
        assert!(err.reason.contains("amqps://"), "the default URL is plain amqp: {err}");
        let amqps = [("SLUICE_AMQP_URL", "amqps://u:p@broker/v"), ("SLUICE_AMQP_CA_FILE", "/nonexistent/ca.pem")];
        let err = BusConfig::from_source(&amqps).unwrap_err();
        assert_eq!(err.name, "SLUICE_AMQP_CA_FILE");
        assert!(err.reason.contains("cannot read"), "{err}");
        let err = BusConfig::from_source(&[("SLUICE_AMQP_URL", "amqps://u:p@broker/v?cacertfile=/nonexistent/ca.pem")]).unwrap_err();
        assert_eq!(err.name, "SLUICE_AMQP_URL");
    }

    #[test]
    fn passwords_are_redacted() {
        let config = BusConfig::for_url("amqp://user:s3cret@host:5672/v");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("user:***@host"), "{shown}");
    }

    #[test]
    fn retry_delays_grow_exponentially_up_to_the_cap() {
        let policy = RetryPolicy {
            base: Duration::from_millis(100),
            factor: 3,
            max_delay: Duration::from_millis(1_000),
            max_attempts: 5,
        };
        let delays: Vec<u128> = (1..=5).map(|a| policy.delay_after(a).map_or(0, |d| d.as_millis())).collect();
        assert_eq!(delays, vec![100, 300, 900, 1_000, 0]);
        assert_eq!(policy.delays().len(), 4);
    }
}

/// What every service process needs: the broker, its database and its telemetry.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Broker connection and queue shape.
    pub bus: BusConfig,
    /// `DATABASE_URL` (default: `sqlite://sluice-<service>.db?mode=rwc`). May hold a password:
    /// never logged.
    pub database_url: String,
    /// Logs and trace export.
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// `SLUICE_OPS_ADDR`: the health endpoint (`off` disables it).
    pub ops_addr: Option<std::net::SocketAddr>,
}

impl ServiceConfig {
    /// Reads the configuration of `service` (`inventory`, `payment`, ...) from `source`; its
    /// ops endpoint defaults to `0.0.0.0:<ops_port>`.
    pub fn from_source(source: &impl Source, service: &str, ops_port: u16) -> Result<Self, ConfigError> {
        Ok(Self {
            ops_addr: crate::ops::ops_addr(source, ops_port)?,
            bus: BusConfig::from_source(source)?,
            database_url: database_url(source, service)?,
            telemetry: crate::telemetry::TelemetryConfig::from_source(source, &format!("sluice-{service}"))?,
        })
    }
}
