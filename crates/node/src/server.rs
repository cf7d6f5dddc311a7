//! A running node: the store, the driver task, the gRPC services (`Kv` for clients, `Node` for
//! peers and administration) and the hello loop that keeps the address book current.
//!
//! Identity and membership are checked at the edges: a store remembers the node id and cluster
//! id it belongs to, so that starting a node with another node's or another cluster's store
//! fails with a clear error, and batches from a node of another cluster are refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_client::{Client, ClientOptions};
use meridian_clock::{ClockOptions, ClockSource, SkewedClock, SystemClock, TrueTime};
use meridian_raft::NodeId;
use meridian_rpc::dial::{self, Dialer};
use meridian_rpc::kv::kv_server::{Kv, KvServer};
use meridian_rpc::kv::{
    AllocateRangeIdsRequest, AllocateRangeIdsResponse, DeleteRequest, GetRequest, GetResponse,
    KeyValue, ListRangesRequest, ListRangesResponse, NodeAddress, PutRequest, RangeLookupRequest,
    RangeLookupResponse, ScanRequest, ScanResponse, SplitRequest, SplitResponse,
    UpdateDescriptorsRequest, UpdateDescriptorsResponse, WriteResponse,
};
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::node_server::{Node as NodeService, NodeServer};
use meridian_rpc::node::{
    Ack, BootstrapRequest, BootstrapResponse, DecommissionRequest, DecommissionResponse,
    HelloRequest, HelloResponse, InitRequest, InitResponse, MessageBatch, Peer, PeerClock,
    PeerLiveness, RangeStatus, ReplicaProgress, StatusRequest, StatusResponse,
};
use meridian_storage::{Engine, FaultyEngine, RocksEngine, RocksOptions, WriteBatch, keyspace};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::clock_monitor::ClockMonitor;
use crate::driver::{
    Background, Driver, DriverOptions, Event, MembershipCheck, MetaWrite, NodeLoad, PeerLoad,
    RaftTiming, RangeReport, ReadRequest, log_fatal,
};
use crate::transport::Transport;
use crate::{META_RANGE, NodeError, RangeId};

/// How a node is started.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// This node's id (never zero).
    pub node_id: NodeId,
    /// The store directory.
    pub store: PathBuf,
    /// The address to listen on for gRPC.
    pub rpc_listen: SocketAddr,
    /// The address peers and clients use to reach this node (defaults to `rpc_listen`).
    pub advertise: String,
    /// Addresses of nodes to say hello to.
    pub join: Vec<String>,
    /// The clock's bound when the operating system reports none.
    pub clock: ClockOptions,
    /// Raft timing.
    pub timing: RaftTiming,
    /// Fault injection for tests of the clock checks: shift this node's clock by this many ns.
    pub inject_clock_skew_ns: i64,
    /// Where to serve Prometheus metrics over HTTP, if anywhere.
    pub http_listen: Option<SocketAddr>,
    /// How long a node may go unheard before its replicas are replaced elsewhere.
    pub dead_node_timeout: Duration,
    /// Fault injection for tests: writes fail, as on a full disk, after this many bytes.
    pub inject_disk_full_after_bytes: Option<u64>,
    /// A data range whose data grows past this many bytes splits in two.
    pub range_max_bytes: u64,
    /// Fault injection for tests: abort the process right after leading a split, before the
    /// meta range records it.
    pub inject_crash_after_split: bool,
    /// How often the node asks the meta range about every replica it holds (replicas with no
    /// leader or no snapshot are asked about sooner).
    pub replica_check_interval: Duration,
}

const NODE_ID_KEY: &[u8] = b"\x01node/id";
const CLUSTER_ID_KEY: &[u8] = b"\x01node/cluster_id";
const DRAINING_KEY: &[u8] = b"\x01node/draining";
const PEER_PREFIX: &[u8] = b"\x01node/peer/";
/// How often a node says hello to the nodes it knows.
const HELLO_INTERVAL: Duration = Duration::from_secs(2);
/// A peer unheard for this long counts as unreachable: quiesced followers of the ranges it
/// leads wake up to elect another leader.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(5);
/// Requests queued for the driver before clients are told to back off.
const EVENT_QUEUE: usize = 16_384;
/// The largest gRPC message a node accepts (range snapshots travel in one message).
const MAX_MESSAGE_BYTES: usize = 1 << 30;
/// The most keys one split request may name.
const MAX_SPLIT_KEYS: usize = 100_000;

/// Writes node metadata; the object-safe slice of [`Engine`] the services need.
trait MetaStore: Send + Sync {
    fn write_meta(&self, batch: WriteBatch, sync: bool) -> meridian_storage::Result<()>;
}

impl<E: Engine> MetaStore for E {
    fn write_meta(&self, batch: WriteBatch, sync: bool) -> meridian_storage::Result<()> {
        self.write(batch, sync)
    }
}

/// State shared by the services.
struct Shared {
    node_id: NodeId,
    advertise: String,
    /// Where node metadata (cluster id, peer addresses) is written.
    meta: Arc<dyn MetaStore>,
    truetime: TrueTime,
    transport: Arc<Transport>,
    events: mpsc::Sender<Event>,
    cluster_id: Mutex<String>,
    clock: Mutex<ClockMonitor>,
    /// Why this node refuses to serve, while its clock disagrees with its peers.
    clock_problem: Mutex<Option<String>>,
    /// When each peer last answered a hello.
    last_seen: Mutex<BTreeMap<NodeId, Instant>>,
    /// When this node started (a peer never heard from counts as dead only after the timeout).
    started: Instant,
    dead_node_timeout: Duration,
    /// This node's client of other ranges (the meta range, mostly).
    client: Client,
    /// This node's load, kept by the driver.
    load: Arc<NodeLoad>,
    /// Whether this node is being decommissioned.
    draining: std::sync::atomic::AtomicBool,
    /// The peers' loads from their last hellos.
    peer_loads: Mutex<BTreeMap<NodeId, PeerLoad>>,
    /// How this node connects to others.
    dialer: Dialer,
}

