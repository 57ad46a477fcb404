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

/// The same small universe shifted so that its last byte is `u64::MAX - 1`: the highest
/// addressable half-open range ends exactly at `u64::MAX`.
const TOP: u64 = u64::MAX - (U + 64);

fn shift_up(s: &RangeSet) -> RangeSet {
    RangeSet::from_ranges(
        s.iter()
            .map(|r| ByteRange::from_bounds(TOP + r.start(), TOP + r.end()).unwrap()),
    )
}

proptest! {
    #[test]
    fn set_ops_are_exact_at_the_top_of_u64(a in arb_set(), b in arb_set(), clip in 0..U + 64) {
        let (ta, tb) = (shift_up(&a), shift_up(&b));
        prop_assert_eq!(ta.union(&tb), shift_up(&a.union(&b)));
        prop_assert_eq!(ta.intersect(&tb), shift_up(&a.intersect(&b)));
        prop_assert_eq!(ta.subtract(&tb), shift_up(&a.subtract(&b)));
        prop_assert_eq!(ta.clip(TOP + clip), shift_up(&a.clip(clip)));
        prop_assert_eq!(ta.total_bytes(), a.total_bytes());
        let mut ins = ta.clone();
        for r in &tb {
            ins.insert(*r);
        }
        prop_assert_eq!(ins, ta.union(&tb));
        // A range reaching u64::MAX itself is representable and merges like any other.
        let last = ByteRange::from_bounds(u64::MAX - 1, u64::MAX).unwrap();
        let with_last = ta.union(&RangeSet::from_ranges([last]));
        prop_assert_eq!(with_last.end(), u64::MAX);
        prop_assert!(with_last.contains(u64::MAX - 1));
        prop_assert!(!with_last.contains(u64::MAX));
    }

    #[test]
    fn chunking_a_volume_that_ends_at_u64_max(a in arb_set(), shift in 12u32..27) {
        // Largest volume: u64::MAX bytes, so the last chunk is one byte short of full.
        let cs = 1u64 << shift;
        let g = ChunkGeometry::new(u64::MAX, cs).unwrap();
        prop_assert_eq!(g.chunk_count(), u64::MAX / cs + 1);
        let last = g.chunk_count() - 1;
        prop_assert_eq!(g.chunk_len(last), cs - 1);
        prop_assert_eq!(g.chunk_range(last).unwrap().end(), u64::MAX);
        prop_assert!(g.chunk_range(last + 1).is_err());
        let ta = shift_up(&a);
        let aligned = ta.align_out(&g);
        prop_assert!(ta.subtract(&aligned).is_empty());
        for r in &aligned {
            prop_assert!(r.start() % cs == 0);
            prop_assert!(r.end() % cs == 0 || r.end() == u64::MAX);
        }
        prop_assert_eq!(aligned.clone(), aligned.chunks(&g).to_byte_ranges(&g));
    }
}

#[test]
fn deserialization_rejects_empty_ranges_and_bad_geometry() {
    assert!(serde_json::from_str::<ByteRange>(r#"{"start":5,"end":5}"#).is_err());
    assert!(serde_json::from_str::<ByteRange>(r#"{"start":9,"end":5}"#).is_err());
    assert!(
        serde_json::from_str::<RangeSet>(r#"[{"start":0,"end":4},{"start":9,"end":5}]"#).is_err()
    );
    let s: RangeSet =
        serde_json::from_str(r#"[{"start":8,"end":12},{"start":0,"end":4},{"start":4,"end":6}]"#)
            .unwrap();
    assert_eq!(s, RangeSet::try_from_extents([(0, 6), (8, 4)]).unwrap());
    // A chunk size of 0 would divide by zero in chunk_count().
    assert!(serde_json::from_str::<ChunkGeometry>(r#"{"volume_size":10,"chunk_size":0}"#).is_err());
    assert!(
        serde_json::from_str::<ChunkGeometry>(r#"{"volume_size":10,"chunk_size":5000}"#).is_err()
    );
    let g: ChunkGeometry = serde_json::from_str(r#"{"volume_size":10,"chunk_size":4096}"#).unwrap();
    assert_eq!(g.chunk_count(), 1);
}
