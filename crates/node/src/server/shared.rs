//! The state a node's services and background tasks share, and the helpers they call: the
//! clock check, liveness, the address book, requests to the driver, splits and bootstrap.

use super::*;

/// State shared by the services.
pub(super) struct Shared {
    pub(super) node_id: NodeId,
    pub(super) advertise: String,
    /// Where node metadata (cluster id, peer addresses) is written.
    pub(super) meta: Arc<dyn MetaStore>,
    pub(super) truetime: TrueTime,
    pub(super) transport: Arc<Transport>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) cluster_id: Mutex<String>,
    pub(super) clock: Mutex<ClockMonitor>,
    /// Why this node refuses to serve, while its clock disagrees with its peers.
    pub(super) clock_problem: Mutex<Option<String>>,
    /// When each peer last answered a hello.
    pub(super) last_seen: Mutex<BTreeMap<NodeId, Instant>>,
    /// When this node started (a peer never heard from counts as dead only after the timeout).
    pub(super) started: Instant,
    pub(super) dead_node_timeout: Duration,
    /// This node's client of other ranges (the meta range, mostly).
    pub(super) client: Client,
    /// This node's load, kept by the driver.
    pub(super) load: Arc<NodeLoad>,
    /// Whether this node is being decommissioned.
    pub(super) draining: std::sync::atomic::AtomicBool,
    /// The peers' loads from their last hellos.
    pub(super) peer_loads: Mutex<BTreeMap<NodeId, PeerLoad>>,
    /// How this node connects to others.
    pub(super) dialer: Dialer,
}

impl Shared {
    /// Connects to the node at `address`.
    pub(super) async fn connect(&self, address: &str) -> Result<NodeClient<Channel>, String> {
        let endpoint = Dialer::endpoint(address)?;
        let channel = self.dialer.connect(endpoint).await.map_err(|error| error.to_string())?;
        Ok(NodeClient::new(channel))
    }

    pub(super) fn cluster_id(&self) -> String {
        self.cluster_id.lock().clone()
    }

    pub(super) fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This node's load as it reports it.
    pub(super) fn own_load(&self) -> PeerLoad {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        PeerLoad {
            replicas: self.load.replicas.load(relaxed),
            leaders: self.load.leaders.load(relaxed),
            draining: self.draining(),
        }
    }

    /// Fails if this node's clock disagrees with a majority of its peers.
    pub(super) fn check_clock(&self) -> Result<(), Status> {
        match self.clock_problem.lock().as_ref() {
            Some(problem) => Err(metadata::not_applied(Status::unavailable(problem.clone()))),
            None => Ok(()),
        }
    }

    /// Waits, until `deadline` and for at most [`JOIN_WAIT`], while this node does not know
    /// that its cluster was initialized: right after `meridian init`, a node that was not
    /// among the first voters learns it only from its next hello.
    async fn wait_until_joined(&self, deadline: Instant) {
        let until = deadline.min(Instant::now() + JOIN_WAIT);
        while self.cluster_id().is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns the peers that did not answer the last hello rounds.
    pub(super) fn unreachable(&self) -> BTreeSet<NodeId> {
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
    pub(super) fn liveness(&self) -> Vec<PeerLiveness> {
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
    pub(super) fn remember_peer(&self, id: NodeId, address: &str) {
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

    pub(super) fn peers(&self) -> Vec<Peer> {
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
    pub(super) fn check_cluster(&self, theirs: &str) -> Result<(), NodeError> {
        let ours = self.cluster_id();
        if !ours.is_empty() && !theirs.is_empty() && ours != theirs {
            return Err(NodeError::ClusterMismatch { ours, theirs: theirs.to_string() });
        }
        Ok(())
    }

    /// Sends a client request to the driver unless the clock check fails, and counts and times
    /// it.
    pub(super) async fn request<T>(
        &self,
        operation: &'static str,
        deadline: Instant,
        event: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Event,
    ) -> Result<T, Status> {
        let started = Instant::now();
        self.wait_until_joined(deadline).await;
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

    pub(super) async fn call<T>(
        &self,
        event: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Event,
    ) -> Result<T, Status> {
        let (reply, receiver) = oneshot::channel();
        self.events.try_send(event(reply)).map_err(|_| {
            metadata::not_applied(Status::resource_exhausted("the node is overloaded; retry later"))
        })?;
        // A dropped answer means the driver stopped with the request in its hands: what became
        // of it is unknown.
        receiver
            .await
            .map_err(|_| Status::unavailable("the node stopped before answering"))?
            .map_err(Status::from)
    }

    /// Returns the known addresses of `nodes`.
    pub(super) fn addresses(&self, nodes: impl IntoIterator<Item = u64>) -> Vec<NodeAddress> {
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
    pub(super) fn refresh_client(&self) {
        self.client.learn_addresses(
            self.transport.peers().into_iter().map(|(id, address)| (id.0, address)),
        );
    }

    /// Splits `range` (led here) at `keys`: reserves range ids in the meta range, applies the
    /// split through the range's log, and records the resulting descriptors in the meta
    /// range. If recording fails the leaders record them later (see `driver/maintenance.rs`).
    pub(super) async fn split(
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
        let deadline = Instant::now() + MAX_REQUEST_WAIT;
        self.request("split", deadline, |reply| Event::CheckSplit { range, keys: check, reply })
            .await?;
        self.refresh_client();
        let count = keys.len() as u64;
        let first =
            self.client.allocate_range_ids(count).await.map_err(|error| {
                Status::unavailable(format!("cannot reserve range ids: {error}"))
            })?;
        debug!(range = range.0, first, count, "reserved range ids for a split");
        let ids = (first..first + count).collect();
        let descriptors = self
            .request("split", deadline, |reply| Event::Split { range, keys, ids, reply })
            .await?;
        if let Err(error) = self.client.update_descriptors(descriptors.clone()).await {
            warn!(range = range.0, %error, "split applied but not yet recorded in the meta range");
        }
        Ok(descriptors)
    }

    /// Persists the cluster id and creates the first ranges with `voters`; the node that runs
    /// `init` (`campaign`), bootstrapped after the others, campaigns for them at once.
    pub(super) async fn bootstrap(
        &self,
        cluster_id: &str,
        voters: &[Peer],
        campaign: bool,
    ) -> Result<(), Status> {
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
        self.call(|reply| Event::Bootstrap { voters: ids, campaign, reply }).await
    }

    /// Runs a meta request through this node's own client, for a caller that asked this node,
    /// which holds no replica of the meta range; gives up at `deadline`.
    pub(super) async fn on_meta_elsewhere<T>(
        &self,
        deadline: Instant,
        call: impl std::future::Future<Output = Result<T, meridian_client::ClientError>>,
    ) -> Result<T, Status> {
        self.refresh_client();
        match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(metadata::not_applied(Status::unavailable(format!(
                "this node holds no replica of the meta range, and asking one failed: {error}"
            )))),
            Err(_) => Err(metadata::not_applied(Status::unavailable(
                "this node holds no replica of the meta range, and no replica answered in time",
            ))),
        }
    }

    /// Waits until the cluster serves — the meta range answers and the first data range reads —
    /// for at most `limit`; returns why not if it does not.
    pub(super) async fn wait_until_serving(&self, limit: Duration) -> Result<(), String> {
        self.refresh_client();
        let serving = async {
            self.client.ranges().await.map_err(|error| error.to_string())?;
            self.client.get(b"").await.map_err(|error| error.to_string())?;
            Ok::<(), String>(())
        };
        match tokio::time::timeout(limit, serving).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }
}
