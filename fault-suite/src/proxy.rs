//! A TCP fault proxy for the tests: placed between the framework and Postgres or NATS,
//! it forwards bytes both ways and, on command, adds latency, stalls connections
//! without closing them, resets every open connection, or refuses new ones.
//!
//! ```no_run
//! # async fn run() {
//! use edupulse_fault_suite::proxy::{Direction, FaultProxy};
//! let proxy = FaultProxy::start("127.0.0.1:4222".parse().unwrap()).await;
//! // Connect the framework to proxy.addr() instead of the server, then:
//! proxy.stall(Direction::Both); // bytes stop flowing, connections stay open
//! proxy.release();
//! proxy.reset_all(); // every open connection is reset (RST)
//! proxy.refuse(true); // new connections are reset at once
//! # }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Which way bytes are held by [`FaultProxy::stall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the framework) to the server.
    ToServer,
    /// From the server to the client: replies and acks arrive late.
    ToClient,
    /// Both ways.
    Both,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Control {
    latency: Duration,
    stall_to_server: bool,
    stall_to_client: bool,
    refuse: bool,
}

impl Control {
    fn stalled(&self, to_server: bool) -> bool {
        if to_server {
            self.stall_to_server
        } else {
            self.stall_to_client
        }
    }
}

/// What the proxy has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Connections accepted and forwarded.
    pub accepted: u64,
    /// Connections refused (reset at once) while refusing.
    pub refused: u64,
    /// Connections reset by [`FaultProxy::reset_all`].
    pub reset: u64,
    /// Connections open now.
    pub active: u64,
}

struct Shared {
    upstream: SocketAddr,
    control: watch::Sender<Control>,
    /// Bumped by `reset_all`: every connection open then is reset.
    generation: watch::Sender<u64>,
    accepted: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    active: AtomicU64,
}

