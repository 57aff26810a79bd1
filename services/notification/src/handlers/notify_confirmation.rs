//! Tells the customer their order is paid and on its way.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::{NotificationKind, PaymentCaptured};

use crate::notifications::{Notice, send};

/// `payment.captured` → `notification.sent` (order confirmed).
#[derive(Debug, Default)]
pub struct NotifyConfirmation;

impl Handler<PaymentCaptured> for NotifyConfirmation {
    async fn handle(&self, paid: PaymentCaptured, ctx: &mut Context) -> Result<(), HandlerError> {
        let message = format!("Your order {} is confirmed: {} charged.", paid.order_id, crate::notifications::money(paid.amount_cents));
        send(ctx, Notice { order_id: paid.order_id, customer_id: paid.customer_id, kind: NotificationKind::OrderConfirmed, message }).await
    }
}
