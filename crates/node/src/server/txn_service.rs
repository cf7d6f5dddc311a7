//! The `Kv` service's transaction calls: locking reads, commits (one-range, or coordinated
//! two-phase commits), participants' prepares, aborts, rollbacks and heartbeats, and the calls
//! between range leaders — votes and outcomes (see `driver/txn.rs` and `driver/two_phase.rs`
//! for what the leader does with them).

use std::collections::BTreeSet;

use meridian_rpc::kv::{
    SnapshotReadRequest, SnapshotReadResponse, TxnAbortRequest, TxnAbortResponse, TxnCommitRequest,
    TxnCommitResponse, TxnHeader, TxnHeartbeatRequest, TxnHeartbeatResponse, TxnLockWritesRequest,
    TxnLockWritesResponse, TxnOutcomeRequest, TxnOutcomeResponse, TxnPrepareRequest,
    TxnPrepareResponse, TxnReadRequest, TxnReadResponse, TxnRollbackRequest, TxnRollbackResponse,
    TxnVoteRequest, TxnVoteResponse, snapshot_read_request, txn_read_request,
};
use meridian_txn::{LockMode, Priority, RangeId as TxnRangeId, Timestamp, TxnId};

use super::kv_service::{deadline_of, range_of};
use super::*;
use crate::driver::{ReadAt, ScanResult, SnapshotTarget, TxnCommit, TxnLock, TxnPrepare};
use crate::txn_state::{decision_from_wire, decision_to_wire, txn_id_from_wire, writes_from_wire};

/// The most participants one transaction may name.
const MAX_PARTICIPANTS: usize = 10_000;

/// The participants a request names: ranges of user data, each once.
fn participants_of(participants: &[u64]) -> Result<BTreeSet<TxnRangeId>, Status> {
    if participants.len() > MAX_PARTICIPANTS {
        return Err(invalid(format!("more than {MAX_PARTICIPANTS} participants")));
    }
    let set: BTreeSet<TxnRangeId> = participants.iter().map(|id| TxnRangeId(*id)).collect();
    if set.len() != participants.len() {
        return Err(invalid("a participant is named twice"));
    }
    if set.contains(&TxnRangeId(META_RANGE.0)) {
        return Err(invalid("the meta range takes no part in transactions"));
    }
    Ok(set)
}

