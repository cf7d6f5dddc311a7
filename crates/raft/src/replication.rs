//! Log replication (Raft §5.3): appends with pipelining and flow control, conflict back-off
//! using the conflicting term, the commit rule for current-term entries only (§5.4.2), and
//! snapshots for followers behind the compacted log (§7).

use crate::progress::ReplicationState;
use crate::{
    Entry, Error, LogIndex, MessageBody, NodeId, RawNode, RejectHint, Snapshot, Storage, Term,
};

impl<S: Storage> RawNode<S> {
    /// Sends appends to every member that can take one, including empty ones that carry the
    /// commit index.
    pub(crate) fn broadcast_append(&mut self) {
        let members: Vec<NodeId> =
            self.progress.keys().copied().filter(|id| *id != self.id).collect();
        for member in members {
            self.send_append(member, true);
        }
    }

    /// Sends `to` the entries it lacks (or a snapshot), if flow control allows. With
    /// `allow_empty`, sends an append even without entries (to carry the commit index).
    pub(crate) fn send_append(&mut self, to: NodeId, allow_empty: bool) {
        let Some(progress) = self.progress.get(&to) else { return };
        if progress.is_paused(self.config.max_inflight_appends) {
            return;
        }
        let next_index = progress.next_index;
        let prev_index = next_index.prev();
        let last_index = self.log.last_index();
        let prev_term = self.log.term(prev_index);
        let entries = self.log.entries(next_index, last_index.next(), self.config.max_append_bytes);
        let (prev_term, entries) = match (prev_term, entries) {
            (Ok(prev_term), Ok(entries)) => (prev_term, entries),
            (Err(Error::Compacted(_)), _) | (_, Err(Error::Compacted(_))) => {
                self.send_snapshot(to);
                return;
            }
            // The log ends before `prev_index`: a stale next index; probe from the end.
            _ => {
                if let Some(progress) = self.progress.get_mut(&to) {
                    progress.next_index = last_index.next().min(progress.next_index);
                    progress.become_probe();
                }
                return;
            }
        };
        if entries.is_empty() && !allow_empty {
            return;
        }
        let last_sent = entries.last().map_or(prev_index, |entry| entry.index);
        let count = entries.len();
        let commit = self.log.committed;
        if let Some(progress) = self.progress.get_mut(&to) {
            progress.on_sent(last_sent, count);
        }
        self.send(to, self.term, MessageBody::Append { prev_index, prev_term, entries, commit });
    }

    fn send_snapshot(&mut self, to: NodeId) {
        let snapshot = match self.log.storage.snapshot() {
            Ok(snapshot) => snapshot,
            // The snapshot cannot be read now; the next heartbeat response retries.
            Err(_) => return,
        };
        if let Some(progress) = self.progress.get_mut(&to) {
            progress.state = ReplicationState::Snapshot(snapshot.metadata.index);
            progress.inflight.clear();
        }
        self.send(to, self.term, MessageBody::InstallSnapshot { snapshot });
    }

    /// Follower side of an append.
    pub(crate) fn on_append(
        &mut self,
        from: NodeId,
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry>,
        commit: LogIndex,
    ) {
        if prev_index < self.log.committed {
            // Everything up to the commit index already matches the leader's log.
            let index = self.log.committed;
            self.send(from, self.term, MessageBody::AppendResponse { index, reject: None });
            return;
        }
        let unverified = self.config.unsafe_switches.follower_commit_unverified;
        match self.log.maybe_append(prev_index, prev_term, entries) {
            Some(last_new) => {
                // Only the entries up to `last_new` are known to match the leader's log.
                let verified = if unverified { self.log.last_index() } else { last_new };
                self.log.commit_to(commit.min(verified));
                self.send(
                    from,
                    self.term,
                    MessageBody::AppendResponse { index: last_new, reject: None },
                );
            }
            None => {
                if unverified {
                    let last = self.log.last_index();
                    self.log.commit_to(commit.min(last));
                }
                let reject = Some(self.log.reject_hint(prev_index));
                self.send(
                    from,
                    self.term,
                    MessageBody::AppendResponse { index: prev_index, reject },
                );
            }
        }
    }

    /// Leader side of an append (or snapshot) response.
    pub(crate) fn on_append_response(
        &mut self,
        from: NodeId,
        index: LogIndex,
        reject: Option<RejectHint>,
    ) {
        let Some(progress) = self.progress.get_mut(&from) else { return };
        progress.recently_active = true;
        match reject {
            None => {
                let was_paused = progress.is_paused(self.config.max_inflight_appends);
                if progress.on_success(index) && self.maybe_commit() {
                    self.broadcast_append();
                } else if was_paused {
                    // The follower may have missed commit updates while paused.
                    self.send_append(from, true);
                }
                if let Some((target, _)) = self.transfer
                    && target == from
                    && self
                        .progress
                        .get(&from)
                        .is_some_and(|progress| progress.match_index == self.log.last_index())
                {
                    self.send_timeout_now(from);
                }
                // Keep the pipeline full.
                while self.progress.get(&from).is_some_and(|progress| {
                    !progress.is_paused(self.config.max_inflight_appends)
                        && progress.next_index <= self.log.last_index()
                }) {
                    let before = self.messages.len();
                    self.send_append(from, false);
                    if self.messages.len() == before {
                        break;
                    }
                }
            }
            Some(hint) => {
                // A rejection of an append at or below the match point is stale.
                if index <= progress.match_index {
                    return;
                }
                let next = match hint.conflict_term {
                    Some(term) => match self.log.last_index_of_term(term) {
                        Some(last) => last.next(),
                        None => hint.conflict_index,
                    },
                    None => hint.conflict_index,
                };
                let Some(progress) = self.progress.get_mut(&from) else { return };
                progress.become_probe();
                progress.next_index = next.min(index).max(progress.match_index.next());
                self.send_append(from, true);
            }
        }
    }

    /// Advances the commit index to the highest index a quorum has persisted, if that entry is
    /// of the current term (Raft §5.4.2). Returns whether it advanced.
    pub(crate) fn maybe_commit(&mut self) -> bool {
        let quorum_index = LogIndex(self.quorum_configuration().quorum_value(|id| {
            self.progress.get(&id).map_or(0, |progress| progress.match_index.0)
        }));
        if quorum_index <= self.log.committed || quorum_index > self.log.last_index() {
            return false;
        }
        let current_term = self.log.term(quorum_index).is_ok_and(|term| term == self.term);
        if !current_term && !self.config.unsafe_switches.commit_previous_term_by_count {
            return false;
        }
        let advanced = self.log.commit_to(quorum_index);
        if advanced {
            self.resolve_pending_reads();
        }
        advanced
    }

    /// Follower side of a snapshot (Raft §7).
    pub(crate) fn on_install_snapshot(&mut self, from: NodeId, snapshot: Snapshot) {
        let (index, term) = (snapshot.metadata.index, snapshot.metadata.term);
        if index <= self.log.committed {
            let committed = self.log.committed;
            self.send(
                from,
                self.term,
                MessageBody::AppendResponse { index: committed, reject: None },
            );
            return;
        }
        if self.log.matches(index, term) {
            // We already have the entries it covers: fast-forward the commit index instead.
            self.log.commit_to(index);
        } else {
            self.log.restore(snapshot);
        }
        self.send(from, self.term, MessageBody::AppendResponse { index, reject: None });
    }
}