impl Shared {
    /// Connects to the node at `address`.
    async fn connect(&self, address: &str) -> Result<NodeClient<Channel>, String> {
        let endpoint = Dialer::endpoint(address)?;
        let channel = self.dialer.connect(endpoint).await.map_err(|error| error.to_string())?;
        Ok(NodeClient::new(channel))
    }

    fn cluster_id(&self) -> String {
        self.cluster_id.lock().clone()
    }

    fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This node's load as it reports it.
    fn own_load(&self) -> PeerLoad {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        PeerLoad {
            replicas: self.load.replicas.load(relaxed),
            leaders: self.load.leaders.load(relaxed),
            draining: self.draining(),
        }
    }

    /// Fails if this node's clock disagrees with a majority of its peers.
    fn check_clock(&self) -> Result<(), Status> {
        match self.clock_problem.lock().as_ref() {
            Some(problem) => Err(Status::unavailable(problem.clone())),
            None => Ok(()),
        }
    }

    /// Returns the peers that did not answer the last hello rounds.
    fn unreachable(&self) -> BTreeSet<NodeId> {
        let now = Instant::now();
        let last_seen = self.last_seen.lock();
        self.transport
            .peers()
            .into_keys()
            .filter(|peer| {
                let since = last_seen.get(peer).copied().unwrap_or(self.started);
                now.saturating_duration_since(since) > UNREACHABLE_AFTER
            })
            .collect()
    }

    /// Returns when each known peer was last heard from, and whether it counts as dead.
    fn liveness(&self) -> Vec<PeerLiveness> {
        let now = Instant::now();
        let last_seen = self.last_seen.lock();
        self.transport
            .peers()
            .into_keys()
            .map(|peer| {
                let heard = last_seen.get(&peer).copied();
                let since = heard.unwrap_or(self.started);
                let load = self.peer_loads.lock().get(&peer).copied().unwrap_or_default();
                PeerLiveness {
                    replicas: load.replicas,
                    leaders: load.leaders,
                    draining: load.draining,
                    node_id: peer.0,
                    last_heard_ms: heard
                        .map(|at| now.saturating_duration_since(at).as_millis() as u64),
                    dead: now.saturating_duration_since(since) > self.dead_node_timeout,
                }
            })
            .collect()
    }

    /// Records a peer in the transport and the store.
    fn remember_peer(&self, id: NodeId, address: &str) {
        if id == self.node_id || id.0 == 0 || address.is_empty() {
            return;
        }
        if self.transport.add_peer(id, address) {
            let mut key = PEER_PREFIX.to_vec();
            key.extend_from_slice(&id.0.to_be_bytes());
            let mut batch = WriteBatch::new();
            batch.put(key, address.as_bytes().to_vec());
            if let Err(error) = self.meta.write_meta(batch, false) {
                warn!(%error, "could not persist a peer address");
            }
        }
    }

    fn peers(&self) -> Vec<Peer> {
        let mut peers: Vec<Peer> = self
            .transport
            .peers()
            .into_iter()
            .map(|(id, address)| Peer { node_id: id.0, address })
            .collect();
        peers.push(Peer { node_id: self.node_id.0, address: self.advertise.clone() });
        peers.sort_by_key(|peer| peer.node_id);
        peers
    }

    /// Checks a peer's cluster id against ours (an empty one is a node not yet initialized).
    fn check_cluster(&self, theirs: &str) -> Result<(), NodeError> {
        let ours = self.cluster_id();
        if !ours.is_empty() && !theirs.is_empty() && ours != theirs {
            return Err(NodeError::ClusterMismatch { ours, theirs: theirs.to_string() });
        }
        Ok(())
    }

