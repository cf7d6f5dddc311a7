//! The hello loop: says hello to every known node, merges address books, joins an initialized
//! cluster, measures clock offsets and reports liveness and clock health to the driver.

use super::*;

/// Says hello to the join addresses and every known peer, forever, merging what they know and
/// measuring clock offsets on each round trip.
pub(super) async fn hello_loop(shared: Arc<Shared>, join: Vec<String>) {
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
        let interval = if shared.cluster_id().is_empty() {
            HELLO_INTERVAL_UNINITIALIZED
        } else {
            HELLO_INTERVAL
        };
        tokio::time::sleep(interval).await;
    }
}

/// Adopts the cluster id a peer reported: this node joins an initialized cluster, and gets
/// replicas when a leader adds it.
pub(super) fn join_cluster(shared: &Shared, cluster_id: &str) {
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
pub(super) fn report_liveness(shared: &Shared) {
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
pub(super) fn update_clock_health(shared: &Shared) {
    let reading = shared.truetime.read();
    metrics::gauge!("meridian_clock_uncertainty_seconds").set(reading.uncertainty.as_secs_f64());
    for (peer, sample) in shared.clock.lock().samples() {
        let peer = peer.0.to_string();
        metrics::gauge!("meridian_clock_peer_offset_seconds", "peer" => peer.clone())
            .set(sample.offset_ns as f64 / 1e9);
        metrics::gauge!("meridian_rpc_round_trip_seconds", "peer" => peer)
            .set(sample.round_trip_ns as f64 / 1e9);
    }
    let problem = shared.clock.lock().problem(
        reading.uncertainty,
        shared.transport.peers().len(),
        Instant::now(),
    );
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
