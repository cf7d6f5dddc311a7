//! The simulator's key-value state machine: `put OP KEY VALUE` commands, snapshots as text.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Entry, EntryKind, LogIndex};

/// A node's key-value state machine.
#[derive(Clone, Debug, Default)]
pub(super) struct Kv {
    pub(super) data: BTreeMap<String, String>,
    pub(super) applied_operations: BTreeSet<u64>,
    pub(super) applied_index: LogIndex,
}

impl Kv {
    /// Applies `put OP KEY VALUE` commands; other commands only advance the index.
    pub(super) fn apply(&mut self, entry: &Entry) {
        if let EntryKind::Command(data) = &entry.kind
            && let Ok(text) = std::str::from_utf8(data)
            && let ["put", operation, key, value] = text.split(' ').collect::<Vec<_>>()[..]
            && let Ok(operation) = operation.parse()
        {
            self.data.insert(key.to_string(), value.to_string());
            self.applied_operations.insert(operation);
        }
        self.applied_index = entry.index;
    }

    pub(super) fn snapshot(&self) -> Vec<u8> {
        let mut out = String::new();
        for (key, value) in &self.data {
            out.push_str(&format!("k {key} {value}\n"));
        }
        for operation in &self.applied_operations {
            out.push_str(&format!("o {operation}\n"));
        }
        out.into_bytes()
    }

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
                _ => {}
            }
        }
        kv
    }
}
