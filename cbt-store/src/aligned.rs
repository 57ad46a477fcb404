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
            self.blocks.resize(need, Block([0; DIRECT_ALIGN]));
        }
        self.len = len;
        // SAFETY: `Block` is `repr(C)` around a byte array whose size equals its alignment, so
        // `blocks` is `blocks.len() * DIRECT_ALIGN` initialized bytes without padding, and
        // `len` does not exceed that; the mutable borrow of `self` guards the memory.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), len) }
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
