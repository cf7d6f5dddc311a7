//! Key spans: what a lock covers.
//!
//! A span is the half-open interval `[start, end)` of keys, unbounded above when `end` is
//! `None`. A single key `k` is the span `[k, k ‖ 0x00)`: no key lies strictly between `k` and
//! `k ‖ 0x00`, so point and range locks share one overlap rule.

use std::fmt;

use crate::{Result, display_key, error::invalid_input};

/// A half-open interval of keys, `[start, end)`; `end == None` is unbounded.
///
/// Invariant: `end`, when set, is greater than `start` (the span is never empty).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeySpan {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl KeySpan {
    /// Returns the span of one key.
    pub fn key(key: impl Into<Vec<u8>>) -> KeySpan {
        let start = key.into();
        let mut end = start.clone();
        end.push(0);
        KeySpan { start, end: Some(end) }
    }

    /// Returns the span `[start, end)`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) when the span is empty.
    pub fn range(start: impl Into<Vec<u8>>, end: Option<Vec<u8>>) -> Result<KeySpan> {
        let start = start.into();
        if let Some(end) = &end
            && end <= &start
        {
            return Err(invalid_input!(
                "empty key span [{}, {})",
                display_key(&start),
                display_key(end)
            ));
        }
        Ok(KeySpan { start, end })
    }

    /// The first key of the span.
    pub fn start(&self) -> &[u8] {
        &self.start
    }

    /// The end of the span (exclusive), or `None` when unbounded.
    pub fn end(&self) -> Option<&[u8]> {
        self.end.as_deref()
    }

    /// Returns the key when the span is a single key.
    pub fn as_key(&self) -> Option<&[u8]> {
        let end = self.end.as_deref()?;
        (end.len() == self.start.len() + 1 && end.ends_with(&[0]) && end.starts_with(&self.start))
            .then_some(&self.start)
    }

    /// Returns whether `key` lies in the span.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && self.end.as_deref().is_none_or(|end| key < end)
    }

    /// Returns whether every key of `other` lies in this span.
    pub fn covers(&self, other: &KeySpan) -> bool {
        self.start <= other.start
            && match (self.end.as_deref(), other.end.as_deref()) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(end), Some(other_end)) => other_end <= end,
            }
    }

    /// Returns whether the two spans share a key.
    pub fn overlaps(&self, other: &KeySpan) -> bool {
        let starts_before_other_ends =
            other.end.as_deref().is_none_or(|end| self.start.as_slice() < end);
        let other_starts_before_end =
            self.end.as_deref().is_none_or(|end| other.start.as_slice() < end);
        starts_before_other_ends && other_starts_before_end
    }
}

impl fmt::Display for KeySpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.as_key(), &self.end) {
            (Some(key), _) => write!(f, "{}", display_key(key)),
            (None, Some(end)) => write!(f, "[{}, {})", display_key(&self.start), display_key(end)),
            (None, None) => write!(f, "[{}, +inf)", display_key(&self.start)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: &str, end: Option<&str>) -> KeySpan {
        KeySpan::range(start.as_bytes(), end.map(|end| end.as_bytes().to_vec())).unwrap()
    }

    #[test]
    fn overlap_and_cover_rules() {
        let key = |k: &str| KeySpan::key(k.as_bytes());
        let cases = [
            // (a, b, overlaps, a covers b)
            (key("b"), key("b"), true, true),
            (key("b"), key("c"), false, false),
            (key("b"), key("b\0"), false, false),
            (span("a", Some("c")), key("b"), true, true),
            (span("a", Some("b")), key("b"), false, false),
            (span("a", Some("b\0")), key("b"), true, true),
            (span("a", Some("c")), span("b", None), true, false),
            (span("a", None), span("b", None), true, true),
            (span("c", None), span("a", Some("c")), false, false),
            (span("a", Some("c")), span("a", Some("d")), true, false),
        ];
        for (a, b, overlaps, covers) in cases {
            assert_eq!(a.overlaps(&b), overlaps, "{a} overlaps {b}");
            assert_eq!(b.overlaps(&a), overlaps, "{b} overlaps {a}");
            assert_eq!(a.covers(&b), covers, "{a} covers {b}");
        }
    }

    #[test]
    fn keys_are_recognized_and_displayed() {
        assert_eq!(KeySpan::key(b"k".to_vec()).as_key(), Some(&b"k"[..]));
        assert_eq!(span("k", Some("k\0")).as_key(), Some(&b"k"[..]));
        assert_eq!(span("k", Some("l")).as_key(), None);
        assert_eq!(span("k", None).as_key(), None);
        assert_eq!(KeySpan::key(b"a\x01".to_vec()).to_string(), "a\\x01");
        assert_eq!(span("a", Some("c")).to_string(), "[a, c)");
        assert_eq!(span("a", None).to_string(), "[a, +inf)");
        assert!(KeySpan::range(b"b".to_vec(), Some(b"b".to_vec())).is_err());
        assert!(KeySpan::range(b"b".to_vec(), Some(b"a".to_vec())).is_err());
    }
}
