//! Load shedding: at most `limit` API calls run at once; one more is refused at once with
//! `RESOURCE_EXHAUSTED` instead of queueing. Health checks and reflection are never shed, so an
//! overloaded gateway still reports SERVING and stays inspectable.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tower::{Layer, Service};

/// Health checks and reflection: never shed, and their requests take no room in the request
/// byte budget (`budget`).
pub(crate) fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

/// Sheds API calls beyond a concurrency limit.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    permits: Arc<Semaphore>,
}

impl ShedLayer {
    /// At most `limit` API calls in flight.
    pub fn new(limit: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(limit)) }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Shed { inner, permits: self.permits.clone() }
    }
}

/// The service [`ShedLayer`] wraps around the server.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if exempt(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    // Held until the handler has produced its response (streams run on after).
                    let response = response.await;
                    drop(permit);
                    response
                })
            }
            Err(_) => {
                let refused = tonic::Status::resource_exhausted("the gateway is at its concurrency limit; retry with backoff").into_http();
                Box::pin(async move { Ok(refused) })
            }
        }
    }
}
