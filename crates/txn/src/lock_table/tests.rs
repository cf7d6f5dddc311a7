//! Lock table tests: golden scripts (one behaviour per file in `testscripts/lock_table/`) and a
//! property test that random calls keep the invariants and answer every request exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use proptest::prelude::*;
use test_each_file::test_each_path;

use super::*;
use crate::script_support::{ScriptResult, parse_txn, show_txn, take_u64};

const MS: u64 = 1_000_000;

/// Runs lock-table commands from a goldenscript; after each command it prints the events and
/// checks the invariants.
///
/// Transactions are `tN` (id N, priority N unless `prio=START[/FIRST[/ATTEMPT]]`); spans are `KEY`,
/// `START..END` or `START..`; modes are `s` and `x`; times are in milliseconds.
/// - `table [epoch=E] [abandon=MS] [older_waits] [wound_prepared] [ignore_lost_locks]`:
///   a new, empty table (a new leader); `restore` then brings back prepared transactions.
/// - `acquire TXN MODE SPAN [prio=P] [since=E|none] [at=MS]`: ask for a lock; `prio`
///   defaults to the transaction's first one, `since` to the epoch of its first grant.
/// - `heartbeat TXN [since=E] [at=MS]`, `prepare TXN [since=E] [at=MS]`, `release TXN`.
/// - `cancel TXN rN`: withdraw a queued request.
/// - `expire at=MS`: release abandoned transactions.
/// - `restore TXN MODE=SPAN... [prio=P]`: restore a prepared transaction's locks.
/// - `blockers TXN`, `state`: show what a transaction waits for, or the whole table.
struct LockTableRunner {
    table: LockTable,
    now_ms: u64,
    next_request: u64,
    /// The epoch each transaction first got a lock under, as its client would remember it.
    held_since: BTreeMap<TxnId, Epoch>,
    /// Requests not answered yet, as a client would track them.
    waiting: BTreeMap<RequestId, TxnId>,
    /// The priority each transaction first asked with (the default for its later requests).
    priorities: BTreeMap<TxnId, Priority>,
}

impl LockTableRunner {
    fn new() -> LockTableRunner {
        LockTableRunner {
            table: LockTable::new(Epoch(1), LockTableOptions::default()),
            now_ms: 0,
            next_request: 1,
            held_since: BTreeMap::new(),
            waiting: BTreeMap::new(),
            priorities: BTreeMap::new(),
        }
    }
}

/// Parses `START[/FIRST[/ATTEMPT]]`; FIRST defaults to START, ATTEMPT to 0.
fn parse_priority(text: &str) -> ScriptResult<Priority> {
    let mut parts = text.split('/');
    let start = parts.next().ok_or("empty priority")?;
    let first = parts.next().unwrap_or(start);
    let attempt = parts.next().unwrap_or("0");
    Ok(Priority {
        start: Timestamp::from_nanos(start.parse()?),
        first_txn: TxnId(first.parse()?),
        attempt: attempt.parse()?,
    })
}

fn parse_mode(text: &str) -> ScriptResult<LockMode> {
    match text {
        "s" => Ok(LockMode::Shared),
        "x" => Ok(LockMode::Exclusive),
        other => Err(format!("unknown mode {other}").into()),
    }
}

fn parse_span(text: &str) -> ScriptResult<KeySpan> {
    Ok(match text.split_once("..") {
        None => KeySpan::key(text.as_bytes()),
        Some((start, "")) => KeySpan::range(start.as_bytes(), None)?,
        Some((start, end)) => KeySpan::range(start.as_bytes(), Some(end.as_bytes().to_vec()))?,
    })
}

fn show_event(event: &LockEvent) -> String {
    let cancelled = |request: &Option<RequestId>| {
        request.map(|request| format!(", {request} fails")).unwrap_or_default()
    };
    match event {
        LockEvent::Granted { txn, request } => format!("{} granted {request}", show_txn(*txn)),
        LockEvent::Wounded { txn, wound, cancelled: request } => format!(
            "{} wounded by {} ({} {}){}",
            show_txn(*txn),
            show_txn(wound.by),
            wound.requested,
            wound.span,
            cancelled(request)
        ),
        LockEvent::Abandoned { txn, cancelled: request } => {
            format!("{} abandoned{}", show_txn(*txn), cancelled(request))
        }
        LockEvent::Cancelled { txn, request } => {
            format!("{} released, {request} fails", show_txn(*txn))
        }
    }
}

