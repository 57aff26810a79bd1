//! Charges the customer once inventory has reserved the order.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::InventoryReserved;
use sqlx::Row;

use super::{Bill, charge};
use crate::provider::Sandbox;

/// `inventory.reserved` → `payment.captured` | `payment.declined`, now if the order's payment
/// details are known, else when they arrive (see the module above).
#[derive(Debug, Default)]
pub struct CapturePayment {
    provider: Sandbox,
}

impl CapturePayment {
    /// Charges through `provider`.
    pub fn new(provider: Sandbox) -> Self {
        Self { provider }
    }
}

impl Handler<InventoryReserved> for CapturePayment {
    async fn handle(&self, reserved: InventoryReserved, ctx: &mut Context) -> Result<(), HandlerError> {
        if reserved.order_id.is_empty() {
            return Err(HandlerError::reject("reservation has no order id"));
        }
        // The order's row: created here if the details have not come yet (the reservation then
        // waits in it, for their handler to charge), otherwise locked, and the charge taken if
        // no handler has taken it yet. No row comes back when one has (this order reserved
        // again, under another event id), nor for a second reservation before the details.
        let row = sqlx::query(
            "INSERT INTO payment_orders (order_id, customer_id, payment_token, received_at, has_details, reserved_first_cents) \
             VALUES ($1, $2, '', $3, 0, $4) \
             ON CONFLICT (order_id) DO UPDATE SET charged = 1 WHERE payment_orders.has_details = 1 AND payment_orders.charged = 0 \
             RETURNING has_details, payment_token",
        )
        .bind(&reserved.order_id)
        .bind(&reserved.customer_id)
        .bind(sluice::store::unix_millis())
        .bind(reserved.total_cents)
        .fetch_optional(ctx.db())
        .await?;
        let Some(row) = row else {
            tracing::warn!(order_id = %reserved.order_id, "order reserved again; this reservation changes nothing");
            return Ok(());
        };
        if row.try_get::<i64, _>("has_details")? == 0 {
            tracing::info!(order_id = %reserved.order_id, "reserved before its payment details arrived; charged when they do");
            return Ok(());
        }
        let token: String = row.try_get("payment_token")?;
        let bill = Bill { order_id: &reserved.order_id, customer_id: &reserved.customer_id, token: &token, amount_cents: reserved.total_cents };
        charge(&self.provider, bill, ctx).await
    }
}
