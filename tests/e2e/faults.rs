//! Delivery guarantees under faults: a dropped connection, a silent broker, a broker restart
//! and a memory alarm. Each test fails if its guarantee is removed: every order the gateway
//! confirmed must complete exactly once, and calls made during the fault must fail fast.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use sluice::{
    bus::{Consumer, Context, Handler, HandlerError, Publisher},
    config::BusConfig,
    events::OrderCreated,
    pb::OrderStatus,
    shutdown::Shutdown,
    store::Store,
};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::support::{Backend, Options, TestApp, an_order, broker, database::Databases, eventually, load::{Shared, load, until}, proxy::{self, Cut}};

async fn health(app: &TestApp) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr)).ok()?.connect().await.ok()?;
    let mut client = HealthClient::new(channel);
    Some(client.check(HealthCheckRequest { service: String::new() }).await.ok()?.into_inner().status())
}

async fn wait_health(app: &TestApp, wanted: ServingStatus) {
    let mut last = None;
    eventually(|| async { health(app).await }, |s| *s == wanted, &mut last)
        .await
        .unwrap_or_else(|| panic!("health never became {wanted:?}; last {last:?}"));
}

/// Every accepted order reached COMPLETED, with each lifecycle event exactly once (the
/// history must be exactly created → reserved → captured → notified).
async fn assert_all_completed_once(app: &TestApp, accepted: &[String]) {
    let waited = futures_util::future::join_all(accepted.iter().map(|id| app.try_wait_for_outcome(id))).await;
    let stuck: Vec<String> = accepted
        .iter()
        .zip(&waited)
        .filter_map(|(id, w)| w.as_ref().err().map(|last| format!("{id}: {:?}", last.as_ref().map(|o| o.status()))))
        .collect();
    if !stuck.is_empty() {
        panic!("{} of {} orders did not complete: {stuck:?}\nqueues:\n{}", stuck.len(), accepted.len(), app.queue_report().await);
    }
    let outcomes: Vec<_> = waited.into_iter().flatten().collect();
    for order in &outcomes {
        assert_eq!(order.status(), OrderStatus::Completed, "{order:#?}");
        assert_eq!(order.history.len(), 4, "each event projected once: {order:#?}");
    }
}

/// Stock bookkeeping stayed whole: nothing is left reserved once every order settled, and at
/// least the accepted orders were sold (an order whose confirm was lost may also be sold).
async fn assert_stock_settled(app: &TestApp, sku: &str, before: i64, accepted: usize) {
    let mut last = None;
    let Some(stock) = eventually(|| async { Some(app.stock(sku).await) }, |s| s.reserved == 0, &mut last).await else {
        // Where the order that holds it stopped: a queue holding its next event, or a retry.
        panic!("stock of {sku} still reserved: {last:?}\nqueues:\n{}", app.queue_report().await);
    };
    let sold = before - stock.available;
    assert!(sold >= accepted as i64, "sold {sold} < accepted {accepted}");
}

