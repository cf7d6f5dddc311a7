//! The simulator's faults and clocks: partitions (symmetric and one way, and between the
//! halves of a joint configuration), crashes, restarts and reboots, membership changes,
//! leadership transfers, and clock offsets within each node's TrueTime uncertainty, which may
//! follow a sawtooth.

use std::collections::BTreeSet;

use super::cluster::{Cluster, ScheduledFault};
use crate::{Configuration, Interval, NodeId, Role, Term};

/// The period of the clock-uncertainty sawtooth, in steps.
const EPSILON_PERIOD_STEPS: u64 = 400;

/// The voters a swapping membership change alternates between (`SimOptions::swap_voters`).
const SWAP_VOTERS: [[u64; 3]; 2] = [[1, 2, 3], [3, 4, 5]];

impl Cluster {
    /// Returns node `id`'s clock uncertainty ε now: the group's bound, or a sawtooth between
    /// `epsilon_min_ns` and the bound with the node's own phase.
    pub(super) fn epsilon(&self, id: NodeId) -> u64 {
        let (low, high) = (self.options.epsilon_min_ns, self.options.epsilon_ns);
        if low >= high {
            return high;
        }
        let phase = self.nodes[&id].epsilon_phase_steps;
        let position = self.step.wrapping_add(phase) % EPSILON_PERIOD_STEPS;
        low + (high - low) * position / (EPSILON_PERIOD_STEPS - 1)
    }

    /// Returns node `id`'s TrueTime interval: its local time (true time plus its offset, the
    /// offset clamped to the current uncertainty) ± ε, which contains true time.
    pub(super) fn interval(&self, id: NodeId) -> Interval {
        let epsilon = self.epsilon(id);
        let offset = self.nodes[&id].offset_ns.clamp(-(epsilon as i64), epsilon as i64);
        let local = self.true_time().saturating_add_signed(offset);
        Interval { earliest: local - epsilon, latest: local + epsilon }
    }

    /// Injects a random fault.
    pub(super) fn nemesis(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let events = if self.options.reconfigure { 9 } else { 7 };
        match self.rng.range(0, events) {
            0 if ids.len() > 2 => {
                // A broken link between two nodes, both ways or one way: the others still reach
                // both, so a follower cut off from the leader may campaign while the rest still
                // hear from it (only promises or check-quorum keep them from voting).
                let a = ids[self.rng.range(0, ids.len() as u64) as usize];
                let b = ids[self.rng.range(0, ids.len() as u64) as usize];
                if a == b {
                    return;
                }
                self.blocked.insert((a, b));
                if self.rng.range(0, 3) != 0 {
                    self.blocked.insert((b, a));
                }
                self.counts.disruptions += 1;
            }
            0 | 1 => {
                // Partition: a random non-empty proper subset, both ways or one way.
                let side: Vec<NodeId> =
                    ids.iter().copied().filter(|_| self.rng.range(0, 2) == 0).collect();
                if side.is_empty() || side.len() == ids.len() {
                    return;
                }
                let one_way = self.rng.range(0, 3) == 0;
                self.partition(&side, one_way);
                self.counts.disruptions += 1;
            }
            2 => self.blocked.clear(),
            3 => {
                let live = self.live_nodes();
                // Keep a majority running most of the time, but not always.
                if !live.is_empty() && (live.len() * 2 > ids.len() + 1 || self.rng.range(0, 4) == 0)
                {
                    let victim = self.pick_crash_victim(&live);
                    self.crash(victim);
                    self.counts.disruptions += 1;
                }
            }
            4 => {
                let crashed: Vec<NodeId> =
                    ids.iter().copied().filter(|id| self.nodes[id].raft.is_none()).collect();
                if !crashed.is_empty() {
                    let id = crashed[self.rng.range(0, crashed.len() as u64) as usize];
                    self.restart(id);
                    self.process_ready(id);
                    self.counts.disruptions += 1;
                }
            }
            5 => {
                // Reboot: crash and restart at once (a process restart), losing everything
                // not persisted, including lease promises.
                let live = self.live_nodes();
                if !live.is_empty() {
                    let victim = self.pick_crash_victim(&live);
                    self.crash(victim);
                    self.restart(victim);
                    self.process_ready(victim);
                    self.counts.disruptions += 1;
                }
            }
            7 => {
                self.change_membership();
                self.counts.disruptions += 1;
            }
            8 => {
                if let Some(leader) = self.current_leader() {
                    let target = ids[self.rng.range(0, ids.len() as u64) as usize];
                    let raft = self.raft_mut(leader).expect("live leader");
                    let _ = raft.transfer_leadership(target);
                    self.process_ready(leader);
                    self.counts.disruptions += 1;
                }
            }
            _ => {
                let id = ids[self.rng.range(0, ids.len() as u64) as usize];
                let epsilon = self.options.epsilon_ns as i64;
                let offset = self.rng.range(0, 2 * epsilon as u64 + 1) as i64 - epsilon;
                self.nodes.get_mut(&id).expect("known").offset_ns = offset;
            }
        }
    }

