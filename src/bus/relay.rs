//! The outbox relay: publishes events that handlers staged in `sluice_outbox`, with confirms,
//! and deletes each row only after the broker confirmed it. A crash between the two publishes
//! the row again on restart; consumers' inboxes absorb the duplicate.
//!
//! A transaction that commits outbox rows hands them to the relay in memory
//! ([`Store::committed`]), so the usual row is never read back. Confirmed rows are deleted
//! together, up to [`BATCH`] at a time or before the next scan, so a row costs a share of one
//! statement. The table itself is read (a scan) at start, once a second, after a failure and
//! at shutdown: it finds the rows that memory does not hold (left by a crash or a failed
//! publish, or written by another process). A crash so publishes again the rows confirmed
//! since the last delete (less than a second's worth, and fewer than 2 x [`BATCH`]); the
//! consumers' inboxes absorb them.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::{Publisher, connection::Backoff};
use crate::store::{Staged, Store};

/// Rows per batch; a batch is published pipelined, then deleted in one statement.
const BATCH: usize = 256;
/// How often the table is scanned while all goes well.
const SCAN_EVERY: Duration = Duration::from_secs(1);

/// Runs until `stop`, then publishes what is left once more and deletes what was confirmed.
pub(crate) async fn run(store: Store, publisher: Publisher, stop: CancellationToken) {
    let mut relay = Relay { store, publisher, scanned: HashSet::new(), confirmed: Vec::new() };
    let fresh = || Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut backoff = fresh();
    let mut scan_at = Instant::now();
    loop {
        let scan = Instant::now() >= scan_at;
        let healthy = relay.publish_all(scan).await;
        if stop.is_cancelled() {
            relay.publish_all(true).await;
            return;
        }
        if healthy {
            backoff = fresh();
            if scan {
                scan_at = Instant::now() + SCAN_EVERY;
            }
        } else {
            // What failed is in the table: the next scan, after a back-off, retries it.
            scan_at = Instant::now() + backoff.next_delay();
        }
        tokio::select! {
            _ = stop.cancelled() => { relay.publish_all(true).await; return; }
            _ = relay.store.outbox_ready() => {}
            _ = tokio::time::sleep_until(scan_at.into()) => {}
        }
    }
}

struct Relay {
    store: Store,
    publisher: Publisher,
    /// The rows the last scan read. A row committed while a scan ran can be both read by it
    /// and handed over in memory afterwards: this keeps it from being published twice.
    scanned: HashSet<i64>,
    /// Rows the broker confirmed, still to be deleted.
    confirmed: Vec<i64>,
}

impl Relay {
    /// Publishes the rows handed over in memory, then, if `scan`, every row in the table.
    /// `false` if something failed (the rows that did are in the table).
    async fn publish_all(&mut self, scan: bool) -> bool {
        let committed: Vec<Staged> = self.store.take_committed().into_iter().filter(|(seq, _)| !self.scanned.contains(seq)).collect();
        for batch in committed.chunks(BATCH) {
            if !self.publish(batch).await {
                // The rest of memory is in the table too, for the scan that follows a failure.
                self.store.take_committed();
                return false;
            }
        }
        if !scan {
            return true;
        }
        // A confirmed row must be gone before a scan reads the table, or it is published again.
        if !self.delete_confirmed().await {
            return false;
        }
        self.scanned.clear();
        loop {
            let rows = match self.store.pending(BATCH as i64).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(%error, "reading the outbox");
                    return false;
                }
            };
            self.scanned.extend(rows.iter().map(|(seq, _)| *seq));
            if !self.publish(&rows).await || !self.delete_confirmed().await {
                return false;
            }
            if rows.len() < BATCH {
                return true;
            }
        }
    }

    /// Publishes `rows` pipelined and keeps the ones the broker confirmed for deletion (done
    /// here once [`BATCH`] have gathered); `false` if any publish or the delete failed.
    async fn publish(&mut self, rows: &[Staged]) -> bool {
        if rows.is_empty() {
            return true;
        }
        let results = join_all(rows.iter().map(|(_, envelope)| self.publisher.publish_envelope(envelope))).await;
        let mut failed = false;
        for ((seq, envelope), result) in rows.iter().zip(results) {
            match result {
                Ok(()) => self.confirmed.push(*seq),
                Err(error) => {
                    failed = true;
                    tracing::warn!(%error, event_id = %envelope.event_id, routing_key = %envelope.routing_key, "outbox publish failed; will retry");
                }
            }
        }
        if self.confirmed.len() >= BATCH && !self.delete_confirmed().await {
            return false;
        }
        !failed
    }

    /// Deletes the confirmed rows; `false` (and they are kept, to try again) if that failed.
    async fn delete_confirmed(&mut self) -> bool {
        if let Err(error) = self.store.mark_sent(&self.confirmed).await {
            tracing::warn!(%error, "deleting confirmed outbox rows; will try again");
            return false;
        }
        self.confirmed.clear();
        true
    }
}
