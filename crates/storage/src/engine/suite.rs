//! The test suite every [`Engine`] must pass. `engine_suite!` instantiates it for an engine
//! constructor; the bottom of this file runs it for [`MemoryEngine`] and [`RocksEngine`].

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

/// Collects a scan, panicking on errors.
fn collect(iterator: ScanIterator<'_>) -> Vec<KeyValue> {
    iterator.collect::<Result<Vec<_>>>().unwrap()
}

/// Returns the keys of a scan as strings.
fn keys(
    view: &(impl ReadView + ?Sized),
    start: &[u8],
    end: Option<&[u8]>,
    direction: ScanDirection,
) -> Vec<String> {
    collect(view.scan(start, end, direction))
        .into_iter()
        .map(|(key, _)| String::from_utf8(key).unwrap())
        .collect()
}

fn fill(engine: &impl Engine, keys: &[&str]) {
    let mut batch = WriteBatch::new();
    for key in keys {
        batch.put(key.as_bytes(), format!("value of {key}").into_bytes());
    }
    engine.write(batch, false).unwrap();
}

pub fn get_put_delete(engine: impl Engine) {
    assert_eq!(engine.get(b"a").unwrap(), None);
    engine.put(b"a", b"1").unwrap();
    assert_eq!(engine.get(b"a").unwrap(), Some(b"1".to_vec()));
    engine.put(b"a", b"2").unwrap();
    assert_eq!(engine.get(b"a").unwrap(), Some(b"2".to_vec()));
    engine.delete(b"a").unwrap();
    assert_eq!(engine.get(b"a").unwrap(), None);
    // Deleting an absent key is a no-op; empty keys and values are allowed.
    engine.delete(b"absent").unwrap();
    engine.put(b"", b"").unwrap();
    assert_eq!(engine.get(b"").unwrap(), Some(Vec::new()));
}

pub fn scan_ranges_and_directions(engine: impl Engine) {
    fill(&engine, &["a", "b", "ba", "bb", "c", "d\u{0}", "e"]);
    use ScanDirection::*;
    type Case<'a> = (&'a [u8], Option<&'a [u8]>, ScanDirection, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (b"", None, Forward, vec!["a", "b", "ba", "bb", "c", "d\u{0}", "e"]),
        (b"", None, Reverse, vec!["e", "d\u{0}", "c", "bb", "ba", "b", "a"]),
        (b"b", Some(b"c"), Forward, vec!["b", "ba", "bb"]),
        (b"b", Some(b"c"), Reverse, vec!["bb", "ba", "b"]),
        (b"ba", Some(b"bb"), Forward, vec!["ba"]),
        (b"b\xff", None, Forward, vec!["c", "d\u{0}", "e"]),
        (b"", Some(b"b"), Reverse, vec!["a"]),
        (b"d", Some(b"d\x01"), Forward, vec!["d\u{0}"]),
        (b"c", Some(b"c"), Forward, vec![]),
        (b"c", Some(b"c"), Reverse, vec![]),
        (b"d", Some(b"c"), Forward, vec![]),
        (b"f", None, Reverse, vec![]),
    ];
    for (start, end, direction, expected) in cases {
        assert_eq!(
            keys(&engine, start, end, direction),
            expected,
            "{start:?}..{end:?} {direction:?}"
        );
    }
}

pub fn batches_apply_in_order(engine: impl Engine) {
    let mut batch = WriteBatch::new();
    batch.put(b"k".to_vec(), b"1".to_vec());
    batch.delete(b"k".to_vec());
    batch.put(b"j".to_vec(), b"1".to_vec());
    batch.put(b"j".to_vec(), b"2".to_vec());
    assert_eq!(batch.len(), 4);
    assert_eq!(batch.size_bytes(), 7);
    engine.write(batch, true).unwrap();
    assert_eq!(engine.get(b"k").unwrap(), None);
    assert_eq!(engine.get(b"j").unwrap(), Some(b"2".to_vec()));
    engine.write(WriteBatch::new(), true).unwrap();
}

