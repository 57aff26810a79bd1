//! Tells the customer their order could not be fulfilled.

use sluice::bus::{Context, Handler, HandlerError};
use sluice::events::{InventoryRejected, NotificationKind};

use crate::notifications::{Notice, send};

/// `inventory.rejected` → `notification.sent` (order rejected).
#[derive(Debug, Default)]
pub struct NotifyRejection;

impl Handler<InventoryRejected> for NotifyRejection {
    async fn handle(&self, rejected: InventoryRejected, ctx: &mut Context) -> Result<(), HandlerError> {
        let message = format!("Sorry, we could not fulfil order {}: {}.", rejected.order_id, rejected.reason);
        send(ctx, Notice { order_id: rejected.order_id, customer_id: rejected.customer_id, kind: NotificationKind::OrderRejected, message }).await
    }
}
