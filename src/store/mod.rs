//! The service database: SQLite (a file) by default, PostgreSQL when `DATABASE_URL` says so,
//! through sqlx's `Any` driver. Owns schema migrations and the bus's two tables:
//!
//! - `sluice_inbox`: which (event, handler) pairs are done, written in the handler's
//!   transaction: the dedup key of exactly-once effects;
//! - `sluice_outbox`: events emitted by handlers, written in the same transaction and
//!   published by the relay (`bus::relay`) after commit.
//!
//! Service migrations use SQL that both databases accept (TEXT, BIGINT, no AUTOINCREMENT);
//! the bus's own tables have one file per backend.
//!
//! On SQLite the bus's transactions run on a connection of their own (see `tx.rs`), and the
//! pool's connection serves everything else (queries, seeding, the relay's reads), so a query
//! reads beside a running transaction (WAL) instead of waiting for it.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sqlx::{
    AnyConnection, AnyPool, Connection as _, Row,
    any::{AnyArguments, AnyPoolOptions, AnyRow},
    migrate::{Migration as SqlxMigration, MigrationType, Migrator},
    query::Query,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::bus::{Envelope, Error, TraceContext};

mod jsonb;
mod tx;

pub(crate) use tx::Tx;
use tx::{SharedWriter, Writer};

/// One schema migration of a service. Versions must be 100 or more (below is the bus's).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Ordering key, unique per service.
    pub version: i64,
    /// Shown in `_sqlx_migrations`.
    pub description: &'static str,
    /// SQL accepted by both SQLite and PostgreSQL.
    pub sql: &'static str,
}

const BUS_SQLITE: &str = include_str!("migrations/sqlite/0001_inbox_outbox.sql");
const BUS_POSTGRES: &str = include_str!("migrations/postgres/0001_inbox_outbox.sql");
const BUS_POSTGRES_INBOX_AGE: &str = include_str!("migrations/postgres/0002_inbox_received_at.sql");

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The database behind a connection.
    pub fn of(connection: &AnyConnection) -> Self {
        if connection.backend_name() == <sqlx::Postgres as sqlx::Database>::NAME { Self::Postgres } else { Self::Sqlite }
    }
}

/// An outbox row: its `seq` and the event it holds.
pub(crate) type Staged = (i64, Envelope);

/// A service's database pool, migrated, plus what its transactions hand the outbox relay.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    outbox_ready: Arc<Notify>,
    /// Outbox rows committed in this process and not yet taken by the relay, oldest first.
    committed: Arc<Mutex<Vec<Staged>>>,
    /// One permit per connection: consumers wait for a turn before they gather a batch.
    turns: Arc<Semaphore>,
    /// SQLite: the connection bus transactions run on (see [`Tx`]); the pool serves the rest.
    writer: Option<SharedWriter>,
}

