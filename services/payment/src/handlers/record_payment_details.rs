//! Remembers how to charge an order, and charges it if its reservation came first.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::OrderCreated;
use sqlx::Row;

use super::{Bill, charge};
use crate::provider::Sandbox;

/// `order.created`: stores the customer and payment token of the order; if inventory's
/// reservation is already waiting, → `payment.captured` | `payment.declined`.
#[derive(Debug, Default)]
pub struct RecordPaymentDetails {
    provider: Sandbox,
}

impl RecordPaymentDetails {
    /// Charges waiting reservations through `provider`.
    pub fn new(provider: Sandbox) -> Self {
        Self { provider }
    }
}

impl Handler<OrderCreated> for RecordPaymentDetails {
    async fn handle(&self, order: OrderCreated, ctx: &mut Context) -> Result<(), HandlerError> {
        if order.order_id.is_empty() {
            return Err(HandlerError::reject("order has no id"));
        }
        // Fills in the details of a row the reservation created, and takes its charge; no row
        // comes back when the details were already recorded (the same order twice), and nothing
        // more is done.
        let row = sqlx::query(
            "INSERT INTO payment_orders (order_id, customer_id, payment_token, received_at, has_details) VALUES ($1, $2, $3, $4, 1) \
             ON CONFLICT (order_id) DO UPDATE SET customer_id = excluded.customer_id, payment_token = excluded.payment_token, has_details = 1, \
             charged = 1 WHERE payment_orders.has_details = 0 \
             RETURNING reserved_first_cents",
        )
        .bind(&order.order_id)
        .bind(&order.customer_id)
        .bind(&order.payment_token)
        .bind(sluice::store::unix_millis())
        .fetch_optional(ctx.db())
        .await?;
        let waiting: Option<i64> = match &row {
            Some(row) => row.try_get("reserved_first_cents")?,
            None => None,
        };
        let Some(amount_cents) = waiting else {
            return Ok(());
        };
        let bill = Bill { order_id: &order.order_id, customer_id: &order.customer_id, token: &order.payment_token, amount_cents };
        charge(&self.provider, bill, ctx).await
    }
}
