//! Fuzzing the decoders of everything read from a store: manifest objects (framing, zstd,
//! JSON, validation; format-1 manifests and format-2 heads), format-2 map segments (leaves
//! and nodes) and chunk objects, fed mutated valid objects and arbitrary bytes.
//!
//! Property-based (proptest), so it needs no nightly toolchain and runs in `cargo test` in a
//! few seconds: each property runs a fixed number of cases (`CASES`, raise it with
//! `PROPTEST_CASES` for a longer local run). Every input must decode or fail with an error:
//! never panic (a panic fails the case), never overflow (tests run with overflow checks),
//! and never allocate beyond the bounds the formats promise. The last is measured with a
//! counting global allocator (per thread, so parallel tests do not disturb each other); it
//! sees Rust allocations, not the zstd C library's own, whose window is capped separately.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use cbt_core::manifest::{ChunkMap, SnapshotMeta};
use cbt_core::manifest::{ManifestHead, MapLocation, StoredManifest};
use cbt_core::maptree::{
    EncodedSegment, MAX_SEGMENT_LEN, Segment, SegmentRef, TreeShape, TreeWriter, decode_segment,
};
use cbt_core::plan::{RestorePlan, TargetState};
use cbt_core::ranges::ChunkGeometry;
use cbt_core::{ChunkRef, ChunkState, Manifest, SnapshotName, Timestamp, VolumeName};
use cbt_store::chunk::{self, MAX_RAW_LEN};
use cbt_store::repo::{SnapshotSummary, decode_manifest, decode_stored_manifest};
use proptest::prelude::*;

/// Cases per property: enough to reach the deep paths, few enough to run in seconds.
const CASES: u32 = 256;

struct Counting;

