//! `/metrics` serves Prometheus text, and its counters move as traffic flows.

use std::net::SocketAddr;

use sluice::ops::Ops;
use sluice::pb::OrderStatus;
use sluice::shutdown::Shutdown;

use crate::support::{Backend, TestApp, an_order};

async fn scrape(addr: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        ureq::get(format!("http://{addr}/metrics")).call().expect("GET /metrics").body_mut().read_to_string().expect("a text body")
    })
    .await
    .unwrap()
}

/// The value of the sample `series` (name and labels exactly as exposed), 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_orders_flow() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let ops = Ops::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let addr = ops.local_addr();
    let shutdown = Shutdown::new();
    let server = tokio::spawn(ops.run(|| true, shutdown.clone()));

    let series = [
        r#"sluice_published_total{routing_key="order.created"}"#,
        r#"sluice_confirmed_total{routing_key="order.created"}"#,
        r#"sluice_confirmed_total{routing_key="inventory.reserved"}"#,
        r#"sluice_deliveries_total{queue="inventory.reserve-stock"}"#,
        r#"sluice_handler_latency_seconds_count{queue="payment.capture-payment"}"#,
        r#"sluice_grpc_requests_total{method="/sluice.v1.OrderService/PlaceOrder",code="0"}"#,
    ];
    let before = scrape(addr).await;
    let accepted = app.place(an_order("SKU-1", 1, "tok_visa")).await.unwrap();
    assert_eq!(app.wait_for_outcome(&accepted.order_id).await.status(), OrderStatus::Completed);
    let bad = app.place(an_order("SKU-1", 0, "tok_visa")).await.expect_err("invalid");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let after = scrape(addr).await;

    for s in series {
        assert!(value(&after, s) >= value(&before, s) + 1.0, "{s} did not move: {} -> {}", value(&before, s), value(&after, s));
    }
    let invalid = r#"sluice_grpc_requests_total{method="/sluice.v1.OrderService/PlaceOrder",code="3"}"#;
    assert!(value(&after, invalid) >= 1.0, "INVALID_ARGUMENT is counted by its code");
    assert_eq!(value(&after, r#"sluice_connection_up{link="gateway.publisher"}"#), 1.0);
    assert!(after.contains("# TYPE sluice_confirm_latency_seconds histogram"));

    shutdown.trigger();
    server.await.unwrap().unwrap();
    app.stop().await;
}
