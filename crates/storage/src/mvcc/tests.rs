//! MVCC tests: golden scripts (one behaviour per file in `testscripts/mvcc/`, run against both
//! engines, which must print the same) and a model-based property test.

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt::Write as _;

use proptest::prelude::*;
use test_each_file::test_each_path;

use super::*;
use crate::engine::MemoryEngine;
use crate::{RocksEngine, RocksOptions};

/// Runs MVCC commands from a goldenscript.
///
/// Commands (timestamps are small integers, in nanoseconds):
/// - `put KEY TS VALUE`, `delete KEY TS`: write one version.
/// - `write KEY@TS=VALUE ... [KEY@TS=]`: write several versions atomically (empty = tombstone).
/// - `get KEY TS`: the version visible at TS.
/// - `scan TS [from=KEY] [to=KEY] [reverse] [limit=N]`: the versions visible at TS.
/// - `latest KEY`: the newest commit timestamp of KEY.
/// - `gc TS`: collect garbage below TS.
/// - `dump`: every stored version.
struct MvccRunner<E: Engine> {
    mvcc: Mvcc<E>,
}

/// The result type of the script runner.
type ScriptResult<T> = std::result::Result<T, Box<dyn StdError>>;

fn parse_ts(text: &str) -> ScriptResult<Timestamp> {
    Ok(Timestamp::from_nanos(text.parse()?))
}

fn show_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

impl<E: Engine> goldenscript::Runner for MvccRunner<E> {
    type Command = goldenscript::Command;

    fn run(
        &mut self,
        command: &goldenscript::Command,
        _: &goldenscript::Context,
    ) -> ScriptResult<String> {
        let mut args = command.consume_args();
        let mut output = String::new();
        let mut positional =
            || args.next_pos().ok_or_else(|| Box::<dyn StdError>::from("missing argument"));
        match command.name.as_str() {
            "put" => {
                let (key, ts, value) = (positional()?, positional()?, positional()?);
                self.mvcc.put(key.as_bytes(), parse_ts(ts)?, value.as_bytes())?;
            }
            "delete" => {
                let (key, ts) = (positional()?, positional()?);
                self.mvcc.delete(key.as_bytes(), parse_ts(ts)?)?;
            }
            "write" => {
                let mut writes = Vec::new();
                while let Some((key_at_ts, value)) = args.next_key() {
                    let (key, ts) = key_at_ts.split_once('@').ok_or("expected KEY@TS=VALUE")?;
                    let value = (!value.is_empty()).then(|| value.as_bytes().to_vec());
                    writes.push(VersionWrite {
                        key: key.as_bytes().to_vec(),
                        commit_ts: parse_ts(ts)?,
                        value,
                    });
                }
                self.mvcc.write(&writes, true)?;
            }
            "get" => {
                let (key, ts) = (positional()?, positional()?);
                match self.mvcc.get(key.as_bytes(), parse_ts(ts)?)? {
                    Some(version) => writeln!(
                        output,
                        "{key}@{} = {}",
                        version.commit_ts.as_nanos(),
                        show_key(&version.value)
                    )?,
                    None => writeln!(output, "{key}: none")?,
                }
            }
            "scan" => {
                let ts = parse_ts(positional()?)?;
                let from = args.take_key("from").unwrap_or("");
                let to = args.take_key("to");
                let limit =
                    args.take_key("limit").map(str::parse).transpose()?.unwrap_or(usize::MAX);
                let direction = match args.next_pos() {
                    Some("reverse") => ScanDirection::Reverse,
                    None => ScanDirection::Forward,
                    Some(other) => return Err(format!("unknown scan option {other}").into()),
                };
                let to = to.map(str::as_bytes);
                for (key, version) in self.mvcc.scan(from.as_bytes(), to, ts, direction, limit)? {
                    writeln!(
                        output,
                        "{}@{} = {}",
                        show_key(&key),
                        version.commit_ts.as_nanos(),
                        show_key(&version.value)
                    )?;
                }
            }
            "latest" => {
                let key = positional()?;
                match self.mvcc.latest_commit_ts(key.as_bytes())? {
                    Some(ts) => writeln!(output, "{key}: latest commit at {}", ts.as_nanos())?,
                    None => writeln!(output, "{key}: never written")?,
                }
            }
            "gc" => {
                let stats = self.mvcc.gc(parse_ts(positional()?)?)?;
                writeln!(
                    output,
                    "examined {} keys, removed {} versions",
                    stats.keys_examined, stats.versions_removed
                )?;
            }
            "dump" => {
                writeln!(output, "gc horizon {}", self.mvcc.gc_horizon().as_nanos())?;
                for VersionWrite { key, commit_ts, value } in self.mvcc.dump()? {
                    let value = value.map_or("<tombstone>".to_string(), |value| show_key(&value));
                    writeln!(output, "{}@{} = {value}", show_key(&key), commit_ts.as_nanos())?;
                }
            }
            name => return Err(format!("unknown command {name}").into()),
        }
        args.reject_next()?;
        Ok(output)
    }
}

