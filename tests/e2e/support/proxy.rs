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
                _ = pump(client_read, server_write, frozen.clone(), |_| {}) => {}
                _ = pump(server_read, client_write, frozen, |_| {}) => {}
            }
        });
    }
}

/// Forwards `from` to `to` while not `frozen`, telling `forwarded` each chunk's size.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    mut forwarded: impl FnMut(usize),
) {
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
        forwarded(n);
    }
}

/// When [`cut_after_frames`] cuts, once the broker's last frame is through.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// At once, while the client is still reading that frame.
    AtOnce,
    /// Once the client has answered with bytes of its own (or stayed silent for 1 s): while it
    /// waits for the broker's reply.
    WhileTheClientWaits,
}

/// A proxy that forwards each connection until the broker has sent `frames` whole AMQP frames,
/// then closes both sides (`cut` says exactly when): a connection cut at one exact step of its
/// set-up. Each connection reports the (class, method) of the last frame it forwarded.
pub async fn cut_after_frames(upstream: SocketAddr, frames: usize, cut: Cut) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<(u16, u16)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
    let addr = listener.local_addr().unwrap();
    let (report, reports) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let report = report.clone();
            tokio::spawn(async move {
                let (client_read, mut client_write) = client.into_split();
                let (mut server_read, server_write) = server.into_split();
                // Bytes the client has sent so far.
                let (sent, mut client_sent) = watch::channel(0usize);
                let never_frozen = watch::channel(false).1;
                let up = pump(client_read, server_write, never_frozen, move |n| sent.send_modify(|total| *total += n));
                let down = async {
                    let mut last = None;
                    for _ in 0..frames {
                        // type (1), channel (2), size (4), payload, frame end (1)
                        let mut header = [0u8; 7];
                        server_read.read_exact(&mut header).await.ok()?;
                        let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
                        let mut rest = vec![0u8; size + 1];
                        server_read.read_exact(&mut rest).await.ok()?;
                        if header[0] == 1 && size >= 4 {
                            last = Some((u16::from_be_bytes([rest[0], rest[1]]), u16::from_be_bytes([rest[2], rest[3]])));
                        }
                        client_sent.mark_unchanged();
                        client_write.write_all(&header).await.ok()?;
                        client_write.write_all(&rest).await.ok()?;
                    }
                    if let Cut::WhileTheClientWaits = cut {
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), client_sent.changed()).await;
                    }
                    last
                };
                // Both halves of both sockets are dropped when this returns: the cut.
                tokio::select! {
                    () = up => {}
                    last = down => if let Some(last) = last { let _ = report.send(last); },
                }
            });
        }
    });
    (addr, reports)
}
