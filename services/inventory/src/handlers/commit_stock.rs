//! Turns a paid order's reservation into a sale.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::PaymentCaptured;

use crate::stock;

/// `payment.captured`: the reserved units leave the warehouse's books.
#[derive(Debug, Default)]
pub struct CommitStock;

impl Handler<PaymentCaptured> for CommitStock {
    async fn handle(&self, captured: PaymentCaptured, ctx: &mut Context) -> Result<(), HandlerError> {
        let items = stock::end_reservation(ctx.db(), &captured.order_id, false).await?;
        tracing::info!(order_id = %captured.order_id, lines = items.len(), "stock committed");
        Ok(())
    }
}
