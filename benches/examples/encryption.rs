//! Cost of encryption at rest: full backup and restore throughput of an encrypted repository as
//! a ratio of an unencrypted one, measured in the same run on the same image and store kind.
//!
//! Usage: `cargo run --release -p cbt-benches --example encryption [SIZE] [ROUNDS]`, SIZE like
//! `512M` (default) and ROUNDS (default 3) alternating plain/encrypted runs; the best run of
//! each kind is compared (the least disturbed by the rest of the machine). `CBT_E2E_DIR`
//! picks the temp dir's parent; `CBT_E2E_STORE=s3` uses an in-process S3 server instead of
//! the local directory store. The image mixes random data (3/8), compressible text (3/8) and
//! holes (1/4), like the `e2e` example.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use cbt_core::testing::XorShift;
use cbt_core::{SnapshotName, Timestamp, VolumeName};
use cbt_store::crypto::{KdfParams, Password};
use cbt_store::engine::{
    self, BackupMode, BackupRequest, EngineOptions, FileSource, RestoreOptions,
};
use cbt_store::repo::{InitOptions, Repository};
use cbt_store::store::{LocalStore, ObjectStore};
use cbt_store::testing::S3TestServer;

const CHUNK: u64 = 4 * 1024 * 1024;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn generate(path: &Path, size: u64) -> Res<()> {
    let text = b"encrypted block volume backups, changed block tracking 0123456789\n";
    Ok(cbt_benches::write_mixed_image(
        path,
        size,
        CHUNK,
        0x5eed_1234_abcd_0002,
        text,
    )?)
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / 1e6 / secs
    } else {
        0.0
    }
}

/// One full backup and one restore into a fresh repository; returns (backup s, restore s).
async fn one_run(
    store: Arc<dyn ObjectStore>,
    image: &Path,
    target: &Path,
    encrypted: bool,
) -> Res<(f64, f64)> {
    let init = InitOptions {
        chunk_size: Some(CHUNK),
        now: Timestamp::from_unix_secs(1),
    };
    let repo = if encrypted {
        let pw = Password::new("benchmark password")?;
        Repository::init_encrypted(store, init, &pw, KdfParams::DEFAULT).await?
    } else {
        Repository::init(store, init).await?
    };
    let opts = EngineOptions::default();
    let volume = VolumeName::new("bench")?;
    let snapshot = SnapshotName::new("full")?;
    let t = Instant::now();
    engine::backup(
        &repo,
        Arc::new(FileSource::open(image)?),
        BackupRequest {
            volume: volume.clone(),
            snapshot: snapshot.clone(),
            mode: BackupMode::Full { allocated: None },
            created: Timestamp::from_unix_secs(2),
            source_info: Default::default(),
            labels: Default::default(),
            chunk_size: None,
            volume_size: None,
        },
        &opts,
    )
    .await?;
    let backup = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(target);
    let t = Instant::now();
    engine::restore(
        &repo,
        &volume,
        &snapshot,
        target,
        &RestoreOptions::default(),
        &opts,
    )
    .await?;
    let restore = t.elapsed().as_secs_f64();
    if std::fs::read(image)? != std::fs::read(target)? {
        return Err("restored image differs from the source".into());
    }
    Ok((backup, restore))
}

