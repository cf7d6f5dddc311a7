//! Glue between tonic and turmoil's simulated network: accepted connections as a stream for
//! `serve`, a dialer for the nodes and clients, and raw gRPC clients of one node for the
//! checks and probes that must reach a particular node (its `Status`, or a read sent straight
//! to a deposed leader).

use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use meridian_rpc::dial::{Connecting, Dialer};
use meridian_rpc::kv::kv_client::KvClient;
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::{StatusRequest, StatusResponse};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{NODES, PORT, host};

/// A turmoil TCP stream as a gRPC server connection.
pub struct SimConnection(turmoil::net::TcpStream);

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
        Pin::new(&mut self.0).poll_read(context, buffer)
    }
}

impl AsyncWrite for SimConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(context, buffer)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(context)
    }
}

/// Accepts connections on the simulated network, as a stream for `serve`.
pub async fn listen()
-> std::io::Result<tokio_stream::wrappers::ReceiverStream<std::io::Result<SimConnection>>> {
    let listener =
        turmoil::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT))).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(stream, _)| SimConnection(stream));
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
