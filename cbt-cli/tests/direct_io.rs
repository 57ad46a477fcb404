//! `cbt backup --direct-io`: the binary reads an image file with O_DIRECT when told to (and
//! says so in its report), through the page cache by default or with `never`, and every way
//! restores the same bytes.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::path::Path;

use cbt_core::testing::XorShift;
use support::Cbt;

/// An image of random and compressible 64 KiB blocks and holes, `len` bytes (not a multiple of
/// 4 KiB, so the last chunk has an unaligned tail).
fn make_image(path: &Path, len: usize) -> Vec<u8> {
    let mut x = XorShift::from_state(0x0dd1_7e57_5eed_0001);
    let mut data = vec![0u8; len];
    for (i, block) in data.chunks_mut(64 * 1024).enumerate() {
        match i % 3 {
            0 => x.fill_low(block),
            1 => block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"direct"[j % 6]),
            _ => {}
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// `backup --device DEV --volume v --snapshot SNAPSHOT --full`, with `--direct-io MODE` if given.
fn full_backup<'a>(dev: &'a str, snapshot: &'a str, mode: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec![
        "backup",
        "--device",
        dev,
        "--volume",
        "v",
        "--snapshot",
        snapshot,
        "--full",
    ];
    if let Some(mode) = mode {
        args.extend(["--direct-io", mode]);
    }
    args
}

#[test]
fn backup_reads_the_device_directly_when_told_and_restores_the_same_bytes() {
    // On the target dir's disk: /tmp may be a tmpfs without O_DIRECT.
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cbt = Cbt::local(&work.path().join("repo"));
    cbt.ok(&["repo", "init", "--chunk-size", "64K"]);
    let image = work.path().join("disk.img");
    let data = make_image(&image, 40 * 64 * 1024 + 5_000);
    let dev = image.to_str().unwrap();

    let mut direct_seen = None;
    for (snapshot, mode) in [
        ("auto", None),
        ("always", Some("always")),
        ("never", Some("never")),
    ] {
        let mut args = vec!["-o", "json"];
        args.extend(full_backup(dev, snapshot, mode));
        let report: serde_json::Value = serde_json::from_str(&cbt.ok(&args)).unwrap();
        let read = &report["source_read"];
        let (direct, buffered) = (
            read["direct_bytes"].as_u64().unwrap(),
            read["buffered_bytes"].as_u64().unwrap(),
        );
        assert_eq!(
            direct + buffered,
            report["stats"]["bytes_read"].as_u64().unwrap(),
            "{snapshot}: {report}"
        );
        if snapshot == "always" {
            // Everything but the sub-4 KiB tail, unless this file system refuses O_DIRECT.
            direct_seen = Some(direct > 0);
            if direct > 0 {
                assert!(buffered < 4096, "{report}");
            } else {
                eprintln!(
                    "{} refuses O_DIRECT: checked the fallback",
                    work.path().display()
                );
            }
        } else {
            assert_eq!(
                direct, 0,
                "{snapshot}: an image file is read through the cache"
            );
        }
        let restored = work.path().join(format!("{snapshot}.out"));
        cbt.ok(&[
            "restore",
            "--volume",
            "v",
            "--snapshot",
            snapshot,
            "--target",
            restored.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&restored).unwrap() == data,
            "{snapshot}: restore differs"
        );
    }
    assert!(direct_seen.is_some());

    // The human report says how much was read with O_DIRECT.
    let human = cbt.ok(&full_backup(dev, "human", Some("always")));
    if direct_seen == Some(true) {
        assert!(human.contains("with O_DIRECT"), "{human}");
    }

    // A mode that does not exist is a usage error (exit code 2), not a silent default.
    let out = cbt.cmd(&full_backup(dev, "bad", Some("sometimes")));
    assert_eq!(out.status.code(), Some(2));
    // --pvc backups are read by a data mover (which uses `auto`): the flag is refused there.
    let out = cbt.cmd(&["backup", "--pvc", "ns/data", "--direct-io", "always"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--direct-io"),
        "{out:?}"
    );
}
