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
use meridian_rpc::metadata;
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::node_server::{Node as NodeService, NodeServer};
use meridian_rpc::node::{
    Ack, BootstrapRequest, BootstrapResponse, DecommissionRequest, DecommissionResponse,
    HelloRequest, HelloResponse, InitRequest, InitResponse, MessageBatch, Peer, PeerClock,
    PeerLiveness, RangeStatus, ReplicaProgress, SnapshotChunk, StatusRequest, StatusResponse,
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
    Background, Driver, DriverOptions, Event, MAX_COMMIT_WAIT, MembershipCheck, MetaWrite,
    NodeLoad, NodeSwitches, PeerLoad, RaftTiming, RangeReport, ReadRequest, log_fatal,
};
use crate::transport::Transport;
use crate::{META_RANGE, NodeError, RangeId};

mod background;
mod hello;
mod kv_service;
mod node_service;
mod shared;
mod txn_service;

use background::background_loop;
use hello::hello_loop;
use kv_service::KvApi;
use node_service::NodeApi;
use shared::Shared;

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
    /// Fault injection for tests: abort the process right after a split this node proposed
    /// applies, before the meta range records it (a node that applies another's split after
    /// taking over its leadership does not abort).
    pub inject_crash_after_split: bool,
    /// How often the node asks the meta range about every replica it holds (replicas with no
    /// leader or no snapshot are asked about sooner).
    pub replica_check_interval: Duration,
    /// How long a version stays readable (by stale reads and read-only transactions) after a
    /// newer one replaced it; older versions are collected.
    pub gc_ttl: Duration,
    /// Test-only rule breakers; the default breaks nothing.
    #[doc(hidden)]
    pub switches: NodeSwitches,
}

const NODE_ID_KEY: &[u8] = b"\x01node/id";
const CLUSTER_ID_KEY: &[u8] = b"\x01node/cluster_id";
const DRAINING_KEY: &[u8] = b"\x01node/draining";
const PEER_PREFIX: &[u8] = b"\x01node/peer/";
/// How often a node says hello to the nodes it knows.
const HELLO_INTERVAL: Duration = Duration::from_secs(2);
/// How often a node that belongs to no initialized cluster yet says hello (it learns that
/// `init` ran from a hello; requests to it wait for that, see `JOIN_WAIT`).
const HELLO_INTERVAL_UNINITIALIZED: Duration = Duration::from_millis(250);
/// How long `init` waits for the new cluster to serve before it returns.
const INIT_SERVE_WAIT: Duration = Duration::from_secs(10);
/// A peer unheard for this long counts as unreachable: quiesced followers of the ranges it
/// leads wake up to elect another leader.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(5);
/// Requests queued for the driver before clients are told to back off.
const EVENT_QUEUE: usize = 16_384;
/// The largest gRPC message a node accepts, and the most a range snapshot may add up to once
/// its streamed chunks are assembled.
const MAX_MESSAGE_BYTES: usize = 1 << 30;
/// The most keys one split request may name.
const MAX_SPLIT_KEYS: usize = 100_000;
/// The longest a client request is held for (when its caller set no shorter timeout).
const MAX_REQUEST_WAIT: Duration = Duration::from_secs(10);
/// How long a request to a node that does not know yet that its cluster was initialized waits
/// for the news (a hello round; see `hello.rs`) before it is refused.
const JOIN_WAIT: Duration = Duration::from_secs(3);

/// Writes node metadata; the object-safe slice of [`Engine`] the services need.
trait MetaStore: Send + Sync {
    fn write_meta(&self, batch: WriteBatch, sync: bool) -> meridian_storage::Result<()>;
}

impl<E: Engine> MetaStore for E {
    fn write_meta(&self, batch: WriteBatch, sync: bool) -> meridian_storage::Result<()> {
        self.write(batch, sync)
    }
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
    // Without TCP_NODELAY, a response written in more than one segment waits for the peer's
    // delayed acknowledgement (Nagle's algorithm): ~40 ms stalls under load.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |stream| {
            stream.inspect(|stream| {
                // Fails only for a connection already gone, which the server finds out itself.
                let _ = stream.set_nodelay(true);
            })
        },
    );
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
    let (events, receiver) = mpsc::channel(EVENT_QUEUE);
    let lost = events.clone();
    let transport = Transport::new(options.node_id, dialer.clone(), move |peer| {
        let _ = lost.try_send(Event::PeerLost(peer));
    });
    transport.set_cluster_id(&cluster_id);
    let draining =
        engine.get(DRAINING_KEY).map_err(|error| NodeError::Internal(error.to_string()))?.is_some();
    if draining {
        warn!("this node is being decommissioned");
    }
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
            ClientOptions { dialer: dialer.clone(), forwarding: true, ..ClientOptions::default() },
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
        max_clock_offset: options.clock.max_clock_offset,
        gc_ttl: options.gc_ttl,
        switches: options.switches,
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
