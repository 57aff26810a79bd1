//! Projects every lifecycle event into the order read model.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::PricedLine;
use sluice::pb::OrderStatus;
use sluice::store::Backend;
use sqlx::Row;
use std::sync::LazyLock;

use crate::lifecycle::{self, Lifecycle};

/// One handler type for every lifecycle event; each event type gets its own queue,
/// `orders.track-<routing key>` (e.g. `orders.track-order-created`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Projector;

impl<E: Lifecycle> Handler<E> for Projector {
    fn name(&self) -> String {
        format!("track-{}", E::ROUTING_KEY.replace('.', "-"))
    }

    async fn handle(&self, event: E, ctx: &mut Context) -> Result<(), HandlerError> {
        let order_id = event.order().to_owned();
        if order_id.is_empty() {
            return Err(HandlerError::reject("event has no order id"));
        }
        let change = event.change();
        let now = sluice::store::unix_millis();
        let occurred_at = {
            let t = &ctx.meta().occurred_at;
            t.seconds.saturating_mul(1_000_000).saturating_add(i64::from(t.nanos / 1_000))
        };
        // One round trip (see `APPLY_SQLITE`) for the order's row, the event's history row and
        // its priced lines, if it has any. The row is created on the first event of the order, or
        // updated under the row's lock, so events of one order projected concurrently (from
        // different queues, on PostgreSQL) apply one after the other. The status is the strongest
        // one implied by any event seen (see `lifecycle::rank`): the row already holds the
        // strongest so far, so the new one is whichever of the two ranks higher.
        let implied = change.implied.unwrap_or(OrderStatus::Unspecified);
        let (total, has_total) = change.lines.as_ref().map_or((0, 0), |(_, total)| (*total, 1));
        let (reason, has_reason) = change.reason.as_deref().map_or(("", 0), |r| (r, 1));
        let event_id = ctx.meta().event_id.clone();
        let apply: &str = match ctx.backend() {
            Backend::Sqlite => &APPLY_SQLITE,
            Backend::Postgres => &APPLY_POSTGRES,
        };
        let status: i64 = sqlx::query(apply)
            .bind(&order_id)
            .bind(&change.customer_id)
            .bind(i64::from(implied as i32))
            .bind(total)
            .bind(reason)
            .bind(now)
            .bind(has_total)
            .bind(has_reason)
            .bind(i64::from(lifecycle::rank(implied)))
            .bind(&event_id)
            .bind(E::ROUTING_KEY)
            .bind(occurred_at)
            .bind(&change.detail)
            .bind(lines_json(change.lines.as_ref().map_or(&[][..], |(lines, _)| lines)))
            // Not `fetch_one`: sqlx's `Any` SQLite driver takes the first result of a query,
            // here the upsert's, and would find no row.
            .fetch_all(ctx.db())
            .await?
            .first()
            .ok_or(sqlx::Error::RowNotFound)?
            .try_get("status")?;
        let status = status_of(status);
        tracing::info!(order_id = %order_id, event = E::ROUTING_KEY, status = status.as_str_name(), "order updated");
        Ok(())
    }
}

/// Creates or updates an order's row. `$9` is the rank of the status the event implies (`$3`);
/// the CASE is `lifecycle::rank` of the stored status.
static UPSERT_ORDER: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO orders (order_id, customer_id, status, total_cents, reason, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (order_id) DO UPDATE SET \
         customer_id = CASE WHEN orders.customer_id = '' THEN excluded.customer_id ELSE orders.customer_id END, \
         status = CASE WHEN $9 > {} THEN excluded.status ELSE orders.status END, \
         total_cents = CASE WHEN $7 = 1 THEN excluded.total_cents ELSE orders.total_cents END, \
         reason = CASE WHEN $8 = 1 THEN excluded.reason ELSE orders.reason END, \
         updated_at = excluded.updated_at",
        lifecycle::rank_sql("orders.status")
    )
});

/// The history row of the event (`$10`, routing key `$11`, occurred at `$12`, detail `$13`),
/// with the order's status after it, read from `source`'s `status` where `condition` holds.
fn insert_history(source: &str, condition: &str) -> String {
    // (The WHERE also keeps SQLite from reading ON CONFLICT as a join's ON.)
    format!(
        "INSERT INTO order_history (event_id, order_id, event, implied, status, occurred_at, detail) \
         SELECT $10, $1, $11, $3, status, $12, $13 FROM {source} WHERE {condition} ON CONFLICT (event_id) DO NOTHING"
    )
}

/// The priced lines (`$14`, a JSON array of `[sku, name, quantity, unit price, line total]`),
/// created or replaced.
fn upsert_lines(source: &str) -> String {
    format!(
        "INSERT INTO order_lines (order_id, sku, name, quantity, unit_price_cents, line_total_cents) {source} \
         ON CONFLICT (order_id, sku) DO UPDATE SET name = excluded.name, quantity = excluded.quantity, \
         unit_price_cents = excluded.unit_price_cents, line_total_cents = excluded.line_total_cents"
    )
}

