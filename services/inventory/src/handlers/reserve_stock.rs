//! Reserves the stock of a new order, or rejects the order when any line is short.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::{InventoryRejected, InventoryReserved, OrderCreated};

use crate::stock::{self, Reservation};

/// `order.created` → `inventory.reserved` | `inventory.rejected`.
#[derive(Debug, Default)]
pub struct ReserveStock;

impl Handler<OrderCreated> for ReserveStock {
    async fn handle(&self, order: OrderCreated, ctx: &mut Context) -> Result<(), HandlerError> {
        if order.order_id.is_empty() || order.items.is_empty() || order.items.iter().any(|i| i.quantity == 0) {
            return Err(HandlerError::reject("order has no id, no items or a zero quantity"));
        }
        let items = stock::merge(&order.items);
        match stock::reserve(ctx.db(), &order.order_id, &items).await? {
            Reservation::Reserved(lines) => {
                let total_cents = lines.iter().map(|l| l.line_total_cents).sum();
                tracing::info!(order_id = %order.order_id, total_cents, "stock reserved");
                ctx.emit(InventoryReserved { order_id: order.order_id, customer_id: order.customer_id, lines, total_cents });
            }
            Reservation::Unavailable(skus) => {
                tracing::info!(order_id = %order.order_id, ?skus, "order rejected: insufficient stock");
                ctx.emit(InventoryRejected {
                    order_id: order.order_id,
                    customer_id: order.customer_id,
                    reason: format!("insufficient stock for {}", skus.join(", ")),
                    unavailable_skus: skus,
                });
            }
        }
        Ok(())
    }
}