impl Store {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://...`) and runs the bus's
    /// and the service's migrations.
    pub async fn connect(url: &str, migrations: &[Migration]) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") { Backend::Sqlite } else { Backend::Postgres };
        let connections = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => 16,
        };
        let pool = match backend {
            Backend::Sqlite => {
                create_parent_dir(url);
                // Bus transactions run on a connection of their own (the writer, below); the
                // pool's one connection serves queries, start-up seeding and the relay's reads.
                // SQLite has a single writer: more connections would only queue up on the
                // database lock.
                AnyPoolOptions::new()
                    .max_connections(connections)
                    // A file cannot drop a connection: no ping before each transaction.
                    .test_before_acquire(false)
                    .acquire_timeout(Duration::from_secs(30))
                    .after_connect(|conn, _| Box::pin(sqlite_pragmas(conn)))
                    .connect(url)
                    .await?
            }
            Backend::Postgres => AnyPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await?,
        };
        let mut all = vec![SqlxMigration::new(
            1,
            Cow::Borrowed("sluice inbox and outbox"),
            MigrationType::Simple,
            Cow::Borrowed(match backend {
                Backend::Sqlite => BUS_SQLITE,
                Backend::Postgres => BUS_POSTGRES,
            }),
            false,
        )];
        if backend == Backend::Postgres {
            // SQLite needs no index to prune the inbox: its rows are read in rowid order.
            all.push(SqlxMigration::new(
                2,
                Cow::Borrowed("sluice inbox by age"),
                MigrationType::Simple,
                Cow::Borrowed(BUS_POSTGRES_INBOX_AGE),
                false,
            ));
        }
        for m in migrations {
            if m.version < 100 {
                return Err(Error::Migrate(sqlx::migrate::MigrateError::VersionMissing(m.version)));
            }
            all.push(SqlxMigration::new(m.version, Cow::Borrowed(m.description), MigrationType::Simple, Cow::Borrowed(m.sql), false));
        }
        let migrator = Migrator { migrations: Cow::Owned(all), ..Migrator::DEFAULT };
        migrator.run(&pool).await?;
        let writer = match backend {
            Backend::Sqlite => {
                let mut conn = AnyConnection::connect(url).await?;
                sqlite_pragmas(&mut conn).await?;
                Some(Writer::shared(conn))
            }
            Backend::Postgres => None,
        };
        Ok(Self {
            writer,
            pool,
            backend,
            outbox_ready: Arc::new(Notify::new()),
            committed: Arc::default(),
            turns: Arc::new(Semaphore::new(connections as usize)),
        })
    }

    /// The pool, for queries outside handlers (responders, start-up seeding).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Begins a bus transaction.
    pub(crate) async fn begin(&self) -> Result<Tx, sqlx::Error> {
        match &self.writer {
            Some(writer) => Tx::begin_held(writer).await,
            None => Ok(Tx::Pooled(self.pool.begin().await?)),
        }
    }

    /// Begins a bus transaction and claims `event_ids` for `handler` in it, as [`claim_all`]
    /// does; on SQLite in one query.
    pub(crate) async fn begin_claiming(&self, event_ids: &[&str], handler: &str) -> Result<(Tx, HashSet<String>), sqlx::Error> {
        let Some(writer) = &self.writer else {
            let mut tx = Tx::Pooled(self.pool.begin().await?);
            let claimed = claim_all(&mut tx, event_ids, handler).await?;
            return Ok((tx, claimed));
        };
        let mut held = tx::Held::lock(writer).await;
        let rows = sqlite_claim(concat!("BEGIN IMMEDIATE; ", sqlite_claim_sql!()), event_ids, handler).fetch_all(&mut held.conn).await?;
        Ok((Tx::Held(held), claimed_ids(rows)?))
    }

    /// Waits for a connection's turn (first come, first served). A consumer takes its turn
    /// *before* it gathers a batch, so the deliveries that arrived while other queues held the
    /// database join the batch instead of waiting for another transaction.
    pub(crate) async fn turn(&self) -> Option<OwnedSemaphorePermit> {
        self.turns.clone().acquire_owned().await.ok()
    }

    /// Hands the relay the outbox rows of a transaction that has just committed, so that it
    /// publishes them without reading them back, and wakes it.
    pub(crate) fn committed(&self, rows: Vec<Staged>) {
        if rows.is_empty() {
            return;
        }
        self.committed.lock().unwrap_or_else(PoisonError::into_inner).extend(rows);
        self.outbox_ready.notify_one();
    }

    /// Every row handed over by [`Store::committed`] since the last call, oldest first.
    pub(crate) fn take_committed(&self) -> Vec<Staged> {
        std::mem::take(&mut *self.committed.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Completes when a transaction has handed over outbox rows since the last call.
    pub(crate) async fn outbox_ready(&self) {
        self.outbox_ready.notified().await;
    }

    /// Up to `limit` unsent outbox rows, oldest first.
    pub(crate) async fn pending(&self, limit: i64) -> Result<Vec<Staged>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT seq, event_id, routing_key, type_name, correlation_id, occurred_at, traceparent, tracestate, body \
             FROM sluice_outbox ORDER BY seq LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let occurred_at: String = row.try_get("occurred_at")?;
                Ok((
                    row.try_get("seq")?,
                    Envelope {
                        event_id: row.try_get("event_id")?,
                        routing_key: row.try_get("routing_key")?,
                        type_name: row.try_get("type_name")?,
                        correlation_id: row.try_get("correlation_id")?,
                        occurred_at: occurred_at.parse().unwrap_or_default(),
                        trace: TraceContext { traceparent: row.try_get("traceparent")?, tracestate: row.try_get("tracestate")? },
                        body: row.try_get("body")?,
                    },
                ))
            })
            .collect()
    }

    /// Deletes published rows.
    pub(crate) async fn mark_sent(&self, seqs: &[i64]) -> Result<(), sqlx::Error> {
        if seqs.is_empty() {
            return Ok(());
        }
        if self.backend == Backend::Sqlite {
            let delete = sqlx::query("DELETE FROM sluice_outbox WHERE seq IN (SELECT value FROM json_each($1))")
                .bind(json_array(seqs.iter().copied()));
            // On the writer: the pool's connection would wait for the file's write lock.
            return match &self.writer {
                Some(writer) => delete.execute(&mut tx::lock(writer).await.conn).await.map(|_| ()),
                None => delete.execute(&self.pool).await.map(|_| ()),
            };
        }
        let sql = format!("DELETE FROM sluice_outbox WHERE seq IN {}", placeholders_from(1, seqs.len()));
        let delete = seqs.iter().fold(sqlx::query(&sql), |query, seq| query.bind(*seq));
        delete.execute(&self.pool).await.map(|_| ())
    }

    /// Deletes the inbox records older than `retention`, [`PRUNE_CHUNK`] at a time (each chunk
    /// its own short statement, so handlers' transactions wait for one chunk at most), and
    /// returns how many went. A redelivery of an event whose record is gone is handled again:
    /// the retention must outlast any redelivery or replay that should still be absorbed.
    ///
    /// On SQLite each chunk looks at the oldest [`PRUNE_CHUNK`] rows by rowid (insertion order)
    /// and deletes those that are old enough, so a pass reads the table only up to the first
    /// chunk with nothing to delete, never all of it. Rows written with a clock set ahead of
    /// the rest can so hold back the rows behind them until they age out themselves. On
    /// PostgreSQL the rows are found through a BRIN index on `received_at`.
    pub async fn prune_inbox(&self, retention: Duration) -> Result<u64, sqlx::Error> {
        let cutoff = unix_millis().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let mut deleted = 0;
        loop {
            let (chunk, more) = match &self.writer {
                // SQLite, on the writer: the pool's connection would wait for the file's lock.
                Some(writer) => {
                    let chunk = sqlx::query(
                        "DELETE FROM sluice_inbox WHERE rowid IN (SELECT rowid FROM sluice_inbox ORDER BY rowid LIMIT $1) \
                         AND received_at < $2",
                    )
                    .bind(PRUNE_CHUNK)
                    .bind(cutoff)
                    .execute(&mut tx::lock(writer).await.conn)
                    .await?
                    .rows_affected();
                    // Fewer deleted than read means newer rows among the oldest; the next
                    // statement reads past what this one deleted, until one deletes nothing.
                    (chunk, chunk > 0)
                }
                None => {
                    let chunk = sqlx::query(
                        "DELETE FROM sluice_inbox WHERE ctid = ANY (ARRAY (SELECT ctid FROM sluice_inbox WHERE received_at < $2 LIMIT $1))",
                    )
                    .bind(PRUNE_CHUNK)
                    .bind(cutoff)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                    (chunk, chunk == PRUNE_CHUNK.unsigned_abs())
                }
            };
            deleted += chunk;
            if !more {
                return Ok(deleted);
            }
            tokio::task::yield_now().await;
        }
    }
}

