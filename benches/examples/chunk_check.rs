//! CPU cost of checking chunk objects as a restore reads them, two ways in the same run:
//! `store-checked`, the store's crc32c pass over the object followed by the chunk decoder's
//! checks (what every read did before the store could leave its comparison to the decoder);
//! `one-pass`, the decoder comparing the store's crc32c in the pass that checks the chunk's
//! own trailer (what restore and `verify --read-data` do now). Both run the same decoder
//! (trailer crc32c, zstd for compressed chunks, BLAKE3), in memory, on one thread, so the
//! difference is the crc32c pass saved.
//!
//! Usage: `cargo run --release -p cbt-benches --example chunk_check -- IMAGE [MIB] [ROUNDS]`
//! (defaults: the first 256 allocated MiB, 7 rounds). The image's allocated 1 MiB chunks are
//! encoded at zstd level 1 (raw where compression does not pay, as a backup stores them);
//! the two ways alternate chunk by chunk, and the median round's ratio is reported with the
//! range over the rounds.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use cbt_store::repo::{ChunkContext, Codec};
use cbt_store::store::UncheckedBody;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: chunk_check IMAGE [MIB] [ROUNDS]")?;
    let mib: u64 = args.next().map_or(Ok(256), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(7), |s| s.parse())?;
    const CHUNK: u64 = 1 << 20;
    let file = File::open(&path)?;
    let size = file.metadata()?.len();
    let data = cbt_core::extents::data_ranges(&file, size)?
        .unwrap_or_else(|| cbt_core::RangeSet::full(size));
    let geometry = cbt_core::ChunkGeometry::new(size, CHUNK)?;
    let codec = Codec::plain();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for i in data.chunks(&geometry).iter().take(mib as usize) {
        let len = geometry.chunk_len(i) as usize;
        file.read_exact_at(&mut buf[..len], geometry.chunk_offset(i))?;
        let e = codec.encode_chunk(&buf[..len], 1)?;
        let stored = UncheckedBody::pending("chunk", e.body, e.body_crc32c);
        chunks.push((e.chunk, stored));
    }
    if chunks.is_empty() {
        return Err("the image holds no data".into());
    }
    let stored: u64 = chunks.iter().map(|(_, b)| b.len() as u64).sum();
    let raw: u64 = chunks.iter().map(|(r, _)| r.raw_len).sum();
    let at = ChunkContext {
        snapshot: "bench/chunk_check",
        index: 0,
        offset: 0,
    };
    let check = |one_pass: bool, r: &cbt_core::ChunkRef, read: &UncheckedBody| -> Res<f64> {
        let start = Instant::now();
        let read = read.clone();
        if one_pass {
            codec.check_chunk(read, r, at)?;
        } else {
            codec.check_chunk(read.into_checked()?, r, at)?;
        }
        Ok(start.elapsed().as_secs_f64())
    };
    // The two ways alternate chunk by chunk (in both orders), so that load from elsewhere
    // falls on both alike; each round gives one ratio, and the median is reported.
    let mut rows = Vec::new();
    for _ in 0..rounds {
        let (mut before, mut now) = (0.0, 0.0);
        for (i, (r, read)) in chunks.iter().enumerate() {
            if i % 2 == 0 {
                before += check(false, r, read)?;
                now += check(true, r, read)?;
            } else {
                now += check(true, r, read)?;
                before += check(false, r, read)?;
            }
        }
        rows.push((now / before, before, now));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, before, now) = rows[rows.len() / 2];
    let mbps = |s: f64| raw as f64 / 1e6 / s;
    println!(
        "chunks={} raw_mib={} stored_mib={} rounds={rounds}",
        chunks.len(),
        raw >> 20,
        stored >> 20
    );
    println!(
        "store-checked secs={before:.4} raw_mb_per_s={:.0}",
        mbps(before)
    );
    println!("one-pass      secs={now:.4} raw_mb_per_s={:.0}", mbps(now));
    println!(
        "one-pass / store-checked CPU: median {ratio:.3}, range {:.3}..{:.3}",
        rows[0].0,
        rows[rows.len() - 1].0
    );
    Ok(())
}
