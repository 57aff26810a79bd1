//! Typed consumers: one durable queue per handler, the delivery loop, and the one place that
//! decides what happens to a delivery.
//!
//! Acknowledgement policy (the whole of it):
//!
//! | handler outcome | database | message |
//! |---|---|---|
//! | `Ok(())` | inbox + effects + outbox committed | ack |
//! | duplicate (inbox hit) | nothing | ack |
//! | `Retry`, attempts left | rolled back | copy to `sluice.retry.<delay>`, confirmed, then ack |
//! | `Retry`, attempts exhausted; `Reject`; undecodable body; unknown `type` | rolled back | copy to `<queue>.dlq` with reason headers, confirmed, then ack |
//! | the move above fails, or the process dies mid-way | rolled back | not acked: the broker redelivers |
//!
//! Batches (SQLite by default, see [`BusConfig::batch`]): the deliveries that are waiting when a
//! queue's worker is free (at most the batch size) run one after the other in one transaction,
//! with one statement for all their inbox records, one for all the events they emit and one for
//! all the rows they give each statement of [`Context::write`]. If every handler succeeds, the
//! batch commits and is acknowledged in one frame. If one fails (or panics), the transaction
//! rolls back, that delivery alone gets its outcome above, and the others run again in one
//! transaction with a savepoint each, their rows written one delivery at a time: a failed
//! handler (or row) there rolls back to its savepoint and gets its outcome, the rest commit
//! together. If the rows fail to write, every delivery of the batch runs again that way, so
//! the failure is the one delivery's whose row failed. If a handler panics in
//! that second pass, the transaction rolls back once more: the panicking delivery is retried and
//! the others run again, each in its own transaction. A handler may so run up to three times for
//! one delivery, but its effects commit once. Deliveries of a batch not yet started when
//! shutdown begins are left unacknowledged and return to the queue.
//!
//! Nothing is acknowledged before its outcome is durable, so a crash at any point leads to a
//! redelivery, never a loss, and the inbox turns the redelivery into a no-op if the effect
//! had already committed.

use std::{marker::PhantomData, panic::AssertUnwindSafe, sync::Arc, time::{Duration, Instant}};

use futures_util::{FutureExt, StreamExt};
use prost::Message as _;
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use super::{
    Error, Publisher, Rpc,
    connection::{BoxFuture, Link, Session},
    handler::{Context, DRAIN_TIMEOUT, Handler, HandlerError, Metadata, Responder},
    headers::{self, Envelope},
    relay, retention, spans, topology,
};
use crate::{config::BusConfig, events::Event, shutdown::Shutdown, store::{self, Staged, Store, Tx}};

/// What the bus does with a delivery once its handler has spoken.
#[derive(Debug)]
enum Outcome {
    Ack,
    Retry(String),
    DeadLetter { reason: &'static str, error: String },
    /// Its batch rolled back for another delivery's panic: to be run again on its own (never
    /// reaches `settle`; if it did, the message would go back to its queue).
    Rerun,
    /// Not started before shutdown: no ack, so it returns to the queue with the channel.
    Leave,
}

/// A queue's turn at the database (see [`Store::turn`]).
type Turn = Option<tokio::sync::OwnedSemaphorePermit>;

/// Shared by every delivery of a consumer.
struct Shared {
    store: Store,
    publisher: Publisher,
    config: BusConfig,
    server: spans::Server,
}

/// A handler with its event type erased, so a consumer can hold many.
trait Route: Send + Sync + 'static {
    fn queue(&self) -> &str;
    fn routing_key(&self) -> &'static str;
    fn process<'a>(&'a self, delivery: &'a Delivery, shared: &'a Shared) -> BoxFuture<'a, Outcome>;
    /// Handles `deliveries` in one transaction; one outcome per delivery, in order.
    fn process_batch<'a>(&'a self, deliveries: &'a [Delivery], shared: &'a Shared, intake: &'a CancellationToken)
    -> BoxFuture<'a, Vec<Outcome>>;
}

struct TypedRoute<E, H> {
    handler: H,
    name: String,
    queue: String,
    _event: PhantomData<fn(E)>,
}

impl<E: Event, H: Handler<E>> Route for TypedRoute<E, H> {
    fn queue(&self) -> &str {
        &self.queue
    }

    fn routing_key(&self) -> &'static str {
        E::ROUTING_KEY
    }

    fn process<'a>(&'a self, delivery: &'a Delivery, shared: &'a Shared) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match self.prepare(delivery, shared) {
                Ok((event, meta, span)) => self.run_alone(event, meta, span, shared).await,
                Err(outcome) => outcome,
            }
        })
    }

    fn process_batch<'a>(&'a self, deliveries: &'a [Delivery], shared: &'a Shared, intake: &'a CancellationToken)
    -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            let mut outcomes: Vec<Option<Outcome>> = deliveries.iter().map(|_| None).collect();
            let mut prepared = Vec::with_capacity(deliveries.len());
            for (i, delivery) in deliveries.iter().enumerate() {
                match self.prepare(delivery, shared) {
                    Ok((event, meta, span)) => prepared.push((i, event, meta, span)),
                    Err(outcome) => outcomes[i] = Some(outcome),
                }
            }
            if intake.is_cancelled() {
                // Shutdown began while the batch waited for its turn: none of it has started.
                for (i, ..) in prepared.drain(..) {
                    outcomes[i] = Some(Outcome::Leave);
                }
            } else if prepared.len() == 1 {
                if let Some((i, event, meta, span)) = prepared.pop() {
                    outcomes[i] = Some(self.run_alone(event, meta, span, shared).await);
                }
            } else if !prepared.is_empty() {
                self.run_batch(prepared, shared, intake, &mut outcomes).await;
            }
            // A panic rolled the batch back: its companions run again, each on its own, here and
            // now (a requeue would count toward a quorum queue's delivery limit on RabbitMQ 4.x).
            for (delivery, outcome) in deliveries.iter().zip(outcomes.iter_mut()) {
                if matches!(outcome, Some(Outcome::Rerun)) {
                    *outcome = Some(if intake.is_cancelled() { Outcome::Leave } else { self.process(delivery, shared).await });
                }
            }
            outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Leave)).collect()
        })
    }
}

