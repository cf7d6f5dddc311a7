//! What the transaction simulations share: random transaction programs over single-byte keys,
//! what their operations observe, and the serial replay that checks a committed history.

#![allow(dead_code)]

use std::collections::BTreeMap;

use rand::Rng;
use rand::rngs::StdRng;

/// One operation of a transaction's program.
#[derive(Clone, Debug)]
pub enum Op {
    /// Read a key under a shared lock (an exclusive one when `for_update`).
    Read { key: u8, for_update: bool },
    /// Read the keys in `[start, end)` under a shared span lock.
    Scan { start: u8, end: u8 },
    /// Buffer a write of a value unique to this attempt.
    Write { key: u8 },
    /// Buffer a delete.
    Delete { key: u8 },
}

/// What an operation observed (a value or none, a scan's rows), or what it wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    Value(Option<u64>),
    Rows(Vec<(u8, u64)>),
    Wrote(Option<u64>),
}

/// A committed transaction as a history records it.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The attempt that committed, for messages.
    pub txn: String,
    pub program: Vec<Op>,
    pub observed: Vec<Observed>,
    pub writes: BTreeMap<u8, Option<u64>>,
}

/// Returns a random program of one to five operations on keys `0..key_count`; scans stay
/// within `[0, key_count)` and below `scan_limit(start)`.
pub fn random_program(rng: &mut StdRng, key_count: u8, scan_limit: impl Fn(u8) -> u8) -> Vec<Op> {
    let length = rng.random_range(1..=5);
    (0..length)
        .map(|_| {
            let key = rng.random_range(0..key_count);
            match rng.random_range(0..100) {
                0..35 => Op::Read { key, for_update: false },
                35..42 => Op::Read { key, for_update: true },
                42..57 => {
                    let end = rng.random_range(key + 1..=scan_limit(key));
                    Op::Scan { start: key, end }
                }
                57..90 => Op::Write { key },
                _ => Op::Delete { key },
            }
        })
        .collect()
}

/// Reads `[start, end)` from `store` overlaid with a transaction's buffered writes.
pub fn read_rows(
    store: &BTreeMap<u8, u64>,
    writes: &BTreeMap<u8, Option<u64>>,
    start: u8,
    end: u8,
) -> Vec<(u8, u64)> {
    (start..end)
        .filter_map(|key| read_value(store, writes, key).map(|value| (key, value)))
        .collect()
}

/// Reads a key from `store` overlaid with a transaction's buffered writes.
pub fn read_value(
    store: &BTreeMap<u8, u64>,
    writes: &BTreeMap<u8, Option<u64>>,
    key: u8,
) -> Option<u64> {
    match writes.get(&key) {
        Some(buffered) => *buffered,
        None => store.get(&key).copied(),
    }
}

/// Replays committed transactions one at a time, in the order given, from `initial`, and
/// compares what each observes with what it observed; then compares the result with `store`.
pub fn check_serial_replay(
    initial: &BTreeMap<u8, u64>,
    history: &[&Committed],
    store: &BTreeMap<u8, u64>,
    order_name: &str,
) -> Result<(), String> {
    let mut replayed = initial.clone();
    for (position, txn) in history.iter().enumerate() {
        let mut writes: BTreeMap<u8, Option<u64>> = BTreeMap::new();
        let mut last_writes = BTreeMap::new();
        for (op, observed) in txn.program.iter().zip(&txn.observed) {
            let expected = match (op, observed) {
                (Op::Read { key, .. }, _) => Observed::Value(read_value(&replayed, &writes, *key)),
                (Op::Scan { start, end }, _) => {
                    Observed::Rows(read_rows(&replayed, &writes, *start, *end))
                }
                (Op::Write { key } | Op::Delete { key }, Observed::Wrote(value)) => {
                    writes.insert(*key, *value);
                    last_writes.insert(*key, *value);
                    Observed::Wrote(*value)
                }
                (Op::Write { .. } | Op::Delete { .. }, other) => {
                    return Err(format!("a write recorded as {other:?}"));
                }
            };
            if &expected != observed {
                return Err(format!(
                    "not serializable: transaction {} ({order_name} #{position}) observed \
                     {observed:?} at {op:?}, a serial execution in {order_name} gives {expected:?}",
                    txn.txn
                ));
            }
        }
        if last_writes != txn.writes {
            return Err(format!("transaction {}'s writes differ from its operations", txn.txn));
        }
        for (key, value) in &txn.writes {
            match value {
                Some(value) => replayed.insert(*key, *value),
                None => replayed.remove(key),
            };
        }
    }
    if &replayed != store {
        return Err(format!(
            "the store differs from a serial replay in {order_name} (lost or partial commits): \
             store {store:?}, replay {replayed:?}"
        ));
    }
    Ok(())
}

/// The seeds to run: the one in `MERIDIAN_TXN_SIM_SEED`, or `MERIDIAN_TXN_SIM_SEEDS` of them
/// (`default_count` when unset) from zero.
pub fn seeds(default_count: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("MERIDIAN_TXN_SIM_SEED") {
        return vec![seed.parse().expect("MERIDIAN_TXN_SIM_SEED is a number")];
    }
    let count = std::env::var("MERIDIAN_TXN_SIM_SEEDS")
        .map_or(default_count, |count| count.parse().expect("MERIDIAN_TXN_SIM_SEEDS is a number"));
    (0..count).collect()
}

/// Runs one seed; a panic inside (a core's assertion of a broken invariant) is a finding like
/// any other, reported with the seed instead of unwinding the test.
pub fn run_caught<S>(seed: u64, run: impl FnOnce() -> Result<S, String>) -> Result<S, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(result) => result.map_err(|failure| format!("seed {seed}: {failure}")),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                .unwrap_or_default();
            Err(format!("seed {seed}: invariant asserted: {message}"))
        }
    }
}

/// Runs every seed, folding their statistics; panics with the first failure and how to
/// replay it. Returns the statistics and the number of seeds.
pub fn run_all<S: Default>(
    default_count: u64,
    run: impl Fn(u64) -> Result<S, String>,
    fold: impl Fn(&mut S, S),
) -> (S, usize) {
    let seeds = seeds(default_count);
    let mut totals = S::default();
    for &seed in &seeds {
        match run(seed) {
            Ok(stats) => fold(&mut totals, stats),
            Err(failure) => panic!("{failure}\nreplay with MERIDIAN_TXN_SIM_SEED={seed}"),
        }
    }
    (totals, seeds.len())
}

/// Returns the first seed whose run fails, with its failure.
pub fn first_catch<S>(
    default_count: u64,
    run: impl Fn(u64) -> Result<S, String>,
) -> Option<(u64, String)> {
    seeds(default_count).into_iter().find_map(|seed| run(seed).err().map(|failure| (seed, failure)))
}
