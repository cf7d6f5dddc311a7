//! Replica placement for a range, decided by its leader: keep [`REPLICATION_FACTOR`] voters
//! on distinct live nodes, off nodes being decommissioned, and spread evenly.
//!
//! Every change is a Raft membership change, one at a time. A replica is added as a learner
//! and catches up (by a snapshot, then entries); once its log matches the leader's commit index
//! it is promoted, and a voter removed, in one joint-consensus change. Which voter goes: one
//! on a dead or decommissioning node if any, otherwise (a rebalancing move) the one on the
//! most loaded node. Dead learners are dropped. The leader itself is never removed: a node
//! being decommissioned hands its leaderships away first.
//!
//! Balance: when nothing is missing, a range moves a replica from the most loaded of its
//! nodes to the least loaded live node outside it if their replica counts differ by at least
//! [`REBALANCE_THRESHOLD`]. Counts come from the nodes' hellos, a few seconds stale; the
//! threshold and the driver's limit on moves in flight keep ranges from chasing each other.
//!
//! [`plan`] is pure: the leader calls it with what it knows and proposes the configuration it
//! returns.

use std::collections::{BTreeMap, BTreeSet};

use meridian_raft::{Configuration, LogIndex, NodeId};

/// Voters per range.
pub const REPLICATION_FACTOR: usize = 3;
/// How many more replicas one node must hold than another before a range moves between them.
pub const REBALANCE_THRESHOLD: u64 = 2;

/// What the leader knows when it plans.
#[derive(Clone, Debug)]
pub struct PlacementInput {
    /// The leader.
    pub leader: NodeId,
    /// The configuration in effect.
    pub config: Configuration,
    /// Nodes heard from recently (the leader included).
    pub live: BTreeSet<NodeId>,
    /// Nodes not heard from for longer than the dead-node timeout.
    pub dead: BTreeSet<NodeId>,
    /// Nodes being decommissioned.
    pub draining: BTreeSet<NodeId>,
    /// How many replicas each node holds, as last reported.
    pub load: BTreeMap<NodeId, u64>,
    /// The leader's commit index.
    pub commit: LogIndex,
    /// Match indexes of the learners, as the leader knows them.
    pub learner_match: Vec<(NodeId, LogIndex)>,
    /// Whether this range may start a rebalancing move (the driver limits moves in flight and
    /// lets a range rest after one).
    pub may_rebalance: bool,
    /// The voter a rebalancing move under way means to relieve (chosen when its learner was
    /// added, so that the move finishes what it started).
    pub move_source: Option<NodeId>,
}

impl PlacementInput {
    fn load(&self, node: NodeId) -> u64 {
        self.load.get(&node).copied().unwrap_or(0)
    }

    /// Whether a node may receive a replica.
    fn eligible(&self, node: NodeId) -> bool {
        self.live.contains(&node) && !self.dead.contains(&node) && !self.draining.contains(&node)
    }

    /// The voter to remove when one must go: one on a dead or draining node, otherwise the
    /// most loaded one (never the leader).
    pub fn voter_to_remove(&self) -> Option<NodeId> {
        let voters = self.config.voters.iter().copied().filter(|voter| *voter != self.leader);
        let leaving = |voter: &NodeId| self.dead.contains(voter) || self.draining.contains(voter);
        let candidates: Vec<NodeId> = voters.collect();
        candidates
            .iter()
            .copied()
            .find(leaving)
            .or_else(|| candidates.iter().copied().max_by_key(|voter| (self.load(*voter), *voter)))
    }

    /// The least loaded eligible node outside the range.
    fn best_newcomer(&self) -> Option<NodeId> {
        self.live
            .iter()
            .copied()
            .filter(|node| self.eligible(*node) && !self.config.members().contains(node))
            .min_by_key(|node| (self.load(*node), *node))
    }
}