test_each_path! { in "crates/storage/testscripts/mvcc" as memory => run_on_memory }
test_each_path! { in "crates/storage/testscripts/mvcc" as rocksdb => run_on_rocksdb }

fn run_on_memory(path: &std::path::Path) {
    let mvcc = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
    goldenscript::run(&mut MvccRunner { mvcc }, path).expect("goldenscript failed");
}

fn run_on_rocksdb(path: &std::path::Path) {
    let directory = tempfile::tempdir().unwrap();
    let engine = RocksEngine::open(directory.path(), RocksOptions::default()).unwrap();
    let mvcc = Mvcc::new(Arc::new(engine)).unwrap();
    goldenscript::run(&mut MvccRunner { mvcc }, path).expect("goldenscript failed");
}

#[test]
fn gc_horizon_survives_reopen() {
    let directory = tempfile::tempdir().unwrap();
    let open = || Arc::new(RocksEngine::open(directory.path(), RocksOptions::default()).unwrap());
    {
        let mvcc = Mvcc::new(open()).unwrap();
        mvcc.put(b"a", Timestamp::from_nanos(5), b"x").unwrap();
        mvcc.gc(Timestamp::from_nanos(10)).unwrap();
    }
    let mvcc = Mvcc::new(open()).unwrap();
    assert_eq!(mvcc.gc_horizon(), Timestamp::from_nanos(10));
    let error = mvcc.get(b"a", Timestamp::from_nanos(9)).unwrap_err();
    assert!(matches!(error, Error::BelowGcHorizon { .. }), "{error:?}");
    assert!(error.is_deterministic());
}

/// A range's span holds exactly the keys in `[start, end)`, including keys that share a prefix
/// with the bounds (the escaped encoding keeps `ab` < `ab\0` < `abc`).
#[test]
fn spans_hold_exactly_their_keys() {
    let mvcc = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
    let keys: [&[u8]; 7] = [b"", b"a", b"ab", b"ab\0", b"abc", b"b", b"\xff\xff"];
    for (i, key) in keys.iter().enumerate() {
        mvcc.put(key, Timestamp::from_nanos(10 + i as u64), b"v").unwrap();
        mvcc.put(key, Timestamp::from_nanos(100 + i as u64), b"w").unwrap();
    }
    let span_keys = |start: &[u8], end: Option<&[u8]>| {
        let mut keys: Vec<Vec<u8>> =
            mvcc.dump_span(start, end).unwrap().into_iter().map(|write| write.key).collect();
        keys.dedup();
        keys
    };
    let cases: [(&[u8], Option<&[u8]>, &[&[u8]]); 5] = [
        (b"", None, &keys),
        (b"ab", Some(b"abc"), &[b"ab", b"ab\0"]),
        (b"ab\0", Some(b"b"), &[b"ab\0", b"abc"]),
        (b"b", None, &[b"b", b"\xff\xff"]),
        (b"", Some(b"a"), &[b""]),
    ];
    for (start, end, expected) in cases {
        assert_eq!(span_keys(start, end), expected, "[{start:?}, {end:?})");
    }
    let mut batch = WriteBatch::new();
    assert_eq!(mvcc.stage_clear(&mut batch, b"ab", Some(b"b")).unwrap(), 6);
    mvcc.engine().write(batch, false).unwrap();
    assert_eq!(span_keys(b"", None), [&b""[..], b"a", b"b", b"\xff\xff"]);
}