impl goldenscript::Runner for LockTableRunner {
    type Command = goldenscript::Command;

    fn run(
        &mut self,
        command: &goldenscript::Command,
        _: &goldenscript::Context,
    ) -> ScriptResult<String> {
        let mut args = command.consume_args();
        let mut output = String::new();
        if let Some(at) = take_u64(&mut args, "at")? {
            self.now_ms = at;
        }
        let now = Timestamp::from_nanos(self.now_ms * MS);
        let since_arg = args.take_key("since").map(str::to_owned);
        let since = |runner: &LockTableRunner, txn: TxnId| -> ScriptResult<Option<Epoch>> {
            Ok(match since_arg.as_deref() {
                Some("none") => None,
                Some(epoch) => Some(Epoch(epoch.parse()?)),
                None => runner.held_since.get(&txn).copied(),
            })
        };
        match command.name.as_str() {
            "table" => {
                let mut options = LockTableOptions::default();
                if let Some(ms) = take_u64(&mut args, "abandon")? {
                    options.abandon_after = Duration::from_millis(ms);
                }
                while let Some(flag) = args.next_pos() {
                    match flag {
                        "older_waits" => options.switches.older_waits = true,
                        "wound_prepared" => options.switches.wound_prepared = true,
                        "ignore_lost_locks" => options.switches.ignore_lost_locks = true,
                        other => return Err(format!("unknown flag {other}").into()),
                    }
                }
                let epoch = Epoch(take_u64(&mut args, "epoch")?.unwrap_or(1));
                self.table = LockTable::new(epoch, options);
                self.waiting.clear();
            }
            "acquire" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let mode = parse_mode(args.next_pos().ok_or("missing mode")?)?;
                let span = parse_span(args.next_pos().ok_or("missing span")?)?;
                let priority = match (args.take_key("prio"), self.priorities.get(&txn)) {
                    (Some(text), _) => parse_priority(text)?,
                    (None, Some(priority)) => *priority,
                    (None, None) => parse_priority(&txn.0.to_string())?,
                };
                self.priorities.entry(txn).or_insert(priority);
                let id = RequestId(self.next_request);
                self.next_request += 1;
                let held_since = since(self, txn)?;
                let request = LockRequest { id, txn, priority, mode, span, held_since };
                let outcome = self.table.acquire(request, now)?;
                self.held_since.entry(txn).or_insert(self.table.epoch());
                match outcome {
                    Acquired::Granted => writeln!(output, "{id}: granted")?,
                    Acquired::Waiting => {
                        self.waiting.insert(id, txn);
                        writeln!(output, "{id}: waiting")?;
                    }
                }
            }
            "heartbeat" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let epoch = since(self, txn)?.ok_or("no epoch to heartbeat under")?;
                self.table.heartbeat(txn, epoch, now)?;
                writeln!(output, "ok")?;
            }
            "prepare" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let epoch = since(self, txn)?.ok_or("no epoch to prepare under")?;
                self.table.prepare(txn, epoch, now)?;
                writeln!(output, "prepared")?;
            }
            "cancel" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let request = args.next_pos().ok_or("missing request")?;
                let request = RequestId(request.trim_start_matches('r').parse()?);
                writeln!(output, "cancelled: {}", self.table.cancel(txn, request))?;
            }
            "release" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                self.table.release(txn);
                self.held_since.remove(&txn);
            }
            "expire" => self.table.expire(now),
            "restore" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let priority = match args.take_key("prio") {
                    Some(text) => parse_priority(text)?,
                    None => parse_priority(&txn.0.to_string())?,
                };
                let mut held = Vec::new();
                while let Some((mode, span)) = args.next_key() {
                    held.push((parse_mode(mode)?, parse_span(span)?));
                }
                self.table.restore_prepared(txn, priority, held, now)?;
                self.held_since.insert(txn, self.table.epoch());
            }
            "blockers" => {
                let txn = parse_txn(args.next_pos().ok_or("missing txn")?)?;
                let blockers: Vec<String> =
                    self.table.blockers(txn).into_iter().map(show_txn).collect();
                writeln!(output, "{} waits for [{}]", show_txn(txn), blockers.join(", "))?;
            }
            "state" => {
                writeln!(output, "epoch {}", self.table.epoch())?;
                for (txn, entry) in &self.table.txns {
                    let held: Vec<String> =
                        entry.held.iter().map(|(mode, span)| format!("{mode} {span}")).collect();
                    let standing = match &entry.standing {
                        TxnStanding::Active => "active".to_owned(),
                        TxnStanding::Prepared => "prepared".to_owned(),
                        TxnStanding::Wounded(wound) => format!("wounded by {}", show_txn(wound.by)),
                    };
                    writeln!(output, "{} {standing}: holds [{}]", show_txn(*txn), held.join(", "))?;
                }
                for ((priority, _), waiter) in &self.table.queue {
                    writeln!(
                        output,
                        "queue: {} {} {} {} (priority {priority})",
                        waiter.id,
                        show_txn(waiter.txn),
                        waiter.mode,
                        waiter.span
                    )?;
                }
            }
            name => return Err(format!("unknown command {name}").into()),
        }
        args.reject_next()?;
        for event in self.table.take_events() {
            writeln!(output, "{}", show_event(&event))?;
        }
        self.table.check_invariants()?;
        Ok(output)
    }
}

