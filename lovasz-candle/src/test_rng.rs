//! A small deterministic generator for the tests (the unit tests, and `tests/edge_cases.rs`
//! by path): a 64-bit linear congruential generator with Knuth's MMIX constants.

/// The generator's state; each call steps it once.
pub(crate) struct Lcg(pub u64);

impl Lcg {
    /// Steps the state and returns it.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// A value in `[0, 1)` from the top 24 bits of the next state.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}
