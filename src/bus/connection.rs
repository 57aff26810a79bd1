//! Supervised AMQP connections: connect, set up channels, and start over with exponential
//! backoff and jitter whenever the connection is lost.
//!
//! A [`Link`] owns one connection and a value built on it by a [`Session`] (channels,
//! consumers). Users read the current value and never hold a dead channel for long: when the
//! connection fails, the link reports `Down`, reconnects, runs the session set-up again
//! (re-declaring topology and consumers) and reports `Up`.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Error;

/// A boxed future borrowing its inputs.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Connection events (errors, blocked/unblocked); registered right after connecting, because
/// lapin only emits events while a listener exists.
type Events = futures_util::stream::BoxStream<'static, lapin::Event>;

/// What to build on each fresh connection.
pub(crate) trait Session: Send + Sync + 'static {
    /// Channels, consumers... whatever lives as long as one connection.
    type Value: Send + Sync + 'static;
    /// Builds the value on a new connection.
    fn open<'a>(&'a self, connection: &'a Connection) -> BoxFuture<'a, Result<Self::Value, Error>>;
}

/// The state of a link, as its users see it.
pub(crate) enum LinkState<T> {
    /// Connected; `blocked` while the broker refuses publishes.
    Up { value: Arc<T>, blocked: Option<String> },
    /// Not connected (yet, or any more).
    Down,
}

impl<T> LinkState<T> {
    /// Connected and allowed to publish.
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self, Self::Up { blocked: None, .. })
    }
}

impl<T> Clone for LinkState<T> {
    fn clone(&self) -> Self {
        match self {
            Self::Up { value, blocked } => Self::Up { value: value.clone(), blocked: blocked.clone() },
            Self::Down => Self::Down,
        }
    }
}

/// One supervised connection and the session value built on it.
pub(crate) struct Link<T> {
    state: watch::Receiver<LinkState<T>>,
    ready: watch::Receiver<bool>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl<T: Send + Sync + 'static> Link<T> {
    /// Connects and opens the session once (so bad URLs and credentials fail here, at start),
    /// then keeps the link up in the background until [`Link::close`].
    pub(crate) async fn open<S>(url: &str, name: &str, session: S) -> Result<Self, Error>
    where
        S: Session<Value = T>,
    {
        let (connection, events, value) = establish(url, name, &session).await?;
        let (tx, state) = watch::channel(LinkState::Up { value: Arc::new(value), blocked: None });
        let (ready_tx, ready) = watch::channel(true);
        let stop = CancellationToken::new();
        let supervisor =
            Supervisor { url: url.to_owned(), name: name.to_owned(), session, tx, ready_tx, stop: stop.clone() };
        crate::metrics::metrics().connection_up.get_or_create(&crate::metrics::Link { link: name.to_owned() }).set(1);
        let task = tokio::spawn(supervisor.run(connection, events));
        Ok(Self { state, ready, stop, task })
    }

    /// The state and its changes.
    pub(crate) fn subscribe(&self) -> watch::Receiver<LinkState<T>> {
        self.state.clone()
    }

