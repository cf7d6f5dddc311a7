//! The Raft crate's error type.

use crate::{LogIndex, NodeId};

/// Errors returned by Raft, grouped by what the caller must do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The node is not the leader; retry at `leader` if known.
    #[error("not the leader{}", leader.map(|id| format!(", try node {id}")).unwrap_or_default())]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// A leadership transfer is under way; retry shortly.
    #[error("leadership transfer to node {0} in progress")]
    TransferInProgress(NodeId),
    /// A membership change is already pending; retry once it is applied.
    #[error("a configuration change is already pending at index {0}")]
    ConfigChangePending(LogIndex),
    /// The request is invalid; the caller must fix it.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The options are invalid.
    #[error("invalid raft configuration: {0}")]
    InvalidConfig(String),
    /// Log entries were requested that storage no longer has (compacted).
    #[error("log compacted up to index {0}")]
    Compacted(LogIndex),
    /// Storage failed; the node must stop.
    #[error("raft storage error: {0}")]
    Storage(String),
}

/// A result with the Raft crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
