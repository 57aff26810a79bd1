//! Remembers how to charge an order until inventory has reserved it.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::OrderCreated;

/// `order.created`: stores the customer and payment token of the order.
#[derive(Debug, Default)]
pub struct RecordPaymentDetails;

impl Handler<OrderCreated> for RecordPaymentDetails {
    async fn handle(&self, order: OrderCreated, ctx: &mut Context) -> Result<(), HandlerError> {
        if order.order_id.is_empty() {
            return Err(HandlerError::reject("order has no id"));
        }
        sqlx::query(
            "INSERT INTO payment_orders (order_id, customer_id, payment_token, received_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&order.order_id)
        .bind(&order.customer_id)
        .bind(&order.payment_token)
        .bind(sluice::store::unix_millis())
        .execute(ctx.db())
        .await?;
        Ok(())
    }
}