test_each_path! { in "crates/txn/testscripts/lock_table" as scripts => run_script }

fn run_script(path: &std::path::Path) {
    goldenscript::run(&mut LockTableRunner::new(), path).expect("goldenscript failed");
}

/// One random call on the table.
#[derive(Clone, Debug)]
enum Call {
    Acquire {
        txn: u8,
        exclusive: bool,
        start: u8,
        width: u8,
    },
    Heartbeat {
        txn: u8,
    },
    Prepare {
        txn: u8,
    },
    Release {
        txn: u8,
    },
    Rollback {
        txn: u8,
    },
    Expire,
    Tick {
        ms: u16,
    },
    /// A new leader: a new table at the next epoch with the prepared transactions restored.
    NewLeader,
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        6 => (0..8u8, any::<bool>(), 0..8u8, 0..4u8)
            .prop_map(|(txn, exclusive, start, width)| Call::Acquire { txn, exclusive, start, width }),
        1 => (0..8u8).prop_map(|txn| Call::Heartbeat { txn }),
        1 => (0..8u8).prop_map(|txn| Call::Prepare { txn }),
        1 => (0..8u8).prop_map(|txn| Call::Release { txn }),
        1 => (0..8u8).prop_map(|txn| Call::Rollback { txn }),
        1 => Just(Call::Expire),
        1 => (0..3000u16).prop_map(|ms| Call::Tick { ms }),
        1 => Just(Call::NewLeader),
    ]
}

/// Transaction `n` of the property test: ids 1..=8; ids n and n + 4 are two attempts of one
/// transaction (same start and first id, attempts 0 and 1), so retries meet their earlier
/// attempts.
fn test_txn(n: u8) -> (TxnId, Priority) {
    let txn = TxnId(u128::from(n) + 1);
    let first = TxnId(u128::from(n % 4) + 1);
    let priority = Priority {
        start: Timestamp::from_nanos(u64::from(n % 4)),
        first_txn: first,
        attempt: u32::from(n / 4),
    };
    (txn, priority)
}