pub fn snapshots_are_isolated(engine: impl Engine) {
    fill(&engine, &["a", "b", "c"]);
    let snapshot = engine.snapshot();
    engine.put(b"a", b"changed").unwrap();
    engine.delete(b"b").unwrap();
    engine.put(b"d", b"new").unwrap();
    assert_eq!(snapshot.get(b"a").unwrap(), Some(b"value of a".to_vec()));
    assert_eq!(snapshot.get(b"b").unwrap(), Some(b"value of b".to_vec()));
    assert_eq!(snapshot.get(b"d").unwrap(), None);
    assert_eq!(keys(&snapshot, b"", None, ScanDirection::Forward), ["a", "b", "c"]);
    assert_eq!(keys(&snapshot, b"", None, ScanDirection::Reverse), ["c", "b", "a"]);
    assert_eq!(keys(&engine, b"", None, ScanDirection::Forward), ["a", "c", "d"]);
}

/// An owned snapshot sees the state it was taken in, outlives the borrow it was taken
/// through, and reads from another thread while the engine goes on.
pub fn owned_snapshots_are_isolated_and_movable(engine: impl Engine) {
    fill(&engine, &["a", "b", "c"]);
    let snapshot = engine.owned_snapshot();
    engine.put(b"a", b"changed").unwrap();
    engine.delete(b"b").unwrap();
    let reader = std::thread::spawn(move || {
        let keys = keys(snapshot.as_ref(), b"", None, ScanDirection::Forward);
        (snapshot.get(b"a").unwrap(), keys)
    });
    engine.put(b"d", b"new").unwrap();
    let (a, keys_seen) = reader.join().unwrap();
    assert_eq!(a, Some(b"value of a".to_vec()));
    assert_eq!(keys_seen, ["a", "b", "c"]);
    assert_eq!(keys(&engine, b"", None, ScanDirection::Forward), ["a", "c", "d"]);
}

pub fn scans_read_one_state(engine: impl Engine) {
    fill(&engine, &["a", "b", "c", "d"]);
    let mut scan = engine.scan(b"", None, ScanDirection::Forward);
    assert_eq!(scan.next().unwrap().unwrap().0, b"a");
    // Writes after the scan started are not seen by it.
    engine.delete(b"c").unwrap();
    engine.put(b"bb", b"new").unwrap();
    let rest: Vec<Vec<u8>> = scan.map(|entry| entry.unwrap().0).collect();
    assert_eq!(rest, [b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]);
}

/// One operation of the model-based property test.
#[derive(Clone, Debug)]
pub enum ModelOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    Scan(Vec<u8>, Option<Vec<u8>>, bool),
    Get(Vec<u8>),
}

fn small_key() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![Just(0u8), Just(b'a'), Just(b'b'), Just(0xffu8)], 0..4)
}

pub fn model_ops() -> impl Strategy<Value = Vec<ModelOp>> {
    let op = prop_oneof![
        (small_key(), small_key()).prop_map(|(key, value)| ModelOp::Put(key, value)),
        small_key().prop_map(ModelOp::Delete),
        proptest::collection::vec((small_key(), proptest::option::of(small_key())), 0..5)
            .prop_map(ModelOp::Batch),
        (small_key(), proptest::option::of(small_key()), any::<bool>())
            .prop_map(|(start, end, reverse)| ModelOp::Scan(start, end, reverse)),
        small_key().prop_map(ModelOp::Get),
    ];
    proptest::collection::vec(op, 1..40)
}

/// Applies `ops` to the engine and to a BTreeMap model, comparing every read.
pub fn matches_model(engine: impl Engine, ops: Vec<ModelOp>) {
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for op in ops {
        match op {
            ModelOp::Put(key, value) => {
                engine.put(&key, &value).unwrap();
                model.insert(key, value);
            }
            ModelOp::Delete(key) => {
                engine.delete(&key).unwrap();
                model.remove(&key);
            }
            ModelOp::Batch(writes) => {
                let mut batch = WriteBatch::new();
                for (key, value) in writes {
                    match value {
                        Some(value) => {
                            batch.put(key.clone(), value.clone());
                            model.insert(key, value);
                        }
                        None => {
                            batch.delete(key.clone());
                            model.remove(&key);
                        }
                    }
                }
                engine.write(batch, false).unwrap();
            }
            ModelOp::Get(key) => assert_eq!(engine.get(&key).unwrap(), model.get(&key).cloned()),
            ModelOp::Scan(start, end, reverse) => {
                let direction =
                    if reverse { ScanDirection::Reverse } else { ScanDirection::Forward };
                let got = collect(engine.scan(&start, end.as_deref(), direction));
                let mut expected: Vec<KeyValue> = model
                    .iter()
                    .filter(|(key, _)| **key >= start && end.as_ref().is_none_or(|end| *key < end))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect();
                if reverse {
                    expected.reverse();
                }
                assert_eq!(got, expected, "scan {start:?}..{end:?} {direction:?}");
            }
        }
    }
}

