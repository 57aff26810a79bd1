//! Bus transactions: the one a batch of deliveries (or a single delivery) runs in.
//!
//! On PostgreSQL they are sqlx's own, on a pooled connection. On SQLite they run on a
//! connection the store keeps for them (the writer), with `BEGIN` and `COMMIT` sent by the bus.
//! sqlx runs every SQLite statement on a worker thread, so each query is a round trip between
//! two threads; here `BEGIN` travels in one query with the inbox claim and `COMMIT` with the
//! outbox insert, and the connection never goes back to a pool (sqlx's pool pings every
//! connection it takes back: one more round trip). A transaction costs two round trips around
//! its handlers instead of five.

use std::{
    ops::{Deref, DerefMut},
    sync::Arc,
};

use sqlx::{Any, AnyConnection, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// The SQLite connection bus transactions run on, shared by the store's clones.
pub(crate) type SharedWriter = Arc<Mutex<Writer>>;

/// See [`SharedWriter`].
#[derive(Debug)]
pub(crate) struct Writer {
    pub(super) conn: AnyConnection,
    /// A transaction was begun and is not yet committed. If its [`Tx`] is dropped (an error,
    /// a panicking handler, a cancelled future, a duplicate), a task rolls it back, or the
    /// connection's next user does, whichever locks it first.
    pub(super) open: bool,
}

impl Writer {
    pub(super) fn shared(conn: AnyConnection) -> SharedWriter {
        Arc::new(Mutex::new(Self { conn, open: false }))
    }
}

/// Waits for the writer, and rolls back what a dropped [`Tx`] left open.
pub(super) async fn lock(writer: &SharedWriter) -> OwnedMutexGuard<Writer> {
    let mut guard = writer.clone().lock_owned().await;
    if guard.open {
        // SQLite may have rolled back already (some errors end the transaction): then this
        // fails with "no transaction is active", which is what was wanted.
        if let Err(error) = sqlx::query("ROLLBACK").execute(&mut guard.conn).await {
            tracing::debug!(%error, "rolling back a transaction left open");
        }
        guard.open = false;
    }
    guard
}

/// A bus transaction; dropping it without [`Tx::commit`] rolls it back.
#[derive(Debug)]
pub(crate) enum Tx {
    /// sqlx's transaction on a pooled connection (PostgreSQL, and handler unit tests).
    Pooled(Transaction<'static, Any>),
    /// On the SQLite writer, begun by the bus.
    Held(Held),
}

/// The writer, locked for a transaction (see [`Writer::open`]).
#[derive(Debug)]
pub(crate) struct Held(OwnedMutexGuard<Writer>);

impl Held {
    /// Locks the writer for a transaction about to begin. It counts as open from here, so that
    /// a failure after `BEGIN` was sent is rolled back.
    pub(super) async fn lock(writer: &SharedWriter) -> Self {
        let mut writer = lock(writer).await;
        writer.open = true;
        Self(writer)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.0.open {
            return;
        }
        // Now, as sqlx does for its own transactions, rather than at the next transaction:
        // until then the file's write lock would stay taken. The task gets the writer once
        // this guard is gone.
        let shared = OwnedMutexGuard::mutex(&self.0).clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { drop(lock(&shared).await) });
        }
    }
}

impl Deref for Held {
    type Target = Writer;

    fn deref(&self) -> &Writer {
        &self.0
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Writer {
        &mut self.0
    }
}

impl Tx {
    /// Begins a transaction on the writer. `IMMEDIATE` takes the write lock now, so that no
    /// statement of the transaction has to wait for it (another connection of the file, such
    /// as the pool's, may write).
    pub(super) async fn begin_held(writer: &SharedWriter) -> Result<Self, sqlx::Error> {
        let mut held = Held::lock(writer).await;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut held.conn).await?;
        Ok(Self::Held(held))
    }

    /// Commits.
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Pooled(tx) => tx.commit().await,
            Self::Held(mut writer) => {
                sqlx::query("COMMIT").execute(&mut writer.conn).await?;
                writer.open = false;
                Ok(())
            }
        }
    }
}

impl Deref for Tx {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match self {
            Self::Pooled(tx) => tx,
            Self::Held(writer) => &writer.conn,
        }
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            Self::Pooled(tx) => tx,
            Self::Held(writer) => &mut writer.conn,
        }
    }
}
