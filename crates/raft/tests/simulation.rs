//! Deterministic simulation of Raft groups over many seeds (see `meridian_raft::sim`).
//!
//! - `MERIDIAN_RAFT_SEEDS=N` sets how many seeds the safety test runs (default 1,000), e.g. a
//!   soak: `MERIDIAN_RAFT_SEEDS=100000 cargo test --release -p meridian-raft --test simulation
//!   safety -- --nocapture`.
//! - `MERIDIAN_RAFT_SEED=S` runs one seed alone, to replay a failure.

use meridian_raft::UnsafeSwitches;
use meridian_raft::sim::{Cluster, Report, SimOptions};

/// Returns the options for `seed`: 3 or 5 nodes (5 of which 3 start as voters every fourth
/// seed), with and without leases, alternating.
fn options(seed: u64) -> SimOptions {
    let nodes = if seed.is_multiple_of(2) { 3 } else { 5 };
    SimOptions {
        seed,
        nodes,
        initial_voters: if seed % 8 == 3 { 3 } else { nodes },
        lease_duration_ns: if seed % 4 < 2 { 60_000_000 } else { 0 },
        ..SimOptions::default()
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
    let seeds = seeds();
    for seed in &seeds {
        let report = Cluster::new(options(*seed)).run();
        totals.completed_operations += report.completed_operations;
        totals.acknowledged_writes += report.acknowledged_writes;
        totals.lease_reads += report.lease_reads;
        totals.elections += report.elections;
        totals.config_changes += report.config_changes;
        totals.snapshots_installed += report.snapshots_installed;
        if !report.violations.is_empty() {
            eprintln!("seed {seed} failed (replay with MERIDIAN_RAFT_SEED={seed}):");
            for violation in &report.violations {
                eprintln!("  {violation}");
            }
            failures.push(report);
        }
    }
    println!(
        "{} seeds: {} failed; {} operations completed, {} writes acknowledged, {} lease reads, \
         {} leaders elected, {} membership changes, {} snapshots installed",
        seeds.len(),
        failures.len(),
        totals.completed_operations,
        totals.acknowledged_writes,
        totals.lease_reads,
        totals.elections,
        totals.config_changes,
        totals.snapshots_installed
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
        assert!(totals.config_changes > 0, "no membership change was committed");
        assert!(totals.snapshots_installed > 0, "no snapshot was installed");
    }
}

/// Runs seeds with one rule broken until the simulator reports a violation; returns it.
fn find_violation(
    switches: UnsafeSwitches,
    max_seeds: u64,
    tweak: impl Fn(&mut SimOptions),
) -> (u64, String) {
    for seed in 0..max_seeds {
        let mut broken = options(seed);
        broken.unsafe_switches = switches;
        tweak(&mut broken);
        let report = Cluster::new(broken).run();
        if let Some(violation) = report.violations.first() {
            println!("seed {seed}: {violation}");
            // Control: the same run with every rule intact is clean, so the switch caused it.
            let mut control = options(seed);
            tweak(&mut control);
            let control = Cluster::new(control).run();
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

#[test]
fn voting_without_the_log_check_is_caught() {
    let switches = UnsafeSwitches { vote_without_log_check: true, ..UnsafeSwitches::default() };
    find_violation(switches, 300, |_| {});
}

#[test]
fn committing_previous_term_entries_by_count_is_caught() {
    let switches =
        UnsafeSwitches { commit_previous_term_by_count: true, ..UnsafeSwitches::default() };
    // Raft's Figure 8 needs a leader to crash between replicating an old entry and its own
    // no-op: crash often, and send one entry per append so the two can be split.
    find_violation(switches, 2_000, |options| {
        options.nodes = 3;
        options.fault_per_mille = 40;
        options.max_delay_steps = 30;
        options.max_append_bytes = 1;
        options.compact_every = 0;
    });
}

#[test]
fn serving_an_expired_lease_is_caught() {
    let switches = UnsafeSwitches { serve_expired_lease: true, ..UnsafeSwitches::default() };
    find_violation(switches, 300, |options| options.lease_duration_ns = 60_000_000);
}