/// How many times the dropped-connection test cuts every connection.
const CUTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_loses_nothing_doubles_nothing_and_heals() {
    let app = TestApp::spawn_opts(Options { proxy: true, ..Options::new(Backend::Sqlite) }).await;
    let proxy = app.proxy.as_ref().unwrap();
    let before = app.stock("SKU-2").await.available;
    let warm_up = app.place(an_order("SKU-2", 1, "tok_visa")).await.expect("warm-up order");
    let tally: Shared = Arc::default();
    let stop = CancellationToken::new();

    // Several cuts: each is another chance to catch a delivery between its commit and its ack
    // (a hung ack once held a service's turn at the database, and it never handled anything again).
    let driver = async {
        let mut recoveries = Vec::new();
        until(&tally, "orders before the first cut", |t| t.accepted.len() >= 20).await;
        // Each later cut comes right after the 20 orders that proved the previous recovery.
        for _ in 0..CUTS {
            proxy.cut();
            let (accepted_at_cut, failed_at_cut) = {
                let t = tally.lock().unwrap();
                (t.accepted.len(), t.failed.len())
            };
            until(&tally, "calls during the outage", |t| t.failed.len() >= failed_at_cut + 10).await;
            wait_health(&app, ServingStatus::NotServing).await;
            proxy.restore();
            let restored = Instant::now();
            until(&tally, "orders after recovery", |t| t.accepted.len() >= accepted_at_cut + 20).await;
            recoveries.push(restored.elapsed());
        }
        stop.cancel();
        recoveries
    };
    let ((), recoveries) = tokio::join!(load(&app, 4, an_order("SKU-2", 1, "tok_visa"), tally.clone(), stop.clone()), driver);
    wait_health(&app, ServingStatus::Serving).await;

    let tally = Arc::try_unwrap(tally).unwrap().into_inner().unwrap();
    for (code, took) in &tally.failed {
        assert_eq!(*code, Code::Unavailable, "{tally:?}");
        assert!(*took < Duration::from_secs(3), "a call during the outage took {took:?}");
    }
    let mut accepted = tally.accepted.clone();
    accepted.push(warm_up.order_id);
    assert_all_completed_once(&app, &accepted).await;
    assert_stock_settled(&app, "SKU-2", before, accepted.len()).await;
    let slowest = tally.failed.iter().map(|(_, d)| *d).max().unwrap_or_default();
    println!(
        "dropped connection ({CUTS} cuts): accepted {} (all completed once), failed fast {} (slowest {slowest:?}), recovered in {recoveries:?}",
        accepted.len(),
        tally.failed.len()
    );
    app.stop().await;
}

/// A connection cut in the middle of its AMQP handshake fails within seconds, so its link
/// tries again. (lapin never answers a connect whose socket closes just after the broker's
/// `Connection.Start` or `Connection.Tune`; before the handshake had a bound of its own, such a
/// link waited 15 s for the whole set-up's, and the dropped-connection test above timed out
/// when two cuts in a row landed there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_during_its_handshake_fails_in_seconds() {
    let _broker = broker::shared().await;
    let vhost = broker::Vhost::create();
    // Connection.Start (class 10, method 10), then Connection.Tune (10, 30). lapin hangs or
    // not depending on whether it reads the close before it has sent its answer, so each cut
    // is made three times, all at once, each through its own proxy.
    let cuts = [(1, (10, 10)), (2, (10, 30))].into_iter().flat_map(|cut| [cut; 3]);
    let attempts = cuts.map(|(frames, step)| {
        let vhost = &vhost.name;
        async move {
            let (addr, mut cut) = proxy::cut_after_frames(broker::amqp_addr(), frames, Cut::AtOnce).await;
            let url = format!("amqp://guest:guest@{addr}/{vhost}");
            let started = Instant::now();
            let outcome = tokio::time::timeout(Duration::from_secs(30), Publisher::connect(&BusConfig::for_url(url), "cut")).await;
            let took = started.elapsed();
            assert_eq!(cut.recv().await, Some(step), "the proxy cut the connection right after that frame");
            let error = outcome.expect("connect answered").err().expect("no connection past a cut");
            assert!(took < Duration::from_secs(8), "cut after frame {frames}: the connect failed only after {took:?} ({error})");
            println!("cut after handshake frame {frames} {step:?}: connect failed in {took:?}: {error}");
        }
    });
    futures_util::future::join_all(attempts).await;
}

/// Handles nothing: a consumer whose set-up is what the test cuts.
struct Idle;

