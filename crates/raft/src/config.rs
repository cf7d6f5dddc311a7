//! Options of a Raft node.

use crate::{Error, NodeId, Result};

/// Options of one Raft node.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id.
    pub id: NodeId,
    /// Ticks without hearing from a leader before a follower campaigns; the actual timeout is
    /// drawn from `[election_timeout_ticks, 2 * election_timeout_ticks)` (Raft §5.2).
    pub election_timeout_ticks: u64,
    /// Ticks between heartbeat rounds of a leader.
    pub heartbeat_interval_ticks: u64,
    /// Appends a leader keeps in flight to one follower (pipelining and flow control).
    pub max_inflight_appends: usize,
    /// The most bytes of entries one append carries.
    pub max_append_bytes: usize,
    /// Whether candidates run a pre-vote round first (thesis §9.6).
    pub pre_vote: bool,
    /// Whether a leader steps down when it has not heard from a quorum within an election
    /// timeout (thesis §6.2).
    pub check_quorum: bool,
    /// How long a heartbeat round acknowledged by a quorum lets the leader serve, in
    /// nanoseconds of TrueTime; zero disables leases. With leases, the shortest election
    /// timeout must exceed the lease plus twice `max_clock_offset_ns` (see [`Config::validate`]).
    pub lease_duration_ns: u64,
    /// The real time one tick stands for, in nanoseconds (the application ticks at this
    /// rate). Raft counts ticks, not time; this only lets [`Config::validate`] compare the
    /// election timeout with the lease. Zero when unknown, which leases do not allow.
    pub tick_interval_ns: u64,
    /// The bound ε on every node's clock uncertainty that the group relies on, in
    /// nanoseconds: a leader whose reading is wider asks for no lease, and a restarted node
    /// keeps the promises it may have given to a leader of that uncertainty (see `reads.rs`).
    /// Required with leases.
    pub max_clock_offset_ns: u64,
    /// The seed of the election-timeout jitter, so that runs are reproducible.
    pub seed: u64,
    /// Test-only switches that break one safety rule each, so that tests can show the
    /// simulator catches the violation. All off by default; never set them elsewhere.
    #[doc(hidden)]
    pub unsafe_switches: UnsafeSwitches,
}

/// Switches that deliberately break a Raft rule (see [`Config::unsafe_switches`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnsafeSwitches {
    /// Grant votes without the log up-to-date check (breaks Raft §5.4.1).
    pub vote_without_log_check: bool,
    /// Commit entries of earlier terms by counting replicas (breaks Raft §5.4.2).
    pub commit_previous_term_by_count: bool,
    /// Serve lease reads after the lease has expired.
    pub serve_expired_lease: bool,
    /// Start with no lease promise after a restart (breaks rule 4 of `reads.rs`).
    pub forget_promise_on_restart: bool,
    /// Extend every lease by this many nanoseconds past what its round allows (breaks rule 3).
    pub lease_extension_ns: u64,
    /// Serve from a lease received by transfer before its floor has passed (breaks rule 7).
    pub ignore_lease_floor: bool,
    /// Send a granted `VoteResponse` in a `Ready` whose hard state leaves the new term and vote
    /// out (they are persisted one cycle later): breaks "persist before responding" (Raft
    /// Figure 2, "Rules for all servers"; the `Ready` contract), so a voter that crashes
    /// right after answering can vote again in the same term.
    pub unpersisted_vote_grant: bool,
    /// Send a candidate's `Vote` requests in a `Ready` whose hard state leaves its new term and
    /// its vote for itself out: the same rule for the candidate's own vote (Raft §5.2), so a
    /// candidate that crashes after asking can vote for another in the same term.
    pub unpersisted_candidacy: bool,
    /// Let a leader drop responses (`AppendResponse`, `HeartbeatResponse`, vote responses)
    /// that carry a higher term instead of stepping down (breaks Raft §5.1: "if RPC request or
    /// response contains term T > currentTerm: set currentTerm = T, convert to follower").
    pub ignore_higher_term_responses: bool,
    /// During joint consensus, decide elections, commitment and quorum checks by a majority
    /// of the incoming voters alone (breaks Raft §6: `C_old,new` needs majorities of both).
    pub incoming_quorum_only: bool,
    /// Let a follower advance its commit index to the leader's, capped only at its own last
    /// entry, on every append (accepted or rejected), instead of at the last entry the append
    /// verified to match the leader's log (breaks Raft Figure 2, `AppendEntries` step 5:
    /// "min(leaderCommit, index of last new entry)"). Rejected appends are included because
    /// accepted ones alone cannot show the bug here: a leader's next index for a follower
    /// never falls below the first entry where their logs differ (conflict hints land on it,
    /// and a new leader starts past its own log), so the first append a follower accepts
    /// truncates any stale tail, and its own last index equals the append's last entry.
    pub follower_commit_unverified: bool,
}

