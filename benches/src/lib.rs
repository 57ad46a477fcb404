//! Support code shared by this package's targets.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use cbt_core::testing::XorShift;

/// Writes a volume image of `size` bytes to `path`, by `chunk`-sized piece index: 3/8 random,
/// 3/8 `text` repeated with its first 64 bytes random (so no two pieces are equal), 1/4 holes
/// never written. The random bytes come from [`XorShift::from_state`]`(seed)`, so an image is
/// the same in every run.
///
/// # Errors
/// I/O errors creating or writing the file.
pub fn write_mixed_image(
    path: &Path,
    size: u64,
    chunk: u64,
    seed: u64,
    text: &[u8],
) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.set_len(size)?;
    let mut rng = XorShift::from_state(seed);
    let piece = usize::try_from(chunk).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; piece];
    let text: Vec<u8> = text.iter().copied().cycle().take(piece).collect();
    for i in 0..size.div_ceil(chunk) {
        let len = (size - i * chunk).min(chunk) as usize;
        match i % 8 {
            0..=2 => rng.fill(&mut buf[..len]),
            3..=5 => {
                buf[..len].copy_from_slice(&text[..len]);
                rng.fill(&mut buf[..64.min(len)]);
            }
            _ => continue,
        }
        f.seek(SeekFrom::Start(i * chunk))?;
        f.write_all(&buf[..len])?;
    }
    f.sync_all()
}