proptest! {
    /// Random calls keep every invariant, and every request is answered exactly once: at
    /// once, or later by exactly one event (or, at a leader change, by the old leader's
    /// refusal). Clients remember the epoch of their first grant, as real ones do, so lost
    /// locks are exercised: a transaction that lost them never prepares.
    #[test]
    fn random_calls_keep_the_invariants(calls in proptest::collection::vec(call(), 1..150)) {
        let mut table = LockTable::new(Epoch(1), LockTableOptions::default());
        let mut now_ms = 0u64;
        let mut next_request = 0u64;
        let mut open: BTreeMap<RequestId, TxnId> = BTreeMap::new();
        let mut answered: BTreeSet<RequestId> = BTreeSet::new();
        // What each client remembers: the epoch of its first grant, and whether it holds
        // every lock granted since (it is told of wounds, abandonment and leader changes).
        let mut held_since: BTreeMap<TxnId, Epoch> = BTreeMap::new();
        for call in calls {
            let now = Timestamp::from_nanos(now_ms * MS);
            match call {
                Call::Acquire { txn, exclusive, start, width } => {
                    let (txn, priority) = test_txn(txn);
                    let span = if width == 0 {
                        KeySpan::key(vec![start])
                    } else if width == 3 {
                        KeySpan::range(vec![start], None).unwrap()
                    } else {
                        KeySpan::range(vec![start], Some(vec![start + width])).unwrap()
                    };
                    let mode = if exclusive { LockMode::Exclusive } else { LockMode::Shared };
                    next_request += 1;
                    let id = RequestId(next_request);
                    let since = held_since.get(&txn).copied();
                    let request = LockRequest { id, txn, priority, mode, span, held_since: since };
                    match table.acquire(request, now) {
                        Ok(outcome) => {
                            held_since.entry(txn).or_insert(table.epoch());
                            if outcome == Acquired::Waiting {
                                open.insert(id, txn);
                            } else {
                                answered.insert(id);
                            }
                        }
                        Err(error) => {
                            prop_assert!(since.is_some() || !error.is_retryable() || table.standing(txn).is_some(),
                                "a first request failed with {}", error);
                            answered.insert(id);
                        }
                    }
                }
                Call::Heartbeat { txn } => {
                    let (txn, _) = test_txn(txn);
                    if let Some(epoch) = held_since.get(&txn) {
                        let _ = table.heartbeat(txn, *epoch, now);
                    }
                }
                Call::Prepare { txn } => {
                    let (txn, _) = test_txn(txn);
                    if let Some(epoch) = held_since.get(&txn).copied() {
                        let prepared = table.prepare(txn, epoch, now);
                        // A transaction prepares only on locks taken under the current epoch
                        // that the table still holds for it.
                        if prepared.is_ok() {
                            prop_assert_eq!(epoch, table.epoch());
                            prop_assert_eq!(table.standing(txn), Some(&TxnStanding::Prepared));
                        }
                    }
                }
                Call::Release { txn } => {
                    let (txn, _) = test_txn(txn);
                    table.release(txn);
                    held_since.remove(&txn);
                }
                Call::Rollback { txn } => {
                    let (txn, _) = test_txn(txn);
                    let prepared = table.standing(txn) == Some(&TxnStanding::Prepared);
                    prop_assert_eq!(table.rollback(txn).is_err(), prepared);
                    if !prepared {
                        held_since.remove(&txn);
                    }
                }
                Call::Expire => table.expire(now),
                Call::Tick { ms } => now_ms += u64::from(ms),
                Call::NewLeader => {
                    let prepared: Vec<(TxnId, Priority, Vec<(LockMode, KeySpan)>)> = table
                        .txns
                        .iter()
                        .filter(|(_, entry)| entry.standing == TxnStanding::Prepared)
                        .map(|(txn, entry)| (*txn, entry.priority, entry.held.clone()))
                        .collect();
                    // The old leader's queued requests fail with it.
                    for (request, _) in std::mem::take(&mut open) {
                        answered.insert(request);
                    }
                    let _ = table.take_events();
                    table = LockTable::new(Epoch(table.epoch().0 + 1), LockTableOptions::default());
                    for (txn, priority, held) in prepared {
                        prop_assert!(table.restore_prepared(txn, priority, held, now).is_ok());
                        held_since.insert(txn, table.epoch());
                    }
                }
            }
            for event in table.take_events() {
                let request = match event {
                    LockEvent::Granted { request, .. } | LockEvent::Cancelled { request, .. } => Some(request),
                    LockEvent::Wounded { cancelled, .. } | LockEvent::Abandoned { cancelled, .. } => cancelled,
                };
                if let Some(request) = request {
                    prop_assert!(open.remove(&request).is_some(), "{request} answered twice or never asked");
                    prop_assert!(answered.insert(request));
                }
            }
            if let Err(broken) = table.check_invariants() {
                prop_assert!(false, "{}", broken);
            }
            // Every open request is queued in the table.
            for (request, txn) in &open {
                prop_assert!(!table.blockers(*txn).is_empty(), "{request} of {txn} is open but not queued");
            }
        }
        // Releasing everyone answers every open request exactly once and leaves the table empty.
        for n in 0..8u8 {
            table.release(test_txn(n).0);
        }
        for event in table.take_events() {
            if let LockEvent::Granted { request, .. } | LockEvent::Cancelled { request, .. } = event {
                prop_assert!(open.remove(&request).is_some(), "{request} answered twice");
            }
        }
        prop_assert!(open.is_empty(), "requests never answered: {:?}", open);
        prop_assert!(table.is_empty() && table.queue.is_empty() && table.key_locks.is_empty() && table.span_locks.is_empty());
    }
}
