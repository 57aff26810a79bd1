//! A TCP proxy between the platform and RabbitMQ that a test controls: cut every connection
//! (a network failure), refuse new ones (the broker unreachable), or freeze traffic (a broker
//! that stops answering without closing anything).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Refuse,
}

struct State {
    mode: Mutex<Mode>,
    /// Cancelled by `cut`: every connection opened before belongs to it.
    connections: Mutex<CancellationToken>,
    frozen: watch::Sender<bool>,
}

/// A running proxy to `upstream`.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            mode: Mutex::new(Mode::Forward),
            connections: Mutex::new(CancellationToken::new()),
            frozen: watch::channel(false).0,
        });
        let task = tokio::spawn(accept(listener, upstream, state.clone()));
        Self { addr, state, task }
    }

    /// The AMQP URL of `vhost` through this proxy.
    pub fn url(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@{}/{vhost}", self.addr)
    }

    /// Drops every open connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        *self.state.mode.lock().unwrap() = Mode::Refuse;
        let mut connections = self.state.connections.lock().unwrap();
        connections.cancel();
        *connections = CancellationToken::new();
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        *self.state.mode.lock().unwrap() = Mode::Forward;
    }

    /// Stops forwarding bytes in both directions; connections stay open.
    pub fn freeze(&self) {
        self.state.frozen.send_replace(true);
    }

    /// Forwards again after [`Proxy::freeze`].
    pub fn thaw(&self) {
        self.state.frozen.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.connections.lock().unwrap().cancel();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, state: Arc<State>) {
    while let Ok((client, _)) = listener.accept().await {
        if *state.mode.lock().unwrap() == Mode::Refuse {
            drop(client);
            continue;
        }
        let cancel = state.connections.lock().unwrap().clone();
        let frozen = state.frozen.subscribe();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = pump(client_read, server_write, frozen.clone()) => {}
                _ = pump(server_read, client_write, frozen) => {}
            }
        });
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        while *frozen.borrow_and_update() {
            if frozen.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while *frozen.borrow_and_update() {
            if frozen.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