    /// Sends a client request to the driver unless the clock check fails, and counts and times
    /// it.
    async fn request<T>(
        &self,
        operation: &'static str,
        event: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Event,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let result = match self.check_clock() {
            Ok(()) => self.call(event).await,
            Err(status) => Err(status),
        };
        let outcome = match &result {
            Ok(_) => "Ok".to_string(),
            Err(status) => format!("{:?}", status.code()),
        };
        metrics::counter!("meridian_kv_requests_total", "operation" => operation, "outcome" => outcome).increment(1);
        metrics::histogram!("meridian_kv_request_seconds", "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn call<T>(
        &self,
        event: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Event,
    ) -> Result<T, Status> {
        let (reply, receiver) = oneshot::channel();
        self.events
            .try_send(event(reply))
            .map_err(|_| Status::resource_exhausted("the node is overloaded; retry later"))?;
        receiver
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?
            .map_err(Status::from)
    }

    /// Returns the known addresses of `nodes`.
    fn addresses(&self, nodes: impl IntoIterator<Item = u64>) -> Vec<NodeAddress> {
        nodes
            .into_iter()
            .filter_map(|node| {
                let address = if node == self.node_id.0 {
                    Some(self.advertise.clone())
                } else {
                    self.transport.address(NodeId(node))
                };
                address.map(|address| NodeAddress { node_id: node, address })
            })
            .collect()
    }

    /// Tells this node's client the addresses of the peers (it tries them for the meta range).
    fn refresh_client(&self) {
        self.client.learn_addresses(
            self.transport.peers().into_iter().map(|(id, address)| (id.0, address)),
        );
    }

    /// Splits `range` (led here) at `keys`: reserves range ids in the meta range, applies the
    /// split through the range's log, and records the resulting descriptors in the meta
    /// range. If recording fails the leaders record them later (see `driver/maintenance.rs`).
    async fn split(
        &self,
        range: RangeId,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<meridian_rpc::kv::RangeDescriptor>, Status> {
        if keys.is_empty() || keys.len() > MAX_SPLIT_KEYS {
            return Err(Status::invalid_argument(format!(
                "a split needs between 1 and {MAX_SPLIT_KEYS} keys"
            )));
        }
        let check = keys.clone();
        self.request("split", |reply| Event::CheckSplit { range, keys: check, reply }).await?;
        self.refresh_client();
        let count = keys.len() as u64;
        let first =
            self.client.allocate_range_ids(count).await.map_err(|error| {
                Status::unavailable(format!("cannot reserve range ids: {error}"))
            })?;
        debug!(range = range.0, first, count, "reserved range ids for a split");
        let ids = (first..first + count).collect();
        let descriptors =
            self.request("split", |reply| Event::Split { range, keys, ids, reply }).await?;
        if let Err(error) = self.client.update_descriptors(descriptors.clone()).await {
            warn!(range = range.0, %error, "split applied but not yet recorded in the meta range");
        }
        Ok(descriptors)
    }

    /// Persists the cluster id and creates the first range with `voters`.
    async fn bootstrap(&self, cluster_id: &str, voters: &[Peer]) -> Result<(), Status> {
        let current = self.cluster_id();
        if !current.is_empty() && current != cluster_id {
            return Err(NodeError::AlreadyInitialized(current).into());
        }
        if !voters.iter().any(|peer| peer.node_id == self.node_id.0) {
            return Err(Status::invalid_argument("this node is not among the voters"));
        }
        for peer in voters {
            self.remember_peer(NodeId(peer.node_id), &peer.address);
        }
        let mut batch = WriteBatch::new();
        batch.put(CLUSTER_ID_KEY.to_vec(), cluster_id.as_bytes().to_vec());
        self.meta.write_meta(batch, true).map_err(|error| Status::internal(error.to_string()))?;
        *self.cluster_id.lock() = cluster_id.to_string();
        self.transport.set_cluster_id(cluster_id);
        let ids = voters.iter().map(|peer| NodeId(peer.node_id)).collect();
        self.call(|reply| Event::Bootstrap { voters: ids, reply }).await
    }
}

/// The `Node` gRPC service.
struct NodeApi(Arc<Shared>);

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn raft(
        &self,
        request: Request<Streaming<MessageBatch>>,
    ) -> Result<Response<Ack>, Status> {
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            self.0.check_cluster(&batch.cluster_id)?;
            let mut messages = Vec::with_capacity(batch.messages.len());
            for range_message in &batch.messages {
                let message = range_message
                    .message
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("range message without a message"))?;
                let message = meridian_raft::Message::try_from(message)
                    .map_err(|error| Status::invalid_argument(error.to_string()))?;
                if message.to != self.0.node_id {
                    return Err(Status::invalid_argument(format!(
                        "message for node {} sent to node {}",
                        message.to, self.0.node_id
                    )));
                }
                messages.push((RangeId(range_message.range_id), message));
            }
            // Raft tolerates loss: drop rather than block when the driver is busy.
            if self.0.events.try_send(Event::Raft(messages)).is_err() {
                warn!("driver queue full; dropping a raft batch");
            }
        }
        Ok(Response::new(Ack {}))
    }

    async fn hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloResponse>, Status> {
        let request = request.into_inner();
        self.0.check_cluster(&request.cluster_id)?;
        if let Some(from) = &request.from {
            self.0.remember_peer(NodeId(from.node_id), &from.address);
        }
        let load = self.0.own_load();
        Ok(Response::new(HelloResponse {
            node: Some(Peer { node_id: self.0.node_id.0, address: self.0.advertise.clone() }),
            cluster_id: self.0.cluster_id(),
            peers: self.0.peers(),
            clock_nanos: self.0.truetime.read().local.as_nanos(),
            replicas: load.replicas,
            leaders: load.leaders,
            draining: load.draining,
        }))
    }

    async fn init(&self, _: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let current = self.0.cluster_id();
        if !current.is_empty() {
            return Err(NodeError::AlreadyInitialized(current).into());
        }
        // Up to three voters: this node and the known peers with the lowest ids.
        let mut voters: Vec<Peer> = self
            .0
            .peers()
            .into_iter()
            .filter(|peer| peer.node_id != self.0.node_id.0)
            .take(2)
            .collect();
        voters.push(Peer { node_id: self.0.node_id.0, address: self.0.advertise.clone() });
        voters.sort_by_key(|peer| peer.node_id);
        let cluster_id = new_cluster_id(self.0.node_id);
        // Check every voter first, so that an unreachable or already initialized one fails the
        // init before any node is bootstrapped.
        let mut clients = Vec::new();
        for peer in voters.iter().filter(|peer| peer.node_id != self.0.node_id.0) {
            let unreachable = |error: String| {
                Status::unavailable(format!(
                    "cannot reach node {} at {}: {error}",
                    peer.node_id, peer.address
                ))
            };
            let mut client = self.0.connect(&peer.address).await.map_err(unreachable)?;
            let hello = HelloRequest {
                from: Some(Peer { node_id: self.0.node_id.0, address: self.0.advertise.clone() }),
                cluster_id: String::new(),
            };
            let answer = client
                .hello(hello)
                .await
                .map_err(|status| unreachable(status.message().to_string()))?;
            let answer = answer.into_inner();
            if !answer.cluster_id.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "node {} already belongs to cluster {}",
                    peer.node_id, answer.cluster_id
                )));
            }
            clients.push(client);
        }
        for mut client in clients {
            client
                .bootstrap(BootstrapRequest {
                    cluster_id: cluster_id.clone(),
                    voters: voters.clone(),
                })
                .await?;
        }
        self.0.bootstrap(&cluster_id, &voters).await?;
        info!(%cluster_id, voters = ?voters.iter().map(|peer| peer.node_id).collect::<Vec<_>>(), "cluster initialized");
        Ok(Response::new(InitResponse { cluster_id, voters }))
    }

    async fn bootstrap(
        &self,
        request: Request<BootstrapRequest>,
    ) -> Result<Response<BootstrapResponse>, Status> {
        let request = request.into_inner();
        if request.cluster_id.is_empty() {
            return Err(Status::invalid_argument("empty cluster id"));
        }
        self.0.bootstrap(&request.cluster_id, &request.voters).await?;
        Ok(Response::new(BootstrapResponse {}))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let ranges = request.into_inner().range_ids.into_iter().map(RangeId).collect();
        let (reply, receiver) = oneshot::channel();
        self.0
            .events
            .try_send(Event::Status { ranges, reply })
            .map_err(|_| Status::resource_exhausted("the node is overloaded; retry later"))?;
        let statuses =
            receiver.await.map_err(|_| Status::unavailable("the node is shutting down"))?;
        let reading = self.0.truetime.read();
        let now = reading.local.as_nanos();
        let ranges = statuses
            .into_iter()
            .map(|RangeReport { range, descriptor, status, progress, config_index }| RangeStatus {
                range_id: range.0,
                quiesced: status.quiesced,
                start: descriptor.start,
                end: descriptor.end.unwrap_or_default(),
                generation: descriptor.generation,
                role: format!("{:?}", status.role).to_lowercase(),
                term: status.term.0,
                leader: status.leader.map_or(0, |id| id.0),
                commit: status.commit.0,
                applied: status.applied.0,
                last_index: status.last_index.0,
                voters: status.configuration.voters.iter().map(|id| id.0).collect(),
                learners: status.configuration.learners.iter().map(|id| id.0).collect(),
                lease_remaining_ms: status.lease_end.saturating_sub(now) / 1_000_000,
                config_index: config_index.0,
                outgoing_voters: status
                    .configuration
                    .outgoing_voters
                    .iter()
                    .map(|id| id.0)
                    .collect(),
                replicas: progress
                    .into_iter()
                    .map(|(node, index)| ReplicaProgress { node_id: node.0, match_index: index.0 })
                    .collect(),
            })
            .collect();
        Ok(Response::new(StatusResponse {
            node_id: self.0.node_id.0,
            cluster_id: self.0.cluster_id(),
            address: self.0.advertise.clone(),
            peers: self.0.peers(),
            ranges,
            clock_uncertainty_ns: reading.uncertainty.as_nanos() as u64,
            clock_bound: reading.bound.to_string(),
            peer_clocks: self
                .0
                .clock
                .lock()
                .samples()
                .iter()
                .map(|(peer, sample)| PeerClock {
                    node_id: peer.0,
                    offset_ns: sample.offset_ns,
                    round_trip_ns: sample.round_trip_ns,
                })
                .collect(),
            clock_problem: self.0.clock_problem.lock().clone().unwrap_or_default(),
            liveness: self.0.liveness(),
            replicas: self.0.own_load().replicas,
            leaders: self.0.own_load().leaders,
            draining: self.0.draining(),
        }))
    }

    async fn decommission(
        &self,
        _: Request<DecommissionRequest>,
    ) -> Result<Response<DecommissionResponse>, Status> {
        if self.0.cluster_id().is_empty() {
            return Err(NodeError::NotInitialized.into());
        }
        let mut batch = WriteBatch::new();
        batch.put(DRAINING_KEY.to_vec(), vec![1]);
        self.0.meta.write_meta(batch, true).map_err(|error| Status::internal(error.to_string()))?;
        self.0.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        self.0
            .events
            .send(Event::Drain)
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
        warn!("decommissioning: replicas move to other nodes, leaderships are handed away");
        Ok(Response::new(DecommissionResponse {}))
    }
}

