//! Memory aligned for direct I/O (`O_DIRECT`), which needs the buffer's address, the file
//! offset and the length all aligned to the device's logical block size.

/// Alignment of memory, offsets and lengths for direct I/O: the largest logical block size of
/// the disks we write to (512 B and 4 KiB sectors both divide it).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// One aligned block; `size == align`, so a slice of them has no padding.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; DIRECT_ALIGN]);

/// A byte buffer whose start is [`DIRECT_ALIGN`]-aligned.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl AlignedBuf {
    /// Bytes the buffer holds without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.blocks.len() * DIRECT_ALIGN
    }

    /// Sets the length to `len` (growing the buffer if needed; new bytes are zero, kept
    /// bytes keep their values) and returns the bytes.
    pub(crate) fn resize(&mut self, len: usize) -> &mut [u8] {
        let need = len.div_ceil(DIRECT_ALIGN);
        if self.blocks.len() < need {
            // Exactly: amortized growth would leave a buffer first sized for a short last chunk
            // up to twice a chunk's size when reused for a whole one (past the engine's bound).
            self.blocks.reserve_exact(need - self.blocks.len());
            self.blocks.resize(need, Block([0; DIRECT_ALIGN]));
        }
        self.len = len;
        // SAFETY: `Block` is `repr(C)` around a byte array whose size equals its alignment, so
        // `blocks` is `blocks.len() * DIRECT_ALIGN` initialized bytes without padding, and
        // `len` does not exceed that; the mutable borrow of `self` guards the memory.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), len) }
    }

    /// Bytes held (the last `resize`).
    #[cfg(feature = "s3")]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first `len` bytes, writable.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `resize`; the mutable borrow of `self` guards the memory.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), self.len) }
    }

    /// The first `len` bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `resize`; `len` never exceeds the initialized blocks.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len) }
    }
}

/// Whether `bytes` starts at a [`DIRECT_ALIGN`] boundary.
pub(crate) fn is_aligned(bytes: &[u8]) -> bool {
    (bytes.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

/// Buffers whose bytes are no longer referenced, kept for the next body of a similar size: a
/// fresh multi-megabyte allocation per chunk costs a page fault and a kernel zeroing per
/// 4 KiB (a 1 GiB full backup faulted 110k pages with fresh buffers). Chunk bodies being
/// encoded for upload and objects read back by a restore share it. At most
/// [`MAX_POOLED_BYTES`] of capacity are kept.
static POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());
/// Capacity kept by [`POOL`] at most (16 bodies of 4 MiB chunks).
const MAX_POOLED_BYTES: usize = 64 << 20;

/// A buffer of at least `capacity` bytes, reused when one of a similar size is kept (its
/// length and contents are whatever they were: callers `resize` and overwrite).
pub(crate) fn take(capacity: usize) -> AlignedBuf {
    let reused = POOL.lock().ok().and_then(|mut p| {
        // Within 2x, so a small chunk never pins a buffer sized for a large one; the most
        // recently returned first, whose pages are the likeliest still in cache.
        let i = p
            .iter()
            .rposition(|b| b.capacity() >= capacity && b.capacity() / 2 <= capacity)?;
        Some(p.swap_remove(i))
    });
    reused.unwrap_or_default()
}

/// Gives a buffer no longer needed back to the pool (within [`MAX_POOLED_BYTES`]).
pub(crate) fn recycle(buf: AlignedBuf) {
    if let Ok(mut p) = POOL.lock() {
        let kept: usize = p.iter().map(AlignedBuf::capacity).sum();
        if kept + buf.capacity() <= MAX_POOLED_BYTES {
            p.push(buf);
        }
    }
}

/// Bytes `range` of `buf` as [`bytes::Bytes`]; the buffer goes back to the pool when the
/// last reference to them is dropped.
///
/// # Panics
/// If `range` is not within `buf`'s length (a caller bug).
pub(crate) fn into_bytes(buf: AlignedBuf, range: std::ops::Range<usize>) -> bytes::Bytes {
    lend(buf, range, None)
}

/// A pool of buffers owned by one pipeline (rather than the process-wide one), so a buffer
/// lent out as a body comes back to the stage that reuses it and that stage can count its
/// buffers.
pub(crate) type Shelf = std::sync::Arc<std::sync::Mutex<Vec<AlignedBuf>>>;

/// Like [`into_bytes`], but the buffer goes back onto `home` when the last reference is
/// dropped.
///
/// # Panics
/// If `range` is not within `buf`'s length (a caller bug).
pub(crate) fn into_bytes_home(
    buf: AlignedBuf,
    range: std::ops::Range<usize>,
    home: Shelf,
) -> bytes::Bytes {
    lend(buf, range, Some(home))
}

/// `range` of `buf` lent out as [`bytes::Bytes`], returning to `home` (or the process-wide
/// pool) when the last reference goes.
fn lend(buf: AlignedBuf, range: std::ops::Range<usize>, home: Option<Shelf>) -> bytes::Bytes {
    assert!(range.start <= range.end && range.end <= buf.len);
    bytes::Bytes::from_owner(Pooled { buf, range, home })
}

/// A pooled buffer lent out as [`bytes::Bytes`] (see [`into_bytes`]).
struct Pooled {
    buf: AlignedBuf,
    range: std::ops::Range<usize>,
    /// Where the buffer returns to; the process-wide pool when `None`.
    home: Option<Shelf>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf.as_slice()[self.range.clone()]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        match &self.home {
            Some(home) => {
                if let Ok(mut shelf) = home.lock() {
                    shelf.push(buf);
                }
            }
            None => recycle(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growing_a_buffer_allocates_exactly_what_is_asked() {
        let mut buf = AlignedBuf::default();
        // A short last chunk first, then a whole one: amortized growth would double.
        buf.resize(700 << 10);
        buf.resize((1 << 20) + 52);
        let blocks = ((1usize << 20) + 52).div_ceil(DIRECT_ALIGN);
        assert_eq!(buf.capacity(), blocks * DIRECT_ALIGN);
        assert_eq!(buf.blocks.capacity(), blocks);
        assert!(is_aligned(buf.as_slice()));
    }
}