/// Inbox records deleted per statement by [`Store::prune_inbox`].
pub const PRUNE_CHUNK: i64 = 1_000;

/// Records that `handler` handles `event_id`. `false` if it already did: a duplicate.
pub(crate) async fn claim(tx: &mut AnyConnection, event_id: &str, handler: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO sluice_inbox (event_id, handler, received_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(event_id)
    .bind(handler)
    .bind(unix_millis())
    .execute(tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records that `handler` handles each of `event_ids`, in one statement. Returns the ids it
/// recorded: an id missing from the result was handled before (a duplicate), and an id
/// given twice is recorded once.
pub(crate) async fn claim_all(tx: &mut AnyConnection, event_ids: &[&str], handler: &str) -> Result<HashSet<String>, sqlx::Error> {
    if Backend::of(tx) == Backend::Sqlite {
        return claimed_ids(sqlite_claim(sqlite_claim_sql!(), event_ids, handler).fetch_all(&mut *tx).await?);
    }
    let mut claimed = HashSet::with_capacity(event_ids.len());
    let now = unix_millis();
    for chunk in event_ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO sluice_inbox (event_id, handler, received_at) VALUES {} ON CONFLICT DO NOTHING RETURNING event_id",
            placeholders(chunk.len(), 3)
        );
        let insert = chunk.iter().fold(sqlx::query(&sql), |query, id| query.bind(*id).bind(handler).bind(now));
        for row in insert.fetch_all(&mut *tx).await? {
            claimed.insert(row.try_get::<String, _>("event_id")?);
        }
    }
    Ok(claimed)
}

/// SQLite's statement of [`claim_all`], a macro for `concat!`.
macro_rules! sqlite_claim_sql {
    () => {
        "INSERT INTO sluice_inbox (event_id, handler, received_at) SELECT value, $2, $3 FROM json_each($1) WHERE true \
         ON CONFLICT DO NOTHING RETURNING event_id"
    };
}
use sqlite_claim_sql;

/// `sql` (ending with SQLite's claim) with its parameters bound.
fn sqlite_claim<'q>(sql: &'q str, event_ids: &[&str], handler: &'q str) -> Query<'q, sqlx::Any, AnyArguments<'q>> {
    sqlx::query(sql).bind(json_array(event_ids.iter().copied())).bind(handler).bind(unix_millis())
}