/// The `Kv` gRPC service.
struct KvApi(Arc<Shared>);

/// Returns the range a request names, refusing none.
fn range_of(range_id: u64) -> Result<RangeId, Status> {
    if range_id == 0 {
        return Err(Status::invalid_argument("the request names no range (range_id 0)"));
    }
    Ok(RangeId(range_id))
}

#[tonic::async_trait]
impl Kv for KvApi {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let request = request.into_inner();
        let (range, key) = (range_of(request.range_id)?, request.key);
        let found = self
            .0
            .request("get", |reply| Event::Read(ReadRequest::Get { range, key, reply }))
            .await?;
        Ok(Response::new(match found {
            Some((value, timestamp)) => GetResponse { value: Some(value), timestamp },
            None => GetResponse { value: None, timestamp: 0 },
        }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        let (range, key, value) = (range_of(request.range_id)?, request.key, request.value);
        let timestamp = self
            .0
            .request("put", |reply| Event::Write { range, key, value: Some(value), reply })
            .await?;
        Ok(Response::new(WriteResponse { timestamp }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let request = request.into_inner();
        let (range, key) = (range_of(request.range_id)?, request.key);
        let timestamp = self
            .0
            .request("delete", |reply| Event::Write { range, key, value: None, reply })
            .await?;
        Ok(Response::new(WriteResponse { timestamp }))
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let end = (!request.end.is_empty()).then_some(request.end);
        let limit = if request.limit == 0 { 1_000 } else { request.limit.min(100_000) as usize };
        let start = request.start;
        let result = self
            .0
            .request("scan", |reply| {
                Event::Read(ReadRequest::Scan { range, start, end, limit, reply })
            })
            .await?;
        Ok(Response::new(ScanResponse {
            rows: result
                .rows
                .into_iter()
                .map(|(key, value, timestamp)| KeyValue { key, value, timestamp })
                .collect(),
            resume_key: result.resume_key,
        }))
    }

    async fn range_lookup(
        &self,
        request: Request<RangeLookupRequest>,
    ) -> Result<Response<RangeLookupResponse>, Status> {
        let key = request.into_inner().key;
        let descriptor = self
            .0
            .request("range_lookup", |reply| Event::Read(ReadRequest::Lookup { key, reply }))
            .await?;
        let nodes = descriptor.voters.iter().chain(&descriptor.learners).copied();
        let addresses = self.0.addresses(nodes.collect::<Vec<_>>());
        Ok(Response::new(RangeLookupResponse { descriptor: Some(descriptor), addresses }))
    }

    async fn list_ranges(
        &self,
        _: Request<ListRangesRequest>,
    ) -> Result<Response<ListRangesResponse>, Status> {
        let descriptors =
            self.0.request("list_ranges", |reply| Event::Read(ReadRequest::List { reply })).await?;
        let mut nodes: Vec<u64> =
            descriptors.iter().flat_map(|d| d.voters.iter().chain(&d.learners)).copied().collect();
        nodes.sort_unstable();
        nodes.dedup();
        let addresses = self.0.addresses(nodes);
        Ok(Response::new(ListRangesResponse { descriptors, addresses }))
    }

    async fn split(
        &self,
        request: Request<SplitRequest>,
    ) -> Result<Response<SplitResponse>, Status> {
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let descriptors = self.0.split(range, request.keys).await?;
        Ok(Response::new(SplitResponse { descriptors }))
    }

    async fn update_descriptors(
        &self,
        request: Request<UpdateDescriptorsRequest>,
    ) -> Result<Response<UpdateDescriptorsResponse>, Status> {
        let descriptors = request.into_inner().descriptors;
        if let Some(bad) = descriptors.iter().find(|d| d.range_id <= META_RANGE.0) {
            return Err(Status::invalid_argument(format!(
                "range {} cannot be recorded in the meta range",
                bad.range_id
            )));
        }
        if let Some(bad) = descriptors.iter().find(|d| !d.end.is_empty() && d.start >= d.end) {
            return Err(Status::invalid_argument(format!(
                "range {} has an empty span",
                bad.range_id
            )));
        }
        self.0
            .request("update_descriptors", |reply| {
                Event::Meta(MetaWrite::UpdateDescriptors { descriptors, reply })
            })
            .await?;
        Ok(Response::new(UpdateDescriptorsResponse {}))
    }

    async fn allocate_range_ids(
        &self,
        request: Request<AllocateRangeIdsRequest>,
    ) -> Result<Response<AllocateRangeIdsResponse>, Status> {
        let count = request.into_inner().count;
        if count == 0 || count > MAX_SPLIT_KEYS as u64 {
            return Err(Status::invalid_argument(format!(
                "can reserve between 1 and {MAX_SPLIT_KEYS} range ids at once"
            )));
        }
        let first = self
            .0
            .request("allocate_range_ids", |reply| {
                Event::Meta(MetaWrite::AllocateRangeIds { count, reply })
            })
            .await?;
        Ok(Response::new(AllocateRangeIdsResponse { first }))
    }
}

/// Does the work the driver hands out: records descriptors in the meta range and splits
/// ranges that grew too large, each in its own task, reporting back to the driver.
async fn background_loop(shared: Arc<Shared>, mut work: mpsc::UnboundedReceiver<Background>) {
    while let Some(item) = work.recv().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            shared.refresh_client();
            match item {
                Background::Publish(items) => {
                    let descriptors = items.iter().map(|(_, _, d)| d.clone()).collect();
                    let result = shared.client.update_descriptors(descriptors).await;
                    if let Err(error) = &result {
                        warn!(%error, "could not record descriptors in the meta range");
                    }
                    let ranges =
                        items.into_iter().map(|(range, version, _)| (range, version)).collect();
                    let _ = shared
                        .events
                        .send(Event::Published { ranges, recorded: result.is_ok() })
                        .await;
                }
                Background::CheckMembership(replicas) => {
                    // One listing of the meta range answers every data range of the batch.
                    let listing: Option<Listing> =
                        if replicas.iter().any(|check| check.range != META_RANGE) {
                            shared.client.ranges().await.ok().map(|(descriptors, _)| {
                                descriptors.into_iter().map(|d| (d.range_id, d)).collect()
                            })
                        } else {
                            None
                        };
                    let (mut removed, mut kept) = (Vec::new(), Vec::new());
                    for check in replicas {
                        match membership_verdict(&shared, &check, listing.as_ref()).await {
                            Some(false) => removed.push((check.range, check.version)),
                            _ => kept.push(check.range),
                        }
                    }
                    let _ = shared.events.send(Event::MembershipChecked { removed, kept }).await;
                }
                Background::Split { range, key } => {
                    if let Err(error) = shared.split(range, vec![key]).await {
                        warn!(range = range.0, %error, "size-triggered split failed");
                    }
                    let _ = shared.events.send(Event::SplitDone { range }).await;
                }
            }
        });
    }
}

