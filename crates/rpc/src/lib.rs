//! Meridian's wire types, generated from `proto/` by prost at build time, and conversions
//! between them and the protocol cores' own types.
//!
//! The cores (`meridian-raft`, later the transaction layer) know nothing of protobuf; this crate
//! is the one place that maps them. Decoding is strict: a message from a peer that lacks a
//! required part or names node 0 is an [`Error::InvalidMessage`], never a panic, so a malformed
//! or hostile peer cannot crash a node.

mod convert;
pub mod dial;
pub mod span;

pub use convert::{Error, decode_message, encode_message};

/// gRPC metadata keys and values with which nodes tell clients what to do about an error.
pub mod metadata {
    /// Carries the leader's address on a `not-leader` error: where to retry.
    pub const LEADER_ADDRESS: &str = "x-meridian-leader-address";
    /// Names the kind of a routing error or an ambiguous outcome, so that clients need not
    /// parse messages; one of the values below.
    pub const ERROR_KIND: &str = "x-meridian-error";
    /// Another node leads the range.
    pub const NOT_LEADER: &str = "not-leader";
    /// The node has no (initialized) replica of the range.
    pub const RANGE_NOT_FOUND: &str = "range-not-found";
    /// The range no longer holds the key.
    pub const KEY_NOT_IN_RANGE: &str = "key-not-in-range";
    /// A write may or may not have taken effect.
    pub const AMBIGUOUS: &str = "ambiguous";
    /// The node does not belong to an initialized cluster (yet).
    pub const NOT_INITIALIZED: &str = "not-initialized";
}

/// Types generated from `proto/raft.proto`.
#[allow(missing_docs, clippy::all)]
pub mod raft {
    include!(concat!(env!("OUT_DIR"), "/meridian.raft.rs"));
}

/// Types and the `Kv` service generated from `proto/kv.proto`.
#[allow(missing_docs, clippy::all)]
pub mod kv {
    include!(concat!(env!("OUT_DIR"), "/meridian.kv.rs"));
}

/// Types and the `Node` service generated from `proto/node.proto`.
#[allow(missing_docs, clippy::all)]
pub mod node {
    include!(concat!(env!("OUT_DIR"), "/meridian.node.rs"));
}
