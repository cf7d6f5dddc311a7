//! Read-write transactions, as the transaction layer's clients (SQL gateways) use them.
//!
//! A [`Transaction`] reads under locks at the leaders of the ranges it touches (shared locks,
//! exclusive ones for reads for update, span locks for scans), buffers its writes, and
//! commits them. Locks are held until the transaction ends, so transactions are serializable;
//! the commit timestamp is acknowledged only after commit-wait, so they are externally
//! consistent. Reads see the transaction's own buffered writes.
//!
//! - **Priority.** Wound-wait orders transactions by their first start: a retry made with
//!   [`Transaction::retry`] keeps its transaction's priority (with the next attempt number), so
//!   it ages and eventually wins.
//! - **Errors.** [`TxnError::Retry`] means the transaction was aborted (wounded by an older
//!   one, or its locks were lost to a leader change or to inactivity): roll back and retry it.
//!   A commit whose outcome is unknown fails with [`ClientError::Ambiguous`] inside
//!   [`TxnError::Client`]; it is never retried blindly.
//! - **Epochs.** Each range's answers carry the leadership epoch the lock was taken under; the
//!   transaction names it in its later requests there, so that a leader whose table no longer
//!   holds its locks refuses it instead of letting it commit on reads it no longer protects.
//!
//! - **Commits.** A transaction whose locks and writes are at one range commits in one Raft
//!   write there; one over several ranges commits by two-phase commit, coordinated by the
//!   range of its first write. If a two-phase commit's answer is lost, the client asks the
//!   coordinator to abort, which answers the decision logged first: the commit is reported
//!   ambiguous only if the coordinator cannot be reached either.
//! - **Heartbeats.** While it is open, a task tells the leaders holding its locks that it is
//!   alive every [`ClientOptions::heartbeat_interval`](crate::ClientOptions) (leaders
//!   release the locks of a transaction silent for 5 s); it stops when the transaction
//!   finishes or is dropped.
//! - **Reports.** After a commit, [`Transaction::report`] tells what it did and where its time
//!   went: participants, lock waits, prepare, the leader's commit-wait and ε.
//!
//! Read-only and stale transactions are in `read_only.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use meridian_rpc::kv::{
    RangeDescriptor, TxnAbortRequest, TxnCommitRequest, TxnCommitResponse, TxnDecision, TxnHeader,
    TxnHeartbeatRequest, TxnLockWritesRequest, TxnOutcomeRequest, TxnPrepareRequest, TxnPriority,
    TxnReadRequest, TxnReadResponse, TxnRollbackRequest, TxnVoteRequest, TxnWrite,
    txn_read_request,
};
use meridian_rpc::metadata;
use parking_lot::Mutex;
use tonic::Status;

/// A retryable refusal made here, before anything is sent (it had no effect).
fn retry_status(message: String) -> Status {
    let mut status = Status::aborted(message);
    status.metadata_mut().insert(metadata::ERROR_KIND, metadata::TXN_RETRY.parse().expect("ascii"));
    metadata::not_applied(status)
}

use crate::{Client, ClientError, Kind, error_kind, scan_pages};

/// Why a transaction's operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The transaction was aborted and may be retried (SQLSTATE 40001): wounded by an older
    /// transaction, or its locks were lost. The message names the reason.
    #[error("transaction aborted, retry it: {0}")]
    Retry(String),
    /// The cluster refused the request, or its outcome is unknown ([`ClientError`]).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The transaction committed or rolled back already; begin or retry another.
    #[error("the transaction is finished")]
    Finished,
}

impl TxnError {
    /// Whether the transaction may be retried.
    pub fn is_retryable(&self) -> bool {
        matches!(self, TxnError::Retry(_))
    }

    fn from_client(error: ClientError) -> TxnError {
        match &error {
            ClientError::Status(status) if error_kind(status) == Some(metadata::TXN_RETRY) => {
                TxnError::Retry(status.message().to_string())
            }
            _ => TxnError::Client(error),
        }
    }
}

