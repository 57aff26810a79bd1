//! A tower layer that counts gRPC requests by method and status code
//! (`sluice_grpc_requests_total`), once per call, with the code the client receives.
//!
//! A call that fails before it answers has its `grpc-status` in the response headers
//! ("trailers-only"). Every other call, streaming ones above all, carries its status in the
//! trailers at the end of the body, possibly long after the headers: the body is wrapped and
//! the code is counted when the trailers go out. A body dropped before its trailers (the client
//! went away) counts as `1` (CANCELLED), and one that ends with no status at all as `2`
//! (UNKNOWN), as gRPC clients see them.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use sluice::metrics::{Rpc, metrics};
use tower::{Layer, Service};

const CANCELLED: &str = "1";
const UNKNOWN: &str = "2";

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

fn count(method: String, code: &str) {
    metrics().requests.get_or_create(&Rpc { method, code: code.to_owned() }).inc();
}

fn grpc_status(headers: &http::HeaderMap) -> Option<&str> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok())
}

impl<S, B, R> Service<http::Request<B>> for RequestMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MeteredBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let response = self.inner.call(request);
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let pending = match grpc_status(&parts.headers) {
                        // Trailers-only: the call is over.
                        Some(code) => {
                            count(method, code);
                            None
                        }
                        None => Some(method),
                    };
                    Ok(http::Response::from_parts(parts, MeteredBody { inner: body, pending }))
                }
                Err(error) => {
                    count(method, "error");
                    Err(error)
                }
            }
        })
    }
}

pin_project! {
    /// A response body that counts its call when the trailers carry the status.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        // The method, while its call is not counted yet.
        pending: Option<String>,
    }

    impl<B> PinnedDrop for MeteredBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(method) = this.project().pending.take() {
                count(method, CANCELLED);
            }
        }
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if this.pending.is_some() {
            let code = match &polled {
                Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|trailers| grpc_status(trailers).unwrap_or(UNKNOWN)),
                Poll::Ready(Some(Err(_))) => Some("error"),
                Poll::Ready(None) => Some(UNKNOWN),
                Poll::Pending => None,
            };
            if let Some(code) = code
                && let Some(method) = this.pending.take()
            {
                count(method, code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
