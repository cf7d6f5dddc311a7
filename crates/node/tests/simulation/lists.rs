//! The lists: list-append transactions across ranges under the faults, checked for strict
//! serializability by `adya` (Elle's algorithm: write-write, write-read and read-write
//! dependencies inferred from the lists, with real-time edges).
//!
//! - Eight keys, two in each range the splitter makes (`k01/list` after `k01`, and so on, so
//!   that the workers' scans skip them and the final scan leaves them out: `is_list`). A
//!   key's value is its list, numbers separated by spaces.
//! - **Appenders** run read-write transactions of one to four micro-operations on random keys:
//!   reads (under locks) and appends of values unique in the run (a read of the list under
//!   lock, then a write of it with the value added). An attempt that aborts never happened
//!   (`fail`) and the next one appends new values; a commit of unknown outcome may have
//!   happened (`info`), and its appender goes on as a new process, as Elle requires.
//! - **Readers** read two to four keys lock-free in strong read-only transactions, from the
//!   leaders or from followers.
//! - Every event takes its place in the client host's global sequence, the order in which
//!   things happened there, so a transaction that completed before another was invoked comes
//!   first in the history: real-time order. At the end the history, in Elle's JSON format,
//!   must be strict serializable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use meridian_client::{Client, ReadFrom, ReadTimestamp, TxnError};
use meridian_raft::SplitMix64;
use meridian_rpc::dial::Dialer;
use parking_lot::Mutex;

use crate::workload::{Shared, client};

/// The keys: two in each range the splitter makes.
const KEYS: [&str; 8] = [
    "k01/list", "k02/list", "k04/list", "k05/list", "k07/list", "k08/list", "k10/list", "k11/list",
];
/// Appenders and readers, and the transactions each runs.
pub const APPENDERS: usize = 2;
pub const READERS: usize = 1;
const TRANSACTIONS: usize = 25;
/// A transaction of unknown outcome ends its process; the next one gets an id this far on.
const PROCESS_STRIDE: u64 = 100;

/// Whether `key` is one of the lists.
pub fn is_list(key: &[u8]) -> bool {
    KEYS.iter().any(|list| list.as_bytes() == key)
}

/// One micro-operation, as Elle writes it: `["append", key, value]` or `["r", key, list]`.
#[derive(Clone, Debug)]
enum Micro {
    Append(&'static str, u64),
    /// A read, and the list it returned once completed.
    Read(&'static str, Option<Vec<u64>>),
}

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// It did not happen.
    Fail,
    /// It may have happened.
    Info,
}

/// One transaction: its place in the global sequence when invoked and completed.
#[derive(Clone, Debug)]
struct Transaction {
    process: u64,
    invoked: u64,
    completed: u64,
    outcome: Outcome,
    micros: Vec<Micro>,
}

/// What the lists' transactions did.
#[derive(Default)]
pub struct Lists {
    transactions: Mutex<Vec<Transaction>>,
    next_value: Mutex<u64>,
    /// Values that are no list.
    malformed: Mutex<Vec<String>>,
    /// Transactions that committed, once checked (for the report).
    pub committed: AtomicUsize,
}

impl Lists {
    fn fresh_value(&self) -> u64 {
        let mut next = self.next_value.lock();
        *next += 1;
        *next
    }

    /// The history in Elle's JSON lines: invocations and completions in sequence order.
    pub fn history(&self) -> String {
        let transactions = self.transactions.lock();
        let mut events: Vec<(u64, String)> = Vec::new();
        for txn in transactions.iter() {
            let micros = |completed: bool| -> String {
                let micros: Vec<String> = txn
                    .micros
                    .iter()
                    .map(|micro| match micro {
                        Micro::Append(key, value) => format!("[\"append\",\"{key}\",{value}]"),
                        Micro::Read(key, Some(list)) if completed => {
                            let list: Vec<String> = list.iter().map(u64::to_string).collect();
                            format!("[\"r\",\"{key}\",[{}]]", list.join(","))
                        }
                        Micro::Read(key, _) => format!("[\"r\",\"{key}\",null]"),
                    })
                    .collect();
                format!("[{}]", micros.join(","))
            };
            let kind = match txn.outcome {
                Outcome::Ok => "ok",
                Outcome::Fail => "fail",
                Outcome::Info => "info",
            };
            let line = |kind: &str, value: String| {
                format!(
                    "{{\"type\":\"{kind}\",\"f\":\"txn\",\"process\":{},\"value\":{value}}}",
                    txn.process
                )
            };
            events.push((txn.invoked, line("invoke", micros(false))));
            events.push((txn.completed, line(kind, micros(txn.outcome == Outcome::Ok))));
        }
        events.sort_by_key(|(sequence, _)| *sequence);
        events.into_iter().map(|(_, line)| line + "\n").collect()
    }

