//! Projects every lifecycle event into the order read model.

use serde_json::json;
use sluice::bus::{Context, Handler, HandlerError, Metadata};
use sluice::pb::OrderStatus;
use sluice::store::{Rows, SQLITE_GIVEN};
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
        let row = row(&event, ctx.meta())?;
        ctx.write(&APPLY, row).await?;
        tracing::info!(order_id = event.order(), event = E::ROUTING_KEY, "order event recorded");
        Ok(())
    }
}

/// The row of [`APPLY`] for one event.
fn row<E: Lifecycle>(event: &E, meta: &Metadata) -> Result<serde_json::Value, HandlerError> {
    if event.order().is_empty() {
        return Err(HandlerError::reject("event has no order id"));
    }
    let change = event.change();
    let occurred_at = meta.occurred_at.seconds.saturating_mul(1_000_000).saturating_add(i64::from(meta.occurred_at.nanos / 1_000));
    let (lines, total) = change.lines.as_ref().map_or((&[][..], 0), |(lines, total)| (lines.as_slice(), *total));
    let lines: Vec<_> = lines.iter().map(|l| json!([l.sku, l.name, l.quantity, l.unit_price_cents, l.line_total_cents])).collect();
    Ok(json!([
        event.order(),
        change.customer_id,
        change.implied.unwrap_or(OrderStatus::Unspecified) as i32,
        total,
        change.reason.unwrap_or_default(),
        sluice::store::unix_millis(),
        meta.event_id,
        E::ROUTING_KEY,
        occurred_at,
        change.detail,
        lines,
    ]))
}