/// The meta range's descriptors by range id.
type Listing = HashMap<u64, meridian_rpc::kv::RangeDescriptor>;

/// Whether `node` is in any of a configuration's member lists (voters, the outgoing voters of
/// a joint configuration, learners).
fn listed(node: u64, lists: [&[u64]; 3]) -> bool {
    lists.iter().any(|members| members.contains(&node))
}

/// Asks whether this node still belongs to the range of `check`: `Some(false)` when the meta
/// range records the range at a version at least as new as the replica's without this node,
/// `Some(true)` when it lists the node, `None` when it cannot tell (unreachable, not recorded
/// yet, older). A replica still waiting for its first snapshot knows no version: any record
/// without the node counts (destroying it in error costs a snapshot, not data: it holds
/// none). The meta range, which records no descriptor of its own, is asked about through its
/// leader; the others are looked up in `listing` (`None`: the meta range could not be read).
async fn membership_verdict(
    shared: &Shared,
    check: &MembershipCheck,
    listing: Option<&Listing>,
) -> Option<bool> {
    let ours = &check.descriptor;
    if check.range == META_RANGE {
        let config_index = if check.initialized { ours.config_index } else { 0 };
        return meta_membership_verdict(shared, config_index).await;
    }
    let recorded = listing?.get(&check.range.0)?;
    if listed(shared.node_id.0, [&recorded.voters, &recorded.outgoing_voters, &recorded.learners]) {
        return Some(true);
    }
    let newer_or_same = !check.initialized
        || (recorded.generation, recorded.config_index) >= (ours.generation, ours.config_index);
    if newer_or_same { Some(false) } else { None }
}