async fn run(size: u64, rounds: usize) -> Res<()> {
    let parent = std::env::var_os("CBT_E2E_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("cbt-enc-")
        .tempdir_in(parent)?;
    let image = dir.path().join("disk.img");
    let target = dir.path().join("restored.img");
    generate(&image, size)?;
    let use_s3 = std::env::var("CBT_E2E_STORE").is_ok_and(|v| v == "s3");
    let server = if use_s3 {
        let s = S3TestServer::start().await?;
        s.create_bucket("bench")?;
        Some(s)
    } else {
        None
    };
    println!(
        "image: {} MiB, store: {}, {rounds} round(s) of plain then encrypted",
        size >> 20,
        if use_s3 {
            "in-process S3"
        } else {
            "local directory"
        }
    );
    let mut best = [(f64::MAX, f64::MAX); 2];
    for round in 0..rounds {
        for (k, encrypted) in [false, true].into_iter().enumerate() {
            let name = format!("repo-{round}-{k}");
            let store: Arc<dyn ObjectStore> = match &server {
                Some(s) => Arc::new(s.store("bench", &name).await?),
                None => Arc::new(LocalStore::new(dir.path().join(&name))?),
            };
            let (b, r) = one_run(store, &image, &target, encrypted).await?;
            println!(
                "round {round} {:<9}: backup {:>7.1} MB/s, restore {:>7.1} MB/s",
                if encrypted { "encrypted" } else { "plain" },
                mbps(size, b),
                mbps(size, r)
            );
            best[k].0 = best[k].0.min(b);
            best[k].1 = best[k].1.min(r);
            if server.is_none() {
                std::fs::remove_dir_all(dir.path().join(&name))?;
            }
        }
    }
    cpu_cost()?;
    let [(pb, pr), (eb, er)] = best;
    println!(
        "best plain:     backup {:>7.1} MB/s, restore {:>7.1} MB/s",
        mbps(size, pb),
        mbps(size, pr)
    );
    println!(
        "best encrypted: backup {:>7.1} MB/s, restore {:>7.1} MB/s",
        mbps(size, eb),
        mbps(size, er)
    );
    println!(
        "encrypted / plain throughput: backup {:.3}x, restore {:.3}x",
        pb / eb,
        pr / er
    );
    Ok(())
}

/// Single-thread CPU cost of the chunk codec with and without the sealing stage, best of
/// several passes over 32 chunks of 4 MiB (half random, half text): the engine's work per chunk
/// without any I/O, so less disturbed by the machine than the end-to-end runs.
fn cpu_cost() -> Res<()> {
    use cbt_store::crypto::{MasterKey, RepoKeys};
    use cbt_store::repo::{ChunkContext, Codec};
    let mut stream = XorShift::from_state(0x1234_5678_9abc_def1);
    let chunks: Vec<Vec<u8>> = (0..32)
        .map(|i| {
            let mut c = vec![0u8; CHUNK as usize];
            if i % 2 == 0 {
                stream.fill(&mut c);
            } else {
                for (j, b) in c.iter_mut().enumerate() {
                    *b = b"sealed chunk text "[j % 18] ^ (i as u8);
                }
            }
            c
        })
        .collect();
    let total = (chunks.len() as u64) * CHUNK;
    let level = EngineOptions::default().compression_level;
    let codecs = [
        ("plain", Codec::plain()),
        (
            "encrypted",
            Codec::sealed(Arc::new(RepoKeys::derive(&MasterKey::generate()?))),
        ),
    ];
    let mut out = vec![0u8; CHUNK as usize];
    let mut secs = [(f64::MAX, f64::MAX); 2];
    for _ in 0..5 {
        for (k, (_, codec)) in codecs.iter().enumerate() {
            let t = Instant::now();
            let encoded: Vec<_> = chunks
                .iter()
                .map(|c| codec.encode_chunk(c, level))
                .collect::<Result<_, _>>()?;
            let enc = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for e in encoded {
                let at = ChunkContext {
                    snapshot: "bench",
                    index: 0,
                    offset: 0,
                };
                codec.decode_chunk_into_slice(e.body, &e.chunk, at, &mut out)?;
            }
            let dec = t.elapsed().as_secs_f64();
            secs[k].0 = secs[k].0.min(enc);
            secs[k].1 = secs[k].1.min(dec);
        }
    }
    for (k, (name, _)) in codecs.iter().enumerate() {
        println!(
            "codec, one thread, {name:<9}: encode {:>7.1} MB/s, decode {:>7.1} MB/s",
            mbps(total, secs[k].0),
            mbps(total, secs[k].1)
        );
    }
    println!(
        "codec encrypted / plain throughput: encode {:.3}x, decode {:.3}x",
        secs[0].0 / secs[1].0,
        secs[0].1 / secs[1].1
    );
    // The sealing stage alone (copy, AES-256-GCM, crc32c), for where the difference goes.
    let keys = RepoKeys::derive(&MasterKey::generate()?);
    let (mut seal, mut open) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        let sealed: Vec<Vec<u8>> = chunks
            .iter()
            .map(|c| keys.seal(cbt_store::crypto::ObjectKind::Chunk, "k", c))
            .collect::<Result<_, _>>()?;
        seal = seal.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for mut b in sealed {
            keys.open_in_place(cbt_store::crypto::ObjectKind::Chunk, "k", &mut b)
                .map_err(|e| e.to_string())?;
        }
        open = open.min(t.elapsed().as_secs_f64());
    }
    println!(
        "sealing stage alone, one thread: seal {:>7.1} MB/s, open in place {:>7.1} MB/s",
        mbps(total, seal),
        mbps(total, open)
    );
    Ok(())
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let size = match args.next() {
        Some(s) => cbt_core::units::parse_size(&s)?,
        None => 512 << 20,
    };
    let rounds = match args.next() {
        Some(r) => r.parse()?,
        None => 3,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(size, rounds.max(1)))
}
