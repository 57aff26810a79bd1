//! What a service author implements: a typed [`Handler`] per event, a [`Responder`] per
//! request type. The bus owns decoding, transactions, acknowledgements, retries and
//! dead-lettering; a handler only decides *what happened*.

use std::{future::Future, time::Duration};

use sqlx::AnyConnection;

use crate::store::{self, Rows, Tx, Written};

use super::{Rpc, headers::Envelope, topology::kebab_case};
use crate::events::Event;

/// Any error, boxed, as the source of a [`HandlerError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How the bus should treat a failed delivery.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Might succeed later (timeout, dependency down, data not there yet): redeliver after a
    /// backoff delay, up to the retry limit, then dead-letter.
    #[error("retryable: {0}")]
    Retry(#[source] BoxError),
    /// Will never succeed (invalid data, broken invariant): dead-letter now.
    #[error("rejected: {0}")]
    Reject(#[source] BoxError),
}

impl HandlerError {
    /// A transient failure.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        Self::Retry(error.into())
    }

    /// A permanent failure.
    pub fn reject(error: impl Into<BoxError>) -> Self {
        Self::Reject(error.into())
    }
}

/// Database errors are transient unless a handler says otherwise.
impl From<sqlx::Error> for HandlerError {
    fn from(error: sqlx::Error) -> Self {
        Self::Retry(error.into())
    }
}

/// What the bus knows about a delivery besides its body.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// The event id (`message_id`).
    pub event_id: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The order it belongs to (`correlation_id`), if any.
    pub correlation_id: Option<String>,
    /// When the producer says it happened (`cloudEvents_time`).
    pub occurred_at: prost_types::Timestamp,
    /// 1 for the first delivery, 2 for the first retry, ...
    pub attempt: u32,
    /// Name of the handler processing it (the second half of its queue name).
    pub handler: String,
    /// The queue it was consumed from.
    pub queue: String,
}

impl Metadata {
    /// Metadata for unit-testing a handler without a broker.
    pub fn for_test(event_id: &str) -> Self {
        Self {
            event_id: event_id.to_owned(),
            routing_key: String::new(),
            correlation_id: None,
            occurred_at: super::headers::now(),
            attempt: 1,
            handler: "test".into(),
            queue: "test.test".into(),
        }
    }
}

/// A handler's view of one delivery: its metadata, the service database inside the
/// delivery's transaction, and an outbox for the events it emits.
///
/// Everything done through [`Context::db`], [`Context::write`] and [`Context::emit`] commits
/// atomically with the inbox record that marks the delivery as handled, or not at all. Use only `db()` for
/// database work inside a handler: a second connection would escape the transaction (and,
/// on SQLite, its writes would wait for the delivery's transaction, then fail).
pub struct Context {
    tx: Tx,
    emitted: Vec<Envelope>,
    /// Rows given to [`Context::write`], for the bus to write; `None`: written at once.
    written: Option<Written>,
    meta: Metadata,
}

impl Context {
    pub(crate) fn new(tx: Tx, meta: Metadata) -> Self {
        Self { tx, emitted: Vec::new(), written: Some(Written::new()), meta }
    }

    /// A context over a fresh transaction of `store`, for unit tests of handlers. Its
    /// [`Context::write`] writes at once, so that a test reads what its handler wrote.
    pub async fn for_test(store: &crate::store::Store, event_id: &str) -> Result<Self, sqlx::Error> {
        Ok(Self { written: None, ..Self::new(Tx::Pooled(store.pool().begin().await?), Metadata::for_test(event_id)) })
    }

