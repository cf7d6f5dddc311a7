//! A seeded simulation of strictly serializable read-write transactions across ranges: every
//! pure core of the transaction protocol together.
//!
//! Three ranges split sixteen single-byte keys. Each range has a leader with a [`LockTable`],
//! a [`Coordinator`], a replicated [`PreparedSet`], a timestamp floor and a clock skewed
//! within ±ε of true time; records it proposes apply after a short delay, as through Raft.
//! Clients run random transactions (reads, reads for update, scans, buffered writes and
//! deletes) that lock at the ranges they touch, then commit: the lowest participating range
//! coordinates; the client asks it to commit, naming every participant, and asks each of them
//! — the coordinator's range too — to prepare (check its locks, pick a prepare timestamp, log
//! a prepare record, vote). The coordinator logs the decision, which resolves its own part; the client hears a commit only after commit-wait
//! (`after(s)` on the coordinator's clock); participants log the outcome, apply the writes at
//! `s` and release. Messages between ranges are delayed and sometimes lost (status queries
//! and re-notification recover them).
//!
//! Faults: wounds, clients that go silent, lost rollbacks, lost messages, clients that give
//! up waiting for their commit and ask for an abort while the commit record may be in flight
//! (the first record logged decides), and leader changes
//! at any range — each record in flight then either applies or is lost for good (as an entry
//! that a majority did or did not store), the lock table starts again from the prepare
//! records, the coordinator forgets what it held in memory, and the new leader's clock has
//! another skew.
//!
//! Checks: the lock tables' invariants, no waits-for cycle across all ranges, and atomic
//! commitment's agreement (every reply and notification about a transaction carries the
//! decision first told) after every step; at the end, that every client committed its transactions (no starvation), that no
//! transaction stays prepared, that replaying the committed transactions serially in commit
//! timestamp order reproduces everything each observed and the final data (so no partial or
//! lost commit), and real-time order: a transaction acknowledged before another began has the
//! smaller commit timestamp (external consistency).
//!
//! `MERIDIAN_TXN_SIM_SEED=N` replays a seed, `MERIDIAN_TXN_SIM_SEEDS=N` runs that many.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use meridian_txn::{
    Acquired, Coordinator, CoordinatorOptions, CoordinatorOutput, CoordinatorSwitches, Decision,
    Epoch, Error, Interval, KeySpan, LockEvent, LockMode, LockRequest, LockTable, LockTableOptions,
    PrepareRecord, PreparedSet, Priority, RangeId, RequestId, Resolution, Timestamp, TxnId,
    TxnRecord, Write, prepare_timestamp,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;

use common::{
    Committed, Observed, Op, check_serial_replay, random_program, read_rows, read_value, run_all,
    run_caught,
};

/// Seeds run by default.
const DEFAULT_SEEDS: u64 = 200;
/// The first key of each range; the last range ends at [`KEY_COUNT`].
const RANGE_STARTS: [u8; 3] = [0, 6, 11];
const KEY_COUNT: u8 = 16;
const CLIENT_COUNT: usize = 6;
const TXNS_PER_CLIENT: usize = 4;
/// The bound on steps: a run that does not finish within it starves someone.
const MAX_STEPS: usize = 100_000;
const MS: u64 = 1_000_000;
/// The clock uncertainty bound; leaders' clocks are skewed within it. Wide against the time a
/// client takes from one transaction to its next, so that commits acknowledged too early can
/// be overtaken in timestamp order by what follows them.
const EPSILON_NS: u64 = 20 * MS;
const ABANDON_AFTER_MS: u64 = 1_000;
const HEARTBEAT_EVERY_NS: u64 = 200 * MS;
/// A prepared participant that heard nothing this long asks its coordinator.
const QUERY_AFTER: Duration = Duration::from_millis(300);
/// A coordinator aborts a commit still missing votes after this long.
const VOTE_TIMEOUT: Duration = Duration::from_secs(2);
/// A client that waited this long for its commit's decision gives up and asks for an abort;
/// it then takes whichever decision is logged first (a commit may still win).
const COMMIT_PATIENCE_NS: u64 = 12 * MS;

/// Switches of the simulation that break a rule of the protocol's users.
#[derive(Clone, Copy, Debug, Default)]
struct SimSwitches {
    /// Acknowledge commits at once instead of after commit-wait (breaks Spanner §4.1.2's
    /// commit-wait rule, and with it external consistency).
    skip_commit_wait: bool,
    /// A prepared participant that hears nothing aborts on its own instead of asking its
    /// coordinator (breaks "a prepared participant never aborts on its own").
    prepared_give_up: bool,
}

/// A record proposed through a range's log.
#[derive(Clone, Debug)]
enum Record {
    Prepare(PrepareRecord),
    /// The coordinator's decision. The coordinator range prepared its own part like every
    /// participant; applying the decision resolves that part too.
    Decide {
        txn: TxnId,
        record: TxnRecord,
    },
    Outcome {
        txn: TxnId,
        decision: Decision,
    },
}

/// A message between range leaders.
#[derive(Clone, Debug)]
enum Message {
    Vote { to: usize, txn: TxnId, from: usize, prepare_ts: Timestamp, query: bool },
    Notify { to: usize, txn: TxnId, decision: Decision },
}