/// The ids a claim returned.
fn claimed_ids(rows: Vec<AnyRow>) -> Result<HashSet<String>, sqlx::Error> {
    rows.iter().map(|row| row.try_get::<String, _>("event_id")).collect()
}

/// Removes inbox records of `handler` written in the caller's transaction (for deliveries
/// claimed but not run).
pub(crate) async fn unclaim(tx: &mut AnyConnection, event_ids: &[&str], handler: &str) -> Result<(), sqlx::Error> {
    if Backend::of(tx) == Backend::Sqlite {
        sqlx::query("DELETE FROM sluice_inbox WHERE handler = $1 AND event_id IN (SELECT value FROM json_each($2))")
            .bind(handler)
            .bind(json_array(event_ids.iter().copied()))
            .execute(&mut *tx)
            .await?;
        return Ok(());
    }
    for chunk in event_ids.chunks(ROWS_PER_STATEMENT) {
        let sql = format!("DELETE FROM sluice_inbox WHERE handler = $1 AND event_id IN {}", placeholders_from(2, chunk.len()));
        let delete = chunk.iter().fold(sqlx::query(&sql).bind(handler), |query, id| query.bind(*id));
        delete.execute(&mut *tx).await?;
    }
    Ok(())
}

/// [`SQLITE_GIVEN`] with the rows' parameter named, a macro for `concat!` (the outbox's insert
/// takes its rows as `$2` when it follows a [`Rows`] statement).
macro_rules! sqlite_given {
    ($rows:literal) => {
        concat!("WITH given(r) AS MATERIALIZED (SELECT jsonb_extract(", $rows, ", fullkey) FROM json_each(", $rows, "))")
    };
}

/// SQLite: the rows of a [`Rows`] statement's `$1` as a table, `given`, of one column, `r`, each
/// row as JSONB: a statement starts with it and reads the columns of a row as `r ->> 0`,
/// `r ->> 1`, ... `FROM given` (the names PostgreSQL's `json_array_elements($1::JSON) AS j(r)`
/// gives). Add more tables after a comma.
///
/// On SQLite `$1` is JSONB (see `jsonb.rs`), and each row is taken out of it as JSONB
/// (`jsonb_extract`), once: `MATERIALIZED` keeps SQLite from doing it again for every mention of
/// `r`. `json_each`'s own `value` would be the row written out as JSON text, every time it is
/// mentioned, for each `->>` to parse again: in orders' read model, which mentions it about 20
/// times per row, SQLite's JSON functions were about 40 % of the service's instructions (see
/// "Rows read once, as JSONB" in docs/benchmarks.md).
pub const SQLITE_GIVEN: &str = sqlite_given!("$1");

