//! A tower layer that counts gRPC requests by method and status code
//! (`sluice_grpc_requests_total`). The code is read from the response headers; a streaming
//! call that fails after its headers were sent is counted by the code of its headers (`0`).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use sluice::metrics::{Rpc, metrics};
use tower::{Layer, Service};

/// Counts requests by method and code.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestMetricsLayer;

impl<S> Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics { inner }
    }
}

/// The service [`RequestMetricsLayer`] wraps around the server.
#[derive(Debug, Clone)]
pub struct RequestMetrics<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for RequestMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(response) => response.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_owned(),
                Err(_) => "error".to_owned(),
            };
            metrics().requests.get_or_create(&Rpc { method, code }).inc();
            result
        })
    }
}
