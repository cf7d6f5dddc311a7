//! A small seeded random number generator (SplitMix64) for election jitter. Raft draws all its
//! randomness from here, so a seed reproduces a run exactly.

/// SplitMix64 (Steele, Lea and Flood, 2014): fast, stateless apart from one word, good enough
/// for timeouts.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// Returns a generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// Returns the next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a value in `[low, high)`.
    ///
    /// # Panics
    ///
    /// If the range is empty.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(low < high, "empty random range {low}..{high}");
        low + self.next_u64() % (high - low)
    }
}
