//! What each lifecycle event means for an order, and how an order's status follows from the
//! events seen so far.
//!
//! Events of one order arrive through different queues and can be projected in any order, so
//! the status is not a state machine fed in sequence: it is the strongest status implied by
//! any event seen. Terminal failures outrank success, and success outranks progress.

use sluice::events::{
    Event, InventoryRejected, InventoryReleased, InventoryReserved, NotificationKind, NotificationSent, OrderCreated,
    PaymentCaptured, PaymentDeclined, PricedLine,
};
use sluice::pb::OrderStatus;

/// What the read model learns from one event.
#[derive(Debug, Default)]
pub struct Change {
    /// The order's customer, if the event says.
    pub customer_id: String,
    /// The status this event stands for, if any.
    pub implied: Option<OrderStatus>,
    /// Priced lines and total, once inventory priced them.
    pub lines: Option<(Vec<PricedLine>, i64)>,
    /// Why the order failed, for failures.
    pub reason: Option<String>,
    /// One line for the history.
    pub detail: String,
}

/// An event of an order's lifecycle.
pub trait Lifecycle: Event {
    /// The order it belongs to.
    fn order(&self) -> &str;
    /// What it changes.
    fn change(&self) -> Change;
}

/// Rank of a status: the order's status is the highest-ranked one implied by its events.
pub fn rank(status: OrderStatus) -> u8 {
    match status {
        OrderStatus::Unspecified => 0,
        OrderStatus::Pending => 1,
        OrderStatus::Reserved => 2,
        OrderStatus::Paid => 3,
        OrderStatus::Completed => 4,
        OrderStatus::Rejected | OrderStatus::Declined => 5,
    }
}

/// [`rank`] as SQL over a column holding status numbers (unknown numbers rank 0).
pub fn rank_sql(column: &str) -> String {
    use OrderStatus::*;
    let arms: String = [Unspecified, Pending, Reserved, Paid, Completed, Rejected, Declined]
        .into_iter()
        .map(|s| format!(" WHEN {} THEN {}", s as i32, rank(s)))
        .collect();
    format!("(CASE {column}{arms} ELSE 0 END)")
}

impl Lifecycle for OrderCreated {
    fn order(&self) -> &str {
        &self.order_id
    }
    fn change(&self) -> Change {
        let units: u32 = self.items.iter().map(|i| i.quantity).sum();
        Change {
            customer_id: self.customer_id.clone(),
            implied: Some(OrderStatus::Pending),
            detail: format!("order placed: {} line(s), {units} unit(s)", self.items.len()),
            ..Change::default()
        }
    }
}

impl Lifecycle for InventoryReserved {
    fn order(&self) -> &str {
        &self.order_id
    }
    fn change(&self) -> Change {
        Change {
            customer_id: self.customer_id.clone(),
            implied: Some(OrderStatus::Reserved),
            lines: Some((self.lines.clone(), self.total_cents)),
            detail: format!("stock reserved, total {} cents", self.total_cents),
            ..Change::default()
        }
    }
}

impl Lifecycle for InventoryRejected {
    fn order(&self) -> &str {
        &self.order_id
    }
    fn change(&self) -> Change {
        Change {
            customer_id: self.customer_id.clone(),
            implied: Some(OrderStatus::Rejected),
            reason: Some(self.reason.clone()),
            detail: self.reason.clone(),
            ..Change::default()
        }
    }
}

impl Lifecycle for InventoryReleased {
    fn order(&self) -> &str {
        &self.order_id
    }
    fn change(&self) -> Change {
        Change { customer_id: self.customer_id.clone(), detail: format!("stock released: {}", self.reason), ..Change::default() }
    }
}

impl Lifecycle for PaymentCaptured {
    fn order(&self) -> &str {
        &self.order_id
    }
    fn change(&self) -> Change {
        Change {
            customer_id: self.customer_id.clone(),
            implied: Some(OrderStatus::Paid),
            detail: format!("payment {} captured: {} cents", self.payment_id, self.amount_cents),
            ..Change::default()
        }
    }
}

impl Lifecycle for PaymentDeclined {
    fn order(&self) -> &str {
        &self.order_id
    }
    fn change(&self) -> Change {
        Change {
            customer_id: self.customer_id.clone(),
            implied: Some(OrderStatus::Declined),
            reason: Some(format!("payment declined: {}", self.reason)),
            detail: format!("payment declined: {}", self.reason),
            ..Change::default()
        }
    }
}

impl Lifecycle for NotificationSent {
    fn order(&self) -> &str {
        &self.order_id
    }
    fn change(&self) -> Change {
        let confirmed = self.kind() == NotificationKind::OrderConfirmed;
        Change {
            customer_id: self.customer_id.clone(),
            implied: confirmed.then_some(OrderStatus::Completed),
            detail: format!("customer notified: {}", self.kind().as_str_name()),
            ..Change::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_confirmation_completes_an_order() {
        let sent = |kind: NotificationKind| NotificationSent { kind: kind.into(), ..Default::default() };
        assert_eq!(sent(NotificationKind::OrderConfirmed).change().implied, Some(OrderStatus::Completed));
        assert_eq!(sent(NotificationKind::PaymentDeclined).change().implied, None);
    }
}
