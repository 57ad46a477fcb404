//! The in-process compute limit of a full backup: read an image's allocated chunks (holes
//! skipped, as a backup skips them) and run BLAKE3, crc32c and zstd level 1 over every one on
//! N threads, storing nothing. A backup cannot be
//! faster than this on the same machine; `benches/compare-restic.sh` reports cbt's full backup
//! as a fraction of it.
//!
//! Usage: `cargo run --release -p cbt-benches --example limit -- IMAGE [THREADS] [CHUNK]`
//! (defaults: 2 threads, 4MiB chunks). Prints one line: `limit_secs=<s> mb_per_s=<MB/s>`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().ok_or("usage: limit IMAGE [THREADS] [CHUNK]")?;
    let threads: usize = args.next().map_or(Ok(2), |s| s.parse())?;
    let chunk = match args.next() {
        Some(s) => cbt_core::units::parse_size(&s)?,
        None => 4 << 20,
    };
    if chunk == 0 || threads == 0 {
        return Err("THREADS and CHUNK must be positive".into());
    }
    let file = Arc::new(File::open(&path)?);
    let size = file.metadata()?.len();
    // Chunks holding any data, in order; a file that cannot report holes is all data.
    let data = cbt_core::extents::data_ranges(&file, size)?
        .unwrap_or_else(|| cbt_core::RangeSet::full(size));
    let geometry = cbt_core::ChunkGeometry::new(size, chunk)?;
    let chunks: Arc<Vec<(u64, usize)>> = Arc::new(
        data.chunks(&geometry)
            .iter()
            .map(|i| (geometry.chunk_offset(i), geometry.chunk_len(i) as usize))
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (file, next, chunks) = (file.clone(), next.clone(), chunks.clone());
            std::thread::spawn(move || -> std::io::Result<u64> {
                let mut buf = vec![0u8; chunk as usize];
                let mut z = zstd::bulk::Compressor::new(1)?;
                let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(buf.len()));
                let mut sink = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&(at, len)) = chunks.get(i) else {
                        return Ok(sink);
                    };
                    file.read_exact_at(&mut buf[..len], at)?;
                    let data = &buf[..len];
                    let h = blake3::hash(data);
                    let c = crc32c::crc32c(data);
                    out.clear();
                    let n = z.compress_to_buffer(data, &mut out)?;
                    sink = sink
                        .wrapping_add(u64::from(h.as_bytes()[0]))
                        .wrapping_add(u64::from(c))
                        .wrapping_add(n as u64);
                }
            })
        })
        .collect();
    let mut sink = 0u64;
    for w in workers {
        sink = sink.wrapping_add(w.join().map_err(|_| "worker panicked")??);
    }
    std::hint::black_box(sink);
    let secs = start.elapsed().as_secs_f64();
    let bytes: u64 = chunks.iter().map(|&(_, len)| len as u64).sum();
    println!(
        "limit_secs={secs:.3} mb_per_s={:.1} bytes={bytes}",
        bytes as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}
