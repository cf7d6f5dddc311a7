//! The history the client host records, and the invariants checked on it after a run.
//!
//! Every operation is recorded with its invocation and completion in one global sequence (the
//! client host runs every worker, so "A completed before B was invoked" is exact) and in the
//! simulation's **true time** (nanoseconds, the `SimulatedTime` the clocks read). Outcomes are
//! recorded as the client reports them:
//!
//! - `Ok` — the operation completed, a write at the commit timestamp it returned;
//! - `ClientError::Ambiguous` — a write's outcome is unknown: it may take effect at any point
//!   after its invocation, or never (it has no completion);
//! - any other error — the operation did not happen. It is left out of the history, so that a
//!   read of a value only such a write wrote fails the checks (failed writes are kept apart,
//!   for the report).
//!
//! Put values are unique per operation. A scan contributes one read per key in its span (the
//! scan is not a snapshot, but each range's part is linearizable, so each row is a read that
//! took effect between the scan's invocation and completion; a key the scan did not return was
//! absent, at an unknown tombstone timestamp). So is a read that found no version at all:
//! ranges collect garbage (tombstones included) below their GC horizon.
//!
//! Checks, per key ([`check`]):
//!
//! 1. every value read was written by a recorded put of that key;
//! 2. **at most once**: a value is never seen with two timestamps, nor an acknowledged put's
//!    value with a timestamp other than the acknowledged one;
//! 3. **commit-wait**: an acknowledged write's timestamp is below true time when the
//!    acknowledgement arrives;
//! 4. **timestamps follow real time**: if A completed before B was invoked, B's timestamp is
//!    at least A's, and above it if B is a write (writes that do not overlap get increasing
//!    timestamps; a read returns a version no older than every write completed, or version
//!    read, before it began; a write goes above every version read before it);
//! 5. **linearizability** of puts, deletes and reads (Wing and Gong's search with Lowe's
//!    memoization, as `meridian_raft::sim::linearizability`, extended with deletes and any
//!    number of operations);
//! 6. no key with an acknowledged put and no delete reads as absent at the end;
//!
//! and, across keys, that a final scan of the whole key space returns exactly what the final
//! per-key reads returned ([`check_final_scan`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use meridian_client::{ClientError, Row, Version};
use meridian_rpc::metadata;
use parking_lot::Mutex;

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Wrote a value (unique per operation).
    Put(String),
    /// Deleted the key.
    Delete,
    /// Read a value (`None`: absent).
    Read(Option<String>),
}

/// One operation on one key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The operation and its result.
    pub op: Op,
    /// Who issued it (a worker, a scan, a probe, the final check).
    pub origin: String,
    /// Its invocation in the global sequence.
    pub invoked: u64,
    /// Its completion in the global sequence; `None` if its outcome is unknown.
    pub completed: Option<u64>,
    /// True time at invocation, in ns.
    pub invoked_at: u64,
    /// True time at completion, in ns.
    pub completed_at: Option<u64>,
    /// An acknowledged write's commit timestamp; the timestamp of the version a read returned
    /// (a tombstone's for a deleted key, 0 if never written); `None` if unknown.
    pub timestamp: Option<u64>,
}

/// An operation under way.
#[derive(Clone, Debug)]
pub struct Invocation {
    key: String,
    origin: String,
    sequence: u64,
    at: u64,
}

/// What the client host records.
pub struct Record {
    /// The operations that happened or may have happened.
    pub history: Mutex<Vec<Entry>>,
    /// Writes that failed with no effect (left out of the history), for the report.
    pub refused: Mutex<Vec<Entry>>,
    sequence: AtomicU64,
    /// True time at the start of the simulation, in ns.
    start_ns: u64,
}

impl Invocation {
    /// Returns the operation's place in the global sequence (unique).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
}

impl Record {
    /// Returns an empty record for a simulation whose true time started at `start_ns`.
    pub fn new(start_ns: u64) -> Self {
        Record {
            history: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
            sequence: AtomicU64::new(0),
            start_ns,
        }
    }

