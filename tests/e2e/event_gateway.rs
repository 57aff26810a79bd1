//! The generic event API: Publish of every registered event type as `Any`, the bad inputs it
//! refuses, PublishStream at volume and within its byte budget, Subscribe (live events with their
//! trace ids, bounded for slow clients, no queue left behind) and WatchOrder.

use std::{collections::HashSet, time::Duration};

use lapin::{
    Connection, ConnectionProperties,
    options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use prost::Message as _;
use sluice::bus::{Envelope, TraceContext, topology::EXCHANGE};
use sluice::config::BusConfig;
use sluice::events::{
    Event as _,
    InventoryRejected, InventoryReleased, InventoryReserved, NotificationSent, OrderCreated, PaymentCaptured, PaymentDeclined,
};
use sluice::pb::{
    OrderStatus, PublishRequest, PublishStreamRequest, SubscribeRequest, event_gateway_client::EventGatewayClient,
};
use sluice::shutdown::Shutdown;
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

use crate::{
    child,
    metrics::{scrape, value},
    support::{Backend, TestApp, an_order, broker, eventually, free_port, proxy::Proxy},
};

/// A gateway alone on a fresh vhost (no services: published events only go to the test's queues).
struct Bare {
    client: EventGatewayClient<Channel>,
    addr: std::net::SocketAddr,
    bus: BusConfig,
    shutdown: Shutdown,
    _vhost: broker::Vhost,
    _broker: broker::BrokerGuard,
}

impl Bare {
    async fn start() -> Self {
        let guard = broker::shared().await;
        let vhost = broker::Vhost::create();
        let bus = BusConfig::for_url(vhost.url());
        let gateway = sluice_gateway::Gateway::bind(sluice_gateway::Config::for_bus(bus.clone())).await.unwrap();
        let addr = gateway.local_addr();
        let shutdown = Shutdown::new();
        shutdown.spawn(gateway.run(shutdown.clone()));
        let client = EventGatewayClient::connect(format!("http://{addr}")).await.unwrap();
        Self { client, addr, bus, shutdown, _vhost: vhost, _broker: guard }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        self.shutdown.wait().await;
    }
}

fn any<E: sluice::events::Event>(event: &E) -> prost_types::Any {
    prost_types::Any { type_url: format!("type.googleapis.com/{}", E::FULL_NAME), value: event.encode_to_vec() }
}

fn publish(event: prost_types::Any) -> PublishRequest {
    PublishRequest { event: Some(event), idempotency_key: String::new() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_registered_event_publishes_and_bad_ones_publish_nothing() {
    let app = Bare::start().await;
    let mut everything = sluice::bus::Tap::open(&app.bus, &["#"]).await.unwrap();
    let order_id = || "o-1".to_owned();
    let events = vec![
        any(&OrderCreated { order_id: order_id(), ..Default::default() }),
        any(&InventoryReserved { order_id: order_id(), ..Default::default() }),
        any(&InventoryRejected { order_id: order_id(), ..Default::default() }),
        any(&InventoryReleased { order_id: order_id(), ..Default::default() }),
        any(&PaymentCaptured { order_id: order_id(), ..Default::default() }),
        any(&PaymentDeclined { order_id: order_id(), ..Default::default() }),
        any(&NotificationSent { order_id: order_id(), ..Default::default() }),
    ];
    assert_eq!(events.len(), sluice::events::REGISTERED_EVENTS.len(), "every registered type is covered");

    // Bad inputs first: each refused with its exact code, nothing published.
    let garbage = prost_types::Any { type_url: "type.googleapis.com/sluice.v1.OrderCreated".into(), value: vec![0xff, 0xff, 0xff] };
    let unknown = prost_types::Any { type_url: "type.googleapis.com/acme.v1.Mystery".into(), value: vec![] };
    let not_an_event = prost_types::Any {
        type_url: "type.googleapis.com/sluice.v1.PlaceOrderRequest".into(),
        value: sluice::pb::PlaceOrderRequest::default().encode_to_vec(),
    };
    let no_order = any(&OrderCreated::default());
    let oversize = prost_types::Any { type_url: "type.googleapis.com/sluice.v1.OrderCreated".into(), value: vec![b'x'; 2 * 1024 * 1024] };
    let cases: Vec<(&str, PublishRequest, Code, Option<&str>)> = vec![
        ("missing event", PublishRequest::default(), Code::InvalidArgument, Some("event")),
        ("unknown type", publish(unknown), Code::InvalidArgument, Some("event.type_url")),
        ("not an event", publish(not_an_event), Code::InvalidArgument, Some("event.type_url")),
        ("garbage bytes", publish(garbage), Code::InvalidArgument, Some("event.value")),
        ("missing order id", publish(no_order), Code::InvalidArgument, Some("event.value.order_id")),
        ("oversize message", publish(oversize), Code::OutOfRange, None),
    ];
    for (name, request, code, field) in cases {
        let status = app.client.clone().publish(request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status:?}");
        if let Some(field) = field {
            let fields: Vec<String> = status.get_error_details().bad_request().unwrap().field_violations.iter().map(|v| v.field.clone()).collect();
            assert_eq!(fields, [field], "{name}");
        }
    }

    for event in events {
        let type_name = event.type_url.rsplit('/').next().unwrap().to_owned();
        let accepted = app.client.clone().publish(publish(event)).await.expect("a registered event").into_inner();
        let seen = everything.next().await.expect("the event on the broker");
        assert_eq!(seen.event_id, accepted.event_id, "nothing else was published before it");
        assert_eq!(seen.type_name, type_name);
        assert_eq!(seen.routing_key, accepted.routing_key);
        assert_eq!(Some(seen.routing_key.as_str()), sluice::events::routing_key_of(&type_name));
        assert_eq!(seen.correlation_id.as_deref(), Some("o-1"));
        assert_eq!(seen.delivery_mode, Some(2));
    }
    everything.close().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_stream_of_ten_thousand_events_is_acked_once_each_and_all_arrive() {
    let app = Bare::start().await;
    let connection = Connection::connect(&app.bus.url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("sink".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    channel.queue_bind("sink".into(), "sluice.events".into(), "payment.captured".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    const N: u64 = 10_000;
    let requests = tokio_stream::iter((0..N).map(|sequence| PublishStreamRequest {
        sequence,
        publish: Some(publish(any(&PaymentCaptured { order_id: format!("o-{sequence}"), amount_cents: 1, ..Default::default() }))),
    }));

    let started = tokio::time::Instant::now();
    let mut acks = app.client.clone().publish_stream(requests).await.unwrap().into_inner();
    let mut sequences = HashSet::new();
    let mut event_ids = HashSet::new();
    while let Some(ack) = acks.next().await {
        let ack = ack.unwrap();
        assert_eq!(ack.error_code, 0, "{ack:?}");
        assert!(sequences.insert(ack.sequence), "duplicate ack for {}", ack.sequence);
        assert!(event_ids.insert(ack.event_id));
    }
    let took = started.elapsed();
    assert_eq!(sequences.len() as u64, N);
    let queue = channel.queue_declare("sink".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    assert_eq!(u64::from(queue.message_count()), N, "every acked event is on the queue");
    println!("PublishStream: {N} events acked in {took:?} ({:.0}/s, debug build)", N as f64 / took.as_secs_f64());
    connection.close(200, "done".into()).await.unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_live_events_matching_their_patterns_and_leave_no_queue() {
    let app = Bare::start().await;
    let mut stream = app.client.clone().subscribe(SubscribeRequest { patterns: vec!["payment.*".into()] }).await.unwrap().into_inner();
    let mut orders = app.client.clone().subscribe(SubscribeRequest { patterns: vec!["order.*".into()] }).await.unwrap().into_inner();

    // Someone else publishes, inside their own trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(publish(any(&PaymentCaptured { order_id: "o-9".into(), ..Default::default() })));
    request.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    // With no OpenTelemetry layer in this test process the gateway cannot continue the trace
    // itself; the envelope must still report what the message carried.
    let accepted = app.client.clone().publish(request).await.unwrap().into_inner();
    app.client.clone().publish(publish(any(&OrderCreated { order_id: "o-9".into(), ..Default::default() }))).await.unwrap();
    app.client.clone().publish(publish(any(&PaymentDeclined { order_id: "o-9".into(), ..Default::default() }))).await.unwrap();

    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.event_id, accepted.event_id);
    assert_eq!(first.r#type, "sluice.v1.PaymentCaptured");
    assert_eq!(first.routing_key, "payment.captured");
    assert_eq!(first.correlation_id, "o-9");
    assert!(first.time.is_some());
    let payload: PaymentCaptured = PaymentCaptured::decode(first.payload.unwrap().value.as_slice()).unwrap();
    assert_eq!(payload.order_id, "o-9");
    let second = stream.next().await.unwrap().unwrap();
    assert_eq!(second.routing_key, "payment.declined", "order.created does not match payment.*");
    assert_eq!(orders.next().await.unwrap().unwrap().routing_key, "order.created");
    drop(orders);

    let bad = app.client.clone().subscribe(SubscribeRequest { patterns: vec!["Payment.*".into()] }).await.expect_err("bad pattern");
    assert_eq!(bad.code(), Code::InvalidArgument);

    // The subscription's queue goes away with the stream.
    drop(stream);
    let connection = Connection::connect(&app.bus.url, ConnectionProperties::default()).await.unwrap();
    let mut last = None;
    eventually(
        || async {
            let channel = connection.create_channel().await.ok()?;
            // Publishing payment.captured is unroutable once no subscriber queue is bound.
            let confirm = {
                channel.confirm_select(Default::default()).await.ok()?;
                channel
                    .basic_publish("sluice.events".into(), "payment.captured".into(), lapin::options::BasicPublishOptions { mandatory: true, ..Default::default() }, b"", Default::default())
                    .await
                    .ok()?
                    .await
                    .ok()?
            };
            Some(matches!(confirm, lapin::Confirmation::Ack(Some(_))))
        },
        |unroutable| *unroutable,
        &mut last,
    )
    .await
    .expect("the subscription queue was removed");
    let _ = connection.close(200, "done".into()).await;
    // A subscription still open does not hold up shutdown: it ends, with UNAVAILABLE.
    let mut open = app.client.clone().subscribe(SubscribeRequest { patterns: vec!["#".into()] }).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(10), app.stop()).await.expect("shutdown with a subscriber open");
    let ended = open.next().await.expect("a final status").expect_err("the stream ends with an error");
    assert_eq!(ended.code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_receives_the_trace_id_of_the_producer() {
    let app = Bare::start().await;
    let mut stream =
        app.client.clone().subscribe(SubscribeRequest { patterns: vec!["payment.captured".into()] }).await.unwrap().into_inner();

    // Another producer, not the gateway, publishes inside its own trace: the bus's wire format
    // (properties, CloudEvents and W3C headers) straight onto the exchange.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let paid = PaymentCaptured { order_id: "o-7".into(), amount_cents: 3_600, ..Default::default() };
    let mut traced = Envelope::of(&paid, "evt-traced");
    traced.trace = TraceContext { traceparent: Some(format!("00-{trace_id}-00f067aa0ba902b7-01")), tracestate: Some("vendor=1".into()) };
    let mut untraced = Envelope::of(&paid, "evt-untraced");
    untraced.trace = TraceContext::default();
    let connection = Connection::connect(&app.bus.url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    for envelope in [&traced, &untraced] {
        let confirm = channel
            .basic_publish(
                EXCHANGE.into(),
                PaymentCaptured::ROUTING_KEY.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &envelope.body,
                envelope.properties("billing"),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(matches!(confirm, lapin::Confirmation::Ack(None)), "routed to the subscriber's queue: {confirm:?}");
    }

    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.event_id, "evt-traced");
    assert_eq!(first.trace_id, trace_id, "the producer's trace id, from its traceparent header");
    let second = stream.next().await.unwrap().unwrap();
    assert_eq!(second.event_id, "evt-untraced");
    assert_eq!(second.trace_id, "", "no traceparent, no trace id");
    let _ = connection.close(200, "done".into()).await;
    drop(stream);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_dropped_and_told_it_lagged() {
    let app = Bare::start().await;
    // The subscriber reaches the gateway through a proxy that the test freezes: a client that
    // stops reading at the network level, whatever its HTTP/2 library buffers. Small HTTP/2
    // windows besides, so the gateway can hand the connection little before it must hold back.
    let proxy = Proxy::start(app.addr).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut stream = EventGatewayClient::new(channel).subscribe(SubscribeRequest { patterns: vec!["#".into()] }).await.unwrap().into_inner();
    proxy.freeze();
    // Publish far more than every buffer on the way holds: 3000 × 16 KiB = 48 MiB, against
    // HTTP/2 windows of 64 KiB and loopback socket buffers of a few MiB each way.
    let padding = "x".repeat(16 * 1024);
    let requests = tokio_stream::iter((0..3_000u64).map(move |sequence| PublishStreamRequest {
        sequence,
        publish: Some(publish(any(&PaymentCaptured { order_id: format!("o-{sequence}"), customer_id: padding.clone(), ..Default::default() }))),
    }));
    let mut acks = app.client.clone().publish_stream(requests).await.unwrap().into_inner();
    // Once the subscriber is dropped nothing is bound any more, and later publishes are
    // refused as unroutable: that is expected here.
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    proxy.thaw();
    let mut received = 0;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => received += 1,
                Err(status) => return Some(status),
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("the stream did not end; {received} events received"));
    let status = ended.expect("the stream ends with an error, not silently");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(received < 3_000, "a slow subscriber does not get an unbounded backlog ({received})");
    println!("slow subscriber: dropped after {received} of 3000 events, told {:?}", status.message());
    app.stop().await;
}

/// A gateway in a process of its own (so that its `/metrics` counts one test's calls alone)
/// with a byte budget of [`BUDGET`], reaching the broker through a proxy the test can freeze;
/// a durable queue takes every `payment.captured`.
struct Budgeted {
    gateway: child::Process,
    proxy: Proxy,
    ops: std::net::SocketAddr,
    client: EventGatewayClient<Channel>,
    connection: Connection,
    channel: lapin::Channel,
    _vhost: broker::Vhost,
    _broker: broker::BrokerGuard,
}

/// The byte budgets' size in these tests, and their events' (16 MiB in all: four budgets' worth).
const BUDGET: usize = 4 * 1024 * 1024;
const LARGE_EVENT: usize = 512 * 1024;
const LARGE_EVENTS: u64 = 32;
const LARGE_EVENTS_QUEUE: &str = "large-events";

impl Budgeted {
    /// `budget` names the budget set to [`BUDGET`].
    async fn start(budget: &str) -> Self {
        let broker = broker::shared().await;
        let vhost = broker::Vhost::create();
        let proxy = Proxy::start(broker::amqp_addr()).await;
        let grpc = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let ops = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let env = [
            ("SLUICE_AMQP_URL", proxy.url(&vhost.name)),
            ("SLUICE_GRPC_ADDR", grpc.to_string()),
            ("SLUICE_OPS_ADDR", ops.to_string()),
            (budget, BUDGET.to_string()),
            // No publish may time out while the test holds the broker out of reach.
            ("SLUICE_CONFIRM_TIMEOUT_MS", "120000".to_owned()),
        ]
        .map(|(name, value)| (name.to_owned(), value));
        let gateway = child::spawn("gateway", &env, None);
        eventually(|| async { Some(sluice::ops::probe(ops).await) }, |ready| *ready, &mut None).await.expect("the gateway became ready");
        // The gateway declared the exchange when it connected: bind the events' queue.
        let connection = Connection::connect(&vhost.url(), ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let queue = LARGE_EVENTS_QUEUE;
        channel.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default()).await.unwrap();
        channel.queue_bind(queue.into(), EXCHANGE.into(), PaymentCaptured::ROUTING_KEY.into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
        let client = EventGatewayClient::connect(format!("http://{grpc}")).await.unwrap();
        Self { gateway, proxy, ops, client, connection, channel, _vhost: vhost, _broker: broker }
    }

    /// Bytes the gauge `gauge` shows.
    async fn buffered(&self, gauge: &str) -> f64 {
        value(&scrape(self.ops).await, gauge)
    }

    /// Waits until `gauge` shows the budget nearly full (within two events of it), then checks
    /// that it stays within the budget over the next second.
    async fn holds_no_more_than_the_budget(&self, gauge: &str) {
        self.holds_at_most(gauge, (BUDGET - 2 * LARGE_EVENT) as f64, BUDGET as f64).await;
    }

    /// Waits until `gauge` shows more than `nearly` bytes, then checks that it stays at most
    /// `limit` over the next second.
    async fn holds_at_most(&self, gauge: &str, nearly: f64, limit: f64) {
        let mut last = None;
        let full = eventually(|| async { Some(self.buffered(gauge).await) }, |bytes| *bytes > nearly, &mut last)
            .await
            .unwrap_or_else(|| panic!("the gateway never held more than {nearly} bytes: {last:?} bytes buffered"));
        // Full, and it stays so: without the limit the gateway would read every event within
        // milliseconds.
        let mut most = full;
        let mut samples = tokio::time::interval(Duration::from_millis(100));
        for _ in 0..10 {
            samples.tick().await;
            most = most.max(self.buffered(gauge).await);
        }
        assert!(most <= limit, "{most} bytes buffered, over the limit of {limit}");
        println!("{gauge}: {full} bytes when full, at most {most} over the next second (limit {limit})");
    }

    /// The `published` events are on the queue once each, and nothing is left in `gauge`.
    async fn all_arrived(mut self, gauge: &str, published: u64) {
        let queued = self
            .channel
            .queue_declare(LARGE_EVENTS_QUEUE.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        assert_eq!(u64::from(queued.message_count()), published, "every event published reached the queue once");
        assert_eq!(self.buffered(gauge).await, 0.0, "nothing is left buffered");
        let _ = self.connection.close(200, "done".into()).await;
        child::terminate(&mut self.gateway);
    }
}

/// A `payment.captured` padded to [`LARGE_EVENT`] bytes.
fn large_event(sequence: u64) -> PublishRequest {
    publish(any(&PaymentCaptured { order_id: format!("o-{sequence}"), customer_id: "x".repeat(LARGE_EVENT), ..Default::default() }))
}

/// PublishStream holds at most `SLUICE_STREAM_BUFFER_BYTES` of events being published,
/// however many its count window (256) would allow: with the broker out of reach (a frozen
/// proxy), a stream of large events stops being read once that budget is full; once the broker
/// is back, every event is published and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_large_events_is_read_no_further_than_the_byte_budget() {
    const GAUGE: &str = "sluice_stream_buffered_bytes";
    let app = Budgeted::start("SLUICE_STREAM_BUFFER_BYTES").await;
    assert_eq!(value(&scrape(app.ops).await, r#"sluice_connection_up{link="gateway.publisher"}"#), 1.0);

    app.proxy.freeze();
    let requests = tokio_stream::iter((0..LARGE_EVENTS).map(|sequence| PublishStreamRequest { sequence, publish: Some(large_event(sequence)) }));
    let mut acks = app.client.clone().publish_stream(requests).await.unwrap().into_inner();
    app.holds_no_more_than_the_budget(GAUGE).await;

    app.proxy.thaw();
    let mut acked = 0;
    while let Some(ack) = tokio::time::timeout(Duration::from_secs(60), acks.next()).await.expect("every ack, once the broker is back") {
        let ack = ack.unwrap();
        assert_eq!(ack.error_code, 0, "event {} published: {}", ack.sequence, ack.error_message);
        acked += 1;
    }
    assert_eq!(acked, LARGE_EVENTS);
    app.all_arrived(GAUGE, LARGE_EVENTS).await;
}

/// PublishStream reads no more than its count window (`STREAM_WINDOW`, 256) of events ahead of
/// their acks: with the broker out of reach, a stream of 1,000 small events (far below the
/// byte budget) stops being read once 256 are being published; once the broker is back, every
/// event is published and acknowledged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_read_no_further_than_its_window_of_unacknowledged_events() {
    const GAUGE: &str = "sluice_stream_buffered_bytes";
    const EVENTS: u64 = 1_000;
    let window = sluice_gateway::STREAM_WINDOW as f64;
    let app = Budgeted::start("SLUICE_STREAM_BUFFER_BYTES").await;
    // Sequences of four digits: every request has the same size, so the bytes held count events.
    let request = |sequence: u64| {
        let event = PaymentCaptured { order_id: format!("o-{sequence}"), ..Default::default() };
        PublishStreamRequest { sequence, publish: Some(publish(any(&event))) }
    };
    let size = request(1_000).encoded_len() as f64;

    app.proxy.freeze();
    let requests = tokio_stream::iter((1_000..1_000 + EVENTS).map(request));
    let mut acks = app.client.clone().publish_stream(requests).await.unwrap().into_inner();
    app.holds_at_most(GAUGE, (window - 1.0) * size, window * size).await;

    app.proxy.thaw();
    let mut acked = HashSet::new();
    while let Some(ack) = tokio::time::timeout(Duration::from_secs(60), acks.next()).await.expect("every ack, once the broker is back") {
        let ack = ack.unwrap();
        assert_eq!(ack.error_code, 0, "event {} published: {}", ack.sequence, ack.error_message);
        assert!(acked.insert(ack.sequence), "event {} acknowledged once", ack.sequence);
    }
    assert_eq!(acked.len() as u64, EVENTS);
    app.all_arrived(GAUGE, EVENTS).await;
}

/// Unary calls hold at most `SLUICE_REQUEST_BUFFER_BYTES` of request messages: with the broker
/// out of reach, of 32 concurrent Publish calls of 512 KiB events on one connection, those that
/// fit in the budget are read and wait for the broker; the others are refused at once with
/// RESOURCE_EXHAUSTED, unread. Once the broker is back, every call that was read succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_publishes_are_read_no_further_than_the_byte_budget() {
    const GAUGE: &str = "sluice_request_buffered_bytes";
    let app = Budgeted::start("SLUICE_REQUEST_BUFFER_BYTES").await;

    app.proxy.freeze();
    let mut calls = tokio::task::JoinSet::new();
    for sequence in 0..LARGE_EVENTS {
        let mut client = app.client.clone();
        calls.spawn(async move { client.publish(large_event(sequence)).await });
    }
    app.holds_no_more_than_the_budget(GAUGE).await;
    // Until the broker is back, only refusals can answer.
    let mut answers = Vec::new();
    while let Some(answer) = calls.try_join_next() {
        answers.push(answer.unwrap().map(|_| ()));
        assert!(answers.iter().all(Result::is_err), "no event can be published while the broker is out of reach");
    }
    app.proxy.thaw();
    while let Some(answer) = tokio::time::timeout(Duration::from_secs(60), calls.join_next()).await.expect("every answer, once the broker is back") {
        answers.push(answer.unwrap().map(|_| ()));
    }
    let published = answers.iter().filter(|a| a.is_ok()).count() as u64;
    let refused: Vec<Code> = answers.iter().filter_map(|a| a.as_ref().err().map(tonic::Status::code)).collect();
    assert!(refused.iter().all(|code| *code == Code::ResourceExhausted), "calls that did not fit are RESOURCE_EXHAUSTED: {refused:?}");
    // 7 events of 512 KiB (and their envelopes) fit in 4 MiB.
    println!("of {LARGE_EVENTS} calls, {published} published and {} refused", refused.len());
    assert_eq!(published, (BUDGET / (LARGE_EVENT + 64)) as u64, "as many calls as the budget holds were read");
    assert_eq!(published + refused.len() as u64, LARGE_EVENTS);
    app.all_arrived(GAUGE, published).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_order_streams_each_change_until_a_terminal_status() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let accepted = app.place(an_order("SKU-1", 1, "tok_visa")).await.unwrap();

    let mut stream = app.gateway.clone().watch_order(sluice::pb::GetOrderRequest { order_id: accepted.order_id.clone() }).await.unwrap().into_inner();
    let mut statuses = Vec::new();
    while let Some(order) = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("a change or the end") {
        statuses.push(order.unwrap().status());
    }
    assert_eq!(statuses.last(), Some(&OrderStatus::Completed), "{statuses:?}");
    assert!(statuses.windows(2).all(|w| w[0] != w[1] || w[0] != OrderStatus::Completed), "the stream ends at the terminal status");

    let missing = app.gateway.clone().watch_order(sluice::pb::GetOrderRequest { order_id: "nope".into() }).await.expect_err("unknown order");
    assert_eq!(missing.code(), Code::NotFound);
    app.stop().await;
}
