//! The checks the simulator runs on a healed cluster at the end of a run.

use std::collections::BTreeMap;

use super::cluster::Cluster;
use crate::{Entry, LogIndex, NodeId, Term};

/// Terms the group may use besides those disruptions cost: the first election and the one
/// after the final heal, split votes included.
const INITIAL_TERMS: u64 = 3;
/// Terms one disruption may cost. With pre-vote, a node campaigns in a new term only once a
/// quorum granted its pre-vote, which voters refuse while they hear from a leader (with
/// check-quorum) or hold a lease promise; so a new term needs an event that cuts a quorum off
/// from its leader or removes it: a partition or broken link, a crash, reboot or restart, a
/// transfer or membership change. Over 3,000 seeds of the default rotation the highest term
/// never exceeded the number of such events plus one; two per event leaves a margin of two.
const TERMS_PER_DISRUPTION: u64 = 2;

impl Cluster {
    /// Log matching (§5.3): if two logs hold an entry with the same index and term, they hold
    /// the same entries up to it.
    pub(super) fn check_log_matching(&mut self) {
        let logs: Vec<(NodeId, BTreeMap<LogIndex, Entry>)> = self
            .nodes
            .iter()
            .filter_map(|(id, node)| node.raft.as_ref().map(|raft| (*id, raft)))
            .map(|(id, raft)| {
                (
                    id,
                    raft.storage()
                        .stored_entries()
                        .iter()
                        .map(|entry| (entry.index, entry.clone()))
                        .collect(),
                )
            })
            .collect();
        for (a, (id_a, log_a)) in logs.iter().enumerate() {
            for (id_b, log_b) in logs.iter().skip(a + 1) {
                let mut matched = false;
                for (index, entry_a) in log_a.iter().rev() {
                    let Some(entry_b) = log_b.get(index) else { continue };
                    if entry_a.term == entry_b.term {
                        matched = true;
                    }
                    if matched && entry_a != entry_b {
                        self.violations.push(format!(
                            "log matching: nodes {id_a} and {id_b} differ at {index} below a common entry"
                        ));
                        return;
                    }
                }
            }
        }
    }

    /// Every acknowledged write is in every node's state.
    pub(super) fn check_durability(&mut self) {
        let members = match self.current_leader() {
            Some(leader) => {
                self.nodes[&leader].raft.as_ref().expect("live").status().configuration.members()
            }
            None => self.nodes.keys().copied().collect(),
        };
        for (id, node) in &self.nodes {
            if !members.contains(id) {
                continue;
            }
            for operation in &self.acknowledged {
                if !node.kv.applied_operations.contains(operation) {
                    self.violations
                        .push(format!("durability: node {id} lost acknowledged write {operation}"));
                    return;
                }
            }
        }
    }

    /// Lease reads happen within their lease (as the leader reported it, and, in true time,
    /// before any leader of a later term was elected), after every earlier term's lease ended
    /// and after every earlier term's lease reads.
    pub(super) fn check_leases(&mut self) {
        // For each term with a leader, the earliest true time at which a leader of that term or
        // a later one was elected.
        let mut earliest_from: BTreeMap<Term, (u64, Term)> = BTreeMap::new();
        let mut earliest: Option<(u64, Term)> = None;
        for (term, elected_at) in self.elected_at.iter().rev() {
            if earliest.is_none_or(|(time, _)| *elected_at <= time) {
                earliest = Some((*elected_at, *term));
            }
            if let Some(earliest) = earliest {
                earliest_from.insert(*term, earliest);
            }
        }
        let mut violations = Vec::new();
        for read in &self.lease_reads {
            let (term_a, time_a, lease_end_a) = (read.term, read.true_time, read.lease_end);
            if time_a >= lease_end_a {
                violations.push(format!(
                    "lease validity: a lease read of term {term_a} at {time_a} came after its \
                     lease ended at {lease_end_a}"
                ));
                break;
            }
            let later = earliest_from.range(Term(term_a.0 + 1)..).next().map(|(_, later)| *later);
            if let Some((elected_at, term_b)) = later
                && time_a >= elected_at
            {
                violations.push(format!(
                    "lease validity: a lease read of term {term_a} at true time {time_a} came \
                     after a leader of term {term_b} was elected at {elected_at}"
                ));
                break;
            }
            let overtaken = self
                .lease_reads
                .iter()
                .find(|read_b| term_a < read_b.term && time_a >= read_b.true_time);
            if let Some(read_b) = overtaken {
                violations.push(format!(
                    "lease disjointness: a lease read of term {term_a} at {time_a} follows one \
                     of term {} at {}",
                    read_b.term, read_b.true_time
                ));
                break;
            }
            for (term_b, (lease_end, relinquished_at)) in &self.lease_ends {
                // A lease given up in a transfer ends there.
                let lease_end = relinquished_at.map_or(*lease_end, |at| at.min(*lease_end));
                if *term_b < term_a && time_a <= lease_end {
                    violations.push(format!(
                        "lease disjointness: a lease read of term {term_a} at {time_a} overlaps \
                         the lease of term {term_b} ending {lease_end}"
                    ));
                    break;
                }
            }
            if !violations.is_empty() {
                break;
            }
        }
        for violation in violations {
            self.violation(violation);
        }
    }

    /// Timestamps of successive terms increase: every lease read's timestamp and every write
    /// timestamp a leader assigned in a term exceeds every one of earlier terms (`reads.rs`,
    /// rule 6).
    pub(super) fn check_timestamps(&mut self) {
        let mut ranges: BTreeMap<Term, (u64, u64)> = BTreeMap::new();
        for (term, timestamp) in &self.timestamps {
            let range = ranges.entry(*term).or_insert((*timestamp, *timestamp));
            range.0 = range.0.min(*timestamp);
            range.1 = range.1.max(*timestamp);
        }
        let mut highest: Option<(Term, u64)> = None;
        for (term, (lowest, top)) in ranges {
            if let Some((earlier, earlier_top)) = highest
                && lowest <= earlier_top
            {
                self.violation(format!(
                    "timestamp order: term {term} handed out timestamp {lowest}, not above \
                     timestamp {earlier_top} of term {earlier}"
                ));
                return;
            }
            if highest.is_none_or(|(_, highest_top)| top > highest_top) {
                highest = Some((term, top));
            }
        }
    }

    /// Bounds the number of terms by the number of disruptions (see `TERMS_PER_DISRUPTION`).
    pub(super) fn check_term_growth(&mut self) {
        let max_term = self.max_term().0;
        let bound = INITIAL_TERMS + TERMS_PER_DISRUPTION * self.counts.disruptions;
        if max_term > bound {
            let disruptions = self.counts.disruptions;
            self.violation(format!(
                "term growth: the group reached term {max_term} after {disruptions} disruptions \
                 (bound {bound})"
            ));
        }
    }
}