struct Range {
    table: LockTable,
    coordinator: Coordinator,
    prepared: PreparedSet,
    floor: Timestamp,
    skew_ns: i64,
    /// Records proposed and not applied yet, with when they apply.
    log: VecDeque<(u64, Record)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Running,
    Waiting {
        range: usize,
        request: RequestId,
    },
    Locking,
    /// Waiting for the coordinator's decision.
    Committing {
        coordinator: usize,
    },
    Done,
}

struct Client {
    priority: Option<Priority>,
    /// When the current attempt began.
    attempt_start_ns: u64,
    txn: TxnId,
    program: Vec<Op>,
    next_op: usize,
    observed: Vec<Observed>,
    writes: BTreeMap<u8, Option<u64>>,
    to_lock: Vec<(usize, LockMode, KeySpan)>,
    granted: BTreeMap<usize, Vec<(LockMode, KeySpan)>>,
    held_since: BTreeMap<usize, Epoch>,
    phase: Phase,
    /// The coordinator's decision, once it replied (a commit is acknowledged after
    /// commit-wait).
    decision: Option<Decision>,
    /// The coordinator's leader changed while the client waited: send the commit again.
    resend_commit: bool,
    /// When the client asked to commit, and whether it gave up waiting since.
    commit_started_ns: u64,
    abort_sent: bool,
    committed: usize,
    doomed: bool,
    silent_until_ns: u64,
    last_heartbeat_ns: u64,
}

/// A committed transaction with its timestamps.
struct Acknowledged {
    committed: Committed,
    commit_ts: Timestamp,
    /// When the attempt that committed began (later than the transaction's first attempt,
    /// so the real-time check covers more pairs).
    start_ns: u64,
    ack_ns: u64,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    switches: SimSwitches,
    lock_options: LockTableOptions,
    now_ns: u64,
    ranges: Vec<Range>,
    store: BTreeMap<u8, u64>,
    clients: Vec<Client>,
    messages: Vec<(u64, Message)>,
    history: Vec<Acknowledged>,
    next_txn: u128,
    next_request: u64,
    next_value: u64,
    stats: Stats,
    trace: bool,
    /// The decision first told to anyone (a client or a participant), per transaction.
    told: BTreeMap<TxnId, Decision>,
    /// The first broken invariant seen while handling outputs.
    violation: Option<String>,
}

#[derive(Debug, Default)]
struct Stats {
    commits: usize,
    multi_range_commits: usize,
    aborts: usize,
    leader_changes: usize,
    lost_records: usize,
    lost_messages: usize,
    queries: usize,
    client_aborts: usize,
    /// Decision records applied after another decision of the opposite kind.
    records_overruled: usize,
    refused_proposals: usize,
}

fn range_of(key: u8) -> usize {
    RANGE_STARTS.iter().rposition(|start| *start <= key).expect("key 0 is in range 0")
}

fn range_end(range: usize) -> u8 {
    RANGE_STARTS.get(range + 1).copied().unwrap_or(KEY_COUNT)
}

fn initial_store() -> BTreeMap<u8, u64> {
    (0..KEY_COUNT).step_by(2).map(|key| (key, u64::from(key) * 1000)).collect()
}

