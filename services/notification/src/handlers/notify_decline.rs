//! Tells the customer their payment was refused.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::{NotificationKind, PaymentDeclined};

use crate::notifications::{Notice, send};

/// `payment.declined` → `notification.sent` (payment declined).
#[derive(Debug, Default)]
pub struct NotifyDecline;

impl Handler<PaymentDeclined> for NotifyDecline {
    async fn handle(&self, declined: PaymentDeclined, ctx: &mut Context) -> Result<(), HandlerError> {
        let message = format!("Your payment for order {} was declined ({}).", declined.order_id, declined.reason);
        send(ctx, Notice { order_id: declined.order_id, customer_id: declined.customer_id, kind: NotificationKind::PaymentDeclined, message }).await
    }
}
