//! The client's route cache: descriptors it looked up, by end key, and the leaders and node
//! addresses it learned. Entries never overlap: inserting a descriptor drops the cached ones it
//! overlaps (they are older or newer versions of the same span; the next error corrects either).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use meridian_rpc::kv::RangeDescriptor;
use meridian_rpc::span::{EndKey, overlaps};

/// What the client knows about where ranges are.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    by_end: BTreeMap<EndKey, RangeDescriptor>,
    /// The address of each range's leader, as last seen.
    pub leaders: HashMap<u64, String>,
    /// Node addresses, from lookups.
    pub addresses: HashMap<u64, String>,
    /// The meta range's leader, as last seen.
    pub meta_leader: Option<String>,
    /// Each range's start key: it never changes for a range id (a split keeps its left part's
    /// id and start), so it finds the range of an id in the key-ordered cache.
    pub starts: HashMap<u64, Vec<u8>>,
}

impl Routes {
    /// Returns the cached descriptor of the range holding `key`.
    pub fn lookup(&self, key: &[u8]) -> Option<&RangeDescriptor> {
        let (_, descriptor) = self
            .by_end
            .range((Bound::Excluded(EndKey::Key(key.to_vec())), Bound::Unbounded))
            .next()?;
        (descriptor.start.as_slice() <= key).then_some(descriptor)
    }

    /// Caches `descriptor`, dropping the entries it overlaps.
    pub fn insert(&mut self, descriptor: RangeDescriptor) {
        let overlapping: Vec<EndKey> = self
            .by_end
            .range((Bound::Excluded(EndKey::Key(descriptor.start.clone())), Bound::Unbounded))
            .take_while(|(_, cached)| overlaps(cached, &descriptor))
            .map(|(end, _)| end.clone())
            .collect();
        for end in overlapping {
            if let Some(old) = self.by_end.remove(&end)
                && old.range_id != descriptor.range_id
            {
                self.leaders.remove(&old.range_id);
            }
        }
        self.starts.insert(descriptor.range_id, descriptor.start.clone());
        self.by_end.insert(EndKey::of(&descriptor.end), descriptor);
    }

    /// Forgets the range `range_id` (it split, moved, or its cached span is wrong).
    pub fn evict(&mut self, range_id: u64) {
        self.by_end.retain(|_, descriptor| descriptor.range_id != range_id);
        self.leaders.remove(&range_id);
    }

    /// Returns how many ranges are cached.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_end.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(id: u64, start: &str, end: &str) -> RangeDescriptor {
        RangeDescriptor {
            range_id: id,
            start: start.into(),
            end: end.into(),
            ..RangeDescriptor::default()
        }
    }

    #[test]
    fn inserts_replace_overlapping_entries() {
        let mut routes = Routes::default();
        routes.insert(descriptor(2, "", ""));
        routes.leaders.insert(2, "a:1".into());
        assert_eq!(routes.lookup(b"q").unwrap().range_id, 2);
        // The range split at "m"; the client learns of the right half first.
        routes.insert(descriptor(3, "m", ""));
        assert_eq!(routes.len(), 1, "the old whole-span entry overlaps and is dropped");
        assert_eq!(routes.lookup(b"q").unwrap().range_id, 3);
        assert!(routes.lookup(b"a").is_none());
        assert!(!routes.leaders.contains_key(&2));
        routes.insert(descriptor(2, "", "m"));
        assert_eq!(routes.lookup(b"a").unwrap().range_id, 2);
        assert_eq!(routes.lookup(b"m").unwrap().range_id, 3);
        routes.evict(3);
        assert!(routes.lookup(b"m").is_none());
        assert_eq!(routes.len(), 1);
    }
}
