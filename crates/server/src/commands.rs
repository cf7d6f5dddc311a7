//! The command-line interface and what each command does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use meridian_clock::ClockOptions;
use meridian_node::{NodeOptions, RaftTiming, leader_hint, run_node};
use meridian_raft::NodeId;
use meridian_rpc::kv::kv_client::KvClient;
use meridian_rpc::kv::{DeleteRequest, GetRequest, PutRequest, ScanRequest};
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::{InitRequest, StatusRequest};

/// Meridian: a distributed SQL database in the style of Spanner.
#[derive(Parser, Debug)]
#[command(name = "meridian", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a node until Ctrl-C or SIGTERM. A node restarted with the same store rejoins with
    /// its data.
    Start(StartArgs),
    /// Initializes a new cluster through one node: the first range is replicated on that node
    /// and up to two other nodes it knows (start them with --join first).
    Init {
        /// The RPC address of a node (HOST:PORT).
        #[arg(long)]
        host: String,
    },
    /// Prints a node's view: its peers, its replicas, their leaders and progress, its clock.
    Status {
        /// The RPC address of a node (HOST:PORT).
        #[arg(long)]
        host: String,
    },
    /// Reads and writes keys through the key-value API (for tests and debugging).
    Kv {
        /// The RPC address of any node (HOST:PORT); requests follow leader hints.
        #[arg(long)]
        host: String,
        #[command(subcommand)]
        operation: KvOperation,
    },
}

#[derive(Parser, Debug)]
struct StartArgs {
    /// This node's id: a positive number, unique in the cluster and fixed for its store.
    #[arg(long)]
    node_id: u64,
    /// The directory of the node's store (created if missing).
    #[arg(long)]
    store: PathBuf,
    /// The address to serve node-to-node and client RPCs on (HOST:PORT).
    #[arg(long)]
    rpc_listen: SocketAddr,
    /// The address other nodes reach this one at (defaults to --rpc-listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Addresses of nodes of the cluster to join, comma separated.
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
    /// The bound on this node's clock offset when the operating system reports none, in ms.
    /// A node whose clock is further than this from a majority of its peers refuses to serve.
    #[arg(long, default_value_t = 7)]
    max_clock_offset_ms: u64,
    /// The address to serve Prometheus metrics on over HTTP (HOST:PORT); none if absent.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// How long a node may go unheard before the replicas it holds are replaced elsewhere, in s.
    #[arg(long, default_value_t = 60)]
    dead_node_timeout_s: u64,
    /// Fault injection for tests: writes fail, as on a full disk, after this many MiB.
    #[arg(long)]
    inject_disk_full_after_mb: Option<u64>,
    /// Fault injection for tests: shift this node's clock by this many ms (may be negative).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    inject_clock_skew_ms: i64,
}

#[derive(Subcommand, Debug)]
enum KvOperation {
    /// Prints the value of a key.
    Get { key: String },
    /// Sets a key; prints the commit timestamp.
    Put { key: String, value: String },
    /// Deletes a key; prints the commit timestamp.
    Delete { key: String },
    /// Prints keys in [start, end) with their values.
    Scan {
        #[arg(default_value = "")]
        start: String,
        end: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// Runs a command.
///
/// # Errors
///
/// Any failure, described for the user.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Start(args) => start(args).await,
        Command::Init { host } => init(&host).await,
        Command::Status { host } => status(&host).await,
        Command::Kv { host, operation } => kv(&host, operation).await,
    }
}

