//! Answers `GetOrderRequest` from the read model (the gateway's GetOrder, over request/reply).

use sluice::bus::{BoxError, Responder};
use sluice::events::PricedLine;
use sluice::pb::{GetOrderReply, GetOrderRequest, Order, OrderHistoryEntry, OrderStatus};
use sqlx::{AnyPool, Row};

use crate::{lifecycle::rank, projector::status_of};

/// Reads one order with its lines and history.
#[derive(Debug, Clone)]
pub struct GetOrder {
    pool: AnyPool,
}

impl GetOrder {
    /// Answers from `pool`.
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }
}

impl Responder<GetOrderRequest> for GetOrder {
    async fn respond(&self, request: GetOrderRequest) -> Result<GetOrderReply, BoxError> {
        let Some(row) = sqlx::query("SELECT customer_id, status, total_cents, reason FROM orders WHERE order_id = $1")
            .bind(&request.order_id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(GetOrderReply { order: None });
        };
        let lines = sqlx::query(
            "SELECT sku, name, quantity, unit_price_cents, line_total_cents FROM order_lines WHERE order_id = $1 ORDER BY sku",
        )
        .bind(&request.order_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| {
            Ok::<_, sqlx::Error>(PricedLine {
                sku: r.try_get("sku")?,
                name: r.try_get("name")?,
                quantity: u32::try_from(r.try_get::<i64, _>("quantity")?).unwrap_or(u32::MAX),
                unit_price_cents: r.try_get("unit_price_cents")?,
                line_total_cents: r.try_get("line_total_cents")?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
        let mut history = sqlx::query(
            "SELECT event_id, event, implied, status, occurred_at, detail FROM order_history WHERE order_id = $1 ORDER BY occurred_at, event_id",
        )
        .bind(&request.order_id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|r| {
            let micros: i64 = r.try_get("occurred_at")?;
            let implied: i64 = r.try_get("implied")?;
            Ok::<_, sqlx::Error>((
                implied,
                OrderHistoryEntry {
                    event: r.try_get("event")?,
                    event_id: r.try_get("event_id")?,
                    status: status_of(r.try_get("status")?) as i32,
                    occurred_at: Some(prost_types::Timestamp {
                        seconds: micros.div_euclid(1_000_000),
                        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
                    }),
                    detail: r.try_get("detail")?,
                },
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
        in_lifecycle_order(&mut history);
        Ok(GetOrderReply {
            order: Some(Order {
                order_id: request.order_id,
                status: status_of(row.try_get("status")?) as i32,
                lines,
                total_cents: row.try_get("total_cents")?,
                history: history.into_iter().map(|(_, e)| e).collect(),
                customer_id: row.try_get("customer_id")?,
                reason: row.try_get("reason")?,
            }),
        })
    }
}

/// Sorts an order's history (each entry with the status number its event implies, 0 for none)
/// into lifecycle order, and gives each entry the order's status right after it in that order.
///
/// Clocks of different services may disagree by a little: within the same instant, lifecycle
/// order decides. The status stored with an entry is the one after its event was *projected*,
/// and the orders service projects the events of one order from different queues, in whatever
/// order they arrive: a `payment.captured` projected before its `inventory.reserved` would show
/// PAID on both. The status after each event in lifecycle order is the strongest one implied
/// so far (`lifecycle::rank`), as the order's own status is the strongest one implied by all.
fn in_lifecycle_order(history: &mut [(i64, OrderHistoryEntry)]) {
    history.sort_by(|(ia, a), (ib, b)| {
        let key = |e: &OrderHistoryEntry| e.occurred_at.as_ref().map(|t| (t.seconds, t.nanos / 1_000_000));
        key(a).cmp(&key(b)).then(ia.cmp(ib))
    });
    let mut current = OrderStatus::Unspecified;
    for (implied, entry) in history.iter_mut() {
        let implied = status_of(*implied);
        if rank(implied) > rank(current) {
            current = implied;
        }
        // An event that implies no status, before any that does, keeps the stored one.
        if current != OrderStatus::Unspecified {
            entry.status = current as i32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The history of `(event, occurred at, implied, stored)` as GetOrder shows it: each event
    /// with its status.
    fn shown(entries: &[(&'static str, i64, OrderStatus, OrderStatus)]) -> Vec<(String, OrderStatus)> {
        let mut history: Vec<(i64, OrderHistoryEntry)> = entries
            .iter()
            .map(|&(event, seconds, implied, stored)| {
                let occurred_at = Some(prost_types::Timestamp { seconds, nanos: 0 });
                (i64::from(implied as i32), OrderHistoryEntry { event: event.into(), status: stored as i32, occurred_at, ..Default::default() })
            })
            .collect();
        in_lifecycle_order(&mut history);
        history.into_iter().map(|(_, e)| (e.event.clone(), e.status())).collect()
    }

    #[test]
    fn each_entry_shows_the_status_after_it_in_lifecycle_order_whatever_the_projection_order() {
        use OrderStatus::*;
        // payment.captured was projected before inventory.reserved: both were stored as PAID.
        let history = shown(&[
            ("notification.sent", 4, Completed, Completed),
            ("payment.captured", 3, Paid, Paid),
            ("inventory.reserved", 2, Reserved, Paid),
            ("order.created", 1, Pending, Pending),
        ]);
        let expected = [("order.created", Pending), ("inventory.reserved", Reserved), ("payment.captured", Paid), ("notification.sent", Completed)];
        assert_eq!(history, expected.map(|(e, s)| (e.to_owned(), s)));
    }

    #[test]
    fn an_event_that_implies_no_status_shows_the_one_before_it() {
        use OrderStatus::*;
        let history = shown(&[
            ("order.created", 1, Pending, Pending),
            ("inventory.reserved", 2, Reserved, Reserved),
            ("payment.declined", 3, Declined, Declined),
            ("inventory.released", 4, Unspecified, Declined),
        ]);
        let statuses: Vec<OrderStatus> = history.into_iter().map(|(_, s)| s).collect();
        assert_eq!(statuses, [Pending, Reserved, Declined, Declined]);
    }
}
