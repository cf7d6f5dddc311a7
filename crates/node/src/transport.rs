//! Sending Raft messages to other nodes: one long-lived gRPC stream per peer, batching every
//! message of a driver cycle for that peer into one `MessageBatch`.
//!
//! A peer task connects (with backoff from 50 ms up to 2 s), opens the `Raft` stream and
//! forwards batches until the stream breaks (HTTP/2 keep-alive pings notice a peer that vanished
//! without closing the connection), then reconnects. Messages queued while a peer is
//! unreachable are dropped once its queue is full: Raft retransmits what matters, and a node
//! must never block on a slow peer. The address book (node id → address) grows as nodes say
//! hello; it is also persisted by the node so that a restarted node can reach its peers.
//!
//! When a stream that was up breaks (the peer's process died and its host closed the
//! connection, or keep-alive pings went unanswered), or a connection attempt to a peer that was
//! reachable fails, the transport says so at once (`on_peer_lost`): followers of ranges that
//! peer leads need not wait for missed hellos, or ticks they do not run while quiesced, to
//! start electing another leader.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use meridian_raft::{Message, MessageBody, NodeId};
use meridian_rpc::dial::{self, Dialer};
use meridian_rpc::kv as wire;
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::{MessageBatch, RangeMessage, SnapshotChunk};
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::snapshot::{SnapshotRegistry, VersionStream};
use crate::{META_RANGE, RangeId};

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
    /// Called when a peer that was reachable stops being so.
    on_peer_lost: PeerLost,
    /// Range snapshots waiting to be streamed.
    snapshots: Arc<SnapshotRegistry>,
    /// The (peer, range) pairs a snapshot is being streamed to.
    streaming: Arc<Mutex<BTreeSet<(NodeId, RangeId)>>>,
}

/// What the transport calls when it loses a peer.
type PeerLost = Arc<dyn Fn(NodeId) + Send + Sync>;

impl Transport {
    /// Returns a transport for node `node_id` that connects through `dialer`, not connected to
    /// anyone yet, and calls `on_peer_lost` whenever a peer that was reachable stops being so.
    pub fn new(
        node_id: NodeId,
        dialer: Dialer,
        on_peer_lost: impl Fn(NodeId) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Transport {
            node_id,
            dialer,
            cluster_id: RwLock::new(String::new()),
            peers: RwLock::new(BTreeMap::new()),
            on_peer_lost: Arc::new(on_peer_lost),
            snapshots: Arc::new(SnapshotRegistry::default()),
            streaming: Arc::new(Mutex::new(BTreeSet::new())),
        })
    }

    /// Returns the registry where snapshot sources leave range snapshots to stream.
    pub fn snapshots(&self) -> &Arc<SnapshotRegistry> {
        &self.snapshots
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
        let lost = self.on_peer_lost.clone();
        tokio::spawn(run_peer(id, address.to_string(), self.dialer.clone(), receiver, lost));
        true
    }

    /// Queues messages for node `to`; drops them if the peer is unknown or its queue is full.
    /// Snapshots of data ranges go apart, streamed from their engine snapshots.
    pub fn send(&self, to: NodeId, mut messages: Vec<(RangeId, Message)>) {
        messages.retain(|(range, message)| match streamed_snapshot(*range, message) {
            Some(stream_id) => {
                self.stream_snapshot(to, *range, message.clone(), stream_id);
                false
            }
            None => true,
        });
        if messages.is_empty() {
            return;
        }
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

/// Returns the stream id of a snapshot whose versions travel apart, if `message` carries one
/// (the meta range's snapshots never do: they are not decoded to find out).
fn streamed_snapshot(range: RangeId, message: &Message) -> Option<u64> {
    let MessageBody::InstallSnapshot { snapshot } = &message.body else { return None };
    if range == META_RANGE {
        return None;
    }
    let header = wire::RangeSnapshot::decode(snapshot.data.as_slice()).ok()?;
    (header.stream_id != 0).then_some(header.stream_id)
}

impl Transport {
    /// Streams the snapshot registered as `stream_id` to `to`, unless one for the same range is
    /// on its way already (Raft asks again when a follower seems stalled).
    fn stream_snapshot(&self, to: NodeId, range: RangeId, message: Message, stream_id: u64) {
        let Some(stream) = self.snapshots.take(stream_id) else {
            debug!(peer = to.0, range = range.0, "the snapshot to stream expired");
            return;
        };
        let Some(address) = self.address(to) else { return };
        if !self.streaming.lock().insert((to, range)) {
            debug!(peer = to.0, range = range.0, "a snapshot of this range is on its way already");
            return;
        }
        let header = SnapshotChunk {
            cluster_id: self.cluster_id.read().clone(),
            range_id: range.0,
            message: Some((&message).into()),
            versions: Vec::new(),
        };
        let (dialer, streaming) = (self.dialer.clone(), self.streaming.clone());
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            match send_snapshot(dialer, &address, header, stream).await {
                Ok(versions) => info!(
                    peer = to.0,
                    range = range.0,
                    versions,
                    elapsed = ?started.elapsed(),
                    "streamed a range snapshot"
                ),
                Err(error) => {
                    info!(peer = to.0, range = range.0, %error, "a range snapshot failed")
                }
            }
            streaming.lock().remove(&(to, range));
        });
    }
}

