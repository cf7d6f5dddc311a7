//! A linearizability checker for histories of single-key registers (Wing and Gong's search
//! with Lowe's memoization).
//!
//! Linearizability is local (Herlihy and Wing, 1990): a history is linearizable iff each key's
//! sub-history is, so keys are checked one by one. An operation has an invocation time and,
//! unless its outcome is unknown, a completion time (from one global sequence, so that "A
//! completed before B was invoked" is exact). An operation whose outcome is unknown (the client
//! timed out, or its node crashed) may take effect at any point after its invocation, or never.
//!
//! The search linearizes, at each step, some operation invoked before every pending completed
//! operation returned; memoization on (linearized set, register value) keeps it polynomial on
//! the histories the simulator produces.

use std::collections::{BTreeMap, HashSet};

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Wrote a value.
    Write(String),
    /// Read a value (`None`: the key was absent).
    Read(Option<String>),
}

/// One client operation on a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The key.
    pub key: String,
    /// The operation and its result.
    pub operation: Operation,
    /// When the client invoked it.
    pub invoked: u64,
    /// When it completed, or `None` if its outcome is unknown. Reads with unknown outcome
    /// carry no information and should be left out.
    pub completed: Option<u64>,
}

/// Checks a history. Returns `Err` naming the first key whose history is not linearizable.
///
/// # Panics
///
/// If one key has more than 128 operations (the search tracks them in a bit set).
pub fn check(history: &[HistoryEntry]) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&HistoryEntry>> = BTreeMap::new();
    for entry in history {
        by_key.entry(entry.key.as_str()).or_default().push(entry);
    }
    for (key, operations) in by_key {
        assert!(
            operations.len() <= 128,
            "key {key} has {} operations; at most 128 are supported",
            operations.len()
        );
        let mut search = Search { operations: &operations, memo: HashSet::new() };
        if !search.linearize(0, None) {
            let mut lines: Vec<String> = operations
                .iter()
                .map(|op| {
                    format!(
                        "  [{}, {}] {:?}",
                        op.invoked,
                        op.completed.map_or("?".into(), |c| c.to_string()),
                        op.operation
                    )
                })
                .collect();
            lines.sort();
            return Err(format!("history of key {key} is not linearizable:\n{}", lines.join("\n")));
        }
    }
    Ok(())
}

struct Search<'a> {
    operations: &'a [&'a HistoryEntry],
    memo: HashSet<(u128, Option<String>)>,
}

impl Search<'_> {
    fn linearize(&mut self, done: u128, value: Option<String>) -> bool {
        let pending = |index: usize| done & (1u128 << index) == 0;
        let all_known_done = (0..self.operations.len())
            .all(|index| !pending(index) || self.operations[index].completed.is_none());
        if all_known_done {
            return true;
        }
        if !self.memo.insert((done, value.clone())) {
            return false;
        }
        // An operation can go next only if it was invoked before every pending completed
        // operation returned.
        let deadline = (0..self.operations.len())
            .filter(|index| pending(*index))
            .filter_map(|index| self.operations[index].completed)
            .min()
            .unwrap_or(u64::MAX);
        for index in 0..self.operations.len() {
            let operation = self.operations[index];
            if !pending(index) || operation.invoked >= deadline {
                continue;
            }
            let next_done = done | (1u128 << index);
            let found = match &operation.operation {
                Operation::Write(written) => self.linearize(next_done, Some(written.clone())),
                Operation::Read(read) => *read == value && self.linearize(next_done, value.clone()),
            };
            if found {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, operation: Operation, invoked: u64, completed: Option<u64>) -> HistoryEntry {
        HistoryEntry { key: key.into(), operation, invoked, completed }
    }

    fn write(value: &str) -> Operation {
        Operation::Write(value.into())
    }

    fn read(value: Option<&str>) -> Operation {
        Operation::Read(value.map(Into::into))
    }

    #[test]
    fn verdicts() {
        // (name, history, linearizable?)
        let cases: Vec<(&str, Vec<HistoryEntry>, bool)> = vec![
            ("empty", vec![], true),
            ("read of an absent key", vec![op("k", read(None), 1, Some(2))], true),
            (
                "sequential write then read",
                vec![op("k", write("a"), 1, Some(2)), op("k", read(Some("a")), 3, Some(4))],
                true,
            ),
            (
                "stale read after a completed write",
                vec![op("k", write("a"), 1, Some(2)), op("k", read(None), 3, Some(4))],
                false,
            ),
            (
                "read concurrent with a write may see either",
                vec![
                    op("k", write("a"), 1, Some(4)),
                    op("k", read(None), 2, Some(3)),
                    op("k", read(Some("a")), 2, Some(5)),
                ],
                true,
            ),
            (
                "reads may not go back in time",
                vec![
                    op("k", write("a"), 1, Some(10)),
                    op("k", read(Some("a")), 2, Some(3)),
                    op("k", read(None), 4, Some(5)),
                ],
                false,
            ),
            (
                "unknown write may take effect later",
                vec![
                    op("k", write("a"), 1, None),
                    op("k", read(None), 2, Some(3)),
                    op("k", read(Some("a")), 4, Some(5)),
                ],
                true,
            ),
            (
                "unknown write may never take effect",
                vec![op("k", write("a"), 1, None), op("k", read(None), 5, Some(6))],
                true,
            ),
            ("read of a value never written", vec![op("k", read(Some("z")), 1, Some(2))], false),
            (
                "keys are independent",
                vec![
                    op("a", write("1"), 1, Some(2)),
                    op("b", read(None), 3, Some(4)),
                    op("a", read(Some("1")), 5, Some(6)),
                ],
                true,
            ),
            (
                "lost write on another key",
                vec![
                    op("a", write("1"), 1, Some(2)),
                    op("b", write("2"), 3, Some(4)),
                    op("b", read(None), 5, Some(6)),
                ],
                false,
            ),
            (
                "overwritten value read back",
                vec![
                    op("k", write("a"), 1, Some(2)),
                    op("k", write("b"), 3, Some(4)),
                    op("k", read(Some("a")), 5, Some(6)),
                ],
                false,
            ),
        ];
        for (name, history, linearizable) in cases {
            assert_eq!(check(&history).is_ok(), linearizable, "{name}");
        }
    }
}
