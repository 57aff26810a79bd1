//! Publishing with publisher confirms, pipelined.
//!
//! One confirm-mode channel on a dedicated publishing connection (so a blocked publisher never
//! stalls consumers). Publishes are not serialised: every caller sends its frame and then
//! awaits its own confirm, so many publishes are in flight on the channel at once and the
//! broker's acks are matched to callers by lapin as they stream in.
//!
//! A publish is `Ok` only after the broker's ack. A nack, a return (mandatory message with no
//! matching queue), a confirm that does not come within `confirm_timeout`, a blocked or lost
//! connection: each is an [`Error`] for the caller, never silence and never a hang.

use std::{sync::Arc, time::Duration};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use tokio::sync::{Mutex, watch};

use super::{
    Error,
    connection::{BoxFuture, Link, LinkState, Session},
    headers::{Envelope, TraceContext},
    spans,
    topology::{self, EXCHANGE},
};
use crate::{config::BusConfig, events::Event};

/// Publishes events to `sluice.events` and answers once the broker has confirmed them.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    state: watch::Receiver<LinkState<Channel>>,
    ready: watch::Receiver<bool>,
    link: Mutex<Option<Link<Channel>>>,
    app_id: String,
    confirm_timeout: Duration,
    server: spans::Server,
}

struct ConfirmChannel;

impl Session for ConfirmChannel {
    type Value = Channel;
    fn open<'a>(&'a self, connection: &'a Connection) -> BoxFuture<'a, Result<Channel, Error>> {
        Box::pin(async move {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            topology::declare_exchange(&channel).await?;
            Ok(channel)
        })
    }
}

impl Publisher {
    /// Connects (failing fast on a bad URL or credentials), declares the exchange, and keeps
    /// the connection up in the background. `app_id` names the producing service.
    pub async fn connect(config: &BusConfig, app_id: &str) -> Result<Self, Error> {
        let link = Link::open(&config.url, &format!("{app_id}.publisher"), ConfirmChannel).await?;
        let state = link.subscribe();
        let ready = link.ready();
        Ok(Self {
            inner: Arc::new(Inner {
                state,
                ready,
                link: Mutex::new(Some(link)),
                app_id: app_id.to_owned(),
                confirm_timeout: config.confirm_timeout,
                server: spans::Server::of(&config.url),
            }),
        })
    }

    /// The producing service's name (`app_id` on every message).
    pub fn app_id(&self) -> &str {
        &self.inner.app_id
    }

    /// Publishes a typed event with the given event id; `Ok` once confirmed. The message
    /// carries the context of a PRODUCER span, child of the current span.
    pub async fn publish<E: Event>(&self, event: &E, event_id: &str) -> Result<(), Error> {
        let span = spans::producer(EXCHANGE, E::ROUTING_KEY, event_id, event.order_id(), &self.inner.server);
        let envelope = Envelope::traced(event, event_id, TraceContext::of(&span));
        let properties = envelope.properties(&self.inner.app_id);
        self.send_traced(E::ROUTING_KEY, properties, envelope.body, span).await
    }

    /// Publishes a prepared envelope (the outbox relay's path); `Ok` once confirmed. The
    /// PRODUCER span continues the trace stored in the envelope (the handler that emitted it).
    pub async fn publish_envelope(&self, envelope: &Envelope) -> Result<(), Error> {
        let (properties, span) = self.producer(envelope);
        self.send_traced(&envelope.routing_key, properties, envelope.body.as_slice(), span).await
    }

    /// [`Publisher::publish_envelope`] for a caller that has no more use for the envelope: its
    /// body is freed once written to the broker, not kept until the confirm (the gateway's
    /// events may be 1 MiB each).
    pub async fn publish_envelope_owned(&self, envelope: Envelope) -> Result<(), Error> {
        let (properties, span) = self.producer(&envelope);
        self.send_traced(&envelope.routing_key, properties, envelope.body, span).await
    }

    /// The PRODUCER span of a prepared envelope, and the properties carrying its context (not
    /// the stored one).
    fn producer(&self, envelope: &Envelope) -> (BasicProperties, tracing::Span) {
        let span = spans::producer_in(
            &envelope.trace,
            EXCHANGE,
            &envelope.routing_key,
            &envelope.event_id,
            envelope.correlation_id.as_deref(),
            &self.inner.server,
        );
        let trace = TraceContext::of(&span);
        (envelope.properties_in(&self.inner.app_id, &trace), span)
    }

    /// Publishes `body` with `properties` to `routing_key`; its PRODUCER `span` lasts until the
    /// confirm (or the failure). The span times the publish from its creation to its close, so
    /// it is not entered on each poll of the publish: that cost about 3 % of the gateway's
    /// instructions per PlaceOrder (see "Instructions per message" in docs/benchmarks.md), and no
    /// line is logged inside.
    async fn send_traced(&self, routing_key: &str, properties: BasicProperties, body: impl AsRef<[u8]>, span: tracing::Span) -> Result<(), Error> {
        let sent = self.send(EXCHANGE, routing_key, properties, body).await;
        if let Err(error) = &sent {
            spans::fail(&span, &error.to_string());
        }
        drop(span);
        sent
    }

    /// Publishes raw bytes with confirms and `mandatory` (retry and dead-letter moves).
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: impl AsRef<[u8]>,
    ) -> Result<(), Error> {
        let channel = match self.inner.state.borrow().clone() {
            LinkState::Up { value, blocked: None } => value,
            LinkState::Up { blocked: Some(reason), .. } => return Err(Error::Blocked(reason)),
            LinkState::Down => return Err(Error::Unavailable("not connected to the broker".into())),
        };
        let exchange_name = topology::short(exchange)?;
        let key = topology::short(routing_key)?;
        let timeout = self.inner.confirm_timeout;
        let metrics = crate::metrics::metrics();
        let label = crate::metrics::route(routing_key);
        metrics.published.get_or_create(&label).inc();
        let started = std::time::Instant::now();
        let confirmation = tokio::time::timeout(timeout, async {
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            let confirm = channel.basic_publish(exchange_name, key, options, body.as_ref(), properties).await?;
            // lapin has written the frames: an owned body is freed before the confirm.
            drop(body);
            confirm.await
        })
        .await
        .map_err(|_| Error::ConfirmTimeout(timeout))??;
        match confirmation {
            Confirmation::Ack(None) => {
                metrics.confirmed.get_or_create(&label).inc();
                metrics.confirm_latency.observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Confirmation::Ack(Some(_returned)) => {
                metrics.returned.get_or_create(&label).inc();
                Err(Error::Unroutable { exchange: exchange.to_owned(), routing_key: routing_key.to_owned() })
            }
            Confirmation::Nack(_) => {
                metrics.nacked.get_or_create(&label).inc();
                Err(Error::Nacked)
            }
            Confirmation::NotRequested => Err(Error::Unavailable("channel is not in confirm mode".into())),
        }
    }

    /// Whether publishing is possible now (connected, not blocked).
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Readiness and its changes (health checks follow it).
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.inner.ready.clone()
    }

    /// Closes the publishing connection. Call after the last publish has been awaited:
    /// outstanding confirms are owned by their callers, so nothing is cut short.
    pub async fn close(&self) {
        if let Some(link) = self.inner.link.lock().await.take() {
            link.close_with_channel(&self.inner.app_id, "closing the publishing channel").await;
        }
    }
}

