//! `sluice dlq`: dead letters made by the running platform are listed, shown without being
//! consumed, replayed to the queue they failed in, and purged; both through
//! `sluice::bus::dlq` and through the real `sluice` binary.

// Test helpers panic on broker failures, like the tests that call them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::AMQPValue,
};
use sluice::bus::dlq::{Body, DeadLetters, QueueDepth, Selection};
use sluice::bus::headers::{self, Envelope};
use sluice::events::{OrderCreated, OrderItem};
use sluice::pb::OrderStatus;

use crate::support::{Backend, TestApp, broker, eventually};

const INVENTORY_DLQ: &str = "inventory.reserve-stock.dlq";
const POISON: &[u8] = b"\xff\xff\xff not protobuf";

/// A confirm-mode channel of the test's own, straight to the broker.
async fn open_channel(app: &TestApp) -> (Connection, Channel) {
    let connection = Connection::connect(&app.bus.url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    (connection, channel)
}

async fn publish(channel: &Channel, exchange: &str, routing_key: &str, properties: BasicProperties, body: &[u8]) {
    let confirmation = channel
        .basic_publish(exchange.into(), routing_key.into(), BasicPublishOptions { mandatory: true, ..Default::default() }, body, properties)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(confirmation, lapin::Confirmation::Ack(None)), "{exchange}:{routing_key} was not routed");
}

/// Poison on `order.created`: every consumer of it (inventory, payment, orders) dead-letters
/// it, the way `poison_messages` shows.
async fn publish_poison(channel: &Channel, message_id: &str) {
    let properties = BasicProperties::default()
        .with_type("sluice.v1.OrderCreated".into())
        .with_message_id(message_id.into())
        .with_delivery_mode(2);
    publish(channel, "sluice.events", "order.created", properties, POISON).await;
}