    /// Checks the history for strict serializability; returns how many transactions
    /// committed.
    pub fn check(&self) -> Result<usize, String> {
        if let Some(value) = self.malformed.lock().first() {
            return Err(format!("a list key holds {value:?}, which is no list"));
        }
        let committed =
            self.transactions.lock().iter().filter(|txn| txn.outcome == Outcome::Ok).count();
        let text = self.history();
        let history = adya::History::from_json(&text)
            .map_err(|error| format!("the lists' history does not parse: {error}"))?;
        let options = adya::Opts {
            models: vec!["strict-serializable".into()],
            timeout: Duration::from_secs(10),
            ..adya::Opts::default()
        };
        let report = adya::check(&history, adya::Workload::ListAppend, &options);
        match report.valid {
            adya::Valid::False => Err(format!(
                "the lists' history is not strict serializable: {:?} ({committed} committed)\n{text}",
                report.anomaly_types
            )),
            _ => Ok(committed),
        }
    }
}

/// A stored list (none if the key was never written); a value that is no list is noted.
fn decode(lists: &Lists, value: Option<Vec<u8>>) -> Vec<u64> {
    let Some(value) = value else { return Vec::new() };
    let text = String::from_utf8_lossy(&value);
    let parsed: Result<Vec<u64>, _> = text.split_whitespace().map(str::parse).collect();
    parsed.unwrap_or_else(|_| {
        lists.malformed.lock().push(text.into_owned());
        Vec::new()
    })
}

fn encode(list: &[u64]) -> Vec<u8> {
    list.iter().map(u64::to_string).collect::<Vec<_>>().join(" ").into_bytes()
}

/// Random micro-operations on distinct keys: one to four, appends with values unique in the
/// run unless `read_only`.
fn draw(lists: &Lists, rng: &mut SplitMix64, read_only: bool) -> Vec<Micro> {
    let count = if read_only { 2 + rng.next_u64() % 3 } else { 1 + rng.next_u64() % 4 };
    let mut keys: Vec<&'static str> = KEYS.to_vec();
    let mut micros = Vec::new();
    for _ in 0..count {
        let key = keys.remove(rng.next_u64() as usize % keys.len());
        if read_only || rng.next_u64().is_multiple_of(2) {
            micros.push(Micro::Read(key, None));
        } else {
            micros.push(Micro::Append(key, lists.fresh_value()));
        }
    }
    micros
}

/// Runs `micros` in the read-write transaction `txn`; fills in the reads.
async fn read_write(
    lists: &Lists,
    txn: &mut meridian_client::Transaction<'_>,
    micros: &mut [Micro],
) -> Result<(), TxnError> {
    let mut seen: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for micro in micros.iter_mut() {
        let key = match micro {
            Micro::Append(key, _) | Micro::Read(key, _) => *key,
        };
        if !seen.contains_key(key) {
            let list = decode(lists, txn.get(key.as_bytes()).await?);
            seen.insert(key, list);
        }
        let list = seen.get_mut(key).expect("just read");
        match micro {
            Micro::Append(_, value) => {
                list.push(*value);
                txn.put(key.as_bytes(), &encode(list))?;
            }
            Micro::Read(_, read) => *read = Some(list.clone()),
        }
    }
    Ok(())
}

/// An appender: read-write transactions, each attempt recorded.
pub async fn appender(dialer: Dialer, shared: Arc<Shared>, index: usize, seed: u64) {
    let client = client(&dialer, Duration::from_secs(5));
    let lists = &shared.lists;
    let mut rng = SplitMix64::new(seed);
    let mut process = index as u64;
    for number in 0..TRANSACTIONS {
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 1_500)).await;
        shared.doing.lock().insert(format!("appender {index}"), format!("transaction {number}"));
        let mut txn = client.begin();
        // Aborted attempts are retried (new values each time) a few times.
        for _ in 0..4 {
            let mut micros = draw(lists, &mut rng, false);
            let invoked = shared.record.next_sequence();
            let outcome = match read_write(lists, &mut txn, &mut micros).await {
                // Failed before its commit was asked for: it never happened.
                Err(_) => Outcome::Fail,
                Ok(()) => match txn.commit().await {
                    Ok(_) => Outcome::Ok,
                    Err(error) if error.is_retryable() => Outcome::Fail,
                    // Ambiguous, or refused in a way that does not say it had no effect.
                    Err(_) => Outcome::Info,
                },
            };
            let completed = shared.record.next_sequence();
            lists.transactions.lock().push(Transaction {
                process,
                invoked,
                completed,
                outcome,
                micros,
            });
            match outcome {
                Outcome::Ok => break,
                Outcome::Info => {
                    process += PROCESS_STRIDE;
                    break;
                }
                Outcome::Fail => txn = txn.retry().await,
            }
        }
    }
}

/// A reader: strong read-only transactions, from leaders or followers.
pub async fn reader(dialer: Dialer, shared: Arc<Shared>, index: usize, seed: u64) {
    let client = client(&dialer, Duration::from_secs(5));
    let lists = &shared.lists;
    let mut rng = SplitMix64::new(seed);
    let process = 1_000 + index as u64;
    for number in 0..TRANSACTIONS {
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 1_000)).await;
        shared.doing.lock().insert(format!("list reader {index}"), format!("read {number}"));
        let mut micros = draw(lists, &mut rng, true);
        let from =
            if rng.next_u64().is_multiple_of(2) { ReadFrom::Follower } else { ReadFrom::Leader };
        let invoked = shared.record.next_sequence();
        let outcome = match read_only(lists, &client, from, &mut micros).await {
            Ok(()) => Outcome::Ok,
            Err(_) => Outcome::Fail,
        };
        let completed = shared.record.next_sequence();
        let txn = Transaction { process, invoked, completed, outcome, micros };
        lists.transactions.lock().push(txn);
    }
}

async fn read_only(
    lists: &Lists,
    client: &Client,
    from: ReadFrom,
    micros: &mut [Micro],
) -> Result<(), String> {
    let mut snapshot = client.read_only(ReadTimestamp::Strong).read_from(from);
    for micro in micros.iter_mut() {
        if let Micro::Read(key, read) = micro {
            let value = snapshot.get(key.as_bytes()).await.map_err(|error| error.to_string())?;
            *read = Some(decode(lists, value));
        }
    }
    Ok(())
}
