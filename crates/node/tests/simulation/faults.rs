//! The faults the simulation injects, and the clocks it gives the nodes.
//!
//! Network and process faults last a while, on one node each; up to two run at once, on
//! different nodes, and at most one of them takes its node down:
//!
//! | fault          | what happens to the node                                            |
//! |----------------|---------------------------------------------------------------------|
//! | `Partition`    | cut off from everyone                                               |
//! | `IsolateLeader`| a node leading data ranges is cut off from its peers, not from the  |
//! |                | client (the prober reads from it once another node leads)           |
//! | `Deaf`/`Mute`  | one-way: it hears nobody, or nobody hears it                        |
//! | `Crash`        | crashed, restarted with its store a few seconds later               |
//! | `PowerLoss`    | as `Crash`, but the store loses its unsynced writes (a random tail) |
//! | `Outage`       | down past the dead-node timeout (its replicas are replaced), maybe  |
//! |                | with a power loss                                                   |
//! | `Lossy`        | its links drop messages at random                                   |
//! | `Hold`         | its messages are held for 300 ms, then delivered                    |
//! | `Pause`        | every message to and from it is held for longer than a lease (1–3 s)|
//! |                | — a process pause, as far as turmoil allows (see below)             |
//! | `SplitHold`    | `Hold` for 1–3 s across one of the workload's splits, on a node     |
//! |                | other than the leaders (snapshots held across a split)              |
//!
//! turmoil cannot pause a host: every host runs every step. `Pause` holds all of the node's
//! links instead, so the node's own timers keep running (a leader steps down by check-quorum
//! while paused, where a paused process would wake up still believing it leads; that case is
//! left to the deposed-leader probe, which reaches such a leader while it still believes).
//!
//! Clocks (`ClockProfile`, drawn per seed): every node's clock has its own ε (`max_offset`),
//! offset at each 5 s sync and drift within its bounds; the cluster's bound (the nodes'
//! `--max-clock-offset`) covers the largest ε. Some seeds use tight clocks (ε 3 ms), some
//! varied ones (ε 1–20 ms), some wide ones (ε 150–300 ms, with 2 s election timeouts and
//! 1.2 s leases to fit). Clock
//! jumps move a clock, forwards or backwards, to another offset within its ε (until its next
//! sync). Skew beyond ε is injected only by the skew test (`Mode::SkewBeyondBound`).

use std::sync::Arc;
use std::time::Duration;

use meridian_clock::{SimulatedClock, SimulatedClockOptions};
use meridian_node::RaftTiming;
use meridian_raft::SplitMix64;
use meridian_storage::MemoryEngine;

use crate::{DEAD_NODE_TIMEOUT, NODES, host};

/// What a fault does to its node (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Partition,
    IsolateLeader,
    Deaf,
    Mute,
    Crash,
    PowerLoss,
    Outage,
    Lossy,
    Hold,
    Pause,
    SplitHold,
}

impl FaultKind {
    /// Whether the node stops serving altogether.
    pub fn takes_node_down(self) -> bool {
        matches!(
            self,
            FaultKind::Partition | FaultKind::Crash | FaultKind::PowerLoss | FaultKind::Outage
        )
    }
}

/// A fault in progress, and when it ends (in simulated time since the start).
pub struct Fault {
    pub kind: FaultKind,
    pub node: usize,
    pub until: Duration,
    /// For `IsolateLeader`: the probe round that ends it early once done.
    pub probe_round: Option<u64>,
}

/// Returns the other nodes' host names and the client's.
fn others(node: usize) -> Vec<String> {
    peers(node).into_iter().chain(["client".to_string()]).collect()
}

fn peers(node: usize) -> Vec<String> {
    (1..=NODES).filter(|other| *other != node).map(host).collect()
}