/// A statement that writes rows for handlers (see [`crate::bus::Context::write`]). The bus runs
/// it once per transaction, for every row the transaction's handlers gave it, after the last
/// handler and before the commit (on SQLite in the commit's own query), so that a batch's
/// handlers make one round trip to the database between them instead of one each.
///
/// Its one parameter, `$1`, is the rows as a JSON array, each row the JSON value a handler
/// gave (an array of its columns, say): on SQLite as JSONB, read through [`SQLITE_GIVEN`]
/// (`r ->> 0`, ... `FROM given`), on PostgreSQL as JSON text, read with
/// `json_array_elements($1::JSON) AS j(r)`. It must return no rows. The rows of
/// one statement are in the order they were given, and statements run in the order each was
/// first given a row.
#[derive(Debug)]
pub struct Rows {
    sqlite: String,
    postgres: String,
    /// SQLite: the statement, then `COMMIT`.
    sqlite_then_commit: String,
    /// SQLite: the statement, the outbox's insert (`$2`, `$3`), then `COMMIT`.
    sqlite_then_stage_and_commit: String,
}

impl Rows {
    /// The statement, as SQLite and as PostgreSQL write it.
    pub fn new(sqlite: impl Into<String>, postgres: impl Into<String>) -> Self {
        let sqlite = sqlite.into();
        Self {
            sqlite_then_commit: format!("{sqlite}; COMMIT"),
            sqlite_then_stage_and_commit: format!("{sqlite}; {}; COMMIT", sqlite_stage_sql!("$2", "$3")),
            sqlite,
            postgres: postgres.into(),
        }
    }

    /// The statement as `backend` writes it (to run it by hand, as a test does).
    pub fn sql(&self, backend: Backend) -> &str {
        match backend {
            Backend::Sqlite => &self.sqlite,
            Backend::Postgres => &self.postgres,
        }
    }
}

/// Rows given to [`Rows`] statements, by statement, in the order each was first given one.
pub(crate) type Written = Vec<(&'static Rows, Vec<serde_json::Value>)>;

/// Adds `row` to the rows of `statement`.
pub(crate) fn add_row(written: &mut Written, statement: &'static Rows, row: serde_json::Value) {
    match written.iter_mut().find(|(s, _)| std::ptr::eq(*s, statement)) {
        Some((_, rows)) => rows.push(row),
        None => written.push((statement, vec![row])),
    }
}

/// Adds every row of `more` after those of `written`.
pub(crate) fn add_rows(written: &mut Written, more: Written) {
    for (statement, rows) in more {
        for row in rows {
            add_row(written, statement, row);
        }
    }
}

/// Runs each statement of `written` once, with its rows, in the caller's transaction.
pub(crate) async fn write_rows(tx: &mut AnyConnection, written: Written) -> Result<(), sqlx::Error> {
    let backend = Backend::of(tx);
    for (statement, rows) in written {
        let query = sqlx::query(statement.sql(backend));
        let query = match backend {
            Backend::Sqlite => query.bind(jsonb::array(&rows)?),
            Backend::Postgres => query.bind(json_array(rows)),
        };
        query.execute(&mut *tx).await?;
    }
    Ok(())
}

/// Rows per multi-row statement on PostgreSQL: far below its bound-parameter limit (65,535) at
/// the widest row (9 columns). SQLite takes all rows in one JSON parameter ([`json_array`]).
const ROWS_PER_STATEMENT: usize = 500;

/// Writes emitted events to the outbox, in the caller's transaction: one statement on SQLite,
/// one per [`ROWS_PER_STATEMENT`] events on PostgreSQL. Returns each event with its row's `seq`,
/// for [`Store::committed`] once the transaction has committed.
pub(crate) async fn stage(tx: &mut AnyConnection, envelopes: Vec<Envelope>) -> Result<Vec<Staged>, sqlx::Error> {
    if envelopes.is_empty() {
        return Ok(Vec::new());
    }
    if Backend::of(tx) == Backend::Sqlite {
        let rows = bind_stage(sqlx::query(sqlite_stage_sql!("$1", "$2")), &envelopes)?.fetch_all(&mut *tx).await?;
        return with_seqs(envelopes, rows);
    }
    let now = unix_millis();
    let mut rows = Vec::with_capacity(envelopes.len());
    for chunk in envelopes.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO sluice_outbox (event_id, routing_key, type_name, correlation_id, occurred_at, traceparent, tracestate, body, created_at) \
             VALUES {} RETURNING seq, event_id",
            placeholders(chunk.len(), 9)
        );
        let insert = chunk.iter().fold(sqlx::query(&sql), |query, e| {
            query
                .bind(&e.event_id)
                .bind(&e.routing_key)
                .bind(&e.type_name)
                .bind(e.correlation_id.clone())
                .bind(crate::bus::headers::rfc3339(&e.occurred_at))
                .bind(e.trace.traceparent.clone())
                .bind(e.trace.tracestate.clone())
                .bind(e.body.clone())
                .bind(now)
        });
        rows.extend(insert.fetch_all(&mut *tx).await?);
    }
    with_seqs(envelopes, rows)
}