    /// The database, inside this delivery's transaction.
    pub fn db(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// Which database `db()` is, for the rare statement that must be written differently for
    /// SQLite and PostgreSQL.
    pub fn backend(&self) -> crate::store::Backend {
        crate::store::Backend::of(&self.tx)
    }

    /// The delivery's metadata.
    pub fn meta(&self) -> &Metadata {
        &self.meta
    }

    /// Emits an event: it is stored in the outbox with this delivery's transaction and
    /// published (with confirms) once that transaction commits. Its event id is derived from
    /// the incoming event, the handler and its position, so a redelivery that reaches the
    /// handler again emits the same ids (see [`derived_event_id`]).
    pub fn emit<E: Event>(&mut self, event: E) -> &mut Self {
        let id = derived_event_id(&self.meta, self.emitted.len());
        self.emitted.push(Envelope::of(&event, id.to_string()));
        self
    }

    /// Writes `row` with `statement`, in this delivery's transaction: for a handler whose
    /// statement returns nothing it needs. The bus runs the statement once for the rows every
    /// handler of the transaction gave it, before the commit (see [`Rows`]): a batch of
    /// deliveries makes one round trip to the database for all of them, not one each. So the
    /// row is not there yet for this handler to read back; a failure to write it is the
    /// delivery's (retried, as a database error is), and rolls back nothing else.
    pub async fn write(&mut self, statement: &'static Rows, row: serde_json::Value) -> Result<(), sqlx::Error> {
        match &mut self.written {
            Some(written) => {
                store::add_row(written, statement, row);
                Ok(())
            }
            None => store::write_rows(&mut self.tx, vec![(statement, vec![row])]).await,
        }
    }

    /// Events emitted so far.
    pub fn emitted(&self) -> &[Envelope] {
        &self.emitted
    }

    pub(crate) fn into_parts(self) -> (Tx, Vec<Envelope>, Written) {
        (self.tx, self.emitted, self.written.unwrap_or_default())
    }
}

/// Reacts to one event type. Implement it with a plain `async fn`.
///
/// Returning `Ok(())` commits the delivery's transaction and acknowledges the message.
/// `Err(HandlerError::Retry(..))` rolls back and redelivers later; `Err(HandlerError::Reject(..))`
/// rolls back and dead-letters. A panic counts as a retry.
pub trait Handler<E: Event>: Send + Sync + 'static {
    /// The handler's name, used for its queue `<service>.<name>`. Defaults to the type name
    /// in kebab case (`ReserveStock` → `reserve-stock`).
    fn name(&self) -> String {
        kebab_case(std::any::type_name::<Self>())
    }

    /// Handles one event.
    fn handle(&self, event: E, ctx: &mut Context) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Answers one request type over RabbitMQ request/reply.
pub trait Responder<R: Rpc>: Send + Sync + 'static {
    /// Builds the reply. Errors are sent back to the caller as a remote error.
    fn respond(&self, request: R) -> impl Future<Output = Result<R::Reply, BoxError>> + Send;
}

/// How long a consumer waits for in-flight handlers at shutdown before it closes anyway
/// (unfinished deliveries are not acknowledged and return to their queue).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The id of the `position`-th event a handler emits for one delivery: a UUIDv7 whose time is
/// the incoming event's `occurred_at` and whose other bits are a name-based hash (as UUIDv5's)
/// of the incoming event id, the handler and the position. The same delivery, redelivered, so
/// derives the same ids; and ids sort by time like the gateway's own (UUIDv7 where the caller
/// gave no idempotency key), so the indexes on event ids grow at one end.
pub(crate) fn derived_event_id(meta: &Metadata, position: usize) -> uuid::Uuid {
    let seed = format!("{}/{}/{position}", meta.event_id, meta.handler);
    let hash = uuid::Uuid::new_v5(&super::EVENT_ID_NAMESPACE, seed.as_bytes()).into_bytes();
    // Bytes 6 and 8 of a UUIDv5 carry its version and variant; the other 14 are hash.
    let bits = [hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[7], hash[9], hash[10], hash[11]];
    let t = &meta.occurred_at;
    let millis = u64::try_from(t.seconds).unwrap_or(0).saturating_mul(1_000).saturating_add(u64::try_from(t.nanos / 1_000_000).unwrap_or(0));
    uuid::Builder::from_unix_timestamp_millis(millis, &bits).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::{Metadata, derived_event_id};

    fn meta(event_id: &str, handler: &str, seconds: i64) -> Metadata {
        let mut meta = Metadata::for_test(event_id);
        meta.handler = handler.to_owned();
        meta.occurred_at = prost_types::Timestamp { seconds, nanos: 250_000_000 };
        meta
    }

    #[test]
    fn derived_ids_are_the_same_for_a_redelivery_and_sort_by_the_incoming_events_time() {
        let first = derived_event_id(&meta("e-1", "reserve-stock", 1_700_000_000), 0);
        assert_eq!(first, derived_event_id(&meta("e-1", "reserve-stock", 1_700_000_000), 0), "a redelivery emits the same id");
        assert_eq!(first.get_version(), Some(uuid::Version::SortRand));
        assert_eq!(first.get_timestamp().map(|t| t.to_unix()), Some((1_700_000_000, 250_000_000)));
        for other in [
            derived_event_id(&meta("e-1", "reserve-stock", 1_700_000_000), 1),
            derived_event_id(&meta("e-1", "capture-payment", 1_700_000_000), 0),
            derived_event_id(&meta("e-2", "reserve-stock", 1_700_000_000), 0),
        ] {
            assert_ne!(first, other, "position, handler and incoming id each change the id");
        }
        let later = derived_event_id(&meta("e-0", "reserve-stock", 1_700_000_001), 0);
        assert!(later.to_string() > first.to_string(), "ids sort by the incoming event's time, as text too");
    }
}