/// A read-write transaction (see the module documentation). Dropping one without committing
/// or rolling back leaves its locks until the leaders time them out.
pub struct Transaction<'a> {
    client: &'a Client,
    id: u128,
    priority: TxnPriority,
    /// The ranges it holds locks at: their descriptor, and the epoch of the locks.
    ranges: BTreeMap<u64, (RangeDescriptor, u64)>,
    /// Buffered writes: a value, or `None` for a delete.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Whether it committed or rolled back (or tried to).
    finished: bool,
    /// What its heartbeat task keeps alive: each range's start key and lock epoch.
    heartbeats: Arc<Mutex<BTreeMap<u64, (Vec<u8>, u64)>>>,
    /// The heartbeat task, once it holds a lock somewhere; stopped when it finishes.
    heartbeat_task: Option<tokio::task::AbortHandle>,
    /// How long its lock requests waited at the leaders so far.
    lock_wait: Duration,
    /// Its commit's report, once it committed.
    report: Option<CommitReport>,
}

/// What a committed transaction did and where its commit's time went
/// ([`Transaction::report`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// The commit timestamp; `None` for a transaction that wrote nothing (its commit checked
    /// that its locks were still held and released them).
    pub timestamp: Option<u64>,
    /// The ranges that took part (held its locks or writes).
    pub participants: Vec<u64>,
    /// The range that coordinated its two-phase commit, if it needed one.
    pub coordinator: Option<u64>,
    /// How long its lock requests waited at the leaders, in total: reads, and a two-phase
    /// commit's round taking the write locks.
    pub lock_wait: Duration,
    /// For a two-phase commit: from sending the prepares until the last participant other
    /// than the coordinator answered prepared, as the client saw it.
    pub prepare: Option<Duration>,
    /// What the leader that committed it measured, when its answer arrived (a commit whose
    /// answer was lost and that was learned from the coordinator later has none).
    pub leader: Option<LeaderTimings>,
    /// The commit call, from its start to its answer, as the client saw it.
    pub latency: Duration,
}

/// A commit's timings at the leader that logged it (the coordinator, for a two-phase commit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaderTimings {
    /// From the commit request's arrival until the commit was logged: one Raft write for a
    /// one-range commit; the coordinator's own prepare, the votes and the decision record
    /// for a two-phase commit.
    pub logged: Duration,
    /// Commit-wait: from then until `after(commit_ts)` held on the leader's clock.
    pub commit_wait: Duration,
    /// The leader clock's uncertainty ε when commit-wait ended.
    pub epsilon: Duration,
}

impl LeaderTimings {
    fn from_wire(response: &TxnCommitResponse) -> LeaderTimings {
        LeaderTimings {
            logged: Duration::from_micros(response.logged_micros),
            commit_wait: Duration::from_micros(response.commit_wait_micros),
            epsilon: Duration::from_micros(response.epsilon_micros),
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        self.stop_heartbeats();
    }
}

/// SplitMix64's output function: a well-mixed 64 bits from a counter.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Client {
    /// A new transaction id: random, so that gateways need no coordination (or the next one
    /// drawn from [`ClientOptions::txn_id_seed`]).
    fn new_txn_id(&self) -> u128 {
        let Some(seed) = self.options.txn_id_seed else { return rand::random::<u128>() };
        let drawn = self.txn_ids_drawn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let state = seed.wrapping_add(drawn.wrapping_mul(2).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        (u128::from(mix(state)) << 64) | u128::from(mix(state ^ 0x5851_F42D_4C95_7F2D))
    }

    /// Begins a read-write transaction.
    pub fn begin(&self) -> Transaction<'_> {
        let id = self.new_txn_id();
        let start = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let priority = TxnPriority { start, first_txn: id.to_be_bytes().to_vec(), attempt: 0 };
        Transaction {
            client: self,
            id,
            priority,
            ranges: BTreeMap::new(),
            writes: BTreeMap::new(),
            finished: false,
            heartbeats: Arc::default(),
            heartbeat_task: None,
            lock_wait: Duration::ZERO,
            report: None,
        }
    }
}

/// How a transaction ended, as its coordinator logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Committed at this timestamp.
    Committed(u64),
    /// Aborted, for this reason.
    Aborted(String),
}

