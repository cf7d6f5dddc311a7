//! Conversions between `meridian_raft` types and their protobuf forms.

use std::collections::BTreeSet;

use meridian_raft as raft_core;
use prost::Message as _;

use crate::raft as wire;

/// Errors decoding wire data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The bytes are not a valid protobuf message of the expected type.
    #[error("malformed protobuf: {0}")]
    Malformed(String),
    /// The message decodes but is not a valid Raft message (a required part is missing or a
    /// value is out of range).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
}

/// Builds an [`Error::InvalidMessage`].
fn invalid(what: &str) -> Error {
    Error::InvalidMessage(what.to_string())
}

fn ids_to_wire(ids: &BTreeSet<raft_core::NodeId>) -> Vec<u64> {
    ids.iter().map(|id| id.0).collect()
}

fn ids_from_wire(ids: &[u64]) -> Result<BTreeSet<raft_core::NodeId>, Error> {
    ids.iter()
        .map(|id| if *id == 0 { Err(invalid("node id 0")) } else { Ok(raft_core::NodeId(*id)) })
        .collect()
}

impl From<&raft_core::Configuration> for wire::Configuration {
    fn from(config: &raft_core::Configuration) -> Self {
        wire::Configuration {
            voters: ids_to_wire(&config.voters),
            outgoing_voters: ids_to_wire(&config.outgoing_voters),
            learners: ids_to_wire(&config.learners),
        }
    }
}

impl TryFrom<&wire::Configuration> for raft_core::Configuration {
    type Error = Error;

    fn try_from(config: &wire::Configuration) -> Result<Self, Error> {
        Ok(raft_core::Configuration {
            voters: ids_from_wire(&config.voters)?,
            outgoing_voters: ids_from_wire(&config.outgoing_voters)?,
            learners: ids_from_wire(&config.learners)?,
        })
    }
}

impl From<&raft_core::Entry> for wire::Entry {
    fn from(entry: &raft_core::Entry) -> Self {
        use wire::entry::Kind;
        let kind = match &entry.kind {
            raft_core::EntryKind::Noop => Kind::Noop(wire::Empty {}),
            raft_core::EntryKind::Command(data) => Kind::Command(data.clone()),
            raft_core::EntryKind::ConfigChange(change) => {
                let change = match change {
                    raft_core::ConfigChange::Enter { voters, learners } => {
                        wire::config_change::Change::Enter(wire::ConfigEnter {
                            voters: ids_to_wire(voters),
                            learners: ids_to_wire(learners),
                        })
                    }
                    raft_core::ConfigChange::Leave => {
                        wire::config_change::Change::Leave(wire::Empty {})
                    }
                };
                Kind::ConfigChange(wire::ConfigChange { change: Some(change) })
            }
        };
        wire::Entry { index: entry.index.0, term: entry.term.0, kind: Some(kind) }
    }
}

impl TryFrom<&wire::Entry> for raft_core::Entry {
    type Error = Error;

    fn try_from(entry: &wire::Entry) -> Result<Self, Error> {
        use wire::entry::Kind;
        let kind = match entry.kind.as_ref().ok_or_else(|| invalid("entry without kind"))? {
            Kind::Noop(_) => raft_core::EntryKind::Noop,
            Kind::Command(data) => raft_core::EntryKind::Command(data.clone()),
            Kind::ConfigChange(change) => {
                let change =
                    match change.change.as_ref().ok_or_else(|| invalid("empty config change"))? {
                        wire::config_change::Change::Enter(enter) => {
                            raft_core::ConfigChange::Enter {
                                voters: ids_from_wire(&enter.voters)?,
                                learners: ids_from_wire(&enter.learners)?,
                            }
                        }
                        wire::config_change::Change::Leave(_) => raft_core::ConfigChange::Leave,
                    };
                raft_core::EntryKind::ConfigChange(change)
            }
        };
        if entry.index == 0 {
            return Err(invalid("entry at index 0"));
        }
        Ok(raft_core::Entry {
            index: raft_core::LogIndex(entry.index),
            term: raft_core::Term(entry.term),
            kind,
        })
    }
}

impl From<&raft_core::HardState> for wire::HardState {
    fn from(state: &raft_core::HardState) -> Self {
        wire::HardState {
            term: state.term.0,
            vote: state.vote.map(|id| id.0),
            commit: state.commit.0,
        }
    }
}

