//! The leading byte of every engine key, which separates the kinds of data sharing one engine.
//!
//! Invariant: every key written to an engine by Meridian starts with one of these bytes, and
//! each kind of data owns its prefix alone. New kinds take a new byte; existing bytes never
//! change meaning, since stores on disk depend on them.

/// Store-wide metadata (e.g. the MVCC garbage-collection horizon).
pub const META: u8 = 0x01;
/// MVCC versions of user keys (see [`crate::mvcc`]).
pub const MVCC: u8 = 0x02;
/// Reserved for Raft logs and hard state of the ranges a node hosts.
pub const RAFT: u8 = 0x03;
/// The meta range's data: the descriptors of every range, by end key.
pub const RANGES: u8 = 0x04;

/// Returns the smallest key greater than every key starting with `prefix`, or `None` if no such
/// key exists (the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_cases() {
        let cases: [(&[u8], Option<&[u8]>); 5] = [
            (b"", None),
            (b"a", Some(b"b")),
            (b"a\xff", Some(b"b")),
            (b"\xff\xff", None),
            (b"ab\x00", Some(b"ab\x01")),
        ];
        for (prefix, end) in cases {
            assert_eq!(prefix_end(prefix).as_deref(), end, "{prefix:?}");
        }
    }
}