impl Sim {
    fn new(seed: u64, sim: SimSwitches, coordinator: CoordinatorSwitches) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let lock_options = LockTableOptions {
            abandon_after: Duration::from_millis(ABANDON_AFTER_MS),
            ..LockTableOptions::default()
        };
        let coordinator_options =
            CoordinatorOptions { vote_timeout: VOTE_TIMEOUT, switches: coordinator };
        let ranges = RANGE_STARTS
            .iter()
            .map(|_| {
                let mut coordinator = Coordinator::new(coordinator_options.clone());
                coordinator.become_leader();
                Range {
                    table: LockTable::new(Epoch(1), lock_options.clone()),
                    coordinator,
                    prepared: PreparedSet::new(),
                    floor: Timestamp::ZERO,
                    skew_ns: rng.random_range(-(EPSILON_NS as i64)..=EPSILON_NS as i64),
                    log: VecDeque::new(),
                }
            })
            .collect();
        let clients = (0..CLIENT_COUNT)
            .map(|_| Client {
                priority: None,
                attempt_start_ns: 0,
                txn: TxnId(0),
                program: Vec::new(),
                next_op: 0,
                observed: Vec::new(),
                writes: BTreeMap::new(),
                to_lock: Vec::new(),
                granted: BTreeMap::new(),
                held_since: BTreeMap::new(),
                phase: Phase::Idle,
                decision: None,
                resend_commit: false,
                commit_started_ns: 0,
                abort_sent: false,
                committed: 0,
                doomed: false,
                silent_until_ns: 0,
                last_heartbeat_ns: 0,
            })
            .collect();
        Sim {
            seed,
            rng,
            switches: sim,
            lock_options,
            // Start far from zero so that clock readings never saturate.
            now_ns: 1_000_000 * MS,
            ranges,
            store: initial_store(),
            clients,
            messages: Vec::new(),
            history: Vec::new(),
            next_txn: 1,
            next_request: 1,
            next_value: 1,
            stats: Stats::default(),
            trace: std::env::var_os("MERIDIAN_TXN_SIM_TRACE").is_some(),
            told: BTreeMap::new(),
            violation: None,
        }
    }

    fn local_ns(&self, range: usize) -> u64 {
        self.now_ns.saturating_add_signed(self.ranges[range].skew_ns)
    }

    /// The range leader's clock reading: its local time ± ε.
    fn clock(&self, range: usize) -> Interval {
        let local = self.local_ns(range);
        Interval {
            earliest: Timestamp::from_nanos(local - EPSILON_NS),
            latest: Timestamp::from_nanos(local + EPSILON_NS),
        }
    }

    fn local(&self, range: usize) -> Timestamp {
        Timestamp::from_nanos(self.local_ns(range))
    }

    fn log(&self, text: impl FnOnce() -> String) {
        if self.trace {
            println!("{:>8.3} ms: {}", (self.now_ns - 1_000_000 * MS) as f64 / MS as f64, text());
        }
    }

    fn run(&mut self) -> Result<(), String> {
        for _ in 0..MAX_STEPS {
            let done = self.clients.iter().all(|client| client.phase == Phase::Done);
            let quiet = self.ranges.iter().all(|range| range.log.is_empty())
                && self.messages.is_empty()
                && self.ranges.iter().all(|range| range.prepared.records().next().is_none());
            if done && quiet {
                return self.check_history();
            }
            self.now_ns += self.rng.random_range(0..2 * MS);
            match self.rng.random_range(0..1000) {
                0..2 if !done => {
                    let range = self.rng.random_range(0..self.ranges.len());
                    self.change_leader(range)?;
                }
                2..5 => {
                    let client = self.rng.random_range(0..CLIENT_COUNT);
                    self.clients[client].silent_until_ns =
                        self.now_ns + self.rng.random_range(300..2500) * MS;
                }
                _ => {
                    let client = self.rng.random_range(0..CLIENT_COUNT);
                    self.step_client(client)?;
                }
            }
            self.apply_records()?;
            self.deliver_messages();
            self.tick_ranges();
            self.heartbeats();
            self.deliver_lock_events();
            self.acknowledge_commits();
            if let Some(violation) = self.violation.take() {
                return Err(violation);
            }
            for range in &self.ranges {
                range.table.check_invariants()?;
            }
            self.check_no_deadlock()?;
        }
        let running: Vec<String> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, client)| client.phase != Phase::Done)
            .map(|(i, client)| {
                format!("client {i} {:?} ({} committed)", client.phase, client.committed)
            })
            .collect();
        let prepared: Vec<String> = self
            .ranges
            .iter()
            .flat_map(|range| range.prepared.records().map(|record| record.txn.to_string()))
            .collect();
        Err(format!(
            "not finished after {MAX_STEPS} steps: clients [{}], still prepared [{}]",
            running.join(", "),
            prepared.join(", ")
        ))
    }

    // ---- Range leaders ----

    /// Proposes a record; it applies after 1–4 ms, or one time in five after a slow round of
    /// 5–30 ms (a follower that lags, a disk that stalls). Records apply in proposal order.
    fn propose(&mut self, range: usize, record: Record) {
        let delay = if self.rng.random_range(0..5) == 0 {
            self.rng.random_range(5..30)
        } else {
            self.rng.random_range(1..4)
        };
        let last = self.ranges[range].log.back().map_or(0, |(at, _)| *at);
        let at = (self.now_ns + delay * MS).max(last);
        self.ranges[range].log.push_back((at, record));
    }

    fn send(&mut self, message: Message) {
        if self.rng.random_range(0..100) < 3 {
            self.stats.lost_messages += 1;
            return;
        }
        let at = self.now_ns + self.rng.random_range(0..3) * MS;
        self.messages.push((at, message));
    }

    /// Checks atomic commitment's agreement: whatever a coordinator tells a client or a
    /// participant about a transaction is the decision it told first.
    fn check_agreement(&mut self, txn: TxnId, decision: &Decision) {
        // Abort reasons may differ (a query's abort and a client's); the outcome may not.
        let told = self.told.entry(txn).or_insert_with(|| decision.clone());
        let same = match (&*told, decision) {
            (Decision::Commit { commit_ts: a }, Decision::Commit { commit_ts: b }) => a == b,
            (Decision::Abort { .. }, Decision::Abort { .. }) => true,
            _ => false,
        };
        if !same && self.violation.is_none() {
            self.violation =
                Some(format!("atomic commitment: {txn} was told {told:?}, then {decision:?}"));
        }
    }

    /// Turns a coordinator's outputs into proposals, replies and messages.
    fn handle_outputs(&mut self, range: usize) {
        for output in self.ranges[range].coordinator.take_outputs() {
            match &output {
                CoordinatorOutput::Reply { txn, decision }
                | CoordinatorOutput::Notify { txn, decision, .. } => {
                    self.check_agreement(*txn, decision);
                }
                CoordinatorOutput::Propose { .. } => {}
            }
            match output {
                CoordinatorOutput::Propose { txn, .. } if self.rng.random_range(0..50) == 0 => {
                    // Raft refuses the proposal (a transfer under way); the leader stays.
                    self.stats.refused_proposals += 1;
                    let _ = self.ranges[range].coordinator.on_proposal_refused(txn);
                }
                CoordinatorOutput::Propose { txn, record } => {
                    if let Decision::Commit { commit_ts } = record.decision {
                        let floor = &mut self.ranges[range].floor;
                        *floor = (*floor).max(commit_ts);
                    }
                    self.propose(range, Record::Decide { txn, record });
                }
                CoordinatorOutput::Reply { txn, decision } => {
                    if let Some(client) = self.clients.iter_mut().find(|client| {
                        client.txn == txn
                            && client.phase == (Phase::Committing { coordinator: range })
                    }) {
                        client.decision = Some(decision);
                    }
                }
                CoordinatorOutput::Notify { txn, participants, decision } => {
                    for participant in participants {
                        let to = participant.0 as usize;
                        self.send(Message::Notify { to, txn, decision: decision.clone() });
                    }
                }
            }
        }
    }

    fn apply_records(&mut self) -> Result<(), String> {
        for range in 0..self.ranges.len() {
            while self.ranges[range].log.front().is_some_and(|(at, _)| *at <= self.now_ns) {
                let (_, record) = self.ranges[range].log.pop_front().expect("a front");
                self.apply_record(range, record)?;
            }
        }
        Ok(())
    }

    fn apply_record(&mut self, range: usize, record: Record) -> Result<(), String> {
        match record {
            Record::Prepare(record) => {
                let (txn, coordinator, prepare_ts) =
                    (record.txn, record.coordinator.0 as usize, record.prepare_ts);
                self.ranges[range].prepared.apply_prepare(record);
                self.send(Message::Vote {
                    to: coordinator,
                    txn,
                    from: range,
                    prepare_ts,
                    query: false,
                });
            }
            Record::Decide { txn, record } => {
                let effective = self.ranges[range].coordinator.apply(txn, record.clone());
                if std::mem::discriminant(&effective) != std::mem::discriminant(&record.decision) {
                    self.stats.records_overruled += 1;
                }
                self.log(|| {
                    format!(
                        "r{range} decides {txn}: {:?} (logged {:?})",
                        effective, record.decision
                    )
                });
                // The coordinator's own prepared part resolves with the decision in effect.
                self.resolve(range, txn, &effective)?;
                self.handle_outputs(range);
            }
            Record::Outcome { txn, decision } => self.resolve(range, txn, &decision)?,
        }
        Ok(())
    }

    /// Applies a decision to the transaction's prepared part at `range`, if it has one: its
    /// writes at the commit timestamp, then its locks released.
    fn resolve(&mut self, range: usize, txn: TxnId, decision: &Decision) -> Result<(), String> {
        match self.ranges[range].prepared.apply_outcome(txn, decision) {
            Resolution::Commit { commit_ts, writes } => {
                self.apply_writes(range, &writes, commit_ts)?;
                self.ranges[range].table.release(txn);
            }
            Resolution::Abort => self.ranges[range].table.release(txn),
            Resolution::Unknown => {}
        }
        Ok(())
    }

    fn apply_writes(
        &mut self,
        range: usize,
        writes: &[Write],
        commit_ts: Timestamp,
    ) -> Result<(), String> {
        // Like the node's applied state: the range's floor covers every applied timestamp.
        let floor = &mut self.ranges[range].floor;
        *floor = (*floor).max(commit_ts);
        for write in writes {
            let key = write.key[0];
            if range_of(key) != range {
                return Err(format!("r{range} applies a write of key {key} outside its span"));
            }
            match &write.value {
                Some(value) => self
                    .store
                    .insert(key, u64::from_be_bytes(value[..8].try_into().expect("8 bytes"))),
                None => self.store.remove(&key),
            };
        }
        Ok(())
    }

    fn deliver_messages(&mut self) {
        let now = self.now_ns;
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.messages).into_iter().partition(|(at, _)| *at <= now);
        self.messages = later;
        for (_, message) in due {
            match message {
                Message::Vote { to, txn, from, prepare_ts, query } => {
                    let floor = self.ranges[to].floor;
                    self.ranges[to].coordinator.on_prepared(
                        txn,
                        RangeId(from as u64),
                        prepare_ts,
                        query,
                        floor,
                    );
                    self.handle_outputs(to);
                }
                Message::Notify { to, txn, decision } => {
                    self.propose(to, Record::Outcome { txn, decision });
                }
            }
        }
    }

    fn tick_ranges(&mut self) {
        for range in 0..self.ranges.len() {
            let local = self.local(range);
            self.ranges[range].coordinator.tick(local);
            self.handle_outputs(range);
            let due = self.ranges[range].prepared.due_queries(local, QUERY_AFTER);
            for (txn, coordinator, prepare_ts) in due {
                if self.switches.prepared_give_up {
                    let decision = Decision::Abort { reason: "gave up".into() };
                    self.ranges[range].prepared.apply_outcome(txn, &decision);
                    self.ranges[range].table.release(txn);
                    continue;
                }
                self.stats.queries += 1;
                let to = coordinator.0 as usize;
                self.send(Message::Vote { to, txn, from: range, prepare_ts, query: true });
            }
        }
        for range in 0..self.ranges.len() {
            let local = self.local(range);
            self.ranges[range].table.expire(local);
        }
    }

    /// A new leader at `range`: records in flight apply or are lost, the lock table starts
    /// again from the prepare records, the coordinator forgets its memory, the clock changes.
    fn change_leader(&mut self, range: usize) -> Result<(), String> {
        self.stats.leader_changes += 1;
        self.log(|| format!("leader change at r{range}"));
        // The new leader holds a prefix of the old leader's records in flight; it applies
        // them before it serves anything, and the rest are lost for good.
        let in_flight = std::mem::take(&mut self.ranges[range].log);
        let kept = self.rng.random_range(0..=in_flight.len());
        for (position, (_, record)) in in_flight.into_iter().enumerate() {
            if position < kept {
                self.apply_record(range, record)?;
            } else {
                self.stats.lost_records += 1;
            }
        }
        self.deliver_lock_events();
        let epoch = Epoch(self.ranges[range].table.epoch().0 + 1);
        let mut table = LockTable::new(epoch, self.lock_options.clone());
        let local = self.local(range);
        for record in self.ranges[range].prepared.records() {
            table
                .restore_prepared(record.txn, record.priority, record.locks.clone(), local)
                .map_err(|error| format!("restore failed: {error}"))?;
        }
        self.ranges[range].table = table;
        self.ranges[range].coordinator.become_leader();
        self.ranges[range].skew_ns =
            self.rng.random_range(-(EPSILON_NS as i64)..=EPSILON_NS as i64);
        self.handle_outputs(range);
        for i in 0..CLIENT_COUNT {
            match self.clients[i].phase {
                Phase::Waiting { range: waiting_at, .. } if waiting_at == range => {
                    self.abort(i);
                }
                Phase::Committing { coordinator }
                    if coordinator == range && self.clients[i].decision.is_none() =>
                {
                    // The commit request's outcome is unknown: the client asks again (commit
                    // is idempotent by transaction id).
                    self.clients[i].resend_commit = true;
                }
                _ => {}
            }
        }
        Ok(())
    }

    // ---- Clients ----

    fn step_client(&mut self, i: usize) -> Result<(), String> {
        if self.now_ns < self.clients[i].silent_until_ns {
            return Ok(());
        }
        match self.clients[i].phase.clone() {
            Phase::Done | Phase::Waiting { .. } => {}
            Phase::Idle => {
                if self.clients[i].committed == TXNS_PER_CLIENT {
                    self.clients[i].phase = Phase::Done;
                    return Ok(());
                }
                let program =
                    random_program(&mut self.rng, KEY_COUNT, |start| range_end(range_of(start)));
                let txn = TxnId(self.next_txn);
                self.next_txn += 1;
                let start = Timestamp::from_nanos(self.now_ns);
                let client = &mut self.clients[i];
                client.priority = Some(Priority { start, first_txn: txn, attempt: 0 });
                client.program = program;
                self.begin_attempt(i, txn);
            }
            Phase::Running | Phase::Locking if self.clients[i].doomed => self.abort(i),
            Phase::Running => {
                if !self.clients[i].to_lock.is_empty() {
                    return self.request_next_lock(i);
                }
                let op = self.clients[i].program[self.clients[i].next_op].clone();
                let lock = match op {
                    Op::Read { key, for_update } => {
                        let mode = if for_update { LockMode::Exclusive } else { LockMode::Shared };
                        (range_of(key), mode, KeySpan::key(vec![key]))
                    }
                    Op::Scan { start, end } => {
                        let span =
                            KeySpan::range(vec![start], Some(vec![end])).expect("start < end");
                        (range_of(start), LockMode::Shared, span)
                    }
                    Op::Write { key } => {
                        let value = self.next_value;
                        self.next_value += 1;
                        self.clients[i].writes.insert(key, Some(value));
                        self.finish_op(i);
                        return Ok(());
                    }
                    Op::Delete { key } => {
                        self.clients[i].writes.insert(key, None);
                        self.finish_op(i);
                        return Ok(());
                    }
                };
                self.clients[i].to_lock = vec![lock];
                self.request_next_lock(i)?;
            }
            Phase::Locking => {
                if !self.clients[i].to_lock.is_empty() {
                    return self.request_next_lock(i);
                }
                self.commit(i);
            }
            Phase::Committing { coordinator } => {
                if self.clients[i].resend_commit {
                    self.clients[i].resend_commit = false;
                    self.request_commit(i, coordinator);
                    self.handle_outputs(coordinator);
                } else if let Some(Decision::Abort { .. }) = self.clients[i].decision {
                    self.abort(i);
                } else if self.clients[i].decision.is_none()
                    && !self.clients[i].abort_sent
                    && self.now_ns - self.clients[i].commit_started_ns > COMMIT_PATIENCE_NS
                {
                    self.clients[i].abort_sent = true;
                    self.stats.client_aborts += 1;
                    let txn = self.clients[i].txn;
                    let participants = self.participants(i);
                    let reason = "the client gave up waiting".to_owned();
                    self.ranges[coordinator].coordinator.request_abort(txn, participants, reason);
                    self.handle_outputs(coordinator);
                }
            }
        }
        Ok(())
    }

    fn begin_attempt(&mut self, i: usize, txn: TxnId) {
        let client = &mut self.clients[i];
        client.txn = txn;
        client.attempt_start_ns = self.now_ns;
        client.next_op = 0;
        client.observed.clear();
        client.writes.clear();
        client.to_lock.clear();
        client.granted.clear();
        client.held_since.clear();
        client.decision = None;
        client.resend_commit = false;
        client.abort_sent = false;
        client.doomed = false;
        client.last_heartbeat_ns = self.now_ns;
        client.phase = Phase::Running;
    }

    fn request_next_lock(&mut self, i: usize) -> Result<(), String> {
        let client = &self.clients[i];
        let (range, mode, span) = client.to_lock[0].clone();
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let request = LockRequest {
            id,
            txn: client.txn,
            priority: client.priority.expect("running clients have a priority"),
            mode,
            span,
            held_since: client.held_since.get(&range).copied(),
        };
        let local = self.local(range);
        match self.ranges[range].table.acquire(request, local) {
            Ok(outcome) => {
                let epoch = self.ranges[range].table.epoch();
                self.clients[i].held_since.entry(range).or_insert(epoch);
                match outcome {
                    Acquired::Granted => self.finish_lock(i),
                    Acquired::Waiting => {
                        self.clients[i].phase = Phase::Waiting { range, request: id }
                    }
                }
                Ok(())
            }
            Err(error @ Error::InvalidInput(_)) => Err(format!("client {i}: {error}")),
            Err(_) => {
                self.abort(i);
                Ok(())
            }
        }
    }

    fn finish_lock(&mut self, i: usize) {
        let client = &mut self.clients[i];
        let (range, mode, span) = client.to_lock.remove(0);
        client.granted.entry(range).or_default().push((mode, span));
        if client.to_lock.is_empty() && client.phase == Phase::Running {
            self.finish_op(i);
        }
    }

    fn finish_op(&mut self, i: usize) {
        let client = &mut self.clients[i];
        let observed = match client.program[client.next_op] {
            Op::Read { key, .. } => Observed::Value(read_value(&self.store, &client.writes, key)),
            Op::Scan { start, end } => {
                Observed::Rows(read_rows(&self.store, &client.writes, start, end))
            }
            Op::Write { key } | Op::Delete { key } => Observed::Wrote(client.writes[&key]),
        };
        client.observed.push(observed);
        client.next_op += 1;
        if client.next_op == client.program.len() {
            client.phase = Phase::Locking;
            client.to_lock = client
                .writes
                .keys()
                .map(|key| (range_of(*key), LockMode::Exclusive, KeySpan::key(vec![*key])))
                .collect();
        }
    }

    /// The client's writes at `range`, as the protocol carries them.
    fn writes_at(&self, i: usize, range: usize) -> Vec<Write> {
        self.clients[i]
            .writes
            .iter()
            .filter(|(key, _)| range_of(**key) == range)
            .map(|(key, value)| Write {
                key: vec![*key],
                value: value.map(|value| value.to_be_bytes().to_vec()),
            })
            .collect()
    }

    /// Starts the commit: the lowest participating range coordinates; the others prepare.
    fn commit(&mut self, i: usize) {
        let participants: BTreeSet<usize> = self.clients[i].granted.keys().copied().collect();
        let coordinator = *participants.first().expect("every program locks something");
        self.log(|| {
            format!(
                "client {i} commits {} at {participants:?} through r{coordinator}",
                self.clients[i].txn
            )
        });
        self.clients[i].phase = Phase::Committing { coordinator };
        self.clients[i].commit_started_ns = self.now_ns;
        self.request_commit(i, coordinator);
        self.handle_outputs(coordinator);
        let txn = self.clients[i].txn;
        for range in participants {
            let held_since = self.clients[i].held_since[&range];
            let local = self.local(range);
            match self.ranges[range].table.prepare(txn, held_since, local) {
                Ok(()) => {
                    let floor = self.ranges[range].floor;
                    let prepare_ts = prepare_timestamp(self.clock(range), floor);
                    self.ranges[range].floor = prepare_ts;
                    let record = PrepareRecord {
                        txn,
                        priority: self.clients[i].priority.expect("a priority"),
                        coordinator: RangeId(coordinator as u64),
                        prepare_ts,
                        locks: self.clients[i].granted[&range].clone(),
                        writes: self.writes_at(i, range),
                    };
                    self.propose(range, Record::Prepare(record));
                }
                Err(error) => {
                    // The coordinator learns it (a message, as from the participant).
                    self.ranges[coordinator].coordinator.on_prepare_failed(
                        txn,
                        RangeId(range as u64),
                        error.to_string(),
                    );
                    self.handle_outputs(coordinator);
                    break;
                }
            }
        }
    }

    /// Every participant of client `i`'s transaction, its coordinator included: the
    /// coordinator range prepares its own part too and votes like the others.
    fn participants(&self, i: usize) -> BTreeSet<RangeId> {
        self.clients[i].granted.keys().map(|range| RangeId(*range as u64)).collect()
    }

    /// Asks the coordinator to commit: it collects every participant's vote, its own too.
    fn request_commit(&mut self, i: usize, coordinator: usize) {
        let txn = self.clients[i].txn;
        let participants = self.participants(i);
        let (clock, local, floor) =
            (self.clock(coordinator), self.local(coordinator), self.ranges[coordinator].floor);
        if let Err(error) = self.ranges[coordinator].coordinator.request_commit(
            txn,
            participants,
            clock,
            local,
            floor,
        ) {
            panic!("seed {}: commit request refused: {error}", self.seed);
        }
    }

    /// Hands a committed decision to its client once commit-wait is over on the
    /// coordinator's clock (at once with `skip_commit_wait`), and records it.
    fn acknowledge_commits(&mut self) {
        for i in 0..CLIENT_COUNT {
            let Phase::Committing { coordinator } = self.clients[i].phase else { continue };
            let Some(Decision::Commit { commit_ts }) = self.clients[i].decision else { continue };
            if !self.switches.skip_commit_wait && !self.clock(coordinator).after(commit_ts) {
                continue;
            }
            self.log(|| {
                format!("client {i}: {} committed at {}", self.clients[i].txn, commit_ts.as_nanos())
            });
            let client = &mut self.clients[i];
            self.stats.commits += 1;
            if client.granted.len() > 1 {
                self.stats.multi_range_commits += 1;
            }
            self.history.push(Acknowledged {
                committed: Committed {
                    txn: client.txn.to_string(),
                    program: client.program.clone(),
                    observed: client.observed.clone(),
                    writes: client.writes.clone(),
                },
                commit_ts,
                start_ns: client.attempt_start_ns,
                ack_ns: self.now_ns,
            });
            client.committed += 1;
            client.phase = Phase::Idle;
        }
    }

    /// Rolls the attempt back where it is not prepared (one rollback in four is lost) and
    /// starts the next attempt with the same priority.
    fn abort(&mut self, i: usize) {
        self.stats.aborts += 1;
        let txn = self.clients[i].txn;
        self.log(|| format!("client {i} aborts {txn}"));
        let ranges: Vec<usize> = self.clients[i].held_since.keys().copied().collect();
        for range in ranges {
            if self.rng.random_range(0..4) > 0 {
                // Refused for a prepared participant: its coordinator's decision ends it.
                let _ = self.ranges[range].table.rollback(txn);
            }
        }
        if let Some(priority) = &mut self.clients[i].priority {
            priority.attempt += 1;
        }
        let next = TxnId(self.next_txn);
        self.next_txn += 1;
        self.begin_attempt(i, next);
    }

    fn heartbeats(&mut self) {
        for i in 0..CLIENT_COUNT {
            let client = &self.clients[i];
            if self.now_ns < client.silent_until_ns
                || self.now_ns - client.last_heartbeat_ns < HEARTBEAT_EVERY_NS
                || !matches!(client.phase, Phase::Running | Phase::Waiting { .. } | Phase::Locking)
            {
                continue;
            }
            let txn = client.txn;
            let held: Vec<(usize, Epoch)> =
                client.held_since.iter().map(|(r, e)| (*r, *e)).collect();
            self.clients[i].last_heartbeat_ns = self.now_ns;
            for (range, epoch) in held {
                let local = self.local(range);
                if self.ranges[range].table.heartbeat(txn, epoch, local).is_err() {
                    self.clients[i].doomed = true;
                }
            }
        }
    }

    fn deliver_lock_events(&mut self) {
        for range in 0..self.ranges.len() {
            for event in self.ranges[range].table.take_events() {
                let (txn, granted) = match event {
                    LockEvent::Granted { txn, request } => (txn, Some(request)),
                    LockEvent::Wounded { txn, cancelled: Some(_), .. }
                    | LockEvent::Abandoned { txn, cancelled: Some(_) } => (txn, None),
                    _ => continue,
                };
                let Some(i) = self.clients.iter().position(|client| client.txn == txn) else {
                    continue;
                };
                match granted {
                    Some(request) => {
                        assert_eq!(self.clients[i].phase, Phase::Waiting { range, request });
                        let client = &mut self.clients[i];
                        client.phase = if client.next_op < client.program.len() {
                            Phase::Running
                        } else {
                            Phase::Locking
                        };
                        self.finish_lock(i);
                    }
                    None => self.abort(i),
                }
            }
        }
    }

    fn check_no_deadlock(&self) -> Result<(), String> {
        let edges: BTreeMap<TxnId, Vec<TxnId>> = self
            .clients
            .iter()
            .filter_map(|client| match client.phase {
                Phase::Waiting { range, .. } => {
                    Some((client.txn, self.ranges[range].table.blockers(client.txn)))
                }
                _ => None,
            })
            .collect();
        for &start in edges.keys() {
            let mut seen = BTreeSet::new();
            let mut stack = vec![start];
            while let Some(txn) = stack.pop() {
                for &next in edges.get(&txn).into_iter().flatten() {
                    if next == start {
                        return Err(format!("deadlock: {start} waits for itself through {txn}"));
                    }
                    if seen.insert(next) {
                        stack.push(next);
                    }
                }
            }
        }
        Ok(())
    }

    fn check_history(&self) -> Result<(), String> {
        // Real time: acknowledged before another began means a smaller commit timestamp.
        for first in &self.history {
            for second in &self.history {
                if first.ack_ns < second.start_ns && first.commit_ts >= second.commit_ts {
                    return Err(format!(
                        "external consistency: {} was acknowledged at {} ns before {} began at {} \
                         ns, but commits at {} >= {}",
                        first.committed.txn,
                        first.ack_ns,
                        second.committed.txn,
                        second.start_ns,
                        first.commit_ts.as_nanos(),
                        second.commit_ts.as_nanos()
                    ));
                }
            }
        }
        // Transactions with equal timestamps must not conflict (a conflict orders them through
        // a range's floor); then their order in the replay does not matter.
        let mut ordered: Vec<&Acknowledged> = self.history.iter().collect();
        ordered.sort_by_key(|acknowledged| acknowledged.commit_ts);
        for pair in ordered.windows(2) {
            if pair[0].commit_ts == pair[1].commit_ts
                && conflict(&pair[0].committed, &pair[1].committed)
            {
                return Err(format!(
                    "conflicting transactions {} and {} commit at the same timestamp {}",
                    pair[0].committed.txn,
                    pair[1].committed.txn,
                    pair[0].commit_ts.as_nanos()
                ));
            }
        }
        let committed: Vec<&Committed> =
            ordered.iter().map(|acknowledged| &acknowledged.committed).collect();
        check_serial_replay(&initial_store(), &committed, &self.store, "commit timestamp order")
    }
}