/// An event applied in one round trip to the database: the order's row upserted, the event's
/// history row and its lines written, and the order's status returned. On SQLite, four
/// statements in one query (sqlx runs them on its worker thread in one go; `$n` names the same
/// argument in each); on PostgreSQL, which prepares one statement at a time, one statement with
/// data-modifying CTEs. (Every statement sent to sqlx's SQLite worker thread costs two thread
/// switches: one fewer per event took this service from 0.45 to 0.41 cores end to end, and
/// the lines' own statement was one more per order, docs/benchmarks.md.)
static APPLY_SQLITE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{}; {}; {}; SELECT status FROM orders WHERE order_id = $1",
        *UPSERT_ORDER,
        insert_history("orders", "order_id = $1"),
        // (The WHERE keeps SQLite from reading ON CONFLICT as a join's ON.)
        upsert_lines("SELECT $1, value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 FROM json_each($14) WHERE true")
    )
});
static APPLY_POSTGRES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH applied AS ({} RETURNING status), history AS ({}), lines AS ({}) SELECT status FROM applied",
        *UPSERT_ORDER,
        insert_history("applied", "true"),
        upsert_lines(
            "SELECT $1, line ->> 0, line ->> 1, (line ->> 2)::BIGINT, (line ->> 3)::BIGINT, (line ->> 4)::BIGINT \
             FROM json_array_elements($14::JSON) AS l(line)"
        )
    )
});

/// `lines` as the JSON array `$14` of the apply statements.
fn lines_json(lines: &[PricedLine]) -> String {
    let rows = lines.iter().map(|l| serde_json::json!([l.sku, l.name, l.quantity, l.unit_price_cents, l.line_total_cents]));
    serde_json::Value::Array(rows.collect()).to_string()
}

/// A stored status number back to the enum (unknown numbers read as unspecified).
pub fn status_of(value: i64) -> OrderStatus {
    i32::try_from(value).ok().and_then(|v| OrderStatus::try_from(v).ok()).unwrap_or(OrderStatus::Unspecified)
}

#[cfg(test)]
mod tests {
    use sluice::bus::Context;
    use sluice::events::{
        InventoryRejected, InventoryReserved, NotificationKind, NotificationSent, OrderCreated, PaymentCaptured, PaymentDeclined,
    };
    use sluice::store::Store;

    use super::*;

    const ORDER: &str = "o-1";

    /// A fresh in-memory database, migrated, and one transaction over it.
    async fn fresh() -> (Store, Context) {
        let store = Store::connect("sqlite::memory:", crate::MIGRATIONS).await.unwrap();
        let ctx = Context::for_test(&store, "e-1").await.unwrap();
        (store, ctx)
    }

    async fn apply<E: Lifecycle>(ctx: &mut Context, event: E) {
        Handler::<E>::handle(&Projector, event, ctx).await.unwrap();
    }

    async fn status(ctx: &mut Context) -> OrderStatus {
        let row = sqlx::query("SELECT status FROM orders WHERE order_id = $1").bind(ORDER).fetch_one(ctx.db()).await.unwrap();
        status_of(row.try_get("status").unwrap())
    }

    fn created() -> OrderCreated {
        OrderCreated { order_id: ORDER.into(), customer_id: "c-1".into(), ..Default::default() }
    }
    fn reserved() -> InventoryReserved {
        InventoryReserved { order_id: ORDER.into(), ..Default::default() }
    }
    fn paid() -> PaymentCaptured {
        PaymentCaptured { order_id: ORDER.into(), ..Default::default() }
    }
    fn notified() -> NotificationSent {
        NotificationSent { order_id: ORDER.into(), kind: NotificationKind::OrderConfirmed.into(), ..Default::default() }
    }

    /// The upsert keeps the strongest status implied so far (`lifecycle::rank`), whatever
    /// order the events of an order arrive in.
    #[tokio::test]
    async fn the_status_is_the_strongest_implied_whatever_the_arrival_order() {
        use OrderStatus::*;
        let (_store, mut ctx) = fresh().await;
        apply(&mut ctx, reserved()).await;
        apply(&mut ctx, created()).await;
        assert_eq!(status(&mut ctx).await, Reserved);

        let (_store, mut ctx) = fresh().await;
        apply(&mut ctx, notified()).await;
        apply(&mut ctx, created()).await;
        apply(&mut ctx, paid()).await;
        apply(&mut ctx, reserved()).await;
        assert_eq!(status(&mut ctx).await, Completed);

        let (_store, mut ctx) = fresh().await;
        apply(&mut ctx, PaymentDeclined { order_id: ORDER.into(), ..Default::default() }).await;
        apply(&mut ctx, reserved()).await;
        apply(&mut ctx, created()).await;
        assert_eq!(status(&mut ctx).await, Declined);

        let (_store, mut ctx) = fresh().await;
        apply(&mut ctx, created()).await;
        apply(&mut ctx, InventoryRejected { order_id: ORDER.into(), ..Default::default() }).await;
        assert_eq!(status(&mut ctx).await, Rejected);
    }
}