/// Connects to the node at `address` within [`dial::CONNECT_TIMEOUT`].
async fn connect(
    dialer: &Dialer,
    address: &str,
) -> Result<NodeClient<tonic::transport::Channel>, String> {
    let endpoint = Dialer::endpoint(address)?;
    let channel = tokio::time::timeout(dial::CONNECT_TIMEOUT, dialer.connect(endpoint))
        .await
        .map_err(|_| "cannot connect in time".to_string())?
        .map_err(|error| error.to_string())?;
    Ok(NodeClient::new(channel))
}

/// Sends `header`, then the versions of `stream` chunk by chunk, reading a chunk only when the
/// call can take it (at most two wait in between). Returns how many versions went out.
async fn send_snapshot(
    dialer: Dialer,
    address: &str,
    header: SnapshotChunk,
    mut stream: VersionStream,
) -> Result<usize, String> {
    let mut client = connect(&dialer, address).await?;
    let (sender, receiver) = mpsc::channel::<SnapshotChunk>(2);
    let call = tokio::spawn(async move {
        client.snapshot(tokio_stream::wrappers::ReceiverStream::new(receiver)).await
    });
    let mut sent = 0;
    if sender.send(header).await.is_ok() {
        while let Some(versions) = stream.next_chunk()? {
            sent += versions.len();
            let chunk = SnapshotChunk { versions, ..SnapshotChunk::default() };
            if sender.send(chunk).await.is_err() {
                break;
            }
        }
    }
    drop(sender);
    match call.await {
        Ok(Ok(_)) => Ok(sent),
        Ok(Err(status)) => Err(status.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

/// Keeps a stream open to one peer and forwards its batches; exits when the transport drops the
/// peer (its queue closes).
async fn run_peer(
    id: NodeId,
    address: String,
    dialer: Dialer,
    mut queue: mpsc::Receiver<MessageBatch>,
    on_peer_lost: PeerLost,
) {
    let mut backoff = Duration::from_millis(50);
    // Whether a loss of the peer is still to be reported: once when it cannot be reached at
    // first, once each time an established stream breaks.
    let mut reachable = true;
    loop {
        let mut client = match connect(&dialer, &address).await {
            Ok(client) => client,
            Err(_) => {
                debug!(peer = id.0, %address, "cannot connect; retrying in {backoff:?}");
                if std::mem::take(&mut reachable) {
                    on_peer_lost(id);
                }
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
        let mut call = tokio::spawn(async move {
            client.raft(tokio_stream::wrappers::ReceiverStream::new(stream_receiver)).await
        });
        // Forward batches until the stream ends; watch it even while nothing is sent (the
        // ranges the peer leads may be quiesced), so that its loss is noticed at once.
        let outcome = loop {
            tokio::select! {
                biased;
                outcome = &mut call => break outcome,
                batch = queue.recv() => {
                    let Some(batch) = batch else {
                        call.abort();
                        return;
                    };
                    if stream_sender.send(batch).await.is_err() {
                        break call.await;
                    }
                }
            }
        };
        debug!(peer = id.0, ?outcome, "stream to peer ended; reconnecting");
        reachable = false;
        on_peer_lost(id);
    }
}
