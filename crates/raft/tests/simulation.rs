//! Deterministic simulation of Raft groups over many seeds (see `meridian_raft::sim` for the
//! faults and the invariants checked).
//!
//! The safety test runs the default rotation of [`options`]: eight profiles by `seed % 8`
//! (see [`Profile`]), covering 3, 5 and 6 nodes, voter swaps with partitioned joint phases,
//! one-entry appends with short leader reigns, leases near the election timeout without
//! check-quorum, wide and sawtooth clock uncertainty, and crash points around votes in
//! every seed. It must pass with every rule intact, and asserts that the workload exercised
//! what it checks (writes, lease reads, lease reads with long leases, timestamped writes,
//! membership changes, snapshots, crashes around votes, partitioned joint phases).
//!
//! Each test named `*_is_caught` breaks one rule ([`UnsafeSwitches`]) and shows that the same
//! rotation, untuned, reports an invariant violation within the 1,000 seeds CI runs (skipping
//! seeds that cannot exercise the rule, such as lease switches without leases), and that the
//! same seed passes with the rule intact.
//!
//! - `MERIDIAN_RAFT_SEEDS=N` sets how many seeds the safety test runs (default 1,000), e.g. a
//!   soak: `MERIDIAN_RAFT_SEEDS=100000 cargo test --release -p meridian-raft --test simulation
//!   safety -- --nocapture`.
//! - `MERIDIAN_RAFT_SEED=S` runs one seed alone, to replay a failure.
//! - `MERIDIAN_RAFT_VERBOSE=1` prints each seed's profile, highest term, disruptions and
//!   elections.

use meridian_raft::UnsafeSwitches;
use meridian_raft::sim::{Cluster, Report, SimOptions};

const MS: u64 = 1_000_000;

/// The kinds of seeds, by `seed % 8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    /// 3 voters, 60 ms leases, a constant 2 ms clock uncertainty.
    Plain,
    /// 5 voters, no leases.
    FiveVoters,
    /// 3 voters, appends of one entry, delays up to 30 ms, no compaction, no leases, and
    /// short reigns: half the leaders crash within 150 ms of their election, losing half the
    /// messages they had in flight, and every crashed node restarts within 300 ms. A new
    /// leader's no-op travels apart from older entries, so entries of earlier terms are
    /// committed (or not) on their own (Raft's Figure 8).
    SmallAppends,
    /// 5 nodes, voters swapped between {1,2,3} and {3,4,5}, the halves partitioned during half
    /// of the joint phases; 60 ms leases.
    SwapVoters,
    /// 3 voters, 90 ms leases near the 100 ms election timeout, check-quorum off, uncertainty
    /// following a sawtooth from 1 ms up to a 4 ms bound, a read-mostly bursty workload (30 %
    /// writes, pauses): promises, not timeouts or check-quorum, keep voters from electing.
    LongLease,
    /// 3 voters, 60 ms leases, a fast network (delays up to 2 ms) and clock uncertainty
    /// following a sawtooth up to a 10 ms bound: clocks, not messages, dominate, as in one
    /// datacenter.
    WideClock,
    /// 6 nodes, voters swapped between {1,2,3} and {3,4,5}, halves partitioned, small
    /// appends, no leases.
    SwapSmallAppends,
    /// 5 voters, long leases and check-quorum off as `LongLease`, delays up to 20 ms.
    LongLeaseFiveVoters,
}

fn profile(seed: u64) -> Profile {
    match seed % 8 {
        0 => Profile::Plain,
        1 => Profile::FiveVoters,
        2 => Profile::SmallAppends,
        3 => Profile::SwapVoters,
        4 => Profile::LongLease,
        5 => Profile::WideClock,
        6 => Profile::SwapSmallAppends,
        _ => Profile::LongLeaseFiveVoters,
    }
}