/// Returns whether two transactions conflict: one writes a key the other reads, scans or
/// writes.
fn conflict(a: &Committed, b: &Committed) -> bool {
    let touched = |txn: &Committed| -> BTreeSet<u8> {
        txn.program
            .iter()
            .flat_map(|op| match *op {
                Op::Read { key, .. } | Op::Write { key } | Op::Delete { key } => key..key + 1,
                Op::Scan { start, end } => start..end,
            })
            .collect()
    };
    let writes = |txn: &Committed| -> BTreeSet<u8> { txn.writes.keys().copied().collect() };
    !writes(a).is_disjoint(&touched(b)) || !writes(b).is_disjoint(&touched(a))
}

fn run_seed(
    seed: u64,
    sim: SimSwitches,
    coordinator: CoordinatorSwitches,
) -> Result<Stats, String> {
    run_caught(seed, || {
        let mut simulation = Sim::new(seed, sim, coordinator);
        simulation.run().map(|()| simulation.stats)
    })
}

fn first_catch(sim: SimSwitches, coordinator: CoordinatorSwitches) -> Option<(u64, String)> {
    common::first_catch(DEFAULT_SEEDS, |seed| run_seed(seed, sim, coordinator))
}

#[test]
fn transactions_across_ranges_are_strictly_serializable() {
    let run = |seed| run_seed(seed, SimSwitches::default(), CoordinatorSwitches::default());
    let (totals, seeds) = run_all(DEFAULT_SEEDS, run, |totals: &mut Stats, stats| {
        totals.commits += stats.commits;
        totals.multi_range_commits += stats.multi_range_commits;
        totals.aborts += stats.aborts;
        totals.leader_changes += stats.leader_changes;
        totals.lost_records += stats.lost_records;
        totals.lost_messages += stats.lost_messages;
        totals.queries += stats.queries;
        totals.client_aborts += stats.client_aborts;
        totals.records_overruled += stats.records_overruled;
        totals.refused_proposals += stats.refused_proposals;
    });
    println!("{seeds} seeds passed: {totals:?}");
    if seeds >= 50 {
        assert!(totals.multi_range_commits > 0 && totals.lost_records > 0 && totals.queries > 0);
    }
}

