//! Measurement (ignored by default; run in release):
//! `cargo test --release -p cbt-store --test engine_measure -- --ignored --nocapture`
//!
//! Bytes uploaded per changed byte when scattered 8..64 KiB writes cover 1% of a volume of
//! incompressible data, and the stored manifest size per fully allocated TiB, at several chunk
//! sizes. Prints a table; asserts only what must hold whatever the machine (every changed
//! chunk re-uploaded, nothing else).
#![allow(clippy::unwrap_used)]

mod engine_support;

use std::collections::BTreeMap;
use std::sync::Arc;

use cbt_core::{RangeSet, SnapshotName, Timestamp};
use cbt_store::engine::{self, BackupMode, BackupRequest, FileSource};
use cbt_store::repo::{InitOptions, Repository, manifest_key};
use cbt_store::store::{LocalStore, ObjectStore};
use engine_support::*;

const VOLUME: u64 = 1 << 30;
const TIB: f64 = (1u64 << 40) as f64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run in release with --ignored --nocapture"]
async fn uploaded_per_changed_byte_by_chunk_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    // Incompressible content everywhere: the worst case for re-uploading whole chunks.
    let mut img = noise(42, VOLUME as usize);
    std::fs::write(&path, &img).unwrap();

    // Scattered writes of 8..64 KiB at 4 KiB-aligned offsets until 1% of the volume changed.
    let mut stream = XorShift::from_state(0x2545_f491_4f6c_dd1d);
    let mut rnd = move || stream.next_u64();
    let mut changed = RangeSet::new();
    let mut writes = 0;
    while changed.total_bytes() < VOLUME / 100 {
        let len = 4096 * (2 + rnd() % 15);
        let off = 4096 * (rnd() % ((VOLUME - len) / 4096));
        changed.insert(cbt_core::ByteRange::new(off, len).unwrap());
        writes += 1;
    }
    let changed_bytes = changed.total_bytes();
    let mut next = img.clone();
    for r in &changed {
        let fresh = noise(r.start(), r.len() as usize);
        next[r.start() as usize..r.end() as usize].copy_from_slice(&fresh);
    }
    let next_path = dir.path().join("vol2.img");
    std::fs::write(&next_path, &next).unwrap();
    img.clear();
    drop(next);

    println!(
        "volume {} MiB, {writes} writes of 8..64 KiB, {changed_bytes} bytes changed ({:.2}%)",
        VOLUME >> 20,
        changed_bytes as f64 * 100.0 / VOLUME as f64
    );
    println!(
        "| chunk size | chunks touched | uploaded / changed byte | manifest per TiB (stored) |"
    );
    println!("|---|---|---|---|");
    for cs in [4u64 << 20, 1 << 20, 256 << 10] {
        let repo_dir = dir.path().join(format!("repo-{cs}"));
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&repo_dir).unwrap());
        let repo = Repository::init(
            store.clone(),
            InitOptions {
                chunk_size: Some(cs),
                now: Timestamp(0),
            },
        )
        .await
        .unwrap();
        let mut opts = opts();
        opts.compression_level = 3;
        let req = |name: &str, mode| BackupRequest {
            volume: vol("v"),
            snapshot: SnapshotName::new(name).unwrap(),
            mode,
            created: Timestamp(0),
            source_info: Default::default(),
            labels: BTreeMap::new(),
            chunk_size: None,
            volume_size: None,
        };
        let src = Arc::new(FileSource::open(&path).unwrap());
        let base = engine::backup(&repo, src, req("base", full()), &opts)
            .await
            .unwrap();
        let manifest_bytes = store
            .head(&manifest_key(&vol("v"), &snap("base")))
            .await
            .unwrap()
            .unwrap()
            .size;
        let src = Arc::new(FileSource::open(&next_path).unwrap());
        let mode = BackupMode::Incremental {
            parent: Box::new(base.manifest.as_ref().unwrap().clone()),
            changed: changed.clone(),
        };
        let inc = engine::backup(&repo, src, req("next", mode), &opts)
            .await
            .unwrap();
        let touched = changed
            .chunks(base.manifest.as_ref().unwrap().chunks.geometry())
            .count();
        assert_eq!(inc.stats.chunks_read, touched);
        assert_eq!(inc.stats.objects_written, touched);
        let per_tib = manifest_bytes as f64 * TIB / VOLUME as f64;
        println!(
            "| {} KiB | {touched} of {} | {:.1} | {:.1} MB |",
            cs >> 10,
            base.manifest
                .as_ref()
                .unwrap()
                .chunks
                .geometry()
                .chunk_count(),
            inc.stats.bytes_uploaded as f64 / changed_bytes as f64,
            per_tib / 1e6,
        );
    }
}