/// Writes the rows handlers gave [`Rows`] statements and the events they emitted (see
/// [`write_rows`] and [`stage`]), and commits. On SQLite in one query when the rows are of one
/// statement (or none), the usual case: `BEGIN` travels with the inbox claim, so such a
/// transaction costs two round trips to sqlx's worker thread whatever its handlers wrote.
pub(crate) async fn stage_and_commit(tx: Tx, envelopes: Vec<Envelope>, rows: Written) -> Result<Vec<Staged>, sqlx::Error> {
    match tx {
        Tx::Held(mut writer) if rows.len() <= 1 && !(rows.is_empty() && envelopes.is_empty()) => {
            let returned = match rows.into_iter().next() {
                None => {
                    let query = sqlx::query(concat!(sqlite_stage_sql!("$1", "$2"), "; COMMIT"));
                    bind_stage(query, &envelopes)?.fetch_all(&mut writer.conn).await?
                }
                Some((statement, rows)) if envelopes.is_empty() => {
                    sqlx::query(&statement.sqlite_then_commit).bind(jsonb::array(&rows)?).execute(&mut writer.conn).await?;
                    Vec::new()
                }
                // The statement's `$1`, then the outbox's `$2` and `$3`; only the outbox returns rows.
                Some((statement, rows)) => {
                    let query = sqlx::query(&statement.sqlite_then_stage_and_commit).bind(jsonb::array(&rows)?);
                    bind_stage(query, &envelopes)?.fetch_all(&mut writer.conn).await?
                }
            };
            writer.open = false;
            with_seqs(envelopes, returned)
        }
        mut tx => {
            write_rows(&mut tx, rows).await?;
            let staged = stage(&mut tx, envelopes).await?;
            tx.commit().await?;
            Ok(staged)
        }
    }
}

/// SQLite's statement of [`stage`], its two parameters named, a macro for `concat!`.
macro_rules! sqlite_stage_sql {
    ($rows:literal, $now:literal) => {
        concat!(
            sqlite_given!($rows),
            " INSERT INTO sluice_outbox (event_id, routing_key, type_name, correlation_id, occurred_at, traceparent, tracestate, body, created_at) \
             SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, r ->> 4, r ->> 5, r ->> 6, unhex(r ->> 7), ",
            $now,
            " FROM given RETURNING seq, event_id"
        )
    };
}
use sqlite_stage_sql;

