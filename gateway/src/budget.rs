//! Byte budgets: bounds on the bytes of requests the gateway holds at once.
//!
//! PublishStream takes room for each event once it has read it, waiting for room before it reads
//! the next (`events`). Every other API call takes room for its request message before tonic
//! reads it ([`RequestBudgetLayer`]): the gRPC length prefix in the first bytes says how large
//! it is. Such a call does not wait for room: one that does not fit is refused at once with
//! `RESOURCE_EXHAUSTED`, as the concurrency limit refuses calls (`shed`). Waiting would not be
//! safe: a waiting call's unread data stays in its HTTP/2 connection's flow-control window,
//! and once that window is full, the calls holding room cannot receive the rest of their own
//! messages, so none would ever finish.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use http_body::{Body, Frame, SizeHint};
use sluice::metrics::metrics;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::Bytes;
use tower::{Layer, Service};

use crate::MAX_MESSAGE_BYTES;

/// What a budget holds, and the gauge that shows it.
#[derive(Clone, Copy)]
pub(crate) enum Holds {
    /// PublishStream events being published: `sluice_stream_buffered_bytes`.
    StreamEvents,
    /// Other calls' request messages: `sluice_request_buffered_bytes`.
    Requests,
}

impl Holds {
    fn count(self, bytes: i64) {
        let metrics = metrics();
        match self {
            Self::StreamEvents => metrics.stream_buffered_bytes.inc_by(bytes),
            Self::Requests => metrics.request_buffered_bytes.inc_by(bytes),
        };
    }
}

/// A budget of bytes shared by its holders.
#[derive(Clone)]
pub(crate) struct ByteBudget {
    room: Arc<Semaphore>,
    capacity: u32,
    holds: Holds,
}

impl ByteBudget {
    /// `capacity` bytes of `holds`.
    pub(crate) fn new(capacity: u32, holds: Holds) -> Self {
        let capacity = capacity.max(1);
        Self { room: Arc::new(Semaphore::new(capacity as usize)), capacity, holds }
    }

    /// Waits for room for `bytes` (at most the whole budget, so that anything fits).
    pub(crate) async fn reserve(&self, bytes: usize) -> Option<Buffered> {
        let bytes = self.clamp(bytes);
        let permit = self.room.clone().acquire_many_owned(bytes).await.ok()?;
        Some(self.held(permit, bytes))
    }

    /// Room for `bytes` now, if there is.
    fn try_reserve(&self, bytes: usize) -> Option<Buffered> {
        let bytes = self.clamp(bytes);
        let permit = self.room.clone().try_acquire_many_owned(bytes).ok()?;
        Some(self.held(permit, bytes))
    }

    fn clamp(&self, bytes: usize) -> u32 {
        u32::try_from(bytes).unwrap_or(u32::MAX).clamp(1, self.capacity)
    }

    fn held(&self, permit: OwnedSemaphorePermit, bytes: u32) -> Buffered {
        self.holds.count(i64::from(bytes));
        Buffered { _permit: permit, bytes, holds: self.holds }
    }
}

/// Room held in a [`ByteBudget`], counted in its gauge until dropped.
pub(crate) struct Buffered {
    _permit: OwnedSemaphorePermit,
    bytes: u32,
    holds: Holds,
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.holds.count(-i64::from(self.bytes));
    }
}

/// Calls whose request message takes room: all but PublishStream (whose events take room one
/// by one), health checks and reflection.
fn budgeted(path: &str) -> bool {
    path != "/sluice.v1.EventGateway/PublishStream" && !crate::shed::exempt(path)
}

/// Holds each budgeted call's request message in a [`ByteBudget`].
#[derive(Clone)]
pub(crate) struct RequestBudgetLayer {
    budget: ByteBudget,
}

impl RequestBudgetLayer {
    pub(crate) fn new(budget: ByteBudget) -> Self {
        Self { budget }
    }
}

impl<S> Layer<S> for RequestBudgetLayer {
    type Service = RequestBudget<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestBudget { inner, budget: self.budget.clone() }
    }
}

/// The service [`RequestBudgetLayer`] wraps around the server.
#[derive(Clone)]
pub(crate) struct RequestBudget<S> {
    inner: S,
    budget: ByteBudget,
}

impl<S> Service<http::Request<tonic::body::Body>> for RequestBudget<S>
where
    S: Service<http::Request<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if !budgeted(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let held = Arc::new(Mutex::new(None));
        let budget = self.budget.clone();
        let slot = held.clone();
        let request = request.map(move |body| tonic::body::Body::new(Budgeted { inner: body, budget, held: slot, prefix: Some(([0; 5], 0)) }));
        let response = self.inner.call(request);
        Box::pin(async move {
            // The message is decoded, handled and dropped by the time the handler answers.
            let response = response.await;
            drop(held);
            response
        })
    }
}

pin_project_lite::pin_project! {
    /// A request body that takes room for its message as soon as its length prefix is read,
    /// and fails if there is none.
    struct Budgeted {
        #[pin]
        inner: tonic::body::Body,
        budget: ByteBudget,
        held: Arc<Mutex<Option<Buffered>>>,
        // The message's 5-byte gRPC prefix (compressed flag, length), as far as read; `None`
        // once room is taken (or none is needed).
        prefix: Option<([u8; 5], usize)>,
    }
}

/// Room for a message whose gRPC prefix is `prefix`, or `None` when tonic refuses it unread
/// (longer than the gateway decodes).
fn room_for(prefix: [u8; 5]) -> Option<usize> {
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if length > MAX_MESSAGE_BYTES {
        return None;
    }
    // A compressed message may inflate up to the decoding limit.
    let decoded = if prefix[0] == 0 { 0 } else { MAX_MESSAGE_BYTES };
    Some(5 + length + decoded)
}

impl Body for Budgeted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let (Some((seen, len)), Some(Ok(data))) = (this.prefix.as_mut(), frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref))) else {
            return Poll::Ready(frame);
        };
        let data = data.map_or(&[][..], |d| &d[..]);
        let take = (seen.len() - *len).min(data.len());
        seen[*len..*len + take].copy_from_slice(&data[..take]);
        *len += take;
        if *len < seen.len() {
            return Poll::Ready(frame);
        }
        let room = room_for(*seen);
        *this.prefix = None;
        if let Some(bytes) = room {
            let Some(buffered) = this.budget.try_reserve(bytes) else {
                return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(
                    "the gateway holds as many request bytes as SLUICE_REQUEST_BUFFER_BYTES allows; retry with backoff",
                ))));
            };
            if let Ok(mut held) = this.held.lock() {
                *held = Some(buffered);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_the_prefixed_length_or_the_decoding_limit_when_compressed() {
        assert_eq!(room_for([0, 0, 0, 1, 0]), Some(5 + 256));
        assert_eq!(room_for([1, 0, 0, 1, 0]), Some(5 + 256 + MAX_MESSAGE_BYTES));
        let too_long = u32::try_from(MAX_MESSAGE_BYTES + 1).unwrap().to_be_bytes();
        assert_eq!(room_for([0, too_long[0], too_long[1], too_long[2], too_long[3]]), None);
    }

    #[test]
    fn api_calls_are_budgeted_but_streams_of_events_health_and_reflection_are_not() {
        assert!(budgeted("/sluice.v1.EventGateway/Publish"));
        assert!(budgeted("/sluice.v1.OrderService/PlaceOrder"));
        assert!(!budgeted("/sluice.v1.EventGateway/PublishStream"));
        assert!(!budgeted("/grpc.health.v1.Health/Check"));
        assert!(!budgeted("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
    }
}
