//! Multi-process tests: real `meridian` processes on 127.0.0.1 ports picked at run time.
//! Every process is killed and every store removed when a test ends, passing or not; every
//! wait is bounded in time. This file holds the harness (`Cluster` and the helpers every test
//! uses); the tests are grouped by concept in the modules below.

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

mod failover;
mod follower_reads;
mod metrics;
mod placement;
mod refusals;
mod splits;
mod transactions;
mod txn_faults;

/// The `meridian` binary under test: the one Cargo built, unless `MERIDIAN_BINARY` names
/// another (to loop the tests on a copy while rebuilding).
fn binary() -> String {
    std::env::var("MERIDIAN_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meridian").to_string())
}

/// Returns a port that was free a moment ago and that no other test of this process was
/// given: the kernel may hand a port it just released to the next `bind(0)`, and two nodes
/// given the same port fail to start (seen in CI).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1_000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no fresh free port after 1,000 tries");
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

/// The node id of the first data range's leader, once one is known.
async fn leader_of_first_range(cluster: &Cluster) -> usize {
    eventually(Duration::from_secs(10), || async {
        let view = status(&cluster.addresses[0]).await?;
        first_data_range(&view).map(|range| range.leader).filter(|leader| *leader != 0)
    })
    .await
    .expect("a leader is known") as usize
}

/// The keys [`write_keys`] wrote: acknowledged, and ambiguous (the client reported the outcome
/// unknown, as for a write in flight at a leader that was killed; never retried).
#[derive(Debug, Default)]
struct Written {
    acknowledged: Vec<String>,
    ambiguous: Vec<String>,
}

/// Writes `count` keys `{prefix}{i:05}` with `concurrency` writers, each retrying a refused key
/// until it is acknowledged or 30 s pass (never after an ambiguous failure: that key's outcome
/// stays unknown); returns the acknowledged and the ambiguous keys, sorted. A key in neither
/// was refused for 30 s.
async fn write_keys(
    client: &Arc<Client>,
    prefix: &str,
    count: usize,
    concurrency: usize,
) -> Written {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, prefix) = (client.clone(), next.clone(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let mut written = Written::default();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= count {
                    return written;
                }
                let key = format!("{prefix}{i:05}");
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(30) {
                    match client.put(key.as_bytes(), value_of(&key).as_bytes()).await {
                        Ok(_) => {
                            written.acknowledged.push(key);
                            break;
                        }
                        Err(error) if error.is_ambiguous() => {
                            written.ambiguous.push(key);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            }
        }));
    }
    let mut written = Written::default();
    for task in tasks {
        let part = task.await.unwrap();
        written.acknowledged.extend(part.acknowledged);
        written.ambiguous.extend(part.ambiguous);
    }
    written.acknowledged.sort();
    written.ambiguous.sort();
    written
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
