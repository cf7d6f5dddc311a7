//! The command-line interface and what each command does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use meridian_client::{Client, ClientOptions, CommitReport, ReadFrom, ReadTimestamp};
use meridian_clock::ClockOptions;
use meridian_node::{META_RANGE, NodeOptions, NodeSwitches, RaftTiming, run_node};
use meridian_raft::NodeId;
use meridian_rpc::node::node_client::NodeClient;
use meridian_rpc::node::{DecommissionRequest, InitRequest, StatusRequest};

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
    /// Initializes a new cluster through one node: the meta range and a first range over all
    /// keys are replicated on that node and up to two other nodes it knows (start them with
    /// --join first); later nodes receive replicas as ranges rebalance.
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
        /// The RPC address of any node (HOST:PORT); requests are routed to range leaders.
        #[arg(long)]
        host: String,
        #[command(subcommand)]
        operation: KvOperation,
    },
    /// Runs one transaction (for tests and debugging): the operations in order, reads under
    /// locks, writes buffered, then the commit (two-phase over several ranges), printed with
    /// its timestamp. An aborted attempt (wounded, locks lost) is retried with the same
    /// priority, up to 10 times. Operations: `get KEY`, `get-for-update KEY`, `scan START END`
    /// (END `-` for no bound), `put KEY VALUE`, `delete KEY`. With `--read-only`, `--as-of` or
    /// `--max-staleness`, only `get` and `scan`, read without locks at one timestamp.
    Txn {
        /// The RPC address of any node (HOST:PORT).
        #[arg(long)]
        host: String,
        /// A read-only transaction: every read at the current time of the first read's leader.
        #[arg(long)]
        read_only: bool,
        /// A stale read-only transaction at this timestamp (nanoseconds, as commits print).
        #[arg(long, value_name = "TIMESTAMP", conflicts_with_all = ["read_only", "max_staleness"])]
        as_of: Option<u64>,
        /// A stale read-only transaction at the newest timestamp servable at once that is at
        /// most this old (milliseconds).
        #[arg(long, value_name = "MS", conflicts_with = "read_only")]
        max_staleness: Option<u64>,
        /// Read-only transactions only: read from a follower of each range rather than its
        /// leader. A follower serves below the range's closed timestamp, waiting for it up to
        /// half a second; otherwise the read goes to the leader.
        #[arg(long)]
        follower: bool,
        /// The operations, e.g. `get a put a 1 put b 2`.
        #[arg(required = true, allow_hyphen_values = true)]
        operations: Vec<String>,
    },
    /// Splits the ranges holding the given keys so that each key starts a range.
    Split {
        /// The RPC address of any node (HOST:PORT).
        #[arg(long)]
        host: String,
        /// Split keys (UTF-8); keys that already start a range are skipped.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Decommissions a node: its replicas move to other nodes and it hands its leaderships
    /// away. Follow the progress with `meridian ranges`; stop the node once it holds none.
    Decommission {
        /// The RPC address of any node of the cluster (HOST:PORT).
        #[arg(long)]
        host: String,
        /// The node to decommission.
        #[arg(long)]
        node_id: u64,
    },
    /// Lists every range from the meta range: span, generation and replicas.
    Ranges {
        /// The RPC address of any node (HOST:PORT).
        #[arg(long)]
        host: String,
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
    /// Addresses of nodes of the cluster to join (HOST:PORT), comma separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_host_port)]
    join: Vec<String>,
    /// The bound on every node's clock error (ε) when the operating system reports none, in
    /// ms; leases are sized from it. A node whose clock is further than twice this from a
    /// majority of its peers, or whose own error bound exceeds it, refuses to serve.
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
    /// Fault injection for tests: abort right after a split this node proposed applies, before
    /// the meta range records it.
    #[arg(long)]
    inject_crash_after_split: bool,
    /// Test only: deliberately breaks one of the node's rules (e.g. `skip_commit_wait`), so
    /// that tests can show their checks catch the violation. Never in production.
    #[arg(long = "unsafe-switch", value_name = "NAME", hide = true)]
    unsafe_switches: Vec<String>,
    /// A range whose data grows past this many KiB splits in two.
    #[arg(long, default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    range_max_kib: u64,
    /// How often the node asks the meta range about every replica it holds, in s: a replica
    /// removed from its range while it was cut off and idle learns it no other way.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    replica_check_interval_s: u64,
    /// How long a version stays readable after a newer one replaced it, in s: stale reads and
    /// read-only transactions may read that far back; older versions are collected.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    gc_ttl_s: u64,
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
        Command::Txn { host, read_only, as_of, max_staleness, follower, operations } => {
            let at = match (as_of, max_staleness) {
                (Some(timestamp), _) => Some(ReadTimestamp::Exact(timestamp)),
                (None, Some(ms)) => {
                    Some(ReadTimestamp::MaxStaleness(std::time::Duration::from_millis(ms)))
                }
                (None, None) => read_only.then_some(ReadTimestamp::Strong),
            };
            let from = if follower { ReadFrom::Follower } else { ReadFrom::Leader };
            match at {
                Some(at) => read_only_txn(&host, at, from, &operations).await,
                None if follower => {
                    bail!("--follower needs --read-only, --as-of or --max-staleness")
                }
                None => txn(&host, &operations).await,
            }
        }
        Command::Split { host, keys } => split(&host, keys).await,
        Command::Ranges { host } => ranges(&host).await,
        Command::Decommission { host, node_id } => decommission(&host, node_id).await,
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
    let timing = RaftTiming::default()
        .with_clock_bound(clock.max_clock_offset)
        .map_err(|reason| anyhow::anyhow!("invalid --max-clock-offset-ms: {reason}"))?;
    let mut switches = NodeSwitches::default();
    for name in &args.unsafe_switches {
        switches
            .set(name)
            .map_err(|reason| anyhow::anyhow!("invalid --unsafe-switch: {reason}"))?;
        tracing::warn!(switch = %name, "test only: this node deliberately breaks a rule");
    }
    let options = NodeOptions {
        node_id: NodeId(args.node_id),
        store: args.store,
        rpc_listen: args.rpc_listen,
        advertise: args.advertise.unwrap_or_else(|| args.rpc_listen.to_string()),
        join: args.join.into_iter().filter(|address| !address.is_empty()).collect(),
        clock,
        timing,
        inject_clock_skew_ns: args.inject_clock_skew_ms.saturating_mul(1_000_000),
        http_listen: args.http_listen,
        dead_node_timeout: Duration::from_secs(args.dead_node_timeout_s),
        inject_disk_full_after_bytes: args
            .inject_disk_full_after_mb
            .map(|mb| mb.saturating_mul(1 << 20)),
        range_max_bytes: args.range_max_kib.saturating_mul(1024),
        inject_crash_after_split: args.inject_crash_after_split,
        replica_check_interval: Duration::from_secs(args.replica_check_interval_s),
        gc_ttl: Duration::from_secs(args.gc_ttl_s),
        switches,
    };
    run_node(options, shutdown_signal()).await?;
    Ok(())
}

/// Checks that an address is `HOST:PORT` (an empty entry, as from a trailing comma, passes
/// and is ignored).
fn parse_host_port(address: &str) -> Result<String, String> {
    if address.is_empty() {
        return Ok(String::new());
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(address.to_string())
        }
        _ => Err(format!("{address:?} is not HOST:PORT")),
    }
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

/// Connects to the `Node` service of the node at `host`.
async fn node_client(host: &str) -> Result<NodeClient<tonic::transport::Channel>> {
    NodeClient::connect(endpoint(host)).await.with_context(|| format!("cannot reach {host}"))
}

/// Turns a refusal from a node into an error for the user: its message.
fn refused(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(status.message().to_string())
}

async fn init(host: &str) -> Result<()> {
    let mut client = node_client(host).await?;
    let response = client.init(InitRequest {}).await.map_err(refused)?;
    let response = response.into_inner();
    println!("cluster {} initialized", response.cluster_id);
    for voter in response.voters {
        println!("  node {} at {}", voter.node_id, voter.address);
    }
    Ok(())
}

async fn status(host: &str) -> Result<()> {
    let mut client = node_client(host).await?;
    let status = client.status(StatusRequest::default()).await.map_err(refused)?;
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
    println!(
        "  {:>4}  {:<22} {:<18} {:>8} {:>8}  clock",
        "id", "address", "liveness", "replicas", "leaders"
    );
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
        let (replicas, leaders, draining) = if peer.node_id == status.node_id {
            (status.replicas, status.leaders, status.draining)
        } else {
            status
                .liveness
                .iter()
                .find(|liveness| liveness.node_id == peer.node_id)
                .map_or((0, 0, false), |l| (l.replicas, l.leaders, l.draining))
        };
        let liveness = if draining { format!("{liveness}, decommissioning") } else { liveness };
        println!(
            "  {:>4}  {:<22} {liveness:<18} {replicas:>8} {leaders:>8}  {clock}",
            peer.node_id, peer.address
        );
    }
    println!("ranges:");
    println!(
        "  {:>5}  {:<24} {:<10} {:>6} {:>6} {:>10} {:>10} {:>10} {:>8}  replicas (lag in entries, on the leader)",
        "range", "span", "role", "term", "leader", "last", "commit", "applied", "lease"
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
        let span = if range.range_id == META_RANGE.0 {
            "(meta)".to_string()
        } else {
            show_span(&range.start, &range.end)
        };
        println!(
            "  {:>5}  {span:<24} {:<10} {:>6} {:>6} {:>10} {:>10} {:>10} {:>8}  {replicas}",
            range.range_id,
            if range.quiesced { format!("{} (q)", range.role) } else { range.role.clone() },
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

/// Shows a key for people: printable ASCII as is, other bytes escaped.
fn show_key(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

/// Shows a span `[start, end)`; an empty end is unbounded.
fn show_span(start: &[u8], end: &[u8]) -> String {
    let end = if end.is_empty() { "+inf".to_string() } else { format!("\"{}\"", show_key(end)) };
    format!("[\"{}\", {end})", show_key(start))
}

fn client(host: &str) -> Result<Client> {
    Ok(Client::new(vec![host.to_string()], ClientOptions::default())?)
}

/// Runs a key-value request, routed to the leader of the key's range.
async fn kv(host: &str, operation: KvOperation) -> Result<()> {
    let client = client(host)?;
    match operation {
        KvOperation::Get { key } => match client.get(key.as_bytes()).await? {
            Some((value, timestamp)) => {
                println!("{} (at {timestamp})", String::from_utf8_lossy(&value));
            }
            None => println!("(not found)"),
        },
        KvOperation::Put { key, value } => {
            let timestamp = client.put(key.as_bytes(), value.as_bytes()).await?;
            println!("committed at {timestamp}");
        }
        KvOperation::Delete { key } => {
            let timestamp = client.delete(key.as_bytes()).await?;
            println!("committed at {timestamp}");
        }
        KvOperation::Scan { start, end, limit } => {
            let end = end.map(String::into_bytes);
            for (key, value, _) in
                client.scan(start.as_bytes(), end.as_deref(), limit as usize).await?
            {
                println!("{} = {}", show_key(&key), String::from_utf8_lossy(&value));
            }
        }
    }
    Ok(())
}

/// One operation of `meridian txn`.
#[derive(Debug)]
enum TxnOperation {
    Get { key: String, for_update: bool },
    Scan { start: String, end: Option<String> },
    Put { key: String, value: String },
    Delete { key: String },
}

/// Parses `meridian txn`'s operations.
fn parse_txn_operations(words: &[String]) -> Result<Vec<TxnOperation>> {
    let mut operations = Vec::new();
    let mut words = words.iter();
    let mut next = |what: &str, operation: &str| {
        words.next().cloned().with_context(|| format!("`{operation}` needs {what}"))
    };
    loop {
        let Ok(word) = next("", "") else { break };
        let operation = match word.as_str() {
            "get" => TxnOperation::Get { key: next("a key", "get")?, for_update: false },
            "get-for-update" => {
                TxnOperation::Get { key: next("a key", "get-for-update")?, for_update: true }
            }
            "scan" => {
                let start = next("a start key", "scan")?;
                let end = next("an end key (or -)", "scan")?;
                TxnOperation::Scan { start, end: (end != "-").then_some(end) }
            }
            "put" => {
                TxnOperation::Put { key: next("a key", "put")?, value: next("a value", "put")? }
            }
            "delete" => TxnOperation::Delete { key: next("a key", "delete")? },
            other => bail!(
                "unknown transaction operation `{other}` (expected get, get-for-update, scan, \
                 put or delete)"
            ),
        };
        operations.push(operation);
    }
    Ok(operations)
}

/// Runs `meridian txn --read-only` (or a stale read): gets and scans at one timestamp.
async fn read_only_txn(
    host: &str,
    at: ReadTimestamp,
    from: ReadFrom,
    words: &[String],
) -> Result<()> {
    let operations = parse_txn_operations(words)?;
    for operation in &operations {
        let refused = match operation {
            TxnOperation::Put { .. } => "put",
            TxnOperation::Delete { .. } => "delete",
            TxnOperation::Get { for_update: true, .. } => "get-for-update",
            TxnOperation::Get { .. } | TxnOperation::Scan { .. } => continue,
        };
        bail!("a read-only transaction only gets and scans: `{refused}` is not allowed");
    }
    let client = client(host)?;
    let mut txn = client.read_only(at).read_from(from);
    for operation in &operations {
        match operation {
            TxnOperation::Get { key, .. } => match txn.get(key.as_bytes()).await? {
                Some(value) => println!("{key} = {}", String::from_utf8_lossy(&value)),
                None => println!("{key}: (not found)"),
            },
            TxnOperation::Scan { start, end } => {
                let end = end.as_ref().map(String::as_bytes);
                for (key, value) in txn.scan(start.as_bytes(), end, 1_000).await? {
                    println!("{} = {}", show_key(&key), String::from_utf8_lossy(&value));
                }
            }
            TxnOperation::Put { .. } | TxnOperation::Delete { .. } => unreachable!("refused above"),
        }
    }
    match txn.timestamp() {
        Some(timestamp) => println!("read at {timestamp}"),
        None => println!("read nothing"),
    }
    Ok(())
}

/// Runs `meridian txn`: the operations in one transaction, retried while aborted.
async fn txn(host: &str, words: &[String]) -> Result<()> {
    let operations = parse_txn_operations(words)?;
    let client = client(host)?;
    let mut txn = client.begin();
    for attempt in 1..=10 {
        let mut output = Vec::new();
        let result: Result<(), meridian_client::TxnError> = async {
            for operation in &operations {
                match operation {
                    TxnOperation::Get { key, for_update } => {
                        let value = if *for_update {
                            txn.get_for_update(key.as_bytes()).await?
                        } else {
                            txn.get(key.as_bytes()).await?
                        };
                        output.push(match value {
                            Some(value) => format!("{key} = {}", String::from_utf8_lossy(&value)),
                            None => format!("{key}: (not found)"),
                        });
                    }
                    TxnOperation::Scan { start, end } => {
                        let end = end.as_ref().map(String::as_bytes);
                        for (key, value) in txn.scan(start.as_bytes(), end, 1_000).await? {
                            output.push(format!(
                                "{} = {}",
                                show_key(&key),
                                String::from_utf8_lossy(&value)
                            ));
                        }
                    }
                    TxnOperation::Put { key, value } => {
                        txn.put(key.as_bytes(), value.as_bytes())?
                    }
                    TxnOperation::Delete { key } => txn.delete(key.as_bytes())?,
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                let outcome = txn.commit().await;
                match outcome {
                    Ok(timestamp) => {
                        for line in output {
                            println!("{line}");
                        }
                        match timestamp {
                            Some(timestamp) => println!("committed at {timestamp}"),
                            None => println!("committed (nothing written)"),
                        }
                        if let Some(report) = txn.report() {
                            println!("{}", show_commit_report(report, attempt));
                        }
                        return Ok(());
                    }
                    Err(error) if error.is_retryable() => {
                        eprintln!("attempt {attempt} aborted: {error}");
                        txn = txn.retry().await;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            Err(error) if error.is_retryable() => {
                eprintln!("attempt {attempt} aborted: {error}");
                txn = txn.retry().await;
            }
            Err(error) => {
                let _ = txn.rollback().await;
                return Err(error.into());
            }
        }
    }
    bail!("the transaction was aborted 10 times; giving up")
}

/// A commit report as `meridian txn` prints it, after the commit line.
fn show_commit_report(report: &CommitReport, attempts: usize) -> String {
    let ms = |duration: Duration| format!("{:.1} ms", duration.as_secs_f64() * 1e3);
    let ranges: Vec<String> = report.participants.iter().map(u64::to_string).collect();
    let mut lines = vec![format!(
        "  ranges {}{}, attempt {attempts}",
        if ranges.is_empty() { "none".to_string() } else { ranges.join(", ") },
        report.coordinator.map_or(String::new(), |range| format!(" (coordinator {range})")),
    )];
    let mut timings = vec![format!("lock wait {}", ms(report.lock_wait))];
    if let Some(prepare) = report.prepare {
        timings.push(format!("prepare {}", ms(prepare)));
    }
    if let Some(leader) = &report.leader {
        timings.push(format!("logged {}", ms(leader.logged)));
        timings.push(format!("commit-wait {}", ms(leader.commit_wait)));
        timings.push(format!("ε {}", ms(leader.epsilon)));
    }
    timings.push(format!("commit {}", ms(report.latency)));
    lines.push(format!("  {}", timings.join(", ")));
    lines.join("\n")
}

async fn split(host: &str, keys: Vec<String>) -> Result<()> {
    if keys.iter().any(String::is_empty) {
        bail!("the empty key starts the first range already; it cannot be a split key");
    }
    let client = client(host)?;
    let keys: Vec<Vec<u8>> = keys.into_iter().map(String::into_bytes).collect();
    let descriptors = client.split(&keys).await?;
    if descriptors.is_empty() {
        println!("every key already starts a range");
    }
    for descriptor in descriptors {
        println!(
            "range {:>5}  {}  generation {}",
            descriptor.range_id,
            show_span(&descriptor.start, &descriptor.end),
            descriptor.generation
        );
    }
    Ok(())
}

async fn decommission(host: &str, node_id: u64) -> Result<()> {
    let mut client = node_client(host).await?;
    let status = client.status(StatusRequest::default()).await.map_err(refused)?.into_inner();
    let Some(peer) = status.peers.iter().find(|peer| peer.node_id == node_id) else {
        bail!("node {host} knows no node {node_id}");
    };
    let mut target = node_client(&peer.address).await?;
    target.decommission(DecommissionRequest {}).await.map_err(refused)?;
    println!(
        "node {node_id} is being decommissioned: its replicas move to other nodes (see `meridian ranges`)"
    );
    Ok(())
}

async fn ranges(host: &str) -> Result<()> {
    let client = client(host)?;
    let (descriptors, _) = client.ranges().await?;
    println!("{:>7}  {:<32} {:>10}  {:<12} learners", "range", "span", "generation", "voters");
    for descriptor in &descriptors {
        let list = |nodes: &[u64]| nodes.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        println!(
            "{:>7}  {:<32} {:>10}  {:<12} {}",
            descriptor.range_id,
            show_span(&descriptor.start, &descriptor.end),
            descriptor.generation,
            list(&descriptor.voters),
            list(&descriptor.learners)
        );
    }
    println!("{} ranges", descriptors.len());
    Ok(())
}