#[test]
fn suite_catches_commits_acknowledged_before_commit_wait() {
    let sim = SimSwitches { skip_commit_wait: true, ..SimSwitches::default() };
    let (seed, failure) =
        first_catch(sim, CoordinatorSwitches::default()).expect("skip_commit_wait went uncaught");
    println!("skip_commit_wait caught by seed {seed}: {failure}");
    assert!(failure.contains("external consistency"), "{failure}");
}

#[test]
fn suite_catches_prepared_participants_aborting_alone() {
    let sim = SimSwitches { prepared_give_up: true, ..SimSwitches::default() };
    let (seed, failure) =
        first_catch(sim, CoordinatorSwitches::default()).expect("prepared_give_up went uncaught");
    println!("prepared_give_up caught by seed {seed}: {failure}");
    assert!(failure.contains("not serializable") || failure.contains("differs"), "{failure}");
}

#[test]
fn suite_catches_later_records_overriding_decisions() {
    let coordinator =
        CoordinatorSwitches { later_record_wins: true, ..CoordinatorSwitches::default() };
    let (seed, failure) =
        first_catch(SimSwitches::default(), coordinator).expect("later_record_wins went uncaught");
    println!("later_record_wins caught by seed {seed}: {failure}");
    assert!(failure.contains("atomic commitment"), "{failure}");
}

#[test]
fn suite_catches_commits_without_every_vote() {
    let coordinator =
        CoordinatorSwitches { commit_on_first_vote: true, ..CoordinatorSwitches::default() };
    let (seed, failure) = first_catch(SimSwitches::default(), coordinator)
        .expect("commit_on_first_vote went uncaught");
    println!("commit_on_first_vote caught by seed {seed}: {failure}");
}
