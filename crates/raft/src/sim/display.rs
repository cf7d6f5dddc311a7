//! Compact, deterministic text forms of messages and entries for golden scripts and failure
//! reports.

use std::fmt::Write as _;

use crate::{ConfigChange, Entry, EntryKind, Message, MessageBody, NodeId};

/// Formats an entry as `index@term kind`.
pub fn entry(entry: &Entry) -> String {
    let kind = match &entry.kind {
        EntryKind::Noop => "noop".to_string(),
        EntryKind::Command(data) => String::from_utf8_lossy(data).into_owned(),
        EntryKind::ConfigChange(ConfigChange::Enter { voters, learners }) => {
            let list = |set: &std::collections::BTreeSet<NodeId>| {
                set.iter().map(|id| id.to_string()).collect::<Vec<_>>().join(",")
            };
            if learners.is_empty() {
                format!("config voters={}", list(voters))
            } else {
                format!("config voters={} learners={}", list(voters), list(learners))
            }
        }
        EntryKind::ConfigChange(ConfigChange::Leave) => "config leave-joint".to_string(),
    };
    format!("{}@{} {kind}", entry.index, entry.term)
}

/// Formats a message as `from→to term Body fields`.
pub fn message(message: &Message) -> String {
    let mut out = format!("n{}→n{} t{} ", message.from, message.to, message.term);
    let _ = match &message.body {
        MessageBody::PreVote { last_index, last_term } => {
            write!(out, "PreVote last={last_index}@{last_term}")
        }
        MessageBody::PreVoteResponse { granted, commit } => {
            write!(out, "PreVoteResponse granted={granted} commit={}@{}", commit.index, commit.term)
        }
        MessageBody::Vote { last_index, last_term, transfer } => {
            write!(
                out,
                "Vote last={last_index}@{last_term}{}",
                if *transfer { " transfer" } else { "" }
            )
        }
        MessageBody::VoteResponse { granted, commit } => {
            write!(out, "VoteResponse granted={granted} commit={}@{}", commit.index, commit.term)
        }
        MessageBody::Append { prev_index, prev_term, entries, commit } => {
            let entries: Vec<String> = entries.iter().map(entry).collect();
            write!(
                out,
                "Append prev={prev_index}@{prev_term} commit={commit} [{}]",
                entries.join(", ")
            )
        }
        MessageBody::AppendResponse { index, reject: None } => {
            write!(out, "AppendResponse index={index}")
        }
        MessageBody::AppendResponse { index, reject: Some(hint) } => write!(
            out,
            "AppendResponse reject index={index} hint={}@{}",
            hint.conflict_index,
            hint.conflict_term.map_or("none".to_string(), |term| term.to_string())
        ),
        MessageBody::Heartbeat { commit, round, promise_until } => {
            write!(out, "Heartbeat commit={commit} round={round} promise={promise_until}")
        }
        MessageBody::HeartbeatResponse { round } => write!(out, "HeartbeatResponse round={round}"),
        MessageBody::InstallSnapshot { snapshot } => write!(
            out,
            "InstallSnapshot {}@{} {}",
            snapshot.metadata.index, snapshot.metadata.term, snapshot.metadata.config
        ),
        MessageBody::TimeoutNow { lease_floor } => write!(out, "TimeoutNow floor={lease_floor}"),
        MessageBody::Quiesce { commit } => write!(out, "Quiesce commit={commit}"),
    };
    out
}
