//! Errors the node returns to clients, and their gRPC form.

use meridian_raft::NodeId;
use meridian_rpc::kv::RangeDescriptor;
use meridian_rpc::metadata;

use crate::RangeId;

/// Why a request failed, grouped by what the client must do.
///
/// Every variant but [`NodeError::Ambiguous`] and [`NodeError::Internal`] is a refusal: the
/// request had no effect and never will, and its gRPC form says so
/// ([`metadata::NOT_APPLIED`]), so that a client may send a write again. A request that may
/// have been proposed fails only with `Ambiguous`; if the node stops with it in hand, its
/// caller gets an unmarked `unavailable` status, which clients treat as ambiguous too.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// Another node leads the range; retry there (the address is known if `address` is set).
    #[error("not the leader{}", leader.map(|id| format!("; node {id} leads at {}", address.as_deref().unwrap_or("an unknown address"))).unwrap_or_default())]
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeId>,
        /// Its RPC address, if known.
        address: Option<String>,
    },
    /// This node has no replica of the range (or one still waiting for its data); look the
    /// range up again.
    #[error("range {} is not on this node", .0.0)]
    RangeNotFound(RangeId),
    /// The range no longer holds the key (it split); look the range up again.
    #[error("the key is not in range {} [{:x?}, {:x?})", descriptor.range_id, descriptor.start, descriptor.end)]
    KeyNotInRange {
        /// The range's current descriptor.
        descriptor: Box<RangeDescriptor>,
    },
    /// The command may or may not take effect: it was proposed, and what became of it is
    /// unknown (leadership moved before it applied, a snapshot replaced the log it was in, or
    /// its commit-wait could not finish).
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    /// The range cannot serve right now (no leader, no lease yet, leadership lost, the
    /// caller's deadline passed first), or another leader's entry took the index of its
    /// proposal: it did not and will not take effect, so a retry is safe.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The transaction must abort and retry with its priority: it was wounded by an older
    /// one, or lost its locks here (SQLSTATE 40001 at the SQL edge). It had no effect.
    #[error("transaction aborted, retry it: {0}")]
    TxnRetry(String),
    /// The request is invalid.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The node is not part of an initialized cluster yet.
    #[error("the node is not initialized: run `meridian init` against one node of the cluster")]
    NotInitialized,
    /// The cluster was already initialized.
    #[error("the cluster is already initialized (cluster {0})")]
    AlreadyInitialized(String),
    /// A peer belongs to another cluster.
    #[error("cluster mismatch: this node belongs to cluster {ours}, the peer to {theirs}")]
    ClusterMismatch {
        /// This node's cluster.
        ours: String,
        /// The peer's cluster.
        theirs: String,
    },
    /// The node failed internally (storage); it stops.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<meridian_txn::Error> for NodeError {
    fn from(error: meridian_txn::Error) -> Self {
        if matches!(error, meridian_txn::Error::LocksLost { .. }) {
            metrics::counter!("meridian_txn_aborts_total", "reason" => "locks_lost").increment(1);
        }
        if error.is_retryable() {
            NodeError::TxnRetry(error.to_string())
        } else {
            NodeError::InvalidArgument(error.to_string())
        }
    }
}

/// Returns the leader's address a `NotLeader` status carries, if any: where a client should
/// retry.
pub fn leader_hint(status: &tonic::Status) -> Option<&str> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    status.metadata().get(metadata::LEADER_ADDRESS).and_then(|value| value.to_str().ok())
}

impl From<NodeError> for tonic::Status {
    fn from(error: NodeError) -> Self {
        let refusal = !matches!(error, NodeError::Ambiguous(_) | NodeError::Internal(_));
        let status = status_of(error);
        if refusal { metadata::not_applied(status) } else { status }
    }
}

/// The gRPC status of an error, with its kind in the metadata.
fn status_of(error: NodeError) -> tonic::Status {
    let message = error.to_string();
    let kind = |mut status: tonic::Status, kind: &'static str| {
        status.metadata_mut().insert(metadata::ERROR_KIND, kind.parse().expect("ascii"));
        status
    };
    match error {
        NodeError::RangeNotFound(_) => {
            kind(tonic::Status::not_found(message), metadata::RANGE_NOT_FOUND)
        }
        NodeError::KeyNotInRange { .. } => {
            kind(tonic::Status::out_of_range(message), metadata::KEY_NOT_IN_RANGE)
        }
        NodeError::Ambiguous(_) => kind(tonic::Status::unavailable(message), metadata::AMBIGUOUS),
        NodeError::NotLeader { address, .. } => {
            let mut status =
                kind(tonic::Status::failed_precondition(message), metadata::NOT_LEADER);
            if let Some(address) = address
                && let Ok(value) = address.parse()
            {
                status.metadata_mut().insert(metadata::LEADER_ADDRESS, value);
            }
            status
        }
        NodeError::Unavailable(_) => tonic::Status::unavailable(message),
        NodeError::TxnRetry(_) => kind(tonic::Status::aborted(message), metadata::TXN_RETRY),
        NodeError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
        NodeError::NotInitialized => {
            kind(tonic::Status::failed_precondition(message), metadata::NOT_INITIALIZED)
        }
        NodeError::AlreadyInitialized(_) => tonic::Status::already_exists(message),
        NodeError::ClusterMismatch { .. } => tonic::Status::permission_denied(message),
        NodeError::Internal(_) => tonic::Status::internal(message),
    }
}