/// Marks a delivery's span as failed when its outcome is a failure.
fn mark_failure(span: &tracing::Span, outcome: &Outcome) {
    match outcome {
        Outcome::Retry(error) | Outcome::DeadLetter { error, .. } => spans::fail(span, error),
        Outcome::Ack | Outcome::Rerun | Outcome::Leave => {}
    }
}

impl<E: Event, H: Handler<E>> TypedRoute<E, H> {
    /// Checks and decodes a delivery, and opens its consumer span; `Err` is its outcome when it
    /// cannot be handled at all (dead letter).
    fn prepare(&self, delivery: &Delivery, shared: &Shared) -> Result<(E, Metadata, tracing::Span), Outcome> {
        let properties = &delivery.properties;
        let type_name = properties.kind().as_ref().map(|s| s.as_str()).unwrap_or("");
        if type_name != E::FULL_NAME {
            return Err(Outcome::DeadLetter {
                reason: "unknown-type",
                error: format!("expected type {}, got {type_name:?}", E::FULL_NAME),
            });
        }
        let event = E::decode(delivery.data.as_slice())
            .map_err(|error| Outcome::DeadLetter { reason: "undecodable", error: error.to_string() })?;
        let Some(event_id) = properties.message_id().as_ref().map(|s| s.to_string()).filter(|s| !s.is_empty()) else {
            return Err(Outcome::DeadLetter { reason: "missing-message-id", error: "the message has no message_id".into() });
        };
        let empty = FieldTable::default();
        let hdrs = properties.headers().as_ref().unwrap_or(&empty);
        let meta = Metadata {
            event_id: event_id.clone(),
            routing_key: headers::header_str(hdrs, headers::ORIGINAL_ROUTING_KEY)
                .map(str::to_owned)
                .unwrap_or_else(|| E::ROUTING_KEY.to_owned()),
            correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
            occurred_at: headers::header_str(hdrs, "cloudEvents_time")
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(headers::now),
            attempt: headers::header_u32(hdrs, headers::ATTEMPT).unwrap_or(1),
            handler: self.name.clone(),
            queue: self.queue.clone(),
        };
        let order_id = meta.correlation_id.clone().unwrap_or_default();
        let delivered = spans::Delivered {
            queue: &self.queue,
            routing_key: &meta.routing_key,
            message_id: &event_id,
            order_id: &order_id,
            handler: &self.name,
            attempt: meta.attempt,
        };
        let span = spans::consumer(&delivered, hdrs, &shared.server);
        Ok((event, meta, span))
    }

    /// Runs prepared deliveries in one transaction and fills in their outcomes (see the module's
    /// table): optimistically first, and if a handler fails, that delivery alone gets its outcome
    /// and the others run again with a savepoint each.
    async fn run_batch(
        &self,
        prepared: Vec<(usize, E, Metadata, tracing::Span)>,
        shared: &Shared,
        intake: &CancellationToken,
        outcomes: &mut [Option<Outcome>],
    ) {
        match self.run_optimistic(&prepared, shared, intake).await {
            Pass::Committed(results) => {
                for ((i, ..), outcome) in prepared.iter().zip(results) {
                    outcomes[*i] = Some(outcome);
                }
            }
            Pass::Rewrite(error) => {
                tracing::debug!(%error, "writing a batch's rows failed: each delivery runs again with a savepoint");
                self.run_savepoints(prepared, shared, intake, outcomes).await;
            }
            Pass::Unavailable(error) => {
                for (i, _, _, span) in &prepared {
                    let outcome = Outcome::Retry(error.clone());
                    mark_failure(span, &outcome);
                    outcomes[*i] = Some(outcome);
                }
            }
            Pass::Failed { at, outcome } => {
                let mut rest = prepared;
                let (i, _, _, span) = rest.remove(at);
                mark_failure(&span, &outcome);
                outcomes[i] = Some(outcome);
                if !rest.is_empty() {
                    self.run_savepoints(rest, shared, intake, outcomes).await;
                }
            }
        }
    }

