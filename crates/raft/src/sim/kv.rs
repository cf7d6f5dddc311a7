//! The simulator's key-value state machine: `put OP KEY VALUE [TIMESTAMP]` commands, snapshots
//! as text.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Entry, EntryKind, LogIndex};

/// A node's key-value state machine.
#[derive(Clone, Debug, Default)]
pub(super) struct Kv {
    /// The registers.
    pub(super) data: BTreeMap<String, String>,
    /// The operation ids of every write applied.
    pub(super) applied_operations: BTreeSet<u64>,
    /// The index of the last entry applied.
    pub(super) applied_index: LogIndex,
    /// The highest write timestamp applied (0 if none): the floor a leader's next write
    /// timestamp must exceed (`RawNode::lease_timestamp`).
    pub(super) max_timestamp: u64,
}

/// Returns the command of a write: operation id, key, value and the timestamp, if it has one.
pub(super) fn put_command(operation: u64, key: &str, timestamp: Option<u64>) -> Vec<u8> {
    let mut command = format!("put {operation} {key} v{operation}");
    if let Some(timestamp) = timestamp {
        command.push_str(&format!(" {timestamp}"));
    }
    command.into_bytes()
}

impl Kv {
    /// Applies `put` commands; other entries only advance the index. Returns the write's
    /// timestamp, if it carries one.
    pub(super) fn apply(&mut self, entry: &Entry) -> Option<u64> {
        self.applied_index = entry.index;
        let EntryKind::Command(data) = &entry.kind else { return None };
        let text = std::str::from_utf8(data).ok()?;
        let fields: Vec<&str> = text.split(' ').collect();
        let (["put", operation, key, value] | ["put", operation, key, value, _]) = fields[..]
        else {
            return None;
        };
        let operation = operation.parse().ok()?;
        self.data.insert(key.to_string(), value.to_string());
        self.applied_operations.insert(operation);
        let timestamp = fields.get(4).and_then(|timestamp| timestamp.parse().ok())?;
        self.max_timestamp = self.max_timestamp.max(timestamp);
        Some(timestamp)
    }

    /// Returns the state as text (registers, applied operations, highest timestamp).
    pub(super) fn snapshot(&self) -> Vec<u8> {
        let mut out = String::new();
        for (key, value) in &self.data {
            out.push_str(&format!("k {key} {value}\n"));
        }
        for operation in &self.applied_operations {
            out.push_str(&format!("o {operation}\n"));
        }
        out.push_str(&format!("t {}\n", self.max_timestamp));
        out.into_bytes()
    }

    /// Returns the state of a snapshot taken at `index`.
    pub(super) fn restore(data: &[u8], index: LogIndex) -> Kv {
        let mut kv = Kv { applied_index: index, ..Kv::default() };
        for line in String::from_utf8_lossy(data).lines() {
            match line.split(' ').collect::<Vec<_>>()[..] {
                ["k", key, value] => {
                    kv.data.insert(key.into(), value.into());
                }
                ["o", operation] => {
                    kv.applied_operations.insert(operation.parse().unwrap_or_default());
                }
                ["t", timestamp] => kv.max_timestamp = timestamp.parse().unwrap_or_default(),
                _ => {}
            }
        }
        kv
    }
}