/// Instantiates the suite for an engine constructor expression.
macro_rules! engine_suite {
    ($module:ident, $new:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn get_put_delete() {
                super::get_put_delete($new);
            }

            #[test]
            fn scan_ranges_and_directions() {
                super::scan_ranges_and_directions($new);
            }

            #[test]
            fn batches_apply_in_order() {
                super::batches_apply_in_order($new);
            }

            #[test]
            fn snapshots_are_isolated() {
                super::snapshots_are_isolated($new);
            }

            #[test]
            fn owned_snapshots_are_isolated_and_movable() {
                super::owned_snapshots_are_isolated_and_movable($new);
            }

            #[test]
            fn scans_read_one_state() {
                super::scans_read_one_state($new);
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(200))]
                #[test]
                fn matches_model(ops in super::model_ops()) {
                    super::matches_model($new, ops);
                }
            }
        }
    };
}

/// A RocksDB engine in a fresh temporary directory, removed when the engine is dropped.
pub struct TempRocks {
    engine: RocksEngine,
    _directory: tempfile::TempDir,
}

impl TempRocks {
    pub fn new() -> Self {
        let directory = tempfile::tempdir().unwrap();
        let engine = RocksEngine::open(directory.path(), RocksOptions::default()).unwrap();
        TempRocks { engine, _directory: directory }
    }
}

impl ReadView for TempRocks {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.engine.get(key)
    }

    fn scan(&self, start: &[u8], end: Option<&[u8]>, direction: ScanDirection) -> ScanIterator<'_> {
        self.engine.scan(start, end, direction)
    }
}

impl Engine for TempRocks {
    type Snapshot<'a> = RocksSnapshot<'a>;

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        self.engine.write(batch, sync)
    }

    fn snapshot(&self) -> RocksSnapshot<'_> {
        self.engine.snapshot()
    }

    fn owned_snapshot(&self) -> super::OwnedSnapshot {
        self.engine.owned_snapshot()
    }
}

engine_suite!(memory, MemoryEngine::new());
engine_suite!(rocksdb, TempRocks::new());

#[test]
fn rocksdb_data_survives_reopen() {
    let directory = tempfile::tempdir().unwrap();
    {
        let engine = RocksEngine::open(directory.path(), RocksOptions::default()).unwrap();
        fill(&engine, &["a", "b"]);
        engine.delete(b"a").unwrap();
    }
    let engine = RocksEngine::open(directory.path(), RocksOptions::default()).unwrap();
    assert_eq!(keys(&engine, b"", None, ScanDirection::Forward), ["b"]);
}

#[test]
fn rocksdb_open_errors_are_reported() {
    let directory = tempfile::tempdir().unwrap();
    let options = RocksOptions { create_if_missing: false, ..Default::default() };
    let error = RocksEngine::open(directory.path().join("missing"), options).unwrap_err();
    assert!(matches!(error, crate::Error::Io(_)), "{error:?}");
    // A second open of a store in use fails on RocksDB's lock instead of corrupting it.
    let _first = RocksEngine::open(directory.path(), RocksOptions::default()).unwrap();
    let error = RocksEngine::open(directory.path(), RocksOptions::default()).unwrap_err();
    assert!(matches!(error, crate::Error::Io(_)), "{error:?}");
    // A file where a directory should be.
    let file = directory.path().join("file");
    std::fs::write(&file, b"not a store").unwrap();
    assert!(RocksEngine::open(&file, RocksOptions::default()).is_err());
}