    /// The usual case of a batch, in as few statements as possible: one transaction, one
    /// statement for every inbox claim, the handlers, one for the rows of each of their
    /// [`Context::write`] statements, one for every outbox row, commit.
    /// Stops at the first failed (or panicking) handler and rolls everything back.
    async fn run_optimistic(&self, prepared: &[(usize, E, Metadata, tracing::Span)], shared: &Shared, intake: &CancellationToken) -> Pass {
        let ids: Vec<&str> = prepared.iter().map(|(_, _, meta, _)| meta.event_id.as_str()).collect();
        let (mut tx, mut claimed) = match shared.store.begin_claiming(&ids, &self.name).await {
            Ok(begun) => begun,
            Err(error) => return Pass::Unavailable(format!("opening a transaction and recording the inbox entries: {error}")),
        };
        let mut results = Vec::with_capacity(prepared.len());
        let mut emitted = Vec::new();
        let mut written = store::Written::new();
        for (at, (_, event, meta, span)) in prepared.iter().enumerate() {
            if intake.is_cancelled() {
                // Shutdown: the rest stay unacknowledged, so their claims must not commit.
                let unstarted: Vec<&str> = ids[at..].iter().copied().filter(|id| claimed.contains(*id)).collect();
                if let Err(error) = store::unclaim(&mut tx, &unstarted, &self.name).await {
                    return Pass::Unavailable(format!("removing the inbox entries of unstarted deliveries: {error}"));
                }
                results.extend(prepared[at..].iter().map(|_| Outcome::Leave));
                break;
            }
            // The first delivery of an id claimed it; any other is a duplicate.
            if !claimed.remove(meta.event_id.as_str()) {
                span.in_scope(|| tracing::info!("duplicate delivery acknowledged without effect"));
                results.push(Outcome::Ack);
                continue;
            }
            let (back, mut events, rows, called) = self.call(tx, event.clone(), meta.clone()).instrument(span.clone()).await;
            tx = back;
            match called {
                Called::Ok => {
                    emitted.append(&mut events);
                    store::add_rows(&mut written, rows);
                    results.push(Outcome::Ack);
                }
                Called::Failed(outcome) | Called::Panicked(outcome) => return Pass::Failed { at, outcome },
            }
        }
        // Which delivery's row failed, if one did, is not known here: each gets its own
        // savepoint in a second pass, as after a failed handler.
        let rewrite = !written.is_empty();
        let staged = match store::stage_and_commit(tx, emitted, written).await {
            Ok(staged) => staged,
            Err(error) if rewrite => return Pass::Rewrite(format!("writing the handlers' rows, staging emitted events and committing: {error}")),
            Err(error) => return Pass::Unavailable(format!("staging emitted events and committing: {error}")),
        };
        shared.store.committed(staged);
        Pass::Committed(results)
    }

    /// Runs prepared deliveries in one transaction, each in a savepoint, and fills in their
    /// outcomes (see the module's table).
    async fn run_savepoints(
        &self,
        prepared: Vec<(usize, E, Metadata, tracing::Span)>,
        shared: &Shared,
        intake: &CancellationToken,
        outcomes: &mut [Option<Outcome>],
    ) {
        let mut tx = match shared.store.begin().await {
            Ok(tx) => tx,
            Err(error) => {
                for (i, ..) in &prepared {
                    outcomes[*i] = Some(Outcome::Retry(format!("opening a transaction: {error}")));
                }
                return;
            }
        };
        let mut staged = Vec::new();
        let mut ran = Vec::with_capacity(prepared.len());
        for (i, event, meta, span) in prepared {
            if intake.is_cancelled() {
                outcomes[i] = Some(Outcome::Leave);
                continue;
            }
            let step = self.run_in_savepoint(tx, event, meta).instrument(span.clone()).await;
            match step {
                Step::Done { tx: back, outcome, mut emitted } => {
                    tx = back;
                    staged.append(&mut emitted);
                    mark_failure(&span, &outcome);
                    if matches!(outcome, Outcome::Ack) {
                        ran.push(i);
                    }
                    outcomes[i] = Some(outcome);
                }
                Step::Broken(outcome) => {
                    // The transaction is gone (a panic, or the connection failed mid-way):
                    // nothing of the batch committed. This delivery keeps its own outcome; the
                    // others run again from scratch.
                    mark_failure(&span, &outcome);
                    for slot in outcomes.iter_mut() {
                        if matches!(slot, Some(Outcome::Ack) | None) {
                            *slot = Some(Outcome::Rerun);
                        }
                    }
                    outcomes[i] = Some(outcome);
                    return;
                }
            }
        }
        if let Err(error) = tx.commit().await {
            for i in ran {
                outcomes[i] = Some(Outcome::Retry(format!("committing: {error}")));
            }
            return;
        }
        shared.store.committed(staged);
    }

    /// One delivery of a batch: savepoint, inbox claim, handler, outbox; rolled back to the
    /// savepoint if anything fails.
    async fn run_in_savepoint(&self, mut tx: Tx, event: E, meta: Metadata) -> Step {
        if let Err(error) = sqlx::query("SAVEPOINT sluice_delivery").execute(&mut *tx).await {
            return Step::Broken(Outcome::Retry(format!("opening a savepoint: {error}")));
        }
        match self.handle_in(tx, event, meta).await {
            Handled::Duplicate(tx) => Step::Done { tx, outcome: Outcome::Ack, emitted: Vec::new() },
            Handled::Done { tx, staged } => Step::Done { tx, outcome: Outcome::Ack, emitted: staged },
            Handled::Failed { mut tx, outcome } => match sqlx::query("ROLLBACK TO SAVEPOINT sluice_delivery").execute(&mut *tx).await {
                Ok(_) => Step::Done { tx, outcome, emitted: Vec::new() },
                Err(error) => {
                    tracing::warn!(%error, "rolling back to a savepoint");
                    Step::Broken(outcome)
                }
            },
            Handled::Broken(outcome) => Step::Broken(outcome),
        }
    }

    /// One delivery in its own transaction, inside its consumer span.
    async fn run_alone(&self, event: E, meta: Metadata, span: tracing::Span, shared: &Shared) -> Outcome {
        let outcome = self.run_handler(event, meta, shared).instrument(span.clone()).await;
        mark_failure(&span, &outcome);
        outcome
    }

