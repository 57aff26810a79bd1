//! TLS on both sides of the gateway, with certificates made by the test (a private CA):
//! the gRPC port with `SLUICE_TLS_CERT`/`SLUICE_TLS_KEY` (health, reflection and the API over
//! real handshakes; plaintext and untrusting clients refused), and `amqps://` to the broker
//! with `SLUICE_AMQP_CA_FILE` for every process, through a TLS-terminating proxy.

use std::time::Duration;

use sluice::bus::Publisher;
use sluice::config::BusConfig;
use sluice::pb::{
    OrderStatus, SubscribeRequest, event_gateway_client::EventGatewayClient, order_service_client::OrderServiceClient,
};
use sluice::shutdown::Shutdown;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::support::{Backend, Options, TestApp, an_order, eventually, tls::TestPki};

/// A TLS channel to `addr` that trusts `ca_pem` and expects the name `localhost`.
async fn tls_channel(addr: std::net::SocketAddr, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem)).domain_name("localhost");
    Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.connect_timeout(Duration::from_secs(5)).connect().await
}

async fn health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let reply = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(reply.into_inner().status())
}

/// The gateway's configuration as its process reads it from the environment.
fn gateway_config(pairs: &[(&'static str, String)]) -> Result<sluice_gateway::Config, sluice::config::ConfigError> {
    struct Vars<'a>(&'a [(&'static str, String)]);
    impl sluice::config::Source for Vars<'_> {
        fn get(&self, name: &str) -> Option<String> {
            self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
        }
    }
    sluice_gateway::Config::from_source(&Vars(pairs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_gateway_serves_clients_that_trust_its_ca_and_nobody_else() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let pki = TestPki::generate();
    // A second gateway in front of the same platform, configured as the binary is.
    let config = gateway_config(&[
        ("SLUICE_AMQP_URL", app.bus.url.clone()),
        ("SLUICE_GRPC_ADDR", "127.0.0.1:0".into()),
        ("SLUICE_OPS_ADDR", "off".into()),
        ("SLUICE_TLS_CERT", pki.cert_file().display().to_string()),
        ("SLUICE_TLS_KEY", pki.key_file().display().to_string()),
    ])
    .expect("a valid TLS configuration");
    let gateway = sluice_gateway::Gateway::bind(config).await.unwrap();
    let addr = gateway.local_addr();
    let shutdown = Shutdown::new();
    shutdown.spawn(gateway.run(shutdown.clone()));

    // A real handshake, verifying the certificate against the test CA.
    let channel = tls_channel(addr, &pki.ca_pem).await.expect("a TLS connection trusting the test CA");
    assert_eq!(health(channel.clone()).await.unwrap(), ServingStatus::Serving, "health over TLS");
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
            server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
        let mut replies =
            ServerReflectionClient::new(channel.clone()).server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) = replies.next().await.unwrap().unwrap().message_response else {
            panic!("no service list over TLS")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&"sluice.v1.EventGateway".to_owned()), "reflection over TLS: {names:?}");
    }
    let accepted = OrderServiceClient::new(channel.clone())
        .place_order(an_order("SKU-1", 1, "tok_visa"))
        .await
        .expect("PlaceOrder over TLS")
        .into_inner();
    assert_eq!(app.wait_for_outcome(&accepted.order_id).await.status(), OrderStatus::Completed);

    // Plaintext HTTP/2 against the TLS port: no answer, however it fails.
    let plaintext = tokio::time::timeout(Duration::from_secs(10), async {
        let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await?;
        health(channel).await.map_err(Into::into)
    })
    .await
    .expect("a plaintext client fails promptly");
    let plaintext: Result<ServingStatus, Box<dyn std::error::Error + Send + Sync>> = plaintext;
    assert!(plaintext.is_err(), "a plaintext client got an answer from the TLS port: {plaintext:?}");
    // A client that trusts another CA refuses the certificate.
    let stranger = TestPki::generate_named("Some other CA");
    let refused = match tls_channel(addr, &stranger.ca_pem).await {
        Err(error) => Err(error.to_string()),
        Ok(channel) => health(channel).await.map_err(|status| status.to_string()),
    };
    assert!(refused.is_err(), "a client trusting another CA accepted the certificate");

    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(30), shutdown.wait()).await.expect("the TLS gateway stops");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_stop_the_gateway_at_start_up_naming_the_variable() {
    let pki = TestPki::generate();
    let other = TestPki::generate_named("Another CA");
    let cert = pki.cert_file().display().to_string();
    let key = pki.key_file().display().to_string();
    let refused = |pairs: &[(&'static str, String)]| gateway_config(pairs).expect_err("refused at start-up");

    let missing = refused(&[("SLUICE_TLS_CERT", pki.file("missing.pem").display().to_string()), ("SLUICE_TLS_KEY", key.clone())]);
    assert_eq!(missing.name, "SLUICE_TLS_CERT", "{missing}");
    let alone = refused(&[("SLUICE_TLS_CERT", cert.clone())]);
    assert_eq!(alone.name, "SLUICE_TLS_KEY", "{alone}");
    // The key file where the certificate belongs: no certificate in it.
    let swapped = refused(&[("SLUICE_TLS_CERT", key.clone()), ("SLUICE_TLS_KEY", key.clone())]);
    assert_eq!(swapped.name, "SLUICE_TLS_CERT", "{swapped}");
    // Another certificate's key.
    let mismatched = refused(&[("SLUICE_TLS_CERT", cert.clone()), ("SLUICE_TLS_KEY", other.key_file().display().to_string())]);
    assert_eq!(mismatched.name, "SLUICE_TLS_KEY", "{mismatched}");
    println!("refused: {mismatched}");
    // And the broker's CA file.
    let plain_url = refused(&[("SLUICE_AMQP_CA_FILE", pki.ca_file().display().to_string())]);
    assert_eq!(plain_url.name, "SLUICE_AMQP_CA_FILE", "a CA file with an amqp:// URL: {plain_url}");
    let not_a_ca = refused(&[("SLUICE_AMQP_URL", "amqps://guest:guest@localhost/v".into()), ("SLUICE_AMQP_CA_FILE", key)]);
    assert_eq!(not_a_ca.name, "SLUICE_AMQP_CA_FILE", "{not_a_ca}");
    assert!(
        gateway_config(&[("SLUICE_TLS_CERT", cert), ("SLUICE_TLS_KEY", pki.key_file().display().to_string())]).unwrap().tls.is_some(),
        "the matching pair is accepted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_reaches_the_broker_over_amqps_trusting_a_private_ca() {
    // The gateway and three services in-process, inventory as a process of its own configured
    // with SLUICE_AMQP_URL=amqps://... and SLUICE_AMQP_CA_FILE: every connection goes through
    // the TLS proxy.
    let app = TestApp::spawn_opts(Options { amqps: true, external: vec!["inventory"], ..Options::new(Backend::Sqlite) }).await;
    let amqps = app.amqps.as_ref().unwrap();
    let in_process = amqps.proxy.handshakes();
    assert!(in_process >= 2, "the gateway's publisher and request/reply links are TLS ({in_process} handshakes)");
    let env = app.service_env("inventory");
    assert!(env.iter().any(|(k, v)| k == "SLUICE_AMQP_URL" && v.starts_with("amqps://guest:guest@localhost:")), "{env:?}");
    let _inventory = crate::child::spawn("inventory", &env, None);
    let mut last = None;
    eventually(
        || async { app.rpc.call(&sluice::pb::GetStockRequest { sku: "SKU-1".into() }, Duration::from_millis(500)).await.ok() },
        |_| true,
        &mut last,
    )
    .await
    .expect("the inventory process answers over amqps");
    let with_inventory = amqps.proxy.handshakes();
    assert!(with_inventory > in_process, "the inventory process connected through the TLS proxy");

    // The gateway's Subscribe opens a connection of its own, to the same amqps:// URL (the
    // gateway has no other way to the broker).
    let mut events = EventGatewayClient::connect(format!("http://{}", app.addr))
        .await
        .unwrap()
        .subscribe(SubscribeRequest { patterns: vec!["order.created".into()] })
        .await
        .unwrap()
        .into_inner();
    let mut tap = app.tap(&["order.created"]).await;

    let accepted = app.place(an_order("SKU-1", 2, "tok_visa")).await.expect("PlaceOrder over amqps");
    let published = tap.next().await.expect("order.created on the broker");
    assert_eq!(published.event_id, accepted.event_id, "the order was published (seen directly on the broker)");
    let streamed = tokio::time::timeout(Duration::from_secs(10), events.next()).await.expect("an event").unwrap().unwrap();
    assert_eq!(streamed.event_id, accepted.event_id);
    let order = app.wait_for_outcome(&accepted.order_id).await;
    assert_eq!(order.status(), OrderStatus::Completed, "every service handled it over amqps: {order:#?}");

    // Without the CA, the broker's certificate is not trusted.
    let untrusting = BusConfig::for_url(amqps.proxy.url(app.vhost()));
    let before = amqps.proxy.handshakes();
    let refused = Publisher::connect(&untrusting, "untrusting").await.err().expect("no connection without the CA");
    println!("without the CA: {refused}");
    assert_eq!(amqps.proxy.handshakes(), before, "no handshake completed without the CA");
    println!("amqps: {} TLS handshakes through the proxy", amqps.proxy.handshakes());

    drop(events);
    tap.close().await;
    app.stop().await;
}
