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
