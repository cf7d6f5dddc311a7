//! Failover time after `kill -9` of the leader: 3 real `meridian` processes; the node leading
//! both the meta range and the data range (as after `meridian init`) is killed, and the time is
//! measured from the kill to the first write acknowledged through another node by a new client
//! (as `meridian kv` would). Two cases, several runs each: while writes flow (the ranges are
//! active), and after the ranges quiesced (no ticks, no heartbeats: their followers must learn
//! of the death from the broken connection).
//!
//! Run with `cargo bench -p meridian-server --bench failover`; results are in
//! `bench/README.md`. Not a criterion benchmark: the measured system runs in other processes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use meridian_client::{Client, ClientOptions};
use meridian_node::{FIRST_DATA_RANGE, META_RANGE};
use meridian_rpc::node::StatusRequest;
use meridian_rpc::node::node_client::NodeClient;

mod common;

use common::LocalCluster;

/// Runs per case.
const RUNS: usize = 5;
/// The ranges a new cluster starts with: the meta range and the first data range.
const RANGES: [u64; 2] = [META_RANGE.0, FIRST_DATA_RANGE.0];

/// The index (in `cluster.addresses`) of the node leading both ranges, if one does, and
/// whether both are quiesced there.
async fn sole_leader(cluster: &LocalCluster) -> Option<(usize, bool)> {
    for (index, address) in cluster.addresses.iter().enumerate() {
        let Ok(mut client) = NodeClient::connect(format!("http://{address}")).await else {
            continue;
        };
        let request = StatusRequest { range_ids: RANGES.to_vec() };
        let Ok(status) = client.status(request).await else { continue };
        let led: Vec<_> =
            status.into_inner().ranges.into_iter().filter(|range| range.role == "leader").collect();
        if led.len() == RANGES.len() {
            return Some((index, led.iter().all(|range| range.quiesced)));
        }
    }
    None
}

fn client(addresses: Vec<String>) -> Client {
    let options = ClientOptions {
        deadline: Duration::from_secs(30),
        attempt_timeout: Duration::from_millis(500),
        ..ClientOptions::default()
    };
    Client::new(addresses, options).unwrap()
}

/// One run: returns the failover time.
async fn run(quiesced: bool) -> Duration {
    let mut cluster = LocalCluster::start(3).await;
    let writer = client(cluster.addresses.clone());
    writer.put(b"warmup", b"x").await.unwrap();
    // Wait for the case to hold: one node leads both ranges and, for the quiesced case, they
    // are quiet.
    let waiting = Instant::now();
    let leader = loop {
        assert!(waiting.elapsed() < Duration::from_secs(60), "no node came to lead both ranges");
        match sole_leader(&cluster).await {
            Some((leader, is_quiesced)) if is_quiesced || !quiesced => break leader,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    // The active case keeps writes flowing (through any node) until the kill.
    let survivors: Vec<String> = cluster
        .addresses
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != leader)
        .map(|(_, address)| address.clone())
        .collect();
    let flowing = Arc::new(AtomicBool::new(!quiesced));
    let background = {
        let flowing = flowing.clone();
        let writer = Arc::new(client(cluster.addresses.clone()));
        tokio::spawn(async move {
            let mut index = 0u64;
            while flowing.load(Ordering::SeqCst) {
                let _ = writer.put(format!("flow{index}").as_bytes(), b"v").await;
                index += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    cluster.processes[leader].kill().unwrap();
    let _ = cluster.processes[leader].wait();
    let probe = client(vec![survivors[0].clone()]);
    // An ambiguous outcome is never re-sent: the next attempt is a new write of a new key.
    for attempt in 0.. {
        match probe.put(format!("after-failover-{attempt}").as_bytes(), b"v").await {
            Ok(_) => break,
            Err(error) if error.is_ambiguous() && attempt < 20 => continue,
            Err(error) => panic!("no write was acknowledged after the failover: {error}"),
        }
    }
    let elapsed = killed.elapsed();
    flowing.store(false, Ordering::SeqCst);
    let _ = background.await;
    elapsed
}

fn summary(label: &str, mut times: Vec<Duration>) {
    times.sort();
    let seconds: Vec<String> =
        times.iter().map(|time| format!("{:.2}", time.as_secs_f64())).collect();
    println!(
        "{label}: median {:.2} s, max {:.2} s (runs: {} s)",
        times[times.len() / 2].as_secs_f64(),
        times[times.len() - 1].as_secs_f64(),
        seconds.join(", ")
    );
}

#[tokio::main]
async fn main() {
    let mut active = Vec::new();
    let mut quiet = Vec::new();
    for run_index in 0..RUNS {
        let time = run(false).await;
        println!("run {run_index}: active range, first write after {:.2} s", time.as_secs_f64());
        active.push(time);
        let time = run(true).await;
        println!("run {run_index}: quiesced range, first write after {:.2} s", time.as_secs_f64());
        quiet.push(time);
    }
    summary("failover, writes flowing", active);
    summary("failover, range quiesced", quiet);
}
