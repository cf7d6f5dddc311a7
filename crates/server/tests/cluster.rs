//! Multi-process tests: real `meridian` processes on 127.0.0.1 ports picked at run time.
//! Every process is killed and every store removed when a test ends, passing or not; every
//! wait is bounded in time.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_client::{Client, ClientOptions};
use meridian_node::{FIRST_DATA_RANGE, META_RANGE};
use meridian_rpc::kv::kv_client::KvClient;
use meridian_rpc::kv::{GetRequest, PutRequest, RangeDescriptor, SplitRequest};
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::{MessageBatch, RangeMessage, RangeStatus, StatusRequest, StatusResponse};

/// The `meridian` binary under test: the one Cargo built, unless `MERIDIAN_BINARY` names
/// another (to loop the tests on a copy while rebuilding).
fn binary() -> String {
    std::env::var("MERIDIAN_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meridian").to_string())
}

/// Returns a port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A cluster of `meridian start` processes; kills them all when dropped.
struct Cluster {
    directory: tempfile::TempDir,
    addresses: Vec<String>,
    processes: Vec<Option<Child>>,
    /// Flags every node is started with.
    flags: Vec<String>,
}

impl Cluster {
    fn start(nodes: usize) -> Cluster {
        Cluster::start_with(nodes, &[])
    }

    fn start_with(nodes: usize, flags: &[&str]) -> Cluster {
        Cluster::start_some(nodes, nodes, flags)
    }

    /// Picks addresses for `nodes` nodes (all in every node's `--join` list) and starts the
    /// first `running`; start the others with [`Cluster::start_node`].
    fn start_some(nodes: usize, running: usize, flags: &[&str]) -> Cluster {
        let directory = tempfile::tempdir().unwrap();
        let addresses: Vec<String> =
            (0..nodes).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let flags = flags.iter().map(|flag| flag.to_string()).collect();
        let mut cluster =
            Cluster { directory, addresses, processes: (0..nodes).map(|_| None).collect(), flags };
        for index in 0..running {
            cluster.start_node(index);
        }
        cluster
    }

    fn start_node(&mut self, index: usize) {
        let child = self.spawn(index);
        self.processes[index] = Some(child);
    }

    fn store(&self, index: usize) -> PathBuf {
        self.directory.path().join(format!("node{}", index + 1))
    }

    fn spawn(&self, index: usize) -> Child {
        self.spawn_with(index, &[])
    }