/// Returns the options for `seed`, by its profile (see [`Profile`]).
fn options(seed: u64) -> SimOptions {
    let base = SimOptions {
        seed,
        vote_crash_per_mille: 20,
        crash_point_per_million: 200,
        ..SimOptions::default()
    };
    let swap = SimOptions {
        nodes: 5,
        initial_voters: 3,
        swap_voters: true,
        joint_partition_per_mille: 500,
        ..base.clone()
    };
    let small_appends = SimOptions {
        max_append_bytes: 1,
        max_delay_steps: 30,
        compact_every: 0,
        lease_duration_ns: 0,
        leader_crash_per_mille: 500,
        leader_crash_within_steps: 150,
        restart_within_steps: 300,
        lose_unsent_on_crash_per_mille: 500,
        ..base.clone()
    };
    let long_lease = SimOptions {
        // Voters reboot just before a vote request reaches them more often: a promise a node
        // forgets on restart matters only then.
        vote_crash_per_mille: 100,
        write_per_mille: 300,
        pause_per_mille: 3,
        lease_duration_ns: 90 * MS,
        epsilon_ns: 4 * MS,
        epsilon_min_ns: MS,
        check_quorum: false,
        ..base.clone()
    };
    match profile(seed) {
        Profile::Plain => base,
        Profile::FiveVoters => {
            SimOptions { nodes: 5, initial_voters: 5, lease_duration_ns: 0, ..base }
        }
        Profile::SmallAppends => small_appends,
        Profile::SwapVoters => swap,
        Profile::LongLease => long_lease,
        Profile::WideClock => {
            SimOptions { epsilon_ns: 10 * MS, epsilon_min_ns: MS, max_delay_steps: 2, ..base }
        }
        Profile::SwapSmallAppends => {
            SimOptions { nodes: 6, lease_duration_ns: 0, max_append_bytes: 1, ..swap }
        }
        Profile::LongLeaseFiveVoters => {
            SimOptions { nodes: 5, initial_voters: 5, max_delay_steps: 20, ..long_lease }
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("MERIDIAN_RAFT_SEED") {
        return vec![seed.parse().expect("MERIDIAN_RAFT_SEED must be a number")];
    }
    let count: u64 = std::env::var("MERIDIAN_RAFT_SEEDS")
        .map_or(1_000, |count| count.parse().expect("a number"));
    (0..count).collect()
}

#[test]
fn safety_holds_over_many_seeds() {
    let mut failures: Vec<Report> = Vec::new();
    let mut totals = Report::default();
    let mut long_lease_reads = 0;
    let seeds = seeds();
    for seed in &seeds {
        let report = Cluster::new(options(*seed)).run();
        totals.completed_operations += report.completed_operations;
        totals.acknowledged_writes += report.acknowledged_writes;
        totals.lease_reads += report.lease_reads;
        totals.timestamped_writes += report.timestamped_writes;
        totals.elections += report.elections;
        totals.config_changes += report.config_changes;
        totals.snapshots_installed += report.snapshots_installed;
        totals.crash_points += report.crash_points;
        totals.vote_crashes += report.vote_crashes;
        totals.joint_partitions += report.joint_partitions;
        if matches!(profile(*seed), Profile::LongLease | Profile::LongLeaseFiveVoters) {
            long_lease_reads += report.lease_reads;
        }
        if std::env::var("MERIDIAN_RAFT_VERBOSE").is_ok() {
            println!(
                "seed {seed} {:?}: term {} after {} disruptions, {} elections",
                profile(*seed),
                report.max_term,
                report.disruptions,
                report.elections
            );
        }
        if !report.violations.is_empty() {
            eprintln!("seed {seed} failed (replay with MERIDIAN_RAFT_SEED={seed}):");
            for violation in &report.violations {
                eprintln!("  {violation}");
            }
            failures.push(report);
        }
    }
    println!(
        "{} seeds: {} failed; {} operations completed, {} writes acknowledged, {} lease reads \
         ({} with long leases), {} timestamped writes, {} leaders elected, {} membership \
         changes, {} snapshots installed, {} crash points ({} after votes), {} joint-phase \
         partitions",
        seeds.len(),
        failures.len(),
        totals.completed_operations,
        totals.acknowledged_writes,
        totals.lease_reads,
        long_lease_reads,
        totals.timestamped_writes,
        totals.elections,
        totals.config_changes,
        totals.snapshots_installed,
        totals.crash_points,
        totals.vote_crashes,
        totals.joint_partitions
    );
    assert!(
        failures.is_empty(),
        "failing seeds: {:?}",
        failures.iter().map(|report| report.seed).collect::<Vec<_>>()
    );
    if seeds.len() >= 100 {
        // The workload must exercise the protocol, or the check means nothing.
        assert!(
            totals.acknowledged_writes > seeds.len() * 10,
            "too few writes: {}",
            totals.acknowledged_writes
        );
        assert!(totals.lease_reads > 0, "no lease reads were served");
        assert!(long_lease_reads > 0, "no lease reads were served with long leases");
        assert!(totals.timestamped_writes > 0, "no write took a timestamp from a lease");
        assert!(totals.config_changes > 0, "no membership change was committed");
        assert!(totals.snapshots_installed > 0, "no snapshot was installed");
        assert!(totals.vote_crashes > 0, "no node crashed right after a vote");
        assert!(totals.joint_partitions > 0, "no joint phase was partitioned");
    }
}

/// Runs the default options of seeds `0..max_seeds` (the safety test's rotation, untuned),
/// skipping those for which `relevant` is false (they cannot exercise the broken rule, e.g.
/// lease switches in seeds without leases), with one rule broken, until the simulator reports
/// a violation. Checks that the violation is one of the simulator's invariants (not a node's
/// own assertion) and that the same seed passes with every rule intact; returns the seed and
/// the violation.
fn find_violation(
    switches: UnsafeSwitches,
    max_seeds: u64,
    relevant: impl Fn(&SimOptions) -> bool,
) -> (u64, String) {
    for seed in 0..max_seeds {
        let mut broken = options(seed);
        if !relevant(&broken) {
            continue;
        }
        broken.unsafe_switches = switches;
        let report = Cluster::new(broken).run();
        if let Some(violation) = report.violations.first() {
            println!("seed {seed} ({:?}): {violation}", profile(seed));
            assert!(!violation.starts_with("panic"), "seed {seed}: not an invariant: {violation}");
            // Control: the same run with every rule intact is clean, so the switch caused it.
            let control = Cluster::new(options(seed)).run();
            assert!(
                control.violations.is_empty(),
                "seed {seed} fails without the switch: {:?}",
                control.violations
            );
            return (seed, violation.clone());
        }
    }
    panic!("no violation found in {max_seeds} seeds with {switches:?}");
}

/// Every seed can exercise the rule.
fn any(_: &SimOptions) -> bool {
    true
}

/// Seeds with leases.
fn with_leases(options: &SimOptions) -> bool {
    options.lease_duration_ns > 0
}

/// The CI budget: a rule-break must be caught within the seeds the safety test runs.
const CI_SEEDS: u64 = 1_000;

#[test]
fn granting_a_vote_before_persisting_it_is_caught() {
    let switches = UnsafeSwitches { unpersisted_vote_grant: true, ..UnsafeSwitches::default() };
    let (_, violation) = find_violation(switches, CI_SEEDS, any);
    assert!(violation.starts_with("message durability"), "{violation}");
}

#[test]
fn campaigning_before_persisting_the_candidacy_is_caught() {
    let switches = UnsafeSwitches { unpersisted_candidacy: true, ..UnsafeSwitches::default() };
    let (_, violation) = find_violation(switches, CI_SEEDS, any);
    assert!(violation.starts_with("message durability"), "{violation}");
}

#[test]
fn a_leader_ignoring_higher_terms_is_caught() {
    let switches =
        UnsafeSwitches { ignore_higher_term_responses: true, ..UnsafeSwitches::default() };
    find_violation(switches, CI_SEEDS, any);
}

#[test]
fn joint_decisions_by_the_incoming_majority_alone_are_caught() {
    let switches = UnsafeSwitches { incoming_quorum_only: true, ..UnsafeSwitches::default() };
    find_violation(switches, CI_SEEDS, any);
}

#[test]
fn committing_previous_term_entries_by_count_is_caught() {
    let switches =
        UnsafeSwitches { commit_previous_term_by_count: true, ..UnsafeSwitches::default() };
    find_violation(switches, CI_SEEDS, any);
}

#[test]
fn a_follower_committing_unverified_entries_is_caught() {
    let switches = UnsafeSwitches { follower_commit_unverified: true, ..UnsafeSwitches::default() };
    find_violation(switches, CI_SEEDS, any);
}

#[test]
fn voting_without_the_log_check_is_caught() {
    let switches = UnsafeSwitches { vote_without_log_check: true, ..UnsafeSwitches::default() };
    find_violation(switches, CI_SEEDS, any);
}

#[test]
fn serving_an_expired_lease_is_caught() {
    let switches = UnsafeSwitches { serve_expired_lease: true, ..UnsafeSwitches::default() };
    find_violation(switches, CI_SEEDS, with_leases);
}

#[test]
fn a_lease_longer_than_its_round_allows_is_caught() {
    let switches = UnsafeSwitches { lease_extension_ns: 30 * MS, ..UnsafeSwitches::default() };
    let (_, violation) = find_violation(switches, CI_SEEDS, with_leases);
    assert!(violation.starts_with("lease bound"), "{violation}");
}

#[test]
fn ignoring_the_lease_floor_after_a_transfer_is_caught() {
    let switches = UnsafeSwitches { ignore_lease_floor: true, ..UnsafeSwitches::default() };
    find_violation(switches, CI_SEEDS, with_leases);
}

/// A voter that forgets its promise matters only if a vote request reaches it between its
/// restart and the leader's next heartbeat (which renews the promise), from a candidate cut off
/// from the leader whose log is nonetheless up to date: its consequence, two overlapping
/// leases, is rare, so the promise-keeping invariant checks the rule itself.
#[test]
fn forgetting_the_promise_on_restart_is_caught() {
    let switches = UnsafeSwitches { forget_promise_on_restart: true, ..UnsafeSwitches::default() };
    let (_, violation) = find_violation(switches, CI_SEEDS, with_leases);
    assert!(violation.starts_with("promise kept"), "{violation}");
}
