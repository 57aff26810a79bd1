//! `sluice::bus::admin` against the real management API: a vhost is created with the user's
//! permissions, its queues and an exchange's bindings are listed, it is deleted; a wrong
//! password is an error that names the URL and the HTTP status, and so is `dlq list` at an API
//! that does not answer.

use lapin::{
    Connection, ConnectionProperties, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use sluice::bus::admin::{Admin, Binding};
use sluice::bus::dlq::DeadLetters;
use sluice::config::BusConfig;

use crate::support::{broker, eventually};

/// Runs `call` on the test user's client, off the async workers (the client blocks).
async fn blocking<T: Send + 'static>(call: impl FnOnce(&Admin) -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(move || call(broker::admin())).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_is_created_listed_with_its_queue_and_binding_and_deleted() {
    let _broker = broker::shared().await;
    let name = format!("sluice-test-admin-{}", uuid::Uuid::new_v4().simple());
    let version = blocking(Admin::version).await.unwrap();
    assert!(version.is_some_and(|v| !v.is_empty()));

    // Create: the user may then connect to it and declare things.
    let vhost = name.clone();
    blocking(move |admin| admin.create_vhost(&vhost)).await.unwrap();
    let connection = Connection::connect(&format!("{}/{name}", broker::amqp_base()), ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare("admin.events".into(), ExchangeKind::Topic, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    channel.queue_declare("admin.orders".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    channel
        .queue_bind("admin.orders".into(), "admin.events".into(), "order.*".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    connection.close(200, "declared".into()).await.unwrap();

    // Listed: the queue of the vhost, and the binding of the exchange.
    let vhost = name.clone();
    let listed = eventually(
        || {
            let vhost = vhost.clone();
            async move { blocking(move |admin| admin.queue_names(&vhost)).await.ok() }
        },
        |queues| queues[..] == ["admin.orders"],
        &mut None,
    )
    .await;
    assert!(listed.is_some(), "admin.orders was never listed in {name}");
    let vhost = name.clone();
    let bindings = blocking(move |admin| admin.bindings(&vhost, "admin.events")).await.unwrap();
    let expected = Binding { destination: "admin.orders".into(), destination_type: "queue".into(), routing_key: "order.*".into() };
    assert_eq!(bindings, [expected]);
    // The default vhost is `/`, which goes into the path encoded.
    blocking(|admin| admin.queue_names("/")).await.unwrap();

    // Deleted: the API no longer knows it.
    let vhost = name.clone();
    blocking(move |admin| admin.delete_vhost(&vhost)).await.unwrap();
    let vhost = name.clone();
    let gone = blocking(move |admin| admin.queue_names(&vhost)).await.unwrap_err();
    assert_eq!(gone.status(), Some(404), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_error_naming_the_url_and_the_http_status() {
    let mut amqp = url::Url::parse(&broker::amqp_base()).unwrap();
    amqp.set_password(Some("not-the-password")).unwrap();
    let api = broker::api_base();
    let wrong = Admin::new(amqp.as_str(), &api).unwrap();

    let error = tokio::task::spawn_blocking(move || wrong.queue_names("/")).await.unwrap().unwrap_err();

    assert_eq!(error.status(), Some(401), "{error}");
    let text = error.to_string();
    assert!(text.starts_with(&format!("GET {}/api/queues/%2F?columns=name: HTTP 401", api.trim_end_matches('/'))), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_at_an_api_that_does_not_answer_names_it() {
    let _broker = broker::shared().await;
    let vhost = broker::Vhost::create();
    let dead_letters = DeadLetters::connect(&BusConfig::for_url(vhost.url())).await.unwrap();
    // Nothing listens on port 1.
    let api = "http://127.0.0.1:1";

    let error = dead_letters.list(api).await.unwrap_err().to_string();

    let prefix = format!("broker unavailable: RabbitMQ management API: GET {api}/api/queues/{}?columns=name: ", vhost.name);
    assert!(error.starts_with(&prefix), "{error}");
    dead_letters.close().await;
}
