//! Payment's reactions to events, one handler per file, and the charge they share.
//!
//! An order is charged when both its payment details (`order.created`) and its reservation
//! (`inventory.reserved`) are known. They come through different queues, so either may come
//! first: each handler records its half in the order's `payment_orders` row and charges if the
//! other half is already there. Both write that row before reading it (an upsert that takes
//! its lock), so on PostgreSQL, where the two may run at once, the second waits for the first
//! to commit and sees its half: exactly one of them charges, and neither has to retry.

mod capture_payment;
mod record_payment_details;

pub use capture_payment::CapturePayment;
pub use record_payment_details::RecordPaymentDetails;

use sluice::bus::{Context, HandlerError};
use sluice::events::{PaymentCaptured, PaymentDeclined};

use crate::provider::{Charge, Sandbox};

/// What charging an order needs.
struct Bill<'a> {
    order_id: &'a str,
    customer_id: &'a str,
    token: &'a str,
    amount_cents: i64,
}

/// Charges an order through `provider`, records the attempt and emits its outcome, once per
/// order: the provider's charge is idempotent per order (see [`Sandbox::charge`]), and an order
/// that already has its payment row (a second reservation of it, under another event id) is
/// neither recorded nor announced again.
async fn charge(provider: &Sandbox, bill: Bill<'_>, ctx: &mut Context) -> Result<(), HandlerError> {
    let charge = provider.charge(bill.order_id, bill.token, bill.amount_cents);
    let (status, payment_id, reason) = match &charge {
        Charge::Captured { payment_id } => ("captured", payment_id.clone(), String::new()),
        Charge::Declined { reason } => ("declined", String::new(), reason.clone()),
    };
    let recorded = sqlx::query(
        "INSERT INTO payments (order_id, payment_id, status, amount_cents, reason, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (order_id) DO NOTHING",
    )
        .bind(bill.order_id)
        .bind(&payment_id)
        .bind(status)
        .bind(bill.amount_cents)
        .bind(&reason)
        .bind(sluice::store::unix_millis())
        .execute(ctx.db())
        .await?;
    if recorded.rows_affected() == 0 {
        tracing::warn!(order_id = %bill.order_id, "order already charged; this reservation changes nothing");
        return Ok(());
    }
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
