//! A service process killed with SIGKILL while it handles a stream of orders: after a
//! restart, no effect is lost and none is applied twice.
//!
//! The service runs as a real process (see `child`).

use std::{sync::Arc, time::Duration};

use futures_util::future::join_all;
use sluice::pb::OrderStatus;

use tokio_util::sync::CancellationToken;

use crate::support::{Backend, Options, TestApp, an_order, eventually, load::{Shared, load, until}};

fn spawn_inventory(app: &TestApp) -> crate::child::Process {
    crate::child::spawn("inventory", &app.service_env("inventory"), None)
}

async fn wait_up(app: &TestApp) {
    let mut last = None;
    eventually(
        || async { app.rpc.call(&sluice::pb::GetStockRequest { sku: "SKU-2".into() }, Duration::from_millis(500)).await.ok() },
        |_| true,
        &mut last,
    )
    .await
    .expect("the inventory process answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_loses_and_doubles_nothing_after_restart() {
    let app = TestApp::spawn_opts(Options { external: vec!["inventory"], ..Options::new(Backend::Sqlite) }).await;
    let mut child = spawn_inventory(&app);
    wait_up(&app).await;
    // Warm the gateway's SKU cache: afterwards it accepts orders without asking inventory.
    let warm_up = app.place(an_order("SKU-2", 2, "tok_visa")).await.expect("warm-up order");
    app.wait_for_outcome(&warm_up.order_id).await;
    let before = app.stock("SKU-2").await;

    // Orders flow continuously; inventory is killed in the middle of the stream.
    let tally: Shared = Arc::default();
    let stop = CancellationToken::new();
    let driver = async {
        until(&tally, "orders before the kill", |t| t.accepted.len() >= 20).await;
        child.0.kill().expect("SIGKILL");
        child.0.wait().expect("reaping the killed process");
        let accepted: Vec<String> = tally.lock().unwrap().accepted.clone();
        let at_kill = accepted.len();
        // Inventory is dead, so this is exactly what it left unfinished.
        let states = join_all(accepted.iter().map(|id| app.get(id))).await;
        let unreserved = states.iter().filter(|o| !o.as_ref().is_ok_and(|o| o.history.iter().any(|h| h.event == "inventory.reserved"))).count();
        // Orders keep coming while inventory is dead; they wait in its queue.
        until(&tally, "orders while inventory is dead", |t| t.accepted.len() >= at_kill + 20).await;
        let restarted = spawn_inventory(&app);
        until(&tally, "orders after the restart", |t| t.accepted.len() >= at_kill + 40).await;
        stop.cancel();
        (restarted, at_kill, unreserved)
    };
    let ((), (child, at_kill, unreserved)) = tokio::join!(load(&app, 4, an_order("SKU-2", 2, "tok_visa"), tally.clone(), stop.clone()), driver);
    let tally = Arc::try_unwrap(tally).unwrap().into_inner().unwrap();
    assert!(tally.failed.is_empty(), "the gateway never needed inventory to accept orders: {:?}", tally.failed);
    let all = tally.accepted.clone();
    let outcomes = join_all(all.iter().map(|id| app.wait_for_outcome(id))).await;
    for order in &outcomes {
        assert_eq!(order.status(), OrderStatus::Completed, "{order:#?}");
    }
    let mut last = None;
    let after = eventually(|| async { Some(app.stock("SKU-2").await) }, |s| s.reserved == 0, &mut last)
        .await
        .unwrap_or_else(|| panic!("stock still reserved: {last:?}"));
    assert_eq!(before.available - after.available, 2 * all.len() as i64, "every order reserved exactly once");
    println!(
        "SIGKILL: {} orders placed under load, inventory killed after {at_kill} were accepted ({unreserved} of them not yet reserved); after restart all completed once, stock {} -> {}",
        all.len(),
        before.available,
        after.available
    );
    drop(child);
    app.stop().await;
}
