//! Meridian's client: sends key-value requests to the leaders of the ranges holding the keys.
//!
//! It finds a key's range in its route cache or by asking the meta range's leader
//! (`RangeLookup`), sends the request to that range's leader (or, not knowing it, to a
//! replica), and corrects itself from the errors nodes return, which carry their kind in gRPC
//! metadata ([`meridian_rpc::metadata`]):
//!
//! | error              | what the client does                                         |
//! |--------------------|--------------------------------------------------------------|
//! | `not-leader`       | retries at the leader's address the error carries           |
//! | `key-not-in-range` | drops the cached range, looks the key up again               |
//! | `range-not-found`  | drops the cached range, looks the key up again after a pause |
//! | unavailable        | retries after a pause (exponential backoff)                  |
//! | `ambiguous`        | returns the error: the write may or may not have happened    |
//!
//! **Writes are never sent twice blindly.** A write is sent again only after a failure that
//! proves it had no effect: a refusal the node marks `not-applied`
//! ([`meridian_rpc::metadata::NOT_APPLIED`]; nodes mark every refusal made before proposing)
//! or a failed connection attempt ([`meridian_rpc::dial::is_connect_failure`]). Any other
//! failure — a timeout, a connection broken mid-request, a node that stopped, an `ambiguous`
//! answer — may have struck after the write was proposed, so the write fails with
//! [`ClientError::Ambiguous`]. Reads, lookups and idempotent meta updates retry on every
//! retryable failure.
//!
//! Every operation gives up after the configured deadline with the last error it saw; for a
//! write, giving up means that no attempt took effect. Each attempt carries its timeout to the
//! node (`grpc-timeout`), which never starts a request whose caller stopped waiting. Scans
//! continue range by range at the resume key each range returns.
//!
//! Read-write transactions ([`Client::begin`], [`Transaction`]) lock at the ranges' leaders and
//! commit with commit-wait; see the `txn` module. Read-only transactions and stale reads
//! ([`Client::read_only`], [`ReadOnlyTransaction`]) read one snapshot without locks; see the
//! `read_only` module.

mod read_only;
mod routes;
mod txn;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use meridian_rpc::dial::Dialer;
use meridian_rpc::kv::kv_client::KvClient;
use meridian_rpc::kv::{
    AllocateRangeIdsRequest, DeleteRequest, GetRequest, KeyValue, ListRangesRequest, PutRequest,
    RangeDescriptor, RangeLookupRequest, ScanRequest, SplitRequest, TxnScan,
    UpdateDescriptorsRequest,
};
use meridian_rpc::metadata;
use parking_lot::Mutex;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};
use tracing::debug;

pub use crate::read_only::{ReadFrom, ReadOnlyTransaction, ReadTimestamp};
use crate::routes::Routes;
pub use crate::txn::{CommitReport, LeaderTimings, Transaction, TxnError, TxnOutcome};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster refused the request; a write had no effect.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(Status),
    /// A write may or may not have taken effect: an attempt failed in a way that does not
    /// tell (see the crate docs). Never retried.
    #[error("outcome unknown: {}: {}", .0.code(), .0.message())]
    Ambiguous(Status),
    /// No attempt succeeded before the deadline; for a write, none took effect.
    #[error("gave up after {attempts} attempts in {elapsed:.1?}; last error: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last error seen.
        last: String,
    },
    /// An address is not a valid `HOST:PORT`.
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        /// The address.
        address: String,
        /// Why it is invalid.
        reason: String,
    },
}

impl ClientError {
    /// Whether a write failed with an unknown outcome: it may or may not have taken effect.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, ClientError::Ambiguous(_))
    }
}

/// A row a scan returned: key, value, commit timestamp.
pub type Row = (Vec<u8>, Vec<u8>, u64);

/// The latest version of a key as a read found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// The value; `None` if the key was deleted or never written.
    pub value: Option<Vec<u8>>,
    /// The commit timestamp of the version (a deletion's too); 0 if the key was never written,
    /// or if its deletion was collected (see the node's GC TTL).
    pub timestamp: u64,
}

