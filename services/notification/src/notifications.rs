//! Recording and announcing a notification, shared by every notification handler.

use sluice::bus::{Context, HandlerError};
use sluice::events::{NotificationKind, NotificationSent};

/// One message for one customer about one order.
#[derive(Debug)]
pub struct Notice {
    /// The order it is about.
    pub order_id: String,
    /// Who gets it.
    pub customer_id: String,
    /// What it says, in one word.
    pub kind: NotificationKind,
    /// What it says.
    pub message: String,
}

/// Records the notification and emits `notification.sent`, in the delivery's transaction.
/// The notification id is derived from the order and kind: one notice per outcome.
pub async fn send(ctx: &mut Context, notice: Notice) -> Result<(), HandlerError> {
    if notice.order_id.is_empty() {
        return Err(HandlerError::reject("event has no order id"));
    }
    let kind = notice.kind.as_str_name();
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("notification/{}/{kind}", notice.order_id).as_bytes()).to_string();
    sqlx::query(
        "INSERT INTO notifications (notification_id, order_id, customer_id, kind, message, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (notification_id) DO NOTHING",
    )
    .bind(&id)
    .bind(&notice.order_id)
    .bind(&notice.customer_id)
    .bind(kind)
    .bind(&notice.message)
    .bind(sluice::store::unix_millis())
    .execute(ctx.db())
    .await?;
    tracing::info!(order_id = %notice.order_id, kind, "customer notified");
    ctx.emit(NotificationSent {
        order_id: notice.order_id,
        customer_id: notice.customer_id,
        kind: notice.kind.into(),
        notification_id: id,
        message: notice.message,
    });
    Ok(())
}

/// `1234` → `12.34`.
pub fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, (cents % 100).abs())
}
