//! Property tests: the range algebra agrees with a plain bitmap model on a small universe.

#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use cbt_core::ranges::{ByteRange, ChunkGeometry, RangeSet};
use proptest::prelude::*;

const U: u64 = 300;

fn model(s: &RangeSet) -> Vec<bool> {
    let mut m = vec![false; U as usize + 64];
    for r in s {
        for i in r.start()..r.end() {
            m[i as usize] = true;
        }
    }
    m
}

fn from_model(m: &[bool]) -> RangeSet {
    RangeSet::from_ranges(
        m.iter()
            .enumerate()
            .filter(|(_, b)| **b)
            .map(|(i, _)| ByteRange::new(i as u64, 1).unwrap()),
    )
}

fn arb_set() -> impl Strategy<Value = RangeSet> {
    prop::collection::vec((0..U, 1..40u64), 0..12)
        .prop_map(|v| RangeSet::try_from_extents(v).unwrap())
}

fn normalized(s: &RangeSet) -> bool {
    s.ranges().windows(2).all(|w| w[0].end() < w[1].start())
}

proptest! {
    #[test]
    fn set_ops_match_bitmap(a in arb_set(), b in arb_set(), clip in 0..U + 50) {
        let (ma, mb) = (model(&a), model(&b));
        let zip = |f: fn(bool, bool) -> bool| -> Vec<bool> {
            ma.iter().zip(&mb).map(|(x, y)| f(*x, *y)).collect()
        };
        for s in [&a, &b] {
            prop_assert!(normalized(s));
        }
        let u = a.union(&b);
        let i = a.intersect(&b);
        let d = a.subtract(&b);
        prop_assert!(normalized(&u) && normalized(&i) && normalized(&d));
        prop_assert_eq!(&u, &from_model(&zip(|x, y| x || y)));
        prop_assert_eq!(&i, &from_model(&zip(|x, y| x && y)));
        prop_assert_eq!(&d, &from_model(&zip(|x, y| x && !y)));
        let clipped: Vec<bool> = ma.iter().enumerate().map(|(k, x)| *x && (k as u64) < clip).collect();
        prop_assert_eq!(a.clip(clip), from_model(&clipped));
        prop_assert_eq!(a.total_bytes(), ma.iter().filter(|x| **x).count() as u64);
        for k in 0..U + 40 {
            prop_assert_eq!(a.contains(k), ma[k as usize]);
        }
        let mut ins = a.clone();
        for r in &b {
            ins.insert(*r);
        }
        prop_assert_eq!(ins, u);
    }

    #[test]
    fn chunk_alignment_covers_exactly_touched_chunks(a in arb_set(), size in 1..U + 50) {
        // Chunk geometry needs >= 4 KiB chunks; scale bytes by 1024 so a "chunk" of 4 units is 4 KiB.
        let scaled = RangeSet::from_ranges(
            a.iter().map(|r| ByteRange::new(r.start() * 1024, r.len() * 1024).unwrap()),
        );
        let g = ChunkGeometry::new(size * 1024, 4096).unwrap();
        let chunks = scaled.chunks(&g);
        let m = model(&a);
        for idx in 0..g.chunk_count() {
            let touched = (idx * 4..(idx * 4 + 4).min(size)).any(|k| m[k as usize]);
            prop_assert_eq!(chunks.contains(idx), touched, "chunk {}", idx);
        }
        let aligned = scaled.align_out(&g);
        prop_assert!(scaled.clip(size * 1024).subtract(&aligned).is_empty());
        prop_assert!(aligned.end() <= size * 1024);
        for r in &aligned {
            prop_assert!(r.start() % 4096 == 0);
            prop_assert!(r.end() % 4096 == 0 || r.end() == size * 1024);
        }
    }
}