/// Asks the peers which of them leads the meta range and whether its configuration, applied at
/// `config_index` or later, still lists this node. Configurations apply only once committed, so
/// a leader's configuration without this node means the removal is final. (A leader that was
/// since deposed may be out of date; if this node was added back meanwhile, destroying its
/// replica costs a snapshot, not safety: the replica created again withholds its vote until
/// that snapshot arrives.)
async fn meta_membership_verdict(shared: &Shared, config_index: u64) -> Option<bool> {
    let node = shared.node_id.0;
    for address in shared.transport.peers().into_values() {
        let ask = async {
            let mut client = shared.connect(&address).await.ok()?;
            let request = StatusRequest { range_ids: vec![META_RANGE.0] };
            client.status(request).await.ok().map(Response::into_inner)
        };
        let Ok(Some(status)) = tokio::time::timeout(Duration::from_secs(2), ask).await else {
            continue;
        };
        let Some(meta) = status
            .ranges
            .iter()
            .find(|range| range.range_id == META_RANGE.0 && range.role == "leader")
        else {
            continue;
        };
        if listed(node, [&meta.voters, &meta.outgoing_voters, &meta.learners]) {
            return Some(true);
        }
        if meta.config_index >= config_index {
            return Some(false);
        }
    }
    None
}

/// Returns a new cluster id: the time and the initializing node, in hex.
fn new_cluster_id(node_id: NodeId) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |duration| duration.as_nanos());
    format!("{nanos:x}-{:x}", node_id.0)
}

/// Opens the RocksDB store in `options.store`, creating the directory if needed.
fn open_store(options: &NodeOptions) -> Result<RocksEngine, NodeError> {
    std::fs::create_dir_all(&options.store).map_err(|error| {
        NodeError::Internal(format!("cannot create store {}: {error}", options.store.display()))
    })?;
    RocksEngine::open(&options.store, RocksOptions::default()).map_err(|error| {
        NodeError::Internal(format!("cannot open store {}: {error}", options.store.display()))
    })
}

/// Checks that the store belongs to this node (claiming a new store for it), and returns the
/// cluster id it belongs to (empty if not initialized).
fn check_store_identity<E: Engine>(engine: &E, options: &NodeOptions) -> Result<String, NodeError> {
    let internal = |error: meridian_storage::Error| NodeError::Internal(error.to_string());
    match engine.get(NODE_ID_KEY).map_err(internal)? {
        Some(bytes) => {
            let stored = bytes.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if stored != options.node_id.0 {
                return Err(NodeError::InvalidArgument(format!(
                    "store {} belongs to node {stored}, not node {}",
                    options.store.display(),
                    options.node_id
                )));
            }
        }
        None => {
            let mut batch = WriteBatch::new();
            batch.put(NODE_ID_KEY.to_vec(), options.node_id.0.to_be_bytes().to_vec());
            engine.write(batch, true).map_err(internal)?;
        }
    }
    let cluster_id = engine
        .get(CLUSTER_ID_KEY)
        .map_err(internal)?
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    debug_assert_eq!(NODE_ID_KEY[0], keyspace::META);
    Ok(cluster_id)
}