impl Fault {
    /// Starts a fault of `kind` on `node` at `now`, for a duration drawn from `rng`. Returns
    /// the fault and a description for the report.
    pub fn start(
        sim: &mut turmoil::Sim<'_>,
        kind: FaultKind,
        node: usize,
        now: Duration,
        rng: &mut SplitMix64,
        engine: &MemoryEngine,
    ) -> (Fault, String) {
        let name = host(node);
        let name = name.as_str();
        let short = Duration::from_millis(1_000 + rng.next_u64() % 4_000);
        let mut detail = String::new();
        // A crashed host's sockets close in the order its tokio runtime drops their tasks,
        // which depends on tokio's process-wide task ids: the closing messages are dropped
        // (the node's outgoing links are cut for the instant of the crash), so that their
        // order cannot change the run. The caller re-applies other faults' partitions.
        let crash = |sim: &mut turmoil::Sim<'_>| {
            others(node).iter().for_each(|other| sim.partition_oneway(name, other.as_str()));
            sim.crash(name);
            others(node).iter().for_each(|other| sim.repair_oneway(name, other.as_str()));
        };
        let power_loss = |rng: &mut SplitMix64| {
            let unsynced = engine.unsynced_batches();
            let keep = rng.next_u64() as usize % (unsynced + 1);
            let lost = engine.lose_unsynced_writes(keep);
            format!(" (power loss: {lost} of {unsynced} unsynced batches lost)")
        };
        let duration = match kind {
            FaultKind::Partition => {
                others(node).iter().for_each(|other| sim.partition(name, other.as_str()));
                short
            }
            FaultKind::IsolateLeader => {
                peers(node).iter().for_each(|other| sim.partition(name, other.as_str()));
                Duration::from_secs(8)
            }
            FaultKind::Deaf => {
                others(node).iter().for_each(|other| sim.partition_oneway(other.as_str(), name));
                short
            }
            FaultKind::Mute => {
                others(node).iter().for_each(|other| sim.partition_oneway(name, other.as_str()));
                short
            }
            FaultKind::Crash => {
                crash(sim);
                short
            }
            FaultKind::PowerLoss => {
                crash(sim);
                detail = power_loss(rng);
                short
            }
            FaultKind::Outage => {
                crash(sim);
                if rng.next_u64().is_multiple_of(2) {
                    detail = power_loss(rng);
                }
                DEAD_NODE_TIMEOUT + short
            }
            FaultKind::Lossy => {
                for other in others(node) {
                    sim.set_link_fail_rate(name, other.as_str(), 0.05);
                }
                short
            }
            FaultKind::Hold => {
                others(node).iter().for_each(|other| sim.hold(name, other.as_str()));
                Duration::from_millis(300)
            }
            FaultKind::Pause => {
                others(node).iter().for_each(|other| sim.hold(name, other.as_str()));
                Duration::from_millis(1_000 + rng.next_u64() % 2_000)
            }
            FaultKind::SplitHold => {
                others(node).iter().for_each(|other| sim.hold(name, other.as_str()));
                Duration::from_millis(1_000 + rng.next_u64() % 2_000)
            }
        };
        let description = format!(
            "{:.1}s {kind:?} n{node} for {:.1}s{detail}",
            now.as_secs_f64(),
            duration.as_secs_f64()
        );
        (Fault { kind, node, until: now + duration, probe_round: None }, description)
    }

    /// Whether the fault holds messages (a crash must not start meanwhile: the order in which
    /// its closing messages were held would decide the order of their delivery).
    pub fn holds(&self) -> bool {
        matches!(self.kind, FaultKind::Hold | FaultKind::Pause | FaultKind::SplitHold)
    }

    /// Applies the fault's partitions again (after a crash of another node repaired that
    /// node's outgoing links).
    pub fn reapply(&self, sim: &mut turmoil::Sim<'_>) {
        let name = host(self.node);
        let name = name.as_str();
        match self.kind {
            FaultKind::Partition => {
                others(self.node).iter().for_each(|other| sim.partition(name, other.as_str()))
            }
            FaultKind::IsolateLeader => {
                peers(self.node).iter().for_each(|other| sim.partition(name, other.as_str()))
            }
            FaultKind::Deaf => others(self.node)
                .iter()
                .for_each(|other| sim.partition_oneway(other.as_str(), name)),
            FaultKind::Mute => others(self.node)
                .iter()
                .for_each(|other| sim.partition_oneway(name, other.as_str())),
            _ => {}
        }
    }

    /// Ends the fault.
    pub fn end(self, sim: &mut turmoil::Sim<'_>) {
        let name = host(self.node);
        let name = name.as_str();
        match self.kind {
            FaultKind::Partition => {
                others(self.node).iter().for_each(|other| sim.repair(name, other.as_str()))
            }
            FaultKind::IsolateLeader => {
                peers(self.node).iter().for_each(|other| sim.repair(name, other.as_str()))
            }
            FaultKind::Deaf => {
                others(self.node).iter().for_each(|other| sim.repair_oneway(other.as_str(), name))
            }
            FaultKind::Mute => {
                others(self.node).iter().for_each(|other| sim.repair_oneway(name, other.as_str()))
            }
            FaultKind::Crash | FaultKind::PowerLoss | FaultKind::Outage => sim.bounce(name),
            FaultKind::Lossy => {
                for other in others(self.node) {
                    sim.set_link_fail_rate(name, other.as_str(), 0.0);
                }
                others(self.node).iter().for_each(|other| sim.repair(name, other.as_str()));
            }
            FaultKind::Hold | FaultKind::Pause | FaultKind::SplitHold => {
                others(self.node).iter().for_each(|other| sim.release(name, other.as_str()))
            }
        }
    }
}

