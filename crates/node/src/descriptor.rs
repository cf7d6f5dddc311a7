//! Range descriptors and the meta index of them.
//!
//! A [`RangeDescriptor`] names a range and its span `[start, end)` of user keys; its replicas are
//! the range's Raft configuration. The meta range keeps a [`MetaIndex`]: every range's descriptor
//! (with replica lists, as routing hints) by end key. Invariants of the index:
//!
//! - Entries never overlap: each key is covered by at most one entry.
//! - An update never replaces a newer entry with an older one. Splits only subdivide spans, so
//!   two overlapping descriptors are an ancestor and a descendant, and the descendant has the
//!   higher generation; of two versions of one range's descriptor, the one with the higher
//!   `(generation, config_index)` is newer.
//!
//! An update removes the older entries it overlaps. A key can therefore be uncovered for a
//! moment — when one half of a split is recorded before the other — and a lookup of it fails
//! with a retryable error until the other half's leader records its own descriptor.

use std::collections::BTreeMap;
use std::ops::Bound;

use meridian_rpc::kv as wire;
use meridian_rpc::span::{EndKey, overlaps};
use meridian_storage::keycode::{decode_escaped, encode_escaped};
use meridian_storage::{WriteBatch, keyspace};

use crate::RangeId;

/// The meta range: it holds the descriptors of all other ranges. It never splits.
pub const META_RANGE: RangeId = RangeId(1);
/// The first data range, created at cluster initialization over all keys.
pub const FIRST_DATA_RANGE: RangeId = RangeId(2);

/// A range's identity and span.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeDescriptor {
    /// The range.
    pub id: RangeId,
    /// The first key of the span.
    pub start: Vec<u8>,
    /// The end of the span (exclusive); `None` for no upper bound.
    pub end: Option<Vec<u8>>,
    /// Raised by every split.
    pub generation: u64,
}

impl RangeDescriptor {
    /// Whether the span holds `key`.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }

    /// Whether the spans share a key.
    pub fn overlaps(&self, other: &RangeDescriptor) -> bool {
        let self_before_other_ends = other.end.as_ref().is_none_or(|end| self.start < *end);
        let other_before_self_ends = self.end.as_ref().is_none_or(|end| other.start < *end);
        self_before_other_ends && other_before_self_ends
    }

    /// Whether `key` lies strictly inside the span (a valid split key).
    pub fn strictly_contains(&self, key: &[u8]) -> bool {
        key > self.start.as_slice() && self.contains(key)
    }

    /// Returns the wire form with the given replica lists.
    pub fn to_wire(
        &self,
        voters: impl IntoIterator<Item = u64>,
        learners: impl IntoIterator<Item = u64>,
        config_index: u64,
    ) -> wire::RangeDescriptor {
        wire::RangeDescriptor {
            range_id: self.id.0,
            start: self.start.clone(),
            end: self.end.clone().unwrap_or_default(),
            generation: self.generation,
            voters: voters.into_iter().collect(),
            learners: learners.into_iter().collect(),
            config_index,
            outgoing_voters: Vec::new(),
        }
    }

    /// Returns the descriptor of a wire form.
    pub fn from_wire(descriptor: &wire::RangeDescriptor) -> Self {
        RangeDescriptor {
            id: RangeId(descriptor.range_id),
            start: descriptor.start.clone(),
            end: (!descriptor.end.is_empty()).then(|| descriptor.end.clone()),
            generation: descriptor.generation,
        }
    }
}

/// The engine key of the meta entry ending at `end`: `RANGES ‖ 0x01 ‖ escaped(end)`, or
/// `RANGES ‖ 0x02` for the unbounded end, so that entries scan in end-key order.
fn engine_key(end: &EndKey) -> Vec<u8> {
    let mut key = vec![keyspace::RANGES];
    match end {
        EndKey::Key(end) => {
            key.push(0x01);
            encode_escaped(end, &mut key);
        }
        EndKey::Unbounded => key.push(0x02),
    }
    key
}