impl From<&wire::HardState> for raft_core::HardState {
    fn from(state: &wire::HardState) -> Self {
        raft_core::HardState {
            term: raft_core::Term(state.term),
            vote: state.vote.filter(|id| *id != 0).map(raft_core::NodeId),
            commit: raft_core::LogIndex(state.commit),
        }
    }
}

impl From<&raft_core::SnapshotMetadata> for wire::SnapshotMetadata {
    fn from(metadata: &raft_core::SnapshotMetadata) -> Self {
        wire::SnapshotMetadata {
            index: metadata.index.0,
            term: metadata.term.0,
            config: Some((&metadata.config).into()),
        }
    }
}

impl TryFrom<&wire::SnapshotMetadata> for raft_core::SnapshotMetadata {
    type Error = Error;

    fn try_from(metadata: &wire::SnapshotMetadata) -> Result<Self, Error> {
        let config =
            metadata.config.as_ref().ok_or_else(|| invalid("snapshot without configuration"))?;
        Ok(raft_core::SnapshotMetadata {
            index: raft_core::LogIndex(metadata.index),
            term: raft_core::Term(metadata.term),
            config: config.try_into()?,
        })
    }
}

fn commit_point_to_wire(point: raft_core::CommitPoint) -> Option<wire::CommitPoint> {
    Some(wire::CommitPoint { index: point.index.0, term: point.term.0 })
}

fn commit_point_from_wire(point: Option<&wire::CommitPoint>) -> raft_core::CommitPoint {
    point.map_or_else(raft_core::CommitPoint::default, |point| raft_core::CommitPoint {
        index: raft_core::LogIndex(point.index),
        term: raft_core::Term(point.term),
    })
}

impl From<&raft_core::Message> for wire::Message {
    fn from(message: &raft_core::Message) -> Self {
        use raft_core::MessageBody as Core;
        use wire::message::Body;
        let body = match &message.body {
            Core::PreVote { last_index, last_term } => Body::PreVote(wire::VoteRequest {
                last_index: last_index.0,
                last_term: last_term.0,
                transfer: false,
            }),
            Core::PreVoteResponse { granted, commit } => {
                Body::PreVoteResponse(wire::VoteResponse {
                    granted: *granted,
                    commit: commit_point_to_wire(*commit),
                })
            }
            Core::Vote { last_index, last_term, transfer } => Body::Vote(wire::VoteRequest {
                last_index: last_index.0,
                last_term: last_term.0,
                transfer: *transfer,
            }),
            Core::VoteResponse { granted, commit } => Body::VoteResponse(wire::VoteResponse {
                granted: *granted,
                commit: commit_point_to_wire(*commit),
            }),
            Core::Append { prev_index, prev_term, entries, commit } => Body::Append(wire::Append {
                prev_index: prev_index.0,
                prev_term: prev_term.0,
                entries: entries.iter().map(Into::into).collect(),
                commit: commit.0,
            }),
            Core::AppendResponse { index, reject } => Body::AppendResponse(wire::AppendResponse {
                index: index.0,
                reject: reject.map(|hint| wire::RejectHint {
                    conflict_index: hint.conflict_index.0,
                    conflict_term: hint.conflict_term.map(|term| term.0),
                }),
            }),
            Core::Heartbeat { commit, round, promise_until } => Body::Heartbeat(wire::Heartbeat {
                commit: commit.0,
                round: *round,
                promise_until: *promise_until,
            }),
            Core::HeartbeatResponse { round } => {
                Body::HeartbeatResponse(wire::HeartbeatResponse { round: *round })
            }
            Core::InstallSnapshot { snapshot } => Body::InstallSnapshot(wire::Snapshot {
                metadata: Some((&snapshot.metadata).into()),
                data: snapshot.data.clone(),
            }),
            Core::TimeoutNow { lease_floor } => {
                Body::TimeoutNow(wire::TimeoutNow { lease_floor: *lease_floor })
            }
            Core::Quiesce { commit } => Body::Quiesce(wire::Quiesce { commit: commit.0 }),
        };
        wire::Message {
            from: message.from.0,
            to: message.to.0,
            term: message.term.0,
            body: Some(body),
        }
    }
}

impl TryFrom<&wire::Message> for raft_core::Message {
    type Error = Error;