    /// Called when `leader` is first seen leading `term`: with `leader_crash_per_mille`, plans
    /// its crash within `leader_crash_within_steps`.
    pub(super) fn maybe_schedule_leader_crash(&mut self, leader: NodeId, term: Term) {
        if !self.faults_enabled || !self.random(self.options.leader_crash_per_mille) {
            return;
        }
        let delay = self.rng.range(0, self.options.leader_crash_within_steps + 1);
        self.schedule(delay, ScheduledFault::CrashLeader(leader, term));
    }

    /// Plans the restart of crashed node `id` within `restart_within_steps`, if set.
    pub(super) fn maybe_schedule_restart(&mut self, id: NodeId) {
        if self.options.restart_within_steps > 0 {
            let downtime = self.rng.range(1, self.options.restart_within_steps + 1);
            self.schedule(downtime, ScheduledFault::Restart(id));
        }
    }

    /// Plans `fault` `delay` steps from now.
    fn schedule(&mut self, delay: u64, fault: ScheduledFault) {
        self.sequence += 1;
        self.scheduled.insert((self.step + delay, self.sequence), fault);
    }

    /// Runs the planned faults that are due (none once faults are disabled).
    pub(super) fn run_scheduled_faults(&mut self) {
        while let Some((&(due, sequence), &fault)) = self.scheduled.first_key_value() {
            if due > self.step || !self.faults_enabled {
                break;
            }
            self.scheduled.remove(&(due, sequence));
            match fault {
                ScheduledFault::CrashLeader(id, term) => {
                    let leads = self.nodes[&id]
                        .raft
                        .as_ref()
                        .is_some_and(|raft| raft.role() == Role::Leader && raft.term() == term);
                    if leads {
                        self.crash(id);
                        self.counts.disruptions += 1;
                    }
                }
                ScheduledFault::Restart(id) => {
                    if self.nodes[&id].raft.is_none() {
                        self.restart(id);
                        self.process_ready(id);
                    }
                }
            }
        }
    }

    /// Picks a node to crash among `live`: the leader half the time (leaders are the
    /// interesting victims), otherwise any.
    fn pick_crash_victim(&mut self, live: &[NodeId]) -> NodeId {
        let leader = live.iter().copied().find(|id| {
            self.nodes[id].raft.as_ref().is_some_and(|raft| raft.role() == Role::Leader)
        });
        match leader {
            Some(leader) if self.rng.range(0, 2) == 0 => leader,
            _ => live[self.rng.range(0, live.len() as u64) as usize],
        }
    }

    /// Blocks messages between `side` and the other nodes (from `side` only if `one_way`).
    fn partition(&mut self, side: &[NodeId], one_way: bool) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for a in side {
            for b in ids.iter().filter(|id| !side.contains(id)) {
                self.blocked.insert((*a, *b));
                if !one_way {
                    self.blocked.insert((*b, *a));
                }
            }
        }
    }

    /// Asks the leader to move to new voters: in swap mode the other of `SWAP_VOTERS`,
    /// otherwise a random set of at least three, with some of the other nodes as learners.
    fn change_membership(&mut self) {
        let Some(leader) = self.current_leader() else { return };
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let current = self.nodes[&leader].raft.as_ref().expect("live").configuration().clone();
        let mut voters = BTreeSet::new();
        if self.options.swap_voters {
            let first: BTreeSet<NodeId> = SWAP_VOTERS[0].iter().copied().map(NodeId).collect();
            let index = usize::from(current.voters == first);
            voters = SWAP_VOTERS[index].iter().copied().map(NodeId).collect();
        } else {
            while voters.len() < 3.min(ids.len())
                || (voters.len() < ids.len() && self.rng.range(0, 3) == 0)
            {
                voters.insert(ids[self.rng.range(0, ids.len() as u64) as usize]);
            }
        }
        // Voters cannot become learners in one step; the rest may join as learners.
        let learners: BTreeSet<NodeId> = ids
            .iter()
            .copied()
            .filter(|id| !voters.contains(id) && !current.voters.contains(id))
            .filter(|_| self.rng.range(0, 2) == 0)
            .collect();
        let raft = self.raft_mut(leader).expect("live leader");
        let _ = raft.propose_config_change(voters, learners);
        self.process_ready(leader);
    }

    /// Called when a leader is first seen in the joint `configuration`: with
    /// `joint_partition_per_mille`, partitions the outgoing-only voters from the incoming-only
    /// ones for the joint phase (voters of both halves and other nodes join a random side), so
    /// that each half's majority is tested on its own.
    pub(super) fn maybe_partition_joint_phase(&mut self, configuration: &Configuration) {
        if !self.faults_enabled || !self.random(self.options.joint_partition_per_mille) {
            return;
        }
        let outgoing_only: BTreeSet<NodeId> =
            configuration.outgoing_voters.difference(&configuration.voters).copied().collect();
        let incoming_only: BTreeSet<NodeId> =
            configuration.voters.difference(&configuration.outgoing_voters).copied().collect();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let mut side: Vec<NodeId> = outgoing_only.iter().copied().collect();
        for id in ids {
            if !outgoing_only.contains(&id)
                && !incoming_only.contains(&id)
                && self.rng.range(0, 2) == 0
            {
                side.push(id);
            }
        }
        if side.is_empty() || side.len() == self.nodes.len() {
            return;
        }
        self.partition(&side, false);
        self.counts.joint_partitions += 1;
        self.counts.disruptions += 1;
    }
}