    /// One delivery, one transaction: begun with the inbox claim and committed with the outbox
    /// rows (on SQLite, one query each).
    async fn run_handler(&self, event: E, meta: Metadata, shared: &Shared) -> Outcome {
        let (tx, claimed) = match shared.store.begin_claiming(&[meta.event_id.as_str()], &self.name).await {
            Ok(begun) => begun,
            Err(error) => return Outcome::Retry(format!("opening a transaction and recording the inbox entry: {error}")),
        };
        if claimed.is_empty() {
            tracing::info!("duplicate delivery acknowledged without effect");
            return Outcome::Ack;
        }
        // Dropping the transaction rolls it back.
        let (tx, emitted, written, called) = self.call(tx, event, meta).await;
        let what = if written.is_empty() { "staging emitted events and committing" } else { "writing the handler's rows, staging emitted events and committing" };
        match called {
            Called::Ok => match store::stage_and_commit(tx, emitted, written).await {
                Ok(staged) => {
                    tracing::debug!(emitted = staged.len(), "handled");
                    shared.store.committed(staged);
                    Outcome::Ack
                }
                Err(error) => Outcome::Retry(format!("{what}: {error}")),
            },
            Called::Failed(outcome) | Called::Panicked(outcome) => outcome,
        }
    }

    /// The work of one delivery of the savepoint pass inside `tx`: inbox claim, handler (a
    /// panic caught), the rows it wrote, outbox rows. Commits nothing.
    async fn handle_in(&self, mut tx: Tx, event: E, meta: Metadata) -> Handled {
        match store::claim(&mut tx, &meta.event_id, &self.name).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!("duplicate delivery acknowledged without effect");
                return Handled::Duplicate(tx);
            }
            Err(error) => return Handled::Broken(Outcome::Retry(format!("recording the inbox entry: {error}"))),
        }
        let (mut tx, emitted, written, called) = self.call(tx, event, meta).await;
        match called {
            Called::Ok => {
                if let Err(error) = store::write_rows(&mut tx, written).await {
                    return Handled::Failed { tx, outcome: Outcome::Retry(format!("writing the handler's rows: {error}")) };
                }
                match store::stage(&mut tx, emitted).await {
                    Ok(staged) => Handled::Done { tx, staged },
                    Err(error) => Handled::Failed { tx, outcome: Outcome::Retry(format!("staging emitted events: {error}")) },
                }
            }
            Called::Failed(outcome) => Handled::Failed { tx, outcome },
            Called::Panicked(outcome) => Handled::Broken(outcome),
        }
    }

    /// Calls the handler inside `tx`, in its handler span (a child of the current span), with a
    /// panic caught. Returns the transaction, the events the handler emitted, the rows it gave
    /// to be written and what it said.
    async fn call(&self, tx: Tx, event: E, meta: Metadata) -> (Tx, Vec<Envelope>, store::Written, Called) {
        let mut ctx = Context::new(tx, meta);
        let result = AssertUnwindSafe(self.handler.handle(event, &mut ctx)).catch_unwind().instrument(spans::handler(&self.name)).await;
        let (tx, emitted, written) = ctx.into_parts();
        let called = match result {
            Ok(Ok(())) => Called::Ok,
            Ok(Err(error)) => Called::Failed(handler_failure(error)),
            Err(panic) => Called::Panicked(Outcome::Retry(format!("handler panicked: {}", panic_message(&*panic)))),
        };
        (tx, emitted, written, called)
    }
}

/// What a handler call said (see `TypedRoute::call`).
enum Called {
    Ok,
    /// It returned an error: this outcome, its work to be rolled back.
    Failed(Outcome),
    /// It panicked: retried, and the transaction is not to be trusted.
    Panicked(Outcome),
}

/// What became of one delivery inside a transaction (see `TypedRoute::handle_in`).
enum Handled {
    /// Already handled (the inbox has it): nothing was done.
    Duplicate(Tx),
    /// Effects, inbox record and the `staged` outbox rows are in the transaction.
    Done { tx: Tx, staged: Vec<Staged> },
    /// The handler (or staging its events) failed: its work must be rolled back.
    Failed { tx: Tx, outcome: Outcome },
    /// The transaction cannot be trusted any more (a panic, a failed inbox write).
    Broken(Outcome),
}

/// How the optimistic pass of a batch ended (see `TypedRoute::run_optimistic`).
enum Pass {
    /// Committed: one outcome per prepared delivery, in order (`Ack`, or `Leave` at shutdown).
    Committed(Vec<Outcome>),
    /// The handler of the `at`-th prepared delivery failed: nothing committed.
    Failed { at: usize, outcome: Outcome },
    /// Writing the rows the handlers gave [`Context::write`] failed (or what followed it):
    /// nothing committed, and any delivery's row may be the cause.
    Rewrite(String),
    /// The database failed (begin, inbox, outbox or commit): nothing committed.
    Unavailable(String),
}

/// Where a delivery of the savepoint pass left its batch's transaction.
enum Step {
    /// The transaction goes on; this delivery's work, with the outbox rows it `emitted`, is in
    /// it (`Ack`) or rolled back.
    Done { tx: Tx, outcome: Outcome, emitted: Vec<Staged> },
    /// The transaction is unusable; the batch must roll back.
    Broken(Outcome),
}

/// What the bus does when a handler returns an error.
fn handler_failure(error: HandlerError) -> Outcome {
    match error {
        HandlerError::Retry(error) => Outcome::Retry(error_chain(&*error)),
        HandlerError::Reject(error) => Outcome::DeadLetter { reason: "rejected", error: error_chain(&*error) },
    }
}