    fn try_from(message: &wire::Message) -> Result<Self, Error> {
        use raft_core::MessageBody as Core;
        use wire::message::Body;
        if message.from == 0 || message.to == 0 {
            return Err(invalid("message from or to node 0"));
        }
        let body = match message.body.as_ref().ok_or_else(|| invalid("message without body"))? {
            Body::PreVote(request) => Core::PreVote {
                last_index: raft_core::LogIndex(request.last_index),
                last_term: raft_core::Term(request.last_term),
            },
            Body::PreVoteResponse(response) => Core::PreVoteResponse {
                granted: response.granted,
                commit: commit_point_from_wire(response.commit.as_ref()),
            },
            Body::Vote(request) => Core::Vote {
                last_index: raft_core::LogIndex(request.last_index),
                last_term: raft_core::Term(request.last_term),
                transfer: request.transfer,
            },
            Body::VoteResponse(response) => Core::VoteResponse {
                granted: response.granted,
                commit: commit_point_from_wire(response.commit.as_ref()),
            },
            Body::Append(append) => Core::Append {
                prev_index: raft_core::LogIndex(append.prev_index),
                prev_term: raft_core::Term(append.prev_term),
                entries: append.entries.iter().map(TryInto::try_into).collect::<Result<_, _>>()?,
                commit: raft_core::LogIndex(append.commit),
            },
            Body::AppendResponse(response) => Core::AppendResponse {
                index: raft_core::LogIndex(response.index),
                reject: response.reject.as_ref().map(|hint| raft_core::RejectHint {
                    conflict_index: raft_core::LogIndex(hint.conflict_index),
                    conflict_term: hint.conflict_term.map(raft_core::Term),
                }),
            },
            Body::Heartbeat(heartbeat) => Core::Heartbeat {
                commit: raft_core::LogIndex(heartbeat.commit),
                round: heartbeat.round,
                promise_until: heartbeat.promise_until,
            },
            Body::HeartbeatResponse(response) => Core::HeartbeatResponse { round: response.round },
            Body::Quiesce(quiesce) => Core::Quiesce { commit: raft_core::LogIndex(quiesce.commit) },
            Body::InstallSnapshot(snapshot) => {
                let metadata = snapshot
                    .metadata
                    .as_ref()
                    .ok_or_else(|| invalid("snapshot without metadata"))?;
                Core::InstallSnapshot {
                    snapshot: raft_core::Snapshot {
                        metadata: metadata.try_into()?,
                        data: snapshot.data.clone(),
                    },
                }
            }
            Body::TimeoutNow(timeout) => Core::TimeoutNow { lease_floor: timeout.lease_floor },
        };
        Ok(raft_core::Message {
            from: raft_core::NodeId(message.from),
            to: raft_core::NodeId(message.to),
            term: raft_core::Term(message.term),
            body,
        })
    }
}

/// Encodes a Raft message to bytes.
pub fn encode_message(message: &raft_core::Message) -> Vec<u8> {
    wire::Message::from(message).encode_to_vec()
}

