//! Projects every lifecycle event into the order read model.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::pb::OrderStatus;
use sqlx::Row;

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
        // Upsert with DO UPDATE, not DO NOTHING: it locks the order's row until this transaction
        // commits, so two events of one order (projected concurrently from different queues)
        // are applied one after the other. Without the lock, on PostgreSQL each would derive
        // the status without seeing the other's history row, and the last to commit would win.
        sqlx::query(
            "INSERT INTO orders (order_id, customer_id, status, total_cents, reason, updated_at) VALUES ($1, $2, 0, 0, '', $3) \
             ON CONFLICT (order_id) DO UPDATE SET updated_at = excluded.updated_at",
        )
        .bind(&order_id)
        .bind(&change.customer_id)
        .bind(now)
        .execute(ctx.db())
        .await?;
        if !change.customer_id.is_empty() {
            sqlx::query("UPDATE orders SET customer_id = $1 WHERE order_id = $2 AND customer_id = ''")
                .bind(&change.customer_id)
                .bind(&order_id)
                .execute(ctx.db())
                .await?;
        }
        if let Some((lines, total)) = &change.lines {
            sqlx::query("DELETE FROM order_lines WHERE order_id = $1").bind(&order_id).execute(ctx.db()).await?;
            for line in lines {
                sqlx::query(
                    "INSERT INTO order_lines (order_id, sku, name, quantity, unit_price_cents, line_total_cents) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&order_id)
                .bind(&line.sku)
                .bind(&line.name)
                .bind(i64::from(line.quantity))
                .bind(line.unit_price_cents)
                .bind(line.line_total_cents)
                .execute(ctx.db())
                .await?;
            }
            sqlx::query("UPDATE orders SET total_cents = $1 WHERE order_id = $2").bind(*total).bind(&order_id).execute(ctx.db()).await?;
        }
        if let Some(reason) = &change.reason {
            sqlx::query("UPDATE orders SET reason = $1 WHERE order_id = $2").bind(reason).bind(&order_id).execute(ctx.db()).await?;
        }
        let mut implied: Vec<OrderStatus> = sqlx::query("SELECT implied FROM order_history WHERE order_id = $1")
            .bind(&order_id)
            .fetch_all(ctx.db())
            .await?
            .iter()
            .map(|row| row.try_get::<i64, _>("implied").map(status_of))
            .collect::<Result<_, _>>()?;
        implied.extend(change.implied);
        let status = lifecycle::derive(implied);
        let event_id = ctx.meta().event_id.clone();
        sqlx::query(
            "INSERT INTO order_history (event_id, order_id, event, implied, status, occurred_at, detail) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&event_id)
        .bind(&order_id)
        .bind(E::ROUTING_KEY)
        .bind(change.implied.map_or(0, |s| i64::from(s as i32)))
        .bind(i64::from(status as i32))
        .bind(occurred_at)
        .bind(&change.detail)
        .execute(ctx.db())
        .await?;
        sqlx::query("UPDATE orders SET status = $1, updated_at = $2 WHERE order_id = $3")
            .bind(i64::from(status as i32))
            .bind(now)
            .bind(&order_id)
            .execute(ctx.db())
            .await?;
        tracing::info!(order_id = %order_id, event = E::ROUTING_KEY, status = status.as_str_name(), "order updated");
        Ok(())
    }
}

/// A stored status number back to the enum (unknown numbers read as unspecified).
pub fn status_of(value: i64) -> OrderStatus {
    i32::try_from(value).ok().and_then(|v| OrderStatus::try_from(v).ok()).unwrap_or(OrderStatus::Unspecified)
}