/// The text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// `error: cause: cause`, for dead-letter headers and logs.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A request type served over request/reply, type erased.
trait Serve: Send + Sync + 'static {
    fn queue(&self) -> &'static str;
    fn reply<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<Vec<u8>, String>>;
}

struct TypedServe<R, S> {
    responder: S,
    _request: PhantomData<fn(R)>,
}

impl<R: Rpc, S: Responder<R>> Serve for TypedServe<R, S> {
    fn queue(&self) -> &'static str {
        R::QUEUE
    }

    fn reply<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let request = R::decode(delivery.data.as_slice()).map_err(|e| format!("undecodable request: {e}"))?;
            let reply = self.responder.respond(request).await.map_err(|e| error_chain(&*e))?;
            Ok(reply.encode_to_vec())
        })
    }
}

/// Declares a service's queues and handlers; [`ConsumerBuilder::start`] makes it consume.
pub struct ConsumerBuilder {
    service: String,
    config: BusConfig,
    store: Store,
    routes: Vec<Arc<dyn Route>>,
    serves: Vec<Arc<dyn Serve>>,
}

impl ConsumerBuilder {
    /// Subscribes `handler` to events of type `E` on the queue `<service>.<handler name>`.
    pub fn on<E: Event, H: Handler<E>>(mut self, handler: H) -> Self {
        let name = handler.name();
        let queue = topology::handler_queue(&self.service, &name);
        self.routes.push(Arc::new(TypedRoute::<E, H> { handler, name, queue, _event: PhantomData }));
        self
    }

    /// Answers requests of type `R` (request/reply) with `responder`.
    pub fn serve<R: Rpc, S: Responder<R>>(mut self, responder: S) -> Self {
        self.serves.push(Arc::new(TypedServe::<R, S> { responder, _request: PhantomData }));
        self
    }

    /// Connects (a consuming and a publishing connection), declares the topology, starts every
    /// handler and the outbox relay. When this returns, every queue exists, is bound and has a
    /// consumer: anything published afterwards will be handled.
    pub async fn start(self) -> Result<Consumer, Error> {
        let mut names: Vec<&str> = self.routes.iter().map(|r| r.queue()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidName(format!("two handlers share the queue {}", pair[0])));
        }
        let publisher = Publisher::connect(&self.config, &self.service).await?;
        let shared = Arc::new(Shared {
            store: self.store.clone(),
            publisher: publisher.clone(),
            config: self.config.clone(),
            server: spans::Server::of(&self.config.url),
        });
        let intake = CancellationToken::new();
        let tracker = TaskTracker::new();
        let prefetch = self.config.prefetch.unwrap_or(match self.store.backend() {
            store::Backend::Sqlite => 128,
            store::Backend::Postgres => 32,
        });
        let session = Consuming {
            service: self.service.clone(),
            routes: self.routes,
            serves: self.serves,
            shared: shared.clone(),
            intake: intake.clone(),
            tracker: tracker.clone(),
            prefetch,
            // No batch can hold more than the prefetch: the broker sends no more.
            batch: self
                .config
                .batch
                .unwrap_or(match self.store.backend() {
                    store::Backend::Sqlite => prefetch,
                    store::Backend::Postgres => 1,
                })
                .min(prefetch),
        };
        let link = Link::open(&self.config.url, &format!("{}.consumer", self.service), session).await?;
        let relay_stop = CancellationToken::new();
        let relay = tokio::spawn(relay::run(self.store.clone(), publisher.clone(), relay_stop.clone()));
        let pruner = self
            .config
            .inbox_retention
            .map(|retention| tokio::spawn(retention::run(self.store.clone(), self.service.clone(), retention, relay_stop.clone())));
        tracing::info!(service = %self.service, "consuming");
        Ok(Consumer { service: self.service, link, publisher, intake, tracker, relay, pruner, relay_stop })
    }
}

/// Everything opened on one consuming connection: (channel, consumer tag) per queue.
struct Consumers(Vec<(Channel, ShortString)>);

struct Consuming {
    service: String,
    routes: Vec<Arc<dyn Route>>,
    serves: Vec<Arc<dyn Serve>>,
    shared: Arc<Shared>,
    intake: CancellationToken,
    tracker: TaskTracker,
    /// Unacknowledged deliveries per queue.
    prefetch: u16,
    /// Deliveries per transaction (1: each delivery on its own, `prefetch` at a time).
    batch: u16,
}

/// How a queue's consumer gathers a batch.
#[derive(Clone, Copy)]
struct Gather {
    /// The most deliveries of a batch.
    max: usize,
    /// How long a busy queue's delivery waits for more ([`BusConfig::batch_linger`]).
    linger: Duration,
}

impl Session for Consuming {
    type Value = Consumers;

