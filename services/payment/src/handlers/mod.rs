//! Payment's reactions to events, one handler per file, and the charge they share.
//!
//! An order is charged when both its payment details (`order.created`) and its reservation
//! (`inventory.reserved`) are known. They come through different queues, so either may come
//! first: each handler records its half in the order's `payment_orders` row and charges if the
//! other half is already there. Both write that row before reading it (an upsert that takes
//! its lock), so on PostgreSQL, where the two may run at once, the second waits for the first
//! to commit and sees its half: exactly one of them charges, and neither has to retry. The
//! one that charges marks the row `charged` in that same statement, so a second reservation of
//! the order (under another event id) finds the charge taken and does nothing. The charge's
//! record is a row of [`RECORD`], which the bus writes for the whole batch at once.

mod capture_payment;
mod record_payment_details;

pub use capture_payment::CapturePayment;
pub use record_payment_details::RecordPaymentDetails;

use std::sync::LazyLock;

use sluice::bus::{Context, HandlerError};
use sluice::events::{PaymentCaptured, PaymentDeclined};
use sluice::store::{Rows, SQLITE_GIVEN};

use crate::provider::{Charge, Sandbox};

/// What charging an order needs.
struct Bill<'a> {
    order_id: &'a str,
    customer_id: &'a str,
    token: &'a str,
    amount_cents: i64,
}

/// Charges an order through `provider`, records the attempt and emits its outcome. Called once
/// per order, by the handler that took the order's charge; the provider's charge is idempotent
/// per order as well (see [`Sandbox::charge`]), for a delivery that runs again.
async fn charge(provider: &Sandbox, bill: Bill<'_>, ctx: &mut Context) -> Result<(), HandlerError> {
    let charge = provider.charge(bill.order_id, bill.token, bill.amount_cents);
    let (status, payment_id, reason) = match &charge {
        Charge::Captured { payment_id } => ("captured", payment_id.as_str(), ""),
        Charge::Declined { reason } => ("declined", "", reason.as_str()),
    };
    let row = serde_json::json!([bill.order_id, payment_id, status, bill.amount_cents, reason, sluice::store::unix_millis()]);
    ctx.write(&RECORD, row).await?;
    let (order_id, customer_id, amount_cents) = (bill.order_id.to_owned(), bill.customer_id.to_owned(), bill.amount_cents);
    match charge {
        Charge::Captured { payment_id } => {
            tracing::info!(%order_id, amount_cents, "payment captured");
            ctx.emit(PaymentCaptured { order_id, customer_id, payment_id, amount_cents });
        }
        Charge::Declined { reason } => {
            tracing::info!(%order_id, %reason, "payment declined");
            ctx.emit(PaymentDeclined { order_id, customer_id, reason, amount_cents });
        }
    }
    Ok(())
}

/// Records charge attempts, for every charge of a transaction at once (see [`Context::write`]):
/// each row `[order id, payment id, status, amount, reason, created at]`. One per order (the
/// table's key): a second would be refused, and its delivery retried, rather than announced.
static RECORD: LazyLock<Rows> = LazyLock::new(|| {
    let insert = |source: &str| format!("INSERT INTO payments (order_id, payment_id, status, amount_cents, reason, created_at) {source}");
    Rows::new(
        format!("{SQLITE_GIVEN} {}", insert("SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, r ->> 4, r ->> 5 FROM given")),
        insert("SELECT r ->> 0, r ->> 1, r ->> 2, (r ->> 3)::BIGINT, r ->> 4, (r ->> 5)::BIGINT FROM json_array_elements($1::JSON) AS j(r)"),
    )
});
