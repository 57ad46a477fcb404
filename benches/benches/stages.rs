//! Per-stage throughput of the backup pipeline: checksums, content hash, compression and the
//! range-to-chunk alignment that turns CBT metadata into a read plan.

use std::hint::black_box;

use cbt_core::{ChunkGeometry, RangeSet};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const CHUNK: usize = 4 * 1024 * 1024;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Text-like data that zstd compresses roughly 4:1, similar to file-system metadata and logs.
fn compressible(len: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"block ",
        b"volume ",
        b"snapshot ",
        b"kube ",
        b"data ",
        b"0001 ",
        b"csi ",
        b"\n",
    ];
    let rnd = random(len / 4 + 8, 99);
    let mut v = Vec::with_capacity(len + 16);
    let mut i = 0;
    while v.len() < len {
        v.extend_from_slice(words[(rnd[i % rnd.len()] % 8) as usize]);
        i += 1;
    }
    v.truncate(len);
    v
}

fn checksums(c: &mut Criterion) {
    let data = random(CHUNK, 1);
    let mut g = c.benchmark_group("checksum_4MiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("crc32c", |b| b.iter(|| crc32c::crc32c(black_box(&data))));
    g.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&data))));
    g.finish();
}

fn compression(c: &mut Criterion) {
    let mut g = c.benchmark_group("zstd_4MiB");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.sample_size(20);
    for (name, data) in [
        ("random", random(CHUNK, 2)),
        ("compressible", compressible(CHUNK)),
    ] {
        for level in [1, 3] {
            g.bench_with_input(
                BenchmarkId::new(format!("compress_{name}"), level),
                &level,
                |b, &level| {
                    b.iter(|| zstd::bulk::compress(black_box(&data), level).map(|v| v.len()))
                },
            );
        }
        let packed = zstd::bulk::compress(&data, 3).unwrap_or_default();
        g.bench_function(BenchmarkId::new(format!("decompress_{name}"), 3), |b| {
            b.iter(|| zstd::bulk::decompress(black_box(&packed), CHUNK).map(|v| v.len()))
        });
    }
    g.finish();
}

fn alignment(c: &mut Criterion) {
    // 1 TiB volume, 200k scattered changed extents of 4-64 KiB (a busy day of a database).
    let volume: u64 = 1 << 40;
    let rnd = random(200_000 * 16, 3);
    let extents: Vec<(u64, u64)> = rnd
        .chunks_exact(16)
        .map(|w| {
            let a = u64::from_le_bytes(w[..8].try_into().unwrap_or_default());
            let b = u64::from_le_bytes(w[8..].try_into().unwrap_or_default());
            let len = 4096 * (1 + b % 16);
            ((a % (volume - len)) & !4095, len)
        })
        .collect();
    let geometry = ChunkGeometry::new(volume, CHUNK as u64).unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("ranges_200k_extents_1TiB");
    g.throughput(Throughput::Elements(extents.len() as u64));
    g.sample_size(20);
    g.bench_function("build_rangeset", |b| {
        b.iter(|| RangeSet::try_from_extents(black_box(extents.iter().copied())).map(|s| s.len()))
    });
    let set = RangeSet::try_from_extents(extents.iter().copied()).unwrap_or_default();
    g.bench_function("align_to_4MiB_chunks", |b| {
        b.iter(|| black_box(&set).chunks(&geometry))
    });
    g.finish();
}

criterion_group!(benches, checksums, compression, alignment);
criterion_main!(benches);
