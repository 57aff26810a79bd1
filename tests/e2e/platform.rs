//! What operators and tools see: health, reflection, NOT_FOUND, and prompt UNAVAILABLE or
//! DEADLINE_EXCEEDED when the service behind a call is missing or silent.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties, options::QueueDeclareOptions, types::FieldTable};
use sluice::config::BusConfig;
use sluice::pb::{GetOrderRequest, order_service_client::OrderServiceClient};
use sluice::shutdown::Shutdown;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::support::{Backend, TestApp, an_order, broker::Vhost};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_unknown_orders() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr)).unwrap().connect().await.unwrap();

    let health = HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);

    // grpcurl speaks v1alpha; newer tools speak v1. Both list our services.
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut replies = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = replies.next().await.unwrap().unwrap().message_response else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"sluice.v1.OrderService".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("sluice.v1.OrderService".into())),
        };
        let mut replies =
            ServerReflectionClient::new(channel).server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
        assert!(replies.next().await.unwrap().is_ok(), "v1 reflection answers");
    }

    let missing = app.get("no-such-order").await.expect_err("unknown order");
    assert_eq!(missing.code(), Code::NotFound);
    let empty = app.get("").await.expect_err("empty order id");
    assert_eq!(empty.code(), Code::InvalidArgument);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_fast_when_the_service_behind_them_is_missing_or_silent() {
    let _broker = crate::support::broker::shared().await;
    let vhost = Vhost::create();
    let bus = BusConfig::for_url(vhost.url());
    let mut config = sluice_gateway::Config::for_bus(bus.clone());
    config.query_timeout = Duration::from_millis(500);
    let gateway = sluice_gateway::Gateway::bind(config).await.unwrap();
    let addr = gateway.local_addr();
    let shutdown = Shutdown::new();
    shutdown.spawn(gateway.run(shutdown.clone()));
    let mut client = OrderServiceClient::connect(format!("http://{addr}")).await.unwrap();

    // No inventory and no orders service: nothing can answer. UNAVAILABLE, at once.
    let started = tokio::time::Instant::now();
    let status = client.place_order(an_order("SKU-1", 1, "tok_visa")).await.expect_err("no inventory");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = client.get_order(GetOrderRequest { order_id: "o-1".into() }).await.expect_err("no orders service");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(500), "unroutable requests fail without waiting");

    // A request queue nobody consumes: our own timeout is UNAVAILABLE, the caller's deadline
    // is DEADLINE_EXCEEDED. Neither hangs.
    let connection = Connection::connect(&bus.url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("orders.get-order".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    let status = client.get_order(GetOrderRequest { order_id: "o-1".into() }).await.expect_err("silent orders service");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The header a client's deadline sends, over a client with no timer of its own: tonic's
    // channel starts one from this header and would race the gateway's answer (it reports
    // CANCELLED when it wins), so only the gateway can end this call. No Nagle delay either:
    // the request's end would wait ~40 ms for an ACK while the server's timer runs.
    let origin: tonic::codegen::http::Uri = format!("http://{addr}").parse().unwrap();
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let untimed = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build(connector);
    let mut untimed = OrderServiceClient::with_origin(untimed, origin);
    let mut request = tonic::Request::new(GetOrderRequest { order_id: "o-1".into() });
    request.metadata_mut().insert("grpc-timeout", "200m".parse().unwrap());
    let started = tokio::time::Instant::now();
    let status = untimed.get_order(request).await.expect_err("caller deadline");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?} after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2), "a caller deadline ends the call promptly: {:?}", started.elapsed());

    connection.close(200, "done".into()).await.unwrap();
    shutdown.trigger();
    shutdown.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_resource_exhausted_while_health_stays_serving() {
    let _broker = crate::support::broker::shared().await;
    let vhost = Vhost::create();
    let bus = BusConfig::for_url(vhost.url());
    let mut config = sluice_gateway::Config::for_bus(bus.clone());
    config.max_concurrent_requests = 2;
    config.query_timeout = Duration::from_secs(3);
    let gateway = sluice_gateway::Gateway::bind(config).await.unwrap();
    let addr = gateway.local_addr();
    let shutdown = Shutdown::new();
    shutdown.spawn(gateway.run(shutdown.clone()));
    let client = OrderServiceClient::connect(format!("http://{addr}")).await.unwrap();

    // An orders queue nobody answers: two GetOrder calls occupy the whole limit.
    let connection = Connection::connect(&bus.url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare("orders.get-order".into(), durable, FieldTable::default()).await.unwrap();
    let slow = |id: &'static str| {
        let mut client = client.clone();
        tokio::spawn(async move { client.get_order(GetOrderRequest { order_id: id.into() }).await })
    };
    let (first, second) = (slow("o-1"), slow("o-2"));
    let mut last = None;
    crate::support::eventually(
        || async {
            let q = channel
                .queue_declare("orders.get-order".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
                .await
                .ok()?;
            Some(q.message_count())
        },
        |n| *n == 2,
        &mut last,
    )
    .await
    .expect("both slow calls are in flight");

    let started = tokio::time::Instant::now();
    let shed = client.clone().get_order(GetOrderRequest { order_id: "o-3".into() }).await.expect_err("over the limit");
    assert_eq!(shed.code(), Code::ResourceExhausted, "{shed:?}");
    assert!(started.elapsed() < Duration::from_millis(500), "shed at once, not queued");
    let channel_to_gateway = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let health = HealthClient::new(channel_to_gateway).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::Serving, "health is never shed");

    assert_eq!(first.await.unwrap().expect_err("silent service").code(), Code::Unavailable);
    assert_eq!(second.await.unwrap().expect_err("silent service").code(), Code::Unavailable);
    let status = client.clone().place_order(an_order("SKU-1", 1, "tok_visa")).await.expect_err("no inventory");
    assert_eq!(status.code(), Code::Unavailable, "accepted again once the limit freed up: {status:?}");

    let _ = connection.close(200, "done".into()).await;
    shutdown.trigger();
    shutdown.wait().await;
}