async fn start(args: StartArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if args.node_id == 0 {
        bail!("--node-id must be a positive number");
    }
    let clock = ClockOptions {
        max_clock_offset: Duration::from_millis(args.max_clock_offset_ms),
        use_kernel_bound: true,
    };
    clock.validate().context("invalid --max-clock-offset-ms")?;
    let options = NodeOptions {
        node_id: NodeId(args.node_id),
        store: args.store,
        rpc_listen: args.rpc_listen,
        advertise: args.advertise.unwrap_or_else(|| args.rpc_listen.to_string()),
        join: args.join.into_iter().filter(|address| !address.is_empty()).collect(),
        clock,
        timing: RaftTiming::default(),
        inject_clock_skew_ns: args.inject_clock_skew_ms.saturating_mul(1_000_000),
        http_listen: args.http_listen,
        dead_node_timeout: Duration::from_secs(args.dead_node_timeout_s),
        inject_disk_full_after_bytes: args
            .inject_disk_full_after_mb
            .map(|mb| mb.saturating_mul(1 << 20)),
    };
    run_node(options, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn endpoint(host: &str) -> String {
    if host.contains("://") { host.to_string() } else { format!("http://{host}") }
}

async fn init(host: &str) -> Result<()> {
    let mut client = NodeClient::connect(endpoint(host))
        .await
        .with_context(|| format!("cannot reach {host}"))?;
    let response = client
        .init(InitRequest {})
        .await
        .map_err(|status| anyhow::anyhow!(status.message().to_string()))?;
    let response = response.into_inner();
    println!("cluster {} initialized", response.cluster_id);
    for voter in response.voters {
        println!("  node {} at {}", voter.node_id, voter.address);
    }
    Ok(())
}

async fn status(host: &str) -> Result<()> {
    let mut client = NodeClient::connect(endpoint(host))
        .await
        .with_context(|| format!("cannot reach {host}"))?;
    let status = client
        .status(StatusRequest {})
        .await
        .map_err(|status| anyhow::anyhow!(status.message().to_string()))?;
    let status = status.into_inner();
    let cluster = if status.cluster_id.is_empty() {
        "(not initialized)".to_string()
    } else {
        status.cluster_id
    };
    println!("node {} at {}, cluster {cluster}", status.node_id, status.address);
    println!(
        "clock uncertainty {:.3} ms ({} bound)",
        status.clock_uncertainty_ns as f64 / 1e6,
        status.clock_bound
    );
    if !status.clock_problem.is_empty() {
        println!("CLOCK PROBLEM: {}", status.clock_problem);
    }
    println!("nodes:");
    println!("  {:>4}  {:<22} {:<18} clock", "id", "address", "liveness");
    for peer in &status.peers {
        let liveness = if peer.node_id == status.node_id {
            "this node".to_string()
        } else {
            match status.liveness.iter().find(|liveness| liveness.node_id == peer.node_id) {
                Some(liveness) => match (liveness.dead, liveness.last_heard_ms) {
                    (true, Some(ms)) => format!("dead ({:.1} s)", ms as f64 / 1e3),
                    (true, None) => "dead (never heard)".to_string(),
                    (false, Some(ms)) => format!("live ({:.1} s)", ms as f64 / 1e3),
                    (false, None) => "unknown".to_string(),
                },
                None => "unknown".to_string(),
            }
        };
        let clock = status
            .peer_clocks
            .iter()
            .find(|clock| clock.node_id == peer.node_id)
            .map(|clock| {
                format!(
                    "offset {:+.3} ms (round trip {:.3} ms)",
                    clock.offset_ns as f64 / 1e6,
                    clock.round_trip_ns as f64 / 1e6
                )
            })
            .unwrap_or_default();
        println!("  {:>4}  {:<22} {liveness:<18} {clock}", peer.node_id, peer.address);
    }
    println!("ranges:");
    println!(
        "  {:>5}  {:<10} {:>6} {:>6} {:>10} {:>10} {:>10} {:>8}  replicas (lag in entries, on the leader)",
        "range", "role", "term", "leader", "last", "commit", "applied", "lease"
    );
    for range in &status.ranges {
        let lease = if range.lease_remaining_ms > 0 {
            format!("{}ms", range.lease_remaining_ms)
        } else {
            "-".into()
        };
        let describe = |node: u64| {
            let lag = range
                .replicas
                .iter()
                .find(|replica| replica.node_id == node)
                .map(|replica| {
                    format!("(lag {})", range.last_index.saturating_sub(replica.match_index))
                })
                .unwrap_or_default();
            format!("{node}{lag}")
        };
        let voters: Vec<String> = range.voters.iter().map(|node| describe(*node)).collect();
        let learners: Vec<String> = range.learners.iter().map(|node| describe(*node)).collect();
        let mut replicas = format!("voters {}", voters.join(" "));
        if !learners.is_empty() {
            replicas.push_str(&format!(", learners {}", learners.join(" ")));
        }
        println!(
            "  {:>5}  {:<10} {:>6} {:>6} {:>10} {:>10} {:>10} {:>8}  {replicas}",
            range.range_id,
            range.role,
            range.term,
            range.leader,
            range.last_index,
            range.commit,
            range.applied,
            lease
        );
    }
    Ok(())
}

/// Runs a key-value request, following up to five leader hints.
async fn kv(host: &str, operation: KvOperation) -> Result<()> {
    let mut target = host.to_string();
    for _ in 0..5 {
        let mut client = KvClient::connect(endpoint(&target))
            .await
            .with_context(|| format!("cannot reach {target}"))?;
        let result = match &operation {
            KvOperation::Get { key } => {
                client.get(GetRequest { key: key.clone().into_bytes() }).await.map(|response| {
                    let response = response.into_inner();
                    match response.value {
                        Some(value) => println!(
                            "{} (at {})",
                            String::from_utf8_lossy(&value),
                            response.timestamp
                        ),
                        None => println!("(not found)"),
                    }
                })
            }
            KvOperation::Put { key, value } => client
                .put(PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                })
                .await
                .map(|response| println!("committed at {}", response.into_inner().timestamp)),
            KvOperation::Delete { key } => client
                .delete(DeleteRequest { key: key.clone().into_bytes() })
                .await
                .map(|response| println!("committed at {}", response.into_inner().timestamp)),
            KvOperation::Scan { start, end, limit } => client
                .scan(ScanRequest {
                    start: start.clone().into_bytes(),
                    end: end.clone().unwrap_or_default().into_bytes(),
                    limit: *limit,
                })
                .await
                .map(|response| {
                    for row in response.into_inner().rows {
                        println!(
                            "{} = {}",
                            String::from_utf8_lossy(&row.key),
                            String::from_utf8_lossy(&row.value)
                        );
                    }
                }),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(status) => match leader_hint(&status) {
                Some(leader) => target = leader.to_string(),
                None => bail!("{}", status.message()),
            },
        }
    }
    bail!("gave up after following five leader hints")
}
