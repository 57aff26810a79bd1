//! Recording and announcing a notification, shared by every notification handler.

use std::sync::LazyLock;

use sluice::bus::{Context, HandlerError};
use sluice::events::{NotificationKind, NotificationSent};
use sluice::store::{Rows, SQLITE_GIVEN};

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
    let row = serde_json::json!([id, notice.order_id, notice.customer_id, kind, notice.message, sluice::store::unix_millis()]);
    ctx.write(&RECORD, row).await?;
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

/// Records notifications, for every notice of a transaction at once (see [`Context::write`]):
/// each row `[notification id, order id, customer id, kind, message, created at]`.
static RECORD: LazyLock<Rows> = LazyLock::new(|| {
    let insert = |source: &str| {
        format!(
            "INSERT INTO notifications (notification_id, order_id, customer_id, kind, message, created_at) {source} \
             ON CONFLICT (notification_id) DO NOTHING"
        )
    };
    Rows::new(
        // (The WHERE keeps SQLite from reading ON CONFLICT as a join's ON.)
        format!("{SQLITE_GIVEN} {}", insert("SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, r ->> 4, r ->> 5 FROM given WHERE true")),
        insert("SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, r ->> 4, (r ->> 5)::BIGINT FROM json_array_elements($1::JSON) AS j(r)"),
    )
});

/// `1234` → `12.34`.
pub fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, (cents % 100).abs())
}
