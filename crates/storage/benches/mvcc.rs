//! MVCC benchmarks on RocksDB (and the in-memory engine for reference): point reads, 1,000-row
//! range scans and synced batch writes. Run with `cargo bench -p meridian-storage`; results are
//! recorded in `bench/README.md`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use meridian_clock::Timestamp;
use meridian_storage::mvcc::VersionWrite;
use meridian_storage::{Engine, MemoryEngine, Mvcc, RocksEngine, RocksOptions, ScanDirection};

/// Keys loaded before reading.
const KEYS: u64 = 100_000;
/// Versions per key: reads must skip the newer ones.
const VERSIONS_PER_KEY: u64 = 3;

fn key(index: u64) -> Vec<u8> {
    format!("user/{index:08}").into_bytes()
}

/// Loads `KEYS` keys with `VERSIONS_PER_KEY` versions each, at timestamps 10, 20, 30.
fn load<E: Engine>(mvcc: &Mvcc<E>) {
    for chunk_start in (0..KEYS).step_by(1_000) {
        let mut writes = Vec::new();
        for index in chunk_start..chunk_start + 1_000 {
            for version in 1..=VERSIONS_PER_KEY {
                writes.push(VersionWrite {
                    key: key(index),
                    commit_ts: Timestamp::from_nanos(version * 10),
                    value: Some(vec![b'v'; 100]),
                });
            }
        }
        mvcc.write(&writes, false).unwrap();
    }
}

fn rocks() -> (tempfile::TempDir, Mvcc<RocksEngine>) {
    let directory = tempfile::tempdir().unwrap();
    let engine = RocksEngine::open(directory.path(), RocksOptions::default()).unwrap();
    (directory, Mvcc::new(Arc::new(engine)).unwrap())
}

fn reads(c: &mut Criterion) {
    let (_directory, rocks) = rocks();
    load(&rocks);
    rocks.engine().flush().unwrap();
    let memory = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
    load(&memory);
    // Read at 25: the newest version (30) must be skipped.
    let read_ts = Timestamp::from_nanos(25);

    let mut group = c.benchmark_group("mvcc_point_read");
    let mut index = 0u64;
    group.bench_function("rocksdb", |b| {
        b.iter(|| {
            index = (index + 7_919) % KEYS;
            black_box(rocks.get(&key(index), read_ts).unwrap().unwrap());
        })
    });
    group.bench_function("memory", |b| {
        b.iter(|| {
            index = (index + 7_919) % KEYS;
            black_box(memory.get(&key(index), read_ts).unwrap().unwrap());
        })
    });
    group.finish();

    let mut group = c.benchmark_group("mvcc_scan_1000_rows");
    group.throughput(Throughput::Elements(1_000));
    for (name, direction) in
        [("rocksdb_forward", ScanDirection::Forward), ("rocksdb_reverse", ScanDirection::Reverse)]
    {
        group.bench_function(name, |b| {
            b.iter(|| {
                index = (index + 7_919) % (KEYS - 1_000);
                let rows = rocks.scan(&key(index), None, read_ts, direction, 1_000).unwrap();
                assert_eq!(rows.len(), 1_000);
                black_box(rows);
            })
        });
    }
    group.bench_function("memory_forward", |b| {
        b.iter(|| {
            index = (index + 7_919) % (KEYS - 1_000);
            black_box(
                memory.scan(&key(index), None, read_ts, ScanDirection::Forward, 1_000).unwrap(),
            );
        })
    });
    group.finish();
}

fn synced_writes(c: &mut Criterion) {
    let (_directory, rocks) = rocks();
    let mut group = c.benchmark_group("mvcc_synced_batch_write");
    let mut commit_ts = 1u64;
    for batch_size in [1u64, 16, 128] {
        group.throughput(Throughput::Elements(batch_size));
        group.bench_function(format!("rocksdb_{batch_size}_versions"), |b| {
            b.iter_batched(
                || {
                    commit_ts += 1;
                    (0..batch_size)
                        .map(|index| VersionWrite {
                            key: key(index * 997),
                            commit_ts: Timestamp::from_nanos(commit_ts),
                            value: Some(vec![b'w'; 100]),
                        })
                        .collect::<Vec<_>>()
                },
                |writes| rocks.write(&writes, true).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, reads, synced_writes);
criterion_main!(benches);