    fn open<'a>(&'a self, connection: &'a Connection) -> BoxFuture<'a, Result<Consumers, Error>> {
        Box::pin(async move {
            let config = &self.shared.config;
            let admin = connection.create_channel().await?;
            topology::declare_exchange(&admin).await?;
            topology::declare_retry_queues(&admin, &config.retry.delays()).await?;
            let mut consumers = Vec::new();
            for route in &self.routes {
                let channel = connection.create_channel().await?;
                channel.basic_qos(self.prefetch, BasicQosOptions::default()).await?;
                topology::declare_handler_queue(&channel, route.queue(), route.routing_key(), config.queue_type).await?;
                let tag = consumer_tag(&self.service, route.queue())?;
                let stream = channel
                    .basic_consume(topology::short(route.queue())?, tag.clone(), BasicConsumeOptions::default(), FieldTable::default())
                    .await?;
                let route = route.clone();
                let shared = self.shared.clone();
                let (intake, tracker) = (self.intake.clone(), self.tracker.clone());
                let batch = usize::from(self.batch);
                if batch > 1 {
                    let stop = intake.clone();
                    let gather = Gather { max: batch, linger: config.batch_linger };
                    self.tracker.spawn(batch_loop(stream, intake, self.shared.store.clone(), gather, move |deliveries, turn| {
                        let (route, shared, stop) = (route.clone(), shared.clone(), stop.clone());
                        async move {
                            let count = deliveries.len();
                            measured(route.queue(), count, handle_batch(&*route, deliveries, turn, &shared, &stop)).await;
                        }
                    }));
                } else {
                    self.tracker.spawn(delivery_loop(stream, intake, tracker, move |delivery| {
                        let (route, shared) = (route.clone(), shared.clone());
                        async move {
                            let handled = async {
                                let outcome = route.process(&delivery, &shared).await;
                                settle(delivery, route.queue(), outcome, &shared).await;
                            };
                            measured(route.queue(), 1, handled).await;
                        }
                    }));
                }
                consumers.push((channel, tag));
            }
            for serve in &self.serves {
                let channel = connection.create_channel().await?;
                channel.basic_qos(self.prefetch, BasicQosOptions::default()).await?;
                topology::declare_request_queue(&channel, serve.queue()).await?;
                let tag = consumer_tag(&self.service, serve.queue())?;
                let stream = channel
                    .basic_consume(topology::short(serve.queue())?, tag.clone(), BasicConsumeOptions::default(), FieldTable::default())
                    .await?;
                let (serve, reply_channel, shared) = (serve.clone(), channel.clone(), self.shared.clone());
                let (intake, tracker) = (self.intake.clone(), self.tracker.clone());
                self.tracker.spawn(delivery_loop(stream, intake, tracker, move |delivery| {
                    let (serve, channel, shared) = (serve.clone(), reply_channel.clone(), shared.clone());
                    async move { answer(&*serve, &channel, delivery, &shared).await }
                }));
                consumers.push((channel, tag));
            }
            let _ = admin.close(200, "topology declared".into()).await;
            Ok(Consumers(consumers))
        })
    }
}

fn consumer_tag(service: &str, queue: &str) -> Result<ShortString, Error> {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    topology::short(&format!("{service}/{queue}/{}", &suffix[..8]))
}

/// Pulls deliveries until intake stops or the channel dies, one tracked task per delivery.
/// Concurrency is bounded by the channel's prefetch: the broker sends no more than that many
/// unacknowledged deliveries.
async fn delivery_loop<F, Fut>(mut stream: lapin::Consumer, intake: CancellationToken, tracker: TaskTracker, handle: F)
where
    F: Fn(Delivery) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let next = tokio::select! {
            // Shutdown wins over a delivery that is already waiting: nothing new starts.
            biased;
            _ = intake.cancelled() => return,
            next = stream.next() => next,
        };
        let Some(delivery) = delivered(next) else { return };
        tracker.spawn(handle(delivery));
    }
}

/// Pulls deliveries until intake stops or the channel dies, and hands them over in batches.
/// A delivery that comes less than `gather.linger` after the previous batch was done (at once,
/// if it was waiting meanwhile) waits up to `gather.linger` for more: at a few deliveries per
/// transaction the transaction's own cost is most of a delivery's. On a quiet queue, and after a
/// pause, waiting would only add latency, and the delivery goes at once. Then the batch waits
/// for the store to give this queue its turn, and takes every delivery that arrived meanwhile,
/// up to `gather.max` in all. One batch at a time, so a queue's deliveries never contend for
/// the database among themselves; and since the batch is completed once the turn has come, the
/// deliveries that arrived while other queues of the service held the database share one
/// transaction. `handle` gets the turn with the batch, to give it back as soon as it is done
/// with the database (before it talks to the broker).
async fn batch_loop<F, Fut>(mut stream: lapin::Consumer, intake: CancellationToken, store: Store, gather: Gather, handle: F)
where
    F: Fn(Vec<Delivery>, Turn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    // When the previous batch was done.
    let mut done: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            // Shutdown wins over a delivery that is already waiting: nothing new starts.
            biased;
            _ = intake.cancelled() => return,
            next = stream.next() => next,
        };
        let arrived = Instant::now();
        let mut batch = Vec::new();
        if !gathered(next, &mut batch) {
            return;
        }
        let mut ended = false;
        if done.is_some_and(|at| arrived - at < gather.linger) {
            let lingered = tokio::time::sleep(gather.linger);
            tokio::pin!(lingered);
            while batch.len() < gather.max && !ended {
                tokio::select! {
                    // Shutdown ends the wait; the batch then starts nothing (see `process_batch`).
                    biased;
                    _ = intake.cancelled() => break,
                    next = stream.next() => ended = !gathered(next, &mut batch),
                    _ = &mut lingered => break,
                }
            }
        }
        let turn = store.turn().await;
        while batch.len() < gather.max && !ended {
            match stream.next().now_or_never() {
                Some(next) => ended = !gathered(next, &mut batch),
                None => break,
            }
        }
        handle(batch, turn).await;
        done = Some(Instant::now());
        if ended {
            return;
        }
    }
}

