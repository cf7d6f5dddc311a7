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
    /// A transaction must abort and retry: it was wounded by an older one, or lost its locks.
    pub const TXN_RETRY: &str = "txn-retry";
    /// A write may or may not have taken effect.
    pub const AMBIGUOUS: &str = "ambiguous";
    /// The node does not belong to an initialized cluster (yet).
    pub const NOT_INITIALIZED: &str = "not-initialized";
    /// Says what became of a failed request; the one value, [`NOT_APPLIED`], promises that
    /// the request had no effect and never will (the node refused it before proposing it). A
    /// failure without it may have taken effect: a client re-sends a write only with it, or
    /// after a connection attempt failed ([`took_no_effect`]).
    pub const OUTCOME: &str = "x-meridian-outcome";
    /// See [`OUTCOME`].
    pub const NOT_APPLIED: &str = "not-applied";
    /// Present on requests a node makes on behalf of another caller (a route lookup asked of
    /// a node without a replica of the meta range): the receiver answers from its own
    /// replicas and never forwards it again.
    pub const FORWARDED: &str = "x-meridian-forwarded";

    /// Marks `status` as the refusal of a request that had no effect.
    pub fn not_applied(mut status: tonic::Status) -> tonic::Status {
        status
            .metadata_mut()
            .insert(OUTCOME, tonic::metadata::MetadataValue::from_static(NOT_APPLIED));
        status
    }

    /// Returns whether `status` promises that its request had no effect.
    pub fn is_not_applied(status: &tonic::Status) -> bool {
        status.metadata().get(OUTCOME).is_some_and(|value| value == NOT_APPLIED)
    }

    /// Returns whether the request that failed with `status` surely took no effect: the node
    /// said so, or no connection was ever made. Only such a write may be sent again.
    pub fn took_no_effect(status: &tonic::Status) -> bool {
        is_not_applied(status) || crate::dial::is_connect_failure(status)
    }

    /// Returns the caller's timeout that a request carries (the `grpc-timeout` header), if
    /// any: how long the caller waits for the answer. Malformed values count as absent.
    pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
        let value = metadata.get("grpc-timeout")?.to_str().ok()?;
        let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
        if digits.is_empty() || digits.len() > 8 {
            return None;
        }
        let amount: u64 = digits.parse().ok()?;
        Some(match unit {
            "H" => std::time::Duration::from_secs(amount.checked_mul(3600)?),
            "M" => std::time::Duration::from_secs(amount.checked_mul(60)?),
            "S" => std::time::Duration::from_secs(amount),
            "m" => std::time::Duration::from_millis(amount),
            "u" => std::time::Duration::from_micros(amount),
            "n" => std::time::Duration::from_nanos(amount),
            _ => return None,
        })
    }

    #[cfg(test)]
    mod tests {
        use std::time::Duration;

        use super::*;

        #[test]
        fn grpc_timeouts_parse_every_unit_and_refuse_garbage() {
            let cases = [
                ("2S", Some(Duration::from_secs(2))),
                ("1500m", Some(Duration::from_millis(1500))),
                ("3M", Some(Duration::from_secs(180))),
                ("1H", Some(Duration::from_secs(3600))),
                ("7u", Some(Duration::from_micros(7))),
                ("9n", Some(Duration::from_nanos(9))),
                ("", None),
                ("S", None),
                ("12x", None),
                ("123456789S", None),
                ("-1S", None),
            ];
            for (value, expected) in cases {
                let mut metadata = tonic::metadata::MetadataMap::new();
                if !value.is_empty() {
                    metadata.insert("grpc-timeout", value.parse().expect("ascii"));
                }
                assert_eq!(grpc_timeout(&metadata), expected, "{value:?}");
            }
        }

        #[test]
        fn refusals_are_marked_not_applied() {
            let status = tonic::Status::unavailable("no lease");
            assert!(!is_not_applied(&status));
            assert!(is_not_applied(&not_applied(status)));
        }
    }
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
