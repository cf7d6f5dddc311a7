//! The Raft log as Raft sees it: stable entries in [`Storage`] plus the unstable tail (and a
//! received snapshot) not yet persisted, with the commit and apply positions.
//!
//! Invariants:
//! - `applied <= committed <= last_index()`.
//! - Unstable entries are contiguous from `unstable_offset`, which is at most the stable last
//!   index + 1; a conflicting append may move it below that, meaning the application must
//!   overwrite those stable entries when it persists.
//! - Committed entries are never truncated (Raft's log matching and leader completeness make
//!   this impossible; a violation panics).

use crate::storage::Storage;
use crate::{Entry, Error, LogIndex, Result, Snapshot, Term};

/// The log of one node.
#[derive(Debug)]
pub struct RaftLog<S: Storage> {
    /// The persisted part.
    pub(crate) storage: S,
    /// Entries not yet persisted, starting at `unstable_offset`.
    unstable: Vec<Entry>,
    /// The index of `unstable[0]`.
    unstable_offset: LogIndex,
    /// A snapshot received from the leader and not yet persisted.
    pending_snapshot: Option<Snapshot>,
    /// The highest index known to be committed.
    pub(crate) committed: LogIndex,
    /// The highest index handed to the application and acknowledged.
    pub(crate) applied: LogIndex,
}

impl<S: Storage> RaftLog<S> {
    /// Returns the log over `storage`, applied up to its snapshot.
    pub fn new(storage: S) -> Self {
        let unstable_offset = storage.last_index().next();
        let committed = storage.hard_state().commit.max(storage.snapshot_metadata().index);
        let applied = storage.snapshot_metadata().index;
        RaftLog {
            storage,
            unstable: Vec::new(),
            unstable_offset,
            pending_snapshot: None,
            committed,
            applied,
        }
    }

    /// Returns the index of the first entry available (after the latest snapshot).
    pub fn first_index(&self) -> LogIndex {
        match &self.pending_snapshot {
            Some(snapshot) => snapshot.metadata.index.next(),
            None => self.storage.first_index(),
        }
    }

    /// Returns the index of the last entry (or of the snapshot if the log is empty).
    pub fn last_index(&self) -> LogIndex {
        if let Some(last) = self.unstable.last() {
            return last.index;
        }
        match &self.pending_snapshot {
            Some(snapshot) => snapshot.metadata.index,
            None => self.storage.last_index(),
        }
    }

    /// Returns the term of the last entry.
    pub fn last_term(&self) -> Term {
        // The last index always has a term: it is an entry or the snapshot.
        self.term(self.last_index()).unwrap_or_default()
    }

    /// Returns the last index persisted (stable).
    pub fn persisted_index(&self) -> LogIndex {
        self.unstable_offset.prev()
    }

    /// Returns the term of the entry at `index`.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] if it was compacted; [`Error::Storage`] past the last index.
    pub fn term(&self, index: LogIndex) -> Result<Term> {
        if index >= self.unstable_offset && index <= self.last_index() && !self.unstable.is_empty()
        {
            return Ok(self.unstable[(index.0 - self.unstable_offset.0) as usize].term);
        }
        if let Some(snapshot) = &self.pending_snapshot {
            return match index.cmp(&snapshot.metadata.index) {
                std::cmp::Ordering::Equal => Ok(snapshot.metadata.term),
                std::cmp::Ordering::Less => Err(Error::Compacted(snapshot.metadata.index)),
                std::cmp::Ordering::Greater => Err(Error::Storage(format!("no entry at {index}"))),
            };
        }
        if index == LogIndex(0) {
            return Ok(Term(0));
        }
        if index > self.last_index() {
            return Err(Error::Storage(format!("no entry at {index}")));
        }
        self.storage.term(index)
    }

    /// Returns whether the entry at `index` has term `term` (index 0 matches term 0).
    pub fn matches(&self, index: LogIndex, term: Term) -> bool {
        self.term(index).is_ok_and(|found| found == term)
    }

