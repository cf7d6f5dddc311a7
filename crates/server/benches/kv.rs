//! Key-value latency and throughput of a 3-node cluster of real `meridian` processes on this
//! machine: single-key puts (each synced, replicated and commit-waited) and gets, with 1, 16
//! and 64 concurrent clients. Run with `cargo bench -p meridian-server --bench kv`; results are
//! in `bench/README.md`. Not a criterion benchmark: the measured system runs in other processes.

use std::time::{Duration, Instant};

use meridian_client::{Client, ClientOptions};

mod common;

use common::{LocalCluster, percentile};

const MEASURE: Duration = Duration::from_secs(5);

/// Waits until the cluster accepts writes (a leader holds its lease).
async fn warm_up(client: &Client) {
    for _ in 0..200 {
        if client.put(b"warmup", b"x").await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the cluster never accepted a write");
}

/// Runs `clients` concurrent loops of puts (or gets) for `MEASURE`, each client with its own
/// connections (as separate application processes would have); returns sorted latencies.
async fn run(addresses: &[String], clients: usize, writes: bool) -> Vec<Duration> {
    let mut connected = Vec::new();
    for _ in 0..clients {
        let client = Client::new(addresses.to_vec(), ClientOptions::default()).unwrap();
        client.get(b"warmup").await.unwrap();
        connected.push(client);
    }
    let deadline = Instant::now() + MEASURE;
    let mut tasks = Vec::new();
    for (client_index, client) in connected.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let key = format!("bench/{client_index}/{}", i % 1000).into_bytes();
                let started = Instant::now();
                if writes {
                    client.put(&key, &[b'v'; 100]).await.unwrap();
                } else {
                    client.get(&key).await.unwrap();
                }
                latencies.push(started.elapsed());
                i += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    all
}

#[tokio::main]
async fn main() {
    let cluster = LocalCluster::start(3).await;
    let addresses = cluster.addresses.clone();
    let client = Client::new(addresses.clone(), ClientOptions::default()).unwrap();
    warm_up(&client).await;
    println!("3 nodes, one data range; {MEASURE:?} per row; 100-byte values");
    println!(
        "{:<6} {:>8} {:>10} {:>10} {:>10} {:>12}",
        "op", "clients", "ops", "p50", "p99", "ops/s"
    );
    for writes in [true, false] {
        for clients in [1, 16, 64] {
            let latencies = run(&addresses, clients, writes).await;
            println!(
                "{:<6} {:>8} {:>10} {:>10.2?} {:>10.2?} {:>12.0}",
                if writes { "put" } else { "get" },
                clients,
                latencies.len(),
                percentile(&latencies, 0.50),
                percentile(&latencies, 0.99),
                latencies.len() as f64 / MEASURE.as_secs_f64()
            );
        }
    }
    drop(cluster);
}