    /// Takes the next place in the global sequence (for events recorded elsewhere, ordered
    /// with these).
    pub fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::SeqCst)
    }

    /// Returns the true time now (on a simulated host), in ns.
    pub fn true_now(&self) -> u64 {
        let elapsed = turmoil::sim_elapsed().unwrap_or_default();
        self.start_ns + elapsed.as_nanos() as u64
    }

    /// Starts an operation on `key`.
    pub fn invoke(&self, key: &str, origin: &str) -> Invocation {
        Invocation {
            key: key.to_string(),
            origin: origin.to_string(),
            sequence: self.sequence.fetch_add(1, Ordering::SeqCst),
            at: self.true_now(),
        }
    }

    fn entry(
        &self,
        invocation: Invocation,
        op: Op,
        completed: bool,
        timestamp: Option<u64>,
    ) -> Entry {
        let (completed, completed_at) = if completed {
            (Some(self.sequence.fetch_add(1, Ordering::SeqCst)), Some(self.true_now()))
        } else {
            (None, None)
        };
        Entry {
            key: invocation.key,
            op,
            origin: invocation.origin,
            invoked: invocation.sequence,
            completed,
            invoked_at: invocation.at,
            completed_at,
            timestamp,
        }
    }

    /// Records a put (`value: Some`) or delete through the client. Returns whether it was
    /// acknowledged.
    pub fn write(
        &self,
        invocation: Invocation,
        value: Option<String>,
        outcome: &Result<u64, ClientError>,
    ) -> bool {
        let op = value.map_or(Op::Delete, Op::Put);
        match outcome {
            Ok(timestamp) => {
                let entry = self.entry(invocation, op, true, Some(*timestamp));
                self.history.lock().push(entry);
                true
            }
            Err(error) if error.is_ambiguous() => {
                let entry = self.entry(invocation, op, false, None);
                self.history.lock().push(entry);
                false
            }
            Err(_) => {
                let entry = self.entry(invocation, op, true, None);
                self.refused.lock().push(entry);
                false
            }
        }
    }

    /// Records a put or delete sent straight to a node (no client): a refusal the node marks
    /// not-applied, or a failed connection attempt, had no effect; anything else is ambiguous.
    pub fn raw_write(
        &self,
        invocation: Invocation,
        value: Option<String>,
        outcome: &Result<u64, tonic::Status>,
    ) -> bool {
        let outcome = outcome.as_ref().map(|timestamp| *timestamp).map_err(|status| {
            if metadata::took_no_effect(status) {
                ClientError::Status(status.clone())
            } else {
                ClientError::Ambiguous(status.clone())
            }
        });
        self.write(invocation, value, &outcome)
    }

    /// Records a read that returned `version`. A key found with no version at all (never
    /// written, or its tombstone collected below the range's GC horizon) reads as absent at an
    /// unknown timestamp, as a scan's missing keys do; linearizability still checks it.
    pub fn read(&self, invocation: Invocation, version: &Version) {
        let value = version.value.as_ref().map(|value| String::from_utf8_lossy(value).into_owned());
        let timestamp = (value.is_some() || version.timestamp != 0).then_some(version.timestamp);
        let entry = self.entry(invocation, Op::Read(value), true, timestamp);
        self.history.lock().push(entry);
    }

    /// Records a scan of `keys` (the keys of the workload in the scanned span) that returned
    /// `rows`: one read per key.
    pub fn scan(&self, invocation: Invocation, keys: &[String], rows: &[Row]) {
        let completed = self.sequence.fetch_add(1, Ordering::SeqCst);
        let completed_at = self.true_now();
        let found: BTreeMap<&[u8], &Row> = rows.iter().map(|row| (row.0.as_slice(), row)).collect();
        let mut history = self.history.lock();
        for key in keys {
            let (value, timestamp) = match found.get(key.as_bytes()) {
                Some((_, value, timestamp)) => {
                    (Some(String::from_utf8_lossy(value).into_owned()), Some(*timestamp))
                }
                None => (None, None),
            };
            history.push(Entry {
                key: key.clone(),
                op: Op::Read(value),
                origin: invocation.origin.clone(),
                invoked: invocation.sequence,
                completed: Some(completed),
                invoked_at: invocation.at,
                completed_at: Some(completed_at),
                timestamp,
            });
        }
    }
}

/// Formats a true time or timestamp as ms since the start.
fn ms(nanos: u64, start_ns: u64) -> String {
    format!("{:.3}", nanos.saturating_sub(start_ns) as f64 / 1e6)
}

/// Describes one entry for a failure report (true times in ms since the start).
fn describe(entry: &Entry, start_ns: u64) -> String {
    let ms = |nanos: u64| ms(nanos, start_ns);
    format!(
        "[{}, {}] {:?} ts {} ({} ms → {} ms, {})",
        entry.invoked,
        entry.completed.map_or("?".into(), |completed| completed.to_string()),
        entry.op,
        entry.timestamp.map_or("?".into(), ms),
        ms(entry.invoked_at),
        entry.completed_at.map_or("?".into(), ms),
        entry.origin,
    )
}

