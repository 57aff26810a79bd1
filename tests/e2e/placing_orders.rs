//! The order flow by choreography: completed, rejected, declined with compensation, and no
//! overselling under concurrency. Each runs on SQLite and on PostgreSQL.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use sluice::bus::Publisher;
use sluice::events::{InventoryReserved, OrderCreated, OrderItem, PaymentCaptured};
use sluice::pb::{GetOrderRequest, OrderStatus};
use sqlx::{Connection as _, Row};
use tokio_stream::StreamExt as _;

use crate::support::{Backend, Options, TestApp, an_order, eventually, has_events};

crate::on_both_backends!(
    a_paid_order_completes_with_priced_lines_and_history,
    an_order_without_stock_is_rejected_and_holds_nothing,
    a_declined_payment_releases_the_reserved_stock,
    concurrent_orders_never_oversell,
    a_repeated_idempotency_key_places_one_order,
    a_reservation_that_overtakes_its_order_is_charged_when_the_order_arrives,
    an_order_and_its_reservation_arriving_together_are_charged_exactly_once,
    a_second_reservation_of_a_charged_order_charges_nothing_more,
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
    // Without an idempotency key the ids are time-ordered (UUIDv7), and so is every event id
    // the services derived along the way.
    for id in [&accepted.order_id, &accepted.event_id].into_iter().chain(order.history.iter().map(|h| &h.event_id)) {
        let version = uuid::Uuid::parse_str(id).ok().and_then(|u| u.get_version());
        assert_eq!(version, Some(uuid::Version::SortRand), "{id} is a UUIDv7");
    }
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

/// An order and its reservation, published by the test itself: inventory does not run, so
/// the test decides which of the two payment sees first.
fn halves(order_id: &str) -> (OrderCreated, InventoryReserved) {
    let created = OrderCreated {
        order_id: order_id.into(),
        customer_id: "c-1".into(),
        items: vec![OrderItem { sku: "SKU-1".into(), quantity: 1 }],
        payment_token: "tok_visa".into(),
        created_at: None,
    };
    let reserved = InventoryReserved { order_id: order_id.into(), customer_id: "c-1".into(), lines: Vec::new(), total_cents: 1_800 };
    (created, reserved)
}

/// A platform without inventory, a tap on payment's events, a publisher for the test's own
/// events, and payment's database for assertions.
struct PaymentRig {
    app: TestApp,
    db: sqlx::AnyPool,
    payments: sluice::bus::Tap,
    publisher: Publisher,
}

impl PaymentRig {
    async fn spawn(backend: Backend) -> Self {
        let app = TestApp::spawn_opts(Options { external: vec!["inventory"], ..Options::new(backend) }).await;
        let db = sqlx::AnyPool::connect(&app.database_url("payment")).await.unwrap();
        let payments = app.tap(&["payment.*"]).await;
        let publisher = Publisher::connect(&app.bus, "test").await.unwrap();
        Self { app, db, payments, publisher }
    }

    async fn stop(self) {
        self.db.close().await;
        self.publisher.close().await;
        drop(self.payments);
        self.app.stop().await;
    }
}

/// Payment's row of an order: (has_details, reserved_first_cents), if any.
async fn payment_row(db: &sqlx::AnyPool, order_id: &str) -> Option<(i64, Option<i64>)> {
    let row = sqlx::query("SELECT has_details, reserved_first_cents FROM payment_orders WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(db)
        .await
        .expect("reading payment's database")?;
    Some((row.try_get("has_details").unwrap(), row.try_get("reserved_first_cents").unwrap()))
}

async fn a_reservation_that_overtakes_its_order_is_charged_when_the_order_arrives(backend: Backend) {
    let PaymentRig { app, db, mut payments, publisher } = PaymentRig::spawn(backend).await;
    let order_id = format!("o-{}", uuid::Uuid::new_v4().simple());
    let (created, reserved) = halves(&order_id);

    // The reservation first: payment keeps it, without a retry, until the order's details come.
    publisher.publish(&reserved, &format!("{order_id}-reserved")).await.unwrap();
    let mut last = None;
    eventually(|| payment_row(&db, &order_id), |row| *row == (0, Some(1_800)), &mut last)
        .await
        .unwrap_or_else(|| panic!("payment did not keep the early reservation; its row: {last:?}"));

    publisher.publish(&created, &format!("{order_id}-created")).await.unwrap();
    let captured = tokio::time::timeout(crate::support::DEADLINE, payments.next()).await.expect("payment.captured in time").unwrap();
    assert_eq!(captured.routing_key, "payment.captured");
    let event: PaymentCaptured = captured.decode().unwrap();
    assert_eq!((event.order_id.as_str(), event.amount_cents), (order_id.as_str(), 1_800));
    let order = app.wait_for(&order_id, |o| o.status() == OrderStatus::Completed).await;
    assert_eq!(order.status(), OrderStatus::Completed);
    let charges: i64 = sqlx::query("SELECT COUNT(*) AS n FROM payments WHERE order_id = $1").bind(&order_id).fetch_one(&db).await.unwrap().try_get("n").unwrap();
    assert_eq!(charges, 1, "one charge");
    PaymentRig { app, db, payments, publisher }.stop().await;
}

async fn an_order_and_its_reservation_arriving_together_are_charged_exactly_once(backend: Backend) {
    const ORDERS: usize = 40;
    let PaymentRig { app, db, mut payments, publisher } = PaymentRig::spawn(backend).await;
    let ids: Vec<String> = (0..ORDERS).map(|i| format!("o-{i}-{}", uuid::Uuid::new_v4().simple())).collect();

    // Both halves of every order at once, so that on PostgreSQL payment's two handlers meet
    // on the same order concurrently.
    let sends = ids.iter().map(|id| {
        let publisher = publisher.clone();
        async move {
            let (created, reserved) = halves(id);
            let (created_id, reserved_id) = (format!("{id}-created"), format!("{id}-reserved"));
            let (a, b) = tokio::join!(publisher.publish(&created, &created_id), publisher.publish(&reserved, &reserved_id));
            a.and(b).expect("publishing both halves");
        }
    });
    join_all(sends).await;

    let mut captured = std::collections::HashMap::new();
    while captured.len() < ORDERS {
        let message = tokio::time::timeout(crate::support::DEADLINE, payments.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {ORDERS} orders were charged; the others never were", captured.len()))
            .unwrap();
        assert_eq!(message.routing_key, "payment.captured");
        *captured.entry(message.correlation_id.unwrap_or_default()).or_insert(0) += 1;
    }
    let charges: i64 = sqlx::query("SELECT COUNT(*) AS n FROM payments").fetch_one(&db).await.unwrap().try_get("n").unwrap();
    assert_eq!(charges, ORDERS as i64, "one charge per order");
    assert!(ids.iter().all(|id| captured.get(id) == Some(&1)), "each order captured once: {captured:?}");
    PaymentRig { app, db, payments, publisher }.stop().await;
}

async fn a_second_reservation_of_a_charged_order_charges_nothing_more(backend: Backend) {
    let PaymentRig { app, db, mut payments, publisher } = PaymentRig::spawn(backend).await;
    let order_id = format!("o-{}", uuid::Uuid::new_v4().simple());
    let (created, reserved) = halves(&order_id);
    publisher.publish(&created, &format!("{order_id}-created")).await.unwrap();
    publisher.publish(&reserved, &format!("{order_id}-reserved")).await.unwrap();
    let first = tokio::time::timeout(crate::support::DEADLINE, payments.next()).await.expect("payment.captured in time").unwrap();
    assert_eq!(first.routing_key, "payment.captured");

    // The same order reserved again, under another event id (the inbox cannot tell). It is
    // handled (its inbox record commits; a failing handler's would not), without a charge.
    let again = format!("{order_id}-reserved-again");
    publisher.publish(&reserved, &again).await.unwrap();
    let mut last = None;
    let handled = || async {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM sluice_inbox WHERE event_id = $1").bind(&again).fetch_one(&db).await.ok()?;
        row.try_get::<i64, _>("n").ok()
    };
    eventually(handled, |n| *n == 1, &mut last).await.expect("the second reservation was handled, not retried");
    let charges: i64 = sqlx::query("SELECT COUNT(*) AS n FROM payments WHERE order_id = $1").bind(&order_id).fetch_one(&db).await.unwrap().try_get("n").unwrap();
    assert_eq!(charges, 1, "one charge");

    // Nothing was announced for it: the next payment event is a later order's.
    let marker = format!("o-{}", uuid::Uuid::new_v4().simple());
    let (marker_created, marker_reserved) = halves(&marker);
    publisher.publish(&marker_created, &format!("{marker}-created")).await.unwrap();
    publisher.publish(&marker_reserved, &format!("{marker}-reserved")).await.unwrap();
    let next = tokio::time::timeout(crate::support::DEADLINE, payments.next()).await.expect("the marker's payment in time").unwrap();
    assert_eq!(next.correlation_id.as_deref(), Some(marker.as_str()), "no second payment event for the order");
    PaymentRig { app, db, payments, publisher }.stop().await;
}

/// GetOrder and WatchOrder called right after PlaceOrder find the order even while the orders
/// read model has not projected it yet (here: its database's write lock held by the test);
/// an id PlaceOrder did not issue lately is NOT_FOUND at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_just_placed_is_found_while_the_read_model_catches_up() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    // Queries still read beside the lock (WAL); the projection waits for it.
    let mut lock = sqlx::AnyConnection::connect(&app.database_url("orders")).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut lock).await.unwrap();
    let accepted = app.place(an_order("SKU-1", 1, "tok_visa")).await.unwrap();
    let request = || GetOrderRequest { order_id: accepted.order_id.clone() };
    let mut get = tokio::spawn({
        let (mut gateway, request) = (app.gateway.clone(), request());
        async move { gateway.get_order(request).await.map(tonic::Response::into_inner) }
    });
    let mut watch = tokio::spawn({
        let (mut gateway, request) = (app.gateway.clone(), request());
        async move { gateway.watch_order(request).await.map(tonic::Response::into_inner) }
    });
    // Neither may answer while the read model cannot have the order: without the wait both
    // would answer NOT_FOUND within milliseconds.
    let early = tokio::time::timeout(Duration::from_millis(500), futures_util::future::select(&mut get, &mut watch)).await;
    assert!(early.is_err(), "an answer came while the read model did not have the order");
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    let order = get.await.unwrap().expect("the order, once projected");
    assert_eq!(order.order_id, accepted.order_id);
    let mut stream = watch.await.unwrap().expect("a stream of the order");
    let first = stream.next().await.expect("the order's state").expect("a state, not an error");
    assert_eq!(first.order_id, accepted.order_id);

    for unknown in [uuid::Uuid::new_v4().to_string(), "nope".to_owned()] {
        let asked = Instant::now();
        let missing = app.gateway.clone().get_order(GetOrderRequest { order_id: unknown }).await.expect_err("an unknown order");
        assert_eq!(missing.code(), tonic::Code::NotFound);
        assert!(asked.elapsed() < Duration::from_secs(2), "NOT_FOUND took {:?}", asked.elapsed());
    }
    assert_eq!(app.wait_for_outcome(&accepted.order_id).await.status(), OrderStatus::Completed);
    drop(stream);
    lock.close().await.unwrap();
    app.stop().await;
}
