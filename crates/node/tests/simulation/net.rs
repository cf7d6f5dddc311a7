//! Glue between tonic and turmoil's simulated network: accepted connections as a stream for
//! `serve` (each of which a test may stall, see [`Stalls`]), a dialer for the nodes and
//! clients, and raw gRPC clients of one node for the checks and probes that must reach a
//! particular node (its `Status`, or a read sent straight to a deposed leader).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use meridian_rpc::dial::{Connecting, Dialer};
use meridian_rpc::kv::kv_client::KvClient;
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::{StatusRequest, StatusResponse};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{NODES, PORT, host};

/// The connections the nodes accepted, any of which a test may stall: a stalled connection
/// reads nothing until it is resumed, like one flow stuck behind a congested path — its bytes
/// wait, while other connections between the same two hosts carry on. (turmoil holds whole
/// links, and delivers what it held in the order it was sent.)
#[derive(Default)]
pub struct Stalls {
    /// A node and a peer whose next connection starts stalled.
    armed: Mutex<Option<(usize, IpAddr, Arc<Gate>)>>,
}

/// Whether a connection may read, and who waits for it to.
#[derive(Default)]
struct Gate {
    /// Whether a connection took this gate.
    taken: AtomicBool,
    stalled: AtomicBool,
    waiting: Mutex<Option<Waker>>,
}

impl Gate {
    fn resume(&self) {
        self.stalled.store(false, Ordering::SeqCst);
        if let Some(waker) = self.waiting.lock().take() {
            waker.wake();
        }
    }
}

/// A connection stalled by [`Stalls::arm`], resumed by [`Stalled::resume`] or when dropped.
pub struct Stalled(Arc<Gate>);

impl Stalled {
    /// Whether the connection was accepted (since the stall was armed).
    pub fn accepted(&self) -> bool {
        self.0.taken.load(Ordering::SeqCst)
    }

    /// Lets the connection read again.
    pub fn resume(self) {}
}

impl Drop for Stalled {
    fn drop(&mut self) {
        self.0.resume();
    }
}

impl Stalls {
    /// Stalls the next connection `node` accepts from `peer` (one armed at a time: this
    /// replaces an earlier one not yet taken).
    pub fn arm(&self, node: usize, peer: IpAddr) -> Stalled {
        let gate = Arc::new(Gate { stalled: AtomicBool::new(true), ..Gate::default() });
        *self.armed.lock() = Some((node, peer, gate.clone()));
        Stalled(gate)
    }

    /// Takes back a stall not yet taken by a connection.
    pub fn disarm(&self) {
        self.armed.lock().take();
    }

    /// The gate of a connection `node` accepted from `peer`.
    fn accept(&self, node: usize, peer: IpAddr) -> Arc<Gate> {
        let mut armed = self.armed.lock();
        match armed.take() {
            Some((armed_node, armed_peer, gate)) if (armed_node, armed_peer) == (node, peer) => {
                gate.taken.store(true, Ordering::SeqCst);
                gate
            }
            other => {
                *armed = other;
                Arc::new(Gate::default())
            }
        }
    }
}

/// A turmoil TCP stream as a gRPC server connection, which reads nothing while stalled.
pub struct SimConnection {
    stream: turmoil::net::TcpStream,
    gate: Arc<Gate>,
}

impl tonic::transport::server::Connected for SimConnection {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.gate.stalled.load(Ordering::SeqCst) {
            *self.gate.waiting.lock() = Some(context.waker().clone());
            if self.gate.stalled.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.stream).poll_read(context, buffer)
    }
}

impl AsyncWrite for SimConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(context, buffer)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}

/// Accepts `node`'s connections on the simulated network, as a stream for `serve`.
pub async fn listen(
    node: usize,
    stalls: Arc<Stalls>,
) -> std::io::Result<tokio_stream::wrappers::ReceiverStream<std::io::Result<SimConnection>>> {
    let listener =
        turmoil::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT))).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(stream, peer)| SimConnection {
                stream,
                gate: stalls.accept(node, peer.ip()),
            });
            if sender.send(accepted).await.is_err() {
                return;
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

/// Dials over the simulated network.
pub fn sim_dialer() -> Dialer {
    Dialer::custom(|address: String| -> Connecting {
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(address).await?;
            Ok(Box::new(stream) as Box<dyn meridian_rpc::dial::Connection>)
        })
    })
}

/// The address of `node`.
pub fn address(node: usize) -> String {
    format!("{}:{PORT}", host(node))
}

async fn channel(dialer: &Dialer, node: usize) -> Result<tonic::transport::Channel, String> {
    let endpoint = Dialer::endpoint(&address(node))?.timeout(Duration::from_secs(2));
    dialer.connect(endpoint).await.map_err(|error| error.to_string())
}

/// A `Node` service client of `node` (a new connection).
pub async fn node_client(
    dialer: &Dialer,
    node: usize,
) -> Result<NodeClient<tonic::transport::Channel>, String> {
    Ok(NodeClient::new(channel(dialer, node).await?))
}

/// A `Kv` service client of `node` (a new connection), bypassing the client's routing.
pub async fn kv_client(
    dialer: &Dialer,
    node: usize,
) -> Result<KvClient<tonic::transport::Channel>, String> {
    Ok(KvClient::new(channel(dialer, node).await?))
}

/// Asks `node` for the status of all its replicas, within `limit`.
pub async fn status(
    dialer: &Dialer,
    node: usize,
    limit: Duration,
) -> Result<StatusResponse, String> {
    let ask = async {
        let mut client = node_client(dialer, node).await?;
        client
            .status(StatusRequest::default())
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| status.to_string())
    };
    tokio::time::timeout(limit, ask).await.unwrap_or_else(|_| Err("no answer".into()))
}

/// Asks every node for its status.
pub async fn statuses(dialer: &Dialer) -> Vec<(usize, Result<StatusResponse, String>)> {
    let mut statuses = Vec::new();
    for node in 1..=NODES {
        statuses.push((node, status(dialer, node, Duration::from_secs(2)).await));
    }
    statuses
}