fn key_report(key: &str, operations: &[&Entry], start_ns: u64) -> String {
    let mut sorted = operations.to_vec();
    sorted.sort_by_key(|entry| entry.invoked);
    let lines: Vec<String> =
        sorted.iter().map(|entry| format!("  {}", describe(entry, start_ns))).collect();
    format!(
        "history of {key} ([invoked, completed] op, timestamp, true times; all in ms since the \
         start):\n{}",
        lines.join("\n")
    )
}

/// Checks the per-key invariants (see the module docs). `refused` are writes that had no
/// effect; `start_ns` is true time at the start, for the report.
pub fn check(history: &[Entry], refused: &[Entry], start_ns: u64) -> Result<(), String> {
    let mut by_key: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
    for entry in history {
        by_key.entry(entry.key.as_str()).or_default().push(entry);
    }
    for (key, operations) in &by_key {
        check_key(key, operations, refused, start_ns)
            .map_err(|problem| format!("{problem}\n{}", key_report(key, operations, start_ns)))?;
    }
    Ok(())
}

fn check_key(
    key: &str,
    operations: &[&Entry],
    refused: &[Entry],
    start_ns: u64,
) -> Result<(), String> {
    // 1. Every value read was written by a recorded put of the key.
    let written: BTreeMap<&str, &Entry> = operations
        .iter()
        .filter_map(|entry| match &entry.op {
            Op::Put(value) => Some((value.as_str(), *entry)),
            _ => None,
        })
        .collect();
    for entry in operations {
        if let Op::Read(Some(value)) = &entry.op
            && !written.contains_key(value.as_str())
        {
            let failed = refused.iter().find(|failed| failed.op == Op::Put(value.clone()));
            return Err(match failed {
                Some(failed) => format!(
                    "{key}: a read returned {value}, written by a put that failed with no effect: {}",
                    describe(failed, start_ns)
                ),
                None => format!("{key}: a read returned {value}, which no put of {key} wrote"),
            });
        }
    }
    // 2. At most once: one timestamp per value, the acknowledged one if acknowledged.
    let mut seen: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
    for entry in operations {
        if let (Op::Put(value) | Op::Read(Some(value)), Some(timestamp)) =
            (&entry.op, entry.timestamp)
        {
            seen.entry(value.as_str()).or_default().insert(timestamp);
        }
    }
    if let Some((value, timestamps)) = seen.iter().find(|(_, timestamps)| timestamps.len() > 1) {
        return Err(format!(
            "{key}: the write of {value} took effect more than once, or was acknowledged at \
             another timestamp than it applied at: seen at timestamps {timestamps:?}"
        ));
    }
    // 3. Commit-wait: acknowledged writes' timestamps are below true time at the acknowledgement.
    for entry in operations {
        if let (Op::Put(_) | Op::Delete, Some(timestamp), Some(acknowledged)) =
            (&entry.op, entry.timestamp, entry.completed_at)
            && timestamp >= acknowledged
        {
            return Err(format!(
                "{key}: a write was acknowledged at true time {} ms with a commit timestamp {:.3} \
                 ms in the future (commit-wait not respected): {}",
                ms(acknowledged, start_ns),
                (timestamp - acknowledged) as f64 / 1e6,
                describe(entry, start_ns)
            ));
        }
    }
    // 4. Timestamps follow real time. Ambiguous puts take their timestamp from a read of their
    // value, if any.
    let timestamp_of = |entry: &Entry| -> Option<u64> {
        match (&entry.op, entry.timestamp) {
            (_, Some(timestamp)) => Some(timestamp),
            (Op::Put(value), None) => seen.get(value.as_str()).and_then(|set| set.first().copied()),
            _ => None,
        }
    };
    let mut finished: Vec<(u64, u64, &Entry)> = operations
        .iter()
        .filter_map(|entry| Some((entry.completed?, timestamp_of(entry)?, *entry)))
        .collect();
    finished.sort_by_key(|(completed, _, _)| *completed);
    // The latest timestamp among the operations completed up to each position.
    let mut highest: Vec<(u64, &Entry)> = Vec::with_capacity(finished.len());
    for (_, timestamp, entry) in &finished {
        match highest.last() {
            Some((best, _)) if *best >= *timestamp => highest.push(*highest.last().expect("some")),
            _ => highest.push((*timestamp, entry)),
        }
    }
    for entry in operations {
        let Some(timestamp) = timestamp_of(entry) else { continue };
        let before = finished.partition_point(|(completed, _, _)| *completed < entry.invoked);
        let Some((earlier, witness)) = before.checked_sub(1).map(|index| highest[index]) else {
            continue;
        };
        let is_write = matches!(entry.op, Op::Put(_) | Op::Delete);
        if timestamp < earlier || (is_write && timestamp == earlier) {
            return Err(format!(
                "{key}: timestamps go against real time: {} completed before {} began, yet \
                 the later {} has timestamp {} {} {} ms",
                describe(witness, start_ns),
                describe(entry, start_ns),
                if is_write { "write" } else { "read" },
                ms(timestamp, start_ns),
                if is_write { "<=" } else { "<" },
                ms(earlier, start_ns)
            ));
        }
    }
    // 5. Linearizability.
    if !linearizable(operations) {
        return Err(format!("{key}: the history is not linearizable"));
    }
    Ok(())
}

