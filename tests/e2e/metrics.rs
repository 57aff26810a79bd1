//! `/metrics` serves Prometheus text, and its counters move as traffic flows. A streaming
//! call that fails after its headers went out is counted with the code of its trailers.

use std::net::SocketAddr;

use sluice::ops::Ops;
use sluice::pb::{GetOrderRequest, OrderStatus};
use sluice::shutdown::Shutdown;
use tokio_stream::StreamExt;

use crate::support::{Backend, TestApp, an_order};

pub(crate) async fn scrape(addr: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        ureq::get(format!("http://{addr}/metrics")).call().expect("GET /metrics").body_mut().read_to_string().expect("a text body")
    })
    .await
    .unwrap()
}

/// The value of the sample `series` (name and labels exactly as exposed), 0 when absent.
pub(crate) fn value(text: &str, series: &str) -> f64 {
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
        r#"sluice_batches_total{queue="inventory.reserve-stock"}"#,
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
    // Exposed; its value is checked in a gateway process of its own (other tests' gateways in
    // this process set it too): `event_gateway::a_stream_of_large_events_...`.
    assert!(after.contains(r#"sluice_connection_up{link="gateway.publisher"}"#));
    assert!(after.contains("# TYPE sluice_confirm_latency_seconds histogram"));

    shutdown.trigger();
    server.await.unwrap().unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_call_that_fails_after_its_headers_is_counted_with_its_real_code() {
    let mut app = TestApp::spawn(Backend::Sqlite).await;
    let ops = Ops::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let addr = ops.local_addr();
    let shutdown = Shutdown::new();
    let server = tokio::spawn(ops.run(|| true, shutdown.clone()));

    // Without payment the order never gets past RESERVED, so WatchOrder stays open.
    app.stop_service("payment").await;
    let accepted = app.place(an_order("SKU-1", 1, "tok_visa")).await.unwrap();
    let mut stream =
        app.gateway.clone().watch_order(GetOrderRequest { order_id: accepted.order_id.clone() }).await.unwrap().into_inner();
    // The response headers, and the order's first state, went out: the call answered OK so far.
    let first = stream.next().await.expect("the current state").expect("a state, not an error");
    assert_eq!(first.order_id, accepted.order_id);
    let before = scrape(addr).await;

    // Then the orders service goes away too: the next poll fails, and the stream ends with that
    // error in its trailers.
    app.stop_service("orders").await;
    let failed = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(30), stream.next()).await.expect("the stream ends") {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status,
            None => panic!("WatchOrder ended without an error while the orders service was gone"),
        }
    };
    assert_ne!(failed.code(), tonic::Code::Ok);
    let after = scrape(addr).await;

    let series = |code: i32| format!(r#"sluice_grpc_requests_total{{method="/sluice.v1.OrderService/WatchOrder",code="{code}"}}"#);
    let real = series(failed.code() as i32);
    assert!(
        value(&after, &real) >= value(&before, &real) + 1.0,
        "the failed stream is counted under its code {:?}: {real} {} -> {}",
        failed.code(),
        value(&before, &real),
        value(&after, &real)
    );
    println!("WatchOrder failed mid-stream with {:?}; counted as {real}", failed.code());

    shutdown.trigger();
    server.await.unwrap().unwrap();
    app.stop().await;
}
