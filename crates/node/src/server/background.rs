//! The node's background task: work the driver hands out that talks to other ranges' leaders —
//! recording descriptors in the meta range, size-triggered splits, and membership checks of
//! replicas this node may have been removed from.

use super::*;

/// Does the work the driver hands out: records descriptors in the meta range and splits
/// ranges that grew too large, each in its own task, reporting back to the driver.
pub(super) async fn background_loop(
    shared: Arc<Shared>,
    mut work: mpsc::UnboundedReceiver<Background>,
) {
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
                Background::TxnVote { coordinator, txn, participant, prepare_ts, query } => {
                    let result = shared
                        .client
                        .txn_vote(coordinator.0, txn.0, participant.0, prepare_ts.as_nanos(), query)
                        .await;
                    if let Err(error) = result {
                        // The participant asks again while it stays prepared.
                        debug!(%txn, coordinator = coordinator.0, %error, "a vote was not delivered");
                    }
                }
                Background::TxnOutcome { participant, txn, decision } => {
                    if let meridian_txn::Decision::Commit { commit_ts } = &decision {
                        // Commit-wait before the participants release their locks.
                        let wait = shared.truetime.wait_until_after(*commit_ts, MAX_COMMIT_WAIT);
                        if let Err(error) = wait.await {
                            warn!(%txn, %error, "commit-wait failed; the outcome is sent when asked");
                            return;
                        }
                    }
                    let decision = crate::txn_state::decision_to_wire(&decision);
                    let result = shared.client.txn_outcome(participant.0, txn.0, decision).await;
                    if let Err(error) = result {
                        // The participant asks again while it stays prepared.
                        debug!(%txn, participant = participant.0, %error, "an outcome was not delivered");
                    }
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
pub(super) type Listing = HashMap<u64, meridian_rpc::kv::RangeDescriptor>;

/// Whether `node` is in any of a configuration's member lists (voters, the outgoing voters of
/// a joint configuration, learners).
pub(super) fn listed(node: u64, lists: [&[u64]; 3]) -> bool {
    lists.iter().any(|members| members.contains(&node))
}

/// Asks whether this node still belongs to the range of `check`: `Some(false)` when the meta
/// range records the range at a version at least as new as the replica's without this node,
/// `Some(true)` when it lists the node, `None` when it cannot tell (unreachable, not recorded
/// yet, older). A replica still waiting for its first snapshot knows no version: any record
/// without the node counts (destroying it in error costs a snapshot, not data: it holds
/// none). The meta range, which records no descriptor of its own, is asked about through its
/// leader; the others are looked up in `listing` (`None`: the meta range could not be read).
pub(super) async fn membership_verdict(
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
pub(super) async fn meta_membership_verdict(shared: &Shared, config_index: u64) -> Option<bool> {
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
