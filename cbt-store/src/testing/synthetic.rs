//! A procedurally generated block volume for scaling tests and benchmarks: any size, holes
//! where no extent is allocated, content computed from the offset (no file behind it).

use std::io;

use cbt_core::RangeSet;

use crate::engine::BlockSource;

/// Unit of content: every aligned 4 KiB block of allocated data has its own pattern.
const BLOCK: u64 = 4096;

/// A synthetic volume: `allocated` ranges hold data (unique per 4 KiB block), the rest reads
/// as zeros and is reported as holes; `generation` changes the content of the blocks in
/// `changed`, so a second source over the same layout models writes since a snapshot.
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    size: u64,
    allocated: RangeSet,
    changed: RangeSet,
    generation: u64,
}

impl SyntheticSource {
    /// A volume of `size` bytes whose data is in `allocated` (clipped to the size).
    pub fn new(size: u64, allocated: RangeSet) -> Self {
        SyntheticSource {
            size,
            allocated: allocated.clip(size),
            changed: RangeSet::new(),
            generation: 0,
        }
    }

    /// The same volume after writes: the blocks in `changed` hold new content (`generation`
    /// tells successive rewrites apart). Changed bytes outside `allocated` become allocated.
    pub fn rewritten(&self, changed: RangeSet, generation: u64) -> Self {
        let changed = changed.clip(self.size);
        SyntheticSource {
            size: self.size,
            allocated: self.allocated.union(&changed),
            changed,
            generation,
        }
    }

    /// The allocated ranges.
    pub fn allocated(&self) -> &RangeSet {
        &self.allocated
    }

    fn seed(&self, block_offset: u64) -> u64 {
        let g = if self.changed.contains(block_offset) {
            self.generation
        } else {
            0
        };
        (block_offset ^ g.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xD6E8_FEB8_6659_FD93)
            | 1
    }
}

impl BlockSource for SyntheticSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= self.size)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.fill(0);
        for r in self.allocated.iter() {
            let (s, e) = (r.start().max(offset), r.end().min(end));
            if s >= e {
                continue;
            }
            let mut at = s;
            while at < e {
                let block = at / BLOCK * BLOCK;
                let stop = (block + BLOCK).min(e);
                let pattern = self.seed(block).to_le_bytes();
                for pos in at..stop {
                    buf[(pos - offset) as usize] = pattern[(pos % 8) as usize];
                }
                at = stop;
            }
        }
        Ok(())
    }

    fn data_ranges(&self) -> io::Result<Option<RangeSet>> {
        Ok(Some(self.allocated.clone()))
    }

    fn describe(&self) -> String {
        format!("synthetic volume of {} bytes", self.size)
    }
}
