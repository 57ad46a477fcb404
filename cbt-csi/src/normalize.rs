//! Turns the tuples a driver streams into trustworthy byte extents, and decides where a broken
//! stream resumes. Pure: no I/O, no clock.
//!
//! A driver is never trusted. Per message the tuples are validated (offset >= 0, size > 0, start
//! inside the volume, FIXED_LENGTH sizes equal), clipped to the volume capacity and to the
//! caller's starting offset, sorted and merged. Across messages the normalizer remembers only the
//! last emitted extent and the high-water mark (`frontier`), so memory does not grow with the
//! volume:
//!
//! - a tuple overlapping `[last.offset, frontier)` has that part removed (a resumed stream's first
//!   block, or a driver repeating itself), so nothing is emitted twice;
//! - a tuple starting below `last.offset` arrived out of order; it is emitted (never dropped) and
//!   counted, and from then on a broken stream restarts from the caller's original offset, because
//!   a sloppy driver may still owe ranges below the frontier. Consumers that collect into a set
//!   (the usual case) get the exact answer either way.
//!
//! Block type or capacity changing between messages is a protocol violation.

use crate::ranges::{BlockType, Extent, merge_extents};

/// One response message as received, independent of which API produced it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawMessage {
    /// Wire value of `block_metadata_type`.
    pub block_type: i32,
    /// `volume_capacity_bytes`.
    pub capacity: i64,
    /// `(byte_offset, size_bytes)` tuples in the order received.
    pub tuples: Vec<(i64, i64)>,
}

/// What makes a message unacceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Byte offset of the offending tuple, if one tuple is at fault.
    pub offset: Option<i64>,
    /// What was wrong.
    pub detail: String,
}

/// Stream state of one logical metadata call, across resumed attempts.
#[derive(Debug, Clone)]
pub struct Normalizer {
    origin: u64,
    frontier: u64,
    last: Option<Extent>,
    block_type: Option<BlockType>,
    capacity: Option<u64>,
    block_size: Option<u64>,
    out_of_order: u64,
    max_out_of_order: u64,
    tuples: u64,
    messages: u64,
}

impl Normalizer {
    /// Starts a call whose caller asked for ranges from `starting_offset` on.
    pub fn new(starting_offset: u64) -> Self {
        Self {
            origin: starting_offset,
            frontier: starting_offset,
            last: None,
            block_type: None,
            capacity: None,
            block_size: None,
            out_of_order: 0,
            max_out_of_order: u64::MAX,
            tuples: 0,
            messages: 0,
        }
    }

    /// Fails [`Normalizer::accept`] once more than `max` ranges arrived out of order (each is
    /// handed on, so a driver streaming them without end would grow every consumer that
    /// buffers them).
    pub fn with_max_out_of_order(mut self, max: u64) -> Self {
        self.max_out_of_order = max;
        self
    }

    /// Offset to send in the next attempt after a broken stream.
    ///
    /// The end of the last range received, or the original offset once the driver has been seen
    /// sending out-of-order tuples (then nothing below the frontier can be assumed complete).
    pub fn resume_offset(&self) -> u64 {
        if self.out_of_order > 0 {
            self.origin
        } else {
            self.frontier
        }
    }

    /// Block type reported so far.
    pub fn block_type(&self) -> Option<BlockType> {
        self.block_type
    }

    /// Capacity reported so far.
    pub fn capacity(&self) -> Option<u64> {
        self.capacity
    }

    /// FIXED_LENGTH block size, from the first full-size tuple.
    pub fn block_size(&self) -> Option<u64> {
        self.block_size
    }

