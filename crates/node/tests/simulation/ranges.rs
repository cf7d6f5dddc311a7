//! Range invariants, checked once the faults have healed: the ranges the current leaders
//! report tile the key space without gaps or overlaps (overlaps fail at once: they are never
//! allowed, not even transiently), the meta range records exactly those descriptors (span,
//! generation, voters), every split key starts a range, no node keeps a replica of a range
//! whose configuration lacks it, and every node holds data replicas. Also the failure report
//! of what the meta range and every replica say.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meridian_client::Client;
use meridian_rpc::dial::Dialer;
use meridian_rpc::node::{RangeStatus, StatusResponse};

use crate::{Failure, NODES, SETTLE_LIMIT, SPLIT_KEYS, net};

/// Waits (within `SETTLE_LIMIT`) until the leaders' ranges tile the key space and the meta range
/// records exactly them; fails with the last discrepancy otherwise. Overlapping leaders or
/// overlapping meta entries fail at once: those are never allowed, not even transiently.
/// Returns the ranges, described for the report.
pub async fn check_ranges_converge(dialer: &Dialer, checker: &Client) -> Result<String, Failure> {
    let started = tokio::time::Instant::now();
    let mut last = String::new();
    while started.elapsed() < SETTLE_LIMIT {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let statuses: Vec<StatusResponse> =
            net::statuses(dialer).await.into_iter().filter_map(|(_, status)| status.ok()).collect();
        let Ok((meta, _)) = checker.ranges().await else {
            last = "the meta range did not answer".into();
            continue;
        };
        let recorded: Vec<Span> = meta
            .iter()
            .map(|descriptor| Span {
                range_id: descriptor.range_id,
                start: descriptor.start.clone(),
                end: descriptor.end.clone(),
                generation: descriptor.generation,
                voters: sorted(&descriptor.voters),
            })
            .collect();
        if let Err(problem) = tiling(&recorded) {
            if problem.contains("overlap") {
                return Err(Failure::Invariant(format!("meta range: {problem}")));
            }
            last = format!("meta range: {problem}");
            continue;
        }
        let leaders = current_leaders(&statuses);
        match tiling(&leaders) {
            Err(problem) if problem.contains("overlap") => {
                return Err(Failure::Invariant(format!("leaders: {problem}")));
            }
            Err(problem) => {
                last = format!("leaders: {problem}");
                continue;
            }
            Ok(()) => {}
        }
        if leaders != recorded {
            last = format!("meta range records {recorded:?}, leaders report {leaders:?}");
            continue;
        }
        let starts: BTreeSet<&[u8]> = leaders.iter().map(|span| span.start.as_slice()).collect();
        if let Some(missing) = SPLIT_KEYS.iter().find(|key| !starts.contains(key.as_bytes())) {
            last = format!("no range starts at {missing}");
            continue;
        }
        let strays = stray_replicas(&statuses);
        if !strays.is_empty() {
            last = format!("removed replicas linger: {}", strays.join(", "));
            continue;
        }
        let holders: BTreeSet<u64> = leaders.iter().flat_map(|span| span.voters.clone()).collect();
        if holders.len() != NODES {
            last = format!("only nodes {holders:?} hold data replicas");
            continue;
        }
        let described: Vec<String> = leaders
            .iter()
            .map(|span| {
                let start = String::from_utf8_lossy(&span.start);
                let end = String::from_utf8_lossy(&span.end);
                format!("[{start:?}, {end:?}) g{} on {:?}", span.generation, span.voters)
            })
            .collect();
        return Ok(described.join(", "));
    }
    let state = diagnose(dialer, checker).await;
    Err(Failure::Liveness(format!(
        "ranges did not converge within {SETTLE_LIMIT:?}: {last}{state}"
    )))
}

/// Describes what the meta range and every node's replicas say, for a failure report.
pub async fn diagnose(dialer: &Dialer, checker: &Client) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let mut lines = Vec::new();
    match checker.ranges().await {
        Ok((descriptors, _)) => {
            for descriptor in descriptors {
                lines.push(format!(
                    "meta: range {} [{:?}, {:?}) g{} c{} voters {:?} learners {:?}",
                    descriptor.range_id,
                    text(&descriptor.start),
                    text(&descriptor.end),
                    descriptor.generation,
                    descriptor.config_index,
                    descriptor.voters,
                    descriptor.learners
                ));
            }
        }
        Err(error) => lines.push(format!("meta: {error}")),
    }
    for (node, status) in net::statuses(dialer).await {
        match status {
            Ok(status) => {
                for range in status.ranges {
                    lines.push(format!(
                        "n{node}: range {} [{:?}, {:?}) g{} {} term {} leader {} applied {} voters {:?} learners {:?}",
                        range.range_id,
                        text(&range.start),
                        text(&range.end),
                        range.generation,
                        range.role,
                        range.term,
                        range.leader,
                        range.applied,
                        range.voters,
                        range.learners
                    ));
                }
            }
            Err(error) => lines.push(format!("n{node}: {error}")),
        }
    }
    format!("\n  state:\n    {}", lines.join("\n    "))
}

/// A range as its leader or the meta range describes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Span {
    range_id: u64,
    start: Vec<u8>,
    end: Vec<u8>,
    generation: u64,
    /// Sorted.
    voters: Vec<u64>,
}

/// Every range's current leader (the one of the highest term), by range id.
pub fn leader_reports(statuses: &[StatusResponse]) -> BTreeMap<u64, &RangeStatus> {
    let mut best: BTreeMap<u64, &RangeStatus> = BTreeMap::new();
    for range in statuses.iter().flat_map(|status| &status.ranges) {
        if range.role == "leader"
            && best.get(&range.range_id).is_none_or(|known| range.term > known.term)
        {
            best.insert(range.range_id, range);
        }
    }
    best
}