/// The delivery a consumer stream gave; `None` if the stream has ended (the channel failed,
/// which is logged, or was closed).
fn delivered(next: Option<lapin::Result<Delivery>>) -> Option<Delivery> {
    match next? {
        Ok(delivery) => Some(delivery),
        Err(error) => {
            tracing::warn!(%error, "consumer stream failed; waiting for reconnect");
            None
        }
    }
}

/// Adds the delivery a consumer stream gave to `batch`; `false` if the stream has ended.
fn gathered(next: Option<lapin::Result<Delivery>>, batch: &mut Vec<Delivery>) -> bool {
    delivered(next).map(|delivery| batch.push(delivery)).is_some()
}

/// Runs `handled` (the handling of `count` deliveries of `queue`) and records it in the
/// delivery metrics.
async fn measured(queue: &str, count: usize, handled: impl std::future::Future<Output = ()>) {
    let metrics = crate::metrics::metrics();
    let label = crate::metrics::queue(queue);
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    metrics.deliveries.get_or_create(&label).inc_by(count.unsigned_abs());
    metrics.batches.get_or_create(&label).inc();
    let in_flight = metrics.in_flight.get_or_create(&label).clone();
    in_flight.inc_by(count);
    let started = std::time::Instant::now();
    handled.await;
    let latency = metrics.handler_latency.get_or_create(&label);
    for _ in 0..count {
        latency.observe(started.elapsed().as_secs_f64());
    }
    in_flight.dec_by(count);
}

/// Handles a batch and settles each delivery; a batch that fully succeeded is acknowledged in
/// one frame.
///
/// The turn at the database ends with the transaction: settling talks only to the broker,
/// and an ack on a connection that has just died can go unanswered (see [`tell_broker`]).
async fn handle_batch(route: &dyn Route, deliveries: Vec<Delivery>, turn: Turn, shared: &Shared, stop: &CancellationToken) {
    let outcomes = route.process_batch(&deliveries, shared, stop).await;
    drop(turn);
    let last = deliveries.iter().map(|d| d.delivery_tag).max();
    match (outcomes.iter().all(|o| matches!(o, Outcome::Ack)), deliveries.last()) {
        // The usual case. This batch's loop alone consumes from the channel, one batch at a
        // time, so every earlier delivery is already settled.
        (true, Some(delivery)) if last == Some(delivery.delivery_tag) => {
            tell_broker(delivery.ack(BasicAckOptions { multiple: true }), "ack", route.queue(), shared).await;
        }
        _ => {
            let settled = deliveries.into_iter().zip(outcomes).map(|(d, o)| settle(d, route.queue(), o, shared));
            futures_util::future::join_all(settled).await;
        }
    }
}

/// Acts on an outcome. The only place that acks, retries or dead-letters.
async fn settle(delivery: Delivery, queue: &str, outcome: Outcome, shared: &Shared) {
    let attempt = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| headers::header_u32(h, headers::ATTEMPT))
        .unwrap_or(1);
    let moved = match outcome {
        Outcome::Ack => Ok(()),
        Outcome::Leave => return,
        Outcome::Rerun => {
            tell_broker(delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }), "requeue", queue, shared).await;
            return;
        }
        Outcome::Retry(error) => match shared.config.retry.delay_after(attempt) {
            Some(delay) => {
                tracing::warn!(%error, attempt, ?delay, queue, "handler failed; retrying later");
                crate::metrics::metrics().retries.get_or_create(&crate::metrics::queue(queue)).inc();
                let mut copy = headers_of(&delivery);
                copy.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempt + 1));
                shared
                    .publisher
                    .send(&topology::retry_exchange(delay), queue, with_headers(&delivery.properties, copy), &delivery.data)
                    .await
            }
            None => dead_letter(&delivery, queue, "retries-exhausted", &error, attempt, shared).await,
        },
        Outcome::DeadLetter { reason, error } => dead_letter(&delivery, queue, reason, &error, attempt, shared).await,
    };
    match moved {
        Ok(()) => {
            // If the ack is lost, the broker redelivers; the inbox makes that harmless.
            tell_broker(delivery.ack(BasicAckOptions::default()), "ack", queue, shared).await;
        }
        Err(error) => {
            tracing::error!(error.message = %error, queue, "could not move the message; returning it to the queue");
            // Back off a little so a broker-side failure does not become a hot redelivery loop.
            tokio::time::sleep(Duration::from_millis(500)).await;
            tell_broker(delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }), "requeue", queue, shared).await;
        }
    }
}

/// Sends an ack, a requeue or a reply and waits for lapin to take it, up to the confirm
/// timeout. lapin (4.12) can leave that wait unanswered forever when the connection dies at
/// the wrong moment; the broker then redelivers what it was not told, so giving up loses
/// nothing, and it keeps a dead connection's tasks from outliving it.
async fn tell_broker<T>(sent: impl std::future::Future<Output = lapin::Result<T>>, what: &str, queue: &str, shared: &Shared) {
    let limit = shared.config.confirm_timeout;
    match tokio::time::timeout(limit, sent).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, queue, "{what} failed"),
        Err(_) => tracing::warn!(queue, ?limit, "{what} went unanswered; given up (the broker redelivers what was not acknowledged)"),
    }
}

