//! End to end: orders offered at a fixed rate (open loop) through the gateway and all four
//! services to COMPLETED. Completion is seen on a tap (a transient exclusive queue bound to
//! `notification.sent`), not by polling GetOrder, so measuring does not load the platform.
//!
//! Completion latency runs from sending PlaceOrder to receiving the order's
//! `notification.sent`. The backlog is the number of accepted orders not yet completed; if it
//! grows over the measured window, the platform does not keep up with the offered rate.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use sluice::{
    bus::Tap,
    config::BusConfig,
    events::{NotificationKind, NotificationSent},
    pb::{GetOrderRequest, OrderStatus},
};
use tokio::{sync::Semaphore, task::JoinSet, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{Vhost, message_count},
    report::{self, Check},
    unary::{an_order, clients},
};

/// What the end-to-end run measured.
pub struct EndToEnd {
    /// PlaceOrder calls sent per second in the measured window (the offered load actually sent).
    pub offered: f64,
    /// Orders whose `notification.sent` arrived in the measured window, per second.
    pub completed_rate: f64,
    /// Completion latency of the orders placed in the measured window.
    pub latency: Histogram<u64>,
    /// Failed PlaceOrder calls, by gRPC code.
    pub errors: BTreeMap<String, u64>,
    /// Accepted orders not yet completed, at the start and at the end of the measured window.
    pub backlog: (usize, usize),
    /// How long the backlog took to drain once the load stopped.
    pub drained_in: Duration,
    /// Ready messages in each service queue at the start and at the end of the measured window.
    pub queued: Vec<Queued>,
    pub check: Check,
}

