//! A seeded simulation of read-write transactions over one range's lock table.
//!
//! Clients run random transactions (point reads, scans, reads for update, buffered writes and
//! deletes) against a small key space, with strict two-phase locking through a [`LockTable`]:
//! shared locks for reads (a span for a scan), exclusive locks on the written keys at prepare,
//! then a prepared pause (the coordinator's round and commit-wait), then the commit, which
//! applies the writes and releases. Around them the simulation injects what a leader sees:
//! wounds (clients abort and retry with their first priority), clients that go silent and come
//! back (abandonment), and leader changes (a new table at a new epoch, prepared transactions
//! restored from their records, waiting requests failed).
//!
//! After every step it checks the table's invariants and that the waits-for graph has no
//! cycle (a deadlock); at the end, that every client finished its transactions within a step
//! bound (no starvation), and that the committed history is serializable: replaying the
//! committed transactions one at a time in commit order reproduces every value and every scan
//! result each of them observed. Under strict two-phase locking the commit order is a
//! serialization order, so any difference is an anomaly (a lost update, a phantom, a read of
//! a value overwritten before commit).
//!
//! Each deliberately broken rule is caught by some seed of the default set (the tests at the
//! bottom). A failing seed is printed; `MERIDIAN_TXN_SIM_SEED=N` replays it, and
//! `MERIDIAN_TXN_SIM_SEEDS=N` runs that many seeds.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meridian_txn::{
    Acquired, Epoch, Error, KeySpan, LockEvent, LockMode, LockRequest, LockSwitches, LockTable,
    LockTableOptions, Priority, RequestId, Timestamp, TxnId,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;

use common::{
    Committed, Observed, Op, check_serial_replay, random_program, read_rows, read_value, run_all,
    run_caught,
};

/// Seeds run by default.
const DEFAULT_SEEDS: u64 = 300;
/// Keys are single bytes `0..KEY_COUNT`.
const KEY_COUNT: u8 = 8;
/// Clients running at once.
const CLIENT_COUNT: usize = 6;
/// Transactions each client commits.
const TXNS_PER_CLIENT: usize = 5;
/// The bound on steps: a run that does not finish within it starves someone.
const MAX_STEPS: usize = 60_000;
/// Abandonment timeout of the table, and the clients' heartbeat interval.
const ABANDON_AFTER_MS: u64 = 1_000;
const HEARTBEAT_EVERY_MS: u64 = 200;

/// Switches of the simulated client that break a rule of the protocol's users.
#[derive(Clone, Copy, Debug, Default)]
struct ClientSwitches {
    /// Lock the keys a scan finds instead of its span (breaks "scans take range locks").
    scans_lock_found_keys: bool,
    /// Leave the shared locks out of prepare records, so a new leader restores only a
    /// prepared transaction's writes (breaks "a prepared transaction's reads stay protected
    /// until it commits"; this simulation first found that bug in the design).
    prepare_records_without_reads: bool,
}

/// Where a client is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Between transactions.
    Idle,
    /// Running operation `next_op` of its program.
    Running,
    /// Waiting for a queued request.
    Waiting(RequestId),
    /// Taking exclusive locks on its writes before preparing.
    Locking,
    /// Prepared; commits after `remaining` more of its own steps.
    Prepared { remaining: u32 },
    /// Finished all its transactions.
    Done,
}

