//! Replica placement for a range, decided by its leader: keep [`REPLICATION_FACTOR`] live
//! voters on distinct nodes.
//!
//! A missing voter (the range has fewer than the target, or a voter's node is dead) is replaced
//! in two steps, each a Raft membership change: a live node that holds no replica is added as a
//! learner and catches up (by entries or a snapshot); once its log matches the leader's commit
//! index it is promoted, and a dead voter removed, in one joint-consensus change. Dead learners
//! are dropped. [`plan`] is pure: the leader calls it with what it knows and proposes the
//! configuration it returns.
//!
//! Left out until ranges split: spreading replicas and leaders across many ranges, rebalancing
//! onto new nodes when nothing is missing, and decommissioning.

use std::collections::BTreeSet;

use meridian_raft::{Configuration, LogIndex, NodeId};

/// Voters per range.
pub const REPLICATION_FACTOR: usize = 3;

/// What the leader knows when it plans.
#[derive(Clone, Debug)]
pub struct PlacementInput {
    /// The configuration in effect.
    pub config: Configuration,
    /// Nodes heard from recently (the leader included).
    pub live: BTreeSet<NodeId>,
    /// Nodes not heard from for longer than the dead-node timeout.
    pub dead: BTreeSet<NodeId>,
    /// The leader's commit index.
    pub commit: LogIndex,
    /// Match indexes of the learners, as the leader knows them.
    pub learner_match: Vec<(NodeId, LogIndex)>,
}

/// Returns the next configuration (voters, learners) to propose, if any change is due.
pub fn plan(input: &PlacementInput) -> Option<(BTreeSet<NodeId>, BTreeSet<NodeId>)> {
    let config = &input.config;
    let dead_voters: Vec<NodeId> = config.voters.intersection(&input.dead).copied().collect();
    let missing = REPLICATION_FACTOR.saturating_sub(config.voters.len()) + dead_voters.len();
    // Drop dead learners first: they only cost the leader messages.
    let dead_learners: BTreeSet<NodeId> =
        config.learners.intersection(&input.dead).copied().collect();
    if !dead_learners.is_empty() {
        let learners = config.learners.difference(&dead_learners).copied().collect();
        return Some((config.voters.clone(), learners));
    }
    if missing == 0 {
        return None;
    }
    // Promote a caught-up learner, replacing a dead voter if there is one.
    let caught_up = input
        .learner_match
        .iter()
        .find(|(learner, matched)| {
            input.live.contains(learner) && *matched >= input.commit && input.commit.0 > 0
        })
        .map(|(learner, _)| *learner);
    if let Some(learner) = caught_up {
        let mut voters = config.voters.clone();
        if let Some(dead) = dead_voters.first() {
            voters.remove(dead);
        }
        voters.insert(learner);
        let mut learners = config.learners.clone();
        learners.remove(&learner);
        return Some((voters, learners));
    }
    // Otherwise start catching up a new learner, unless one is already on its way.
    let catching_up = config.learners.iter().any(|learner| input.live.contains(learner));
    if catching_up {
        return None;
    }
    let candidate = input
        .live
        .iter()
        .find(|node| !config.voters.contains(node) && !config.learners.contains(node))?;
    let mut learners = config.learners.clone();
    learners.insert(*candidate);
    Some((config.voters.clone(), learners))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().map(|id| NodeId(*id)).collect()
    }

    fn input(
        voters: &[u64],
        learners: &[u64],
        live: &[u64],
        dead: &[u64],
        learner_match: &[(u64, u64)],
    ) -> PlacementInput {
        PlacementInput {
            config: Configuration {
                voters: ids(voters),
                outgoing_voters: BTreeSet::new(),
                learners: ids(learners),
            },
            live: ids(live),
            dead: ids(dead),
            commit: LogIndex(10),
            learner_match: learner_match
                .iter()
                .map(|(id, index)| (NodeId(*id), LogIndex(*index)))
                .collect(),
        }
    }

    #[test]
    fn plans() {
        // (name, input, expected (voters, learners))
        let cases: Vec<(&str, PlacementInput, Option<(Vec<u64>, Vec<u64>)>)> = vec![
            ("healthy", input(&[1, 2, 3], &[], &[1, 2, 3, 4], &[], &[]), None),
            (
                "dead voter, spare node: add it as a learner",
                input(&[1, 2, 3], &[], &[1, 2, 4], &[3], &[]),
                Some((vec![1, 2, 3], vec![4])),
            ),
            (
                "learner catching up: wait",
                input(&[1, 2, 3], &[4], &[1, 2, 4], &[3], &[(4, 7)]),
                None,
            ),
            (
                "learner caught up: promote it, remove the dead voter",
                input(&[1, 2, 3], &[4], &[1, 2, 4], &[3], &[(4, 10)]),
                Some((vec![1, 2, 4], vec![])),
            ),
            (
                "dead voter, no spare node: nothing to do",
                input(&[1, 2, 3], &[], &[1, 2], &[3], &[]),
                None,
            ),
            (
                "too few voters: grow",
                input(&[1, 2], &[], &[1, 2, 3], &[], &[]),
                Some((vec![1, 2], vec![3])),
            ),
            (
                "too few voters, learner caught up: promote",
                input(&[1, 2], &[3], &[1, 2, 3], &[], &[(3, 10)]),
                Some((vec![1, 2, 3], vec![])),
            ),
            (
                "dead learner: drop it",
                input(&[1, 2, 3], &[4], &[1, 2, 3], &[4], &[]),
                Some((vec![1, 2, 3], vec![])),
            ),
            ("unknown liveness is not death", input(&[1, 2, 3], &[], &[1, 2, 4], &[], &[]), None),
        ];
        for (name, input, expected) in cases {
            let expected = expected.map(|(voters, learners)| (ids(&voters), ids(&learners)));
            assert_eq!(plan(&input), expected, "{name}");
        }
    }
}
