//! The checks the simulator runs on a healed cluster at the end of a run.

use std::collections::BTreeMap;

use super::cluster::Cluster;
use crate::{Entry, LogIndex, NodeId};

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

    /// Lease reads happen within their lease, after every earlier term's lease ended and after
    /// every earlier term's lease reads.
    pub(super) fn check_leases(&mut self) {
        for (term_a, time_a, lease_end_a) in &self.lease_reads {
            if time_a >= lease_end_a {
                self.violations.push(format!(
                    "lease validity: a lease read of term {term_a} at {time_a} came after its lease ended at {lease_end_a}"
                ));
                return;
            }
            for (term_b, time_b, _) in &self.lease_reads {
                if term_a < term_b && time_a >= time_b {
                    self.violations.push(format!(
                        "lease disjointness: a lease read of term {term_a} at {time_a} follows one of term {term_b} at {time_b}"
                    ));
                    return;
                }
            }
            for (term_b, (lease_end, relinquished_at)) in &self.lease_ends {
                // A lease given up in a transfer ends there.
                let lease_end = relinquished_at.map_or(*lease_end, |at| at.min(*lease_end));
                if term_b < term_a && *time_a <= lease_end {
                    self.violations.push(format!(
                        "lease disjointness: a lease read of term {term_a} at {time_a} overlaps the lease of term {term_b} ending {lease_end}"
                    ));
                    return;
                }
            }
        }
    }
}
