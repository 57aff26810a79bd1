//! A load generator for fault tests: concurrent PlaceOrder callers that record every outcome.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice::pb::PlaceOrderRequest;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{TestApp, eventually};

/// What a stream of PlaceOrder calls has seen so far.
#[derive(Debug, Default)]
pub struct Tally {
    pub accepted: Vec<String>,
    /// (code, how long the failed call took)
    pub failed: Vec<(Code, Duration)>,
}

pub type Shared = Arc<Mutex<Tally>>;

/// Places orders from `workers` concurrent callers until `stop`, recording every outcome.
pub async fn load(app: &TestApp, workers: usize, request: PlaceOrderRequest, tally: Shared, stop: CancellationToken) {
    let calls = (0..workers).map(|_| {
        let (tally, stop, request) = (tally.clone(), stop.clone(), request.clone());
        async move {
            while !stop.is_cancelled() {
                let started = Instant::now();
                let result = app.place(request.clone()).await;
                let failed = {
                    let mut tally = tally.lock().unwrap();
                    match result {
                        Ok(accepted) => {
                            tally.accepted.push(accepted.order_id);
                            false
                        }
                        Err(status) => {
                            tally.failed.push((status.code(), started.elapsed()));
                            true
                        }
                    }
                };
                if failed {
                    // Pace a caller that keeps failing, like any client with backoff would.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });
    futures_util::future::join_all(calls).await;
}

/// Waits until `check` holds for the tally.
pub async fn until(tally: &Shared, what: &str, check: impl Fn(&Tally) -> bool) {
    let mut last = None;
    eventually(|| async { Some(check(&tally.lock().unwrap())) }, |ok| *ok, &mut last)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for {what}: {:?}", tally.lock().unwrap()));
}

