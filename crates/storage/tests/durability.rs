//! Crash durability of the RocksDB engine under `kill -9`.
//!
//! The test re-runs its own binary as a child process (`writer_child`, which does nothing in a
//! normal test run) that writes synced batches and prints `ack N` after each `write` returns. The
//! parent kills the child with SIGKILL at a random moment, reopens the store and checks that
//! every acknowledged batch is there whole and that no batch is there in part; then it starts
//! the next round on the same store. The seed is printed; `MERIDIAN_TEST_SEED=N` replays it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meridian_storage::{Engine, ReadView, RocksEngine, RocksOptions, ScanDirection, WriteBatch};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Tells the child test where the store is; unset in normal test runs.
const CHILD_DIR_ENV: &str = "MERIDIAN_DURABILITY_CHILD_DIR";
/// Tells the child test the first batch number to write.
const CHILD_START_ENV: &str = "MERIDIAN_DURABILITY_CHILD_START";
/// Keys per batch; spread over the key space so that a batch is not one contiguous run.
const KEYS_PER_BATCH: u64 = 16;
/// Kill rounds per test run.
const ROUNDS: usize = 10;
/// The child stops by itself after this long, in case the parent is gone.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn batch_key(batch: u64, index: u64) -> String {
    format!("k/{index:02}/{batch:010}")
}

fn batch_value(batch: u64, index: u64) -> String {
    format!("batch {batch} key {index} {}", "x".repeat(64))
}

/// The writer half: runs only when the parent sets `CHILD_DIR_ENV`.
#[test]
fn writer_child() {
    let Some(directory) = std::env::var_os(CHILD_DIR_ENV) else { return };
    let start: u64 = std::env::var(CHILD_START_ENV).unwrap().parse().unwrap();
    let engine = RocksEngine::open(Path::new(&directory), RocksOptions::default()).unwrap();
    let began = Instant::now();
    for batch_number in start.. {
        if began.elapsed() > CHILD_LIFETIME {
            break;
        }
        let mut batch = WriteBatch::new();
        for index in 0..KEYS_PER_BATCH {
            batch.put(batch_key(batch_number, index), batch_value(batch_number, index));
        }
        batch.put(b"last".to_vec(), batch_number.to_string());
        engine.write(batch, true).unwrap();
        println!("ack {batch_number}");
    }
}

/// Checks the store: every batch up to `acknowledged` is whole, no batch is partial. Returns the
/// highest batch present.
fn verify(directory: &Path, acknowledged: Option<u64>, seed: u64) -> Option<u64> {
    let engine = RocksEngine::open(directory, RocksOptions::default()).unwrap();
    let mut keys_per_batch: BTreeMap<u64, u64> = BTreeMap::new();
    for entry in engine.scan(b"k/", Some(b"k0"), ScanDirection::Forward) {
        let (key, value) = entry.unwrap();
        let key = String::from_utf8(key).unwrap();
        let (index, batch) = key["k/".len()..].split_once('/').unwrap();
        let (index, batch): (u64, u64) = (index.parse().unwrap(), batch.parse().unwrap());
        assert_eq!(
            value,
            batch_value(batch, index).into_bytes(),
            "seed {seed}: wrong value for {key}"
        );
        *keys_per_batch.entry(batch).or_default() += 1;
    }
    for (batch, count) in &keys_per_batch {
        assert_eq!(*count, KEYS_PER_BATCH, "seed {seed}: batch {batch} is partial");
    }
    let present = keys_per_batch.keys().next_back().copied();
    if let Some(acknowledged) = acknowledged {
        for batch in 0..=acknowledged {
            assert!(
                keys_per_batch.contains_key(&batch),
                "seed {seed}: acknowledged batch {batch} lost"
            );
        }
        let last: u64 =
            String::from_utf8(engine.get(b"last").unwrap().unwrap()).unwrap().parse().unwrap();
        assert_eq!(Some(last), present, "seed {seed}: 'last' disagrees with the batches");
    }
    present
}

#[test]
fn acknowledged_batches_survive_kill_9() {
    let seed = std::env::var("MERIDIAN_TEST_SEED")
        .map_or_else(|_| rand::random(), |seed| seed.parse().unwrap());
    println!("seed {seed} (replay with MERIDIAN_TEST_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let directory = tempfile::tempdir().unwrap();
    let mut acknowledged: Option<u64> = None;
    let mut next_batch = 0;
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "writer_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, directory.path())
            .env(CHILD_START_ENV, next_batch.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(batch) = line.strip_prefix("ack ") {
                    let _ = sender.send(batch.parse::<u64>().unwrap());
                }
            }
        });
        // Wait for the first acknowledgement of this round, then kill at a random moment.
        let first = receiver.recv_timeout(Duration::from_secs(30));
        if first.is_err() {
            let _ = child.kill();
            panic!("seed {seed}: round {round}: the writer acknowledged nothing in 30 s");
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..30_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let round_acknowledged = std::iter::once(first.unwrap()).chain(receiver.try_iter()).max();
        acknowledged = acknowledged.max(round_acknowledged);
        let present = verify(directory.path(), acknowledged, seed);
        println!("round {round}: acknowledged up to {acknowledged:?}, present up to {present:?}");
        next_batch = present.map_or(0, |batch| batch + 1);
    }
}