#[derive(Debug)]
struct Client {
    priority: Option<Priority>,
    /// The locks granted to the current attempt, as the client saw the replies.
    granted: Vec<(LockMode, KeySpan)>,
    txn: TxnId,
    program: Vec<Op>,
    next_op: usize,
    observed: Vec<Observed>,
    writes: BTreeMap<u8, Option<u64>>,
    /// Keys still to lock for the current operation (a scan with `scans_lock_found_keys`) or
    /// for the prepare.
    to_lock: Vec<(LockMode, KeySpan)>,
    held_since: Option<Epoch>,
    /// The locks its prepare record lists (what it held when it prepared).
    prepared_locks: Vec<(LockMode, KeySpan)>,
    phase: Phase,
    committed: usize,
    /// Set when the client learned its attempt is doomed (wounded, locks lost).
    doomed: bool,
    silent_until_ms: Option<u64>,
    last_heartbeat_ms: u64,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    table: LockTable,
    options: LockTableOptions,
    client_switches: ClientSwitches,
    now_ms: u64,
    store: BTreeMap<u8, u64>,
    clients: Vec<Client>,
    history: Vec<Committed>,
    next_txn: u128,
    next_request: u64,
    next_value: u64,
    stats: Stats,
    /// Print every action (`MERIDIAN_TXN_SIM_TRACE=1`), to study a failing seed.
    trace: bool,
}

#[derive(Debug, Default)]
struct Stats {
    wounds: usize,
    abandoned: usize,
    lost_locks: usize,
    leader_changes: usize,
    waits: usize,
    retries: usize,
    lost_rollbacks: usize,
}

/// The initial rows: every other key.
fn initial_store() -> BTreeMap<u8, u64> {
    (0..KEY_COUNT).step_by(2).map(|key| (key, u64::from(key) * 1000)).collect()
}