/// Returns the next configuration (voters, learners) to propose, if any change is due.
pub fn plan(input: &PlacementInput) -> Option<(BTreeSet<NodeId>, BTreeSet<NodeId>)> {
    let config = &input.config;
    // Drop learners that are dead or leaving: they only cost the leader messages.
    let lost_learners: BTreeSet<NodeId> = config
        .learners
        .iter()
        .copied()
        .filter(|learner| input.dead.contains(learner) || input.draining.contains(learner))
        .collect();
    if !lost_learners.is_empty() {
        let learners = config.learners.difference(&lost_learners).copied().collect();
        return Some((config.voters.clone(), learners));
    }
    let leaving: Vec<NodeId> = config
        .voters
        .iter()
        .copied()
        .filter(|voter| input.dead.contains(voter) || input.draining.contains(voter))
        .collect();
    let missing = REPLICATION_FACTOR.saturating_sub(config.voters.len()) + leaving.len();
    // Promote a caught-up learner, removing a voter if the range has enough.
    let caught_up = input
        .learner_match
        .iter()
        .find(|(learner, matched)| {
            input.eligible(*learner) && *matched >= input.commit && input.commit.0 > 0
        })
        .map(|(learner, _)| *learner);
    if let Some(learner) = caught_up {
        let mut voters = config.voters.clone();
        let mut learners = config.learners.clone();
        let source = match leaving.first() {
            Some(leaving) => Some(*leaving),
            None => input
                .move_source
                .filter(|source| voters.contains(source) && *source != input.leader)
                .or_else(|| input.voter_to_remove()),
        };
        if voters.len() >= REPLICATION_FACTOR
            && let Some(removed) = source
        {
            // A rebalancing move that would now go uphill (the loads changed while the learner
            // caught up) is abandoned rather than finished: otherwise two nodes could pass a
            // replica back and forth.
            if leaving.is_empty() && input.load(removed) <= input.load(learner) {
                learners.remove(&learner);
                return Some((voters, learners));
            }
            voters.remove(&removed);
        }
        voters.insert(learner);
        learners.remove(&learner);
        return Some((voters, learners));
    }
    if !config.learners.is_empty() {
        // A learner is on its way.
        return None;
    }
    // Too many voters (a node came back after its replacement): remove one.
    if config.voters.len() > REPLICATION_FACTOR
        && let Some(removed) = input.voter_to_remove()
    {
        let mut voters = config.voters.clone();
        voters.remove(&removed);
        return Some((voters, BTreeSet::new()));
    }
    let newcomer = input.best_newcomer()?;
    if missing == 0 {
        // Balanced enough, or not this range's turn?
        let busiest = input.voter_to_remove()?;
        if !input.may_rebalance || input.load(busiest) < input.load(newcomer) + REBALANCE_THRESHOLD
        {
            return None;
        }
    }
    Some((config.voters.clone(), [newcomer].into()))
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
            leader: NodeId(1),
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
            may_rebalance: true,
            move_source: None,
            draining: BTreeSet::new(),
            load: BTreeMap::new(),
        }
    }

    fn loaded(mut input: PlacementInput, load: &[(u64, u64)]) -> PlacementInput {
        input.load = load.iter().map(|(id, count)| (NodeId(*id), *count)).collect();
        input
    }

    fn draining(mut input: PlacementInput, nodes: &[u64]) -> PlacementInput {
        input.draining = ids(nodes);
        input
    }

    #[test]
    fn plans() {
        // (name, input, expected (voters, learners))
        let balanced = [(1, 10), (2, 10), (3, 10), (4, 9)];
        let cases: Vec<(&str, PlacementInput, Option<(Vec<u64>, Vec<u64>)>)> = vec![
            ("healthy", loaded(input(&[1, 2, 3], &[], &[1, 2, 3, 4], &[], &[]), &balanced), None),
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
            (
                "unknown liveness is not death",
                loaded(input(&[1, 2, 3], &[], &[1, 2, 4], &[], &[]), &balanced),
                None,
            ),
            (
                "a new empty node gets a replica from the busiest member",
                loaded(
                    input(&[1, 2, 3], &[], &[1, 2, 3, 4, 5], &[], &[]),
                    &[(1, 10), (2, 12), (3, 11), (4, 0), (5, 1)],
                ),
                Some((vec![1, 2, 3], vec![4])),
            ),
            (
                "rebalancing promotion removes the busiest voter, never the leader",
                loaded(
                    input(&[1, 2, 3], &[4], &[1, 2, 3, 4], &[], &[(4, 10)]),
                    &[(1, 20), (2, 12), (3, 11), (4, 1)],
                ),
                Some((vec![1, 3, 4], vec![])),
            ),
            (
                "a rebalancing move that became uphill is abandoned",
                loaded(
                    input(&[1, 2, 3], &[4], &[1, 2, 3, 4], &[], &[(4, 10)]),
                    &[(2, 9), (3, 9), (4, 9)],
                ),
                Some((vec![1, 2, 3], vec![])),
            ),
            (
                "a move finishes with the voter it meant to relieve",
                {
                    let mut input = loaded(
                        input(&[1, 2, 3], &[4], &[1, 2, 3, 4], &[], &[(4, 10)]),
                        &[(2, 9), (3, 12), (4, 5)],
                    );
                    input.move_source = Some(NodeId(2));
                    input
                },
                Some((vec![1, 3, 4], vec![])),
            ),
            (
                "a difference below the threshold is left alone",
                loaded(
                    input(&[1, 2, 3], &[], &[1, 2, 3, 4], &[], &[]),
                    &[(1, 10), (2, 10), (3, 10), (4, 9)],
                ),
                None,
            ),
            (
                "no rebalancing while the driver has enough moves in flight",
                {
                    let mut input =
                        loaded(input(&[1, 2, 3], &[], &[1, 2, 3, 4], &[], &[]), &[(2, 10), (4, 0)]);
                    input.may_rebalance = false;
                    input
                },
                None,
            ),
            (
                "a draining voter is replaced even without imbalance",
                draining(loaded(input(&[1, 2, 3], &[], &[1, 2, 3, 4], &[], &[]), &balanced), &[2]),
                Some((vec![1, 2, 3], vec![4])),
            ),
            (
                "the draining voter is the one removed",
                draining(
                    loaded(input(&[1, 2, 3], &[4], &[1, 2, 3, 4], &[], &[(4, 10)]), &[(3, 50)]),
                    &[2],
                ),
                Some((vec![1, 3, 4], vec![])),
            ),
            (
                "a draining node receives nothing",
                draining(
                    loaded(
                        input(&[1, 2, 3], &[], &[1, 2, 3, 4], &[], &[]),
                        &[(1, 9), (2, 9), (3, 9), (4, 0)],
                    ),
                    &[4],
                ),
                None,
            ),
            (
                "a surplus voter goes",
                loaded(
                    input(&[1, 2, 3, 4], &[], &[1, 2, 3, 4], &[], &[]),
                    &[(1, 5), (2, 5), (3, 7), (4, 5)],
                ),
                Some((vec![1, 2, 4], vec![])),
            ),
        ];
        for (name, input, expected) in cases {
            let expected = expected.map(|(voters, learners)| (ids(&voters), ids(&learners)));
            assert_eq!(plan(&input), expected, "{name}");
        }
    }
}