/// A refusal for a malformed request: it had no effect.
/// A duration in whole microseconds, as replies carry it.
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Records how long a lock request waited at the leader (from its arrival at the service
/// until the driver granted it), and returns it in microseconds for the reply.
fn record_lock_wait(waited: Duration) -> u64 {
    metrics::histogram!("meridian_txn_lock_wait_seconds").record(waited.as_secs_f64());
    micros(waited)
}

fn invalid(message: impl Into<String>) -> Status {
    metadata::not_applied(Status::invalid_argument(message.into()))
}

/// The transaction, priority and epoch a request names.
fn header_of(header: Option<TxnHeader>) -> Result<(TxnId, Priority, Option<u64>), Status> {
    let header = header.ok_or_else(|| invalid("the request names no transaction"))?;
    let txn = txn_id_from_wire(&header.txn).map_err(invalid)?;
    let priority = header.priority.ok_or_else(|| invalid("the request has no priority"))?;
    let priority = Priority {
        start: Timestamp::from_nanos(priority.start),
        first_txn: txn_id_from_wire(&priority.first_txn).map_err(invalid)?,
        attempt: priority.attempt,
    };
    Ok((txn, priority, header.held_since))
}

impl KvApi {
    /// Locks and reads (see `TxnReadRequest`).
    pub(super) async fn txn_read_call(
        &self,
        request: Request<TxnReadRequest>,
    ) -> Result<Response<TxnReadResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let (txn, priority, held_since) = header_of(request.header)?;
        let mode = if request.for_update { LockMode::Exclusive } else { LockMode::Shared };
        let read = request.read.ok_or_else(|| invalid("the request names no key or span"))?;
        let lock = match &read {
            txn_read_request::Read::Key(key) => TxnLock {
                txn,
                priority,
                held_since,
                mode,
                start: key.clone(),
                end: None,
                is_key: true,
            },
            txn_read_request::Read::Scan(scan) => {
                let end = (!scan.end.is_empty()).then(|| scan.end.clone());
                if end.as_ref().is_some_and(|end| *end <= scan.start) {
                    return Err(invalid("the scan's end is not after its start"));
                }
                TxnLock {
                    txn,
                    priority,
                    held_since,
                    mode,
                    start: scan.start.clone(),
                    end,
                    is_key: false,
                }
            }
        };
        let asked = std::time::Instant::now();
        let epoch = self
            .0
            .request("txn lock", deadline, |reply| Event::TxnLock { range, lock, deadline, reply })
            .await?;
        let lock_wait_micros = record_lock_wait(asked.elapsed());
        // The lock is held: the ordinary linearizable read sees every commit before it.
        let mut response =
            TxnReadResponse { epoch, lock_wait_micros, ..TxnReadResponse::default() };
        match read {
            txn_read_request::Read::Key(key) => {
                let (value, timestamp) = self
                    .0
                    .request("txn get", deadline, |reply| {
                        let request = ReadRequest::Get { range, key, reply };
                        Event::Read { request, deadline }
                    })
                    .await?;
                (response.value, response.timestamp) = (value, timestamp);
            }
            txn_read_request::Read::Scan(scan) => {
                let end = (!scan.end.is_empty()).then_some(scan.end);
                let limit = if scan.limit == 0 { 1_000 } else { scan.limit.min(100_000) as usize };
                let ScanResult { rows, resume_key } = self
                    .0
                    .request("txn scan", deadline, |reply| {
                        let request =
                            ReadRequest::Scan { range, start: scan.start, end, limit, reply };
                        Event::Read { request, deadline }
                    })
                    .await?;
                response.rows = rows
                    .into_iter()
                    .map(|(key, value, timestamp)| KeyValue { key, value, timestamp })
                    .collect();
                response.resume_key = resume_key;
            }
        }
        Ok(Response::new(response))
    }

    /// Commits a one-range transaction (see `TxnCommitRequest`).
    pub(super) async fn txn_commit_call(
        &self,
        request: Request<TxnCommitRequest>,
    ) -> Result<Response<TxnCommitResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let (txn, priority, held_since) = header_of(request.header)?;
        let writes = writes_from_wire(&request.writes);
        let participants = participants_of(&request.participants)?;
        let commit = TxnCommit { txn, priority, held_since, writes, participants };
        let asked = std::time::Instant::now();
        let committed = self
            .0
            .request("txn commit", deadline, |reply| Event::TxnCommit {
                range,
                commit,
                deadline,
                reply,
            })
            .await?;
        let logged = asked.elapsed().saturating_sub(committed.commit_wait);
        Ok(Response::new(TxnCommitResponse {
            timestamp: committed.timestamp,
            logged_micros: micros(logged),
            commit_wait_micros: micros(committed.commit_wait),
            epsilon_micros: micros(committed.uncertainty),
        }))
    }

    /// Rolls a transaction back at one range.
    pub(super) async fn txn_rollback_call(
        &self,
        request: Request<TxnRollbackRequest>,
    ) -> Result<Response<TxnRollbackResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let txn = txn_id_from_wire(&request.txn).map_err(invalid)?;
        self.0
            .request("txn rollback", deadline, |reply| Event::TxnRollback { range, txn, reply })
            .await?;
        Ok(Response::new(TxnRollbackResponse {}))
    }

    /// Keeps a transaction's locks at one range.
    pub(super) async fn txn_heartbeat_call(
        &self,
        request: Request<TxnHeartbeatRequest>,
    ) -> Result<Response<TxnHeartbeatResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let txn = txn_id_from_wire(&request.txn).map_err(invalid)?;
        let epoch = request.epoch;
        self.0
            .request("txn heartbeat", deadline, |reply| Event::TxnHeartbeat {
                range,
                txn,
                epoch,
                reply,
            })
            .await?;
        Ok(Response::new(TxnHeartbeatResponse {}))
    }

    /// Locks a transaction's writes before its two-phase commit (see `TxnLockWritesRequest`).
    pub(super) async fn txn_lock_writes_call(
        &self,
        request: Request<TxnLockWritesRequest>,
    ) -> Result<Response<TxnLockWritesResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let (txn, priority, held_since) = header_of(request.header)?;
        let writes =
            request.keys.into_iter().map(|key| meridian_txn::Write { key, value: None }).collect();
        let coordinator = TxnRangeId(range.0);
        let lock = TxnPrepare { txn, priority, held_since, coordinator, writes };
        let asked = std::time::Instant::now();
        let epoch = self
            .0
            .request("txn lock writes", deadline, |reply| Event::TxnLockWrites {
                range,
                lock,
                deadline,
                reply,
            })
            .await?;
        let lock_wait_micros = record_lock_wait(asked.elapsed());
        Ok(Response::new(TxnLockWritesResponse { epoch, lock_wait_micros }))
    }

    /// Prepares a participant's part (see `TxnPrepareRequest`).
    pub(super) async fn txn_prepare_call(
        &self,
        request: Request<TxnPrepareRequest>,
    ) -> Result<Response<TxnPrepareResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let (txn, priority, held_since) = header_of(request.header)?;
        let coordinator = range_of(request.coordinator)?;
        if coordinator == META_RANGE || coordinator == range {
            return Err(invalid(
                "a participant's coordinator is another range of user data (the coordinator's \
                 own part comes with its commit request)",
            ));
        }
        let prepare = TxnPrepare {
            txn,
            priority,
            held_since,
            coordinator: TxnRangeId(coordinator.0),
            writes: writes_from_wire(&request.writes),
        };
        let prepare_ts = self
            .0
            .request("txn prepare", deadline, |reply| Event::TxnPrepare {
                range,
                prepare,
                deadline,
                reply,
            })
            .await?;
        Ok(Response::new(TxnPrepareResponse { prepare_ts }))
    }

    /// Aborts a transaction at its coordinator unless it was decided (see `TxnAbortRequest`).
    pub(super) async fn txn_abort_call(
        &self,
        request: Request<TxnAbortRequest>,
    ) -> Result<Response<TxnAbortResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let txn = txn_id_from_wire(&request.txn).map_err(invalid)?;
        let participants = participants_of(&request.participants)?;
        let reason = if request.reason.is_empty() {
            "its client asked to abort it".to_string()
        } else {
            request.reason.chars().take(1_000).collect()
        };
        let decision = self
            .0
            .request("txn abort", deadline, |reply| Event::TxnAbort {
                range,
                txn,
                participants,
                reason,
                reply,
            })
            .await?;
        Ok(Response::new(TxnAbortResponse { decision: Some(decision_to_wire(&decision)) }))
    }

    /// A participant's vote or status query, between leaders (see `TxnVoteRequest`).
    pub(super) async fn txn_vote_call(
        &self,
        request: Request<TxnVoteRequest>,
    ) -> Result<Response<TxnVoteResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let txn = txn_id_from_wire(&request.txn).map_err(invalid)?;
        let participant = range_of(request.participant)?;
        if participant == range {
            // A coordinator's own part votes inside its node, never through a call.
            return Err(invalid("a vote names the coordinator's own range as participant"));
        }
        let participant = TxnRangeId(participant.0);
        if request.prepare_ts == 0 {
            return Err(invalid("a vote without a prepare timestamp"));
        }
        let (prepare_ts, query) = (Timestamp::from_nanos(request.prepare_ts), request.query);
        self.0
            .request("txn vote", deadline, |reply| Event::TxnVote {
                range,
                txn,
                participant,
                prepare_ts,
                query,
                reply,
            })
            .await?;
        Ok(Response::new(TxnVoteResponse {}))
    }

    /// A coordinator's decision, between leaders (see `TxnOutcomeRequest`).
    pub(super) async fn txn_outcome_call(
        &self,
        request: Request<TxnOutcomeRequest>,
    ) -> Result<Response<TxnOutcomeResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let txn = txn_id_from_wire(&request.txn).map_err(invalid)?;
        let decision = decision_from_wire(request.decision.as_ref()).map_err(invalid)?;
        self.0
            .request("txn outcome", deadline, |reply| Event::TxnOutcome {
                range,
                txn,
                decision,
                reply,
            })
            .await?;
        Ok(Response::new(TxnOutcomeResponse {}))
    }

    /// Reads at a timestamp without locks (see `SnapshotReadRequest`).
    pub(super) async fn snapshot_read_call(
        &self,
        request: Request<SnapshotReadRequest>,
    ) -> Result<Response<SnapshotReadResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let range = range_of(request.range_id)?;
        let target = match request.read.ok_or_else(|| invalid("the read names no key or span"))? {
            snapshot_read_request::Read::Key(key) => SnapshotTarget::Key(key),
            snapshot_read_request::Read::Scan(scan) => {
                let end = (!scan.end.is_empty()).then_some(scan.end);
                if end.as_ref().is_some_and(|end| *end <= scan.start) {
                    return Err(invalid("the scan's end is not after its start"));
                }
                let limit = if scan.limit == 0 { 1_000 } else { scan.limit.min(100_000) as usize };
                SnapshotTarget::Scan { start: scan.start, end, limit }
            }
        };
        let at = match request.at {
            None => ReadAt::Now,
            Some(snapshot_read_request::At::Exact(0)) => {
                return Err(invalid("a read at timestamp 0"));
            }
            Some(snapshot_read_request::At::Exact(t)) => ReadAt::Exact(Timestamp::from_nanos(t)),
            Some(snapshot_read_request::At::MaxStalenessNanos(nanos)) => {
                ReadAt::MaxStaleness(std::time::Duration::from_nanos(nanos))
            }
        };
        let result = self
            .0
            .request("snapshot read", deadline, |reply| Event::SnapshotRead {
                range,
                target,
                at,
                follower: request.follower,
                deadline,
                reply,
            })
            .await?;
        Ok(Response::new(SnapshotReadResponse {
            timestamp: result.timestamp,
            value: result.value,
            version_timestamp: result.version_timestamp,
            rows: result
                .rows
                .into_iter()
                .map(|(key, value, timestamp)| KeyValue { key, value, timestamp })
                .collect(),
            resume_key: result.resume_key,
        }))
    }
}
