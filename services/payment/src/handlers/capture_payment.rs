//! Charges the customer once inventory has reserved the order.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::{InventoryReserved, PaymentCaptured, PaymentDeclined};
use sqlx::Row;

use crate::provider::{Charge, Sandbox};

/// `inventory.reserved` → `payment.captured` | `payment.declined`.
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
        let row = sqlx::query("SELECT payment_token FROM payment_orders WHERE order_id = $1")
            .bind(&reserved.order_id)
            .fetch_optional(ctx.db())
            .await?;
        // Both events come from the same order, through different queues: the reservation can
        // overtake the order itself. Wait for it rather than guess.
        let Some(row) = row else {
            return Err(HandlerError::retry(format!("payment details of order {} not received yet", reserved.order_id)));
        };
        let token: String = row.try_get("payment_token")?;
        let charge = self.provider.charge(&reserved.order_id, &token, reserved.total_cents);
        let (status, payment_id, reason) = match &charge {
            Charge::Captured { payment_id } => ("captured", payment_id.clone(), String::new()),
            Charge::Declined { reason } => ("declined", String::new(), reason.clone()),
        };
        sqlx::query(
            "INSERT INTO payments (order_id, payment_id, status, amount_cents, reason, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&reserved.order_id)
        .bind(&payment_id)
        .bind(status)
        .bind(reserved.total_cents)
        .bind(&reason)
        .bind(sluice::store::unix_millis())
        .execute(ctx.db())
        .await?;
        match charge {
            Charge::Captured { payment_id } => {
                tracing::info!(order_id = %reserved.order_id, amount_cents = reserved.total_cents, "payment captured");
                ctx.emit(PaymentCaptured {
                    order_id: reserved.order_id,
                    customer_id: reserved.customer_id,
                    payment_id,
                    amount_cents: reserved.total_cents,
                });
            }
            Charge::Declined { reason } => {
                tracing::info!(order_id = %reserved.order_id, %reason, "payment declined");
                ctx.emit(PaymentDeclined {
                    order_id: reserved.order_id,
                    customer_id: reserved.customer_id,
                    reason,
                    amount_cents: reserved.total_cents,
                });
            }
        }
        Ok(())
    }
}