/// Runs a node until `shutdown` resolves or its driver fails: RocksDB in `options.store`, the
/// system clock, TCP on `options.rpc_listen`.
///
/// # Errors
///
/// [`NodeError::InvalidArgument`] for a store of another node; [`NodeError::Internal`] if the
/// store cannot be opened, the address cannot be bound, or storage fails while running.
pub async fn run_node(
    options: NodeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    if options.node_id.0 == 0 {
        return Err(NodeError::InvalidArgument("node id 0 is reserved".into()));
    }
    if let Some(address) = options.http_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(address)
            .install()
            .map_err(|error| {
                NodeError::InvalidArgument(format!("cannot serve metrics on {address}: {error}"))
            })?;
        info!(%address, "serving Prometheus metrics over HTTP");
    }
    let engine = open_store(&options)?;
    let system: Arc<dyn ClockSource> = Arc::new(
        SystemClock::new(options.clock)
            .map_err(|error| NodeError::InvalidArgument(error.to_string()))?,
    );
    let clock = if options.inject_clock_skew_ns == 0 {
        system
    } else {
        warn!(
            skew_ns = options.inject_clock_skew_ns,
            "fault injection: this node's clock is skewed"
        );
        Arc::new(SkewedClock::new(system, options.inject_clock_skew_ns))
    };
    let listener = tokio::net::TcpListener::bind(options.rpc_listen).await.map_err(|error| {
        NodeError::Internal(format!("cannot listen on {}: {error}", options.rpc_listen))
    })?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let dialer = Dialer::tcp();
    match options.inject_disk_full_after_bytes {
        None => {
            let engine = Arc::new(engine);
            let environment = NodeEnvironment { engine, clock, dialer, seed: None };
            serve(options, environment, incoming, shutdown).await
        }
        Some(budget) => {
            warn!(budget_bytes = budget, "fault injection: writes fail once the budget is spent");
            let engine = Arc::new(FaultyEngine::new(engine, budget));
            let environment = NodeEnvironment { engine, clock, dialer, seed: None };
            serve(options, environment, incoming, shutdown).await
        }
    }
}

/// What a node runs on besides its options: [`run_node`] gives it RocksDB, the system clock and
/// TCP; a simulation gives it the in-memory engine, simulated clocks and a simulated network.
pub struct NodeEnvironment<E> {
    /// The store (it outlives the node in a simulation, as a disk outlives a process).
    pub engine: Arc<E>,
    /// The node's clock.
    pub clock: Arc<dyn ClockSource>,
    /// How the node connects to its peers and to the meta range.
    pub dialer: Dialer,
    /// Seeds the election jitter of the node's replicas; `None` takes it from the wall clock.
    pub seed: Option<u64>,
}

