//! Membership changes by joint consensus (Raft §6), learners and leader removal.
//!
//! A change of voters is two log entries. `Enter` switches to the joint configuration
//! `C_old,new`, in which elections and commitment need a majority of *both* `C_old` and
//! `C_new`; once `Enter` is applied, the leader proposes `Leave`, which switches to `C_new`.
//! A change of learners only is applied directly. As in etcd, a configuration takes effect
//! when its entry is applied, and a leader accepts a new change only after the previous one is
//! applied, so at most one change is in flight. A leader that is not a voter of `C_new` steps
//! down once `Leave` is applied; the new configuration elects a leader of its own.
//!
//! Left out: demoting a voter to a learner in one change (remove it, then add it as a learner).

use std::collections::BTreeSet;

use crate::node::Role;
use crate::progress::Progress;
use crate::{ConfigChange, EntryKind, Error, LogIndex, NodeId, RawNode, Result, Storage};

impl<S: Storage> RawNode<S> {
    /// Proposes moving to the given voters and learners. Returns the index of the change entry.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] on a non-leader; [`Error::ConfigChangePending`] while an earlier
    /// change is not yet applied (including the implicit `Leave` of a joint configuration);
    /// [`Error::InvalidRequest`] for an empty voter set, a node that is both voter and learner,
    /// or a voter demoted straight to learner.
    pub fn propose_config_change(
        &mut self,
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    ) -> Result<LogIndex> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader { leader: self.leader });
        }
        if self.pending_config_index > self.log.applied || self.configuration.is_joint() {
            return Err(Error::ConfigChangePending(self.pending_config_index));
        }
        if voters.is_empty() {
            return Err(Error::InvalidRequest("a configuration needs at least one voter".into()));
        }
        if let Some(both) = voters.intersection(&learners).next() {
            return Err(Error::InvalidRequest(format!("node {both} cannot be voter and learner")));
        }
        if let Some(demoted) = self.configuration.voters.intersection(&learners).next() {
            return Err(Error::InvalidRequest(format!(
                "node {demoted} cannot go from voter to learner in one change; remove it first"
            )));
        }
        let index =
            self.propose_entry(EntryKind::ConfigChange(ConfigChange::Enter { voters, learners }))?;
        self.pending_config_index = index;
        Ok(index)
    }

    /// Returns whether a configuration change is in flight (proposed and not yet applied, or a
    /// joint configuration not yet left), so that a new one would be refused.
    pub fn config_change_pending(&self) -> bool {
        self.pending_config_index > self.log.applied || self.configuration.is_joint()
    }

    /// Returns, while leader, the highest index known to match `member`'s log.
    pub fn match_index(&self, member: NodeId) -> Option<LogIndex> {
        if self.role != Role::Leader {
            return None;
        }
        self.progress.get(&member).map(|progress| progress.match_index)
    }

    /// Applies a committed configuration change (called as the entry is applied).
    pub(crate) fn apply_config_change(&mut self, index: LogIndex, change: &ConfigChange) {
        if matches!(change, ConfigChange::Leave) && !self.configuration.is_joint() {
            return;
        }
        let next = self.configuration.after(change);
        self.configuration = next;
        if self.role != Role::Leader {
            return;
        }
        // Track exactly the members of the new configuration.
        let last_index = self.log.last_index();
        let members = self.configuration.members();
        self.progress.retain(|id, _| members.contains(id));
        for member in members {
            self.progress.entry(member).or_insert_with(|| Progress::new(last_index));
        }
        if self.configuration.is_joint() {
            // Leave the joint configuration as soon as it is in effect.
            let leave = self.append_entry(EntryKind::ConfigChange(ConfigChange::Leave));
            self.pending_config_index = leave;
        } else if !self.configuration.is_voter(self.id) {
            let term = self.term;
            self.become_follower(term, None);
        } else {
            self.pending_config_index = self.pending_config_index.max(index);
            self.maybe_commit();
        }
    }
}
