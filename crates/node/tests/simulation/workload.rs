//! The client host: initializes the cluster, runs the workload and the probes, and once the
//! faults have healed reads every key, scans the key space and checks the ranges.
//!
//! - **Workers** (each with its own `Client`, so its own route cache and leader guesses): puts
//!   of unique values, deletes, reads (`get_version`) and scans on a dozen keys.
//! - **The splitter** splits the key space at `SPLIT_KEYS` at times drawn from the seed (the
//!   simulation holds a node's links across some of them). Each split carries a *split probe*
//!   on the split key: a put sent just before the split (its timestamp comes from the parent's
//!   leader), then, once the split returned, reads through a fresh client until one sees that
//!   value, and at once another put — which the new range's leader must time-stamp above the
//!   version just read although its clock may be behind (the timestamp floor a split passes on).
//! - **The snapshot racer** stalls a snapshot on its way to a new learner across a split of its
//!   range (see [`snapshot_racer`]).
//! - **The monitor** polls every node's `Status`, so that the simulation can aim faults at
//!   range leaders.
//! - **The prober** answers the simulation's leader isolations (see [`probe_deposed_leader`]).
//! - **The bank** (`bank.rs`): tellers' transfers between accounts in four ranges and
//!   auditors' reads of all of them, lock-free and under locks, which must see the total.
//! - **The lists** (`lists.rs`): list-append transactions across the ranges, whose history
//!   must be strict serializable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use meridian_client::{Client, ClientOptions, Version};
use meridian_raft::SplitMix64;
use meridian_rpc::dial::Dialer;
use meridian_rpc::kv::{GetRequest, PutRequest};
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::{InitRequest, StatusRequest, StatusResponse};
use parking_lot::Mutex;

use crate::bank::{self, Bank};
use crate::history::{Entry, Record, check_final_scan};
use crate::lists::{self, Lists};
use crate::{FIRST_NODES, Failure, KEYS, Mode, NODES, SPLIT_KEYS, key, net, ranges};

/// Operations each worker performs.
const OPERATIONS_PER_WORKER: usize = 60;
/// Workers.
const WORKERS: usize = 4;
/// The most snapshot race attempts per run.
const MAX_SNAPSHOT_RACES: u64 = 6;
/// How long the snapshot racer may stall a snapshot's stream, give or take a status round
/// trip: well below the keep-alive interval and timeout (6 s) after which the sender would give
/// the stream up.
const RACE_STALL: Duration = Duration::from_millis(2_500);
/// The most rows a scan asks for (more than there are keys: a scan sees all it covers).
const SCAN_LIMIT: usize = 100;

/// What the simulation and the client host share.
pub struct Shared {
    /// The history.
    pub record: Record,
    /// The run's seed.
    pub seed: u64,
    /// What the run does besides the default workload.
    pub mode: Mode,
    /// When the splitter splits, in simulated time since the start.
    pub split_times: Vec<Duration>,
    /// Set by the simulation once every fault has healed.
    pub healed: AtomicBool,
    /// The ranges the run ended with, for the report.
    pub ranges: Mutex<String>,
    /// Why the client host failed, if it did.
    pub failure: Mutex<Option<Failure>>,
    /// What the monitor last learned.
    pub intel: Mutex<Intel>,
    /// The leader isolation the prober should probe, and whether it is done.
    pub probe: Mutex<ProbeState>,
    /// What the probes found.
    pub stats: Mutex<ProbeStats>,
    /// The final per-key reads, for the lost-write check.
    pub finals: Mutex<Vec<Entry>>,
    /// Set by a split probe once the new range has a leader: the simulation then moves every
    /// clock behind (see `faults::swing_all`).
    pub swing_behind: AtomicBool,
    /// What the client host is doing, for a report of a run that does not finish.
    pub phase: Mutex<String>,
    /// What each worker is doing, likewise.
    pub doing: Mutex<BTreeMap<String, String>>,
    /// The nodes' stores, for the check that replicas agree.
    pub engines: Vec<Arc<meridian_storage::MemoryEngine>>,
    /// The connections the nodes accepted, for the snapshot racer to stall.
    pub stalls: Arc<net::Stalls>,
    /// What the bank's transactions saw.
    pub bank: Bank,
    /// What the lists' transactions did.
    pub lists: Lists,
}

