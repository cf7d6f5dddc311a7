//! Clock-offset checks between nodes (Spanner §3: a node whose clock disagrees with the others
//! evicts itself rather than hand out timestamps it cannot vouch for).
//!
//! Every hello round trip measures a peer's offset: the peer's clock reading minus the middle
//! of our send and receive readings, give or take half the round trip. A peer is *beyond the
//! bound* when even the most favourable reading of the sample, `|offset| − round_trip / 2`,
//! exceeds twice the maximum clock offset ε: two clocks each within ε of true time may differ
//! by up to 2ε, so only a larger difference shows that one of them is out of bounds (a tighter
//! threshold made healthy nodes evict themselves; the whole-cluster simulation saw it). When
//! that holds for more than half of the known peers (with samples younger than
//! [`SAMPLE_LIFETIME`]), and for at least two of them, this node's own clock is the likely
//! culprit: it refuses to serve and says why. A lone outlier peer does not make its healthy
//! neighbours stop, and a disagreement with a single peer blames neither side (with two nodes,
//! or while a node has heard of only one peer so far).

use std::collections::BTreeMap;
use std::time::Duration;

use meridian_raft::NodeId;
use tokio::time::Instant;

/// Samples older than this are ignored.
pub const SAMPLE_LIFETIME: Duration = Duration::from_secs(10);

/// One offset measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSample {
    /// The peer's clock minus ours, in ns.
    pub offset_ns: i64,
    /// The round trip the measurement took, in ns.
    pub round_trip_ns: u64,
    /// When it was taken.
    pub at: Instant,
}

/// The latest offset sample of every peer.
#[derive(Debug)]
pub struct ClockMonitor {
    max_offset_ns: u64,
    samples: BTreeMap<NodeId, ClockSample>,
}

impl ClockMonitor {
    /// Returns a monitor for the given bound.
    pub fn new(max_offset: Duration) -> Self {
        ClockMonitor { max_offset_ns: max_offset.as_nanos() as u64, samples: BTreeMap::new() }
    }

    /// Records a round trip to `peer`: our clock read `sent` and `received` around it, and the
    /// peer's read `peer_clock` in between (all ns since the epoch).
    pub fn record(&mut self, peer: NodeId, sent: u64, received: u64, peer_clock: u64, at: Instant) {
        let middle = sent / 2 + received / 2 + (sent % 2 + received % 2) / 2;
        let offset_ns = (i128::from(peer_clock) - i128::from(middle))
            .clamp(i64::MIN.into(), i64::MAX.into()) as i64;
        self.samples.insert(
            peer,
            ClockSample { offset_ns, round_trip_ns: received.saturating_sub(sent), at },
        );
    }

    /// Returns the samples, by peer.
    pub fn samples(&self) -> &BTreeMap<NodeId, ClockSample> {
        &self.samples
    }

