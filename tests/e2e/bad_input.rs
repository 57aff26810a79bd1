//! Bad PlaceOrder requests get INVALID_ARGUMENT with field violations, and nothing reaches the
//! broker.

use sluice::events::{OrderCreated, OrderItem};
use sluice::pb::PlaceOrderRequest;
use tonic::Code;
use tonic_types::StatusExt;

use crate::support::{Backend, TestApp, an_order};

fn violations(status: &tonic::Status) -> Vec<String> {
    status.get_error_details().bad_request().map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_orders_are_refused_with_field_violations_and_publish_nothing() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let mut everything = app.tap(&["#"]).await;
    let with = |f: &dyn Fn(&mut PlaceOrderRequest)| {
        let mut request = an_order("SKU-1", 1, "tok_visa");
        f(&mut request);
        request
    };
    let cases: Vec<(&str, PlaceOrderRequest, Vec<&str>)> = vec![
        ("no items", with(&|r| r.items.clear()), vec!["items"]),
        ("quantity 0", with(&|r| r.items[0].quantity = 0), vec!["items[0].quantity"]),
        ("empty sku", with(&|r| r.items[0].sku.clear()), vec!["items[0].sku"]),
        ("oversize sku", with(&|r| r.items[0].sku = "S".repeat(1_000)), vec!["items[0].sku"]),
        ("oversize customer", with(&|r| r.customer_id = "c".repeat(10_000)), vec!["customer_id"]),
        ("no customer", with(&|r| r.customer_id.clear()), vec!["customer_id"]),
        ("no payment token", with(&|r| r.payment_token.clear()), vec!["payment_token"]),
        (
            "unknown sku",
            with(&|r| r.items.push(OrderItem { sku: "NO-SUCH-SKU".into(), quantity: 1 })),
            vec!["items[1].sku"],
        ),
        ("several at once", with(&|r| { r.customer_id.clear(); r.items[0].quantity = 0; }), vec!["customer_id", "items[0].quantity"]),
    ];

    for (name, request, expected) in cases {
        let status = app.place(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_eq!(violations(&status), expected, "{name}");
    }

    // The broker saw nothing: the first message after the bad calls is the good order.
    let accepted = app.place(an_order("SKU-1", 1, "tok_visa")).await.expect("a valid order");
    let first = everything.next().await.expect("a message");
    assert_eq!(first.event_id, accepted.event_id, "a rejected request reached the broker: {first:?}");
    assert!(first.decode::<OrderCreated>().is_some());
    app.stop().await;
}
