//! A deterministic simulator for Raft groups, for tests and benchmarks.
//!
//! [`Cluster`] runs N [`crate::RawNode`]s in one thread over a simulated network and clock, all
//! driven by one seed (no wall clock; only ordered maps, so iteration order is fixed):
//!
//! - the network delays, reorders, drops and duplicates messages;
//! - the nemesis (`nemesis.rs`) partitions the network (a subset both ways or one way, or a
//!   single broken link), partitions the outgoing-only voters of a joint configuration from
//!   the incoming-only ones while the joint phase lasts, crashes nodes (losing everything not
//!   persisted, and optionally messages not yet delivered), restarts and reboots them,
//!   crashes newly elected leaders after a short reign, changes membership (random voter sets,
//!   or swapping `{1,2,3}` and `{3,4,5}`), transfers leadership, and sets clock offsets;
//! - crash points inside the `Ready` cycle (`cluster.rs`): after persisting and before
//!   sending, and after sending and before applying, far likelier in cycles that request or
//!   grant a vote or carry a new leader's no-op; and vote requests may find their recipient
//!   just rebooted;
//! - clocks: each node reads a TrueTime interval around its offset; its uncertainty is the
//!   group's bound or follows a sawtooth below it, with a phase per node; offsets stay within
//!   each reading's uncertainty, so intervals contain true time;
//! - clients (`clients.rs`) write (with a timestamp from the leader's lease, when it holds
//!   one) and read (from the lease, or through ReadIndex), possibly read-mostly and in bursts,
//!   while the simulation records their history.
//!
//! While it runs, the simulator checks (`monitors.rs`, and in `cluster.rs` on delivery and
//! apply):
//! - message durability: whatever a message promises is persisted when it leaves (the
//!   sender's term, a granted vote, a candidate's own vote, an acknowledged log prefix);
//! - term adoption: a node that receives a higher-term message it has no reason to ignore
//!   (anything but vote requests and pre-vote traffic) adopts the term (Raft §5.1);
//! - term inflation: no node's term exceeds by more than one the highest term it heard of
//!   (pre-vote keeps partitioned nodes from inflating terms);
//! - election safety: at most one leader per term (§5.2);
//! - leader completeness: a new leader holds every entry applied anywhere (§5.4);
//! - the commit rule: a leader's commit index lands on an entry of an earlier term only if a
//!   node already knew that entry committed (§5.4.2);
//! - state-machine safety: no two nodes apply different entries at one index;
//! - promises kept: no node grants a vote or pre-vote, or campaigns, at a true time within a
//!   lease promise it accepted, in this incarnation or one before a crash (transfers aside);
//! - the lease bound: a lease never ends later than the lease duration after the true send
//!   time of the latest promise-asking heartbeat round a quorum confirmed (counted from the
//!   responses actually delivered);
//! - write timestamps increase along the log.
//!
//! At the end of a run the cluster is healed, restarted and must converge (liveness), then
//! the simulator checks (`invariants.rs`):
//! - log matching: entries with equal index and term have equal prefixes (§5.3);
//! - durability: every acknowledged write is in every member's final state;
//! - linearizability of the client history ([`linearizability`]);
//! - lease validity: each lease read happened before its lease ended as the leader reported
//!   it, and, in true time, before any leader of a later term was elected;
//! - lease disjointness: no lease read of a term happens before a lease of an earlier term
//!   ended, or before any lease read of an earlier term;
//! - timestamp order: every timestamp a leader handed out (lease reads and write
//!   timestamps) in a term exceeds every one of earlier terms;
//! - term growth: the highest term is at most 3 + 2 per disruption (partition, broken link,
//!   crash, reboot, restart, transfer, membership change).
//!
//! Violations are collected in a [`Report`], with the seed, so that a run can be replayed. A
//! panic inside a node (one of its own assertions) is reported after the violations found
//! before it.

mod clients;
mod cluster;
pub mod display;
mod invariants;
mod kv;
pub mod linearizability;
mod monitors;
mod nemesis;

pub use cluster::{Cluster, Report, SimOptions};