impl Shared {
    /// Returns the shared state of a run.
    pub fn new(
        seed: u64,
        mode: Mode,
        start_ns: u64,
        split_times: Vec<Duration>,
        engines: Vec<Arc<meridian_storage::MemoryEngine>>,
        stalls: Arc<net::Stalls>,
    ) -> Self {
        Shared {
            record: Record::new(start_ns),
            seed,
            mode,
            split_times,
            healed: AtomicBool::new(false),
            ranges: Mutex::new(String::new()),
            failure: Mutex::new(None),
            intel: Mutex::new(Intel::default()),
            probe: Mutex::new(ProbeState::default()),
            stats: Mutex::new(ProbeStats::default()),
            finals: Mutex::new(Vec::new()),
            swing_behind: AtomicBool::new(false),
            phase: Mutex::new("initializing".into()),
            doing: Mutex::new(BTreeMap::new()),
            engines,
            stalls,
            bank: Bank::default(),
            lists: Lists::default(),
        }
    }

    fn phase(&self, phase: impl Into<String>) {
        *self.phase.lock() = phase.into();
    }

    fn fail(&self, failure: Failure) -> Box<dyn std::error::Error> {
        let text = failure.to_string();
        *self.failure.lock() = Some(failure);
        text.into()
    }
}

/// What the monitor learned from the nodes' statuses.
#[derive(Clone, Debug, Default)]
pub struct Intel {
    /// The data ranges each node believes it leads.
    pub led: BTreeMap<usize, Vec<u64>>,
    /// The data ranges each node is a learner of (receiving a snapshot, usually).
    pub learning: BTreeMap<usize, Vec<u64>>,
    /// The nodes that report a clock problem (they refuse to serve).
    pub clock_problems: std::collections::BTreeSet<usize>,
}

/// The leader isolation under way, as the simulation announced it.
#[derive(Clone, Debug, Default)]
pub struct ProbeState {
    /// The isolated node and the round number.
    pub request: Option<(usize, u64)>,
    /// The last round the prober finished.
    pub done: u64,
}

/// What the deposed-leader probes found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeStats {
    /// Isolations of a node that led a data range.
    pub rounds: u64,
    /// Rounds in which another node was elected while the isolation lasted.
    pub new_leader: u64,
    /// Rounds in which a write went through the new leader.
    pub written: u64,
    /// Rounds whose read reached the old leader while it still believed it led the range.
    pub believing: u64,
    /// Reads the old leader answered (each a stale read, unless a check says otherwise).
    pub served: u64,
    /// Split probes whose second put followed a read of the first put's value.
    pub split_chains: u64,
    /// Snapshot races run (`Mode::SnapshotRace`).
    pub snapshot_races: u64,
}

/// A client of the simulated cluster with its own route cache.
pub fn client(dialer: &Dialer, deadline: Duration) -> Client {
    let seeds = (1..=NODES).map(net::address).collect();
    let options = ClientOptions {
        deadline,
        attempt_timeout: Duration::from_secs(1),
        dialer: dialer.clone(),
        txn_id_seed: Some(next_client_seed()),
        ..ClientOptions::default()
    };
    Client::new(seeds, options).expect("valid seeds")
}

thread_local! {
    /// Clients made so far in this run (turmoil runs a simulation on one thread).
    static CLIENTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Starts a run's count of clients over: each client draws its transaction ids from its place
/// in the run, so that a seed replays them.
pub fn reset_clients() {
    CLIENTS.with(|clients| clients.set(0));
}

fn next_client_seed() -> u64 {
    CLIENTS.with(|clients| {
        let next = clients.get() + 1;
        clients.set(next);
        next.wrapping_mul(0xD1B5_4A32_D192_ED03)
    })
}

/// Initializes the cluster through node 1 (retrying while the nodes find each other).
async fn init(dialer: &Dialer) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(mut node) = net::node_client(dialer, 1).await else { continue };
        // Wait until node 1 knows both peers, so that init picks three voters.
        match node.status(StatusRequest::default()).await {
            Ok(status) if status.get_ref().peers.len() + 1 >= FIRST_NODES => {}
            Ok(_) => continue,
            Err(status) => {
                last = status.to_string();
                continue;
            }
        }
        match node.init(InitRequest {}).await {
            Ok(_) => return Ok(()),
            Err(status) => last = status.to_string(),
        }
    }
    Err(format!("the cluster did not initialize: {last}"))
}