/// A span read in bounded chunks from an engine snapshot yields every version exactly once,
/// in order, each chunk within its budget plus one version, and nothing written after the
/// snapshot.
#[test]
fn span_reader_chunks_are_bounded_complete_and_consistent() {
    let mvcc = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
    for i in 0..200u64 {
        let key = format!("k{i:03}");
        mvcc.put(key.as_bytes(), Timestamp::from_nanos(10 + i), &[b'v'; 50]).unwrap();
        if i % 3 == 0 {
            mvcc.delete(key.as_bytes(), Timestamp::from_nanos(1_000 + i)).unwrap();
        }
    }
    let expected = mvcc.dump_span(b"k050", Some(b"k150")).unwrap();
    let snapshot = mvcc.engine().owned_snapshot();
    mvcc.put(b"k100", Timestamp::from_nanos(5_000), b"after the snapshot").unwrap();
    let mut reader = SpanReader::new(b"k050", Some(b"k150"));
    let mut read = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = reader.next_chunk(snapshot.as_ref(), 1_000).unwrap() {
        chunks += 1;
        let bytes: usize = chunk
            .iter()
            .map(|version| {
                version.key.len() + 9 + version.value.as_ref().map_or(1, |v| v.len() + 1)
            })
            .sum();
        let largest = chunk.iter().map(|version| version.key.len() + 60).max().unwrap_or(0);
        assert!(bytes <= 1_000 + largest, "a chunk of {bytes} bytes");
        read.extend(chunk);
    }
    assert!(chunks > 5, "{chunks} chunks");
    assert_eq!(read, expected);
}

/// The middle key splits a span's bytes about in half and never at its first key.
#[test]
fn span_size_finds_a_middle_key() {
    let mvcc = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
    assert_eq!(mvcc.span_size(b"", None).unwrap(), SpanSize { bytes: 0, middle_key: None });
    mvcc.put(b"only", Timestamp::from_nanos(1), &[0; 100]).unwrap();
    mvcc.put(b"only", Timestamp::from_nanos(2), &[0; 100]).unwrap();
    let size = mvcc.span_size(b"", None).unwrap();
    assert!(size.bytes > 200);
    assert_eq!(size.middle_key, None, "one key cannot be split");
    for i in 0..100u32 {
        mvcc.put(format!("k{i:03}").as_bytes(), Timestamp::from_nanos(5), &[0; 10]).unwrap();
    }
    let size = mvcc.span_size(b"k", Some(b"l")).unwrap();
    let middle = size.middle_key.unwrap();
    assert!(middle.as_slice() >= &b"k045"[..] && middle.as_slice() <= &b"k055"[..], "{middle:?}");
}

#[test]
fn corrupt_data_is_reported_not_returned() {
    let engine = Arc::new(MemoryEngine::new());
    let mvcc = Mvcc::new(engine.clone()).unwrap();
    mvcc.put(b"a", Timestamp::from_nanos(5), b"x").unwrap();
    // A version key with a 9-byte timestamp, and a value with an unknown tag.
    engine.put(&[&[keyspace::MVCC, b'b', 0x00, 0x01][..], &[0xff; 9]].concat(), b"\x01y").unwrap();
    engine.put(&version_key(b"c", Timestamp::from_nanos(3)), b"\x09").unwrap();
    for key in [&b"b"[..], b"c"] {
        let error = mvcc.get(key, Timestamp::from_nanos(10)).unwrap_err();
        assert!(matches!(error, Error::Corruption(_)), "{error:?}");
        assert!(!error.is_deterministic());
    }
    let error =
        mvcc.scan(b"", None, Timestamp::from_nanos(10), ScanDirection::Forward, 10).unwrap_err();
    assert!(matches!(error, Error::Corruption(_)), "{error:?}");
    // A malformed GC horizon fails the open.
    engine.put(GC_HORIZON_KEY, b"\x01").unwrap();
    assert!(matches!(Mvcc::new(engine).unwrap_err(), Error::Corruption(_)));
}

/// A naive model: every version of every key.
type Model = BTreeMap<Vec<u8>, BTreeMap<u64, Option<Vec<u8>>>>;

fn model_get(model: &Model, key: &[u8], read_ts: u64) -> Option<Version> {
    let (ts, value) = model.get(key)?.range(..=read_ts).next_back()?;
    value.clone().map(|value| Version { commit_ts: Timestamp::from_nanos(*ts), value })
}

fn model_scan(model: &Model, read_ts: u64) -> Vec<(Vec<u8>, Version)> {
    model.keys().filter_map(|key| Some((key.clone(), model_get(model, key, read_ts)?))).collect()
}

fn versions() -> impl Strategy<Value = Vec<(Vec<u8>, u64, Option<Vec<u8>>)>> {
    let key = proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), Just(b'b')], 0..3);
    let value = proptest::option::weighted(0.8, proptest::collection::vec(any::<u8>(), 0..3));
    proptest::collection::vec((key, 1u64..20, value), 0..30)
}