/// Waits until `queue` holds exactly `count` ready messages.
async fn wait_for_depth(dead_letters: &DeadLetters, queue: &str, count: u32) {
    let mut last = None;
    let queues = [queue.to_owned()];
    let found = eventually(
        || async { dead_letters.depths(&queues).await.ok().map(|d| d[0].messages) },
        |messages| *messages == count,
        &mut last,
    )
    .await;
    assert!(found.is_some(), "{queue} never held {count} messages; last count: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_shown_with_their_failure_headers_without_being_consumed() {
    // Arrange: two real dead letters from each order.created consumer.
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (connection, channel) = open_channel(&app).await;
    publish_poison(&channel, "poison-1").await;
    let properties =
        BasicProperties::default().with_type("acme.v9.Mystery".into()).with_message_id("poison-2".into()).with_delivery_mode(2);
    publish(&channel, "sluice.events", "order.created", properties, b"").await;
    let dead_letters = DeadLetters::connect(&app.bus).await.unwrap();
    wait_for_depth(&dead_letters, INVENTORY_DLQ, 2).await;

    // Act + assert: list, through the management API, names every non-empty dead-letter queue.
    let mut last = None;
    let expected = ["inventory.reserve-stock.dlq", "orders.track-order-created.dlq", "payment.record-payment-details.dlq"]
        .map(|queue| QueueDepth { queue: queue.into(), messages: 2 });
    let listed = eventually(|| async { dead_letters.list(&broker::api_base()).await.ok() }, |l| l[..] == expected, &mut last).await;
    assert!(listed.is_some(), "listed {last:?}");

    // Show: both messages, decoded as far as they go, with the headers the consumer wrote.
    let shown = dead_letters.show(INVENTORY_DLQ, 10).await.unwrap();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    let poison = shown.iter().find(|l| l.message_id.as_deref() == Some("poison-1")).unwrap();
    assert_eq!(poison.type_name.as_deref(), Some("sluice.v1.OrderCreated"));
    assert_eq!(poison.routing_key, "order.created");
    assert_eq!(poison.headers.reason.as_deref(), Some("undecodable"));
    assert_eq!(poison.headers.original_queue.as_deref(), Some("inventory.reserve-stock"));
    assert_eq!(poison.headers.original_routing_key.as_deref(), Some("order.created"));
    assert_eq!(poison.headers.attempt, Some(1));
    assert!(poison.headers.error.as_deref().is_some_and(|e| !e.is_empty()));
    assert!(poison.headers.dead_lettered_at.is_some());
    match &poison.body {
        Body::Undecodable { body_base64, decode_error } => {
            use base64::Engine as _;
            assert_eq!(base64::engine::general_purpose::STANDARD.decode(body_base64).unwrap(), POISON);
            assert!(decode_error.contains("sluice.v1.OrderCreated"), "{decode_error}");
        }
        other => panic!("poison decoded: {other:?}"),
    }
    let mystery = shown.iter().find(|l| l.message_id.as_deref() == Some("poison-2")).unwrap();
    assert_eq!(mystery.headers.reason.as_deref(), Some("unknown-type"));
    assert!(matches!(&mystery.body, Body::Undecodable { decode_error, .. } if decode_error.contains("unknown type")));

    // Nothing was consumed, and --limit bounds the output.
    wait_for_depth(&dead_letters, INVENTORY_DLQ, 2).await;
    assert_eq!(dead_letters.show(INVENTORY_DLQ, 1).await.unwrap().len(), 1);
    wait_for_depth(&dead_letters, INVENTORY_DLQ, 2).await;

    // Only dead-letter queues are touched.
    assert!(dead_letters.purge("inventory.reserve-stock").await.is_err());
    assert!(dead_letters.show("nobody.nothing.dlq", 1).await.is_err());

    dead_letters.close().await;
    connection.close(200, "done".into()).await.unwrap();
    app.stop().await;
}

/// The headers `consumer::dead_letter` writes when a handler runs out of attempts.
fn dead_letter_headers(properties: BasicProperties, queue: &str, routing_key: &str) -> BasicProperties {
    let mut hdrs = properties.headers().clone().unwrap_or_default();
    headers::set_str(&mut hdrs, headers::DEAD_LETTER_REASON, "retries-exhausted");
    headers::set_str(&mut hdrs, headers::DEAD_LETTER_ERROR, "database: pool timed out while waiting for an open connection");
    headers::set_str(&mut hdrs, headers::ORIGINAL_QUEUE, queue);
    headers::set_str(&mut hdrs, headers::ORIGINAL_ROUTING_KEY, routing_key);
    headers::set_str(&mut hdrs, headers::DEAD_LETTERED_AT, &headers::now().to_string());
    hdrs.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(5));
    properties.with_headers(hdrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_of_a_fixed_up_message_completes_the_order() {
    // Arrange: an order.created that payment and orders handled, but that inventory gave up on
    // (say its database was down for every attempt) and dead-lettered.
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (connection, channel) = open_channel(&app).await;
    let order_id = uuid::Uuid::new_v4().to_string();
    let event_id = uuid::Uuid::new_v4().to_string();
    let order = OrderCreated {
        order_id: order_id.clone(),
        customer_id: "c-1".into(),
        items: vec![OrderItem { sku: "SKU-1".into(), quantity: 2 }],
        payment_token: "tok_visa".into(),
        created_at: Some(headers::now()),
    };
    let envelope = Envelope::of(&order, &event_id);
    let properties = envelope.properties("gateway");
    for queue in ["payment.record-payment-details", "orders.track-order-created"] {
        publish(&channel, "", queue, properties.clone(), &envelope.body).await;
    }
    let dead = dead_letter_headers(properties, "inventory.reserve-stock", "order.created");
    publish(&channel, "", INVENTORY_DLQ, dead, &envelope.body).await;
    // A second dead letter that must stay where it is.
    publish_poison(&channel, "poison-1").await;
    let dead_letters = DeadLetters::connect(&app.bus).await.unwrap();
    wait_for_depth(&dead_letters, INVENTORY_DLQ, 2).await;
    let shown = dead_letters.show(INVENTORY_DLQ, 10).await.unwrap();
    let fixed = shown.iter().find(|l| l.message_id.as_deref() == Some(event_id.as_str())).unwrap();
    match &fixed.body {
        Body::Decoded { body } => {
            assert_eq!(body["order_id"], order_id.as_str());
            assert_eq!(body["payment_token"], "***", "secrets are not shown");
        }
        other => panic!("a valid OrderCreated did not decode: {other:?}"),
    }

    // Act
    let report = dead_letters.replay(INVENTORY_DLQ, &Selection::MessageId(event_id.clone())).await.unwrap();

    // Assert
    assert_eq!(report.replayed, 1, "{report:?}");
    assert!(report.skipped.is_empty(), "{report:?}");
    let outcome = app.wait_for_outcome(&order_id).await;
    assert_eq!(outcome.status(), OrderStatus::Completed);
    assert_eq!(outcome.total_cents, 3_600);
    wait_for_depth(&dead_letters, INVENTORY_DLQ, 1).await;
    let left = dead_letters.show(INVENTORY_DLQ, 10).await.unwrap();
    assert_eq!(left.iter().map(|l| l.message_id.as_deref()).collect::<Vec<_>>(), [Some("poison-1")]);

    dead_letters.close().await;
    connection.close(200, "done".into()).await.unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_leaves_what_it_cannot_send_back_in_the_dead_letter_queue() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (connection, channel) = open_channel(&app).await;
    let orphan = BasicProperties::default().with_message_id("orphan".into()).with_delivery_mode(2);
    publish(&channel, "", INVENTORY_DLQ, orphan, b"no original queue").await;
    let gone = dead_letter_headers(
        BasicProperties::default().with_message_id("gone".into()).with_delivery_mode(2),
        "inventory.retired-handler",
        "order.created",
    );
    publish(&channel, "", INVENTORY_DLQ, gone, b"its queue was deleted").await;
    let dead_letters = DeadLetters::connect(&app.bus).await.unwrap();

    let report = dead_letters.replay(INVENTORY_DLQ, &Selection::All).await.unwrap();

    assert_eq!(report.replayed, 0);
    let mut skipped: Vec<(Option<&str>, &str)> =
        report.skipped.iter().map(|s| (s.message_id.as_deref(), s.reason.as_str())).collect();
    skipped.sort_unstable();
    assert_eq!(
        skipped,
        [
            (Some("gone"), "the queue inventory.retired-handler does not exist"),
            (Some("orphan"), "no x-sluice-original-queue header"),
        ]
    );
    wait_for_depth(&dead_letters, INVENTORY_DLQ, 2).await;

    dead_letters.close().await;
    connection.close(200, "done".into()).await.unwrap();
    app.stop().await;
}

/// Runs the `sluice` binary with `args`; returns (success, stdout, stderr).
async fn sluice(env: Vec<(&'static str, String)>, args: &[&str]) -> (bool, String, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(&args)
            .env_remove("SLUICE_AMQP_URL")
            .env_remove("SLUICE_RABBITMQ_API")
            .envs(env)
            .output()
            .expect("running the sluice binary")
    })
    .await
    .unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.success(), text(output.stdout), text(output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sluice_binary_lists_shows_replays_and_purges_dead_letters() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let (connection, channel) = open_channel(&app).await;
    publish_poison(&channel, "poison-1").await;
    publish_poison(&channel, "poison-2").await;
    let dead_letters = DeadLetters::connect(&app.bus).await.unwrap();
    wait_for_depth(&dead_letters, INVENTORY_DLQ, 2).await;
    let env = vec![("SLUICE_AMQP_URL", app.bus.url.clone()), ("SLUICE_RABBITMQ_API", broker::api_base())];

    // list, with queue names (no management API involved).
    let (ok, out, err) = sluice(env.clone(), &["dlq", "list", INVENTORY_DLQ, "payment.record-payment-details.dlq"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "inventory.reserve-stock.dlq\t2\npayment.record-payment-details.dlq\t2\n");

    // show: one JSON object per line, the broker given by --amqp-url this time.
    let (ok, out, err) = sluice(vec![], &["dlq", "show", INVENTORY_DLQ, "--limit", "5", "--amqp-url", &app.bus.url]).await;
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    let mut ids: Vec<&str> = lines.iter().map(|l| l["message_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["poison-1", "poison-2"]);
    let first_dead_lettered: Vec<String> =
        lines.iter().map(|l| l["headers"]["x-sluice-dead-lettered-at"].as_str().unwrap().to_owned()).collect();
    for line in &lines {
        assert_eq!(line["type"], "sluice.v1.OrderCreated");
        assert_eq!(line["routing_key"], "order.created");
        assert_eq!(line["headers"]["x-sluice-dead-letter-reason"], "undecodable");
        assert_eq!(line["headers"]["x-sluice-original-queue"], "inventory.reserve-stock");
        assert!(line["body_base64"].is_string() && line["decode_error"].is_string(), "{line}");
    }

    // replay --all: both go back to inventory.reserve-stock, which dead-letters them again
    // (they are still poison): new dead letters, at attempt 1.
    let (ok, out, err) = sluice(env.clone(), &["dlq", "replay", INVENTORY_DLQ, "--all"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("replayed 2 message(s) from {INVENTORY_DLQ}\n"));
    let mut last = None;
    let again = eventually(
        || async { dead_letters.show(INVENTORY_DLQ, 10).await.ok() },
        |shown| {
            shown.len() == 2
                && shown.iter().all(|l| {
                    l.headers.attempt == Some(1)
                        && l.headers.dead_lettered_at.as_ref().is_some_and(|at| !first_dead_lettered.contains(at))
                })
        },
        &mut last,
    )
    .await;
    let again = again.unwrap_or_else(|| panic!("the replayed messages did not come back; last: {last:#?}"));
    assert!(again.iter().all(|l| l.headers.reason.as_deref() == Some("undecodable")));

    // A message id that is not there is an error.
    let (ok, _, err) = sluice(env.clone(), &["dlq", "replay", INVENTORY_DLQ, "--message-id", "nope"]).await;
    assert!(!ok);
    assert!(err.contains("no message with message_id nope"), "{err}");

    // purge: prints the count; a live queue is refused.
    let (ok, out, err) = sluice(env.clone(), &["dlq", "purge", INVENTORY_DLQ]).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("purged 2 message(s) from {INVENTORY_DLQ}\n"));
    wait_for_depth(&dead_letters, INVENTORY_DLQ, 0).await;
    let (ok, _, err) = sluice(env.clone(), &["dlq", "purge", "inventory.reserve-stock"]).await;
    assert!(!ok);
    assert!(err.contains("is not a dead-letter queue"), "{err}");

    // list without names: the management API finds the queues that still hold messages.
    let mut last = None;
    let listed = eventually(
        || async {
            let (ok, out, _) = sluice(env.clone(), &["dlq", "list"]).await;
            ok.then_some(out)
        },
        |out| out == "orders.track-order-created.dlq\t2\npayment.record-payment-details.dlq\t2\n",
        &mut last,
    )
    .await;
    assert!(listed.is_some(), "sluice dlq list printed {last:?}");

    dead_letters.close().await;
    connection.close(200, "done".into()).await.unwrap();
    app.stop().await;
}
