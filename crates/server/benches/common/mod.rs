//! What the process-level benchmarks share: a local cluster of real `meridian` processes that
//! are killed when it is dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `meridian` binary measured: the one Cargo built, unless `MERIDIAN_BINARY` names another
/// (to measure an older build the same way).
fn binary() -> String {
    std::env::var("MERIDIAN_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_meridian").to_string())
}

/// A cluster of `meridian start` processes on free local ports, initialized; killed on drop.
pub struct LocalCluster {
    /// The nodes' RPC addresses, node 1 first.
    pub addresses: Vec<String>,
    /// The processes, in node order.
    pub processes: Vec<Child>,
    _directory: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts `nodes` nodes, each joining the others, and initializes the cluster.
    pub async fn start(nodes: usize) -> LocalCluster {
        let directory = tempfile::tempdir().unwrap();
        let addresses: Vec<String> =
            (0..nodes).map(|_| format!("127.0.0.1:{}", free_port())).collect();
        let mut processes = Vec::new();
        for (index, address) in addresses.iter().enumerate() {
            processes.push(
                Command::new(binary())
                    .args(["start", "--node-id", &(index + 1).to_string()])
                    .args(["--rpc-listen", address, "--join", &addresses.join(",")])
                    .arg("--store")
                    .arg(directory.path().join(format!("node{index}")))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        let cluster = LocalCluster { addresses, processes, _directory: directory };
        tokio::time::sleep(Duration::from_secs(3)).await;
        let init = Command::new(binary())
            .args(["init", "--host", &cluster.addresses[0]])
            .output()
            .unwrap();
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        cluster
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The latency at `fraction` (0.5 for the median) of `sorted`, which must not be empty.
#[allow(dead_code, reason = "each benchmark compiles this module; not all report percentiles")]
pub fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() as f64 * fraction) as usize).min(sorted.len() - 1)]
}

/// Returns a port that was free a moment ago and not given before in this process (the kernel
/// may hand a just-released port to the next `bind(0)`).
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