/// A running fault proxy; it stops (and resets its connections) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("stats", &self.stats())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    ///
    /// # Panics
    /// If no port can be bound (tests only).
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the fault proxy binds a free port");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            control: watch::Sender::new(Control::default()),
            generation: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            active: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        FaultProxy {
            addr,
            shared,
            accept,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Delays every chunk forwarded, both ways, by `latency` (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.control.send_modify(|c| c.latency = latency);
    }

    /// Holds bytes going `direction` (in the proxy and the kernel's buffers) until
    /// [`FaultProxy::release`]; connections stay open.
    pub fn stall(&self, direction: Direction) {
        self.shared.control.send_modify(|c| match direction {
            Direction::ToServer => c.stall_to_server = true,
            Direction::ToClient => c.stall_to_client = true,
            Direction::Both => {
                c.stall_to_server = true;
                c.stall_to_client = true;
            }
        });
    }

    /// Lets held bytes flow again, both ways.
    pub fn release(&self) {
        self.shared.control.send_modify(|c| {
            c.stall_to_server = false;
            c.stall_to_client = false;
        });
    }

    /// Resets (RST) every connection open now; bytes held by a stall are discarded.
    /// New connections are accepted as before.
    pub fn reset_all(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// While `refuse` is true, new connections are reset as soon as they are accepted.
    pub fn refuse(&self, refuse: bool) {
        self.shared.control.send_modify(|c| c.refuse = refuse);
    }

    /// Counts of what the proxy did.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            accepted: self.shared.accepted.load(Ordering::SeqCst),
            refused: self.shared.refused.load(Ordering::SeqCst),
            reset: self.shared.reset.load(Ordering::SeqCst),
            active: self.shared.active.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.release();
        self.reset_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of descriptors, say: try again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.control.borrow().refuse {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(connection(client, shared.clone()));
    }
}

/// Decrements the active count when a connection ends, however it ends.
struct Active(Arc<Shared>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn connection(client: TcpStream, shared: Arc<Shared>) {
    shared.active.fetch_add(1, Ordering::SeqCst);
    let _active = Active(shared.clone());
    // Subscribe first: a reset ordered from now on applies to this connection.
    let mut generation = shared.generation.subscribe();
    generation.borrow_and_update();
    let upstream = tokio::select! {
        connected = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(shared.upstream),
        ) => match connected {
            Ok(Ok(upstream)) => upstream,
            _ => {
                let _ = client.set_zero_linger();
                return;
            }
        },
        _ = generation.changed() => {
            shared.reset.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_zero_linger();
            return;
        }
    };
    // Closing with a zero linger sends RST: what a reset is. A pump that sees the
    // other side's EOF still sends a FIN with `shutdown`.
    for stream in [&client, &upstream] {
        let _ = stream.set_zero_linger();
        let _ = stream.set_nodelay(true);
    }
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let to_server = pump(
        client_read,
        upstream_write,
        shared.control.subscribe(),
        generation.clone(),
        true,
    );
    let to_client = pump(
        upstream_read,
        client_write,
        shared.control.subscribe(),
        generation.clone(),
        false,
    );
    tokio::select! {
        biased;
        _ = generation.changed() => {
            shared.reset.fetch_add(1, Ordering::SeqCst);
            // Dropping the pumps drops the sockets: RST both ways.
        }
        _ = async { tokio::join!(to_server, to_client) } => {}
    }
}

/// Forwards one direction until EOF or an error. A reset (a new `generation`) stops it
/// before it writes anything more, so bytes held by a stall are never delivered.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut control: watch::Receiver<Control>,
    mut generation: watch::Receiver<u64>,
    to_server: bool,
) -> io::Result<()> {
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        // A stall holds this chunk (and stops reading) until released.
        loop {
            if generation.has_changed().unwrap_or(true) {
                return Ok(());
            }
            let now = *control.borrow_and_update();
            if !now.stalled(to_server) {
                break;
            }
            tokio::select! {
                changed = control.changed() => if changed.is_err() {
                    return Ok(());
                },
                _ = generation.changed() => return Ok(()),
            }
        }
        let latency = control.borrow().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if generation.has_changed().unwrap_or(true) {
            return Ok(());
        }
        to.write_all(&buffer[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, limit: Duration) -> io::Result<Vec<u8>> {
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(limit, stream.read_exact(&mut buf)).await {
            Ok(read) => read.map(|_| buf.to_vec()),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no echo")),
        }
    }

    #[tokio::test]
    async fn forwards_stalls_releases_resets_and_refuses() {
        let proxy = FaultProxy::start(echo().await).await;
        let mut a = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(
            round_trip(&mut a, Duration::from_secs(5)).await.unwrap(),
            b"ping"
        );

        proxy.stall(Direction::ToClient);
        let stalled = round_trip(&mut a, Duration::from_millis(300)).await;
        assert_eq!(stalled.unwrap_err().kind(), io::ErrorKind::TimedOut);
        proxy.release();
        // The held echo arrives after the release, on the same connection.
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), a.read_exact(&mut buf))
            .await
            .expect("released bytes arrive")
            .unwrap();
        assert_eq!(&buf, b"ping");

        proxy.set_latency(Duration::from_millis(150));
        let started = tokio::time::Instant::now();
        round_trip(&mut a, Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        proxy.set_latency(Duration::ZERO);

        proxy.reset_all();
        let mut buf = [0u8; 4];
        let after_reset = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("the reset is seen");
        assert!(
            matches!(after_reset, Ok(0) | Err(_)),
            "a reset connection is closed: {after_reset:?}"
        );
        assert_eq!(proxy.stats().reset, 1);

        proxy.refuse(true);
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(round_trip(&mut refused, Duration::from_secs(2))
            .await
            .is_err());
        proxy.refuse(false);
        let mut b = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut b, Duration::from_secs(5)).await.unwrap();
        let stats = proxy.stats();
        assert_eq!((stats.accepted, stats.refused), (2, 1));
    }
}