impl EndToEnd {
    /// The service queue whose ready messages grew the most over the window of `duration`, and
    /// its growth per second.
    pub fn worst_queue(&self, duration: Duration) -> Option<(&Queued, f64)> {
        self.queued
            .iter()
            .map(|q| (q, (f64::from(q.end) - f64::from(q.start)) / duration.as_secs_f64()))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// One service queue's ready messages at the start and at the end of the measured window.
pub struct Queued {
    pub queue: String,
    pub start: u32,
    pub end: u32,
}

/// Who placed what, and what has completed. Shared by the callers and the tap.
struct Ledger {
    /// Accepted, awaiting `notification.sent`: when PlaceOrder was sent.
    waiting: HashMap<String, Instant>,
    /// `notification.sent` that arrived before its PlaceOrder answer: when it arrived.
    early: HashMap<String, Instant>,
    completed: HashSet<String>,
    accepted: u64,
    completed_in_window: u64,
    duplicates: u64,
    not_confirmed: u64,
    errors: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    measure_from: Instant,
    end: Instant,
}

impl Ledger {
    fn complete(&mut self, order_id: String, sent: Instant, arrived: Instant) {
        if sent >= self.measure_from && sent < self.end {
            report::record(&mut self.latency, arrived - sent);
        }
        if arrived >= self.measure_from && arrived < self.end {
            self.completed_in_window += 1;
        }
        self.completed.insert(order_id);
    }
}

type Shared = Arc<Mutex<Ledger>>;

fn lock(ledger: &Shared) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Settings of the end-to-end run.
#[derive(Clone)]
pub struct Load {
    /// Orders offered per second.
    pub rate: f64,
    /// Most PlaceOrder calls in flight at once.
    pub max_calls: usize,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Longest wait for the backlog to drain after the load stops.
    pub drain_timeout: Duration,
}

/// What the load generator leaves for the check: the ledger, the backlog at the start and the
/// end of the measured window, the calls sent in the window and how long the backlog took to
/// drain.
struct Offered {
    ledger: Ledger,
    backlog: (usize, usize),
    sent_in_window: u64,
    drained_in: Duration,
    queued: Vec<Queued>,
}

/// Offers `load.rate` orders per second for `warmup + duration`, waits for every accepted
/// order to complete, and checks the outcome. The load generator (callers, tap and ledger) runs
/// on a thread of its own ([`crate::on_own_thread`]).
pub async fn run(addr: SocketAddr, vhost: &Vhost, load: &Load) -> anyhow::Result<EndToEnd> {
    let (url, generator_load) = (vhost.url(), load.clone());
    let queues = vhost.service_queues(crate::baseline::EXCHANGE).context("listing the services' queues")?;
    let generator = move || async move { offer(addr, &url, &queues, &generator_load).await };
    let Offered { ledger, backlog, sent_in_window, drained_in, queued } = crate::on_own_thread("e2e-load", generator).await?;
    let check = check(addr, vhost, &ledger, load.drain_timeout).await?;
    let duration = load.duration.as_secs_f64();
    Ok(EndToEnd {
        offered: sent_in_window as f64 / duration,
        completed_rate: ledger.completed_in_window as f64 / duration,
        latency: ledger.latency,
        errors: ledger.errors,
        backlog,
        drained_in,
        queued,
        check,
    })
}

/// Ready messages in each of `queues` at `at`.
async fn ready_at(channel: &lapin::Channel, queues: &[String], at: Instant) -> anyhow::Result<Vec<u32>> {
    tokio::time::sleep_until(at.into()).await;
    let mut counts = Vec::with_capacity(queues.len());
    for queue in queues {
        counts.push(message_count(channel, queue).await?);
    }
    Ok(counts)
}

/// The open-loop load and the tap, until every accepted order completed (or the drain timed out).
async fn offer(addr: SocketAddr, vhost_url: &str, queues: &[String], load: &Load) -> anyhow::Result<Offered> {
    let mut tap = Tap::open(&BusConfig::for_url(vhost_url), &["notification.sent"]).await.context("opening the notification.sent tap")?;
    let clients = clients(addr, load.connections.max(1)).await?;
    let sampling = lapin::Connection::connect(vhost_url, lapin::ConnectionProperties::default()).await.context("connecting to sample the queues")?;
    let sampler = sampling.create_channel().await?;
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    // Every service queue's depth at both ends of the window: a service that falls behind
    // (the orders read model, say) shows here even while notifications keep pace.
    let depths = {
        let queues = queues.to_vec();
        tokio::spawn(async move {
            let first = ready_at(&sampler, &queues, measure_from).await?;
            let last = ready_at(&sampler, &queues, end).await?;
            anyhow::Ok(queues.into_iter().zip(first.into_iter().zip(last)).map(|(queue, (start, end))| Queued { queue, start, end }).collect::<Vec<_>>())
        })
    };
    let ledger: Shared = Arc::new(Mutex::new(Ledger {
        waiting: HashMap::new(),
        early: HashMap::new(),
        completed: HashSet::new(),
        accepted: 0,
        completed_in_window: 0,
        duplicates: 0,
        not_confirmed: 0,
        errors: BTreeMap::new(),
        latency: report::histogram()?,
        measure_from,
        end,
    }));

    let stop_tap = CancellationToken::new();
    let tap_task = {
        let (ledger, stop) = (ledger.clone(), stop_tap.clone());
        tokio::spawn(async move {
            loop {
                let tapped = tokio::select! {
                    () = stop.cancelled() => break,
                    tapped = tap.next() => match tapped { Some(t) => t, None => break },
                };
                let arrived = Instant::now();
                let Some(sent) = tapped.decode::<NotificationSent>() else { continue };
                let mut ledger = lock(&ledger);
                if sent.kind != NotificationKind::OrderConfirmed as i32 {
                    ledger.not_confirmed += 1;
                }
                if let Some(placed) = ledger.waiting.remove(&sent.order_id) {
                    ledger.complete(sent.order_id, placed, arrived);
                } else if ledger.completed.contains(&sent.order_id) || ledger.early.contains_key(&sent.order_id) {
                    ledger.duplicates += 1;
                } else {
                    ledger.early.insert(sent.order_id, arrived);
                }
            }
            tap.close().await;
        })
    };

    // Open loop: the number of orders due grows with time, whatever the answers do; only the
    // cap on calls in flight can hold it back.
    let permits = Arc::new(Semaphore::new(load.max_calls.max(1)));
    let mut calls = JoinSet::new();
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let (mut sent_total, mut sent_in_window) = (0u64, 0u64);
    let mut backlog_start = None;
    'offer: loop {
        ticks.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        if backlog_start.is_none() && now >= measure_from {
            backlog_start = Some(lock(&ledger).waiting.len());
        }
        let due = (load.rate * (now - start).as_secs_f64()) as u64;
        while sent_total < due {
            let permit = permits.clone().acquire_owned().await?;
            let sent = Instant::now();
            if sent >= end {
                break 'offer;
            }
            if sent >= measure_from {
                sent_in_window += 1;
            }
            let mut client = clients[(sent_total as usize) % clients.len()].clone();
            let request = an_order(sent_total as usize);
            let ledger = ledger.clone();
            sent_total += 1;
            calls.spawn(async move {
                let answer = client.place_order(request).await;
                drop(permit);
                let mut ledger = lock(&ledger);
                match answer {
                    Ok(accepted) => {
                        ledger.accepted += 1;
                        let order_id = accepted.into_inner().order_id;
                        match ledger.early.remove(&order_id) {
                            Some(arrived) => ledger.complete(order_id, sent, arrived),
                            None => {
                                ledger.waiting.insert(order_id, sent);
                            }
                        }
                    }
                    Err(status) => *ledger.errors.entry(format!("{:?}", status.code())).or_default() += 1,
                }
            });
        }
        while let Some(joined) = calls.try_join_next() {
            joined.context("a PlaceOrder call panicked")?;
        }
    }
    let backlog_end = lock(&ledger).waiting.len();
    while let Some(joined) = calls.join_next().await {
        joined.context("a PlaceOrder call panicked")?;
    }
    let queued = depths.await.context("the queue sampler panicked")??;
    let _ = sampling.close(200, "sampled".into()).await;

    let drain_start = Instant::now();
    while !lock(&ledger).waiting.is_empty() && drain_start.elapsed() < load.drain_timeout {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained_in = drain_start.elapsed();
    stop_tap.cancel();
    let _ = tap_task.await;

    // Every caller has been joined and the tap has stopped: the ledger is ours alone.
    let ledger = Arc::try_unwrap(ledger)
        .map_err(|_| anyhow::anyhow!("the ledger is still shared"))?
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(Offered { ledger, backlog: (backlog_start.unwrap_or(0), backlog_end), sent_in_window, drained_in, queued })
}

/// Every accepted order completed, as confirmed, once; a sample reads COMPLETED through
/// GetOrder; no dead letters.
async fn check(addr: SocketAddr, vhost: &Vhost, ledger: &Ledger, drain_timeout: Duration) -> anyhow::Result<Check> {
    let mut problems = Vec::new();
    if !ledger.waiting.is_empty() {
        problems.push(format!("{} accepted orders not completed {}s after the load", ledger.waiting.len(), drain_timeout.as_secs()));
    }
    if ledger.not_confirmed > 0 {
        problems.push(format!("{} notifications were not ORDER_CONFIRMED", ledger.not_confirmed));
    }
    if ledger.duplicates > 0 {
        problems.push(format!("{} duplicate notifications", ledger.duplicates));
    }
    if !ledger.early.is_empty() {
        problems.push(format!("{} notifications for orders never accepted", ledger.early.len()));
    }
    let mut client = clients(addr, 1).await?.remove(0);
    // The orders read model is fed by queues of its own and may trail the notification.
    let started = Instant::now();
    let deadline = started + drain_timeout;
    for order_id in ledger.completed.iter().take(20) {
        let status = loop {
            let order = client.get_order(GetOrderRequest { order_id: order_id.clone() }).await.map(|o| o.into_inner().status);
            match order {
                Ok(status) if status == OrderStatus::Completed as i32 => break Ok(status),
                other if Instant::now() >= deadline => break other,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if status.as_ref().ok() != Some(&(OrderStatus::Completed as i32)) {
            problems.push(format!("GetOrder {order_id}: {status:?}, not COMPLETED"));
            break;
        }
    }
    let connection = lapin::Connection::connect(&vhost.url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut dead = 0;
    for queue in vhost.queues()?.iter().filter(|q| q.ends_with(".dlq")) {
        dead += message_count(&channel, queue).await?;
    }
    let _ = connection.close(200, "checked".into()).await;
    if dead > 0 {
        problems.push(format!("{dead} dead letters"));
    }
    let read_model_lag = started.elapsed();
    Ok(if problems.is_empty() {
        Check::Ok(format!(
            "all {} accepted orders COMPLETED once (GetOrder agreed {:.1} s after the last notification), 0 dead letters",
            report::thousands(ledger.accepted as f64),
            read_model_lag.as_secs_f64()
        ))
    } else {
        Check::Fail(problems.join("; "))
    })
}
