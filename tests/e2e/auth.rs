//! Optional bearer-token auth: no token or a wrong token is UNAUTHENTICATED, a routing key or
//! pattern outside the token's grant is PERMISSION_DENIED, a valid token works, and health
//! stays open.

use sluice::config::BusConfig;
use sluice::events::{Event, OrderCreated, PaymentCaptured};
use sluice::pb::{PublishRequest, SubscribeRequest, event_gateway_client::EventGatewayClient};
use sluice::shutdown::Shutdown;
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::support::broker;

fn publish<E: Event>(event: &E, token: Option<&str>) -> Request<PublishRequest> {
    let any = prost_types::Any { type_url: format!("type.googleapis.com/{}", E::FULL_NAME), value: event.encode_to_vec() };
    let mut request = Request::new(PublishRequest { event: Some(any), idempotency_key: String::new() });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_against_their_grants() {
    let _broker = broker::shared().await;
    let vhost = broker::Vhost::create();
    let bus = BusConfig::for_url(vhost.url());
    let tokens = std::env::temp_dir().join(format!("sluice-tokens-{}.json", uuid::Uuid::new_v4().simple()));
    let grants = serde_json::json!([
        {"name": "payments", "sha256": sluice_gateway::token_hash("pay-token"), "publish": ["payment.*"], "subscribe": ["payment.#"]},
    ]);
    std::fs::write(&tokens, grants.to_string()).unwrap();
    let mut config = sluice_gateway::Config::for_bus(bus.clone());
    config.auth_tokens = Some(tokens.display().to_string());
    let gateway = sluice_gateway::Gateway::bind(config).await.unwrap();
    let addr = gateway.local_addr();
    let shutdown = Shutdown::new();
    shutdown.spawn(gateway.run(shutdown.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = EventGatewayClient::new(channel.clone());
    let mut sink = sluice::bus::Tap::open(&bus, &["#"]).await.unwrap();
    let paid = PaymentCaptured { order_id: "o-1".into(), ..Default::default() };

    let no_token = client.publish(publish(&paid, None)).await.expect_err("no token");
    assert_eq!(no_token.code(), Code::Unauthenticated);
    let wrong = client.publish(publish(&paid, Some("guess"))).await.expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(!wrong.message().contains("guess"), "the token is not echoed");
    let outside = client
        .publish(publish(&OrderCreated { order_id: "o-1".into(), ..Default::default() }, Some("pay-token")))
        .await
        .expect_err("outside the grant");
    assert_eq!(outside.code(), Code::PermissionDenied);
    let accepted = client.publish(publish(&paid, Some("pay-token"))).await.expect("within the grant").into_inner();
    assert_eq!(sink.next().await.unwrap().event_id, accepted.event_id, "only the granted publish reached the broker");

    let subscribe = |patterns: &[&str]| {
        let mut request = Request::new(SubscribeRequest { patterns: patterns.iter().map(|p| (*p).to_owned()).collect() });
        request.metadata_mut().insert("authorization", "Bearer pay-token".parse().unwrap());
        let mut client = client.clone();
        async move { client.subscribe(request).await.map(|_| ()) }
    };
    assert_eq!(subscribe(&["#"]).await.expect_err("wider than the grant").code(), Code::PermissionDenied);
    assert!(subscribe(&["payment.captured", "payment.*"]).await.is_ok());

    let health = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::Serving, "health needs no token");

    sink.close().await;
    shutdown.trigger();
    shutdown.wait().await;
    let _ = std::fs::remove_file(tokens);
}
