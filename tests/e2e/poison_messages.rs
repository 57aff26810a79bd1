//! A message a consumer cannot understand is dead-lettered at once, with the reason, and the
//! consumer keeps going.

use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::BasicPublishOptions,
};
use sluice::bus::headers::{self, header_str};
use sluice::pb::OrderStatus;

use crate::support::{Backend, TestApp, an_order, take_next};

async fn next_dead_letter(channel: &lapin::Channel) -> lapin::types::FieldTable {
    take_next(channel, "inventory.reserve-stock.dlq").await.properties.headers().clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_unknown_messages_are_dead_lettered_and_consumption_goes_on() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let connection = Connection::connect(&app.bus.url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let publish = |type_name: &'static str, id: &'static str, body: &'static [u8]| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    "sluice.events".into(),
                    "order.created".into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default().with_type(type_name.into()).with_message_id(id.into()).with_delivery_mode(2),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    publish("sluice.v1.OrderCreated", "poison-1", b"\xff\xff\xff not protobuf").await;
    publish("acme.v9.Mystery", "poison-2", b"").await;

    let reasons = [next_dead_letter(&channel).await, next_dead_letter(&channel).await];
    let mut seen: Vec<&str> = reasons.iter().map(|h| header_str(h, headers::DEAD_LETTER_REASON).unwrap()).collect();
    seen.sort_unstable();
    assert_eq!(seen, ["undecodable", "unknown-type"]);
    for h in &reasons {
        assert_eq!(header_str(h, headers::ORIGINAL_QUEUE), Some("inventory.reserve-stock"));
        assert_eq!(header_str(h, headers::ORIGINAL_ROUTING_KEY), Some("order.created"));
        assert!(header_str(h, headers::DEAD_LETTER_ERROR).is_some_and(|e| !e.is_empty()));
        assert!(header_str(h, headers::DEAD_LETTERED_AT).is_some());
    }

    // The consumer is still there.
    let accepted = app.place(an_order("SKU-1", 1, "tok_visa")).await.unwrap();
    assert_eq!(app.wait_for_outcome(&accepted.order_id).await.status(), OrderStatus::Completed);
    connection.close(200, "done".into()).await.unwrap();
    app.stop().await;
}
