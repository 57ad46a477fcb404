//! `engine::backup_buffer_bound` (and so `EngineOptions::backup_memory_bound`) covers the
//! largest buffer the chunk encoder really allocates, measured by a global allocator, for
//! incompressible and adversarial chunks, plain and sealed, at several chunk sizes.
//!
//! One test in its own binary: the allocator watches the calling thread only, and encoded
//! bodies are held until a chunk size is done so that each encode allocates afresh instead of
//! reusing a pooled buffer.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use cbt_store::chunk::{self, EncodedChunk, RawChunk};
use cbt_store::crypto::{MasterKey, RepoKeys};
use cbt_store::engine::{EngineOptions, backup_buffer_bound};
use cbt_store::repo::Codec;
use cbt_store::testing::conformance::body;

/// Records the largest allocation the watching thread makes.
struct Largest;

thread_local! {
    static WATCH: Cell<Option<usize>> = const { Cell::new(None) };
}

fn note(size: usize) {
    let _ = WATCH.try_with(|w| {
        if let Some(m) = w.get() {
            w.set(Some(m.max(size)));
        }
    });
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; `note` only
// touches a const-initialized thread-local `Cell` (no allocation, no destructor).
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// Runs `f` and returns its result and the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    WATCH.with(|w| w.set(Some(0)));
    let out = f();
    let largest = WATCH.with(|w| w.replace(None)).unwrap_or(0);
    (out, largest)
}

/// Chunks of `len` bytes that make the encoder allocate the most: random bytes (the sample
/// says incompressible), random bytes with compressible runs where a sampler looks (eight
/// 4 KiB slices spread evenly, so a full compression pass over mostly random data is tried
/// and can only expand), and for contrast zeros and text.
fn inputs(len: usize) -> Vec<(&'static str, Vec<u8>)> {
    let random = body(len as u64, len).to_vec();
    let mut fooling = random.clone();
    let sample = 4096.min(len);
    let step = (len - sample) / 7;
    for i in 0..8 {
        fooling[i * step..i * step + sample].fill(b'a');
    }
    let text = b"chunk buffer bound, "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect();
    vec![
        ("random", random),
        ("random, sample compressible", fooling),
        ("zeros", vec![0; len]),
        ("text", text),
    ]
}

#[test]
fn the_backup_buffer_bound_covers_every_encoder_allocation() {
    let sealed = Codec::sealed(Arc::new(RepoKeys::derive(&MasterKey::generate().unwrap())));
    let plain = Codec::plain();
    // What the bound was before it counted zstd's worst case; some allocation must exceed it
    // or this test could not tell the two apart.
    let old_bound = |cs: u64| (cs + 52 + 64).next_multiple_of(4096);
    let mut beyond_old = 0;
    for chunk_size in [4u64 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20] {
        let bound = backup_buffer_bound(chunk_size);
        let len = chunk_size as usize;
        let mut held: Vec<EncodedChunk> = Vec::new();
        for (name, raw) in inputs(len) {
            for level in [0, 1, 3] {
                let mut cases: Vec<(&str, usize)> = Vec::new();
                let (e, n) = largest_allocation(|| chunk::encode(&raw, level));
                held.push(e);
                cases.push(("encode", n));
                let (e, n) = largest_allocation(|| {
                    let mut rc = RawChunk::with_len(len);
                    rc.raw_mut().copy_from_slice(&raw);
                    chunk::encode_raw_chunk(rc, level)
                });
                held.push(e);
                cases.push(("encode_raw_chunk", n));
                for (codec_name, codec) in [("plain", &plain), ("sealed", &sealed)] {
                    let (e, n) = largest_allocation(|| codec.encode_chunk(&raw, level).unwrap());
                    held.push(e);
                    cases.push((codec_name, n));
                }
                for (path, n) in cases {
                    assert!(
                        n as u64 <= bound,
                        "{path} of {name} at level {level}, {chunk_size}-byte chunks: allocated \
                         {n} bytes, bound {bound}"
                    );
                    if n as u64 > old_bound(chunk_size) {
                        beyond_old += 1;
                    }
                }
            }
        }
        // The backup-wide bound is per-buffer bound times buffers (5 with every option at 1).
        let one = EngineOptions {
            readers: 1,
            readahead: 1,
            workers: 1,
            transfers: 1,
            compression_level: 1,
            progress: None,
        };
        assert_eq!(one.backup_memory_bound(chunk_size), 5 * bound);
        drop(held);
    }
    assert!(
        beyond_old > 0,
        "no allocation exceeded chunk size + 116 rounded to 4 KiB"
    );
}
