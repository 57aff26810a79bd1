//! Compensation: gives back the stock of an order whose payment was declined.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::{InventoryReleased, PaymentDeclined};

use crate::stock;

/// `payment.declined` → `inventory.released`.
#[derive(Debug, Default)]
pub struct ReleaseStock;

impl Handler<PaymentDeclined> for ReleaseStock {
    async fn handle(&self, declined: PaymentDeclined, ctx: &mut Context) -> Result<(), HandlerError> {
        let items = stock::release_reservation(ctx.db(), &declined.order_id).await?;
        if items.is_empty() {
            tracing::info!(order_id = %declined.order_id, "nothing reserved to release");
            return Ok(());
        }
        tracing::info!(order_id = %declined.order_id, "stock released");
        ctx.emit(InventoryReleased {
            order_id: declined.order_id,
            customer_id: declined.customer_id,
            reason: format!("payment declined: {}", declined.reason),
            items,
        });
        Ok(())
    }
}