/// Returns the acknowledged writes whose commit timestamp was not below true time when the
/// acknowledgement arrived, with their true invocation time (ns since the start) and by how
/// much the timestamp was ahead, in ns.
pub fn commit_wait_violations(history: &[Entry], start_ns: u64) -> Vec<(u64, u64, String)> {
    history
        .iter()
        .filter_map(|entry| match (&entry.op, entry.timestamp, entry.completed_at) {
            (Op::Put(_) | Op::Delete, Some(timestamp), Some(acknowledged))
                if timestamp >= acknowledged =>
            {
                Some((
                    entry.invoked_at - start_ns,
                    timestamp - acknowledged,
                    format!("{}: {}", entry.key, describe(entry, start_ns)),
                ))
            }
            _ => None,
        })
        .collect()
}

/// Checks that no key with an acknowledged put and no delete reads as absent at the end
/// (`finals`: the final per-key reads).
pub fn check_no_lost_writes(history: &[Entry], finals: &[Entry]) -> Result<(), String> {
    for entry in finals {
        if entry.op != Op::Read(None) {
            continue;
        }
        let of_key = history.iter().filter(|other| other.key == entry.key);
        let (mut acknowledged, mut deleted) = (false, false);
        for other in of_key {
            acknowledged |= matches!(other.op, Op::Put(_)) && other.completed.is_some();
            deleted |= other.op == Op::Delete;
        }
        if acknowledged && !deleted {
            return Err(format!("acknowledged writes to {} were lost", entry.key));
        }
    }
    Ok(())
}

/// Checks that a scan of the whole key space, made after the final reads with no write in
/// between, returned exactly what they did (value and timestamp of every present key).
pub fn check_final_scan(finals: &[Entry], scan: &[Row]) -> Result<(), String> {
    let expected: BTreeMap<String, (String, u64)> = finals
        .iter()
        .filter_map(|entry| match (&entry.op, entry.timestamp) {
            (Op::Read(Some(value)), Some(timestamp)) => {
                Some((entry.key.clone(), (value.clone(), timestamp)))
            }
            _ => None,
        })
        .collect();
    let scanned: BTreeMap<String, (String, u64)> = scan
        .iter()
        .map(|(key, value, timestamp)| {
            (
                String::from_utf8_lossy(key).into_owned(),
                (String::from_utf8_lossy(value).into_owned(), *timestamp),
            )
        })
        .collect();
    if expected != scanned {
        return Err(format!(
            "the final scan across ranges disagrees with the final reads:\n  reads: {expected:?}\n  scan:  {scanned:?}"
        ));
    }
    Ok(())
}

/// Whether one key's operations are linearizable: some order of the completed operations and
/// some of the unknown ones, each placed between its invocation and completion, in which every
/// read returns the value of the latest put before it (absent after a delete or none).
fn linearizable(operations: &[&Entry]) -> bool {
    let mut search =
        Search { operations, memo: HashSet::new(), words: operations.len().div_ceil(64) };
    search.linearize(&mut vec![0; search.words], None)
}

struct Search<'a> {
    operations: &'a [&'a Entry],
    memo: HashSet<(Vec<u64>, Option<String>)>,
    words: usize,
}