/// Whether an operation changes data: a write that may have taken effect is never re-sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Reads, lookups and idempotent updates: retried on every retryable failure.
    Idempotent,
    /// Puts and deletes: retried only after a failure proving they had no effect.
    Write,
}

/// How the client behaves.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// How long one operation may keep retrying.
    pub deadline: Duration,
    /// How long one attempt may take.
    pub attempt_timeout: Duration,
    /// How connections are opened (TCP unless a simulation says otherwise).
    pub dialer: Dialer,
    /// Whether this client works on behalf of other callers (a node's own client): its
    /// requests say so ([`metadata::FORWARDED`]), and nodes do not forward them again.
    pub forwarding: bool,
    /// How often an open transaction tells the leaders holding its locks that it is alive
    /// (they release the locks of a transaction silent for 5 s).
    pub heartbeat_interval: Duration,
    /// Draws transaction ids from this seed, one after another, instead of at random: a
    /// deterministic simulation replays exactly only if its ids repeat (they order
    /// transactions in the nodes' maps). Ids of clients with different seeds may collide.
    pub txn_id_seed: Option<u64>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            dialer: Dialer::tcp(),
            forwarding: false,
            heartbeat_interval: Duration::from_secs(1),
            txn_id_seed: None,
        }
    }
}

/// What an error means for the next attempt.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Retry at this address (the leader), at once.
    Redirect(String),
    /// The cached range is wrong: look it up again.
    Reroute { pause: bool },
    /// Retry after a pause, at another replica.
    Pause,
    /// The outcome is unknown.
    Ambiguous,
    /// The node is not part of an initialized cluster: try another.
    NotInitialized,
    /// Give up.
    Fail,
}

fn error_kind(status: &Status) -> Option<&str> {
    status.metadata().get(metadata::ERROR_KIND).and_then(|value| value.to_str().ok())
}

fn judge(status: &Status, kind: Kind) -> Verdict {
    let unapplied = metadata::took_no_effect(status);
    if kind == Kind::Write && !unapplied {
        return Verdict::Ambiguous;
    }
    match error_kind(status) {
        Some(metadata::NOT_LEADER) => {
            match status.metadata().get(metadata::LEADER_ADDRESS).and_then(|v| v.to_str().ok()) {
                Some(address) => Verdict::Redirect(address.to_string()),
                None => Verdict::Pause,
            }
        }
        Some(metadata::KEY_NOT_IN_RANGE) => Verdict::Reroute { pause: false },
        Some(metadata::RANGE_NOT_FOUND) => Verdict::Reroute { pause: true },
        Some(metadata::AMBIGUOUS) => Verdict::Ambiguous,
        Some(metadata::NOT_INITIALIZED) => Verdict::NotInitialized,
        _ => match status.code() {
            // Unreachable nodes, leaderless ranges, overload, nodes not initialized yet.
            Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::FailedPrecondition => Verdict::Pause,
            _ => Verdict::Fail,
        },
    }
}

/// Exponential backoff from 20 ms to 200 ms (an election takes a round trip or two once a
/// follower suspects the leader: waiting longer between attempts only delays the client).
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(20))
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_millis(200));
    }
}

/// Tracks one operation's attempts against its deadline.
struct Attempts {
    started: Instant,
    deadline: Duration,
    count: u32,
    last: String,
    backoff: Backoff,
}

impl Attempts {
    fn new(deadline: Duration) -> Self {
        Attempts {
            started: Instant::now(),
            deadline,
            count: 0,
            last: String::new(),
            backoff: Backoff::new(),
        }
    }

    /// Starts the next attempt, or fails once the deadline has passed.
    fn next(&mut self) -> Result<u32, ClientError> {
        if self.count > 0 && self.started.elapsed() >= self.deadline {
            return Err(ClientError::GaveUp {
                attempts: self.count,
                elapsed: self.started.elapsed(),
                last: std::mem::take(&mut self.last),
            });
        }
        self.count += 1;
        Ok(self.count)
    }