/// The workload's keys in `[start, end)` (`end` empty: unbounded).
fn keys_in(start: &[u8], end: &[u8]) -> Vec<String> {
    (0..KEYS)
        .map(key)
        .filter(|key| key.as_bytes() >= start && (end.is_empty() || key.as_bytes() < end))
        .collect()
}

/// One worker: puts, deletes, reads and scans on random keys.
async fn worker(dialer: Dialer, shared: Arc<Shared>, index: usize, seed: u64) {
    let client = client(&dialer, Duration::from_secs(5));
    let record = &shared.record;
    let mut rng = SplitMix64::new(seed);
    let origin = format!("w{index}");
    for operation in 0..OPERATIONS_PER_WORKER {
        tokio::time::sleep(Duration::from_millis(rng.next_u64() % 1_200)).await;
        let key = key(rng.next_u64() as usize % KEYS);
        let kind = rng.next_u64() % 20;
        shared.doing.lock().insert(
            origin.clone(),
            format!(
                "operation {operation} ({kind}) on {key} since {:.3} s",
                record.true_now() as f64 / 1e9 % 1e3
            ),
        );
        match kind {
            // Puts of values unique to the operation.
            0..=7 => {
                let value = format!("{:x}-w{index}-{operation}", shared.seed % 0xFFFF);
                let invocation = record.invoke(&key, &origin);
                let outcome = client.put(key.as_bytes(), value.as_bytes()).await;
                record.write(invocation, Some(value), &outcome);
            }
            8..=9 => {
                let invocation = record.invoke(&key, &origin);
                let outcome = client.delete(key.as_bytes()).await;
                record.write(invocation, None, &outcome);
            }
            10..=17 => {
                let invocation = record.invoke(&key, &origin);
                if let Ok(version) = client.get_version(key.as_bytes()).await {
                    record.read(invocation, &version);
                }
            }
            // Scans from a key to the end of the key space, across ranges.
            _ => {
                let invocation = record.invoke(&key, &format!("{origin} scan"));
                if let Ok(rows) = client.scan(key.as_bytes(), None, SCAN_LIMIT).await {
                    record.scan(invocation, &keys_in(key.as_bytes(), b""), &rows);
                }
            }
        }
    }
}