impl Search<'_> {
    fn linearize(&mut self, done: &mut Vec<u64>, value: Option<String>) -> bool {
        let is_done = |done: &[u64], index: usize| done[index / 64] & (1 << (index % 64)) != 0;
        let all_known_done = (0..self.operations.len())
            .all(|index| is_done(done, index) || self.operations[index].completed.is_none());
        if all_known_done {
            return true;
        }
        if !self.memo.insert((done.clone(), value.clone())) {
            return false;
        }
        // An operation can go next only if it was invoked before every pending completed
        // operation returned.
        let deadline = (0..self.operations.len())
            .filter(|index| !is_done(done, *index))
            .filter_map(|index| self.operations[index].completed)
            .min()
            .unwrap_or(u64::MAX);
        debug_assert_eq!(done.len(), self.words);
        for index in 0..self.operations.len() {
            let operation = self.operations[index];
            if is_done(done, index) || operation.invoked >= deadline {
                continue;
            }
            let next = match &operation.op {
                Op::Put(written) => Some(Some(written.clone())),
                Op::Delete => Some(None),
                Op::Read(read) => (*read == value).then(|| value.clone()),
            };
            let Some(next) = next else { continue };
            done[index / 64] |= 1 << (index % 64);
            let found = self.linearize(done, next);
            done[index / 64] &= !(1 << (index % 64));
            if found {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry: `completed` and `timestamp` as given, true times equal to the sequence (ns).
    fn entry(op: Op, invoked: u64, completed: Option<u64>, timestamp: Option<u64>) -> Entry {
        Entry {
            key: "k".into(),
            op,
            origin: "test".into(),
            invoked,
            completed,
            invoked_at: invoked,
            completed_at: completed,
            timestamp,
        }
    }

    fn put(value: &str) -> Op {
        Op::Put(value.into())
    }

    fn read(value: Option<&str>) -> Op {
        Op::Read(value.map(Into::into))
    }

    #[test]
    fn checker_verdicts() {
        // (name, history, expected problem: None if it passes, else a phrase of the message)
        let cases: Vec<(&str, Vec<Entry>, Option<&str>)> = vec![
            ("empty", vec![], None),
            (
                "write then read",
                vec![
                    entry(put("a"), 1, Some(10), Some(5)),
                    entry(read(Some("a")), 11, Some(12), Some(5)),
                ],
                None,
            ),
            (
                "delete then read absent at the tombstone",
                vec![
                    entry(put("a"), 1, Some(10), Some(5)),
                    entry(Op::Delete, 11, Some(20), Some(15)),
                    entry(read(None), 21, Some(22), Some(15)),
                ],
                None,
            ),
            (
                "stale read after a delete",
                vec![
                    entry(put("a"), 1, Some(10), Some(5)),
                    entry(Op::Delete, 11, Some(20), Some(15)),
                    entry(read(Some("a")), 21, Some(22), Some(5)),
                ],
                Some("against real time"),
            ),
            (
                "acknowledged before its timestamp passed",
                vec![entry(put("a"), 1, Some(10), Some(10))],
                Some("commit-wait"),
            ),
            (
                "non-overlapping writes with decreasing timestamps",
                vec![entry(put("a"), 1, Some(10), Some(8)), entry(put("b"), 11, Some(20), Some(7))],
                Some("against real time"),
            ),
            (
                "a write below a version read before it",
                vec![
                    entry(put("a"), 1, None, None),
                    entry(read(Some("a")), 2, Some(3), Some(30)),
                    entry(put("b"), 4, Some(40), Some(29)),
                ],
                Some("against real time"),
            ),
            (
                "a value seen at two timestamps",
                vec![
                    entry(put("a"), 1, None, None),
                    entry(read(Some("a")), 50, Some(51), Some(5)),
                    entry(read(Some("a")), 52, Some(53), Some(6)),
                ],
                Some("more than once"),
            ),
            (
                "a read of a failed put's value",
                vec![entry(read(Some("x")), 5, Some(6), Some(3))],
                Some("failed with no effect"),
            ),
            (
                "a read of an absent key after an acknowledged put",
                vec![entry(put("a"), 1, Some(10), Some(5)), entry(read(None), 11, Some(12), None)],
                Some("not linearizable"),
            ),
            (
                "an ambiguous put seen late",
                vec![
                    entry(put("a"), 1, Some(10), Some(5)),
                    entry(put("b"), 11, None, None),
                    entry(read(Some("a")), 12, Some(13), Some(5)),
                    entry(read(Some("b")), 14, Some(30), Some(20)),
                ],
                None,
            ),
        ];
        let refused = vec![entry(put("x"), 1, Some(2), None)];
        for (name, history, expected) in cases {
            let verdict = check(&history, &refused, 0);
            match (expected, verdict) {
                (None, Ok(())) => {}
                (Some(phrase), Err(problem)) => {
                    assert!(problem.contains(phrase), "{name}: {problem}")
                }
                (expected, verdict) => panic!("{name}: expected {expected:?}, got {verdict:?}"),
            }
        }
    }
}