    /// How long the next attempt may take: the attempt timeout, within the deadline.
    fn budget(&self, attempt_timeout: Duration) -> Duration {
        let left = self.deadline.saturating_sub(self.started.elapsed());
        attempt_timeout.min(left).max(Duration::from_millis(1))
    }
}

/// Stamps an attempt's requests: its timeout (`grpc-timeout`), so that nodes never start a
/// request whose caller stopped waiting, and whether it is forwarded.
#[derive(Clone, Copy, Debug)]
struct Stamp {
    timeout: Duration,
    forwarded: bool,
}

impl tonic::service::Interceptor for Stamp {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request.set_timeout(self.timeout);
        if self.forwarded {
            request
                .metadata_mut()
                .insert(metadata::FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        }
        Ok(request)
    }
}

/// A connection to one node for one attempt.
type Node = KvClient<InterceptedService<Channel, Stamp>>;

/// Runs one attempt within `budget`; a call that does not finish in time fails with
/// `DEADLINE_EXCEEDED` (which leaves a write's outcome unknown).
async fn within_budget<T, Fut>(budget: Duration, call: Fut) -> Result<Response<T>, Status>
where
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    match tokio::time::timeout(budget, call).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded(format!("no answer within {budget:?}"))),
    }
}

/// The most rows a node returns for one scan request of a transaction.
const MAX_ROWS_PER_REQUEST: usize = 100_000;

/// Scans `[start, end)` page by page for a transaction, across ranges, until `limit` rows:
/// `read(from, scan)` asks the range holding `from` and returns its rows and, if the range
/// ended first, where the next range starts. A full page within a range goes on after its
/// last key (under the same lock, or at the same timestamp).
async fn scan_pages<E>(
    start: &[u8],
    end: Option<&[u8]>,
    limit: usize,
    mut read: impl AsyncFnMut(Vec<u8>, TxnScan) -> Result<(Vec<KeyValue>, Option<Vec<u8>>), E>,
) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, E> {
    let mut rows: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut from = start.to_vec();
    loop {
        let remaining = limit.saturating_sub(rows.len()).min(MAX_ROWS_PER_REQUEST);
        if remaining == 0 {
            break;
        }
        let scan = TxnScan {
            start: from.clone(),
            end: end.map(<[u8]>::to_vec).unwrap_or_default(),
            limit: remaining as u32,
        };
        let (page, resume_key) = read(from, scan).await?;
        let full_page = page.len() == remaining;
        let last_key = page.last().map(|row| row.key.clone());
        rows.extend(page.into_iter().map(|row| (row.key, row.value)));
        match (resume_key, last_key) {
            // The range's end: go on in the next range.
            (Some(next), _) if end.is_none_or(|end| next.as_slice() < end) => from = next,
            // A full page within the range: go on after it.
            (None, Some(mut last)) if full_page => {
                last.push(0);
                from = last;
            }
            _ => break,
        }
    }
    Ok(rows)
}

/// A client of a Meridian cluster. All methods take `&self`; clones share the route cache and
/// the connections.
#[derive(Clone)]
pub struct Client {
    seeds: Vec<String>,
    options: ClientOptions,
    routes: Arc<Mutex<Routes>>,
    /// Ordered, so that dropping the client closes its connections in a deterministic order
    /// (a simulation replays a seed exactly only if it does).
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
    /// Rotates follower reads among a range's followers ([`ReadFrom::Follower`]).
    follower_turn: Arc<std::sync::atomic::AtomicUsize>,
    /// Transaction ids drawn so far, with [`ClientOptions::txn_id_seed`].
    txn_ids_drawn: Arc<std::sync::atomic::AtomicU64>,
}

impl Client {
    /// Returns a client that starts from these node addresses (`HOST:PORT`); it learns the
    /// others from the cluster. Connections are made on first use.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidAddress`] if no address is given or one is malformed.
    pub fn new(seeds: Vec<String>, options: ClientOptions) -> Result<Self, ClientError> {
        if seeds.is_empty() {
            return Err(ClientError::InvalidAddress {
                address: String::new(),
                reason: "no node address given".into(),
            });
        }
        let client = Client {
            seeds,
            options,
            routes: Arc::new(Mutex::new(Routes::default())),
            channels: Arc::new(Mutex::new(BTreeMap::new())),
            follower_turn: Arc::default(),
            txn_ids_drawn: Arc::default(),
        };
        for seed in &client.seeds {
            client.channel(seed)?;
        }
        Ok(client)
    }