/// Decodes a Raft message from bytes.
///
/// # Errors
///
/// [`Error::Malformed`] if the bytes are not protobuf; [`Error::InvalidMessage`] if a required
/// part is missing or a node id is zero.
pub fn decode_message(bytes: &[u8]) -> Result<raft_core::Message, Error> {
    let message =
        wire::Message::decode(bytes).map_err(|error| Error::Malformed(error.to_string()))?;
    (&message).try_into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft_core::{
        CommitPoint, ConfigChange, Entry, EntryKind, LogIndex, MessageBody, NodeId, Term,
    };

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().map(|id| NodeId(*id)).collect()
    }

    /// One message of every kind, with every optional part both present and absent.
    fn messages() -> Vec<raft_core::Message> {
        let entries = vec![
            Entry { index: LogIndex(5), term: Term(2), kind: EntryKind::Noop },
            Entry {
                index: LogIndex(6),
                term: Term(2),
                kind: EntryKind::Command(b"put a 1".to_vec()),
            },
            Entry {
                index: LogIndex(7),
                term: Term(2),
                kind: EntryKind::ConfigChange(ConfigChange::Enter {
                    voters: ids(&[1, 2, 4]),
                    learners: ids(&[5]),
                }),
            },
            Entry {
                index: LogIndex(8),
                term: Term(3),
                kind: EntryKind::ConfigChange(ConfigChange::Leave),
            },
        ];
        let config = raft_core::Configuration {
            voters: ids(&[1, 2]),
            outgoing_voters: ids(&[1, 3]),
            learners: ids(&[4]),
        };
        let commit = CommitPoint { index: LogIndex(9), term: Term(3) };
        let bodies = vec![
            MessageBody::PreVote { last_index: LogIndex(4), last_term: Term(2) },
            MessageBody::PreVoteResponse { granted: true, commit },
            MessageBody::Vote { last_index: LogIndex(4), last_term: Term(2), transfer: true },
            MessageBody::VoteResponse { granted: false, commit: CommitPoint::default() },
            MessageBody::Append {
                prev_index: LogIndex(4),
                prev_term: Term(2),
                entries,
                commit: LogIndex(3),
            },
            MessageBody::Append {
                prev_index: LogIndex(0),
                prev_term: Term(0),
                entries: vec![],
                commit: LogIndex(0),
            },
            MessageBody::AppendResponse { index: LogIndex(8), reject: None },
            MessageBody::AppendResponse {
                index: LogIndex(8),
                reject: Some(raft_core::RejectHint {
                    conflict_index: LogIndex(3),
                    conflict_term: Some(Term(1)),
                }),
            },
            MessageBody::AppendResponse {
                index: LogIndex(8),
                reject: Some(raft_core::RejectHint {
                    conflict_index: LogIndex(3),
                    conflict_term: None,
                }),
            },
            MessageBody::Heartbeat { commit: LogIndex(7), round: 12, promise_until: u64::MAX },
            MessageBody::HeartbeatResponse { round: 12 },
            MessageBody::InstallSnapshot {
                snapshot: raft_core::Snapshot {
                    metadata: raft_core::SnapshotMetadata {
                        index: LogIndex(40),
                        term: Term(3),
                        config,
                    },
                    data: vec![0, 1, 2, 255],
                },
            },
            MessageBody::TimeoutNow { lease_floor: 1_767_225_600_000_000_000 },
            MessageBody::Quiesce { commit: LogIndex(9) },
        ];
        bodies
            .into_iter()
            .map(|body| raft_core::Message { from: NodeId(1), to: NodeId(2), term: Term(3), body })
            .collect()
    }

    #[test]
    fn every_message_round_trips() {
        for message in messages() {
            assert_eq!(
                decode_message(&encode_message(&message)),
                Ok(message.clone()),
                "{message:?}"
            );
        }
    }

    #[test]
    fn malformed_and_invalid_messages_are_errors() {
        let valid = wire::Message::from(&messages()[0]);
        let without_body = wire::Message { body: None, ..valid.clone() };
        let from_zero = wire::Message { from: 0, ..valid.clone() };
        let entry_without_kind = wire::Message {
            body: Some(wire::message::Body::Append(wire::Append {
                entries: vec![wire::Entry { index: 1, term: 1, kind: None }],
                ..Default::default()
            })),
            ..valid.clone()
        };
        let snapshot_without_metadata = wire::Message {
            body: Some(wire::message::Body::InstallSnapshot(wire::Snapshot {
                metadata: None,
                data: vec![],
            })),
            ..valid
        };
        for (name, message) in [
            ("without body", without_body),
            ("from node 0", from_zero),
            ("entry without kind", entry_without_kind),
            ("snapshot without metadata", snapshot_without_metadata),
        ] {
            assert!(
                matches!(decode_message(&message.encode_to_vec()), Err(Error::InvalidMessage(_))),
                "{name}"
            );
        }
        for garbage in [&b"\xff\xff\xff"[..], b"\x0a\x05abc"] {
            assert!(matches!(decode_message(garbage), Err(Error::Malformed(_))), "{garbage:?}");
        }
    }

    #[test]
    fn hard_state_and_snapshot_metadata_round_trip() {
        for state in [
            raft_core::HardState::default(),
            raft_core::HardState { term: Term(4), vote: Some(NodeId(2)), commit: LogIndex(17) },
        ] {
            assert_eq!(raft_core::HardState::from(&wire::HardState::from(&state)), state);
        }
        let metadata = raft_core::SnapshotMetadata {
            index: LogIndex(3),
            term: Term(2),
            config: raft_core::Configuration::with_voters(ids(&[1, 2, 3])),
        };
        assert_eq!(
            raft_core::SnapshotMetadata::try_from(&wire::SnapshotMetadata::from(&metadata)),
            Ok(metadata)
        );
    }
}