/// `query` with the two parameters of SQLite's outbox insert bound next: `envelopes` (as JSONB,
/// each a row of its columns, written straight from its fields) and the time.
fn bind_stage<'q>(
    query: Query<'q, sqlx::Any, AnyArguments<'q>>,
    envelopes: &[Envelope],
) -> Result<Query<'q, sqlx::Any, AnyArguments<'q>>, sqlx::Error> {
    let mut rows = jsonb::Jsonb::default();
    rows.begin_array();
    for e in envelopes {
        rows.begin_array()
            .text(&e.event_id)
            .text(&e.routing_key)
            .text(&e.type_name)
            .text_or_null(e.correlation_id.as_deref())
            .text(&crate::bus::headers::rfc3339(&e.occurred_at))
            .text_or_null(e.trace.traceparent.as_deref())
            .text_or_null(e.trace.tracestate.as_deref())
            .text(&hex::encode(&e.body))
            .end();
    }
    Ok(query.bind(rows.finish()?).bind(unix_millis()))
}

/// Pairs each envelope with the `seq` of its row, from the insert's `RETURNING seq, event_id`
/// (which promises no order: matched by `event_id`, unique in the outbox).
fn with_seqs(envelopes: Vec<Envelope>, rows: Vec<AnyRow>) -> Result<Vec<Staged>, sqlx::Error> {
    let mut seqs = HashMap::with_capacity(rows.len());
    for row in rows {
        seqs.insert(row.try_get::<String, _>("event_id")?, row.try_get::<i64, _>("seq")?);
    }
    envelopes
        .into_iter()
        .map(|envelope| match seqs.get(&envelope.event_id) {
            Some(seq) => Ok((*seq, envelope)),
            None => Err(sqlx::Error::Protocol(format!("the outbox insert returned no seq for event {}", envelope.event_id))),
        })
        .collect()
}

/// A JSON array, bound as one parameter of the statements that take many values: SQLite's
/// (`json_each`) for ids, PostgreSQL's for [`Rows`] (SQLite's take JSONB, see `jsonb.rs`).
/// Their text is then the same whatever the number of rows, so SQLite prepares each once and
/// sqlx's statement cache keeps it; with one `$n` per cell, every batch size
/// was a statement of its own, parsed again whenever the cache had let it go, and SQLite
/// resolves `$n` names by a linear search, so a statement of n cells cost n² to prepare and
/// bind. PostgreSQL's inbox and outbox keep multi-row statements (sqlx's `Any` driver binds
/// no arrays).
fn json_array<T: Into<serde_json::Value>>(values: impl IntoIterator<Item = T>) -> String {
    serde_json::Value::Array(values.into_iter().map(Into::into).collect()).to_string()
}

/// `($1, $2), ($3, $4)`: the VALUES of a multi-row INSERT of `rows` rows of `columns` columns,
/// numbered the way both SQLite and PostgreSQL accept.
pub fn placeholders(rows: usize, columns: usize) -> String {
    let row = |r: usize| {
        let cells: Vec<String> = (1..=columns).map(|c| format!("${}", r * columns + c)).collect();
        format!("({})", cells.join(", "))
    };
    (0..rows).map(row).collect::<Vec<_>>().join(", ")
}

/// `($first, $first+1, ...)`: a list of `count` placeholders for `IN`, after `first - 1`
/// other parameters.
fn placeholders_from(first: usize, count: usize) -> String {
    let cells: Vec<String> = (first..first + count).map(|n| format!("${n}")).collect();
    format!("({})", cells.join(", "))
}

/// The settings of every SQLite connection.
async fn sqlite_pragmas(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    for pragma in ["PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=5000", "PRAGMA foreign_keys=ON", "PRAGMA temp_store=MEMORY"] {
        sqlx::query(pragma).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// SQLite creates the file (`mode=rwc`) but not its directory.
fn create_parent_dir(url: &str) {
    let path = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path == ":memory:" {
        return;
    }
    if let Some(parent) = std::path::Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::{placeholders, placeholders_from};

    #[test]
    fn placeholders_number_every_cell_once_row_by_row() {
        assert_eq!(placeholders(1, 1), "($1)");
        assert_eq!(placeholders(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders(0, 3), "");
        assert_eq!(placeholders_from(2, 3), "($2, $3, $4)");
    }
}