    /// Adds node addresses the client may try (for example the peers a node knows).
    pub fn learn_addresses(&self, addresses: impl IntoIterator<Item = (u64, String)>) {
        self.routes.lock().addresses.extend(addresses);
    }

    fn channel(&self, address: &str) -> Result<Channel, ClientError> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let invalid =
            |reason: String| ClientError::InvalidAddress { address: address.into(), reason };
        let endpoint =
            Dialer::endpoint(address).map_err(invalid)?.timeout(self.options.attempt_timeout);
        let channel = self.options.dialer.connect_lazy(endpoint);
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// Every address the client knows, seeds first.
    fn candidates(&self) -> Vec<String> {
        let mut candidates = self.seeds.clone();
        let routes = self.routes.lock();
        let mut known: Vec<&String> = routes.addresses.values().collect();
        known.sort();
        for address in known {
            if !candidates.contains(address) {
                candidates.push(address.clone());
            }
        }
        candidates
    }

    /// Returns a connection to `address` whose requests carry `budget` as their timeout.
    fn node(&self, address: &str, budget: Duration) -> Result<Node, ClientError> {
        let channel = self.channel(address)?;
        let stamp = Stamp { timeout: budget, forwarded: self.options.forwarding };
        Ok(KvClient::with_interceptor(channel, stamp))
    }

