//! Request/reply over RabbitMQ with direct reply-to (`amq.rabbitmq.reply-to`): the gateway
//! asks the service that owns some data, so RabbitMQ stays the only integration point.
//!
//! A request is a transient message to `<service>.<method>` carrying `reply_to`,
//! `correlation_id` and an `expiration` equal to the caller's deadline, so a request nobody
//! answered in time is dropped by the broker instead of being served late.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use futures_util::StreamExt;
use prost::Message as _;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::Delivery,
    options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::FieldTable,
};
use tokio::sync::{Mutex, oneshot, watch};

use super::{
    Error,
    connection::{BoxFuture, Link, LinkState, Session},
    headers::{self, CONTENT_TYPE},
    topology,
};
use crate::config::BusConfig;

/// A request message served over RabbitMQ; implemented by `build.rs` for every message with
/// an `rpc_queue` option.
pub trait Rpc: prost::Message + Default + Send + Sync + 'static {
    /// The reply message.
    type Reply: prost::Message + Default + Send + 'static;
    /// The queue that serves this request (`<service>.<method>`).
    const QUEUE: &'static str;
    /// Full Protobuf name of the request.
    const FULL_NAME: &'static str;
}

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

type Pending = Arc<StdMutex<HashMap<String, oneshot::Sender<Delivery>>>>;

/// Sends requests and awaits their replies.
#[derive(Clone)]
pub struct RpcClient {
    state: watch::Receiver<LinkState<Channel>>,
    pending: Pending,
    link: Arc<Mutex<Option<Link<Channel>>>>,
}

struct ReplyChannel {
    pending: Pending,
}

impl Session for ReplyChannel {
    type Value = Channel;
    fn open<'a>(&'a self, connection: &'a Connection) -> BoxFuture<'a, Result<Channel, Error>> {
        Box::pin(async move {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            let mut replies = channel
                .basic_consume(
                    REPLY_TO.into(),
                    "".into(),
                    BasicConsumeOptions { no_ack: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
            let pending = self.pending.clone();
            // Ends with the channel; the link opens a new one (and a new dispatcher) on reconnect.
            tokio::spawn(async move {
                while let Some(Ok(delivery)) = replies.next().await {
                    let Some(id) = delivery.properties.correlation_id().as_ref().map(|s| s.to_string()) else {
                        continue;
                    };
                    let waiter = pending.lock().ok().and_then(|mut p| p.remove(&id));
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(delivery);
                    }
                }
            });
            Ok(channel)
        })
    }
}

/// Removes a pending call when the caller gives up (timeout, cancelled gRPC call).
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&self.id);
        }
    }
}

impl RpcClient {
    /// Connects a reply channel for `app_id`.
    pub async fn connect(config: &BusConfig, app_id: &str) -> Result<Self, Error> {
        let pending: Pending = Arc::default();
        let link = Link::open(&config.url, &format!("{app_id}.rpc"), ReplyChannel { pending: pending.clone() }).await?;
        Ok(Self { state: link.subscribe(), pending, link: Arc::new(Mutex::new(Some(link))) })
    }

    /// Sends `request` and waits up to `timeout` for its reply.
    pub async fn call<R: super::Rpc>(&self, request: &R, timeout: Duration) -> Result<R::Reply, Error> {
        let channel = match self.state.borrow().clone() {
            LinkState::Up { value, .. } => value,
            LinkState::Down => return Err(Error::Unavailable("not connected to the broker".into())),
        };
        let id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| Error::Unavailable("reply dispatcher failed".into()))?
            .insert(id.clone(), tx);
        let _guard = PendingGuard { pending: &self.pending, id: id.clone() };
        let properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(R::FULL_NAME.into())
            .with_reply_to(REPLY_TO.into())
            .with_correlation_id(id.as_str().into())
            .with_expiration(timeout.as_millis().max(1).to_string().as_str().into())
            .with_delivery_mode(1);
        let body = request.encode_to_vec();
        let exchange = async {
            let confirmation = channel
                .basic_publish(
                    "".into(),
                    topology::short(R::QUEUE)?,
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &body,
                    properties,
                )
                .await?
                .await?;
            match confirmation {
                Confirmation::Ack(None) => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(Error::Unroutable { exchange: String::new(), routing_key: R::QUEUE.to_owned() });
                }
                _ => return Err(Error::Nacked),
            }
            rx.await.map_err(|_| Error::Unavailable("connection lost while waiting for a reply".into()))
        };
        let reply = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::NoReply { queue: R::QUEUE, timeout })??;
        if let Some(message) = reply.properties.headers().as_ref().and_then(|h| headers::header_str(h, headers::RPC_ERROR)) {
            return Err(Error::Remote { queue: R::QUEUE, message: message.to_owned() });
        }
        Ok(R::Reply::decode(reply.data.as_slice())?)
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Some(link) = self.link.lock().await.take() {
            link.close_with_channel("rpc", "closing the request channel").await;
        }
    }
}
