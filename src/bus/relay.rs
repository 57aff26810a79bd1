//! The outbox relay: publishes events that handlers staged in `sluice_outbox`, with confirms,
//! and deletes each row only after the broker confirmed it. A crash between the two publishes
//! the row again on restart; consumers' inboxes absorb the duplicate.

use std::time::Duration;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::{Publisher, connection::Backoff};
use crate::store::Store;

/// Rows per batch; a batch is published pipelined, then deleted in one transaction.
const BATCH: i64 = 256;
/// Poll interval when nothing wakes the relay (rows left by a crash, another process).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Runs until `stop`, then drains what is left once more.
pub(crate) async fn run(store: Store, publisher: Publisher, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let healthy = drain(&store, &publisher).await;
        if stop.is_cancelled() {
            return;
        }
        let wait = if healthy {
            backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            IDLE_POLL
        } else {
            backoff.next_delay()
        };
        tokio::select! {
            _ = stop.cancelled() => { drain(&store, &publisher).await; return; }
            _ = store.outbox_ready() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Publishes every pending row; `false` if something failed (retry after a backoff).
async fn drain(store: &Store, publisher: &Publisher) -> bool {
    loop {
        let rows = match store.pending(BATCH).await {
            Ok(rows) => rows,
            Err(error) => {
                tracing::warn!(%error, "reading the outbox");
                return false;
            }
        };
        if rows.is_empty() {
            return true;
        }
        let full = rows.len() as i64 == BATCH;
        let results = join_all(rows.iter().map(|(_, envelope)| publisher.publish_envelope(envelope))).await;
        let mut sent = Vec::with_capacity(rows.len());
        let mut failed = false;
        for ((seq, envelope), result) in rows.iter().zip(results) {
            match result {
                Ok(()) => sent.push(*seq),
                Err(error) => {
                    failed = true;
                    tracing::warn!(%error, event_id = %envelope.event_id, routing_key = %envelope.routing_key, "outbox publish failed; will retry");
                }
            }
        }
        if let Err(error) = store.mark_sent(&sent).await {
            tracing::warn!(%error, "marking outbox rows sent; they will be published again");
            return false;
        }
        if failed {
            return false;
        }
        if !full {
            return true;
        }
    }
}
