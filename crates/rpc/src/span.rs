//! Ordering range descriptors by the end of their span, as the meta range and the clients'
//! route caches index them: the range holding a key is the first whose end lies past it.

use crate::kv::RangeDescriptor;

/// A span's end as an ordered key: every bounded end sorts before the unbounded one (an empty
/// `end` on the wire).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EndKey {
    /// A bounded end (exclusive).
    Key(Vec<u8>),
    /// No upper bound.
    Unbounded,
}

impl EndKey {
    /// The end key of a wire `end` (empty means unbounded).
    pub fn of(end: &[u8]) -> Self {
        if end.is_empty() { EndKey::Unbounded } else { EndKey::Key(end.to_vec()) }
    }
}

/// Whether the spans of two descriptors share a key.
pub fn overlaps(a: &RangeDescriptor, b: &RangeDescriptor) -> bool {
    (b.end.is_empty() || a.start < b.end) && (a.end.is_empty() || b.start < a.end)
}
