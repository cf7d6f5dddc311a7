//! Transaction latency and throughput of a 3-node cluster of real `meridian` processes on this
//! machine, split into ten ranges:
//!
//! - commits writing one key in each of 1, 2, 5 and 10 ranges (one range: one Raft write;
//!   more: two-phase commit), one client, with the share of the latency that is commit-wait
//!   (the shape of the Spanner paper's Table 4);
//! - read-only transactions (strong, and bounded-stale) reading one key, and one key in each
//!   of the ten ranges;
//! - hot-key throughput: N clients incrementing one key (`get_for_update`, `put`, `commit`,
//!   retried while aborted), against the 1/(2ε) commits per second that holding the key's
//!   lock through commit-wait allows; the final value must equal the commits counted.
//!
//! Run with `cargo bench -p meridian-server --bench txn`; results are in `bench/README.md`.
//! Not a criterion benchmark: the measured system runs in other processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_client::{Client, ClientOptions, ReadFrom, ReadTimestamp, TxnError};

mod common;

use common::{LocalCluster, percentile};

/// How long each row runs.
const MEASURE: Duration = Duration::from_secs(5);
/// The ranges the keys are spread over: range `i` holds the keys starting with `r{i}`.
const RANGES: usize = 10;

fn mean(values: &[Duration]) -> Duration {
    values.iter().sum::<Duration>() / u32::try_from(values.len().max(1)).unwrap()
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

/// A key in range `range` (see [`RANGES`]).
fn key(range: usize, name: &str) -> Vec<u8> {
    format!("r{range}/{name}").into_bytes()
}

/// Waits until every range accepts transactions.
async fn warm_up(client: &Client) {
    for _ in 0..300 {
        let mut txn = client.begin();
        for range in 0..RANGES {
            txn.put(&key(range, "warmup"), b"x").unwrap();
        }
        if txn.commit().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the cluster never committed a transaction over every range");
}

/// One client committing blind writes to one key in each of `participants` ranges, for
/// [`MEASURE`]. Prints the latency, the leader's commit-wait and ε.
async fn commit_latency(client: &Client, participants: usize) {
    let (mut latencies, mut waits, mut logged, mut prepares) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut epsilon = Duration::ZERO;
    let mut aborted = 0;
    let deadline = Instant::now() + MEASURE;
    let mut i = 0u64;
    while Instant::now() < deadline {
        let mut txn = client.begin();
        for range in 0..participants {
            txn.put(&key(range, &format!("commit/{}", i % 100)), &[b'v'; 100]).unwrap();
        }
        i += 1;
        let started = Instant::now();
        match txn.commit().await {
            Ok(_) => {}
            Err(error) if error.is_retryable() => {
                aborted += 1;
                continue;
            }
            Err(error) => panic!("commit failed: {error}"),
        }
        latencies.push(started.elapsed());
        let report = txn.report().expect("a committed transaction's report");
        prepares.extend(report.prepare);
        if let Some(leader) = report.leader {
            waits.push(leader.commit_wait);
            logged.push(leader.logged);
            epsilon = leader.epsilon;
        }
    }
    latencies.sort();
    let share = mean(&waits).as_secs_f64() / mean(&latencies).as_secs_f64();
    println!(
        "{participants:>12} {:>8} {:>10} {:>10} {:>10} {:>12} {:>10} {:>12} {:>8.0}% {:>8} {:>6}",
        latencies.len(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(mean(&latencies)),
        if prepares.is_empty() { "-".to_string() } else { ms(mean(&prepares)) },
        ms(mean(&logged)),
        ms(mean(&waits)),
        share * 100.0,
        ms(epsilon),
        aborted,
    );
}

/// One client running read-only transactions that read one key in each of `ranges` ranges
/// at `at`, from `from`, for [`MEASURE`].
async fn read_only_latency(
    client: &Client,
    ranges: usize,
    at: ReadTimestamp,
    from: ReadFrom,
    name: &str,
) {
    let mut latencies = Vec::new();
    let deadline = Instant::now() + MEASURE;
    let mut i = 0u64;
    while Instant::now() < deadline {
        let started = Instant::now();
        let mut txn = client.read_only(at).read_from(from);
        for range in 0..ranges {
            txn.get(&key(range, &format!("commit/{}", i % 100))).await.expect("a read");
        }
        latencies.push(started.elapsed());
        i += 1;
    }
    latencies.sort();
    println!(
        "{name:<30} {ranges:>7} {:>8} {:>10} {:>10} {:>10}",
        latencies.len(),
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        ms(mean(&latencies)),
    );
}

/// `clients` clients incrementing one key for [`MEASURE`], each with its own connections.
/// Returns the commits per second; checks the final value.
async fn hot_key(addresses: &[String], clients: usize, round: usize) -> f64 {
    let hot = key(0, &format!("hot/{round}"));
    let commits = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + MEASURE;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = Client::new(addresses.to_vec(), ClientOptions::default()).unwrap();
        let (hot, commits, retries) = (hot.clone(), commits.clone(), retries.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                let mut txn = client.begin();
                loop {
                    let result: Result<_, TxnError> = async {
                        let value = txn.get_for_update(&hot).await?;
                        let count: u64 = value.map_or(0, |v| {
                            String::from_utf8(v).unwrap().parse().expect("a counter")
                        });
                        txn.put(&hot, (count + 1).to_string().as_bytes())?;
                        txn.commit().await
                    }
                    .await;
                    match result {
                        Ok(_) => break,
                        Err(error) if error.is_retryable() => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            txn = txn.retry().await;
                        }
                        Err(error) => panic!("an increment failed: {error}"),
                    }
                }
                commits.fetch_add(1, Ordering::Relaxed);
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies.sort();
    let client = Client::new(addresses.to_vec(), ClientOptions::default()).unwrap();
    let mut check = client.begin();
    let value = check.get(&hot).await.unwrap().expect("the counter");
    check.rollback().await.unwrap();
    let value: u64 = String::from_utf8(value).unwrap().parse().unwrap();
    let commits = commits.load(Ordering::Relaxed);
    assert_eq!(value, commits, "the counter lost or gained increments");
    let rate = commits as f64 / MEASURE.as_secs_f64();
    println!(
        "{clients:>8} {commits:>8} {rate:>10.1} {:>10} {:>10} {:>8}",
        ms(percentile(&latencies, 0.50)),
        ms(percentile(&latencies, 0.99)),
        retries.load(Ordering::Relaxed),
    );
    rate
}

#[tokio::main]
async fn main() {
    let cluster = LocalCluster::start(3).await;
    let addresses = cluster.addresses.clone();
    let client = Client::new(addresses.clone(), ClientOptions::default()).unwrap();
    let splits: Vec<Vec<u8>> = (1..RANGES).map(|range| format!("r{range}").into_bytes()).collect();
    for _ in 0..100 {
        if client.split(&splits).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    warm_up(&client).await;
    // Leaders spread over the nodes after the split; let rebalancing settle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    warm_up(&client).await;

    println!("3 nodes, {RANGES} data ranges; {MEASURE:?} per row; one client; 100-byte values");
    println!("\ncommits of blind writes, one key per participant range:");
    println!(
        "{:>12} {:>8} {:>10} {:>10} {:>10} {:>12} {:>10} {:>12} {:>9} {:>8} {:>6}",
        "participants",
        "commits",
        "p50",
        "p99",
        "mean",
        "prepare",
        "logged",
        "commit-wait",
        "share",
        "ε",
        "aborts"
    );
    for participants in [1, 2, 5, 10] {
        commit_latency(&client, participants).await;
    }

    println!("\nread-only transactions, one key per range:");
    println!(
        "{:<30} {:>7} {:>8} {:>10} {:>10} {:>10}",
        "kind", "ranges", "txns", "p50", "p99", "mean"
    );
    let stale = ReadTimestamp::MaxStaleness(Duration::from_secs(1));
    let (strong, leader, follower) = (ReadTimestamp::Strong, ReadFrom::Leader, ReadFrom::Follower);
    for ranges in [1, RANGES] {
        read_only_latency(&client, ranges, strong, leader, "strong").await;
        read_only_latency(&client, ranges, stale, leader, "max staleness 1 s").await;
        read_only_latency(&client, ranges, strong, follower, "strong, followers").await;
        read_only_latency(&client, ranges, stale, follower, "max staleness 1 s, followers").await;
    }

    println!("\nhot key: N clients incrementing one key:");
    println!(
        "{:>8} {:>8} {:>10} {:>10} {:>10} {:>8}",
        "clients", "commits", "commits/s", "p50", "p99", "retries"
    );
    for (round, clients) in [1, 4, 16].into_iter().enumerate() {
        hot_key(&addresses, clients, round).await;
    }
    drop(cluster);
}
