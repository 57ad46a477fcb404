//! Property tests of the normalizer: whatever the message split, the break points and resumes
//! (with drivers that repeat the block before the offset), the emitted batches are increasing,
//! disjoint and their union is exactly the driver's truth from the starting offset on. A sloppy
//! driver (shuffled, duplicated tuples) still yields the exact union.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

use cbt_core::testing::XorShift;
use cbt_csi::Extent;
use cbt_csi::normalize::{Normalizer, RawMessage};
use cbt_csi::ranges::merge_extents;
use proptest::prelude::*;

const BLOCK: u64 = 16;

/// Allocated blocks (FIXED_LENGTH truth) of a volume of `blocks` blocks.
fn truth() -> impl Strategy<Value = (u64, Vec<bool>)> {
    (1u64..120).prop_flat_map(|n| {
        (
            Just(n),
            proptest::collection::vec(any::<bool>(), n as usize),
        )
    })
}

/// What a driver sends when asked from `offset`: every allocated block ending after it.
fn driver_tuples(alloc: &[bool], offset: u64) -> Vec<(i64, i64)> {
    alloc
        .iter()
        .enumerate()
        .filter(|&(i, &a)| a && (i as u64 + 1) * BLOCK > offset)
        .map(|(i, _)| ((i as u64 * BLOCK) as i64, BLOCK as i64))
        .collect()
}

fn expected(alloc: &[bool], origin: u64) -> Vec<Extent> {
    let mut v: Vec<Extent> = alloc
        .iter()
        .enumerate()
        .filter(|&(_, &a)| a)
        .map(|(i, _)| Extent::new(i as u64 * BLOCK, BLOCK))
        .filter(|e| e.end() > origin)
        .map(|e| Extent::new(e.offset.max(origin), e.end() - e.offset.max(origin)))
        .collect();
    merge_extents(&mut v);
    v
}

proptest! {
    #[test]
    fn resumed_streams_are_exact((n, alloc) in truth(), origin_frac in 0.0f64..1.0, per_msg in 1usize..7, breaks in proptest::collection::vec(0usize..6, 0..8)) {
        let cap = n * BLOCK;
        let origin = ((cap as f64) * origin_frac) as u64;
        let mut norm = Normalizer::new(origin);
        let mut out: Vec<Extent> = Vec::new();
        let mut breaks = breaks.into_iter();
        let mut offset = origin;
        loop {
            let tuples = driver_tuples(&alloc, offset);
            // The stream breaks after `b` messages (if any break is left), else completes.
            let limit = breaks.next();
            let mut sent = 0;
            let mut completed = true;
            let chunks: Vec<&[(i64, i64)]> = if tuples.is_empty() { vec![&[]] } else { tuples.chunks(per_msg).collect() };
            for chunk in chunks {
                if limit == Some(sent) {
                    completed = false;
                    break;
                }
                let batch = norm.accept(&RawMessage { block_type: 1, capacity: cap as i64, tuples: chunk.to_vec() }).unwrap();
                for e in batch {
                    if let Some(last) = out.last() {
                        prop_assert!(e.offset >= last.end(), "{e:?} after {last:?}");
                    }
                    out.push(e);
                }
                sent += 1;
            }
            if completed && limit.is_none_or(|l| l >= sent) {
                break;
            }
            offset = norm.resume_offset();
        }
        merge_extents(&mut out);
        prop_assert_eq!(out, expected(&alloc, origin));
        prop_assert_eq!(norm.out_of_order(), 0);
    }

    #[test]
    fn sloppy_driver_yields_the_exact_union((n, alloc) in truth(), seed in any::<u64>(), per_msg in 1usize..9) {
        let cap = n * BLOCK;
        let mut tuples = driver_tuples(&alloc, 0);
        // Duplicate every third tuple and shuffle deterministically.
        let dups: Vec<_> = tuples.iter().step_by(3).cloned().collect();
        tuples.extend(dups);
        let mut stream = XorShift::from_state(seed | 1);
        for i in (1..tuples.len()).rev() {
            tuples.swap(i, (stream.next_u64() % (i as u64 + 1)) as usize);
        }
        let mut norm = Normalizer::new(0);
        let mut out = Vec::new();
        for chunk in tuples.chunks(per_msg) {
            out.extend(norm.accept(&RawMessage { block_type: 1, capacity: cap as i64, tuples: chunk.to_vec() }).unwrap());
        }
        merge_extents(&mut out);
        prop_assert_eq!(out, expected(&alloc, 0));
    }
}