/// The data ranges as their current leaders report them (the meta range left out), by start.
fn current_leaders(statuses: &[StatusResponse]) -> Vec<Span> {
    let mut spans: Vec<Span> = leader_reports(statuses)
        .into_values()
        .filter(|range| range.range_id != meridian_node::META_RANGE.0)
        .map(|range| Span {
            range_id: range.range_id,
            start: range.start.clone(),
            end: range.end.clone(),
            generation: range.generation,
            voters: sorted(&range.voters),
        })
        .collect();
    spans.sort_by(|a, b| a.start.cmp(&b.start));
    spans
}

/// The replicas that belong to no current configuration: removed, but not yet destroyed.
fn stray_replicas(statuses: &[StatusResponse]) -> Vec<String> {
    let leaders = leader_reports(statuses);
    let mut strays = Vec::new();
    for status in statuses {
        for range in &status.ranges {
            let member = leaders.get(&range.range_id).is_some_and(|leader| {
                [&leader.voters, &leader.outgoing_voters, &leader.learners]
                    .iter()
                    .any(|members| members.contains(&status.node_id))
            });
            if !member {
                strays.push(format!("n{} holds range {}", status.node_id, range.range_id));
            }
        }
    }
    strays
}

fn sorted(ids: &[u64]) -> Vec<u64> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids
}

/// Checks that `spans` (sorted by start) cover every key exactly once.
fn tiling(spans: &[Span]) -> Result<(), String> {
    let mut expected_start: Vec<u8> = Vec::new();
    for (index, span) in spans.iter().enumerate() {
        if span.start < expected_start {
            return Err(format!("range {} overlaps its predecessor: {spans:?}", span.range_id));
        }
        if span.start > expected_start {
            return Err(format!("no range covers [{expected_start:?}, {:?})", span.start));
        }
        if span.end.is_empty() {
            if index + 1 != spans.len() {
                return Err(format!("range {} is unbounded but not last: overlap", span.range_id));
            }
            return Ok(());
        }
        expected_start = span.end.clone();
    }
    Err(format!("no range covers the keys from {expected_start:?}"))
}

/// Checks that the replicas of every data range hold the same versions in its span: for each
/// range, every replica that applied as far as the leader (and did not change while its engine
/// was read: its status before and after agree) holds exactly the leader's versions. Catches
/// data a replica lost or kept against the log (a snapshot installed over newer data, or over
/// data it should have replaced), even where no read reaches it.
pub async fn check_replicas_agree(
    dialer: &Dialer,
    engines: &[std::sync::Arc<meridian_storage::MemoryEngine>],
) -> Result<(), Failure> {
    type Dump = Vec<meridian_storage::VersionWrite>;
    let ok = |statuses: Vec<(usize, Result<StatusResponse, String>)>| -> Vec<StatusResponse> {
        statuses.into_iter().filter_map(|(_, status)| status.ok()).collect()
    };
    let before = ok(net::statuses(dialer).await);
    let mut dumps: BTreeMap<(u64, u64), Dump> = BTreeMap::new();
    for status in &before {
        let engine = engines[status.node_id as usize - 1].clone();
        let mvcc = meridian_storage::Mvcc::new(engine).map_err(|error| {
            Failure::Liveness(format!("n{}: cannot read the engine: {error}", status.node_id))
        })?;
        for range in status
            .ranges
            .iter()
            .filter(|range| range.range_id != meridian_node::META_RANGE.0 && range.applied > 0)
        {
            let end = (!range.end.is_empty()).then_some(range.end.as_slice());
            let dump = mvcc.dump_span(&range.start, end).map_err(|error| {
                Failure::Liveness(format!("n{}: cannot read the engine: {error}", status.node_id))
            })?;
            dumps.insert((range.range_id, status.node_id), dump);
        }
    }
    let after = ok(net::statuses(dialer).await);
    let state = |statuses: &[StatusResponse], node: u64, range: u64| {
        statuses
            .iter()
            .filter(|status| status.node_id == node)
            .flat_map(|status| &status.ranges)
            .find(|candidate| candidate.range_id == range)
            .map(|range| (range.applied, range.start.clone(), range.end.clone(), range.generation))
    };
    for (range, leader) in leader_reports(&before) {
        let Some(expected) = dumps.get(&(range, leader.leader)) else { continue };
        let stable = |node: u64| {
            let then = state(&before, node, range);
            then.is_some() && then == state(&after, node, range)
        };
        if !stable(leader.leader) {
            continue;
        }
        let leader_state = state(&before, leader.leader, range);
        for ((_, node), dump) in dumps.range((range, 0)..=(range, u64::MAX)) {
            if *node == leader.leader
                || !stable(*node)
                || state(&before, *node, range) != leader_state
            {
                continue;
            }
            if dump != expected {
                let missing: Vec<_> =
                    expected.iter().filter(|version| !dump.contains(version)).collect();
                let extra: Vec<_> =
                    dump.iter().filter(|version| !expected.contains(version)).collect();
                let show = |version: Option<&&meridian_storage::VersionWrite>| {
                    version.map_or("none".to_string(), |version| {
                        format!(
                            "{} = {:?} at {}",
                            String::from_utf8_lossy(&version.key),
                            version.value.as_deref().map(String::from_utf8_lossy),
                            version.commit_ts.as_nanos()
                        )
                    })
                };
                return Err(Failure::Invariant(format!(
                    "replicas of range {range} disagree at the same applied index: n{node} lacks \
                     {} of leader n{}'s versions and holds {} it does not (first lacking: {}; \
                     first extra: {})",
                    missing.len(),
                    leader.leader,
                    extra.len(),
                    show(missing.first()),
                    show(extra.first())
                )));
            }
        }
    }
    Ok(())
}