async fn dead_letter(
    delivery: &Delivery,
    queue: &str,
    reason: &str,
    error: &str,
    attempt: u32,
    shared: &Shared,
) -> Result<(), Error> {
    tracing::error!(reason, error, attempt, queue, "dead-lettering message");
    let label = crate::metrics::DeadLetter { queue: queue.to_owned(), reason: reason.to_owned() };
    crate::metrics::metrics().dead_lettered.get_or_create(&label).inc();
    let mut copy = headers_of(delivery);
    headers::set_str(&mut copy, headers::DEAD_LETTER_REASON, reason);
    let error: String = error.chars().take(4_000).collect();
    headers::set_str(&mut copy, headers::DEAD_LETTER_ERROR, &error);
    headers::set_str(&mut copy, headers::ORIGINAL_QUEUE, queue);
    if headers::header_str(&copy, headers::ORIGINAL_ROUTING_KEY).is_none() {
        headers::set_str(&mut copy, headers::ORIGINAL_ROUTING_KEY, delivery.routing_key.as_str());
    }
    headers::set_str(&mut copy, headers::DEAD_LETTERED_AT, &headers::now().to_string());
    copy.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(attempt));
    shared
        .publisher
        .send("", &topology::dead_letter_queue(queue), with_headers(&delivery.properties, copy), &delivery.data)
        .await
}

fn headers_of(delivery: &Delivery) -> FieldTable {
    let mut copy = delivery.properties.headers().clone().unwrap_or_default();
    // Retried copies route by queue name; remember the event's own routing key.
    if headers::header_str(&copy, headers::ORIGINAL_ROUTING_KEY).is_none() && delivery.exchange.as_str() == topology::EXCHANGE {
        headers::set_str(&mut copy, headers::ORIGINAL_ROUTING_KEY, delivery.routing_key.as_str());
    }
    copy
}

fn with_headers(properties: &BasicProperties, headers: FieldTable) -> BasicProperties {
    properties.clone().with_headers(headers).with_delivery_mode(2)
}

/// Serves one request and acks it. Replies go straight to the caller's reply-to address.
async fn answer(serve: &dyn Serve, channel: &Channel, delivery: Delivery, shared: &Shared) {
    let reply_to = delivery.properties.reply_to().clone();
    let correlation_id = delivery.properties.correlation_id().clone();
    let result = serve.reply(&delivery).await;
    if let (Some(reply_to), Some(correlation_id)) = (reply_to, correlation_id) {
        let mut properties = BasicProperties::default()
            .with_content_type(headers::CONTENT_TYPE.into())
            .with_correlation_id(correlation_id);
        let body = match result {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(queue = serve.queue(), %error, "request failed");
                let mut hdrs = FieldTable::default();
                headers::set_str(&mut hdrs, headers::RPC_ERROR, &error);
                properties = properties.with_headers(hdrs);
                Vec::new()
            }
        };
        let reply = channel.basic_publish("".into(), reply_to, BasicPublishOptions::default(), &body, properties);
        tell_broker(reply, "reply", serve.queue(), shared).await;
    }
    tell_broker(delivery.ack(BasicAckOptions::default()), "ack of a request", serve.queue(), shared).await;
}

/// A running consumer: its handlers, request responders and outbox relay.
pub struct Consumer {
    service: String,
    link: Link<Consumers>,
    publisher: Publisher,
    intake: CancellationToken,
    tracker: TaskTracker,
    relay: tokio::task::JoinHandle<()>,
    /// Prunes the inbox (`retention`), stopped with the relay.
    pruner: Option<tokio::task::JoinHandle<()>>,
    relay_stop: CancellationToken,
}

impl Consumer {
    /// Starts building the consumer of `service` over `store`.
    pub fn builder(service: &str, config: &BusConfig, store: &Store) -> ConsumerBuilder {
        ConsumerBuilder { service: service.to_owned(), config: config.clone(), store: store.clone(), routes: Vec::new(), serves: Vec::new() }
    }

    /// Whether both connections (consuming and publishing) are up, as a function that stays
    /// valid while the consumer runs (for health endpoints).
    pub fn readiness(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let (consuming, publisher) = (self.link.ready(), self.publisher.clone());
        move || *consuming.borrow() && publisher.is_ready()
    }

    /// Runs until `shutdown`, then stops cleanly: no new deliveries, in-flight handlers finish
    /// (up to [`DRAIN_TIMEOUT`]), the outbox is flushed, connections close. Deliveries that did
    /// not finish are not acknowledged and return to their queues.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), Error> {
        shutdown.cancelled().await;
        tracing::info!(service = %self.service, "stopping intake");
        self.intake.cancel();
        let state = self.link.subscribe().borrow().clone();
        let consumers = match state {
            super::connection::LinkState::Up { value, .. } => Some(value),
            super::connection::LinkState::Down => None,
        };
        let cancels = consumers.iter().flat_map(|c| c.0.iter()).map(|(channel, tag)| {
            super::connection::closed(&self.service, "cancelling a consumer", channel.basic_cancel(tag.clone(), BasicCancelOptions::default()))
        });
        futures_util::future::join_all(cancels).await;
        self.tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.tracker.wait()).await.is_err() {
            tracing::warn!(service = %self.service, "in-flight handlers did not finish in time; they will be redelivered");
        }
        self.relay_stop.cancel();
        let _ = self.relay.await;
        if let Some(pruner) = self.pruner {
            let _ = pruner.await;
        }
        // Close the channels before the connection (lapin reports channels still open when
        // their connection closes as a connection error).
        let closes = consumers.iter().flat_map(|c| c.0.iter()).map(|(channel, _)| {
            super::connection::closed(&self.service, "closing a channel", channel.close(200, "shutdown".into()))
        });
        futures_util::future::join_all(closes).await;
        tokio::join!(self.link.close(), self.publisher.close());
        tracing::info!(service = %self.service, "stopped");
        Ok(())
    }
}