impl Client {
    /// Sends a participant's vote — or, with `query`, a prepared participant's status query —
    /// to the leader of the coordinating range `coordinator` (nodes use this; retried until
    /// it arrives or the deadline passes: a vote counts once).
    ///
    /// # Errors
    ///
    /// [`ClientError`] when no attempt succeeds in time.
    pub async fn txn_vote(
        &self,
        coordinator: u64,
        txn: u128,
        participant: u64,
        prepare_ts: u64,
        query: bool,
    ) -> Result<(), ClientError> {
        self.on_range_id(coordinator, Kind::Idempotent, |mut node| {
            let request = TxnVoteRequest {
                range_id: coordinator,
                txn: txn.to_be_bytes().to_vec(),
                participant,
                prepare_ts,
                query,
            };
            async move { node.txn_vote(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Sends a coordinator's decision to the leader of participant `participant`, which logs
    /// it as the transaction's outcome (nodes use this; an outcome applies once).
    ///
    /// # Errors
    ///
    /// [`ClientError`] when no attempt succeeds in time.
    pub async fn txn_outcome(
        &self,
        participant: u64,
        txn: u128,
        decision: TxnDecision,
    ) -> Result<(), ClientError> {
        self.on_range_id(participant, Kind::Idempotent, |mut node| {
            let request = TxnOutcomeRequest {
                range_id: participant,
                txn: txn.to_be_bytes().to_vec(),
                decision: Some(decision.clone()),
            };
            async move { node.txn_outcome(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Asks the coordinator `coordinator` of transaction `txn` to abort it, unless a decision
    /// was logged first; returns the decision in effect (a commit only after commit-wait).
    /// Asking again is harmless, so this also settles a commit whose outcome was unknown.
    ///
    /// # Errors
    ///
    /// [`ClientError`] when no attempt succeeds in time.
    pub async fn txn_abort(
        &self,
        coordinator: u64,
        txn: u128,
        participants: &[u64],
        reason: &str,
    ) -> Result<TxnOutcome, ClientError> {
        let response = self
            .on_range_id(coordinator, Kind::Idempotent, |mut node| {
                let request = TxnAbortRequest {
                    range_id: coordinator,
                    txn: txn.to_be_bytes().to_vec(),
                    participants: participants.to_vec(),
                    reason: reason.to_string(),
                };
                async move { node.txn_abort(request).await }
            })
            .await?;
        match response.decision {
            Some(TxnDecision { commit: true, commit_ts, .. }) => {
                Ok(TxnOutcome::Committed(commit_ts))
            }
            Some(TxnDecision { commit: false, abort_reason, .. }) => {
                Ok(TxnOutcome::Aborted(abort_reason))
            }
            None => Err(ClientError::Status(Status::internal(
                "the coordinator answered an abort without a decision",
            ))),
        }
    }
}

impl<'a> Transaction<'a> {
    /// The transaction's id (each attempt has its own).
    pub fn id(&self) -> u128 {
        self.id
    }

    /// Rolls this attempt back (unless it finished already) and begins the next one with the
    /// same priority: call it after [`TxnError::Retry`], from an operation or from the commit.
    pub async fn retry(mut self) -> Transaction<'a> {
        if !self.finished {
            let _ = self.rollback().await;
        }
        let mut priority = self.priority.clone();
        priority.attempt += 1;
        Transaction {
            client: self.client,
            id: self.client.new_txn_id(),
            priority,
            ranges: BTreeMap::new(),
            writes: BTreeMap::new(),
            finished: false,
            heartbeats: Arc::default(),
            heartbeat_task: None,
            lock_wait: Duration::ZERO,
            report: None,
        }
    }

    /// The report of its commit, once [`Transaction::commit`] succeeded.
    pub fn report(&self) -> Option<&CommitReport> {
        self.report.as_ref()
    }

    /// Marks the transaction finished: no more heartbeats (a prepared part never expires,
    /// and a part that failed is released by its rollback or its leader's timeout).
    fn finish(&mut self) {
        self.finished = true;
        self.stop_heartbeats();
    }

    fn stop_heartbeats(&mut self) {
        if let Some(task) = self.heartbeat_task.take() {
            task.abort();
        }
    }

    /// Starts the task that keeps the transaction's locks from being released as abandoned
    /// while it stays open (a client thinking between statements), once it holds one.
    fn start_heartbeats(&mut self) {
        if self.heartbeat_task.is_some() {
            return;
        }
        let (client, ranges) = (self.client.clone(), self.heartbeats.clone());
        let txn = self.id.to_be_bytes().to_vec();
        let interval = client.options.heartbeat_interval;
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let targets: Vec<(u64, Vec<u8>, u64)> = ranges
                    .lock()
                    .iter()
                    .map(|(range, (start, epoch))| (*range, start.clone(), *epoch))
                    .collect();
                for (range_id, start, epoch) in targets {
                    let result = client
                        .on_range(&start, Kind::Idempotent, |mut node, routed| {
                            let request =
                                TxnHeartbeatRequest { range_id: routed, txn: txn.clone(), epoch };
                            async move { node.txn_heartbeat(request).await }
                        })
                        .await;
                    if let Err(error) = result {
                        // The transaction's next request there finds out what happened.
                        tracing::debug!(range = range_id, %error, "a heartbeat failed");
                    }
                }
            }
        });
        self.heartbeat_task = Some(task.abort_handle());
    }

    fn check_open(&self) -> Result<(), TxnError> {
        if self.finished { Err(TxnError::Finished) } else { Ok(()) }
    }

    fn header(&self, range_id: u64) -> TxnHeader {
        TxnHeader {
            txn: self.id.to_be_bytes().to_vec(),
            priority: Some(self.priority.clone()),
            held_since: self.ranges.get(&range_id).map(|(_, epoch)| *epoch),
        }
    }

    /// Locks and reads at the range holding `key`; records the range's epoch.
    async fn locked_read(
        &mut self,
        key: &[u8],
        for_update: bool,
        read: txn_read_request::Read,
    ) -> Result<TxnReadResponse, TxnError> {
        self.check_open()?;
        let used = AtomicU64::new(0);
        let this = &*self;
        // Asking again for a lock already held is harmless, so lock requests retry like reads.
        let response = this
            .client
            .on_range(key, Kind::Idempotent, |mut node, range_id| {
                used.store(range_id, Ordering::Relaxed);
                let request = TxnReadRequest {
                    range_id,
                    header: Some(this.header(range_id)),
                    for_update,
                    read: Some(read.clone()),
                };
                async move { node.txn_read(request).await }
            })
            .await
            .map_err(TxnError::from_client)?;
        let range_id = used.load(Ordering::Relaxed);
        self.lock_wait += Duration::from_micros(response.lock_wait_micros);
        if !self.ranges.contains_key(&range_id) {
            let descriptor = self.client.route(key).await?;
            let start = descriptor.start.clone();
            self.ranges.insert(range_id, (descriptor, response.epoch));
            self.heartbeats.lock().insert(range_id, (start, response.epoch));
            self.start_heartbeats();
        }
        Ok(response)
    }

    /// Reads `key` under a shared lock (its own buffered write, if any).
    ///
    /// # Errors
    ///
    /// [`TxnError::Retry`] when the transaction must retry, [`TxnError::Client`] otherwise.
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, TxnError> {
        self.get_locked(key, false).await
    }

    /// Reads `key` under an exclusive lock, as before updating it (`SELECT ... FOR UPDATE`).
    ///
    /// # Errors
    ///
    /// As [`Transaction::get`].
    pub async fn get_for_update(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, TxnError> {
        self.get_locked(key, true).await
    }

    async fn get_locked(
        &mut self,
        key: &[u8],
        for_update: bool,
    ) -> Result<Option<Vec<u8>>, TxnError> {
        let response =
            self.locked_read(key, for_update, txn_read_request::Read::Key(key.to_vec())).await?;
        Ok(match self.writes.get(key) {
            Some(buffered) => buffered.clone(),
            None => response.value,
        })
    }

    /// Returns up to `limit` keys in `[start, end)` (no upper bound if `end` is `None`) with
    /// their values, under shared span locks (no row can appear in the span before the
    /// transaction ends), including its own buffered writes.
    ///
    /// # Errors
    ///
    /// As [`Transaction::get`].
    pub async fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, TxnError> {
        let in_span = |key: &[u8]| key >= start && end.is_none_or(|end| key < end);
        // Buffered deletes may hide stored rows: fetch enough to fill the limit anyway.
        let hidden =
            self.writes.iter().filter(|(key, value)| value.is_none() && in_span(key)).count();
        let fetch = limit.saturating_add(hidden);
        let mut rows = scan_pages(start, end, fetch, async |from: Vec<u8>, scan| {
            let response =
                self.locked_read(&from, false, txn_read_request::Read::Scan(scan)).await?;
            Ok::<_, TxnError>((response.rows, response.resume_key))
        })
        .await?;
        for (key, value) in self.writes.iter().filter(|(key, _)| in_span(key)) {
            match value {
                Some(value) => rows.insert(key.clone(), value.clone()),
                None => rows.remove(key),
            };
        }
        Ok(rows.into_iter().take(limit).collect())
    }

    /// Buffers a write of `value` under `key`.
    ///
    /// # Errors
    ///
    /// [`TxnError::Finished`] after a commit or rollback.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), TxnError> {
        self.check_open()?;
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    /// Buffers a delete of `key`.
    ///
    /// # Errors
    ///
    /// [`TxnError::Finished`] after a commit or rollback.
    pub fn delete(&mut self, key: &[u8]) -> Result<(), TxnError> {
        self.check_open()?;
        self.writes.insert(key.to_vec(), None);
        Ok(())
    }

    /// Commits: the writes apply at one timestamp, returned after commit-wait (`None` for a
    /// transaction that wrote nothing: it checks that it still held every lock, then releases
    /// them). The transaction is finished
    /// either way; after [`TxnError::Retry`], [`Transaction::retry`] begins the next attempt.
    ///
    /// # Errors
    ///
    /// [`TxnError::Retry`] when the transaction must retry (it was rolled back);
    /// [`TxnError::Client`] with [`ClientError::Ambiguous`] when the outcome is unknown.
    pub async fn commit(&mut self) -> Result<Option<u64>, TxnError> {
        let started = Instant::now();
        let mut report = CommitReport::default();
        let timestamp = self.commit_reporting(&mut report).await?;
        report.timestamp = timestamp;
        report.lock_wait = self.lock_wait;
        report.latency = started.elapsed();
        self.report = Some(report);
        Ok(timestamp)
    }

    async fn commit_reporting(
        &mut self,
        report: &mut CommitReport,
    ) -> Result<Option<u64>, TxnError> {
        self.check_open()?;
        report.participants = self.ranges.keys().copied().collect();
        if self.writes.is_empty() {
            // Its reads are serializable only if it still held every lock when it ended: a
            // wound or a lost leadership since its last read would have released one.
            let validated = self.validate_locks().await;
            self.rollback().await?;
            return validated.map(|()| None);
        }
        // Each participant's writes, by range: the ranges holding the writes, and every
        // range it locked at (whose locks the prepare checks). A part is routed by its first
        // write (a split since the route was cached then shows as another range).
        let mut parts: BTreeMap<u64, (Vec<u8>, Vec<TxnWrite>)> = BTreeMap::new();
        for (key, value) in &self.writes {
            let descriptor = self.client.route(key).await?;
            let write = TxnWrite { key: key.clone(), value: value.clone() };
            parts
                .entry(descriptor.range_id)
                .or_insert_with(|| (key.clone(), Vec::new()))
                .1
                .push(write);
        }
        for (range_id, (descriptor, _)) in &self.ranges {
            parts.entry(*range_id).or_insert_with(|| (descriptor.start.clone(), Vec::new()));
        }
        report.participants = parts.keys().copied().collect();
        if parts.len() > 1 {
            return self.commit_two_phase(parts, report).await;
        }
        let writes: Vec<TxnWrite> = self
            .writes
            .iter()
            .map(|(key, value)| TxnWrite { key: key.clone(), value: value.clone() })
            .collect();
        let first_key = self.writes.keys().next().expect("not empty").clone();
        let this = &*self;
        let result = this
            .client
            .on_range(&first_key, Kind::Write, |mut node, range_id| {
                // A range it never locked at, while it holds locks elsewhere: the keys moved
                // (a split) since it read them, and fresh locks there would not protect those
                // reads.
                let moved = (!this.ranges.is_empty() && !this.ranges.contains_key(&range_id))
                    .then(|| retry_status(format!("range {range_id} split since it was read")));
                let request = TxnCommitRequest {
                    range_id,
                    header: Some(this.header(range_id)),
                    writes: writes.clone(),
                    participants: Vec::new(),
                };
                async move {
                    match moved {
                        Some(status) => Err(status),
                        None => node.txn_commit(request).await,
                    }
                }
            })
            .await;
        self.finish();
        match result {
            Ok(response) => {
                report.leader = Some(LeaderTimings::from_wire(&response));
                Ok(Some(response.timestamp))
            }
            Err(error) => {
                let error = TxnError::from_client(error);
                if !matches!(&error, TxnError::Client(ClientError::Ambiguous(_))) {
                    // Refused: release whatever is still held.
                    let _ = self.rollback().await;
                }
                Err(error)
            }
        }
    }

    /// Commits over several ranges by two-phase commit: first every write's lock at every
    /// range (`lock_writes`); then the range of the first write coordinates, and every other
    /// participant is asked to prepare at the same time as the coordinator is asked to
    /// commit. A participant that refuses makes the client ask the coordinator to
    /// abort; the coordinator's answer is the outcome. If that answer is unknown (a timeout,
    /// a leader change), the client asks the coordinator to abort, which answers the decision
    /// logged first: the outcome is ambiguous only if that fails too.
    async fn commit_two_phase(
        &mut self,
        parts: BTreeMap<u64, (Vec<u8>, Vec<TxnWrite>)>,
        report: &mut CommitReport,
    ) -> Result<Option<u64>, TxnError> {
        // Heartbeats go on through the lock round, which may wait for locks.
        self.finished = true;
        let result = self.two_phase(parts, report).await;
        self.stop_heartbeats();
        result
    }

    async fn two_phase(
        &mut self,
        parts: BTreeMap<u64, (Vec<u8>, Vec<TxnWrite>)>,
        report: &mut CommitReport,
    ) -> Result<Option<u64>, TxnError> {
        self.start_heartbeats();
        if let Err(error) = self.lock_writes(&parts).await {
            self.release_unrecorded(&parts).await;
            let _ = self.release_all().await;
            return Err(error);
        }
        let coordinator = parts
            .iter()
            .find(|(_, (_, writes))| !writes.is_empty())
            .map(|(range_id, _)| *range_id)
            .expect("a transaction with writes");
        report.coordinator = Some(coordinator);
        let participants: Vec<u64> = parts.keys().copied().collect();
        let this = &*self;
        // A request routed to another range than planned: the range split since the writes
        // were routed (or since it was read); the transaction aborts and retries.
        let moved = |planned: u64, routed: u64| {
            (routed != planned).then(|| {
                retry_status(format!("range {planned} split since the commit was planned"))
            })
        };
        let commit = async {
            let (start, writes) = &parts[&coordinator];
            this.client
                .on_range(start, Kind::Write, |mut node, routed| {
                    let moved = moved(coordinator, routed);
                    let request = TxnCommitRequest {
                        range_id: routed,
                        header: Some(this.header(routed)),
                        writes: writes.clone(),
                        participants: participants.clone(),
                    };
                    async move {
                        match moved {
                            Some(status) => Err(status),
                            None => node.txn_commit(request).await,
                        }
                    }
                })
                .await
        };
        let prepares = async {
            let started = Instant::now();
            let prepares = parts.iter().filter(|(range_id, _)| **range_id != coordinator).map(
                |(range_id, (start, writes))| {
                    let range_id = *range_id;
                    this.client.on_range(start, Kind::Write, move |mut node, routed| {
                        let moved = moved(range_id, routed);
                        let request = TxnPrepareRequest {
                            range_id: routed,
                            header: Some(this.header(routed)),
                            coordinator,
                            writes: writes.clone(),
                        };
                        async move {
                            match moved {
                                Some(status) => Err(status),
                                None => node.txn_prepare(request).await,
                            }
                        }
                    })
                },
            );
            let mut prepares: FuturesUnordered<_> = prepares.collect();
            let mut prepared = true;
            while let Some(result) = prepares.next().await {
                prepared &= result.is_ok();
                if let Err(error) = result
                    && !error.is_ambiguous()
                {
                    // A participant refused: the coordinator cannot commit without its vote.
                    // (The others learn the abort from the coordinator.)
                    let reason = format!("a participant could not prepare: {error}");
                    let _ =
                        this.client.txn_abort(coordinator, this.id, &participants, &reason).await;
                    break;
                }
            }
            prepared.then(|| started.elapsed())
        };
        let (committed, prepare) = tokio::join!(commit, prepares);
        report.prepare = prepare;
        let error = match committed {
            Ok(response) => {
                report.leader = Some(LeaderTimings::from_wire(&response));
                return Ok(Some(response.timestamp));
            }
            Err(error) => TxnError::from_client(error),
        };
        if !matches!(&error, TxnError::Client(ClientError::Ambiguous(_))) {
            // Refused or aborted: no commit can be logged. Parts prepared meanwhile learn the
            // abort from the coordinator (at once, rather than by their status queries), and
            // what else is held is released.
            let reason = format!("its commit request failed: {error}");
            let abort = self.client.txn_abort(coordinator, self.id, &participants, &reason).await;
            if let Ok(TxnOutcome::Committed(timestamp)) = abort {
                return Ok(Some(timestamp));
            }
            let _ = self.release_all().await;
            return Err(error);
        }
        // The commit's answer was lost: the coordinator's log has the decision, or the
        // transaction aborts now.
        let reason = "its client lost track of the commit";
        match self.client.txn_abort(coordinator, self.id, &participants, reason).await {
            Ok(TxnOutcome::Committed(timestamp)) => Ok(Some(timestamp)),
            Ok(TxnOutcome::Aborted(reason)) => {
                let _ = self.release_all().await;
                Err(TxnError::Retry(format!(
                    "its coordinator aborted it: {reason} (the commit's answer was lost: {error})"
                )))
            }
            Err(_) => Err(error),
        }
    }

    /// Takes the exclusive locks of every write, at every range at once, waiting for them as
    /// locking reads do; records each range's epoch. A part then prepares without waiting for
    /// a lock, so that no transaction waits for a lock at one range while prepared at another
    /// (an older transaction waiting for its prepared locks would wait for ever: wound-wait
    /// cannot wound a prepared transaction).
    async fn lock_writes(
        &mut self,
        parts: &BTreeMap<u64, (Vec<u8>, Vec<TxnWrite>)>,
    ) -> Result<(), TxnError> {
        let this = &*self;
        let requests = parts.iter().filter(|(_, (_, writes))| !writes.is_empty()).map(
            |(range_id, (start, writes))| {
                let (range_id, keys) = (*range_id, writes.iter().map(|w| w.key.clone()).collect());
                async move {
                    let keys: Vec<Vec<u8>> = keys;
                    let response = this
                        .client
                        .on_range(start, Kind::Idempotent, |mut node, routed| {
                            let moved = (routed != range_id).then(|| {
                                retry_status(format!(
                                    "range {range_id} split since the commit was planned"
                                ))
                            });
                            let request = TxnLockWritesRequest {
                                range_id: routed,
                                header: Some(this.header(routed)),
                                keys: keys.clone(),
                            };
                            async move {
                                match moved {
                                    Some(status) => Err(status),
                                    None => node.txn_lock_writes(request).await,
                                }
                            }
                        })
                        .await;
                    (range_id, start.clone(), response)
                }
            },
        );
        // Locks granted early are kept alive while others are still waited for.
        let mut requests: FuturesUnordered<_> = requests.collect();
        let (mut granted, mut failure) = (Vec::new(), None::<TxnError>);
        let mut lock_wait = Duration::ZERO;
        while let Some((range_id, start, response)) = requests.next().await {
            match response {
                Ok(response) => {
                    if !this.ranges.contains_key(&range_id) {
                        this.heartbeats.lock().insert(range_id, (start.clone(), response.epoch));
                    }
                    lock_wait += Duration::from_micros(response.lock_wait_micros);
                    granted.push((range_id, start, response.epoch));
                }
                Err(error) => {
                    let error = TxnError::from_client(error);
                    // An abort (wounded, locks lost) ends the wait for the others at once.
                    let abort = error.is_retryable();
                    if failure.as_ref().is_none_or(|failure| !failure.is_retryable()) {
                        failure = Some(error);
                    }
                    if abort {
                        break;
                    }
                }
            }
        }
        drop(requests);
        self.lock_wait += lock_wait;
        for (range_id, start, epoch) in granted {
            // The range as the locks were routed to it: its id and a key in it.
            let descriptor = RangeDescriptor { range_id, start, ..RangeDescriptor::default() };
            self.ranges.entry(range_id).or_insert((descriptor, epoch));
        }
        failure.map_or(Ok(()), Err)
    }

    /// Releases the transaction's locks at ranges it asked for write locks but does not know
    /// it holds them at (a request that failed or was given up may still be queued there).
    async fn release_unrecorded(&self, parts: &BTreeMap<u64, (Vec<u8>, Vec<TxnWrite>)>) {
        for (range_id, (start, writes)) in parts {
            if writes.is_empty() || self.ranges.contains_key(range_id) {
                continue;
            }
            let txn = self.id.to_be_bytes().to_vec();
            let _ = self
                .client
                .on_range(start, Kind::Idempotent, |mut node, routed| {
                    let request = TxnRollbackRequest { range_id: routed, txn: txn.clone() };
                    async move { node.txn_rollback(request).await }
                })
                .await;
        }
    }

    /// Checks that every lock the transaction took is still held (a heartbeat under its
    /// epoch at each range).
    async fn validate_locks(&self) -> Result<(), TxnError> {
        for (descriptor, epoch) in self.ranges.values() {
            let txn = self.id.to_be_bytes().to_vec();
            let epoch = *epoch;
            let range_id = descriptor.range_id;
            self.client
                .on_range(&descriptor.start, Kind::Idempotent, |mut node, routed| {
                    let moved = (routed != range_id)
                        .then(|| retry_status(format!("range {range_id} split since it was read")));
                    let request = TxnHeartbeatRequest { range_id: routed, txn: txn.clone(), epoch };
                    async move {
                        match moved {
                            Some(status) => Err(status),
                            None => node.txn_heartbeat(request).await,
                        }
                    }
                })
                .await
                .map_err(TxnError::from_client)?;
        }
        Ok(())
    }

    /// Rolls back: releases the transaction's locks at every range it touched; the
    /// transaction is finished.
    ///
    /// # Errors
    ///
    /// The first range that could not be told ([`TxnError::Client`]); its leader releases the
    /// locks after its abandonment timeout anyway.
    pub async fn rollback(&mut self) -> Result<(), TxnError> {
        self.finish();
        self.release_all().await
    }

    /// Releases the transaction's locks at every range it touched (not where it is
    /// prepared: only its outcome ends it there).
    async fn release_all(&self) -> Result<(), TxnError> {
        let mut first_error = None;
        for (range_id, (descriptor, _)) in &self.ranges {
            let txn = self.id.to_be_bytes().to_vec();
            let result = self
                .client
                .on_range(&descriptor.start, Kind::Idempotent, |mut node, routed| {
                    let request = TxnRollbackRequest { range_id: routed, txn: txn.clone() };
                    async move { node.txn_rollback(request).await }
                })
                .await;
            if let Err(error) = result
                && first_error.is_none()
            {
                tracing::debug!(range = range_id, %error, "rollback failed");
                first_error = Some(TxnError::from_client(error));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
