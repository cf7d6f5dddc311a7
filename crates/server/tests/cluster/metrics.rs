//! Prometheus metrics over HTTP.

use super::*;

/// Fetches `http://address/metrics` with a bare HTTP/1.0 request.
fn fetch_metrics(address: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[tokio::test]
async fn metrics_are_served_over_http() {
    let mut cluster = Cluster::start(3);
    let http = format!("127.0.0.1:{}", free_port());
    cluster.kill(0);
    let node = cluster.spawn_with(0, &["--http-listen", &http]);
    cluster.processes[0] = Some(node);
    init(&cluster).await;
    for i in 0..5 {
        assert!(put(&cluster.addresses, &format!("m{i}"), "v").await, "{}", cluster.logs());
    }
    // Clock metrics appear after the first full hello round (every 2 s), so wait for all.
    let expected = [
        "meridian_ranges 2",
        "meridian_raft_entries_applied_total",
        "meridian_raft_messages_sent_total",
        "meridian_storage_sync_seconds",
        "meridian_clock_uncertainty_seconds",
        "meridian_clock_peer_offset_seconds",
    ];
    let complete = eventually(Duration::from_secs(20), || async {
        fetch_metrics(&http).filter(|body| expected.iter().all(|name| body.contains(name)))
    })
    .await;
    assert!(
        complete.is_some(),
        "metrics at {http} lack some of {expected:?}:\n{}\n{}",
        fetch_metrics(&http).unwrap_or_default(),
        cluster.logs()
    );
    // A metrics address already in use is a startup error, not a silent failure.
    let output = meridian(&[
        "start",
        "--node-id",
        "9",
        "--store",
        cluster.directory.path().join("node9").to_str().unwrap(),
        "--rpc-listen",
        &format!("127.0.0.1:{}", free_port()),
        "--http-listen",
        &http,
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("metrics"), "{output:?}");
}

#[tokio::test]
async fn transactions_are_counted_in_metrics() {
    let mut cluster = Cluster::start(3);
    let mut listeners = Vec::new();
    for i in 0..3 {
        let http = format!("127.0.0.1:{}", free_port());
        cluster.kill(i);
        let node = cluster.spawn_with(i, &["--http-listen", &http]);
        cluster.processes[i] = Some(node);
        listeners.push(http);
    }
    init(&cluster).await;
    let client = client(&cluster.addresses);
    // A one-range commit, then a younger transaction wounded by an older one.
    let mut txn = client.begin();
    txn.get(b"k").await.expect("a locked read");
    txn.put(b"k", b"v").unwrap();
    txn.commit().await.expect("a commit");
    let mut older = client.begin();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut younger = client.begin();
    younger.get_for_update(b"hot").await.expect("the younger takes the lock first");
    older.get_for_update(b"hot").await.expect("the older wounds the younger");
    older.rollback().await.unwrap();
    younger.rollback().await.unwrap();
    // Transactions are counted by the range's leader; the age gauge is set by every node.
    let expected = [
        "meridian_txn_commits_total{protocol=\"one_phase\"} 1",
        "meridian_txn_wounds_total 1",
        "meridian_txn_aborts_total{reason=\"wounded\"} 1",
        "meridian_txn_lock_wait_seconds",
        "meridian_commit_wait_seconds",
        "meridian_txn_prepared_oldest_age_seconds 0",
    ];
    let all = || listeners.iter().filter_map(|http| fetch_metrics(http)).collect::<String>();
    let complete = eventually(Duration::from_secs(20), || async {
        Some(all()).filter(|body| expected.iter().all(|name| body.contains(name)))
    })
    .await;
    assert!(complete.is_some(), "metrics lack some of {expected:?}:\n{}", all());
}