/// Splits the key space at `SPLIT_KEYS` at the run's split times, each with a split probe.
async fn splitter(dialer: Dialer, shared: Arc<Shared>) {
    let splits = Arc::new(client(&dialer, Duration::from_secs(5)));
    let writer_client = Arc::new(client(&dialer, Duration::from_secs(5)));
    let reader = client(&dialer, Duration::from_secs(2));
    for (index, (split_key, at)) in SPLIT_KEYS.iter().zip(shared.split_times.clone()).enumerate() {
        // Learn the route of the split key beforehand, so that the first put leaves at once.
        let now = turmoil::sim_elapsed().unwrap_or_default();
        tokio::time::sleep(at.saturating_sub(now + Duration::from_millis(300))).await;
        let _ = writer_client.get_version(split_key.as_bytes()).await;
        let _ = reader.get_version(split_key.as_bytes()).await;
        let now = turmoil::sim_elapsed().unwrap_or_default();
        tokio::time::sleep(at.saturating_sub(now)).await;
        // The first put goes to the parent range's leader, just before the split.
        let first = format!("{:x}-split{index}-a", shared.seed % 0xFFFF);
        let writer = {
            let (shared, client, first) = (shared.clone(), writer_client.clone(), first.clone());
            tokio::spawn(async move {
                let invocation = shared.record.invoke(split_key, "split probe");
                let outcome = client.put(split_key.as_bytes(), first.as_bytes()).await;
                shared.record.write(invocation, Some(first), &outcome);
            })
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
        let split = {
            let splits = splits.clone();
            tokio::spawn(async move {
                if let Err(error) = splits.split(&[split_key.as_bytes().to_vec()]).await {
                    tracing::info!(%error, split_key, "split failed (the final check splits again)");
                }
            })
        };
        chain_on_first_value(&dialer, &shared, &reader, (index, split_key, &first), &writer).await;
        let _ = split.await;
        let _ = writer.await;
    }
}

/// The second half of a split probe: reads the split key (through `reader`, which knows the
/// parent range's route) until the first put's value shows, then finds the leader of the range
/// that starts at the key as soon as it is elected and puts a second value straight to it,
/// where it waits for the new leader's lease. Gives up when the first put is over before its
/// value was read, or after 3 s.
async fn chain_on_first_value(
    dialer: &Dialer,
    shared: &Shared,
    reader: &Client,
    (index, split_key, first): (usize, &str, &str),
    writer: &tokio::task::JoinHandle<()>,
) {
    let record = &shared.record;
    let started = tokio::time::Instant::now();
    let mut seen = None;
    while seen.is_none() && started.elapsed() < Duration::from_secs(3) {
        let finished = writer.is_finished();
        let invocation = record.invoke(split_key, "split probe");
        if let Ok(version) = reader.get_version(split_key.as_bytes()).await {
            record.read(invocation, &version);
            if version.value.as_deref() == Some(first.as_bytes()) {
                seen = Some(version);
            } else if finished || version.value.is_some() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let Some(version) = seen else { return };
    while started.elapsed() < Duration::from_secs(3) {
        let limit = Duration::from_millis(100);
        let (a, b, c, d) = tokio::join!(
            net::status(dialer, 1, limit),
            net::status(dialer, 2, limit),
            net::status(dialer, 3, limit),
            net::status(dialer, 4, limit)
        );
        let leader = [a, b, c, d].into_iter().enumerate().find_map(|(index, status)| {
            let status = status.ok()?;
            let child = status
                .ranges
                .iter()
                .find(|range| range.role == "leader" && range.start == split_key.as_bytes())?;
            Some((index + 1, child.range_id))
        });
        let Some((node, range)) = leader else {
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        // The first put was time-stamped before the split: now every clock goes behind.
        shared.swing_behind.store(true, Ordering::SeqCst);
        let Ok(mut kv) = net::kv_client(dialer, node).await else { continue };
        let second = format!("{:x}-split{index}-b", shared.seed % 0xFFFF);
        let invocation = record.invoke(split_key, "split probe");
        let mut request = tonic::Request::new(PutRequest {
            range_id: range,
            key: split_key.as_bytes().to_vec(),
            value: second.as_bytes().to_vec(),
        });
        request.set_timeout(Duration::from_millis(800));
        let outcome = kv.put(request).await.map(|response| response.into_inner().timestamp);
        tracing::info!(
            split_key,
            read_ts = version.timestamp,
            second = ?outcome.as_ref().ok(),
            "split probe: chained a put on a read of the first value"
        );
        record.raw_write(invocation, Some(second), &outcome);
        shared.stats.lock().split_chains += 1;
        return;
    }
}

/// The snapshot racer: whenever a leader lists a learner of a data range (which it is about to
/// send a snapshot of the range, or is sending one), stalls the leader's next connection to the
/// learner — usually the snapshot's own stream — splits every range the leader leads with that
/// learner still learning, writes keys of the new ranges, and resumes the stalled stream once
/// the learner holds the new ranges (streamed on connections of their own) and has applied as
/// far as the old leader had committed, or after `RACE_STALL`: the old snapshot, taken before
/// the split, then arrives over newer ranges. Installing it must not overwrite their data (the
/// replicas-agree check finds the lost versions). Rounds from 12 s (when node 4 joins and
/// receives replicas) to 40 s, at most one per range and learner, and `MAX_SNAPSHOT_RACES`
/// attempts in all; the stats count the rounds in which the learner held the new ranges in
/// time.
async fn snapshot_racer(dialer: Dialer, shared: Arc<Shared>) {
    let client = client(&dialer, Duration::from_secs(2));
    let mut done: std::collections::BTreeSet<(u64, u64)> = std::collections::BTreeSet::new();
    let mut clients: BTreeMap<usize, NodeClient<tonic::transport::Channel>> = BTreeMap::new();
    let mut round: u64 = 0;
    let (from, until) = (Duration::from_secs(12), Duration::from_secs(40));
    let now = turmoil::sim_elapsed().unwrap_or_default();
    tokio::time::sleep(from.saturating_sub(now)).await;
    while turmoil::sim_elapsed().unwrap_or_default() < until && round < MAX_SNAPSHOT_RACES {
        tokio::time::sleep(Duration::from_millis(5)).await;
        // A leader that lists a learner of a data range with keys to split off.
        let mut found = None;
        for node in 1..=NODES {
            let Some(status) = status_through(&dialer, &mut clients, node).await else { continue };
            if let Some(learner) =
                learning(&status, None).into_iter().find_map(|(range, learner, _)| {
                    (!done.contains(&(range, learner))).then_some(learner)
                })
            {
                found = Some((node, learner));
                break;
            }
        }
        let Some((leader, learner)) = found else { continue };
        let stalled =
            shared.stalls.arm(learner as usize, turmoil::lookup(crate::host(leader).as_str()));
        for _ in 0..200 {
            if stalled.accepted() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let stalled_at = turmoil::sim_elapsed().unwrap_or_default();
        // The ranges whose snapshot may be the stalled stream: every one the leader leads with
        // the learner still learning.
        let targets = match status_through(&dialer, &mut clients, leader).await {
            Some(status) => learning(&status, Some(learner)),
            None => Vec::new(),
        };
        done.extend(targets.iter().map(|(range, learner, _)| (*range, *learner)));
        if !stalled.accepted() || targets.is_empty() {
            shared.stalls.disarm();
            continue;
        }
        round += 1;
        let split_keys: Vec<&String> = targets.iter().map(|(_, _, split)| &split.0).collect();
        tracing::info!(leader, learner, ?split_keys, "snapshot race: stalled a stream, splitting");
        let split = client
            .split(&split_keys.iter().map(|key| key.as_bytes().to_vec()).collect::<Vec<_>>())
            .await;
        let record = &shared.record;
        let deadline = stalled_at + RACE_STALL;
        for (_, _, (split_key, end)) in &targets {
            for (index, key) in keys_in(split_key.as_bytes(), end).iter().take(3).enumerate() {
                if turmoil::sim_elapsed().unwrap_or_default() >= deadline {
                    break;
                }
                let value = format!("{:x}-race{round}-{index}", shared.seed % 0xFFFF);
                let invocation = record.invoke(key, "snapshot race");
                let outcome = client.put(key.as_bytes(), value.as_bytes()).await;
                record.write(invocation, Some(value), &outcome);
            }
        }
        // Until the learner holds every new range and has applied its writes, or `RACE_STALL`.
        let mut raced = false;
        while turmoil::sim_elapsed().unwrap_or_default() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (Some(on_leader), Some(on_learner)) = (
                status_through(&dialer, &mut clients, leader).await,
                status_through(&dialer, &mut clients, learner as usize).await,
            ) else {
                continue;
            };
            raced = split_keys.iter().all(|key| {
                let child = |status: &StatusResponse| {
                    status.ranges.iter().find(|range| range.start == key.as_bytes()).cloned()
                };
                match (child(&on_leader), child(&on_learner)) {
                    (Some(led), Some(learnt)) => learnt.applied > 0 && learnt.applied >= led.commit,
                    _ => false,
                }
            });
            if raced {
                break;
            }
        }
        stalled.resume();
        tracing::info!(ok = split.is_ok(), raced, "snapshot race: resumed the stalled stream");
        shared.stats.lock().snapshot_races += u64::from(raced);
    }
}

/// The data ranges `status`'s node leads with a learner (`learner`, or any) and keys to split
/// off: (range, learner, (split key, range end)).
fn learning(status: &StatusResponse, learner: Option<u64>) -> Vec<(u64, u64, (String, Vec<u8>))> {
    let mut found = Vec::new();
    for range in &status.ranges {
        let keys = keys_in(&range.start, &range.end);
        let inner: Vec<&String> =
            keys.iter().filter(|key| key.as_bytes() > range.start.as_slice()).collect();
        if range.role != "leader"
            || range.range_id == meridian_node::META_RANGE.0
            || inner.is_empty()
        {
            continue;
        }
        for candidate in &range.learners {
            if learner.is_none_or(|learner| learner == *candidate) {
                let split_key = inner[inner.len() / 2].clone();
                found.push((range.range_id, *candidate, (split_key, range.end.clone())));
            }
        }
    }
    found
}

/// `node`'s status through a kept client, within 100 ms.
async fn status_through(
    dialer: &Dialer,
    clients: &mut BTreeMap<usize, NodeClient<tonic::transport::Channel>>,
    node: usize,
) -> Option<StatusResponse> {
    let mut node_client = match clients.remove(&node) {
        Some(client) => client,
        None => net::node_client(dialer, node).await.ok()?,
    };
    let asked = tokio::time::timeout(
        Duration::from_millis(100),
        node_client.status(StatusRequest::default()),
    )
    .await;
    let Ok(Ok(status)) = asked else { return None };
    clients.insert(node, node_client);
    Some(status.into_inner())
}

/// Polls every node's status twice a second for the simulation's targeted faults.
async fn monitor(dialer: Dialer, shared: Arc<Shared>) {
    let mut clients: BTreeMap<usize, NodeClient<tonic::transport::Channel>> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut intel = Intel::default();
        for node in 1..=NODES {
            let status = match clients.remove(&node) {
                Some(client) => Ok(client),
                None => net::node_client(&dialer, node).await,
            };
            let Ok(mut client) = status else { continue };
            let asked = tokio::time::timeout(
                Duration::from_millis(300),
                client.status(StatusRequest::default()),
            )
            .await;
            let Ok(Ok(status)) = asked else { continue };
            clients.insert(node, client);
            let status = status.into_inner();
            if !status.clock_problem.is_empty() {
                intel.clock_problems.insert(node);
            }
            for range in
                status.ranges.iter().filter(|range| range.range_id != meridian_node::META_RANGE.0)
            {
                if range.role == "leader" {
                    intel.led.entry(node).or_default().push(range.range_id);
                }
                if range.learners.contains(&(node as u64)) {
                    intel.learning.entry(node).or_default().push(range.range_id);
                }
            }
        }
        *shared.intel.lock() = intel;
    }
}

/// Waits for the simulation's leader isolations and probes each.
async fn prober(dialer: Dialer, shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let request = {
            let probe = shared.probe.lock();
            probe.request.filter(|(_, round)| *round > probe.done)
        };
        let Some((node, round)) = request else { continue };
        probe_deposed_leader(&dialer, &shared, node).await;
        shared.probe.lock().done = round;
    }
}

fn status_of(status: &StatusResponse, range: u64) -> Option<&meridian_rpc::node::RangeStatus> {
    status.ranges.iter().find(|candidate| candidate.range_id == range)
}

/// Probes one isolation of `old` (cut from its peers, not from this host): waits until another
/// node leads one of the data ranges `old` led, writes a new value of one of its keys through
/// that new leader, and sends a read of the key straight to the old leader, naming the range.
/// The old leader must refuse (its lease ran out before the others could elect); a value it
/// returns goes into the history, where the checks find it stale.
pub async fn probe_deposed_leader(dialer: &Dialer, shared: &Shared, old: usize) {
    let record = &shared.record;
    let Ok(before) = net::status(dialer, old, Duration::from_millis(500)).await else { return };
    let led = before.ranges.iter().find(|range| {
        range.range_id != meridian_node::META_RANGE.0
            && range.role == "leader"
            && !keys_in(&range.start, &range.end).is_empty()
    });
    let Some(led) = led else { return };
    let (range, old_term) = (led.range_id, led.term);
    shared.stats.lock().rounds += 1;
    // Wait (up to 6 s) for another node to lead the range.
    let mut new_leader = None;
    for _ in 0..120 {
        for node in (1..=NODES).filter(|node| *node != old) {
            let Ok(status) = net::status(dialer, node, Duration::from_millis(200)).await else {
                continue;
            };
            if let Some(found) = status_of(&status, range)
                && found.role == "leader"
                && found.term > old_term
            {
                new_leader = Some((node, found.start.clone(), found.end.clone()));
            }
        }
        if new_leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some((leader, start, end)) = new_leader else { return };
    shared.stats.lock().new_leader += 1;
    let keys = keys_in(&start, &end);
    let Some(key) = keys.first() else { return };
    // Write through the new leader (it may need a moment for its lease).
    let mut written = false;
    for _ in 0..4 {
        let Ok(mut kv) = net::kv_client(dialer, leader).await else { continue };
        let invocation = record.invoke(key, "probe");
        let value = format!("{:x}-probe-{}", shared.seed % 0xFFFF, invocation.sequence());
        let mut request = tonic::Request::new(PutRequest {
            range_id: range,
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        });
        request.set_timeout(Duration::from_millis(800));
        let outcome = kv.put(request).await.map(|response| response.into_inner().timestamp);
        written = record.raw_write(invocation, Some(value.clone()), &outcome);
        match &outcome {
            Ok(_) => break,
            // Refused before it was proposed (the new leader has no lease yet, say): again.
            Err(status) if meridian_rpc::metadata::is_not_applied(status) => {
                tracing::info!(%status, leader, range, "probe: the new leader refused the put");
            }
            // Its outcome is unknown: another put would not tell more.
            Err(_) => break,
        }
    }
    if !written {
        return;
    }
    shared.stats.lock().written += 1;
    // Does the old leader still believe it leads the range?
    let believing = net::status(dialer, old, Duration::from_millis(200))
        .await
        .ok()
        .and_then(|status| status_of(&status, range).map(|range| range.role == "leader"))
        .unwrap_or(false);
    let Ok(mut kv) = net::kv_client(dialer, old).await else { return };
    let invocation = record.invoke(key, "probe (old leader)");
    let mut request =
        tonic::Request::new(GetRequest { range_id: range, key: key.as_bytes().to_vec() });
    request.set_timeout(Duration::from_millis(500));
    let outcome = kv.get(request).await;
    {
        let mut stats = shared.stats.lock();
        stats.believing += u64::from(believing);
        stats.served += u64::from(outcome.is_ok());
    }
    if let Ok(response) = outcome {
        let response = response.into_inner();
        record.read(invocation, &Version { value: response.value, timestamp: response.timestamp });
    }
}

/// One workload task.
type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The client host (see the module docs).
pub async fn client_host(shared: Arc<Shared>, seed: u64) -> turmoil::Result {
    let dialer = net::sim_dialer();
    init(&dialer).await?;
    if shared.mode == Mode::Default {
        shared.phase("opening the bank's accounts");
        bank::open_accounts(&dialer)
            .await
            .map_err(|problem| shared.fail(Failure::Liveness(problem)))?;
    }
    tokio::spawn(monitor(dialer.clone(), shared.clone()));
    tokio::spawn(prober(dialer.clone(), shared.clone()));
    let mut tasks = Vec::new();
    // Spawns `count` tasks of one role, each with its index and a seed of its own.
    let mut spawn_role = |count: usize, salt: u64, role: &dyn Fn(usize, u64) -> Task| {
        for index in 0..count {
            let seed = seed ^ (index as u64 + salt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            tasks.push(tokio::spawn(role(index, seed)));
        }
    };
    let (d, s) = (&dialer, &shared);
    let workers = if shared.mode == Mode::Default { WORKERS } else { 1 };
    spawn_role(workers, 1, &|i, seed| Box::pin(worker(d.clone(), s.clone(), i, seed)));
    spawn_role(1, 0, &|_, _| Box::pin(splitter(d.clone(), s.clone())));
    if shared.mode == Mode::Default {
        spawn_role(1, 0, &|_, _| Box::pin(snapshot_racer(d.clone(), s.clone())));
        spawn_role(bank::TELLERS, 101, &|i, seed| {
            Box::pin(bank::teller(d.clone(), s.clone(), i, seed))
        });
        spawn_role(bank::AUDITORS, 201, &|i, seed| {
            Box::pin(bank::auditor(d.clone(), s.clone(), i, seed))
        });
        spawn_role(lists::APPENDERS, 301, &|i, seed| {
            Box::pin(lists::appender(d.clone(), s.clone(), i, seed))
        });
        spawn_role(lists::READERS, 401, &|i, seed| {
            Box::pin(lists::reader(d.clone(), s.clone(), i, seed))
        });
    }
    let count = tasks.len();
    for (index, task) in tasks.into_iter().enumerate() {
        shared.phase(format!("waiting for workload task {index} of {count} (the last splits)"));
        task.await?;
    }
    shared.phase("waiting for the faults to heal");
    while !shared.healed.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let checker = client(&dialer, Duration::from_secs(30));
    shared.phase("final split");
    // Splits that failed under faults are retried now; all must be in place in the end.
    let split_keys: Vec<Vec<u8>> = SPLIT_KEYS.iter().map(|key| key.as_bytes().to_vec()).collect();
    if let Err(error) = checker.split(&split_keys).await {
        let state = ranges::diagnose(&dialer, &checker).await;
        return Err(shared.fail(Failure::Liveness(format!("final split: {error}{state}"))));
    }
    let record = &shared.record;
    let mut finals = Vec::new();
    shared.phase("final reads");
    for index in 0..KEYS {
        let key = key(index);
        let invocation = record.invoke(&key, "final");
        match checker.get_version(key.as_bytes()).await {
            Ok(version) => {
                record.read(invocation, &version);
                finals.push(record.history.lock().last().expect("just recorded").clone());
            }
            Err(error) => {
                let state = ranges::diagnose(&dialer, &checker).await;
                return Err(
                    shared.fail(Failure::Liveness(format!("final read of {key}: {error}{state}")))
                );
            }
        }
    }
    shared.phase("final scan");
    // Nothing writes any more: a scan across every range must return what the reads did.
    match checker.scan(b"", None, SCAN_LIMIT).await {
        Ok(mut rows) => {
            rows.retain(|(key, _, _)| !bank::is_account(key) && !lists::is_list(key));
            if let Err(problem) = check_final_scan(&finals, &rows) {
                return Err(shared.fail(Failure::Invariant(problem)));
            }
        }
        Err(error) => {
            return Err(shared.fail(Failure::Liveness(format!("final scan: {error}"))));
        }
    }
    *shared.finals.lock() = finals;
    if shared.mode == Mode::Default {
        shared.phase("final audit of the bank");
        if let Err(problem) = bank::final_audit(&checker, &shared).await {
            let state = ranges::diagnose(&dialer, &checker).await;
            return Err(shared.fail(Failure::Liveness(format!("{problem}{state}"))));
        }
        let mut violations = shared.bank.stats.lock().violations.clone();
        violations.extend(shared.bank.check_real_time().err());
        match shared.lists.check() {
            Ok(committed) => shared.lists.committed.store(committed, Ordering::SeqCst),
            Err(problem) => violations.push(problem),
        }
        if !violations.is_empty() {
            return Err(shared.fail(Failure::Invariant(format!(
                "the bank's and the lists' transactions: {}",
                violations.join("; ")
            ))));
        }
    }
    shared.phase("checking the ranges");
    match ranges::check_ranges_converge(&dialer, &checker).await {
        Ok(described) => *shared.ranges.lock() = described,
        Err(failure) => return Err(shared.fail(failure)),
    }
    shared.phase("checking that replicas agree");
    if let Err(failure) = ranges::check_replicas_agree(&dialer, &shared.engines).await {
        return Err(shared.fail(failure));
    }
    Ok(())
}