    /// Returns whether a log ending at (`last_index`, `last_term`) is at least as up-to-date as
    /// this one (Raft §5.4.1).
    pub fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        let my_term = self.last_term();
        last_term > my_term || (last_term == my_term && last_index >= self.last_index())
    }

    /// Returns entries in `[low, high)`, within `max_bytes` but at least one.
    ///
    /// # Errors
    ///
    /// [`Error::Compacted`] if `low` was compacted.
    pub fn entries(&self, low: LogIndex, high: LogIndex, max_bytes: usize) -> Result<Vec<Entry>> {
        let high = high.min(self.last_index().next());
        if low >= high {
            return Ok(Vec::new());
        }
        if low < self.first_index() {
            return Err(Error::Compacted(self.first_index().prev()));
        }
        let mut entries = Vec::new();
        if low < self.unstable_offset {
            let stable_high = high.min(self.unstable_offset);
            entries = self.storage.entries(low, stable_high, max_bytes)?;
            let reached = entries.last().map_or(low, |entry| entry.index.next());
            if reached < stable_high || high <= self.unstable_offset {
                return Ok(entries);
            }
        }
        let start = low.max(self.unstable_offset);
        let from = (start.0 - self.unstable_offset.0) as usize;
        let to = (high.0 - self.unstable_offset.0) as usize;
        let mut size: usize = entries.iter().map(Entry::size_bytes).sum();
        for entry in &self.unstable[from..to] {
            size += entry.size_bytes();
            if !entries.is_empty() && size > max_bytes {
                break;
            }
            entries.push(entry.clone());
        }
        Ok(entries)
    }

    /// Appends entries created by this node as leader.
    pub fn append(&mut self, entries: Vec<Entry>) {
        if let Some(first) = entries.first() {
            assert_eq!(first.index, self.last_index().next(), "leader appends must be contiguous");
            self.truncate_and_append(entries);
        }
    }

    /// Appends entries from the leader after `prev_index`, replacing a conflicting suffix.
    /// Returns the index of the last entry of the append, or `None` if the log does not contain
    /// an entry at `prev_index` with `prev_term`.
    ///
    /// # Panics
    ///
    /// If a committed entry would be overwritten (a Raft safety violation).
    pub fn maybe_append(
        &mut self,
        prev_index: LogIndex,
        prev_term: Term,
        entries: Vec<Entry>,
    ) -> Option<LogIndex> {
        if !self.matches(prev_index, prev_term) {
            return None;
        }
        let last_new = LogIndex(prev_index.0 + entries.len() as u64);
        // Skip entries we already have; the first mismatch (or the end of our log) is where the
        // new entries start.
        let first_new = entries.iter().position(|entry| !self.matches(entry.index, entry.term));
        if let Some(position) = first_new {
            let conflict = entries[position].index;
            assert!(
                conflict > self.committed,
                "log matching violated: entry {conflict} conflicts with committed index {}",
                self.committed
            );
            self.truncate_and_append(entries[position..].to_vec());
        }
        Some(last_new)
    }

    /// Replaces everything from `entries[0].index` on with `entries`.
    fn truncate_and_append(&mut self, entries: Vec<Entry>) {
        let first = entries[0].index;
        if first >= self.unstable_offset {
            let keep = (first.0 - self.unstable_offset.0) as usize;
            assert!(keep <= self.unstable.len(), "append at {first} leaves a gap");
            self.unstable.truncate(keep);
        } else {
            // The new entries overwrite stable ones: the application replaces them on persist.
            self.unstable.clear();
            self.unstable_offset = first;
        }
        self.unstable.extend(entries);
    }

    /// Returns the conflict hint for a rejected append at `prev_index` (Raft §5.3).
    pub fn reject_hint(&self, prev_index: LogIndex) -> crate::RejectHint {
        if prev_index > self.last_index() {
            return crate::RejectHint {
                conflict_index: self.last_index().next(),
                conflict_term: None,
            };
        }
        let Ok(conflict_term) = self.term(prev_index) else {
            return crate::RejectHint { conflict_index: self.first_index(), conflict_term: None };
        };
        let mut index = prev_index;
        while index > self.first_index()
            && self.term(index.prev()).is_ok_and(|term| term == conflict_term)
        {
            index = index.prev();
        }
        crate::RejectHint { conflict_index: index, conflict_term: Some(conflict_term) }
    }

    /// Returns the last index whose entry has term `term`, if this log has any.
    pub fn last_index_of_term(&self, term: Term) -> Option<LogIndex> {
        let mut index = self.last_index();
        while index >= self.first_index() {
            match self.term(index) {
                Ok(found) if found == term => return Some(index),
                Ok(found) if found < term => return None,
                Ok(_) => index = index.prev(),
                Err(_) => return None,
            }
        }
        None
    }

    /// Advances the commit index to `index` (never backwards).
    pub fn commit_to(&mut self, index: LogIndex) -> bool {
        if index > self.committed {
            assert!(
                index <= self.last_index(),
                "commit index {index} beyond the last entry {}",
                self.last_index()
            );
            self.committed = index;
            return true;
        }
        false
    }

    /// Returns the entries unstable now (to persist).
    pub fn unstable_entries(&self) -> &[Entry] {
        &self.unstable
    }

    /// Returns the snapshot waiting to be persisted, if any.
    pub fn pending_snapshot(&self) -> Option<&Snapshot> {
        self.pending_snapshot.as_ref()
    }

    /// Returns the committed entries not yet applied, within `max_bytes` (at least one).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub fn entries_to_apply(&self, max_bytes: usize) -> Result<Vec<Entry>> {
        if self.pending_snapshot.is_some() {
            return Ok(Vec::new());
        }
        self.entries(self.applied.next(), self.committed.next(), max_bytes)
    }

    /// Marks entries up to (`index`, `term`) persisted.
    pub fn stable_to(&mut self, index: LogIndex, term: Term) {
        if index < self.unstable_offset || self.unstable.is_empty() {
            return;
        }
        if !self.term(index).is_ok_and(|found| found == term) {
            return;
        }
        let drop = (index.0 - self.unstable_offset.0 + 1) as usize;
        self.unstable.drain(..drop.min(self.unstable.len()));
        self.unstable_offset = index.next();
    }

    /// Marks the pending snapshot persisted and applied.
    pub fn stable_snapshot(&mut self) {
        if let Some(snapshot) = self.pending_snapshot.take() {
            self.applied = self.applied.max(snapshot.metadata.index);
        }
    }

    /// Replaces the log with a snapshot from the leader (to be persisted).
    pub fn restore(&mut self, snapshot: Snapshot) {
        let index = snapshot.metadata.index;
        assert!(
            index > self.committed,
            "restoring snapshot {index} at or below commit {}",
            self.committed
        );
        self.committed = index;
        self.unstable.clear();
        self.unstable_offset = index.next();
        self.pending_snapshot = Some(snapshot);
    }

    /// Marks entries up to `index` applied.
    pub fn applied_to(&mut self, index: LogIndex) {
        assert!(index <= self.committed, "applied {index} beyond commit {}", self.committed);
        self.applied = self.applied.max(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Configuration, EntryKind, MemStorage, RejectHint};

    fn entries(terms: &[u64]) -> Vec<Entry> {
        terms
            .iter()
            .enumerate()
            .map(|(i, term)| Entry {
                index: LogIndex(i as u64 + 1),
                term: Term(*term),
                kind: EntryKind::Noop,
            })
            .collect()
    }

    /// A log whose first `stable` entries are persisted and the rest unstable.
    fn log(terms: &[u64], stable: usize) -> RaftLog<MemStorage> {
        let all = entries(terms);
        let mut storage = MemStorage::new(Configuration::default());
        storage.append(&all[..stable]);
        let mut log = RaftLog::new(storage);
        log.append(all[stable..].to_vec());
        log
    }

    #[test]
    fn reject_hints_point_at_the_first_index_of_the_conflicting_term() {
        // (log terms, prev_index of the rejected append, expected hint)
        let cases = [
            (vec![1, 1, 2, 2, 2], 4, (3, Some(2))),
            (vec![1, 1, 2, 2, 2], 2, (1, Some(1))),
            (vec![1, 1, 2], 7, (4, None)),
            (vec![3], 1, (1, Some(3))),
        ];
        for (terms, prev_index, (conflict_index, conflict_term)) in cases {
            for stable in [0, terms.len() / 2, terms.len()] {
                let hint = log(&terms, stable).reject_hint(LogIndex(prev_index));
                let expected = RejectHint {
                    conflict_index: LogIndex(conflict_index),
                    conflict_term: conflict_term.map(Term),
                };
                assert_eq!(hint, expected, "{terms:?} prev={prev_index} stable={stable}");
            }
        }
    }

    #[test]
    fn maybe_append_skips_matches_and_replaces_conflicts() {
        // (log terms, prev index, prev term, new entry terms, result, terms afterwards)
        let cases: Vec<(Vec<u64>, u64, u64, Vec<u64>, Option<u64>, Vec<u64>)> = vec![
            (vec![1, 1, 1], 3, 1, vec![2, 2], Some(5), vec![1, 1, 1, 2, 2]),
            (vec![1, 1, 1], 1, 1, vec![1], Some(2), vec![1, 1, 1]),
            (vec![1, 1, 1], 1, 1, vec![1, 2], Some(3), vec![1, 1, 2]),
            (vec![1, 1, 1], 1, 2, vec![2], None, vec![1, 1, 1]),
            (vec![1, 1, 1], 4, 1, vec![2], None, vec![1, 1, 1]),
            (vec![], 0, 0, vec![1, 1], Some(2), vec![1, 1]),
        ];
        for (terms, prev_index, prev_term, new_terms, result, after) in cases {
            for stable in [0, terms.len()] {
                let mut log = log(&terms, stable);
                let new: Vec<Entry> = new_terms
                    .iter()
                    .enumerate()
                    .map(|(i, term)| Entry {
                        index: LogIndex(prev_index + i as u64 + 1),
                        term: Term(*term),
                        kind: EntryKind::Noop,
                    })
                    .collect();
                assert_eq!(
                    log.maybe_append(LogIndex(prev_index), Term(prev_term), new),
                    result.map(LogIndex)
                );
                let got: Vec<u64> =
                    (1..=log.last_index().0).map(|i| log.term(LogIndex(i)).unwrap().0).collect();
                assert_eq!(got, after, "{terms:?} stable={stable}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "log matching violated")]
    fn overwriting_a_committed_entry_panics() {
        let mut log = log(&[1, 1, 1], 3);
        log.commit_to(LogIndex(3));
        log.maybe_append(LogIndex(1), Term(1), entries(&[1, 2, 2])[1..].to_vec());
    }

    #[test]
    fn up_to_date_compares_last_term_then_index() {
        let log = log(&[1, 2, 2], 3);
        let cases =
            [((3, 2), true), ((4, 2), true), ((2, 2), false), ((1, 3), true), ((9, 1), false)];
        for ((index, term), expected) in cases {
            assert_eq!(log.is_up_to_date(LogIndex(index), Term(term)), expected, "{index}@{term}");
        }
    }
}
