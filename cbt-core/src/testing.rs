//! Deterministic pseudo-random data for the workspace's tests, examples and benchmarks.
//!
//! One xorshift64 generator (Marsaglia's 13/7/17 triple) so that every test image, shuffle and
//! benchmark volume is drawn the same way and a failure replays from its seed. Not for keys,
//! nonces or anything an attacker may predict (those come from `ring`'s system RNG). It has no
//! dependencies, so it is built always rather than behind a feature.

/// A xorshift64 stream: 64 bits per step.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

/// Replaces the state 0 (a fixed point of xorshift) and spreads small seeds.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl XorShift {
    /// Starts from the raw state `state`; 0, which would yield only zeros, is replaced by a
    /// fixed constant.
    pub const fn from_state(state: u64) -> Self {
        XorShift(if state == 0 { GOLDEN } else { state })
    }

    /// Starts from a state spread from `seed`, so that nearby seeds give unrelated streams.
    pub const fn seeded(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(GOLDEN) | 1)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Fills `buf` with eight little-endian bytes per step (the last step truncated).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            w.copy_from_slice(&self.next_u64().to_le_bytes()[..w.len()]);
        }
    }

    /// Fills `buf` with the low byte of one step per byte (eight times the steps of
    /// [`XorShift::fill`]: a different stream, kept for data already drawn so).
    pub fn fill_low(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_u64() as u8;
        }
    }

    /// The next `len` bytes as [`XorShift::fill`] draws them.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.fill(&mut out);
        out
    }

    /// The next `len` bytes as [`XorShift::fill_low`] draws them.
    pub fn low_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.fill_low(&mut out);
        out
    }
}

/// `len` bytes drawn by [`XorShift::fill`] from [`XorShift::seeded`]`(seed)`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    XorShift::seeded(seed).bytes(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_xorshift64_and_fill_is_its_little_endian_bytes() {
        // The first steps from state 1, worked out by hand from the 13/7/17 shifts.
        let mut x = XorShift::from_state(1);
        let first = x.next_u64();
        assert_eq!(first, 0x4082_2041);
        let second = x.next_u64();
        assert_eq!(second, 0x1000_4106_0C01_1441);
        let mut buf = [0u8; 12];
        XorShift::from_state(1).fill(&mut buf);
        assert_eq!(&buf[..8], &first.to_le_bytes());
        assert_eq!(&buf[8..], &second.to_le_bytes()[..4]);
        let mut low = [0u8; 2];
        XorShift::from_state(1).fill_low(&mut low);
        assert_eq!(low, [first as u8, second as u8]);
        assert_eq!(XorShift::from_state(1).low_bytes(2), low);
        assert_eq!(XorShift::from_state(1).bytes(12), buf);
    }

    #[test]
    fn zero_is_not_a_stuck_state_and_seeds_differ() {
        assert_ne!(XorShift::from_state(0).next_u64(), 0);
        assert_ne!(noise(1, 64), noise(2, 64));
        assert_eq!(noise(3, 100), noise(3, 100));
        assert_eq!(noise(3, 100)[..64], noise(3, 64)[..]);
    }
}