impl Handler<OrderCreated> for Idle {
    fn name(&self) -> String {
        "idle".into()
    }
    async fn handle(&self, _event: OrderCreated, _ctx: &mut Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A connection cut at any step of a consumer's set-up (its channels, queues, bindings, qos and
/// consumes, after the handshake), at once or while the consumer waits for the broker's reply,
/// fails within seconds, so its link tries again. (The race that made lapin leave a set-up's
/// channel operation unanswered does not happen at these exact points: the dropped-connection
/// test met it, a 15 s stall, in about one run of five, and in none of 30 since a set-up also
/// fails on its connection's error event.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_while_a_consumer_sets_up_fails_in_seconds() {
    let _broker = broker::shared().await;
    let vhost = broker::Vhost::create();
    let mut databases = Databases::new(Backend::Sqlite);
    let store = Store::connect(&databases.url_for("cut").await, &[]).await.expect("the store");
    // After the handshake's 3 frames; each connection (the consumer's publisher, then its
    // consumer) is cut after this many frames from the broker. A set-up takes about 20: the
    // cuts beyond it must let both ways of cutting through, or the sweep was too short.
    let cut_at = |frames: usize, when: Cut| {
        let (vhost, store) = (&vhost.name, &store);
        async move {
            let (addr, _cut) = proxy::cut_after_frames(broker::amqp_addr(), frames, when).await;
            let bus = BusConfig::for_url(format!("amqp://guest:guest@{addr}/{vhost}"));
            let started = Instant::now();
            let outcome = tokio::time::timeout(Duration::from_secs(30), Consumer::builder("cut", &bus, store).on(Idle).start()).await;
            let took = started.elapsed();
            match outcome.expect("start answered") {
                Ok(consumer) => {
                    // Set up before the cut: stop it (a cut may land in its close, which is
                    // not what this test is about).
                    let shutdown = Shutdown::new();
                    shutdown.trigger();
                    let _ = tokio::time::timeout(Duration::from_secs(10), consumer.run(shutdown)).await;
                    (frames, when, took, None)
                }
                Err(error) => (frames, when, took, Some(error.to_string())),
            }
        }
    };
    let steps = (4..30).flat_map(|frames| [(frames, Cut::AtOnce), (frames, Cut::WhileTheClientWaits)]);
    let outcomes: Vec<_> = futures_util::stream::iter(steps).map(|(frames, when)| cut_at(frames, when)).buffer_unordered(8).collect().await;
    let set_up = outcomes.iter().filter(|o| o.3.is_none()).count();
    assert!(set_up >= 2, "no set-up got through the cuts: the sweep was too short");
    let failed: Vec<_> = outcomes.iter().filter(|o| o.3.is_some()).collect();
    let slow: Vec<_> = failed.iter().filter(|o| o.2 >= Duration::from_secs(8)).collect();
    assert!(slow.is_empty(), "set-ups cut after these many frames failed only after: {slow:?}");
    println!("a consumer's set-up cut at {} points: each failed within {:?}", failed.len(), failed.iter().map(|o| o.2).max());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_is_an_error_not_a_hang_and_a_retry_is_deduplicated() {
    let app = TestApp::spawn_opts(Options { proxy: true, ..Options::new(Backend::Sqlite) }).await;
    let proxy = app.proxy.as_ref().unwrap();
    app.place(an_order("SKU-2", 1, "tok_visa")).await.expect("warm-up order");
    let mut request = an_order("SKU-2", 1, "tok_visa");
    request.idempotency_key = "k-silent".into();

    proxy.freeze();
    let started = Instant::now();
    let status = app.place(request.clone()).await.expect_err("no confirm can arrive");
    let took = started.elapsed();
    proxy.thaw();

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(took < Duration::from_secs(4), "the confirm timeout (2 s here) bounds the call: {took:?}");
    // The client retries with the same key: one order, whatever happened to the first try.
    let retried = app.place(request).await.expect("the retry");
    let order = app.wait_for_outcome(&retried.order_id).await;
    assert_eq!(order.status(), OrderStatus::Completed);
    assert_eq!(order.history.len(), 4, "one order, each event once: {order:#?}");
    println!("silent broker: PlaceOrder failed with UNAVAILABLE after {took:?}; retry completed once");
    app.stop().await;
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl").args(args).status().expect("running rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Starts the broker app again even if the test fails half-way.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").arg("start_app").status();
        let _ = std::process::Command::new("rabbitmqctl").args(["await_startup", "--timeout", "60"]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_confirmed_order() {
    let mut app = TestApp::spawn_opts(Options { exclusive: true, ..Options::new(Backend::Sqlite) }).await;
    app.place(an_order("SKU-2", 1, "tok_visa")).await.expect("warm-up order");
    // Inventory is down: confirmed orders wait in its durable queue across the restart.
    app.stop_service("inventory").await;
    let mut accepted = Vec::new();
    for _ in 0..10 {
        accepted.push(app.place(an_order("SKU-2", 1, "tok_visa")).await.expect("confirmed before the restart").order_id);
    }

    let guard = RestartGuard;
    rabbitmqctl(&["stop_app"]);
    let stopped = Instant::now();
    wait_health(&app, ServingStatus::NotServing).await;
    let started = Instant::now();
    let status = app.place(an_order("SKU-2", 1, "tok_visa")).await.expect_err("the broker is down");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(1), "fails fast: {:?}", started.elapsed());
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup", "--timeout", "60"]);
    drop(guard);
    wait_health(&app, ServingStatus::Serving).await;
    let outage = stopped.elapsed();
    app.start_service("inventory").await;

    assert_all_completed_once(&app, &accepted).await;
    let after = app.place(an_order("SKU-2", 1, "tok_visa")).await.expect("the platform healed without a restart");
    assert_eq!(app.wait_for_outcome(&after.order_id).await.status(), OrderStatus::Completed);
    println!("broker restart: {} orders confirmed before it, all completed once; gateway SERVING again {outage:?} after stop_app", accepted.len());
    app.stop().await;
}

/// Restores the memory watermark even if the test fails half-way.
struct WatermarkGuard;

impl Drop for WatermarkGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["set_vm_memory_high_watermark", "0.4"]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_broker_makes_place_order_unavailable_and_health_not_serving() {
    let app = TestApp::spawn_opts(Options { exclusive: true, ..Options::new(Backend::Sqlite) }).await;
    app.place(an_order("SKU-2", 1, "tok_visa")).await.expect("warm-up order");

    let guard = WatermarkGuard;
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
    // The broker blocks publishing connections; the first publish may be what reveals it.
    let started = Instant::now();
    let status = app.place(an_order("SKU-2", 1, "tok_visa")).await.expect_err("publishing is blocked");
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(took < Duration::from_secs(7), "bounded by the confirm timeout (5 s): {took:?}");
    wait_health(&app, ServingStatus::NotServing).await;
    let started = Instant::now();
    let status = app.place(an_order("SKU-2", 1, "tok_visa")).await.expect_err("still blocked");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_millis(500), "known blocked: fails at once ({:?})", started.elapsed());
    drop(guard);
    wait_health(&app, ServingStatus::Serving).await;

    let accepted = app.place(an_order("SKU-2", 1, "tok_visa")).await.expect("unblocked");
    assert_eq!(app.wait_for_outcome(&accepted.order_id).await.status(), OrderStatus::Completed);
    println!("memory alarm: first PlaceOrder UNAVAILABLE after {took:?}, then at once; SERVING again after the alarm cleared");
    app.stop().await;
}

/// A shutdown while the broker is silent (a frozen proxy: nothing answers and nothing closes)
/// ends within seconds, for the gateway and every service: each close waits at most 2 s for the
/// broker's answer. (lapin waits for it until the heartbeat gives the connection up: before the
/// bound, one consumer's shutdown took 125 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_the_broker_is_silent_ends_in_seconds() {
    let app = TestApp::spawn_opts(Options { proxy: true, ..Options::new(Backend::Sqlite) }).await;
    let order = app.place(an_order("SKU-2", 1, "tok_visa")).await.expect("an order");
    assert_eq!(app.wait_for_outcome(&order.order_id).await.status(), OrderStatus::Completed);
    app.proxy.as_ref().unwrap().freeze();
    let started = Instant::now();
    app.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "the platform took {took:?} to stop");
    println!("shutdown with a silent broker: the gateway and the four services stopped in {took:?}");
}
