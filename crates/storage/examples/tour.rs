//! A short tour of Meridian's storage foundation: TrueTime intervals, commit-wait, MVCC versions
//! on RocksDB, snapshot reads at past timestamps and garbage collection.
//!
//! Run it with `make demo` (or `cargo run -p meridian-storage --example tour [-- DIR]`). With a
//! directory argument the store is kept there; otherwise a temporary one is used.

use std::sync::Arc;
use std::time::Duration;

use meridian_clock::{ClockOptions, SystemClock, Timestamp, TrueTime};
use meridian_storage::mvcc::VersionWrite;
use meridian_storage::{Mvcc, RocksEngine, RocksOptions, ScanDirection};

fn show(rows: &[(Vec<u8>, meridian_storage::Version)]) -> String {
    rows.iter()
        .map(|(key, version)| {
            format!("{}={}", String::from_utf8_lossy(key), String::from_utf8_lossy(&version.value))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let temporary = tempfile::tempdir()?;
    let directory =
        std::env::args().nth(1).map_or_else(|| temporary.path().to_path_buf(), Into::into);

    let truetime = TrueTime::new(Arc::new(SystemClock::new(ClockOptions::default())?));
    let reading = truetime.read();
    println!("TrueTime: now = [{}, {}]", reading.interval().earliest, reading.interval().latest);
    println!("          ε = {:?} ({} bound)", reading.uncertainty, reading.bound);

    let engine = Arc::new(RocksEngine::open(&directory, RocksOptions::default())?);
    let mvcc = Mvcc::new(engine)?;
    println!("\nRocksDB store at {}", directory.display());

    // Three transactions, each committed at now().latest and acknowledged after commit-wait.
    let mut commits = Vec::new();
    for (round, balance) in [(1, "100"), (2, "70"), (3, "130")] {
        let commit_ts = truetime.now().latest;
        let writes = [
            VersionWrite { key: b"account/alice".to_vec(), commit_ts, value: Some(balance.into()) },
            VersionWrite {
                key: format!("audit/{round}").into_bytes(),
                commit_ts,
                value: Some(b"ok".to_vec()),
            },
        ];
        mvcc.write(&writes, true)?;
        let waited = truetime.wait_until_after(commit_ts, Duration::from_secs(1)).await?;
        println!("commit {round}: alice={balance:>3} at {commit_ts}, commit-wait {waited:.1?}");
        commits.push(commit_ts);
    }

    println!("\nSnapshot reads (no locks):");
    for (round, commit_ts) in commits.iter().enumerate() {
        let rows = mvcc.scan(b"", None, *commit_ts, ScanDirection::Forward, 100)?;
        println!("  as of commit {}: {}", round + 1, show(&rows));
    }
    let before_everything = commits[0].saturating_sub(Duration::from_nanos(1));
    println!("  just before commit 1: {:?}", mvcc.get(b"account/alice", before_everything)?);

    let horizon = commits[1];
    let stats = mvcc.gc(horizon)?;
    println!(
        "\nGC at commit 2: examined {} keys, removed {} versions",
        stats.keys_examined, stats.versions_removed
    );
    match mvcc.get(b"account/alice", commits[0]) {
        Ok(version) => println!("  read at commit 1: {version:?}"),
        Err(error) => println!("  read at commit 1 now fails: {error}"),
    }
    let latest = mvcc.get(b"account/alice", Timestamp::MAX)?;
    println!(
        "  latest: {:?}",
        latest.map(|version| String::from_utf8_lossy(&version.value).into_owned())
    );
    Ok(())
}
