//! The order flow by choreography: completed, rejected, declined with compensation, and no
//! overselling under concurrency. Each runs on SQLite and on PostgreSQL.

use futures_util::future::join_all;
use sluice::events::OrderCreated;
use sluice::pb::OrderStatus;

use crate::support::{Backend, TestApp, an_order, has_events};

crate::on_both_backends!(
    a_paid_order_completes_with_priced_lines_and_history,
    an_order_without_stock_is_rejected_and_holds_nothing,
    a_declined_payment_releases_the_reserved_stock,
    concurrent_orders_never_oversell,
    a_repeated_idempotency_key_places_one_order,
);

async fn a_paid_order_completes_with_priced_lines_and_history(backend: Backend) {
    // Arrange
    let app = TestApp::spawn(backend).await;
    let mut created = app.tap(&["order.created"]).await;
    let before = app.stock("SKU-1").await;

    // Act
    let accepted = app.place(an_order("SKU-1", 2, "tok_visa")).await.expect("PlaceOrder");

    // Assert: the confirmed message carries the wire contract.
    let message = created.next().await.expect("order.created on the broker");
    assert_eq!(message.event_id, accepted.event_id);
    assert_eq!(message.type_name, "sluice.v1.OrderCreated");
    assert_eq!(message.correlation_id.as_deref(), Some(accepted.order_id.as_str()));
    assert_eq!(message.content_type.as_deref(), Some("application/protobuf"));
    assert_eq!(message.app_id.as_deref(), Some("gateway"));
    assert_eq!(message.delivery_mode, Some(2));
    assert_eq!(message.headers.get("cloudEvents_specversion").map(String::as_str), Some("1.0"));
    assert_eq!(message.headers.get("cloudEvents_id"), Some(&accepted.event_id));
    assert_eq!(message.headers.get("cloudEvents_type").map(String::as_str), Some("sluice.v1.OrderCreated"));
    let event: OrderCreated = message.decode().expect("an OrderCreated body");
    assert_eq!(event.customer_id, "c-1");

    let order = app.wait_for_outcome(&accepted.order_id).await;
    assert_eq!(order.status(), OrderStatus::Completed);
    assert!(has_events(&order, &["order.created", "inventory.reserved", "payment.captured", "notification.sent"]));
    let statuses: Vec<OrderStatus> = order.history.iter().map(|h| h.status()).collect();
    assert_eq!(statuses, [OrderStatus::Pending, OrderStatus::Reserved, OrderStatus::Paid, OrderStatus::Completed]);
    assert_eq!(order.total_cents, 3_600);
    assert_eq!(order.lines.len(), 1);
    assert_eq!((order.lines[0].quantity, order.lines[0].unit_price_cents), (2, 1_800));
    let after = app.stock("SKU-1").await;
    assert_eq!(after.available, before.available - 2);
    app.stop().await;
}

async fn an_order_without_stock_is_rejected_and_holds_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    let accepted = app.place(an_order("SKU-LIMITED", 6, "tok_visa")).await.expect("PlaceOrder");

    let order = app.wait_for_outcome(&accepted.order_id).await;
    assert_eq!(order.status(), OrderStatus::Rejected);
    assert!(order.reason.contains("SKU-LIMITED"), "{}", order.reason);
    assert!(order.lines.is_empty());
    let stock = app.stock("SKU-LIMITED").await;
    assert_eq!((stock.available, stock.reserved), (5, 0));
    app.stop().await;
}

async fn a_declined_payment_releases_the_reserved_stock(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    let accepted = app.place(an_order("SKU-LIMITED", 3, "tok_decline")).await.expect("PlaceOrder");

    let order = app.wait_for_outcome(&accepted.order_id).await;
    assert_eq!(order.status(), OrderStatus::Declined);
    assert!(order.reason.contains("declined"), "{}", order.reason);
    // Compensation ran: inventory.released is in the history and the stock is back.
    let stock = app.stock("SKU-LIMITED").await;
    assert_eq!((stock.available, stock.reserved), (5, 0));
    app.stop().await;
}

async fn concurrent_orders_never_oversell(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    let placed = join_all((0..20).map(|_| app.place(an_order("SKU-LIMITED", 1, "tok_visa")))).await;
    let accepted: Vec<_> = placed.into_iter().map(|r| r.expect("PlaceOrder")).collect();

    let outcomes = join_all(accepted.iter().map(|a| app.wait_for_outcome(&a.order_id))).await;
    let completed = outcomes.iter().filter(|o| o.status() == OrderStatus::Completed).count();
    let rejected = outcomes.iter().filter(|o| o.status() == OrderStatus::Rejected).count();
    assert_eq!((completed, rejected), (5, 15));
    let stock = app.stock("SKU-LIMITED").await;
    assert_eq!((stock.available, stock.reserved), (0, 0), "sold units leave the books once paid");
    app.stop().await;
}

async fn a_repeated_idempotency_key_places_one_order(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut request = an_order("SKU-LIMITED", 2, "tok_visa");
    request.idempotency_key = "retry-after-timeout".into();

    let first = app.place(request.clone()).await.expect("first PlaceOrder");
    let second = app.place(request).await.expect("retried PlaceOrder");

    assert_eq!((first.order_id.as_str(), first.event_id.as_str()), (second.order_id.as_str(), second.event_id.as_str()));
    let order = app.wait_for_outcome(&first.order_id).await;
    assert_eq!(order.status(), OrderStatus::Completed);
    assert_eq!(order.history.len(), 4, "one order, one history");
    let stock = app.stock("SKU-LIMITED").await;
    assert_eq!(stock.available, 3, "reserved once, not twice");
    app.stop().await;
}
