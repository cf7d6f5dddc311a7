//! Meridian's wire types, generated from `proto/` by prost at build time, and conversions
//! between them and the protocol cores' own types.
//!
//! The cores (`meridian-raft`, later the transaction layer) know nothing of protobuf; this crate
//! is the one place that maps them. Decoding is strict: a message from a peer that lacks a
//! required part or names node 0 is an [`Error::InvalidMessage`], never a panic, so a malformed
//! or hostile peer cannot crash a node.

mod convert;

pub use convert::{Error, decode_message, encode_message};

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