thread_local! {
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // `try_with`: allocations during thread teardown must not panic.
    let _ = CURRENT.try_with(|c| {
        let now = c.get().saturating_add(delta);
        c.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            track(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        track(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            track(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it had allocated at once.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

const MIB: usize = 1 << 20;

fn seed_manifest() -> Manifest {
    let g = ChunkGeometry::new(10 * 4096 + 1000, 4096).unwrap();
    let mut map = ChunkMap::new(g);
    let text = b"fuzz me ".repeat(512);
    for (i, raw) in [
        (0u64, text.clone()),
        (3, vec![7u8; 4096]),
        (4, text.clone()),
        (10, vec![1u8; 1000]),
    ] {
        let e = chunk::encode(&raw, 3);
        map.set(i, ChunkState::Stored(e.chunk)).unwrap();
    }
    let meta = SnapshotMeta {
        volume: VolumeName::new("vol").unwrap(),
        snapshot: SnapshotName::new("snap").unwrap(),
        snapshot_id: "id-1".into(),
        created: Timestamp(1_000),
        source: Default::default(),
        labels: BTreeMap::from([("k".into(), "v".into())]),
        stats: Default::default(),
    };
    Manifest::new(meta, map, None).unwrap()
}

fn frame(json: &[u8]) -> Vec<u8> {
    let mut body = b"CBMF\x01".to_vec();
    body.extend(zstd::bulk::compress(json, 3).unwrap());
    body
}

/// Uses a decoded manifest the way readers do, so arithmetic on its numbers is exercised.
fn exercise(m: &Manifest) {
    m.validate().unwrap();
    let plan = RestorePlan::new(m, TargetState::Dirty);
    let _ = (
        plan.fetch_bytes(),
        plan.unique_fetch_bytes(),
        plan.zero_bytes(),
    );
    for f in plan.fetches() {
        assert!(
            f.offset + f.chunk.raw_len <= m.volume_size(),
            "fetch past the volume"
        );
    }
    for g in plan.fetch_groups() {
        for (_, off) in g.targets {
            assert!(
                off + g.chunk.raw_len <= m.volume_size(),
                "write past the volume"
            );
        }
    }
    let _ = SnapshotSummary::of(m);
    assert!(m.chunks.allocated_bytes() + m.chunks.zero_bytes() == m.volume_size());
    let again = Manifest::from_json(&m.to_json().unwrap()).unwrap();
    assert_eq!(&again, m);
}

/// A format-2 tree of a map with full and partial leaves over three levels: its shape and
/// every segment (children before parents), named by plain BLAKE3.
fn seed_tree() -> (TreeShape, Vec<EncodedSegment>) {
    let g = ChunkGeometry::new(40_000 * 4096 + 1000, 4096).unwrap();
    let shape = TreeShape::new(g);
    let namer = |b: &[u8]| chunk::hash_raw(b);
    let mut w = TreeWriter::new(shape, &namer);
    let e = chunk::encode(&b"segment fuzz ".repeat(316)[..4096], 3);
    let short = chunk::encode(&[5u8; 1000], 3);
    for i in (0..g.chunk_count() - 1).filter(|i| i % 3 == 0 || (16_384..16_600).contains(i)) {
        w.push(i, e.chunk).unwrap();
    }
    w.push(g.chunk_count() - 1, short.chunk).unwrap();
    let mut all = w.take_finished();
    all.extend(w.finish().1);
    (shape, all)
}

/// A decoded segment used the way readers use it: every entry inside its position's range
/// and the volume, with a stored size a chunk object of that length can have.
fn exercise_segment(shape: &TreeShape, s: &EncodedSegment, seg: &Segment) {
    let g = shape.geometry();
    let end = s.pos.first + cbt_core::maptree::span(s.pos.level);
    match seg {
        Segment::Leaf(e) => {
            for (i, r) in e {
                assert!(*i >= s.pos.first && *i < end && *i < g.chunk_count());
                assert_eq!(r.raw_len, g.chunk_len(*i));
                assert!(r.stored_size >= 1 && r.stored_size <= r.raw_len + 256);
            }
        }
        Segment::Node(c) => {
            for (p, r) in c {
                assert_eq!(p.level + 1, s.pos.level);
                assert!(p.first >= s.pos.first && p.first < end && p.first < g.chunk_count());
                assert!(u64::from(r.len) <= MAX_SEGMENT_LEN && r.stored >= 1);
            }
        }
    }
}

/// Byte-level damage: flips, truncation, splices of random bytes.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Overwrite(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Vec<Damage>> {
    prop::collection::vec(
        prop_oneof![
            (any::<usize>(), 1u8..=255).prop_map(|(p, x)| Damage::Flip(p, x)),
            any::<usize>().prop_map(Damage::Truncate),
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
                .prop_map(|(p, b)| Damage::Insert(p, b)),
            (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
                .prop_map(|(p, b)| Damage::Overwrite(p, b)),
        ],
        1..6,
    )
}

fn apply(mut v: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        let n = v.len().max(1);
        match d {
            Damage::Flip(p, x) => {
                if !v.is_empty() {
                    v[p % n] ^= x;
                }
            }
            Damage::Truncate(p) => v.truncate(p % n),
            Damage::Insert(p, b) => {
                let at = p % (v.len() + 1);
                v.splice(at..at, b.iter().copied());
            }
            Damage::Overwrite(p, b) => {
                for (i, x) in b.iter().enumerate() {
                    if let Some(slot) = v.get_mut((p + i) % n) {
                        *slot = *x;
                    }
                }
            }
        }
    }
    v
}

/// Numbers an attacker would pick for a field.
fn nasty_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(999),
        Just(1000),
        Just(4095),
        Just(4096),
        Just(4097),
        Just(MAX_RAW_LEN),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX / 4096),
        Just(u64::MAX - 1),
        Just(u64::MAX),
        any::<u64>(),
        0u64..64,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    /// Damaged manifest objects (framing, zstd stream) decode or fail; never panic, and never
    /// hold more than a few MiB whatever they claim.
    #[test]
    fn damaged_manifest_objects_never_panic(d in damage()) {
        let body = apply(frame(&seed_manifest().to_json().unwrap()), &d);
        let (result, peak) = peak_of(|| decode_manifest("snapshots/vol/snap", &body));
        if let Ok(m) = result {
            exercise(&m);
        }
        prop_assert!(peak < 16 * MIB, "{} bytes allocated", peak);
    }

    /// Damaged manifest JSON, decoded from memory and as a stream.
    #[test]
    fn damaged_manifest_json_never_panics(d in damage()) {
        let json = apply(seed_manifest().to_json().unwrap(), &d);
        let (from_slice, _) = peak_of(|| Manifest::from_json(&json));
        let (from_reader, peak) = peak_of(|| Manifest::from_json_reader(&json[..]));
        prop_assert_eq!(from_slice.is_ok(), from_reader.is_ok());
        if let Ok(m) = from_reader {
            exercise(&m);
        }
        prop_assert!(peak < 16 * MIB, "{} bytes allocated", peak);
    }

    /// Structurally valid JSON with hostile numbers in the header and chunk entries: what a
    /// writer of the store could plant. Anything accepted is safe to restore.
    #[test]
    fn hostile_numbers_in_manifests_are_validated(
        edits in prop::collection::vec((0usize..8, 0usize..5, nasty_u64()), 1..6),
    ) {
        let mut v: serde_json::Value =
            serde_json::from_slice(&seed_manifest().to_json().unwrap()).unwrap();
        for (entry, field, value) in edits {
            match entry {
                // 0..=3: a chunk entry's field (0 index, 2 stored size, 3 crc, 4 raw length)
                e @ 0..=3 if field != 1 => v["chunks"][e][field] = value.into(),
                4 => v["volume_size"] = value.into(),
                5 => v["chunk_size"] = value.into(),
                6 => v["created_unix_ms"] = (value as i64).into(),
                // Reuse one entry's hash elsewhere (one hash, two places).
                _ => {
                    let h = v["chunks"][field % 4][1].clone();
                    v["chunks"][(field + 1) % 4][1] = h;
                }
            }
        }
        let json = serde_json::to_vec(&v).unwrap();
        let (result, peak) = peak_of(|| decode_manifest("k", &frame(&json)));
        if let Ok(m) = result {
            exercise(&m);
        }
        prop_assert!(peak < 16 * MIB, "{} bytes allocated", peak);
    }

    /// Arbitrary bytes as a manifest object.
    #[test]
    fn arbitrary_manifest_objects_never_panic(mut body in prop::collection::vec(any::<u8>(), 0..512)) {
        if body.len() >= 5 && body[0] % 2 == 0 {
            body[..5].copy_from_slice(b"CBMF\x01"); // reach the decoder half the time
        }
        let (result, peak) = peak_of(|| decode_manifest("k", &body));
        if let Ok(m) = result {
            exercise(&m);
        }
        prop_assert!(peak < 16 * MIB, "{} bytes allocated", peak);
    }

    /// Damaged chunk objects, with the trailer checksum recomputed half the time (as someone
    /// rewriting the object would) so the checks behind it are reached; checked standalone,
    /// against the manifest's reference, and into an exact-size buffer.
    #[test]
    fn damaged_chunk_objects_never_panic(
        which in 0usize..3,
        d in damage(),
        reframe in any::<bool>(),
    ) {
        let raws = [b"compressible chunk ".repeat(300), (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect(), vec![9u8; 4096]];
        let raw = &raws[which];
        let e = chunk::encode(raw, if which == 1 { 0 } else { 3 });
        let mut body = apply(e.body.to_vec(), &d);
        if reframe && body.len() >= chunk::OVERHEAD {
            let n = body.len() - chunk::TRAILER_LEN;
            let crc = crc32c::crc32c(&body[..n]);
            body[n..].copy_from_slice(&crc.to_le_bytes());
        }
        let bound = MAX_RAW_LEN as usize + 2 * body.len() + MIB;
        let mut out = Vec::new();
        let (standalone, peak) = peak_of(|| chunk::decode_standalone(&body, &mut out));
        prop_assert!(peak < bound, "{} bytes allocated", peak);
        if let Ok(r) = standalone {
            prop_assert_eq!(chunk::hash_raw(&out), r.hash);
            prop_assert_eq!(out.len() as u64, r.raw_len);
        }
        let (against, peak) = peak_of(|| chunk::decode_into(&body, &e.chunk, &mut out));
        prop_assert!(peak < bound, "{} bytes allocated", peak);
        if against.is_ok() {
            prop_assert_eq!(&out, raw);
        }
        let mut exact = vec![0u8; raw.len()];
        if chunk::decode_into_slice(&body, &e.chunk, &mut exact).is_ok() {
            prop_assert_eq!(&exact, raw);
        }
    }

    /// Arbitrary bytes, and arbitrary headers in front of arbitrary payloads, as chunks.
    #[test]
    fn arbitrary_chunk_objects_never_panic(
        codec in 0u8..3,
        raw_len in nasty_u64(),
        payload in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut body = b"CBCH\x01".to_vec();
        body.push(codec);
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&(raw_len as u32).to_le_bytes());
        body.extend_from_slice(&[0; 36]);
        body.extend_from_slice(&payload);
        let crc = crc32c::crc32c(&body);
        body.extend_from_slice(&crc.to_le_bytes());
        let mut out = Vec::new();
        let (result, peak) = peak_of(|| chunk::decode_standalone(&body, &mut out));
        prop_assert!(result.is_err(), "a forged chunk with a zero hash decoded");
        prop_assert!(peak < MAX_RAW_LEN as usize + MIB, "{} bytes allocated", peak);
        let r = ChunkRef { hash: cbt_core::ChunkHash([0; 32]), stored_size: body.len() as u64, crc32c: 0, raw_len: raw_len.min(1 << 20) };
        let _ = chunk::decode_into(&body, &r, &mut out);
    }

    /// Damaged map segments (leaves and nodes at every level), checked against their parent's
    /// record, or against a record rewritten to the damaged length and count (as a forger
    /// who controls the parent would) so the checks behind the length are reached.
    #[test]
    fn damaged_segments_never_panic(
        which in any::<prop::sample::Index>(),
        d in damage(),
        relabel in any::<bool>(),
        stored in nasty_u64(),
    ) {
        let (shape, all) = seed_tree();
        let s = &all[which.index(all.len())];
        let body = apply(s.bytes.clone(), &d);
        let expected = if relabel {
            SegmentRef { name: s.seg.name, len: body.len() as u32, stored: if stored % 2 == 0 { s.seg.stored } else { stored } }
        } else {
            s.seg
        };
        let (result, peak) = peak_of(|| decode_segment(&body, &shape, s.pos, &expected));
        prop_assert!(peak < MIB, "{} bytes allocated", peak);
        match result {
            Ok(seg) => exercise_segment(&shape, s, &seg),
            Err(e) => prop_assert!(
                matches!(e.kind(), cbt_core::ErrorKind::Integrity | cbt_core::ErrorKind::Unsupported),
                "{e:?}"
            ),
        }
    }

    /// Arbitrary entries behind a valid segment header, at any level and position.
    #[test]
    fn arbitrary_segments_never_panic(
        level in 0u8..4,
        first in nasty_u64(),
        count in 0u64..300,
        payload in prop::collection::vec(any::<u8>(), 0..2048),
        stored in nasty_u64(),
    ) {
        let (shape, _) = seed_tree();
        let mut body = b"CBTS\x01".to_vec();
        body.push(level);
        body.extend_from_slice(&first.to_le_bytes());
        let mut c = count;
        while c >= 0x80 {
            body.push((c as u8) | 0x80);
            c >>= 7;
        }
        body.push(c as u8);
        body.extend_from_slice(&payload);
        let pos = cbt_core::maptree::SegmentPos { level, first };
        let expected = SegmentRef { name: chunk::hash_raw(&body), len: body.len() as u32, stored };
        let (result, peak) = peak_of(|| decode_segment(&body, &shape, pos, &expected));
        prop_assert!(peak < MIB, "{} bytes allocated", peak);
        if let Ok(seg) = result {
            let s = EncodedSegment { pos, seg: expected, bytes: body.clone() };
            exercise_segment(&shape, &s, &seg);
        }
    }

    /// Damaged format-2 heads, framed as stored: decode or fail, never panic, small memory.
    #[test]
    fn damaged_heads_never_panic(d in damage(), reframe in any::<bool>()) {
        let (_, all) = seed_tree();
        let root = all.last().unwrap().seg;
        let mut head: ManifestHead = seed_manifest().head();
        head.map = MapLocation::Tree { root: Some(root) };
        let json = head.to_json().unwrap();
        let body = if reframe { frame(&apply(json, &d)) } else { apply(frame(&json), &d) };
        let (result, peak) = peak_of(|| decode_stored_manifest("snapshots/vol/snap", &body));
        prop_assert!(peak < 16 * MIB, "{} bytes allocated", peak);
        match result {
            Ok(StoredManifest::V2(h)) => {
                let MapLocation::Tree { root } = h.map else { panic!("a head without a tree") };
                if let Some(r) = root {
                    prop_assert!(r.stored >= 1 && r.stored <= h.geometry.chunk_count());
                    prop_assert!(u64::from(r.len) <= MAX_SEGMENT_LEN);
                }
                let again = ManifestHead::from_json(&h.to_json().unwrap()).unwrap();
                prop_assert_eq!(again, h);
            }
            Ok(StoredManifest::V1(m)) => exercise(&m),
            Err(_) => {}
        }
    }
}