/// Runs a node over `environment`, serving gRPC on the connections `incoming` yields, until
/// `shutdown` resolves or the driver fails.
///
/// # Errors
///
/// As [`run_node`], but for opening the store and binding the address.
pub async fn serve<E, S, IO, IE>(
    options: NodeOptions,
    environment: NodeEnvironment<E>,
    incoming: S,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError>
where
    E: Engine,
    S: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if options.node_id.0 == 0 {
        return Err(NodeError::InvalidArgument("node id 0 is reserved".into()));
    }
    let NodeEnvironment { engine, clock, dialer, seed } = environment;
    let cluster_id = check_store_identity(&*engine, &options)?;
    let truetime = TrueTime::new(clock);
    let transport = Transport::new(options.node_id, dialer.clone());
    transport.set_cluster_id(&cluster_id);
    let draining =
        engine.get(DRAINING_KEY).map_err(|error| NodeError::Internal(error.to_string()))?.is_some();
    if draining {
        warn!("this node is being decommissioned");
    }
    let (events, receiver) = mpsc::channel(EVENT_QUEUE);
    let shared = Arc::new(Shared {
        node_id: options.node_id,
        advertise: options.advertise.clone(),
        meta: engine.clone(),
        truetime: truetime.clone(),
        transport: transport.clone(),
        events,
        cluster_id: Mutex::new(cluster_id.clone()),
        clock: Mutex::new(ClockMonitor::new(options.clock.max_clock_offset)),
        clock_problem: Mutex::new(None),
        last_seen: Mutex::new(BTreeMap::new()),
        started: Instant::now(),
        dead_node_timeout: options.dead_node_timeout,
        client: Client::new(
            vec![options.advertise.clone()],
            ClientOptions { dialer: dialer.clone(), ..ClientOptions::default() },
        )
        .map_err(|error| NodeError::InvalidArgument(error.to_string()))?,
        load: Arc::new(NodeLoad::default()),
        draining: std::sync::atomic::AtomicBool::new(draining),
        peer_loads: Mutex::new(BTreeMap::new()),
        dialer,
    });
    // Peers remembered from an earlier run.
    let end = keyspace::prefix_end(PEER_PREFIX);
    for entry in engine.scan(PEER_PREFIX, end.as_deref(), meridian_storage::ScanDirection::Forward)
    {
        let (key, address) = entry.map_err(|error| NodeError::Internal(error.to_string()))?;
        if let Ok(id) = key[PEER_PREFIX.len()..].try_into().map(u64::from_be_bytes) {
            transport.add_peer(NodeId(id), &String::from_utf8_lossy(&address));
        }
    }
    let (background, work) = mpsc::unbounded_channel();
    let driver_options = DriverOptions {
        node_id: options.node_id,
        initialized: !cluster_id.is_empty(),
        timing: options.timing.clone(),
        range_max_bytes: options.range_max_bytes,
        draining,
        load: shared.load.clone(),
        crash_after_split: options.inject_crash_after_split,
        seed,
        replica_check_interval: options.replica_check_interval,
    };
    let driver = Driver::open(driver_options, engine, truetime, transport, receiver, background)?;
    info!(node = options.node_id.0, address = %options.advertise, cluster = %cluster_id, "node started");
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(dial::KEEP_ALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(dial::KEEP_ALIVE_TIMEOUT))
        .add_service(
            NodeServer::new(NodeApi(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            KvServer::new(KvApi(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming(incoming);
    let hello = tokio::spawn(hello_loop(shared.clone(), options.join.clone()));
    let background = tokio::spawn(background_loop(shared.clone(), work));
    // Shutdown does not wait for connections to drain: peers hold Raft streams open forever,
    // and everything acknowledged is already on disk.
    let result = tokio::select! {
        result = driver.run() => result,
        result = server => result.map_err(|error| NodeError::Internal(format!("gRPC server failed: {error}"))),
        () = shutdown => {
            info!(node = options.node_id.0, "shutting down");
            Ok(())
        }
    };
    hello.abort();
    background.abort();
    if let Err(error) = &result {
        log_fatal(error);
    }
    result
}

/// Says hello to the join addresses and every known peer, forever, merging what they know and
/// measuring clock offsets on each round trip.
async fn hello_loop(shared: Arc<Shared>, join: Vec<String>) {
    // One connection per address, kept across rounds: reconnecting every round would cost a
    // handshake each time and put its latency into the offset measurement.
    let mut clients: BTreeMap<String, NodeClient<Channel>> = BTreeMap::new();
    loop {
        let mut targets: Vec<String> = join.clone();
        targets.extend(shared.transport.peers().into_values());
        targets.sort();
        targets.dedup();
        for address in targets {
            let request = HelloRequest {
                from: Some(Peer { node_id: shared.node_id.0, address: shared.advertise.clone() }),
                cluster_id: shared.cluster_id(),
            };
            let cached = clients.remove(&address);
            let attempt = async {
                let mut client = match cached {
                    Some(client) => client,
                    None => shared.connect(&address).await.ok()?,
                };
                let sent = shared.truetime.read().local.as_nanos();
                let response = client
                    .hello(request)
                    .await
                    .map(Response::into_inner)
                    .map_err(|status| {
                        warn!(%address, %status, "hello refused");
                    })
                    .ok()?;
                let received = shared.truetime.read().local.as_nanos();
                Some((client, response, sent, received))
            };
            // A failed or timed-out attempt drops its connection; the next round reconnects.
            let Ok(Some((client, response, sent, received))) =
                tokio::time::timeout(Duration::from_secs(1), attempt).await
            else {
                continue;
            };
            clients.insert(address.clone(), client);
            if let Some(node) = &response.node
                && node.node_id != shared.node_id.0
            {
                let peer = NodeId(node.node_id);
                shared.clock.lock().record(
                    peer,
                    sent,
                    received,
                    response.clock_nanos,
                    Instant::now(),
                );
                shared.last_seen.lock().insert(peer, Instant::now());
                let load = PeerLoad {
                    replicas: response.replicas,
                    leaders: response.leaders,
                    draining: response.draining,
                };
                shared.peer_loads.lock().insert(peer, load);
            }
            if !response.cluster_id.is_empty() && shared.cluster_id().is_empty() {
                join_cluster(&shared, &response.cluster_id);
            }
            for peer in response.peers {
                shared.remember_peer(NodeId(peer.node_id), &peer.address);
            }
        }
        update_clock_health(&shared);
        report_liveness(&shared);
        tokio::time::sleep(HELLO_INTERVAL).await;
    }
}

/// Adopts the cluster id a peer reported: this node joins an initialized cluster, and gets
/// replicas when a leader adds it.
fn join_cluster(shared: &Shared, cluster_id: &str) {
    let mut batch = WriteBatch::new();
    batch.put(CLUSTER_ID_KEY.to_vec(), cluster_id.as_bytes().to_vec());
    if let Err(error) = shared.meta.write_meta(batch, true) {
        warn!(%error, "could not persist the cluster id");
        return;
    }
    *shared.cluster_id.lock() = cluster_id.to_string();
    shared.transport.set_cluster_id(cluster_id);
    info!(%cluster_id, "joined the cluster");
    let _ = shared.events.try_send(Event::Joined);
}

/// Tells the driver which peers are live and which are dead.
fn report_liveness(shared: &Shared) {
    let (mut live, mut dead) = (BTreeSet::new(), BTreeSet::new());
    for peer in shared.liveness() {
        if peer.dead {
            dead.insert(NodeId(peer.node_id));
        } else if peer.last_heard_ms.is_some() {
            live.insert(NodeId(peer.node_id));
        }
    }
    let unreachable = shared.unreachable();
    let loads = shared.peer_loads.lock().clone();
    let _ = shared.events.try_send(Event::Liveness { live, dead, unreachable, loads });
}

/// Re-evaluates the clock checks; tells the driver and logs when the verdict changes.
fn update_clock_health(shared: &Shared) {
    let reading = shared.truetime.read();
    metrics::gauge!("meridian_clock_uncertainty_seconds").set(reading.uncertainty.as_secs_f64());
    for (peer, sample) in shared.clock.lock().samples() {
        let peer = peer.0.to_string();
        metrics::gauge!("meridian_clock_peer_offset_seconds", "peer" => peer.clone())
            .set(sample.offset_ns as f64 / 1e9);
        metrics::gauge!("meridian_rpc_round_trip_seconds", "peer" => peer)
            .set(sample.round_trip_ns as f64 / 1e9);
    }
    let problem = shared.clock.lock().problem(shared.transport.peers().len(), Instant::now());
    metrics::gauge!("meridian_clock_problem").set(if problem.is_some() { 1.0 } else { 0.0 });
    let mut current = shared.clock_problem.lock();
    if current.is_some() != problem.is_some() {
        match &problem {
            Some(problem) => tracing::error!(%problem, "clock check failed"),
            None => info!("clock agrees with the peers again; serving"),
        }
        let _ = shared.events.try_send(Event::ClockHealth { healthy: problem.is_none() });
    }
    *current = problem;
}