    /// Runs `call` against the meta range's leader. Meta calls are reads or idempotent
    /// updates, retried after any retryable failure (reserving range ids twice only wastes
    /// ids).
    async fn on_meta<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Node) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut attempts = Attempts::new(self.options.deadline);
        // Nodes in a row that said they belong to no initialized cluster.
        let mut uninitialized = 0;
        loop {
            let attempt = attempts.next()?;
            let cached = self.routes.lock().meta_leader.clone();
            let address = match cached {
                Some(address) => address,
                None => {
                    let candidates = self.candidates();
                    candidates[(attempt as usize - 1) % candidates.len()].clone()
                }
            };
            let budget = attempts.budget(self.options.attempt_timeout);
            let node = self.node(&address, budget)?;
            let status = match within_budget(budget, call(node)).await {
                Ok(response) => {
                    self.routes.lock().meta_leader = Some(address);
                    return Ok(response.into_inner());
                }
                Err(status) => status,
            };
            debug!(%address, %status, "meta request failed");
            attempts.last = format!("{address}: {}", status.message());
            self.routes.lock().meta_leader = None;
            let verdict = judge(&status, Kind::Idempotent);
            if verdict == Verdict::NotInitialized {
                // When every node the client knows says so, the cluster is not initialized.
                uninitialized += 1;
                if uninitialized >= self.candidates().len() {
                    return Err(ClientError::Status(status));
                }
                continue;
            }
            uninitialized = 0;
            match verdict {
                Verdict::Redirect(leader) if leader != address => {
                    self.routes.lock().meta_leader = Some(leader);
                }
                Verdict::Redirect(_)
                | Verdict::Pause
                | Verdict::Reroute { .. }
                | Verdict::NotInitialized
                | Verdict::Ambiguous => {
                    attempts.backoff.wait().await;
                }
                Verdict::Fail => return Err(ClientError::Status(status)),
            }
        }
    }

    /// Returns the descriptor of the range holding `key` as the meta range records it now,
    /// bypassing the cache (and refreshing it).
    ///
    /// # Errors
    ///
    /// [`ClientError`] when no attempt succeeds in time.
    pub async fn lookup_fresh(&self, key: &[u8]) -> Result<RangeDescriptor, ClientError> {
        self.lookup(key).await
    }

    /// Returns the descriptor of the range holding `key`, from the cache or the meta range.
    async fn route(&self, key: &[u8]) -> Result<RangeDescriptor, ClientError> {
        if let Some(descriptor) = self.routes.lock().lookup(key) {
            return Ok(descriptor.clone());
        }
        self.lookup(key).await
    }

    /// Looks `key` up in the meta range and caches the answer.
    async fn lookup(&self, key: &[u8]) -> Result<RangeDescriptor, ClientError> {
        let response = self
            .on_meta(|mut client| {
                let request = RangeLookupRequest { key: key.to_vec() };
                async move { client.range_lookup(request).await }
            })
            .await?;
        let descriptor = response.descriptor.ok_or_else(|| {
            ClientError::Status(Status::internal("the meta range answered without a descriptor"))
        })?;
        let mut routes = self.routes.lock();
        routes
            .addresses
            .extend(response.addresses.into_iter().map(|node| (node.node_id, node.address)));
        routes.insert(descriptor.clone());
        Ok(descriptor)
    }

    /// Where to send a request for `descriptor`'s range on attempt `attempt`: its leader if
    /// known, otherwise its replicas in turn.
    fn pick(&self, descriptor: &RangeDescriptor, attempt: u32) -> String {
        let routes = self.routes.lock();
        if let Some(leader) = routes.leaders.get(&descriptor.range_id) {
            return leader.clone();
        }
        let replicas: Vec<&String> = descriptor
            .voters
            .iter()
            .chain(&descriptor.outgoing_voters)
            .filter_map(|node| routes.addresses.get(node))
            .collect();
        if !replicas.is_empty() {
            return replicas[(attempt as usize - 1) % replicas.len()].clone();
        }
        drop(routes);
        let candidates = self.candidates();
        candidates[(attempt as usize - 1) % candidates.len()].clone()
    }

    /// Runs `call(client, range_id)` against the leader of the range holding `key`.
    async fn on_range<T, F, Fut>(
        &self,
        key: &[u8],
        kind: Kind,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Node, u64) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let mut attempts = Attempts::new(self.options.deadline);
        loop {
            let attempt = attempts.next()?;
            let descriptor = self.route(key).await?;
            let range = descriptor.range_id;
            let address = self.pick(&descriptor, attempt);
            let budget = attempts.budget(self.options.attempt_timeout);
            let node = self.node(&address, budget)?;
            let status = match within_budget(budget, call(node, range)).await {
                Ok(response) => {
                    self.routes.lock().leaders.insert(range, address);
                    return Ok(response.into_inner());
                }
                Err(status) => status,
            };
            debug!(%address, range, %status, "range request failed");
            attempts.last = format!("{address}: {}", status.message());
            match judge(&status, kind) {
                Verdict::Redirect(leader) => {
                    let repeated = leader == address;
                    self.routes.lock().leaders.insert(range, leader);
                    if repeated {
                        self.routes.lock().leaders.remove(&range);
                        attempts.backoff.wait().await;
                    }
                }
                Verdict::Reroute { pause } => {
                    self.routes.lock().evict(range);
                    if pause {
                        attempts.backoff.wait().await;
                    }
                }
                Verdict::Pause | Verdict::NotInitialized => {
                    self.routes.lock().leaders.remove(&range);
                    attempts.backoff.wait().await;
                }
                Verdict::Ambiguous if kind == Kind::Idempotent => {
                    self.routes.lock().leaders.remove(&range);
                    attempts.backoff.wait().await;
                }
                Verdict::Ambiguous => return Err(ClientError::Ambiguous(status)),
                Verdict::Fail => return Err(ClientError::Status(status)),
            }
        }
    }

    /// Runs `call(client)` against the leader of the range `range_id` (found by its start
    /// key, which never changes for an id; a cache that maps the key to another range is
    /// corrected first).
    async fn on_range_id<T, F, Fut>(
        &self,
        range_id: u64,
        kind: Kind,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        F: FnMut(Node) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let start = self.start_of(range_id).await?;
        self.on_range(&start, kind, |node, routed| {
            let attempt = (routed == range_id).then(|| call(node));
            async move {
                match attempt {
                    Some(call) => call.await,
                    // The cached range holding the key is an older one: look it up again.
                    None => {
                        let mut status = Status::out_of_range(format!(
                            "range {routed} was cached for the start of range {range_id}"
                        ));
                        let kind = metadata::KEY_NOT_IN_RANGE.parse().expect("ascii");
                        status.metadata_mut().insert(metadata::ERROR_KIND, kind);
                        Err(metadata::not_applied(status))
                    }
                }
            }
        })
        .await
    }

    /// Returns the start key of range `range_id`, from the cache or a listing of the meta
    /// range.
    async fn start_of(&self, range_id: u64) -> Result<Vec<u8>, ClientError> {
        if let Some(start) = self.routes.lock().starts.get(&range_id) {
            return Ok(start.clone());
        }
        let (descriptors, _) = self.ranges().await?;
        let mut routes = self.routes.lock();
        for descriptor in descriptors {
            routes.starts.insert(descriptor.range_id, descriptor.start);
        }
        routes.starts.get(&range_id).cloned().ok_or_else(|| {
            ClientError::Status(Status::not_found(format!(
                "the meta range knows no range {range_id}"
            )))
        })
    }

    /// Reads the latest value of `key` and its commit timestamp (linearizable).
    ///
    /// # Errors
    ///
    /// [`ClientError`] when the cluster refuses or no attempt succeeds in time.
    pub async fn get(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, ClientError> {
        let version = self.get_version(key).await?;
        Ok(version.value.map(|value| (value, version.timestamp)))
    }

    /// Reads the latest version of `key` (linearizable): its value, or none if deleted or never
    /// written, and its commit timestamp, a deletion's too.
    ///
    /// # Errors
    ///
    /// [`ClientError`] when the cluster refuses or no attempt succeeds in time.
    pub async fn get_version(&self, key: &[u8]) -> Result<Version, ClientError> {
        let response = self
            .on_range(key, Kind::Idempotent, |mut client, range_id| {
                let request = GetRequest { range_id, key: key.to_vec() };
                async move { client.get(request).await }
            })
            .await?;
        Ok(Version { value: response.value, timestamp: response.timestamp })
    }

    /// Writes `value` under `key`; returns the commit timestamp. The write is re-sent only
    /// after failures that prove it had no effect; any other failure is returned as
    /// [`ClientError::Ambiguous`] (see the crate docs).
    ///
    /// # Errors
    ///
    /// [`ClientError`] when the cluster refuses or no attempt succeeds in time.
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<u64, ClientError> {
        let response = self
            .on_range(key, Kind::Write, |mut client, range_id| {
                let request = PutRequest { range_id, key: key.to_vec(), value: value.to_vec() };
                async move { client.put(request).await }
            })
            .await?;
        Ok(response.timestamp)
    }

    /// Deletes `key`; returns the commit timestamp of the tombstone.
    ///
    /// # Errors
    ///
    /// As [`Client::put`].
    pub async fn delete(&self, key: &[u8]) -> Result<u64, ClientError> {
        let response = self
            .on_range(key, Kind::Write, |mut client, range_id| {
                let request = DeleteRequest { range_id, key: key.to_vec() };
                async move { client.delete(request).await }
            })
            .await?;
        Ok(response.timestamp)
    }

    /// Returns up to `limit` keys in `[start, end)` (no upper bound if `end` is `None`) with
    /// their latest values, across ranges. Each range's part is linearizable; the scan as a
    /// whole is not a snapshot (that is the transaction layer's job).
    ///
    /// # Errors
    ///
    /// [`ClientError`] when the cluster refuses or no attempt succeeds in time.
    pub async fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Row>, ClientError> {
        let mut rows = Vec::new();
        let mut from = start.to_vec();
        while rows.len() < limit && end.is_none_or(|end| from.as_slice() < end) {
            let remaining = (limit - rows.len()).min(u32::MAX as usize) as u32;
            let response = self
                .on_range(&from, Kind::Idempotent, |mut client, range_id| {
                    let request = ScanRequest {
                        range_id,
                        start: from.clone(),
                        end: end.map(<[u8]>::to_vec).unwrap_or_default(),
                        limit: remaining,
                    };
                    async move { client.scan(request).await }
                })
                .await?;
            rows.extend(response.rows.into_iter().map(|row| (row.key, row.value, row.timestamp)));
            match response.resume_key {
                Some(resume) if resume > from => from = resume,
                _ => break,
            }
        }
        rows.truncate(limit);
        Ok(rows)
    }

    /// Splits the ranges holding `keys` so that each key starts a range. Keys that already
    /// start a range are skipped. Returns the descriptors the splits produced.
    ///
    /// # Errors
    ///
    /// [`ClientError`] when the cluster refuses (an empty key cannot start a new range) or no
    /// attempt succeeds in time.
    pub async fn split(&self, keys: &[Vec<u8>]) -> Result<Vec<RangeDescriptor>, ClientError> {
        let mut keys = keys.to_vec();
        keys.sort();
        keys.dedup();
        let mut produced = Vec::new();
        let mut pending = keys.as_slice();
        let mut retried = false;
        while let Some(first) = pending.first() {
            let descriptor = self.route(first).await?;
            // The keys this range holds, past its start.
            let held = pending
                .iter()
                .take_while(|key| {
                    descriptor.end.is_empty() || key.as_slice() < descriptor.end.as_slice()
                })
                .count();
            let group: Vec<Vec<u8>> = pending[..held]
                .iter()
                .filter(|key| key.as_slice() != descriptor.start.as_slice())
                .cloned()
                .collect();
            if group.is_empty() {
                pending = &pending[held..];
                continue;
            }
            let response = self
                .on_range(&group[0], Kind::Idempotent, |mut client, range_id| {
                    let request = SplitRequest { range_id, keys: group.clone() };
                    async move { client.split(request).await }
                })
                .await;
            match response {
                Ok(response) => {
                    let mut routes = self.routes.lock();
                    for descriptor in &response.descriptors {
                        routes.insert(descriptor.clone());
                    }
                    produced.extend(response.descriptors);
                    pending = &pending[held..];
                    retried = false;
                }
                // The range may have changed under the keys (a concurrent split): look them
                // up once more before giving up.
                Err(ClientError::Status(status))
                    if status.code() == Code::InvalidArgument && !retried =>
                {
                    retried = true;
                    self.routes.lock().evict(descriptor.range_id);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(produced)
    }

    /// Returns every range's descriptor from the meta range, in key order, and the node
    /// addresses the meta leader knows.
    ///
    /// # Errors
    ///
    /// [`ClientError`] when no attempt succeeds in time.
    pub async fn ranges(
        &self,
    ) -> Result<(Vec<RangeDescriptor>, HashMap<u64, String>), ClientError> {
        let response = self
            .on_meta(|mut client| async move { client.list_ranges(ListRangesRequest {}).await })
            .await?;
        let addresses: HashMap<u64, String> =
            response.addresses.into_iter().map(|node| (node.node_id, node.address)).collect();
        self.learn_addresses(addresses.clone());
        Ok((response.descriptors, addresses))
    }

    /// Records descriptors in the meta range (nodes use this after splits and replica
    /// changes; it is idempotent, and stale descriptors are ignored).
    ///
    /// # Errors
    ///
    /// [`ClientError`] when no attempt succeeds in time.
    pub async fn update_descriptors(
        &self,
        descriptors: Vec<RangeDescriptor>,
    ) -> Result<(), ClientError> {
        self.on_meta(|mut client| {
            let request = UpdateDescriptorsRequest { descriptors: descriptors.clone() };
            async move { client.update_descriptors(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Reserves `count` new range ids; returns the first.
    ///
    /// # Errors
    ///
    /// [`ClientError`] when no attempt succeeds in time.
    pub async fn allocate_range_ids(&self, count: u64) -> Result<u64, ClientError> {
        let response = self
            .on_meta(|mut client| async move {
                client.allocate_range_ids(AllocateRangeIdsRequest { count }).await
            })
            .await?;
        Ok(response.first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with(code: Code, kind: Option<&str>, leader: Option<&str>) -> Status {
        let mut status = Status::new(code, "test");
        if let Some(kind) = kind {
            status.metadata_mut().insert(metadata::ERROR_KIND, kind.parse().unwrap());
        }
        if let Some(leader) = leader {
            status.metadata_mut().insert(metadata::LEADER_ADDRESS, leader.parse().unwrap());
        }
        status
    }

    #[test]
    fn errors_are_judged_by_kind_then_code() {
        let cases = [
            (
                Code::FailedPrecondition,
                Some(metadata::NOT_LEADER),
                Some("n2:1"),
                Verdict::Redirect("n2:1".into()),
            ),
            (Code::FailedPrecondition, Some(metadata::NOT_LEADER), None, Verdict::Pause),
            (
                Code::OutOfRange,
                Some(metadata::KEY_NOT_IN_RANGE),
                None,
                Verdict::Reroute { pause: false },
            ),
            (
                Code::NotFound,
                Some(metadata::RANGE_NOT_FOUND),
                None,
                Verdict::Reroute { pause: true },
            ),
            (Code::Unavailable, Some(metadata::AMBIGUOUS), None, Verdict::Ambiguous),
            (
                Code::FailedPrecondition,
                Some(metadata::NOT_INITIALIZED),
                None,
                Verdict::NotInitialized,
            ),
            (Code::Unavailable, None, None, Verdict::Pause),
            (Code::ResourceExhausted, None, None, Verdict::Pause),
            (Code::InvalidArgument, None, None, Verdict::Fail),
            (Code::Internal, None, None, Verdict::Fail),
        ];
        for (code, kind, leader, expected) in cases {
            let status = status_with(code, kind, leader);
            assert_eq!(judge(&status, Kind::Idempotent), expected, "{code:?} {kind:?}");
            // Writes: a refusal marked not-applied is judged alike; the same error unmarked
            // may have struck after the write was proposed.
            let refusal = metadata::not_applied(status_with(code, kind, leader));
            let expected_for_write =
                if kind == Some(metadata::AMBIGUOUS) { Verdict::Ambiguous } else { expected };
            assert_eq!(judge(&refusal, Kind::Write), expected_for_write, "{code:?} {kind:?}");
            assert_eq!(judge(&status, Kind::Write), Verdict::Ambiguous, "{code:?} {kind:?}");
        }
        // A write whose connection attempt failed never left: it is retried.
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            meridian_rpc::dial::ConnectFailed(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )),
        );
        let never_sent = Status::from_error(Box::new(refused));
        assert_eq!(judge(&never_sent, Kind::Write), Verdict::Pause);
        let timed_out = Status::deadline_exceeded("no answer within 1s");
        assert_eq!(judge(&timed_out, Kind::Write), Verdict::Ambiguous);
        assert_eq!(judge(&timed_out, Kind::Idempotent), Verdict::Pause);
        assert!(ClientError::Ambiguous(timed_out).is_ambiguous());
    }

    #[test]
    fn bad_addresses_are_refused() {
        assert!(matches!(
            Client::new(vec![], ClientOptions::default()),
            Err(ClientError::InvalidAddress { .. })
        ));
        assert!(matches!(
            Client::new(vec!["not an address".into()], ClientOptions::default()),
            Err(ClientError::InvalidAddress { .. })
        ));
    }

    /// With nobody listening, an operation gives up at its deadline with the last error.
    #[tokio::test]
    async fn unreachable_clusters_give_up_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let options =
            ClientOptions { deadline: Duration::from_millis(300), ..ClientOptions::default() };
        let client = Client::new(vec![address], options).unwrap();
        match client.get(b"k").await {
            Err(ClientError::GaveUp { attempts, last, .. }) => {
                assert!(attempts >= 2, "{attempts}");
                assert!(!last.is_empty());
            }
            other => panic!("expected to give up, got {other:?}"),
        }
    }
}
