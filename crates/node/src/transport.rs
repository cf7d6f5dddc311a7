//! Sending Raft messages to other nodes: one long-lived gRPC stream per peer, batching every
//! message of a driver cycle for that peer into one `MessageBatch`.
//!
//! A peer task connects (with backoff from 50 ms up to 2 s), opens the `Raft` stream and
//! forwards batches until the stream breaks (HTTP/2 keep-alive pings notice a peer that vanished
//! without closing the connection), then reconnects. Messages queued while a peer is
//! unreachable are dropped once its queue is full: Raft retransmits what matters, and a node
//! must never block on a slow peer. The address book (node id → address) grows as nodes say
//! hello; it is also persisted by the node so that a restarted node can reach its peers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meridian_raft::{Message, NodeId};
use meridian_rpc::dial::{self, Dialer};
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::{MessageBatch, RangeMessage};
use parking_lot::RwLock;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::RangeId;

/// Batches queued per peer before new ones are dropped.
const PEER_QUEUE_BATCHES: usize = 1024;

struct Peer {
    address: String,
    queue: mpsc::Sender<MessageBatch>,
}

/// The node's connections to its peers. Cheap to share.
pub struct Transport {
    node_id: NodeId,
    dialer: Dialer,
    cluster_id: RwLock<String>,
    peers: RwLock<BTreeMap<NodeId, Peer>>,
}

impl Transport {
    /// Returns a transport for node `node_id` that connects through `dialer`, not connected to
    /// anyone yet.
    pub fn new(node_id: NodeId, dialer: Dialer) -> Arc<Self> {
        Arc::new(Transport {
            node_id,
            dialer,
            cluster_id: RwLock::new(String::new()),
            peers: RwLock::new(BTreeMap::new()),
        })
    }

    /// Sets the cluster id stamped on outgoing batches.
    pub fn set_cluster_id(&self, cluster_id: &str) {
        *self.cluster_id.write() = cluster_id.to_string();
    }

    /// Returns the known peers and their addresses.
    pub fn peers(&self) -> BTreeMap<NodeId, String> {
        self.peers.read().iter().map(|(id, peer)| (*id, peer.address.clone())).collect()
    }

    /// Returns the address of `id`, if known.
    pub fn address(&self, id: NodeId) -> Option<String> {
        self.peers.read().get(&id).map(|peer| peer.address.clone())
    }

    /// Records (or updates) a peer's address and starts its connection task. Returns whether
    /// anything changed.
    pub fn add_peer(self: &Arc<Self>, id: NodeId, address: &str) -> bool {
        if id == self.node_id {
            return false;
        }
        let mut peers = self.peers.write();
        if peers.get(&id).is_some_and(|peer| peer.address == address) {
            return false;
        }
        let (queue, receiver) = mpsc::channel(PEER_QUEUE_BATCHES);
        peers.insert(id, Peer { address: address.to_string(), queue });
        info!(peer = id.0, address, "peer added");
        tokio::spawn(run_peer(id, address.to_string(), self.dialer.clone(), receiver));
        true
    }

    /// Queues messages for node `to`; drops them if the peer is unknown or its queue is full.
    pub fn send(&self, to: NodeId, messages: Vec<(RangeId, Message)>) {
        let peers = self.peers.read();
        let Some(peer) = peers.get(&to) else {
            debug!(peer = to.0, "dropping messages for an unknown peer");
            return;
        };
        let batch = MessageBatch {
            from_node: self.node_id.0,
            cluster_id: self.cluster_id.read().clone(),
            messages: messages
                .iter()
                .map(|(range, message)| RangeMessage {
                    range_id: range.0,
                    message: Some(message.into()),
                })
                .collect(),
        };
        if peer.queue.try_send(batch).is_err() {
            debug!(peer = to.0, "peer queue full or closed; dropping a batch");
        }
    }
}

/// Keeps a stream open to one peer and forwards its batches; exits when the transport drops the
/// peer (its queue closes).
async fn run_peer(
    id: NodeId,
    address: String,
    dialer: Dialer,
    mut queue: mpsc::Receiver<MessageBatch>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let connected = match Dialer::endpoint(&address) {
            Ok(endpoint) => {
                tokio::time::timeout(dial::CONNECT_TIMEOUT, dialer.connect(endpoint)).await.ok()
            }
            Err(_) => None,
        };
        let mut client = match connected {
            Some(Ok(channel)) => NodeClient::new(channel),
            _ => {
                debug!(peer = id.0, %address, "cannot connect; retrying in {backoff:?}");
                // Drain what queued up meanwhile: it is stale by the time we connect.
                while queue.try_recv().is_ok() {}
                if queue.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (stream_sender, stream_receiver) = mpsc::channel::<MessageBatch>(PEER_QUEUE_BATCHES);
        let call = tokio::spawn(async move {
            client.raft(tokio_stream::wrappers::ReceiverStream::new(stream_receiver)).await
        });
        loop {
            let Some(batch) = queue.recv().await else {
                call.abort();
                return;
            };
            if stream_sender.send(batch).await.is_err() {
                break;
            }
        }
        let outcome = call.await;
        debug!(peer = id.0, ?outcome, "stream to peer ended; reconnecting");
    }
}
