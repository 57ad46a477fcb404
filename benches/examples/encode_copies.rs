//! MB/s of turning a chunk just read into its object, the copying way (read into a plain
//! buffer, `chunk::encode` copies an incompressible chunk's bytes after the header) beside
//! the in-place way (read into a `RawChunk`, `chunk::encode_raw_chunk` frames it where it
//! lies), in the same run, alternated. The "read" is a copy from a source buffer larger than
//! the caches, standing in for pread's copy out of the page cache.
//!
//! Usage: `cargo run --release -p cbt-benches --example encode_copies -- [MIB] [ROUNDS]`
//! (defaults: 256 MiB per measurement, 3 rounds). Prints per data kind the median MB/s of
//! each way over the rounds, the spread, and the ratio in-place / copying.

use std::time::Instant;

use cbt_store::chunk::{self, RawChunk};
use cbt_store::testing::conformance;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const CHUNK: usize = 1 << 20;
/// Source chunks cycled through (64 MiB: larger than any cache, as a volume is).
const SOURCE_CHUNKS: usize = 64;

fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = seed * 40_000;
    while v.len() < len {
        v.extend_from_slice(
            format!(
                "row {i:08} value={}\n",
                "abcdefgh".repeat((i % 5 + 1) as usize)
            )
            .as_bytes(),
        );
        i += 1;
    }
    v.truncate(len);
    v
}

/// MB/s of encoding `chunks` chunks of `source` the copying way.
fn copying(source: &[Vec<u8>], chunks: usize, level: i32) -> f64 {
    let mut buf = vec![0u8; CHUNK];
    let mut stored = 0usize;
    let t = Instant::now();
    for i in 0..chunks {
        buf.copy_from_slice(&source[i % source.len()]);
        let e = chunk::encode(&buf, level);
        stored += e.body.len();
    }
    std::hint::black_box(stored);
    (chunks * CHUNK) as f64 / 1e6 / t.elapsed().as_secs_f64()
}

/// MB/s of encoding `chunks` chunks of `source` in place.
fn in_place(source: &[Vec<u8>], chunks: usize, level: i32) -> f64 {
    let mut stored = 0usize;
    let t = Instant::now();
    for i in 0..chunks {
        let mut raw = RawChunk::with_len(CHUNK);
        raw.raw_mut().copy_from_slice(&source[i % source.len()]);
        let e = chunk::encode_raw_chunk(raw, level);
        stored += e.body.len();
    }
    std::hint::black_box(stored);
    (chunks * CHUNK) as f64 / 1e6 / t.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(256), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    if mib == 0 || rounds == 0 {
        return Err("MIB and ROUNDS must be positive".into());
    }
    let level = chunk::DEFAULT_COMPRESSION_LEVEL;
    // The objects must be what the backup would store: same bytes either way.
    for kind in ["random", "text"] {
        let make = |s| {
            if kind == "random" {
                Vec::from(conformance::body(s, CHUNK))
            } else {
                text(CHUNK, s)
            }
        };
        let source: Vec<Vec<u8>> = (0..SOURCE_CHUNKS as u64).map(make).collect();
        let mut raw = RawChunk::with_len(CHUNK);
        raw.raw_mut().copy_from_slice(&source[0]);
        if chunk::encode_raw_chunk(raw, level).body != chunk::encode(&source[0], level).body {
            return Err(format!("{kind}: the two ways store different objects").into());
        }
        let (mut old, mut new) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            old.push(copying(&source, mib, level));
            new.push(in_place(&source, mib, level));
        }
        let spread = |v: &[f64]| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, 0f64), |(a, b), x| (a.min(*x), b.max(*x)));
            format!("{lo:.0}-{hi:.0}")
        };
        let (o, n) = (median(&mut old), median(&mut new));
        println!(
            "{kind}: copying {o:.0} MB/s ({}), in place {n:.0} MB/s ({}), ratio {:.3}",
            spread(&old),
            spread(&new),
            n / o
        );
    }
    Ok(())
}