proptest! {
    /// Reads match the naive model at every timestamp and in both directions, and garbage
    /// collection changes nothing a read at or above the horizon sees.
    #[test]
    fn reads_match_the_model_before_and_after_gc(versions in versions(), horizon in 0u64..22) {
        let mvcc = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
        let mut model = Model::new();
        for (key, ts, value) in versions {
            let write = VersionWrite { key: key.clone(), commit_ts: Timestamp::from_nanos(ts), value: value.clone() };
            mvcc.write(&[write], false).unwrap();
            model.entry(key).or_default().insert(ts, value);
        }
        let check = |from_ts: u64| -> std::result::Result<(), TestCaseError> {
            for read_ts in from_ts..22 {
                let expected = model_scan(&model, read_ts);
                let t = Timestamp::from_nanos(read_ts);
                prop_assert_eq!(&mvcc.scan(b"", None, t, ScanDirection::Forward, usize::MAX).unwrap(), &expected);
                let mut reverse = mvcc.scan(b"", None, t, ScanDirection::Reverse, usize::MAX).unwrap();
                reverse.reverse();
                prop_assert_eq!(&reverse, &expected);
                for key in model.keys() {
                    prop_assert_eq!(mvcc.get(key, t).unwrap(), model_get(&model, key, read_ts));
                }
                if expected.len() > 1 {
                    let limited = mvcc.scan(b"", None, t, ScanDirection::Forward, 1).unwrap();
                    prop_assert_eq!(&limited[..], &expected[..1]);
                }
            }
            Ok(())
        };
        check(0)?;
        let stored_before = mvcc.dump().unwrap().len() as u64;
        let stats = mvcc.gc(Timestamp::from_nanos(horizon)).unwrap();
        prop_assert_eq!(mvcc.dump().unwrap().len() as u64, stored_before - stats.versions_removed);
        check(horizon)?;
        // Nothing a read at the horizon can see was kept in vain: at most one version per key
        // at or below the horizon, and never a tombstone there.
        let mut seen = std::collections::BTreeSet::new();
        for VersionWrite { key, commit_ts, value } in mvcc.dump().unwrap() {
            if commit_ts.as_nanos() <= horizon {
                prop_assert!(value.is_some(), "tombstone at or below the horizon survived GC");
                prop_assert!(seen.insert(key), "two versions at or below the horizon survived GC");
            }
        }
    }
}

proptest! {
    /// Staging a span's garbage collection removes exactly what a store-wide collection at the
    /// same horizon removes inside the span, and nothing outside it.
    #[test]
    fn span_gc_collects_only_its_span(versions in versions(), horizon in 0u64..22) {
        let span_mvcc = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
        let whole_mvcc = Mvcc::new(Arc::new(MemoryEngine::new())).unwrap();
        for (key, ts, value) in versions {
            let write = VersionWrite { key, commit_ts: Timestamp::from_nanos(ts), value };
            span_mvcc.write(std::slice::from_ref(&write), false).unwrap();
            whole_mvcc.write(&[write], false).unwrap();
        }
        let before = span_mvcc.dump().unwrap();
        let (start, end) = (&b"a"[..], &b"b"[..]);
        let mut batch = WriteBatch::new();
        let horizon = Timestamp::from_nanos(horizon);
        let stats = span_mvcc.stage_gc(&mut batch, start, Some(end), horizon).unwrap();
        span_mvcc.engine().write(batch, false).unwrap();
        whole_mvcc.gc(horizon).unwrap();
        let inside = |key: &[u8]| key >= start && key < end;
        let after = span_mvcc.dump().unwrap();
        prop_assert_eq!(before.len() - after.len(), stats.versions_removed as usize);
        let expected: Vec<VersionWrite> = before
            .into_iter()
            .filter(|v| !inside(&v.key))
            .chain(whole_mvcc.dump().unwrap().into_iter().filter(|v| inside(&v.key)))
            .collect();
        let mut expected = expected;
        expected.sort_by(|a, b| a.key.cmp(&b.key).then(b.commit_ts.cmp(&a.commit_ts)));
        prop_assert_eq!(after, expected);
        // The store-wide horizon did not move.
        prop_assert_eq!(span_mvcc.gc_horizon(), Timestamp::from_nanos(0));
    }
}