impl Config {
    /// Returns options with defaults for the node `id`: 10-tick elections, 2-tick heartbeats,
    /// pre-vote and check-quorum on, no lease.
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 2,
            max_inflight_appends: 64,
            max_append_bytes: 1 << 20,
            pre_vote: true,
            check_quorum: true,
            lease_duration_ns: 0,
            tick_interval_ns: 0,
            max_clock_offset_ns: 0,
            seed: id.0,
            unsafe_switches: UnsafeSwitches::default(),
        }
    }

    /// Checks the options.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] if the id is zero, a tick count is zero, heartbeats are not more
    /// frequent than elections, flow-control limits are zero, or leases are enabled without a
    /// tick interval and clock bound, or with a shortest election timeout that does not exceed
    /// the lease plus twice the clock bound. A follower's promise runs until `after(l + D)`
    /// where `l` is the leader's `now().latest` (up to 2ε past true time): an election timeout
    /// shorter than that would let promises, not timeouts, decide when followers may elect.
    pub fn validate(&self) -> Result<()> {
        if self.id.0 == 0 {
            return Err(Error::InvalidConfig("node id 0 is reserved".into()));
        }
        if self.heartbeat_interval_ticks == 0 || self.election_timeout_ticks == 0 {
            return Err(Error::InvalidConfig("tick counts must be positive".into()));
        }
        if self.heartbeat_interval_ticks >= self.election_timeout_ticks {
            return Err(Error::InvalidConfig(format!(
                "heartbeat interval ({} ticks) must be shorter than the election timeout ({} ticks)",
                self.heartbeat_interval_ticks, self.election_timeout_ticks
            )));
        }
        if self.max_inflight_appends == 0 || self.max_append_bytes == 0 {
            return Err(Error::InvalidConfig("flow-control limits must be positive".into()));
        }
        if self.lease_duration_ns > 0 {
            if self.tick_interval_ns == 0 || self.max_clock_offset_ns == 0 {
                return Err(Error::InvalidConfig(
                    "leases need the tick interval and the clock bound".into(),
                ));
            }
            let election_ns = self.election_timeout_ticks.saturating_mul(self.tick_interval_ns);
            let needed =
                self.lease_duration_ns.saturating_add(self.max_clock_offset_ns.saturating_mul(2));
            if election_ns <= needed {
                return Err(Error::InvalidConfig(format!(
                    "the election timeout ({} ms) must exceed the lease ({} ms) plus twice the \
                     clock bound ({} ms)",
                    election_ns / 1_000_000,
                    self.lease_duration_ns / 1_000_000,
                    self.max_clock_offset_ns / 1_000_000
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_unusable_options() {
        let valid = Config::new(NodeId(1));
        assert!(valid.validate().is_ok());
        let with_lease = Config {
            lease_duration_ns: 89_000_000,
            tick_interval_ns: 10_000_000,
            max_clock_offset_ns: 5_000_000,
            ..valid.clone()
        };
        assert!(with_lease.validate().is_ok());
        type Change = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Change)> = vec![
            ("zero id", Box::new(|config| config.id = NodeId(0))),
            ("zero election timeout", Box::new(|config| config.election_timeout_ticks = 0)),
            ("heartbeat not shorter", Box::new(|config| config.heartbeat_interval_ticks = 10)),
            ("no in-flight appends", Box::new(|config| config.max_inflight_appends = 0)),
            ("no append bytes", Box::new(|config| config.max_append_bytes = 0)),
            (
                "lease without tick interval",
                Box::new(|config| {
                    config.lease_duration_ns = 50_000_000;
                    config.max_clock_offset_ns = 2_000_000;
                }),
            ),
            (
                "lease without clock bound",
                Box::new(|config| {
                    config.lease_duration_ns = 50_000_000;
                    config.tick_interval_ns = 10_000_000;
                }),
            ),
            (
                // 10 ticks of 10 ms = 100 ms, not above 90 ms + 2 × 5 ms.
                "lease as long as the election timeout",
                Box::new(|config| {
                    config.lease_duration_ns = 90_000_000;
                    config.tick_interval_ns = 10_000_000;
                    config.max_clock_offset_ns = 5_000_000;
                }),
            ),
        ];
        for (name, change) in cases {
            let mut config = valid.clone();
            change(&mut config);
            assert!(matches!(config.validate(), Err(Error::InvalidConfig(_))), "{name}");
        }
    }
}
