//! Idle CPU of nodes hosting many quiesced ranges: 3 real `meridian` processes, first with the
//! two ranges of a new cluster, then with 10,000 ranges more after one split request, once all
//! of them have quiesced. CPU time is read from `/proc/PID/stat` over a 10 s window per node.
//! Run with `cargo bench -p meridian-server --bench quiesced`; results are in
//! `bench/README.md`. Not a criterion benchmark: the measured system runs in other processes.

use std::time::{Duration, Instant};

use meridian_client::{Client, ClientOptions};

mod common;

use common::LocalCluster;
use meridian_rpc::node::StatusRequest;
use meridian_rpc::node::node_client::NodeClient;

const RANGES: usize = 10_000;
const WINDOW: Duration = Duration::from_secs(10);

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesized command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<u64> = rest.split(' ').skip(11).take(2).map(|f| f.parse().unwrap()).collect();
    // Clock ticks of 10 ms (USER_HZ is 100 on Linux).
    Duration::from_millis((fields[0] + fields[1]) * 10)
}

/// Returns each node's CPU use over `WINDOW`, as a fraction of one core.
async fn idle_cpu(cluster: &LocalCluster) -> Vec<f64> {
    let before: Vec<Duration> =
        cluster.processes.iter().map(|child| cpu_time(child.id())).collect();
    let started = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let elapsed = started.elapsed().as_secs_f64();
    cluster
        .processes
        .iter()
        .zip(before)
        .map(|(child, before)| (cpu_time(child.id()) - before).as_secs_f64() / elapsed)
        .collect()
}

/// Returns how many replicas each node hosts and how many of them are quiesced.
async fn replica_counts(addresses: &[String]) -> Vec<(usize, usize)> {
    let mut counts = Vec::new();
    for address in addresses {
        let mut client = NodeClient::connect(format!("http://{address}"))
            .await
            .unwrap()
            .max_decoding_message_size(1 << 30);
        let status = client.status(StatusRequest::default()).await.unwrap().into_inner();
        let quiesced = status.ranges.iter().filter(|range| range.quiesced).count();
        counts.push((status.ranges.len(), quiesced));
    }
    counts
}

fn report(label: &str, counts: &[(usize, usize)], cpu: &[f64]) {
    for (node, ((replicas, quiesced), cpu)) in counts.iter().zip(cpu).enumerate() {
        println!(
            "{label:<22} node {}: {replicas:>6} replicas, {quiesced:>6} quiesced, CPU {:>5.2}% of a core",
            node + 1,
            cpu * 100.0
        );
    }
}

#[tokio::main]
async fn main() {
    let cluster = LocalCluster::start(3).await;
    let addresses = cluster.addresses.clone();
    let options = ClientOptions {
        deadline: Duration::from_secs(120),
        attempt_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let client = Client::new(addresses.clone(), options).unwrap();
    for _ in 0..100 {
        if client.put(b"warmup", b"x").await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    report("new cluster", &replica_counts(&addresses).await, &idle_cpu(&cluster).await);

    let keys: Vec<Vec<u8>> = (1..RANGES).map(|i| format!("r{i:05}").into_bytes()).collect();
    let started = Instant::now();
    let produced = client.split(&keys).await.unwrap();
    println!("split into {} more ranges in {:?}", produced.len() - 1, started.elapsed());
    let started = Instant::now();
    loop {
        let counts = replica_counts(&addresses).await;
        if counts.iter().all(|(replicas, quiesced)| *replicas > RANGES && quiesced == replicas) {
            println!("all ranges quiesced {:?} after the split", started.elapsed());
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "ranges did not quiesce: {counts:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let counts = replica_counts(&addresses).await;
    report(&format!("{RANGES} more ranges"), &counts, &idle_cpu(&cluster).await);
    drop(cluster);
}