    /// Starts node `index` with extra flags.
    fn spawn_with(&self, index: usize, extra: &[&str]) -> Child {
        let log =
            std::fs::File::create(self.directory.path().join(format!("node{}.log", index + 1)))
                .unwrap();
        Command::new(binary())
            .args(["start", "--node-id", &(index + 1).to_string()])
            .arg("--store")
            .arg(self.store(index))
            .args(["--rpc-listen", &self.addresses[index], "--join", &self.addresses.join(",")])
            .args(&self.flags)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.processes[index].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn restart(&mut self, index: usize) {
        self.kill(index);
        let child = self.spawn(index);
        self.processes[index] = Some(child);
    }

    fn logs(&self) -> String {
        (0..self.addresses.len())
            .map(|index| {
                let path = self.directory.path().join(format!("node{}.log", index + 1));
                format!(
                    "--- node {} ---\n{}",
                    index + 1,
                    std::fs::read_to_string(path).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for index in 0..self.processes.len() {
            if let Some(mut child) = self.processes[index].take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn meridian(args: &[&str]) -> Output {
    Command::new(binary()).args(args).output().unwrap()
}

/// Retries `attempt` every 100 ms until it returns `Some`, for at most `limit`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(value) = attempt().await {
            return Some(value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn status(address: &str) -> Option<StatusResponse> {
    let mut client = NodeClient::connect(format!("http://{address}")).await.ok()?;
    Some(client.status(StatusRequest::default()).await.ok()?.into_inner())
}

/// Initializes the cluster once every node answers, and waits for a leader; returns what
/// `meridian init` printed.
async fn init(cluster: &Cluster) -> String {
    let running: Vec<&String> = cluster
        .addresses
        .iter()
        .zip(&cluster.processes)
        .filter(|(_, process)| process.is_some())
        .map(|(address, _)| address)
        .collect();
    for address in &running {
        let ready = eventually(Duration::from_secs(20), || async {
            status(address).await.filter(|s| s.peers.len() == running.len())
        })
        .await;
        assert!(
            ready.is_some(),
            "node {address} did not come up knowing every peer\n{}",
            cluster.logs()
        );
    }
    let output = meridian(&["init", "--host", &cluster.addresses[0]]);
    assert!(output.status.success(), "init failed: {}", String::from_utf8_lossy(&output.stderr));
    let leader = eventually(Duration::from_secs(20), || async {
        let status = status(&cluster.addresses[0]).await?;
        let leaders: Vec<u64> = status.ranges.iter().map(|range| range.leader).collect();
        (leaders.len() >= 2 && !leaders.contains(&0)).then_some(())
    })
    .await;
    assert!(leader.is_some(), "no leader elected\n{}", cluster.logs());
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn client(addresses: &[String]) -> Client {
    Client::new(addresses.to_vec(), ClientOptions::default()).unwrap()
}

/// Writes a key through the client, retrying for up to 30 s while the cluster refuses it (never
/// after an ambiguous failure); returns whether it was acknowledged. Every process of these
/// tests shares this host's clock, so commit-wait is checked too: the commit timestamp of an
/// acknowledged write has passed when the acknowledgement arrives.
async fn put(addresses: &[String], key: &str, value: &str) -> bool {
    let client = client(addresses);
    let started = Instant::now();
    let timestamp = loop {
        match client.put(key.as_bytes(), value.as_bytes()).await {
            Ok(timestamp) => break Some(timestamp),
            Err(error) if error.is_ambiguous() => break None,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => break None,
        }
    };
    if let Some(timestamp) = timestamp {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_nanos() as u64;
        assert!(timestamp < now, "{key} acknowledged at {now} before its timestamp {timestamp}");
    }
    timestamp.is_some()
}

async fn get(addresses: &[String], key: &str) -> Option<Vec<u8>> {
    let client = client(addresses);
    eventually(Duration::from_secs(30), || async {
        client
            .get(key.as_bytes())
            .await
            .ok()
            .map(|found| found.map(|(value, _)| value).unwrap_or_default())
    })
    .await
}

/// The first data range's status in a node's view.
fn first_data_range(status: &StatusResponse) -> Option<&RangeStatus> {
    status.ranges.iter().find(|range| range.range_id == FIRST_DATA_RANGE.0)
}

#[tokio::test]
async fn writes_survive_killing_the_leader_and_the_node_catches_up() {
    let mut cluster = Cluster::start(3);
    init(&cluster).await;
    let addresses = cluster.addresses.clone();
    let mut acknowledged = Vec::new();
    for i in 0..100 {
        let (key, value) = (format!("key{i:04}"), format!("value{i}"));
        if put(&addresses, &key, &value).await {
            acknowledged.push((key, value));
        }
    }
    assert_eq!(acknowledged.len(), 100, "writes failed on a healthy cluster\n{}", cluster.logs());

    // The leader reports every replica's progress.
    let replicas = eventually(Duration::from_secs(10), || async {
        for address in &addresses {
            let Some(view) = status(address).await else { continue };
            if let Some(range) = first_data_range(&view).filter(|range| range.role == "leader") {
                return Some(
                    range.replicas.iter().map(|replica| replica.node_id).collect::<Vec<_>>(),
                );
            }
        }
        None
    })
    .await;
    assert_eq!(replicas, Some(vec![1, 2, 3]), "{}", cluster.logs());

    // Kill the leader with SIGKILL and keep writing through the others.
    let leader = eventually(Duration::from_secs(10), || async {
        let view = status(&addresses[0]).await?;
        first_data_range(&view).map(|range| range.leader).filter(|leader| *leader != 0)
    })
    .await
    .expect("node 1 knows a leader") as usize;
    cluster.kill(leader - 1);
    let survivors: Vec<String> = addresses
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != leader - 1)
        .map(|(_, address)| address.clone())
        .collect();
    let failover = Instant::now();
    for i in 100..200 {
        let (key, value) = (format!("key{i:04}"), format!("value{i}"));
        if put(&survivors, &key, &value).await {
            if i == 100 {
                println!(
                    "first write after killing the leader acknowledged after {:?}",
                    failover.elapsed()
                );
            }
            acknowledged.push((key, value));
        }
    }
    assert_eq!(
        acknowledged.len(),
        200,
        "service did not resume after the leader died\n{}",
        cluster.logs()
    );
    println!("200 writes acknowledged {:?} after the kill", failover.elapsed());

    // No acknowledged write is lost.
    let reads = Instant::now();
    for (key, value) in &acknowledged {
        assert_eq!(
            get(&survivors, key).await.as_deref(),
            Some(value.as_bytes()),
            "lost {key}\n{}",
            cluster.logs()
        );
    }

    println!("200 reads took {:?}", reads.elapsed());

    // The killed node restarts with its store and catches up.
    cluster.restart(leader - 1);
    let restarted = addresses[leader - 1].clone();
    let caught_up = eventually(Duration::from_secs(30), || async {
        let mine = first_data_range(&status(&restarted).await?)?.applied;
        let theirs = first_data_range(&status(&survivors[0]).await?)?.commit;
        (mine >= theirs && theirs > 0).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "the restarted node did not catch up\n{}", cluster.logs());

    // SIGTERM stops a node cleanly (exit status 0) and promptly.
    let mut child = cluster.processes[0].take().unwrap();
    let signalled = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(signalled.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "node exited with {exit:?}\n{}", cluster.logs());
}

/// Sends `signal` (`STOP`, `CONT`) to node `index`'s process.
fn signal(cluster: &Cluster, index: usize, signal: &str) {
    let pid = cluster.processes[index].as_ref().expect("running").id();
    let status = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
    assert!(status.is_ok_and(|status| status.success()), "kill -{signal} {pid} failed");
}

/// `meridian init` returns once the cluster serves; a node that learns of the cluster only
/// afterwards (through a hello) makes requests wait for that news instead of failing them, and
/// answers route lookups although it holds no replica of the meta range.
#[tokio::test]
async fn init_returns_serving_and_late_nodes_wait_to_learn_of_it() {
    let mut cluster = Cluster::start_some(3, 2, &[]);
    for address in &cluster.addresses[..2] {
        let ready = eventually(Duration::from_secs(20), || async {
            status(address).await.filter(|status| !status.peers.is_empty())
        })
        .await;
        assert!(ready.is_some(), "node {address} did not come up\n{}", cluster.logs());
    }
    let output = meridian(&["init", "--host", &cluster.addresses[0]]);
    assert!(output.status.success(), "init failed: {}", String::from_utf8_lossy(&output.stderr));
    // At once, not eventually: both ranges have a leader when init returns.
    let after_init = status(&cluster.addresses[0]).await.expect("node 1 answers");
    let leaderless: Vec<u64> = after_init
        .ranges
        .iter()
        .filter(|range| range.leader == 0)
        .map(|range| range.range_id)
        .collect();
    assert!(after_init.ranges.len() >= 2 && leaderless.is_empty(), "{after_init:?}");
    // Node 3 starts while nodes 1 and 2 cannot answer its hellos; a write through it waits
    // for its first answered hello rather than failing with "not initialized".
    signal(&cluster, 0, "STOP");
    signal(&cluster, 1, "STOP");
    cluster.start_node(2);
    let node3 = cluster.addresses[2].clone();
    let up = eventually(Duration::from_secs(20), || async { status(&node3).await }).await;
    let up = up.expect("node 3 comes up");
    assert!(up.cluster_id.is_empty(), "node 3 already knows the cluster: {up:?}");
    let writer = tokio::task::spawn_blocking(move || {
        meridian(&["kv", "--host", &node3, "put", "late", "yes"])
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&cluster, 0, "CONT");
    signal(&cluster, 1, "CONT");
    let output = writer.await.unwrap();
    assert!(
        output.status.success(),
        "a write through the late node failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    let read = meridian(&["kv", "--host", &cluster.addresses[2], "get", "late"]);
    assert!(String::from_utf8_lossy(&read.stdout).starts_with("yes"), "{read:?}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_nodes_keep_running() {
    let cluster = Cluster::start(3);
    // Before init, the key-value API says the node is not initialized.
    let address = cluster.addresses[0].clone();
    let up = eventually(Duration::from_secs(20), || status(&address)).await;
    assert!(up.is_some(), "node did not start\n{}", cluster.logs());
    let output = meridian(&["kv", "--host", &address, "get", "x"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not initialized"), "{output:?}");

    init(&cluster).await;
    // A second init is refused.
    let output = meridian(&["init", "--host", &cluster.addresses[1]]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already initialized"), "{output:?}");

    // Malformed Raft batches end the stream with an error; the node keeps serving.
    let mut client = NodeClient::connect(format!("http://{address}")).await.unwrap();
    let cluster_id = status(&address).await.unwrap().cluster_id;
    let missing_message = MessageBatch {
        from_node: 9,
        cluster_id: cluster_id.clone(),
        messages: vec![RangeMessage { range_id: 1, message: None }],
    };
    let error = client.raft(tokio_stream::iter(vec![missing_message])).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    let other_cluster =
        MessageBatch { from_node: 9, cluster_id: "another-cluster".into(), messages: vec![] };
    let error = client.raft(tokio_stream::iter(vec![other_cluster])).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");
    assert!(put(&cluster.addresses, "after-bad-input", "ok").await, "{}", cluster.logs());

    // Key-value calls that name no range, an unknown range, or misuse the meta range.
    let mut kv = KvClient::connect(format!("http://{address}")).await.unwrap();
    let get = |range_id| GetRequest { range_id, key: b"k".to_vec() };
    let error = kv.get(get(0)).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    let error = kv.get(get(999)).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");
    let error = kv.get(get(META_RANGE.0)).await.unwrap_err();
    assert!(
        matches!(error.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition),
        "{error:?}"
    );
    let meta_leader = Client::new(cluster.addresses.clone(), ClientOptions::default()).unwrap();
    let empty_span = RangeDescriptor {
        range_id: 77,
        start: b"b".to_vec(),
        end: b"a".to_vec(),
        ..RangeDescriptor::default()
    };
    let error = meta_leader.update_descriptors(vec![empty_span]).await.unwrap_err();
    assert!(error.to_string().contains("empty span"), "{error}");
    let error = meta_leader.allocate_range_ids(0).await.unwrap_err();
    assert!(error.to_string().contains("between 1 and"), "{error}");
    for address in &cluster.addresses {
        let mut kv = KvClient::connect(format!("http://{address}")).await.unwrap();
        let split = SplitRequest { range_id: META_RANGE.0, keys: vec![b"m".to_vec()] };
        let error = kv.split(split).await.unwrap_err();
        assert!(
            matches!(error.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition),
            "{error:?}"
        );
    }
    assert!(put(&cluster.addresses, "after-bad-kv-calls", "ok").await, "{}", cluster.logs());

    // Wrong flags and a store that belongs to another node fail with a message and exit code.
    let output =
        meridian(&["start", "--node-id", "0", "--store", "unused", "--rpc-listen", "127.0.0.1:1"]);
    assert!(!output.status.success());
    let store = cluster.store(0);
    let output = meridian(&[
        "start",
        "--node-id",
        "7",
        "--store",
        store.to_str().unwrap(),
        "--rpc-listen",
        "127.0.0.1:1",
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("store"), "{output:?}");
    let output = meridian(&[
        "start",
        "--node-id",
        "1",
        "--store",
        "x",
        "--rpc-listen",
        "127.0.0.1:1",
        "--join",
        "127.0.0.1:26001,no-port",
    ]);
    assert_eq!(output.status.code(), Some(2), "a malformed --join address: {output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("HOST:PORT"), "{output:?}");
    // A --join address nobody answers at: the node runs, says it is not initialized, and
    // joins nothing.
    let lonely_address = format!("127.0.0.1:{}", free_port());
    let mut lonely = Command::new(binary())
        .args(["start", "--node-id", "9", "--rpc-listen", &lonely_address])
        .arg("--store")
        .arg(cluster.directory.path().join("lonely"))
        .args(["--join", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let view = eventually(Duration::from_secs(20), || status(&lonely_address)).await;
    let _ = lonely.kill();
    let _ = lonely.wait();
    let view = view.expect("the node with an unreachable --join address runs");
    assert!(view.cluster_id.is_empty() && view.peers.len() == 1, "{view:?}");
    let output =
        meridian(&["start", "--node-id", "1", "--store", "x", "--rpc-listen", "not-an-address"]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "clap reports bad flags with exit code 2: {output:?}"
    );
    let output = meridian(&[
        "start",
        "--node-id",
        "1",
        "--store",
        "x",
        "--rpc-listen",
        "127.0.0.1:1",
        "--replica-check-interval-s",
        "0",
    ]);
    assert_eq!(output.status.code(), Some(2), "a zero replica-check interval: {output:?}");
}

#[tokio::test]
async fn a_node_whose_clock_is_off_refuses_to_serve() {
    let mut cluster = Cluster::start(3);
    // Node 3's clock runs 500 ms behind, far beyond the 7 ms bound.
    cluster.kill(2);
    let skewed = cluster.spawn_with(2, &["--inject-clock-skew-ms", "-500"]);
    cluster.processes[2] = Some(skewed);
    init(&cluster).await;
    let skewed_address = cluster.addresses[2].clone();
    let problem = eventually(Duration::from_secs(20), || async {
        status(&skewed_address)
            .await
            .map(|status| status.clock_problem)
            .filter(|problem| !problem.is_empty())
    })
    .await;
    assert!(
        problem.is_some_and(|problem| problem.contains("refuses to serve")),
        "{}",
        cluster.logs()
    );
    // It says why to clients...
    let mut client = KvClient::connect(format!("http://{skewed_address}")).await.unwrap();
    let request =
        PutRequest { range_id: FIRST_DATA_RANGE.0, key: b"k".to_vec(), value: b"v".to_vec() };
    let error = client.put(request).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(error.message().contains("clock"), "{error:?}");
    // ...while the healthy majority keeps serving, with no problem of its own.
    let healthy = cluster.addresses[..2].to_vec();
    assert!(put(&healthy, "k", "v").await, "{}", cluster.logs());
    assert_eq!(get(&healthy, "k").await.as_deref(), Some(&b"v"[..]));
    for address in &healthy {
        let fine = eventually(Duration::from_secs(10), || async {
            status(address).await.filter(|status| status.clock_problem.is_empty())
        })
        .await;
        assert!(fine.is_some(), "{address} reports a clock problem\n{}", cluster.logs());
    }
}

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
async fn a_dead_voter_is_replaced_by_a_spare_node() {
    let mut cluster = Cluster::start_with(4, &["--dead-node-timeout-s", "3"]);
    let initialized = init(&cluster).await;
    assert!(
        ["node 1", "node 2", "node 3"].iter().all(|node| initialized.contains(node))
            && !initialized.contains("node 4"),
        "init picks the initializing node and the two lowest peers: {initialized}"
    );
    let mut written = Vec::new();
    for i in 0..30 {
        let (key, value) = (format!("a{i:02}"), format!("{i}"));
        assert!(put(&cluster.addresses, &key, &value).await, "{}", cluster.logs());
        written.push((key, value));
    }

    // Node 3 dies; after the dead-node timeout the leader adds node 4 as a learner (if
    // rebalancing has not already), lets it catch up and swaps it in.
    cluster.kill(2);
    let survivors = vec![
        cluster.addresses[0].clone(),
        cluster.addresses[1].clone(),
        cluster.addresses[3].clone(),
    ];
    // Both the meta range and the data range; node 3 counts as dead after the timeout.
    let replaced = eventually(Duration::from_secs(60), || async {
        let view = status(&survivors[0]).await?;
        let dead = view.liveness.iter().any(|peer| peer.node_id == 3 && peer.dead);
        let moved =
            view.ranges.iter().all(|range| range.voters == [1, 2, 4] && range.learners.is_empty());
        (dead && moved).then_some(())
    })
    .await;
    assert!(replaced.is_some(), "node 3 was not replaced\n{}", cluster.logs());
    let view = status(&survivors[0]).await.unwrap();
    assert!(
        view.liveness.iter().any(|peer| peer.node_id == 4 && !peer.dead),
        "{:?}",
        view.liveness
    );
    for i in 30..60 {
        let (key, value) = (format!("a{i:02}"), format!("{i}"));
        assert!(put(&survivors, &key, &value).await, "{}", cluster.logs());
        written.push((key, value));
    }

    // Node 4 is a full voter: with node 2 gone too, nodes 1 and 4 still form a quorum.
    cluster.kill(1);
    let quorum = vec![cluster.addresses[0].clone(), cluster.addresses[3].clone()];
    assert!(put(&quorum, "after", "both-died").await, "{}", cluster.logs());
    for (key, value) in &written {
        assert_eq!(
            get(&quorum, key).await.as_deref(),
            Some(value.as_bytes()),
            "lost {key}\n{}",
            cluster.logs()
        );
    }
}

#[tokio::test]
async fn a_node_whose_disk_fills_stops_and_loses_nothing() {
    let mut cluster = Cluster::start(3);
    // Node 3's writes fail, as on a full disk, after 1 MiB.
    cluster.kill(2);
    let full = cluster.spawn_with(2, &["--inject-disk-full-after-mb", "1"]);
    cluster.processes[2] = Some(full);
    init(&cluster).await;
    let healthy = cluster.addresses[..2].to_vec();
    let value = "x".repeat(20_000);
    let mut written = Vec::new();
    for i in 0..100 {
        let key = format!("big{i:03}");
        assert!(put(&healthy, &key, &value).await, "write {i} failed\n{}", cluster.logs());
        written.push(key);
    }
    // The node stopped with an error that names the cause; the others carried on.
    let mut child = cluster.processes[2].take().unwrap();
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break Some(exit);
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.is_some_and(|exit| !exit.success()), "node 3 did not stop\n{}", cluster.logs());
    assert!(cluster.logs().contains("No space left on device"), "{}", cluster.logs());
    // Restarted with room again, it catches up from its intact store.
    cluster.restart(2);
    let caught_up = eventually(Duration::from_secs(30), || async {
        let mine = first_data_range(&status(&cluster.addresses[2]).await?)?.applied;
        let theirs = first_data_range(&status(&healthy[0]).await?)?.commit;
        (mine >= theirs && theirs > 0).then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "node 3 did not catch up\n{}", cluster.logs());
    for key in &written {
        assert_eq!(
            get(&cluster.addresses, key).await.as_deref(),
            Some(value.as_bytes()),
            "lost {key}"
        );
    }
}

/// Writes `count` keys `{prefix}{i:05}` with `concurrency` writers, each retrying a key until it
/// is acknowledged or 30 s pass; returns the acknowledged keys.
async fn write_keys(
    client: &Arc<Client>,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> Vec<String> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, prefix) = (client.clone(), next.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return acknowledged;
                }
                let key = format!("{prefix}{i:05}");
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(30) {
                    if client.put(key.as_bytes(), value_of(&key).as_bytes()).await.is_ok() {
                        acknowledged.push(key);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    acknowledged.sort();
    acknowledged
}

fn value_of(key: &str) -> String {
    format!("value of {key}, padded to make ranges grow ......")
}

/// Checks that the meta range's descriptors tile the key space: the first starts at the empty
/// key, each ends where the next starts, the last is unbounded. Returns how many there are.
fn assert_tiled(descriptors: &[meridian_rpc::kv::RangeDescriptor]) -> usize {
    assert!(!descriptors.is_empty());
    assert_eq!(descriptors[0].start, b"", "{descriptors:?}");
    for pair in descriptors.windows(2) {
        assert_eq!(pair[0].end, pair[1].start, "a gap or overlap in {descriptors:?}");
    }
    assert_eq!(descriptors.last().unwrap().end, b"", "{descriptors:?}");
    descriptors.len()
}

/// Waits until the meta range's descriptors tile the key space and there are at least
/// `minimum` of them (a split recorded half-way leaves a gap for a moment).
async fn tiled_ranges(
    client: &Client,
    minimum: usize,
    limit: Duration,
) -> Option<Vec<meridian_rpc::kv::RangeDescriptor>> {
    eventually(limit, || async {
        let (descriptors, _) = client.ranges().await.ok()?;
        let tiled = !descriptors.is_empty()
            && descriptors[0].start.is_empty()
            && descriptors.windows(2).all(|pair| pair[0].end == pair[1].start)
            && descriptors.last().is_some_and(|last| last.end.is_empty());
        (tiled && descriptors.len() >= minimum).then_some(descriptors)
    })
    .await
}

/// Reads every key with a scan across ranges and checks the values.
async fn assert_all_present(client: &Client, keys: &[String], logs: impl Fn() -> String) {
    let rows = eventually(Duration::from_secs(30), || async {
        client.scan(b"", None, 1_000_000).await.ok()
    })
    .await
    .unwrap_or_else(|| panic!("scans kept failing\n{}", logs()));
    let found: std::collections::BTreeMap<String, Vec<u8>> =
        rows.into_iter().map(|(key, value, _)| (String::from_utf8(key).unwrap(), value)).collect();
    for key in keys {
        assert_eq!(
            found.get(key).map(Vec::as_slice),
            Some(value_of(key).as_bytes()),
            "lost {key}\n{}",
            logs()
        );
    }
}

#[tokio::test]
async fn ranges_split_and_survive_killing_a_leader_mid_split() {
    let mut cluster = Cluster::start_with(3, &["--range-max-kib", "16"]);
    init(&cluster).await;
    let client = Arc::new(client(&cluster.addresses));

    // 20,000 keys; ranges split by size as they grow.
    let started = Instant::now();
    let mut written = write_keys(&client, "k", 20_000, 64).await;
    assert_eq!(written.len(), 20_000, "writes failed on a healthy cluster\n{}", cluster.logs());
    println!("20,000 keys written in {:?}", started.elapsed());

    // Manual splits through the command line, at keys inside ranges and at a range start.
    let output = meridian(&["split", "--host", &cluster.addresses[1], "k12345", "k17777"]);
    assert!(output.status.success(), "{output:?}\n{}", cluster.logs());
    let output = meridian(&["split", "--host", &cluster.addresses[1], "k12345"]);
    assert!(output.status.success(), "splitting at a range start again is a no-op: {output:?}");
    let output = meridian(&["split", "--host", &cluster.addresses[1], ""]);
    assert!(!output.status.success(), "the empty key cannot split: {output:?}");

    let descriptors = tiled_ranges(&client, 50, Duration::from_secs(120)).await;
    let Some(descriptors) = descriptors else {
        let (now, _) = client.ranges().await.unwrap();
        panic!("fewer than 50 tiled ranges: {}\n{}", now.len(), cluster.logs());
    };
    let boundaries: Vec<&[u8]> = descriptors.iter().map(|d| d.start.as_slice()).collect();
    assert!(boundaries.contains(&&b"k12345"[..]) && boundaries.contains(&&b"k17777"[..]));
    println!("{} ranges after {:?}", descriptors.len(), started.elapsed());
    assert_all_present(&client, &written, || cluster.logs()).await;

    // Kill -9 the node leading the most ranges while writers keep writing (and ranges keep
    // splitting).
    let view = status(&cluster.addresses[0]).await.unwrap();
    let mut leaders = std::collections::BTreeMap::new();
    for range in &view.ranges {
        *leaders.entry(range.leader).or_insert(0) += 1;
    }
    let victim = *leaders.iter().max_by_key(|(_, count)| **count).unwrap().0 as usize;
    let writers = {
        let client = client.clone();
        tokio::spawn(async move { write_keys(&client, "w", 3_000, 32).await })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cluster.kill(victim - 1);
    let killed_at = Instant::now();
    let more = writers.await.unwrap();
    assert_eq!(more.len(), 3_000, "writes did not resume after the kill\n{}", cluster.logs());
    println!("3,000 more writes done {:?} after killing node {victim}", killed_at.elapsed());
    written.extend(more);
    let survivors: Vec<String> = (0..3)
        .filter(|index| *index != victim - 1)
        .map(|index| cluster.addresses[index].clone())
        .collect();
    let survivor_client = Client::new(survivors.clone(), ClientOptions::default()).unwrap();
    assert!(
        tiled_ranges(&survivor_client, 50, Duration::from_secs(60)).await.is_some(),
        "{}",
        cluster.logs()
    );
    assert_all_present(&survivor_client, &written, || cluster.logs()).await;

    // The killed node restarts and catches up on every range.
    cluster.restart(victim - 1);
    let restarted = cluster.addresses[victim - 1].clone();
    let caught_up = eventually(Duration::from_secs(60), || async {
        let mine = status(&restarted).await?;
        let mut commits = std::collections::BTreeMap::new();
        for survivor in &survivors {
            for range in status(survivor).await?.ranges {
                if range.role == "leader" {
                    commits.insert(range.range_id, range.commit);
                }
            }
        }
        let applied: std::collections::BTreeMap<u64, u64> =
            mine.ranges.iter().map(|range| (range.range_id, range.applied)).collect();
        commits
            .iter()
            .all(|(range, commit)| applied.get(range).is_some_and(|applied| applied >= commit))
            .then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "node {victim} did not catch up\n{}", cluster.logs());
    let descriptors = tiled_ranges(&client, 50, Duration::from_secs(30)).await.unwrap();
    assert_tiled(&descriptors);
    assert_all_present(&client, &written, || cluster.logs()).await;
}

/// Returns how many descriptors name each node as a voter, and whether any has learners.
fn voter_counts(
    descriptors: &[meridian_rpc::kv::RangeDescriptor],
) -> (std::collections::BTreeMap<u64, usize>, bool) {
    let mut counts = std::collections::BTreeMap::new();
    for descriptor in descriptors {
        for voter in &descriptor.voters {
            *counts.entry(*voter).or_insert(0) += 1;
        }
    }
    (counts, descriptors.iter().any(|descriptor| !descriptor.learners.is_empty()))
}

#[tokio::test]
async fn joining_nodes_receive_replicas_and_a_decommissioned_node_is_emptied() {
    let mut cluster = Cluster::start_some(5, 3, &[]);
    init(&cluster).await;
    let client = client(&cluster.addresses[..3]);
    let keys: Vec<String> = (0..200).map(|i| format!("k{i:05}")).collect();
    for key in &keys {
        assert!(put(&cluster.addresses[..3], key, &value_of(key)).await, "{}", cluster.logs());
    }
    let splits: Vec<Vec<u8>> = (1..16).map(|i| format!("k{:05}", i * 12).into_bytes()).collect();
    client.split(&splits).await.unwrap();

    // Nodes 4 and 5 join and receive replicas until the counts are about even.
    cluster.start_node(3);
    cluster.start_node(4);
    let balanced = eventually(Duration::from_secs(120), || async {
        let (descriptors, _) = client.ranges().await.ok()?;
        let (counts, learners) = voter_counts(&descriptors);
        let even = (1..=5).all(|node| counts.get(&node).is_some_and(|count| *count >= 6));
        (descriptors.iter().all(|d| d.voters.len() == 3) && !learners && even).then_some(counts)
    })
    .await;
    let (descriptors, _) = client.ranges().await.unwrap();
    assert!(
        balanced.is_some(),
        "replicas did not spread: {:?}\n{}",
        voter_counts(&descriptors),
        cluster.logs()
    );
    println!("replicas per node after nodes 4 and 5 joined: {:?}", balanced.unwrap());
    assert_all_present(&client, &keys, || cluster.logs()).await;

    // Node 2 is decommissioned: its replicas, the meta range's included, move away.
    let output = meridian(&["decommission", "--host", &cluster.addresses[0], "--node-id", "2"]);
    assert!(output.status.success(), "{output:?}");
    let others: Vec<String> =
        [0, 2, 3, 4].iter().map(|index| cluster.addresses[*index].clone()).collect();
    let emptied = eventually(Duration::from_secs(120), || async {
        let (descriptors, _) = client.ranges().await.ok()?;
        let (counts, learners) = voter_counts(&descriptors);
        // The meta range as its leader sees it (not every node holds a replica of it).
        let mut meta = None;
        for address in &others {
            let view = status(address).await?;
            meta = meta.or(view
                .ranges
                .into_iter()
                .find(|range| range.range_id == META_RANGE.0 && range.role == "leader"));
        }
        let meta = meta?;
        (!counts.contains_key(&2) && !learners && !meta.voters.contains(&2)).then_some(())
    })
    .await;
    let (descriptors, _) = client.ranges().await.unwrap();
    assert!(
        emptied.is_some(),
        "node 2 still holds replicas: {:?}\n{}",
        voter_counts(&descriptors),
        cluster.logs()
    );
    let view = status(&cluster.addresses[1]).await.unwrap();
    assert!(view.draining, "node 2 reports that it is decommissioning");
    // Node 2 learns from the meta range that it no longer belongs to its ranges and destroys
    // its replicas of them (the meta range's replica is left to a later replica GC).
    let collected = eventually(Duration::from_secs(60), || async {
        let view = status(&cluster.addresses[1]).await?;
        view.ranges.iter().all(|range| range.range_id == META_RANGE.0).then_some(())
    })
    .await;
    let left: Vec<u64> = status(&cluster.addresses[1])
        .await
        .map(|view| view.ranges.iter().map(|range| range.range_id).collect())
        .unwrap_or_default();
    assert!(collected.is_some(), "node 2 kept replicas {left:?}\n{}", cluster.logs());
    // With node 2 stopped, the rest serve everything.
    cluster.kill(1);
    let rest = Client::new(others.clone(), ClientOptions::default()).unwrap();
    assert_all_present(&rest, &keys, || cluster.logs()).await;
    assert!(put(&others, "after-decommission", "ok").await, "{}", cluster.logs());

    // Leaders spread over the remaining nodes.
    let spread = eventually(Duration::from_secs(60), || async {
        let mut leading = Vec::new();
        for address in &others {
            let view = status(address).await?;
            leading.push(view.ranges.iter().filter(|range| range.role == "leader").count());
        }
        leading.iter().all(|count| *count > 0).then_some(leading)
    })
    .await;
    assert!(spread.is_some(), "some node leads nothing\n{}", cluster.logs());
    println!("ranges led per remaining node: {:?}", spread.unwrap());
}

#[tokio::test]
async fn a_leader_crashing_mid_split_leaves_routing_consistent() {
    let mut cluster = Cluster::start(3);
    // Every node aborts right after leading a split, before the meta range records it.
    for index in 0..3 {
        cluster.kill(index);
        let child = cluster.spawn_with(index, &["--inject-crash-after-split"]);
        cluster.processes[index] = Some(child);
    }
    init(&cluster).await;
    let keys: Vec<String> = (0..100).map(|i| format!("k{i:05}")).collect();
    for key in &keys {
        assert!(put(&cluster.addresses, key, &value_of(key)).await, "{}", cluster.logs());
    }
    // The split applies everywhere; its leader dies before recording it (the command may or
    // may not report success).
    let _ = meridian(&["split", "--host", &cluster.addresses[0], "k00050"]);
    let crashed = eventually(Duration::from_secs(20), || {
        let exited = cluster.processes.iter_mut().enumerate().find_map(|(index, child)| {
            child.as_mut()?.try_wait().ok().flatten().map(|status| (index, status))
        });
        async move { exited }
    })
    .await;
    let Some((crashed, exit)) = crashed else {
        panic!("no leader crashed after the split\n{}", cluster.logs());
    };
    assert!(!exit.success());
    cluster.processes[crashed] = None;
    // The survivors elect new leaders, which record the new descriptors; the crashed node
    // restarts (without the fault) and catches up.
    let client = client(&cluster.addresses);
    let tiled = eventually(Duration::from_secs(60), || async {
        let (descriptors, _) = client.ranges().await.ok()?;
        let starts: Vec<&[u8]> = descriptors.iter().map(|d| d.start.as_slice()).collect();
        (starts == [&b""[..], b"k00050"]).then_some(())
    })
    .await;
    assert!(tiled.is_some(), "the meta range did not record the split\n{}", cluster.logs());
    cluster.start_node(crashed);
    assert_all_present(&client, &keys, || cluster.logs()).await;
    assert!(put(&cluster.addresses, "k00075", "after the crash").await, "{}", cluster.logs());
    assert!(put(&cluster.addresses, "k00025", "after the crash").await, "{}", cluster.logs());
    let descriptors = tiled_ranges(&client, 2, Duration::from_secs(30)).await.unwrap();
    assert_eq!(assert_tiled(&descriptors), 2);
}