    /// Returns why this node must not serve, or `None` if its own clock's uncertainty
    /// (`uncertainty`) is within the bound and its clock agrees with a majority of its
    /// `known_peers` peers. An uncertainty beyond the bound (a kernel bound larger than
    /// `--max-clock-offset-ms`) would let the node's lease promises outrun what restarted
    /// peers assume (Raft's restart rule), so it is refused like a skewed clock.
    pub fn problem(
        &self,
        uncertainty: Duration,
        known_peers: usize,
        now: Instant,
    ) -> Option<String> {
        if uncertainty.as_nanos() as u64 > self.max_offset_ns {
            return Some(format!(
                "this node's clock uncertainty ({:.1} ms) exceeds the {:.1} ms bound; it refuses to serve",
                uncertainty.as_secs_f64() * 1e3,
                self.max_offset_ns as f64 / 1e6
            ));
        }
        let beyond: Vec<String> = self
            .samples
            .iter()
            .filter(|(_, sample)| now.saturating_duration_since(sample.at) < SAMPLE_LIFETIME)
            .filter(|(_, sample)| {
                sample.offset_ns.unsigned_abs().saturating_sub(sample.round_trip_ns / 2)
                    > self.max_offset_ns.saturating_mul(2)
            })
            .map(|(peer, sample)| format!("node {peer} by {:.1} ms", sample.offset_ns as f64 / 1e6))
            .collect();
        (beyond.len() >= 2 && beyond.len() * 2 > known_peers).then(|| {
            format!(
                "this node's clock is off from a majority of its peers ({}), by more than twice \
                 the {:.1} ms bound; it refuses to serve",
                beyond.join(", "),
                self.max_offset_ns as f64 / 1e6
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn offsets_are_measured_from_the_middle_of_the_round_trip() {
        let mut monitor = ClockMonitor::new(Duration::from_millis(7));
        let now = Instant::now();
        // Sent at 100 ms, received at 104 ms, the peer read 110 ms: 8 ms ahead, ±2 ms.
        monitor.record(NodeId(2), 100 * MS, 104 * MS, 110 * MS, now);
        assert_eq!(
            monitor.samples()[&NodeId(2)],
            ClockSample { offset_ns: 8 * MS as i64, round_trip_ns: 4 * MS, at: now }
        );
        monitor.record(NodeId(3), 100 * MS, 100 * MS, 91 * MS, now);
        assert_eq!(monitor.samples()[&NodeId(3)].offset_ns, -9 * MS as i64);
    }

    #[test]
    fn a_majority_of_peers_beyond_the_bound_is_a_problem() {
        let now = Instant::now();
        let old = now - SAMPLE_LIFETIME - Duration::from_secs(1);
        // (samples as (peer, offset ms, round trip ms, fresh), known peers, problem?)
        let cases: Vec<(Vec<(u64, i64, u64, bool)>, usize, bool)> = vec![
            (vec![], 2, false),
            (vec![(2, 1, 0, true), (3, -2, 0, true)], 2, false),
            // Two clocks each within 7 ms of true time may be 14 ms apart.
            (vec![(2, 14, 0, true), (3, -14, 0, true)], 2, false),
            (vec![(2, 15, 0, true), (3, -15, 0, true)], 2, true),
            (vec![(2, 50, 0, true)], 2, false),
            // One peer alone cannot tell whose clock is wrong.
            (vec![(2, 50, 0, true)], 1, false),
            (vec![(2, 50, 0, true), (3, -50, 0, true)], 2, true),
            // The round trip could explain 8 of the 20 ms: within twice the 7 ms bound.
            (vec![(2, 20, 16, true), (3, 20, 16, true)], 2, false),
            (vec![(2, 50, 0, true), (3, 50, 0, false)], 2, false),
            (vec![(2, 50, 0, true), (3, 50, 0, true), (4, 0, 0, true), (5, 0, 0, true)], 4, false),
            (vec![(2, 50, 0, true), (3, 50, 0, true), (4, 50, 0, true)], 4, true),
        ];
        for (samples, known, expected) in cases {
            let mut monitor = ClockMonitor::new(Duration::from_millis(7));
            for (peer, offset_ms, round_trip_ms, fresh) in &samples {
                let sent = 1_000 * MS;
                let received = sent + round_trip_ms * MS;
                let peer_clock =
                    ((sent + received) / 2).checked_add_signed(offset_ms * MS as i64).unwrap();
                monitor.record(
                    NodeId(*peer),
                    sent,
                    received,
                    peer_clock,
                    if *fresh { now } else { old },
                );
            }
            let problem = monitor.problem(Duration::from_millis(1), known, now);
            assert_eq!(problem.is_some(), expected, "{samples:?} of {known}");
        }
    }

    /// A clock whose own uncertainty exceeds the bound is a problem even if every peer agrees.
    #[test]
    fn an_uncertainty_beyond_the_bound_is_a_problem() {
        let monitor = ClockMonitor::new(Duration::from_millis(7));
        let now = Instant::now();
        assert!(monitor.problem(Duration::from_millis(7), 2, now).is_none());
        let problem = monitor.problem(Duration::from_millis(8), 2, now).expect("a problem");
        assert!(problem.contains("uncertainty"), "{problem}");
    }
}
