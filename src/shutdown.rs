//! Graceful shutdown: one token to signal it, one tracker to wait for the work it stops.
//!
//! Every long-running task is spawned through [`Shutdown::spawn`] and watches
//! [`Shutdown::cancelled`], so no task outlives the process's intent to stop.

use std::future::Future;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Signals shutdown and tracks the tasks that must finish before the process exits.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A shutdown that only [`Shutdown::trigger`] starts (tests, embedding).
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown started by SIGTERM (docker/k8s stop) or SIGINT (Ctrl-C in development).
    pub fn on_signals() -> Self {
        let shutdown = Self::new();
        let token = shutdown.token.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received");
            token.cancel();
        });
        shutdown
    }

    /// Starts shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when shutdown starts.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// A token cancelled with this shutdown (for APIs that take one).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// A shutdown that starts with this one, or on its own trigger, and tracks its own tasks.
    pub fn child(&self) -> Self {
        Self { token: self.token.child_token(), tracker: TaskTracker::new() }
    }

    /// Spawns a task that shutdown waits for.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Waits for every task spawned through this shutdown to finish.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
