//! Turns a paid order's reservation into a sale.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::PaymentCaptured;

use crate::stock;

/// `payment.captured`: the reserved units leave the warehouse's books. The sale is a row of
/// [`stock::COMMIT`], which the bus writes for every paid order of the batch at once.
#[derive(Debug, Default)]
pub struct CommitStock;

impl Handler<PaymentCaptured> for CommitStock {
    async fn handle(&self, captured: PaymentCaptured, ctx: &mut Context) -> Result<(), HandlerError> {
        ctx.write(&stock::COMMIT, serde_json::json!([captured.order_id])).await?;
        tracing::info!(order_id = %captured.order_id, "stock sale recorded");
        Ok(())
    }
}