/// The clocks of one run.
pub struct ClockProfile {
    /// Its name, for the report.
    pub name: &'static str,
    /// The cluster's bound on every clock's uncertainty (`--max-clock-offset`).
    pub bound: Duration,
    /// Each node's clock options.
    pub clocks: Vec<SimulatedClockOptions>,
    /// Whether clocks jump within their ε.
    pub jumps: bool,
    /// The nodes' Raft timing (before `with_clock_bound`).
    pub timing: RaftTiming,
}

impl ClockProfile {
    /// Draws the clocks of a run.
    pub fn draw(rng: &mut SplitMix64) -> ClockProfile {
        let choice = rng.next_u64() % 10;
        let (name, min_ms, max_ms, max_drift_ppm) = match choice {
            0..=3 => ("tight", 3, 3, 50),
            4..=6 => ("varied", 1, 20, 200),
            _ => ("wide", 150, 300, 200),
        };
        let clocks: Vec<SimulatedClockOptions> = (0..NODES)
            .map(|_| {
                let max_offset_ms = min_ms + rng.next_u64() % (max_ms - min_ms + 1);
                let max_offset = Duration::from_millis(max_offset_ms);
                // Offsets at sync within half of ε; jumps reach ε, so two clocks may differ by
                // up to twice the bound, which the clock checks allow.
                let half = max_offset.as_nanos() as i64 / 2;
                SimulatedClockOptions {
                    offset_at_sync_ns: (rng.next_u64() % (2 * half as u64 + 1)) as i64 - half,
                    drift_ppm: (rng.next_u64() % (2 * max_drift_ppm + 1)) as i64
                        - max_drift_ppm as i64,
                    max_offset,
                    max_drift_ppm,
                }
            })
            .collect();
        let widest = clocks.iter().map(|clock| clock.max_offset).max().unwrap_or_default();
        // ε grows by at most max_drift_ppm over the 5 s between syncs (1 ms at 200 ppm).
        let bound = (widest + Duration::from_millis(2)).max(Duration::from_millis(7));
        // Leases must outlast twice the bound and a heartbeat, and election timeouts the lease
        // and twice the bound (`RaftTiming::with_clock_bound`): wide clocks need slower
        // elections (2 s) and longer leases (1.2 s).
        let timing = if name == "wide" {
            RaftTiming {
                election_timeout_ticks: 20,
                lease_duration: Duration::from_millis(1_200),
                ..RaftTiming::default()
            }
        } else {
            RaftTiming::default()
        };
        ClockProfile { name, bound, clocks, jumps: choice >= 2, timing }
    }

    /// Describes the profile for the report.
    pub fn describe(&self) -> String {
        let clocks: Vec<String> = self
            .clocks
            .iter()
            .enumerate()
            .map(|(index, clock)| {
                format!(
                    "n{} ε {} ms offset {:+.1} ms drift {:+} ppm",
                    index + 1,
                    clock.max_offset.as_millis(),
                    clock.offset_at_sync_ns as f64 / 1e6,
                    clock.drift_ppm
                )
            })
            .collect();
        format!(
            "{} (bound {} ms{}): {}",
            self.name,
            self.bound.as_millis(),
            if self.jumps { ", jumps" } else { "" },
            clocks.join(", ")
        )
    }
}

/// Moves `clock` to a random offset within its ε (forwards or backwards), until its next sync.
/// Returns a description.
pub fn jump_within_bound(clock: &Arc<SimulatedClock>, rng: &mut SplitMix64) -> String {
    let max = clock.options().max_offset.as_nanos() as i64;
    let target = (rng.next_u64() % (2 * max as u64 + 1)) as i64 - max;
    let current = clock.true_offset_ns() as i64;
    clock.jump(target - current);
    format!("jump {:+.1} ms to {:+.1} ms", (target - current) as f64 / 1e6, target as f64 / 1e6)
}

/// Moves every clock to 90 % of its ε ahead of true time (`ahead`) or behind it, until the next
/// sync: done just before a split and once the split probe sees the new range's leader, it makes
/// that leader read a clock far behind the one that time-stamped the probe's first put (every
/// clock still within its ε), so that only the timestamp floor keeps the new range's timestamps
/// above that put's.
pub fn swing_all(clocks: &[Arc<SimulatedClock>], ahead: bool) -> String {
    for clock in clocks {
        let max = clock.options().max_offset.as_nanos() as i64;
        let target = if ahead { max / 10 * 9 } else { -(max / 10 * 9) };
        clock.jump(target - clock.true_offset_ns() as i64);
    }
    format!("every clock {} by 0.9 ε", if ahead { "ahead" } else { "behind" })
}