/// Applies events to the read model, for every event of a transaction at once (see
/// [`Context::write`]): the orders' rows created or updated, the events' history rows and their
/// priced lines written. Each row is `[order id, customer id, implied status, total, reason,
/// now, event id, routing key, occurred at (µs), detail, lines]`, the lines an array of
/// `[sku, name, quantity, unit price, line total]`.
///
/// An order's row is created on its first event, or updated under the row's lock, so events
/// of one order projected concurrently (from different queues, on PostgreSQL) apply one after
/// the other. Its status is the strongest implied by any event seen (`lifecycle::rank`): the row
/// already holds the strongest so far, so the new one is whichever of the two ranks higher. Its
/// customer is the first one given, its total and reason the last ones given (an event without
/// them gives 0 and ''). A history row holds the order's status after the statement.
///
/// On SQLite three statements in one query (`$1` names the same argument in each); on
/// PostgreSQL, which prepares one statement at a time, one statement with data-modifying CTEs.
/// (Every statement sent to sqlx's SQLite worker thread costs two thread switches: one per
/// event was the largest part of this service's CPU, docs/benchmarks.md.) PostgreSQL refuses
/// to update one row twice in one statement: two events of one order in one batch (of one
/// queue, so of one type: not in the reference flow) fail the batch's rows, and each event is
/// then applied on its own (see `sluice::bus::consumer`).
static APPLY: LazyLock<Rows> = LazyLock::new(|| {
    let upsert = |source: &str| {
        format!(
            "INSERT INTO orders (order_id, customer_id, status, total_cents, reason, updated_at) {source} \
             ON CONFLICT (order_id) DO UPDATE SET \
             customer_id = CASE WHEN orders.customer_id = '' THEN excluded.customer_id ELSE orders.customer_id END, \
             status = CASE WHEN {} > {} THEN excluded.status ELSE orders.status END, \
             total_cents = CASE WHEN excluded.total_cents <> 0 THEN excluded.total_cents ELSE orders.total_cents END, \
             reason = CASE WHEN excluded.reason <> '' THEN excluded.reason ELSE orders.reason END, \
             updated_at = excluded.updated_at",
            lifecycle::rank_sql("excluded.status"),
            lifecycle::rank_sql("orders.status"),
        )
    };
    let history = |source: &str| format!("INSERT INTO order_history (event_id, order_id, event, implied, status, occurred_at, detail) {source} ON CONFLICT (event_id) DO NOTHING");
    let lines = |source: &str| {
        format!(
            "INSERT INTO order_lines (order_id, sku, name, quantity, unit_price_cents, line_total_cents) {source} \
             ON CONFLICT (order_id, sku) DO UPDATE SET name = excluded.name, quantity = excluded.quantity, \
             unit_price_cents = excluded.unit_price_cents, line_total_cents = excluded.line_total_cents"
        )
    };
    // (The `WHERE true`s keep SQLite from reading ON CONFLICT as a join's ON.)
    // Each statement reads the rows through `SQLITE_GIVEN`, and the lines' statement its lines
    // through a second table of the same kind: each row and line converted once, not once per
    // mention.
    let sqlite = [
        format!("{SQLITE_GIVEN} {}", upsert("SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, r ->> 4, r ->> 5 FROM given WHERE true")),
        format!(
            "{SQLITE_GIVEN} {}",
            history(
                "SELECT e.r ->> 6, o.order_id, e.r ->> 7, e.r ->> 2, o.status, e.r ->> 8, e.r ->> 9 \
                 FROM given AS e JOIN orders AS o ON o.order_id = e.r ->> 0 WHERE true"
            )
        ),
        format!(
            "{SQLITE_GIVEN}, lined(order_id, l) AS MATERIALIZED (SELECT e.r ->> 0, jsonb(l.value) FROM given AS e, json_each(e.r, '$[10]') AS l) {}",
            lines("SELECT order_id, l ->> 0, l ->> 1, l ->> 2, l ->> 3, l ->> 4 FROM lined WHERE true")
        ),
    ]
    .join("; ");
    let postgres = format!(
        "WITH e AS (SELECT r ->> 0 AS order_id, r ->> 1 AS customer_id, (r ->> 2)::BIGINT AS implied, (r ->> 3)::BIGINT AS total, \
         r ->> 4 AS reason, (r ->> 5)::BIGINT AS now, r ->> 6 AS event_id, r ->> 7 AS event, (r ->> 8)::BIGINT AS occurred_at, \
         r ->> 9 AS detail, r -> 10 AS lines FROM json_array_elements($1::JSON) AS j(r)), \
         applied AS ({} RETURNING order_id, status), history AS ({}), lines AS ({}) SELECT 1 FROM applied WHERE false",
        upsert("SELECT order_id, customer_id, implied, total, reason, now FROM e"),
        history("SELECT e.event_id, e.order_id, e.event, e.implied, a.status, e.occurred_at, e.detail FROM e JOIN applied AS a ON a.order_id = e.order_id"),
        lines(
            "SELECT e.order_id, l ->> 0, l ->> 1, (l ->> 2)::BIGINT, (l ->> 3)::BIGINT, (l ->> 4)::BIGINT \
             FROM e, json_array_elements(e.lines) AS m(l)"
        ),
    );
    Rows::new(sqlite, postgres)
});

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
    use sluice::events::PricedLine;
    use sluice::store::{Backend, Store};
    use sqlx::Row;

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

    /// What a batch of deliveries writes: several events in one statement, here three, two of
    /// them of one order, which SQLite applies one after the other (PostgreSQL refuses that,
    /// and the bus then applies them one at a time).
    #[tokio::test]
    async fn events_written_together_apply_as_they_would_one_by_one() {
        use OrderStatus::*;
        let store = Store::connect("sqlite::memory:", crate::MIGRATIONS).await.unwrap();
        let line = PricedLine { sku: "sku-1".into(), name: "Widget".into(), quantity: 3, unit_price_cents: 500, line_total_cents: 1_500 };
        let other = InventoryReserved { order_id: "o-2".into(), customer_id: "c-2".into(), lines: vec![line], total_cents: 1_500 };
        let rows = serde_json::Value::Array(vec![
            row(&created(), &Metadata::for_test("e-1")).unwrap(),
            row(&other, &Metadata::for_test("e-2")).unwrap(),
            row(&paid(), &Metadata::for_test("e-3")).unwrap(),
        ]);
        sqlx::query(APPLY.sql(Backend::Sqlite)).bind(rows.to_string()).execute(store.pool()).await.unwrap();

        let order = async |id: &str| {
            let row = sqlx::query("SELECT customer_id, status, total_cents FROM orders WHERE order_id = $1").bind(id).fetch_one(store.pool()).await.unwrap();
            (row.try_get::<String, _>("customer_id").unwrap(), status_of(row.try_get("status").unwrap()), row.try_get::<i64, _>("total_cents").unwrap())
        };
        assert_eq!(order(ORDER).await, ("c-1".to_owned(), Paid, 0), "created, then paid: the customer of the first, the status of the second");
        assert_eq!(order("o-2").await, ("c-2".to_owned(), Reserved, 1_500));
        let lines: Vec<(String, i64)> = sqlx::query("SELECT sku, quantity FROM order_lines WHERE order_id = 'o-2'")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.try_get("sku").unwrap(), r.try_get("quantity").unwrap()))
            .collect();
        assert_eq!(lines, [("sku-1".to_owned(), 3)]);
        let history: Vec<(String, i64)> = sqlx::query("SELECT event_id, implied FROM order_history ORDER BY event_id")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.try_get("event_id").unwrap(), r.try_get("implied").unwrap()))
            .collect();
        assert_eq!(history, [("e-1".to_owned(), Pending as i64), ("e-2".to_owned(), Reserved as i64), ("e-3".to_owned(), Paid as i64)]);
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