    /// Tuples that arrived out of order.
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }

    /// Tuples received in all messages accepted so far.
    pub fn tuples_received(&self) -> u64 {
        self.tuples
    }

    /// Messages accepted so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Validates one message and returns the new extents it contributes (sorted, disjoint).
    ///
    /// # Errors
    /// A [`Violation`] when the message contradicts the protocol; the caller must abort the call.
    pub fn accept(&mut self, msg: &RawMessage) -> Result<Vec<Extent>, Violation> {
        let block_type = BlockType::from_wire(msg.block_type).ok_or_else(|| Violation {
            offset: None,
            detail: format!(
                "block_metadata_type {} is not FIXED_LENGTH or VARIABLE_LENGTH",
                msg.block_type
            ),
        })?;
        if msg.capacity < 0 {
            return Err(Violation {
                offset: None,
                detail: format!("negative volume_capacity_bytes {}", msg.capacity),
            });
        }
        let capacity = msg.capacity as u64;
        match self.block_type {
            Some(t) if t != block_type => {
                return Err(Violation {
                    offset: None,
                    detail: format!(
                        "block_metadata_type changed mid-stream from {t} to {block_type}"
                    ),
                });
            }
            _ => self.block_type = Some(block_type),
        }
        match self.capacity {
            Some(c) if c != capacity => {
                return Err(Violation {
                    offset: None,
                    detail: format!(
                        "volume_capacity_bytes changed mid-stream from {c} to {capacity}"
                    ),
                });
            }
            _ => self.capacity = Some(capacity),
        }

        let mut fresh: Vec<Extent> = Vec::with_capacity(msg.tuples.len());
        for &(off, size) in &msg.tuples {
            if off < 0 || size <= 0 {
                return Err(Violation {
                    offset: Some(off),
                    detail: format!(
                        "tuple (byte_offset {off}, size_bytes {size}) is not a valid range"
                    ),
                });
            }
            let (off, size) = (off as u64, size as u64);
            let end = off.checked_add(size).ok_or_else(|| Violation {
                offset: Some(off as i64),
                detail: "tuple end overflows".to_string(),
            })?;
            if off >= capacity {
                return Err(Violation {
                    offset: Some(off as i64),
                    detail: format!(
                        "tuple starts at {off}, at or beyond the volume capacity {capacity}"
                    ),
                });
            }
            if block_type == BlockType::FixedLength {
                match self.block_size {
                    None if end < capacity => self.block_size = Some(size),
                    None => {}
                    Some(bs) if bs != size && end < capacity => {
                        return Err(Violation {
                            offset: Some(off as i64),
                            detail: format!(
                                "FIXED_LENGTH stream has a tuple of {size} bytes after tuples of {bs} bytes"
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
            self.tuples += 1;
            fresh.push(Extent::new(off, end.min(capacity) - off));
        }
        self.messages += 1;
        merge_extents(&mut fresh);

        let mut out = Vec::with_capacity(fresh.len());
        for e in fresh {
            // Below the caller's starting offset: not asked for (the first block may start early).
            let start = e.offset.max(self.origin);
            let end = e.end();
            if start >= end {
                continue;
            }
            let (last_start, frontier) = match self.last {
                Some(l) => (l.offset, self.frontier),
                None => (self.origin, self.origin),
            };
            if start < last_start {
                // Out of order: keep the part below the last extent, drop what overlaps it.
                self.out_of_order += 1;
                if self.out_of_order > self.max_out_of_order {
                    return Err(Violation {
                        offset: Some(start as i64),
                        detail: format!(
                            "the server sent more than {} ranges out of order (starting below \
                             ranges it had already sent; the spec requires ascending offsets): \
                             this one starts at byte {start}, after a range at byte {last_start}; \
                             {} tuples in {} messages so far",
                            self.max_out_of_order, self.tuples, self.messages
                        ),
                    });
                }
                out.push(Extent::new(start, end.min(last_start) - start));
                if end > frontier {
                    out.push(Extent::new(frontier, end - frontier));
                    self.advance(Extent::new(frontier, end - frontier));
                }
                continue;
            }
            let start = start.max(frontier);
            if start >= end {
                continue; // entirely a repeat of what was emitted
            }
            let kept = Extent::new(start, end - start);
            out.push(kept);
            self.advance(kept);
        }
        merge_extents(&mut out);
        Ok(out)
    }

    fn advance(&mut self, e: Extent) {
        self.last = Some(match self.last {
            Some(l) if e.offset <= l.end() => {
                Extent::new(l.offset, e.end().max(l.end()) - l.offset)
            }
            _ => e,
        });
        self.frontier = self.frontier.max(e.end());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report
mod tests {
    use super::*;

    fn msg(t: i32, cap: i64, tuples: &[(i64, i64)]) -> RawMessage {
        RawMessage {
            block_type: t,
            capacity: cap,
            tuples: tuples.to_vec(),
        }
    }

    #[test]
    fn sorted_fixed_stream_passes_through_merged() {
        let mut n = Normalizer::new(0);
        let out = n
            .accept(&msg(1, 100, &[(0, 10), (10, 10), (40, 10)]))
            .unwrap();
        assert_eq!(out, vec![Extent::new(0, 20), Extent::new(40, 10)]);
        assert_eq!(n.resume_offset(), 50);
        assert_eq!(n.block_size(), Some(10));
    }

    #[test]
    fn first_block_before_starting_offset_is_clipped() {
        let mut n = Normalizer::new(25);
        let out = n.accept(&msg(1, 100, &[(20, 10), (30, 10)])).unwrap();
        assert_eq!(out, vec![Extent::new(25, 15)]);
    }

    #[test]
    fn resumed_stream_repeating_the_last_block_emits_nothing_twice() {
        let mut n = Normalizer::new(0);
        n.accept(&msg(1, 100, &[(0, 10), (20, 10)])).unwrap();
        // Resumed at 30, driver answers with the block containing 29 again.
        let out = n.accept(&msg(1, 100, &[(20, 10), (30, 10)])).unwrap();
        assert_eq!(out, vec![Extent::new(30, 10)]);
    }

    #[test]
    fn unsorted_overlapping_message_is_normalized() {
        let mut n = Normalizer::new(0);
        let out = n
            .accept(&msg(2, 1000, &[(500, 100), (0, 50), (20, 100), (550, 10)]))
            .unwrap();
        assert_eq!(out, vec![Extent::new(0, 120), Extent::new(500, 100)]);
        assert_eq!(n.out_of_order(), 0);
    }

    #[test]
    fn out_of_order_across_messages_is_kept_and_forces_restart_from_origin() {
        let mut n = Normalizer::new(0);
        n.accept(&msg(2, 1000, &[(500, 100)])).unwrap();
        let out = n.accept(&msg(2, 1000, &[(100, 450)])).unwrap();
        assert_eq!(out, vec![Extent::new(100, 400)]);
        assert_eq!(n.out_of_order(), 1);
        assert_eq!(n.resume_offset(), 0);
    }

    #[test]
    fn tail_past_capacity_is_clipped() {
        let mut n = Normalizer::new(0);
        let out = n
            .accept(&msg(1, 25, &[(0, 10), (10, 10), (20, 10)]))
            .unwrap();
        assert_eq!(out, vec![Extent::new(0, 25)]);
    }

    #[test]
    fn violations() {
        let mut n = Normalizer::new(0);
        n.accept(&msg(1, 100, &[(0, 10)])).unwrap();
        assert!(n.clone().accept(&msg(2, 100, &[])).is_err(), "type change");
        assert!(
            n.clone().accept(&msg(1, 200, &[])).is_err(),
            "capacity change"
        );
        assert!(
            n.clone().accept(&msg(1, 100, &[(10, 20)])).is_err(),
            "fixed size change"
        );
        assert!(
            n.clone().accept(&msg(1, 100, &[(-1, 10)])).is_err(),
            "negative offset"
        );
        assert!(
            n.clone().accept(&msg(1, 100, &[(10, 0)])).is_err(),
            "zero size"
        );
        assert!(
            n.clone().accept(&msg(1, 100, &[(100, 10)])).is_err(),
            "beyond capacity"
        );
        assert!(
            Normalizer::new(0).accept(&msg(0, 100, &[])).is_err(),
            "unknown type"
        );
        // The last fixed block may be short when it ends at capacity.
        assert!(n.clone().accept(&msg(1, 100, &[(90, 10)])).is_ok());
        let mut m = Normalizer::new(0);
        m.accept(&msg(1, 95, &[(80, 10)])).unwrap();
        assert!(m.accept(&msg(1, 95, &[(90, 5)])).is_ok());
    }
}