    /// Whether the link is up and unblocked, and its changes, for health reporting.
    pub(crate) fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Closes the connection and stops reconnecting.
    pub(crate) async fn close(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl Link<lapin::Channel> {
    /// Closes the link's channel, if it is up, waiting at most [`CLOSE_TIMEOUT`] (`who` and
    /// `what` name it in the log), then the link.
    pub(crate) async fn close_with_channel(self, who: &str, what: &str) {
        let state = self.state.borrow().clone();
        if let LinkState::Up { value: channel, .. } = state {
            closed(who, what, channel.close(200, "shutdown".into())).await;
        }
        self.close().await;
    }
}

struct Supervisor<S: Session> {
    url: String,
    name: String,
    session: S,
    tx: watch::Sender<LinkState<S::Value>>,
    ready_tx: watch::Sender<bool>,
    stop: CancellationToken,
}

impl<S: Session> Supervisor<S> {
    fn update(&self, change: impl FnOnce(&mut LinkState<S::Value>)) {
        self.tx.send_modify(change);
        let up = matches!(*self.tx.borrow(), LinkState::Up { .. });
        let link = crate::metrics::Link { link: self.name.clone() };
        crate::metrics::metrics().connection_up.get_or_create(&link).set(i64::from(up));
        let ready = self.tx.borrow().is_ready();
        self.ready_tx.send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    async fn run(self, mut connection: Connection, mut events: Events) {
        loop {
            // Up: watch the connection until it fails or we are told to stop.
            let lost = loop {
                tokio::select! {
                    _ = self.stop.cancelled() => {
                        self.update(|s| *s = LinkState::Down);
                        closed(&self.name, "closing the connection", connection.close(200, "shutdown".into())).await;
                        return;
                    }
                    event = events.next() => match event {
                        Some(lapin::Event::Error(error)) => break error.to_string(),
                        None => break "event stream ended".to_owned(),
                        Some(lapin::Event::ConnectionBlocked(reason)) => {
                            tracing::warn!(link = %self.name, %reason, "connection blocked by the broker");
                            self.update(|s| if let LinkState::Up { blocked, .. } = s { *blocked = Some(reason) });
                        }
                        Some(lapin::Event::ConnectionUnblocked) => {
                            tracing::info!(link = %self.name, "connection unblocked");
                            self.update(|s| if let LinkState::Up { blocked, .. } = s { *blocked = None });
                        }
                        Some(_) => {}
                    }
                }
            };
            tracing::warn!(link = %self.name, error = %lost, "connection lost; reconnecting");
            self.update(|s| *s = LinkState::Down);
            match self.reconnect().await {
                Some((c, e, value)) => {
                    connection = c;
                    events = e;
                    tracing::info!(link = %self.name, "reconnected");
                    let value = Arc::new(value);
                    self.update(move |s| *s = LinkState::Up { value, blocked: None });
                }
                None => return,
            }
        }
    }

    /// Retries with exponential backoff and full jitter until connected, or `None` on stop.
    async fn reconnect(&self) -> Option<(Connection, Events, S::Value)> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let delay = backoff.next_delay();
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            match establish(&self.url, &self.name, &self.session).await {
                Ok(up) => return Some(up),
                Err(error) => tracing::warn!(link = %self.name, %error, ?delay, "reconnect failed"),
            }
        }
    }
}

/// How long connecting and opening a session may take. lapin can leave a handshake or a
/// channel's set-up unanswered when the connection dies in the middle of it; without a bound,
/// a link cut at that moment would never try again.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects, registers for the connection's events and opens the session on it, within
/// [`ESTABLISH_TIMEOUT`].
async fn establish<S: Session>(url: &str, name: &str, session: &S) -> Result<(Connection, Events, S::Value), Error> {
    let attempt = async {
        let connection = connect(url, name).await?;
        let mut events: Events = connection.events_listener().boxed();
        let value = set_up(&connection, &mut events, session).await?;
        Ok::<_, Error>((connection, events, value))
    };
    tokio::time::timeout(ESTABLISH_TIMEOUT, attempt)
        .await
        .map_err(|_| Error::Unavailable(format!("connecting and setting up took longer than {ESTABLISH_TIMEOUT:?}")))?
}

/// Opens `session` on `connection`, and fails as soon as the connection does: lapin can leave
/// a channel operation unanswered when its connection dies while the operation waits (the
/// links of the dropped-connection test waited out [`ESTABLISH_TIMEOUT`] about once in five
/// runs). Other events that arrive meanwhile stay in `events`, for the supervisor.
async fn set_up<S: Session>(connection: &Connection, events: &mut Events, session: &S) -> Result<S::Value, Error> {
    // Failed before `events` listened: no event will tell.
    if !connection.status().connected() {
        return Err(Error::Unavailable("the connection failed before its set-up".into()));
    }
    let mut open = session.open(connection);
    let mut held = Vec::new();
    let outcome = loop {
        tokio::select! {
            value = &mut open => break value,
            event = events.next() => match event {
                Some(lapin::Event::Error(error)) => break Err(Error::Unavailable(format!("the connection failed during its set-up: {error}"))),
                None => break Err(Error::Unavailable("the connection's events ended during its set-up".into())),
                Some(other) => held.push(other),
            },
        }
    };
    if !held.is_empty() {
        let rest = std::mem::replace(events, futures_util::stream::empty().boxed());
        *events = futures_util::stream::iter(held).chain(rest).boxed();
    }
    outcome
}

/// How long opening a connection (TCP, TLS and the AMQP handshake) may take. lapin (4.12.3)
/// never answers a connect whose socket closes just after the broker's `Connection.Start` or
/// `Connection.Tune`: its reply goes on in a task that outlives the connection. Against a
/// reachable broker the handshake takes milliseconds, so this bounds that hang well below
/// [`ESTABLISH_TIMEOUT`]; a link then tries again after its backoff.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens one connection named `name` (shown in the broker's connection list), within
/// [`HANDSHAKE_TIMEOUT`]. An `amqps://` URL connects over TLS, trusting the system's roots plus
/// the URL's `cacertfile`, if any (see [`super::tls`]).
pub(crate) async fn connect(url: &str, name: &str) -> Result<Connection, Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let (url, tls) = super::tls::client_config(url)?;
    let handshake = Connection::connect_with_config(&url, properties, tls, lapin::runtime::default_runtime()?);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| Error::Unavailable(format!("the broker did not complete the AMQP handshake within {HANDSHAKE_TIMEOUT:?}")))?
        .map_err(Error::from)
}

/// How long a close (of a channel, a consumer or a connection) may wait for the broker's
/// answer. lapin waits without a bound, and a broker that has gone silent answers only when its
/// heartbeat gives the connection up: a minute or more (a consumer's shutdown took 125 s). An
/// unanswered close is abandoned; the broker drops what the connection held once it is gone,
/// and returns its unacknowledged deliveries to their queues.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Waits for a close, at most [`CLOSE_TIMEOUT`]; what failed is logged (at debug: a close that
/// fails has nothing left to lose), named by `who` and `what`.
pub(crate) async fn closed<T>(who: &str, what: &str, close: impl Future<Output = lapin::Result<T>>) {
    match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::debug!(who, %error, "{what}"),
        Err(_) => tracing::warn!(who, limit = ?CLOSE_TIMEOUT, "{what}: the broker did not answer; given up"),
    }
}

/// Exponential backoff with full jitter (AWS architecture blog's "full jitter").
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        Self { next: first, max }
    }

    /// A random delay in `[cap/2, cap]`, where the cap doubles each call up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = cap / 2;
        half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[7] >= Duration::from_millis(500) && delays[7] <= Duration::from_secs(1));
    }
}
