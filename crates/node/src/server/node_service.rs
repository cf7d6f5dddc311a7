//! The `Node` gRPC service: peers' Raft streams and range snapshots, hellos, initialization,
//! status and decommissioning.
//!
//! Everything a peer sends is checked here, before the driver sees it: a message must name this
//! node, and a snapshot must decode and describe the range it is sent to (a bad one would
//! otherwise stop the driver, which treats install failures as storage failures).

use prost::Message as _;

use super::*;

/// Decodes and checks the message of `range_message` (`streamed`: whether its snapshot's
/// versions arrived apart and were put back).
fn peer_message(
    node: NodeId,
    range: RangeId,
    message: Option<&meridian_rpc::raft::Message>,
    streamed: bool,
) -> Result<meridian_raft::Message, Status> {
    let message =
        message.ok_or_else(|| Status::invalid_argument("range message without a message"))?;
    let message = meridian_raft::Message::try_from(message)
        .map_err(|error| Status::invalid_argument(error.to_string()))?;
    if message.to != node {
        return Err(Status::invalid_argument(format!(
            "message for node {} sent to node {node}",
            message.to
        )));
    }
    if let meridian_raft::MessageBody::InstallSnapshot { snapshot } = &message.body {
        let header = meridian_rpc::kv::RangeSnapshot::decode(snapshot.data.as_slice())
            .map_err(|error| Status::invalid_argument(format!("undecodable snapshot: {error}")))?;
        let described = header.descriptor.as_ref().map_or(0, |descriptor| descriptor.range_id);
        if described != range.0 {
            return Err(Status::invalid_argument(format!(
                "a snapshot of range {described} sent to range {}",
                range.0
            )));
        }
        if (header.stream_id != 0) != streamed {
            return Err(Status::invalid_argument(
                "a data range's snapshot travels through the Snapshot call, and only it does",
            ));
        }
    }
    Ok(message)
}

/// The `Node` gRPC service.
pub(super) struct NodeApi(pub(super) Arc<Shared>);

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
                let range = RangeId(range_message.range_id);
                let message =
                    peer_message(self.0.node_id, range, range_message.message.as_ref(), false)?;
                messages.push((range, message));
            }
            // Raft tolerates loss: drop rather than block when the driver is busy.
            if self.0.events.try_send(Event::Raft(messages)).is_err() {
                warn!("driver queue full; dropping a raft batch");
            }
        }
        Ok(Response::new(Ack {}))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Ack>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty snapshot stream"))?;
        self.0.check_cluster(&first.cluster_id)?;
        let range = RangeId(first.range_id);
        let mut message = peer_message(self.0.node_id, range, first.message.as_ref(), true)?;
        let meridian_raft::MessageBody::InstallSnapshot { snapshot } = &mut message.body else {
            return Err(Status::invalid_argument("a snapshot stream without a snapshot"));
        };
        let mut header = meridian_rpc::kv::RangeSnapshot::decode(snapshot.data.as_slice())
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let mut bytes = 0usize;
        while let Some(chunk) = stream.message().await? {
            for version in chunk.versions {
                bytes += version.key.len() + version.value.as_ref().map_or(0, Vec::len);
                if bytes > MAX_MESSAGE_BYTES {
                    return Err(Status::resource_exhausted(format!(
                        "a range snapshot larger than {MAX_MESSAGE_BYTES} bytes"
                    )));
                }
                header.versions.push(version);
            }
        }
        header.stream_id = 0;
        snapshot.data = header.encode_to_vec();
        // A snapshot is dear to send again: wait for room in the driver's queue.
        self.0
            .events
            .send(Event::Raft(vec![(range, message)]))
            .await
            .map_err(|_| Status::unavailable("the node is shutting down"))?;
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
        self.0.bootstrap(&cluster_id, &voters, true).await?;
        info!(%cluster_id, voters = ?voters.iter().map(|peer| peer.node_id).collect::<Vec<_>>(), "cluster initialized");
        // `init` returns once the cluster serves, so that the next command finds leaders.
        if let Err(reason) = self.0.wait_until_serving(INIT_SERVE_WAIT).await {
            warn!(%reason, "the cluster was initialized but does not serve yet");
        }
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
        self.0.bootstrap(&request.cluster_id, &request.voters, false).await?;
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
