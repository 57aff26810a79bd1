//! The inbox's retention: a handled event's record (`sluice_inbox`) is what makes its
//! redelivery a no-op, and it is needed only as long as a redelivery or a replay can come.
//! Every consumer prunes the records older than [`BusConfig::inbox_retention`] at start and
//! then every tenth of it (at most a minute apart), so the table holds about the retention's
//! worth of deliveries instead of every delivery ever handled.
//!
//! [`BusConfig::inbox_retention`]: crate::config::BusConfig::inbox_retention

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// How often the inbox is pruned for `retention`.
fn every(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Prunes the inbox of `service` until `stop`. A failure (the database busy or gone) is logged
/// and tried again at the next turn; nothing else depends on it.
pub(crate) async fn run(store: Store, service: String, retention: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every(retention));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.prune_inbox(retention).await {
            Ok(0) => {}
            Ok(pruned) => {
                crate::metrics::metrics().inbox_pruned.inc_by(pruned);
                tracing::debug!(%service, pruned, ?retention, "pruned the inbox");
            }
            Err(error) => tracing::warn!(%service, %error, "pruning the inbox; will try again"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_week_is_pruned_every_minute_and_seconds_every_tenth() {
        assert_eq!(every(Duration::from_secs(7 * 24 * 3600)), Duration::from_secs(60));
        assert_eq!(every(Duration::from_secs(3)), Duration::from_millis(300));
        assert_eq!(every(Duration::from_millis(10)), Duration::from_millis(100));
    }
}