impl Sim {
    fn new(seed: u64, switches: LockSwitches, client_switches: ClientSwitches) -> Sim {
        let options =
            LockTableOptions { abandon_after: Duration::from_millis(ABANDON_AFTER_MS), switches };
        let clients = (0..CLIENT_COUNT)
            .map(|_| Client {
                priority: None,
                granted: Vec::new(),
                txn: TxnId(0),
                program: Vec::new(),
                next_op: 0,
                observed: Vec::new(),
                writes: BTreeMap::new(),
                to_lock: Vec::new(),
                held_since: None,
                prepared_locks: Vec::new(),
                phase: Phase::Idle,
                committed: 0,
                doomed: false,
                silent_until_ms: None,
                last_heartbeat_ms: 0,
            })
            .collect();
        Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            table: LockTable::new(Epoch(1), options.clone()),
            options,
            client_switches,
            now_ms: 0,
            store: initial_store(),
            clients,
            history: Vec::new(),
            next_txn: 1,
            next_request: 1,
            next_value: 1,
            stats: Stats::default(),
            trace: std::env::var_os("MERIDIAN_TXN_SIM_TRACE").is_some(),
        }
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_nanos(self.now_ms * 1_000_000)
    }

    fn random_program(&mut self) -> Vec<Op> {
        random_program(&mut self.rng, KEY_COUNT, |_| KEY_COUNT)
    }

    /// Runs until every client is done; returns the failure, if any.
    fn run(&mut self) -> Result<(), String> {
        for _ in 0..MAX_STEPS {
            if self.clients.iter().all(|client| client.phase == Phase::Done) {
                return self.check_history();
            }
            self.now_ms += self.rng.random_range(0..20);
            match self.rng.random_range(0..1000) {
                0..3 => self.change_leader()?,
                3..8 => {
                    let client = self.rng.random_range(0..CLIENT_COUNT);
                    let silence = self.rng.random_range(300..3000);
                    if self.trace {
                        println!("{} ms: client {client} silent for {silence} ms", self.now_ms);
                    }
                    self.clients[client].silent_until_ms = Some(self.now_ms + silence);
                }
                _ => {
                    let client = self.rng.random_range(0..CLIENT_COUNT);
                    self.step_client(client)?;
                }
            }
            self.heartbeats();
            self.table.expire(self.now());
            self.deliver_events();
            self.table.check_invariants()?;
            self.check_no_deadlock()?;
        }
        let running: Vec<String> = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, client)| client.phase != Phase::Done)
            .map(|(i, client)| {
                format!("client {i} ({:?}, {} committed)", client.phase, client.committed)
            })
            .collect();
        Err(format!("not finished after {MAX_STEPS} steps (starvation?): {}", running.join(", ")))
    }

    fn is_silent(&self, client: usize) -> bool {
        self.clients[client].silent_until_ms.is_some_and(|until| self.now_ms < until)
    }

    fn heartbeats(&mut self) {
        for i in 0..CLIENT_COUNT {
            if self.is_silent(i) {
                continue;
            }
            let client = &self.clients[i];
            let Some(epoch) = client.held_since else { continue };
            if self.now_ms - client.last_heartbeat_ms < HEARTBEAT_EVERY_MS
                || matches!(client.phase, Phase::Idle | Phase::Done)
            {
                continue;
            }
            let txn = client.txn;
            let result = self.table.heartbeat(txn, epoch, self.now());
            let client = &mut self.clients[i];
            client.last_heartbeat_ms = self.now_ms;
            if result.is_err() && !matches!(client.phase, Phase::Prepared { .. }) {
                client.doomed = true;
            }
        }
    }

    /// Hands the table's events to the clients they concern.
    fn deliver_events(&mut self) {
        for event in self.table.take_events() {
            if self.trace {
                println!("{} ms: {event:?}", self.now_ms);
            }
            let (txn, granted, failed) = match &event {
                LockEvent::Granted { txn, request } => (*txn, Some(*request), None),
                LockEvent::Wounded { txn, cancelled, .. } => {
                    self.stats.wounds += 1;
                    (*txn, None, Some(*cancelled))
                }
                LockEvent::Abandoned { txn, cancelled } => {
                    self.stats.abandoned += 1;
                    (*txn, None, Some(*cancelled))
                }
                LockEvent::Cancelled { .. } => continue,
            };
            let Some(i) = self.clients.iter().position(|client| client.txn == txn) else {
                continue;
            };
            if let Some(request) = granted {
                assert_eq!(
                    self.clients[i].phase,
                    Phase::Waiting(request),
                    "grant of a request not waited for"
                );
                self.clients[i].phase = if self.clients[i].next_op < self.clients[i].program.len() {
                    Phase::Running
                } else {
                    Phase::Locking
                };
                self.finish_lock(i);
            } else if let Some(Some(_)) = failed {
                // The failed reply to a queued request: the client aborts. A wound or an
                // abandonment without one reaches the client only through its next request,
                // heartbeat or prepare, as it would from a real leader.
                self.clients[i].doomed = true;
                self.abort(i);
            }
        }
    }

    /// A leader change: a new table at the next epoch, prepared transactions restored from
    /// their records, waiting requests failed (their clients abort).
    fn change_leader(&mut self) -> Result<(), String> {
        self.stats.leader_changes += 1;
        if self.trace {
            println!("{} ms: leader change", self.now_ms);
        }
        let epoch = Epoch(self.table.epoch().0 + 1);
        self.table = LockTable::new(epoch, self.options.clone());
        let now = self.now();
        for i in 0..CLIENT_COUNT {
            let client = &mut self.clients[i];
            match client.phase {
                Phase::Prepared { .. } => {
                    let held = client.prepared_locks.clone();
                    let priority = client.priority.expect("a prepared client has a priority");
                    self.table
                        .restore_prepared(client.txn, priority, held, now)
                        .map_err(|error| format!("restore failed: {error}"))?;
                    client.held_since = Some(epoch);
                }
                Phase::Waiting(_) => {
                    client.doomed = true;
                    self.abort(i);
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn step_client(&mut self, i: usize) -> Result<(), String> {
        if self.is_silent(i) {
            return Ok(());
        }
        let now = self.now();
        match self.clients[i].phase.clone() {
            Phase::Done | Phase::Waiting(_) => {}
            Phase::Idle => {
                if self.clients[i].committed == TXNS_PER_CLIENT {
                    self.clients[i].phase = Phase::Done;
                    return Ok(());
                }
                let program = self.random_program();
                let txn = TxnId(self.next_txn);
                self.next_txn += 1;
                let client = &mut self.clients[i];
                client.priority = Some(Priority { start: now, first_txn: txn, attempt: 0 });
                client.program = program;
                self.begin_attempt(i, txn);
            }
            Phase::Running | Phase::Locking if self.clients[i].doomed => self.abort(i),
            Phase::Running => {
                if !self.clients[i].to_lock.is_empty() {
                    return self.request_next_lock(i);
                }
                let op = self.clients[i].program[self.clients[i].next_op].clone();
                match op {
                    Op::Read { key, for_update } => {
                        let mode = if for_update { LockMode::Exclusive } else { LockMode::Shared };
                        self.clients[i].to_lock = vec![(mode, KeySpan::key(vec![key]))];
                    }
                    Op::Scan { start, end } => {
                        self.clients[i].to_lock = if self.client_switches.scans_lock_found_keys {
                            let writes = &self.clients[i].writes;
                            read_rows(&self.store, writes, start, end)
                                .into_iter()
                                .map(|(key, _)| (LockMode::Shared, KeySpan::key(vec![key])))
                                .collect()
                        } else {
                            vec![(
                                LockMode::Shared,
                                KeySpan::range(vec![start], Some(vec![end])).expect("start < end"),
                            )]
                        };
                        if self.clients[i].to_lock.is_empty() {
                            self.finish_op(i);
                            return Ok(());
                        }
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
                }
                self.request_next_lock(i)?;
            }
            Phase::Locking => {
                if !self.clients[i].to_lock.is_empty() {
                    return self.request_next_lock(i);
                }
                let client = &self.clients[i];
                let (txn, epoch) = (client.txn, client.held_since);
                let result = match epoch {
                    Some(epoch) => self.table.prepare(txn, epoch, now),
                    // Nothing locked here (a read-only program): nothing to prepare.
                    None => Ok(()),
                };
                match result {
                    Ok(()) => {
                        let mut record = self.clients[i].granted.clone();
                        if self.client_switches.prepare_records_without_reads {
                            record.retain(|(mode, _)| *mode == LockMode::Exclusive);
                        }
                        self.clients[i].prepared_locks = record;
                        let remaining = self.rng.random_range(0..4);
                        self.clients[i].phase = Phase::Prepared { remaining };
                    }
                    Err(error) => self.on_error(i, error),
                }
            }
            Phase::Prepared { remaining: 0 } => self.commit(i),
            Phase::Prepared { remaining } => {
                self.clients[i].phase = Phase::Prepared { remaining: remaining - 1 };
            }
        }
        Ok(())
    }

    fn begin_attempt(&mut self, i: usize, txn: TxnId) {
        let client = &mut self.clients[i];
        client.txn = txn;
        client.next_op = 0;
        client.observed.clear();
        client.writes.clear();
        client.to_lock.clear();
        client.granted.clear();
        client.held_since = None;
        client.doomed = false;
        client.last_heartbeat_ms = self.now_ms;
        client.phase = Phase::Running;
    }

    fn request_next_lock(&mut self, i: usize) -> Result<(), String> {
        let client = &self.clients[i];
        let (mode, span) = client.to_lock[0].clone();
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let request = LockRequest {
            id,
            txn: client.txn,
            priority: client.priority.expect("running clients have a priority"),
            mode,
            span,
            held_since: client.held_since,
        };
        if self.trace {
            println!("{} ms: client {i} {request:?}", self.now_ms);
        }
        match self.table.acquire(request, self.now()) {
            Ok(outcome) => {
                let epoch = self.table.epoch();
                let client = &mut self.clients[i];
                client.held_since.get_or_insert(epoch);
                client.last_heartbeat_ms = self.now_ms;
                match outcome {
                    Acquired::Granted => self.finish_lock(i),
                    Acquired::Waiting => {
                        self.stats.waits += 1;
                        self.clients[i].phase = Phase::Waiting(id);
                    }
                }
                Ok(())
            }
            Err(error @ Error::InvalidInput(_)) => Err(format!("client {i}: {error}")),
            Err(error) => {
                self.on_error(i, error);
                Ok(())
            }
        }
    }

    /// The first lock of `to_lock` is held: on to the next, or the operation is done.
    fn finish_lock(&mut self, i: usize) {
        let client = &mut self.clients[i];
        let lock = client.to_lock.remove(0);
        client.granted.push(lock);
        if client.to_lock.is_empty() && client.phase == Phase::Running {
            self.finish_op(i);
        }
    }

    /// Observes what the current operation reads, and moves to the next operation or to the
    /// prepare.
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
                .map(|key| (LockMode::Exclusive, KeySpan::key(vec![*key])))
                .collect();
        }
    }

    fn on_error(&mut self, i: usize, error: Error) {
        if self.trace {
            println!("{} ms: client {i}: {error}", self.now_ms);
        }
        if matches!(error, Error::LocksLost { .. }) {
            self.stats.lost_locks += 1;
        }
        assert!(error.is_retryable(), "seed {}: client {i}: {error}", self.seed);
        self.clients[i].doomed = true;
        self.abort(i);
    }

    /// Rolls the attempt back and starts the next one, with the same priority and the next
    /// attempt number. One rollback in four is lost: the abandoned attempt's locks stay until
    /// the retry wounds it or the table expires it.
    fn abort(&mut self, i: usize) {
        if self.rng.random_range(0..4) > 0 {
            self.table.release(self.clients[i].txn);
        } else {
            self.stats.lost_rollbacks += 1;
        }
        if let Some(priority) = &mut self.clients[i].priority {
            priority.attempt += 1;
        }
        self.stats.retries += 1;
        let txn = TxnId(self.next_txn);
        self.next_txn += 1;
        self.begin_attempt(i, txn);
    }

    fn commit(&mut self, i: usize) {
        let client = &mut self.clients[i];
        if self.trace {
            println!(
                "{} ms: client {i} commits {}: {:?} {:?} writes {:?}",
                self.now_ms, client.txn, client.program, client.observed, client.writes
            );
        }
        for (key, value) in &client.writes {
            match value {
                Some(value) => self.store.insert(*key, *value),
                None => self.store.remove(key),
            };
        }
        self.history.push(Committed {
            txn: client.txn.to_string(),
            program: client.program.clone(),
            observed: client.observed.clone(),
            writes: client.writes.clone(),
        });
        client.committed += 1;
        client.phase = Phase::Idle;
        client.held_since = None;
        let txn = client.txn;
        self.table.release(txn);
    }

    /// Fails when the waits-for graph of waiting clients has a cycle.
    fn check_no_deadlock(&self) -> Result<(), String> {
        let edges: BTreeMap<TxnId, Vec<TxnId>> = self
            .clients
            .iter()
            .filter(|client| matches!(client.phase, Phase::Waiting(_)))
            .map(|client| (client.txn, self.table.blockers(client.txn)))
            .collect();
        // Depth-first search from every waiting transaction.
        for &start in edges.keys() {
            let mut path = vec![start];
            let mut seen = BTreeSet::new();
            let mut stack = vec![(start, 0usize)];
            while let Some((txn, depth)) = stack.pop() {
                path.truncate(depth);
                path.push(txn);
                for &next in edges.get(&txn).into_iter().flatten() {
                    if next == start {
                        let cycle: Vec<String> = path.iter().map(ToString::to_string).collect();
                        return Err(format!(
                            "deadlock: waits-for cycle {} -> {next}",
                            cycle.join(" -> ")
                        ));
                    }
                    if seen.insert(next) {
                        stack.push((next, depth + 1));
                    }
                }
            }
        }
        Ok(())
    }

    /// Replays the committed transactions one at a time in commit order and compares what
    /// each observes with what it observed.
    fn check_history(&self) -> Result<(), String> {
        let history: Vec<&Committed> = self.history.iter().collect();
        check_serial_replay(&initial_store(), &history, &self.store, "commit order")
    }
}

/// Runs one seed and returns its failure, with the seed.
fn run_seed(
    seed: u64,
    switches: LockSwitches,
    client_switches: ClientSwitches,
) -> Result<Stats, String> {
    run_caught(seed, || {
        let mut sim = Sim::new(seed, switches, client_switches);
        sim.run().map(|()| sim.stats)
    })
}

/// Returns the first seed of the default set that fails with the switches on, with its failure.
fn first_catch(switches: LockSwitches, client_switches: ClientSwitches) -> Option<(u64, String)> {
    common::first_catch(DEFAULT_SEEDS, |seed| run_seed(seed, switches, client_switches))
}

#[test]
fn transactions_are_serializable_without_deadlock_or_starvation() {
    let run = |seed| run_seed(seed, LockSwitches::default(), ClientSwitches::default());
    let (totals, seeds) = run_all(DEFAULT_SEEDS, run, |totals: &mut Stats, stats| {
        totals.wounds += stats.wounds;
        totals.abandoned += stats.abandoned;
        totals.lost_locks += stats.lost_locks;
        totals.leader_changes += stats.leader_changes;
        totals.waits += stats.waits;
        totals.retries += stats.retries;
        totals.lost_rollbacks += stats.lost_rollbacks;
    });
    println!("{seeds} seeds passed: {totals:?}");
    // The faults the simulation exists for did happen.
    if seeds >= 50 {
        assert!(totals.wounds > 0 && totals.abandoned > 0 && totals.lost_locks > 0);
        assert!(totals.leader_changes > 0 && totals.waits > 0 && totals.lost_rollbacks > 0);
    }
}

#[test]
fn suite_catches_older_transactions_waiting_for_younger_ones() {
    let switches = LockSwitches { older_waits: true, ..LockSwitches::default() };
    let (seed, failure) =
        first_catch(switches, ClientSwitches::default()).expect("older_waits went uncaught");
    println!("older_waits caught by seed {seed}: {failure}");
    assert!(failure.contains("deadlock"), "{failure}");
}

#[test]
fn suite_catches_wounded_prepared_transactions() {
    let switches = LockSwitches { wound_prepared: true, ..LockSwitches::default() };
    let (seed, failure) =
        first_catch(switches, ClientSwitches::default()).expect("wound_prepared went uncaught");
    println!("wound_prepared caught by seed {seed}: {failure}");
    // Either a read overwritten before commit, or a wounded prepared transaction's locks
    // restored over those of the transaction that wounded it.
    assert!(
        failure.contains("not serializable") || failure.contains("restore failed"),
        "{failure}"
    );
}

#[test]
fn suite_catches_commits_on_lost_locks() {
    let switches = LockSwitches { ignore_lost_locks: true, ..LockSwitches::default() };
    let (seed, failure) =
        first_catch(switches, ClientSwitches::default()).expect("ignore_lost_locks went uncaught");
    println!("ignore_lost_locks caught by seed {seed}: {failure}");
    assert!(failure.contains("not serializable"), "{failure}");
}

#[test]
fn suite_catches_scans_without_span_locks() {
    let client_switches =
        ClientSwitches { scans_lock_found_keys: true, ..ClientSwitches::default() };
    let (seed, failure) = first_catch(LockSwitches::default(), client_switches)
        .expect("scans_lock_found_keys went uncaught");
    println!("scans_lock_found_keys caught by seed {seed}: {failure}");
    assert!(failure.contains("not serializable"), "{failure}");
}

#[test]
fn suite_catches_prepare_records_without_reads() {
    let client_switches =
        ClientSwitches { prepare_records_without_reads: true, ..ClientSwitches::default() };
    let (seed, failure) = first_catch(LockSwitches::default(), client_switches)
        .expect("prepare_records_without_reads went uncaught");
    println!("prepare_records_without_reads caught by seed {seed}: {failure}");
    assert!(failure.contains("not serializable"), "{failure}");
}
