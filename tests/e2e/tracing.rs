//! One order, one trace: the gateway and every service run as their own processes, each
//! exporting spans over OTLP/gRPC to a collector in this test, and the order placed with a
//! caller's `traceparent` appears as a single trace across all of them. The log level does
//! not decide what is traced: every process but inventory logs at `warn` only. Events sent on a
//! PublishStream join the caller's trace when it sent one, and are traces of their own otherwise.
//! Each process exports its spans only when it stops (SIGTERM), as its binary does, on the
//! runtime its binary uses: nothing queued is lost at shutdown.

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use prost::Message as _;
use sluice::events::OrderCreated;
use sluice::pb::{
    OrderStatus, PublishRequest, PublishStreamRequest, event_gateway_client::EventGatewayClient, order_service_client::OrderServiceClient,
};
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};

use crate::{
    child,
    support::{an_order, broker, database::{Backend, Databases}, eventually, free_port, test_catalog, write_catalog},
};

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received { service: service.clone(), span });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn string_attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attribute(span, key)? {
        Value::StringValue(s) => Some(s.as_str()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Publishes two new orders' `order.created` on one PublishStream, with the caller's
/// `traceparent` if given, and returns their event ids once both are acked.
async fn stream_two_orders(grpc: SocketAddr, traceparent: Option<&str>) -> Vec<String> {
    let mut client = EventGatewayClient::connect(format!("http://{grpc}")).await.expect("the gateway serves the event API");
    let requests: Vec<PublishStreamRequest> = (0..2u64)
        .map(|sequence| {
            let order = an_order("SKU-1", 1, "tok_visa");
            let event = OrderCreated {
                order_id: uuid::Uuid::new_v4().to_string(),
                customer_id: order.customer_id,
                items: order.items,
                payment_token: order.payment_token,
                created_at: None,
            };
            let any = prost_types::Any { type_url: "type.googleapis.com/sluice.v1.OrderCreated".into(), value: event.encode_to_vec() };
            PublishStreamRequest { sequence, publish: Some(PublishRequest { event: Some(any), idempotency_key: String::new() }) }
        })
        .collect();
    let mut request = tonic::Request::new(tokio_stream::iter(requests));
    if let Some(traceparent) = traceparent {
        request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    }
    let mut acks = client.publish_stream(request).await.expect("PublishStream").into_inner();
    let mut event_ids = Vec::new();
    while let Some(ack) = acks.next().await {
        let ack = ack.expect("an ack");
        assert_eq!(ack.error_code, 0, "{ack:?}");
        event_ids.push(ack.event_id);
    }
    assert_eq!(event_ids.len(), 2, "both events acked");
    event_ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_every_process() {
    let _broker = broker::shared().await;
    let vhost = broker::Vhost::create();
    let mut databases = Databases::new(Backend::Sqlite);

    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let catalog = databases.file("catalog.json");
    write_catalog(&test_catalog(), &catalog);
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let common = |extra: Vec<(&str, String)>| -> Vec<(String, String)> {
        let mut env = vec![
            ("SLUICE_AMQP_URL".to_owned(), vhost.url()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), format!("http://{collector_addr}")),
            // No export on a timer: every span reaches the collector through the flush each
            // process does when it stops, so a process that loses its queued spans at SIGTERM
            // fails this test (the services did, on their single-threaded runtime).
            ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "600000".to_owned()),
            ("SLUICE_LOG_FORMAT".to_owned(), "json".to_owned()),
            ("RUST_LOG".to_owned(), "warn".to_owned()),
        ];
        env.extend(extra.into_iter().map(|(k, v)| (k.to_owned(), v)));
        env
    };

    let mut children = Vec::new();
    let mut ready_probes = Vec::new();
    let mut inventory_logs = None;
    for name in ["inventory", "payment", "notification", "orders"] {
        let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        ready_probes.push(ops);
        let mut extra = vec![("DATABASE_URL", databases.url_for(name).await), ("SLUICE_OPS_ADDR", ops.to_string())];
        if name == "inventory" {
            extra.push(("SLUICE_CATALOG", catalog.display().to_string()));
            // Its log lines are checked for the trace id below.
            extra.push(("RUST_LOG", "info".to_owned()));
        }
        let stdout = (name == "inventory").then(Stdio::piped);
        let mut process = child::spawn(name, &common(extra), stdout);
        if name == "inventory" {
            inventory_logs = process.0.stdout.take();
        }
        children.push(process);
    }
    let inventory_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = inventory_lines.clone();
        let stdout = inventory_logs.unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        })
    };
    children.push(child::spawn("gateway", &common(vec![("SLUICE_GRPC_ADDR", grpc.to_string()), ("SLUICE_OPS_ADDR", "off".into())]), None));
    // Every service consumes (its queues exist) before the first order: an event published
    // before a subscriber's queue exists never reaches that subscriber.
    for ops in ready_probes {
        eventually(|| async { Some(sluice::ops::probe(ops).await) }, |ready| *ready, &mut None)
            .await
            .unwrap_or_else(|| panic!("the service with ops endpoint {ops} never became ready"));
    }

    // The caller's own trace: the gateway must join it.
    let caller_trace = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let mut last = None;
    let client = eventually(
        || async { OrderServiceClient::connect(format!("http://{grpc}")).await.ok() },
        |_| true,
        &mut last,
    )
    .await
    .expect("the gateway process serves");
    // Wait until the whole platform accepts orders, then place the traced one, once.
    eventually(
        || {
            let mut client = client.clone();
            async move { client.place_order(an_order("SKU-1", 1, "tok_visa")).await.ok() }
        },
        |_| true,
        &mut None,
    )
    .await
    .expect("PlaceOrder succeeds once the services are up");
    let place = |traceparent: String| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(an_order("SKU-1", 1, "tok_visa"));
            request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
            let accepted = client.place_order(request).await.expect("the traced PlaceOrder").into_inner();
            let mut last = None;
            let order = eventually(
                || {
                    let mut client = client.clone();
                    let id = accepted.order_id.clone();
                    async move { client.get_order(sluice::pb::GetOrderRequest { order_id: id }).await.ok().map(|r| r.into_inner()) }
                },
                |o| o.status() == OrderStatus::Completed && o.history.len() == 4,
                &mut last,
            )
            .await
            .unwrap_or_else(|| panic!("order {} ({traceparent}) did not complete; last seen: {last:?}", accepted.order_id));
            assert_eq!(order.status(), OrderStatus::Completed);
            accepted
        }
    };
    let accepted = place(traceparent).await;
    // A caller that decided not to sample (flag 00): every process follows its decision (the
    // default sampler is parent-based), so none of the order's spans is exported, though its
    // log lines still carry the trace id.
    let unsampled_trace = uuid::Uuid::new_v4().simple().to_string();
    let unsampled = place(format!("00-{unsampled_trace}-{caller_span}-00")).await;
    drop(client);

    // PublishStream, once inside a caller's trace and once outside any.
    let stream_trace = uuid::Uuid::new_v4().simple().to_string();
    let stream_caller = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let joined = stream_two_orders(grpc, Some(&format!("00-{stream_trace}-{stream_caller}-01"))).await;
    let untraced = stream_two_orders(grpc, None).await;

    // SIGTERM every process: each flushes its spans as it exits.
    for process in &mut children {
        child::terminate(process);
    }
    let _ = reader.join();
    server.abort();

    let all: Vec<Received> = collector.spans.lock().unwrap().clone();
    // A streamed event's PRODUCER span in the gateway, by the event id the ack returned.
    let producer_of = |event_id: &str| {
        all.iter()
            .find(|r| r.service == "sluice-gateway" && r.span.kind() == SpanKind::Producer && string_attribute(&r.span, "messaging.message.id") == Some(event_id))
            .unwrap_or_else(|| panic!("no PRODUCER span for the streamed event {event_id}"))
    };
    for event_id in &joined {
        let producer = producer_of(event_id);
        assert_eq!(hex(&producer.span.trace_id), stream_trace, "a streamed event joins the caller's trace");
        let server = all
            .iter()
            .find(|r| r.span.span_id == producer.span.parent_span_id)
            .expect("the streamed event's PRODUCER span has its parent in the trace");
        assert_eq!((server.service.as_str(), server.span.kind()), ("sluice-gateway", SpanKind::Server));
        assert_eq!(server.span.name, "sluice.v1.EventGateway/PublishStream");
        assert_eq!(hex(&server.span.parent_span_id), stream_caller, "the call's server span hangs off the caller's span");
    }
    let untraced_traces: BTreeSet<String> = untraced
        .iter()
        .map(|event_id| {
            let producer = producer_of(event_id);
            assert!(producer.span.parent_span_id.is_empty(), "without a caller's trace a streamed event starts its own");
            hex(&producer.span.trace_id)
        })
        .collect();
    assert_eq!(untraced_traces.len(), 2, "one trace per event: {untraced_traces:?}");
    assert!(!untraced_traces.contains(&stream_trace) && !untraced_traces.contains(&caller_trace));

    let exported: Vec<&str> = all.iter().filter(|r| hex(&r.span.trace_id) == unsampled_trace).map(|r| r.span.name.as_str()).collect();
    assert!(exported.is_empty(), "spans of the caller's unsampled trace were exported: {exported:?}");

    let spans: Vec<Received> = all
        .iter()
        .filter(|r| hex(&r.span.trace_id) == caller_trace)
        .cloned()
        .collect();
    let by_id: HashMap<String, &Received> = spans.iter().map(|r| (hex(&r.span.span_id), r)).collect();
    // The README's count: the gateway's server and PRODUCER spans, a CONSUMER and a handler span
    // for each of the 9 deliveries, and a PRODUCER for each of the 3 events the services emit.
    let names: Vec<(&str, &str)> = spans.iter().map(|r| (r.service.as_str(), r.span.name.as_str())).collect();
    assert_eq!(spans.len(), 2 + 9 * 2 + 3, "an order makes 23 spans: {names:#?}");
    let services: BTreeSet<&str> = spans.iter().map(|r| r.service.as_str()).collect();
    let expected: BTreeSet<&str> = ["sluice-gateway", "sluice-inventory", "sluice-payment", "sluice-notification", "sluice-orders"].into();
    assert!(services.is_superset(&expected), "services in the trace: {services:?}");

    // Exactly one span hangs off the caller; every other span's parent is in the trace.
    let roots: Vec<&Received> = spans.iter().filter(|r| hex(&r.span.parent_span_id) == caller_span).collect();
    assert_eq!(roots.len(), 1, "one server span joins the caller: {roots:#?}");
    assert_eq!(roots[0].service, "sluice-gateway");
    assert_eq!(roots[0].span.kind(), SpanKind::Server);
    for r in &spans {
        let parent = hex(&r.span.parent_span_id);
        assert!(parent == caller_span || by_id.contains_key(&parent), "orphan span {} in {}", r.span.name, r.service);
    }

    // The causal chain, hop by hop: each consumer's parent is the producer of its message.
    let hop = |service: &str, queue: &str, producer_service: &str, routing_key: &str| {
        let consumer = spans
            .iter()
            .find(|r| r.service == service && r.span.name == format!("process {queue}"))
            .unwrap_or_else(|| panic!("no consumer span for {queue}"));
        assert_eq!(consumer.span.kind(), SpanKind::Consumer);
        for key in ["messaging.system", "messaging.destination.name", "messaging.rabbitmq.destination.routing_key", "messaging.message.id", "messaging.operation.type", "server.address"] {
            assert!(attribute(&consumer.span, key).is_some(), "{key} missing on {}", consumer.span.name);
        }
        assert_eq!(string_attribute(&consumer.span, "messaging.system"), Some("rabbitmq"));
        assert_eq!(string_attribute(&consumer.span, "order_id"), Some(accepted.order_id.as_str()));
        let producer = by_id[&hex(&consumer.span.parent_span_id)];
        assert_eq!(producer.service, producer_service, "{queue} is fed by {producer_service}");
        assert_eq!(producer.span.kind(), SpanKind::Producer);
        assert_eq!(producer.span.name, format!("send sluice.events:{routing_key}"));
        assert_eq!(string_attribute(&producer.span, "messaging.rabbitmq.destination.routing_key"), Some(routing_key));
    };
    hop("sluice-inventory", "inventory.reserve-stock", "sluice-gateway", "order.created");
    hop("sluice-payment", "payment.capture-payment", "sluice-inventory", "inventory.reserved");
    hop("sluice-notification", "notification.notify-confirmation", "sluice-payment", "payment.captured");
    hop("sluice-orders", "orders.track-notification-sent", "sluice-notification", "notification.sent");
    hop("sluice-orders", "orders.track-order-created", "sluice-gateway", "order.created");

    // Logs of a handled delivery carry the trace id of its span.
    let lines = inventory_lines.lock().unwrap();
    let reserved = lines.iter().find(|l| l.contains("stock reserved") && l.contains(&accepted.order_id)).expect("inventory logged the reservation");
    let line: serde_json::Value = serde_json::from_str(reserved).expect("a JSON log line");
    assert_eq!(line["trace_id"], caller_trace.as_str(), "the log line carries the trace id: {reserved}");
    let process = spans.iter().find(|r| r.span.name == "process inventory.reserve-stock").expect("the reservation's consumer span");
    let handle = spans
        .iter()
        .find(|r| r.span.parent_span_id == process.span.span_id && r.span.name.ends_with(" handle"))
        .expect("the reservation's handler span");
    assert_eq!(line["span_id"], hex(&handle.span.span_id).as_str(), "and the id of the span it was logged in: {reserved}");
    assert_eq!(line["order_id"], accepted.order_id.as_str(), "and the order id, at the top level: {reserved}");
    let delivered = string_attribute(&process.span, "messaging.message.id").expect("the delivery's message id");
    assert_eq!(line["event_id"], delivered, "and the id of the event being handled: {reserved}");
    println!("inventory's log line: {reserved}");
    let unsampled_line = lines
        .iter()
        .find(|l| l.contains("stock reserved") && l.contains(&unsampled.order_id))
        .expect("inventory logged the unsampled order's reservation");
    let unsampled_line: serde_json::Value = serde_json::from_str(unsampled_line).expect("a JSON log line");
    assert_eq!(unsampled_line["trace_id"], unsampled_trace.as_str(), "an unsampled order's log lines carry its trace id: {unsampled_line}");

    // The tree, for the record.
    fn print(tree: &HashMap<String, Vec<&Received>>, id: &str, depth: usize) {
        for child in tree.get(id).map(Vec::as_slice).unwrap_or_default() {
            println!("{}{} [{}]", "  ".repeat(depth), child.span.name, child.service);
            print(tree, &hex(&child.span.span_id), depth + 1);
        }
    }
    let mut tree: HashMap<String, Vec<&Received>> = HashMap::new();
    for r in &spans {
        tree.entry(hex(&r.span.parent_span_id)).or_default().push(r);
    }
    for children in tree.values_mut() {
        children.sort_by_key(|r| r.span.start_time_unix_nano);
    }
    println!("trace {caller_trace}: {} spans", spans.len());
    print(&tree, caller_span, 1);
}