/// The end key a meta entry's engine key names.
fn end_of_engine_key(key: &[u8]) -> Option<EndKey> {
    match key {
        [keyspace::RANGES, 0x01, rest @ ..] => {
            decode_escaped(rest).ok().map(|(end, _)| EndKey::Key(end))
        }
        [keyspace::RANGES, 0x02] => Some(EndKey::Unbounded),
        _ => None,
    }
}

/// The meta range's index of descriptors by end key. See the module docs for its invariants.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetaIndex {
    entries: BTreeMap<EndKey, wire::RangeDescriptor>,
}

impl MetaIndex {
    /// Returns the index stored under the `RANGES` key space, from `(key, value)` pairs.
    ///
    /// # Errors
    ///
    /// A description of the first entry that does not decode.
    pub fn load(stored: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<Self, String> {
        use prost::Message as _;
        let mut entries = BTreeMap::new();
        for (key, value) in stored {
            let end =
                end_of_engine_key(&key).ok_or_else(|| format!("invalid meta key {key:x?}"))?;
            let descriptor = wire::RangeDescriptor::decode(value.as_slice())
                .map_err(|error| format!("invalid descriptor under {key:x?}: {error}"))?;
            entries.insert(end, descriptor);
        }
        Ok(MetaIndex { entries })
    }

    /// Returns the descriptors in key order.
    pub fn descriptors(&self) -> impl Iterator<Item = &wire::RangeDescriptor> {
        self.entries.values()
    }

    /// Returns how many ranges the index holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Returns the descriptor covering `key`, if any.
    pub fn lookup(&self, key: &[u8]) -> Option<&wire::RangeDescriptor> {
        let (_, descriptor) = self
            .entries
            .range((Bound::Excluded(EndKey::Key(key.to_vec())), Bound::Unbounded))
            .next()?;
        (descriptor.start.as_slice() <= key).then_some(descriptor)
    }

    /// Records `descriptor` unless an entry it overlaps is newer; removes the older entries it
    /// overlaps. Stages the changes into `batch` and returns whether it was recorded.
    pub fn update(&mut self, descriptor: &wire::RangeDescriptor, batch: &mut WriteBatch) -> bool {
        use prost::Message as _;
        let overlapping: Vec<EndKey> = self
            .entries
            .range((Bound::Excluded(EndKey::Key(descriptor.start.clone())), Bound::Unbounded))
            .take_while(|(_, existing)| overlaps(existing, descriptor))
            .map(|(end, _)| end.clone())
            .collect();
        let newer_exists = overlapping.iter().any(|end| {
            let existing = &self.entries[end];
            if existing.range_id == descriptor.range_id {
                (existing.generation, existing.config_index)
                    > (descriptor.generation, descriptor.config_index)
            } else {
                existing.generation >= descriptor.generation
            }
        });
        if newer_exists {
            return false;
        }
        for end in overlapping {
            self.entries.remove(&end);
            batch.delete(engine_key(&end));
        }
        let end = EndKey::of(&descriptor.end);
        batch.put(engine_key(&end), descriptor.encode_to_vec());
        self.entries.insert(end, descriptor.clone());
        true
    }

    /// Stages the deletion of every entry into `batch` and empties the index (before a
    /// snapshot replaces it).
    pub fn stage_clear(&mut self, batch: &mut WriteBatch) {
        for end in std::mem::take(&mut self.entries).into_keys() {
            batch.delete(engine_key(&end));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(id: u64, start: &str, end: &str, generation: u64) -> wire::RangeDescriptor {
        wire::RangeDescriptor {
            range_id: id,
            start: start.as_bytes().to_vec(),
            end: end.as_bytes().to_vec(),
            generation,
            voters: vec![1, 2, 3],
            learners: vec![],
            config_index: 1,
            outgoing_voters: vec![],
        }
    }

    fn spans(index: &MetaIndex) -> Vec<(u64, String, String, u64)> {
        index
            .descriptors()
            .map(|d| {
                let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
                (d.range_id, text(&d.start), text(&d.end), d.generation)
            })
            .collect()
    }

    #[test]
    fn lookup_finds_the_covering_range() {
        let mut index = MetaIndex::default();
        let mut batch = WriteBatch::new();
        assert!(index.update(&descriptor(2, "", "m", 1), &mut batch));
        assert!(index.update(&descriptor(3, "m", "", 1), &mut batch));
        let cases =
            [("", Some(2)), ("a", Some(2)), ("l\u{ff}", Some(2)), ("m", Some(3)), ("zz", Some(3))];
        for (key, expected) in cases {
            assert_eq!(index.lookup(key.as_bytes()).map(|d| d.range_id), expected, "{key:?}");
        }
    }

    /// A split recorded in either order, or with one half lost, never leaves overlapping
    /// entries, and an older descriptor never replaces a newer one.
    #[test]
    fn updates_keep_entries_disjoint_and_newest() {
        // Range 2 covers everything, then splits at "m" (new range 3), then at "f" (range 4).
        let parent = descriptor(2, "", "", 0);
        let left = descriptor(2, "", "m", 1);
        let right = descriptor(3, "m", "", 1);
        let left_left = descriptor(2, "", "f", 2);
        let left_right = descriptor(4, "f", "m", 2);
        type Case<'a> =
            (&'a str, Vec<&'a wire::RangeDescriptor>, Vec<(u64, &'a str, &'a str, u64)>);
        let cases: Vec<Case> = vec![
            (
                "split recorded left first",
                vec![&parent, &left, &right],
                vec![(2, "", "m", 1), (3, "m", "", 1)],
            ),
            (
                "split recorded right first: a gap until the left half arrives",
                vec![&parent, &right],
                vec![(3, "m", "", 1)],
            ),
            (
                "a stale parent after its children is ignored",
                vec![&left, &right, &parent],
                vec![(2, "", "m", 1), (3, "m", "", 1)],
            ),
            (
                "a grandchild replaces the parent directly",
                vec![&parent, &left_right],
                vec![(4, "f", "m", 2)],
            ),
            (
                "two splits, the first one's left half lost",
                vec![&parent, &right, &left_left, &left_right],
                vec![(2, "", "f", 2), (4, "f", "m", 2), (3, "m", "", 1)],
            ),
            (
                "the older half of a later split is ignored",
                vec![&left_left, &left],
                vec![(2, "", "f", 2)],
            ),
        ];
        for (name, updates, expected) in cases {
            let mut index = MetaIndex::default();
            let mut batch = WriteBatch::new();
            for update in updates {
                index.update(update, &mut batch);
            }
            let expected: Vec<_> = expected
                .into_iter()
                .map(|(id, start, end, generation)| (id, start.into(), end.into(), generation))
                .collect();
            assert_eq!(spans(&index), expected, "{name}");
        }
    }

    #[test]
    fn replica_changes_replace_older_ones_of_the_same_generation() {
        let mut index = MetaIndex::default();
        let mut batch = WriteBatch::new();
        let mut old = descriptor(2, "", "", 0);
        let mut new = old.clone();
        new.voters = vec![1, 2, 4];
        new.config_index = 9;
        old.config_index = 5;
        assert!(index.update(&new, &mut batch));
        assert!(!index.update(&old, &mut batch), "older replica list must not win");
        assert_eq!(index.lookup(b"x").unwrap().voters, [1, 2, 4]);
    }

    /// What the index stages is what it loads again.
    #[test]
    fn staged_entries_load_back() {
        let mut index = MetaIndex::default();
        let mut batch = WriteBatch::new();
        index.update(&descriptor(2, "", "a\u{0}b", 1), &mut batch);
        index.update(&descriptor(3, "a\u{0}b", "", 1), &mut batch);
        let engine = meridian_storage::MemoryEngine::new();
        use meridian_storage::{Engine, ReadView, ScanDirection};
        engine.write(batch, false).unwrap();
        let stored: Vec<_> = engine
            .scan(&[keyspace::RANGES], Some(&[keyspace::RANGES + 1]), ScanDirection::Forward)
            .map(Result::unwrap)
            .collect();
        assert_eq!(MetaIndex::load(stored).unwrap(), index);
        assert!(MetaIndex::load([(vec![keyspace::RANGES, 7], vec![])]).is_err());
    }
}
