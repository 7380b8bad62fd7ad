//! Space accounting for the producer's ring: which byte ranges of the segment are in flight.
//!
//! Only the producer keeps this state; the consumer frees a message by acknowledging its sequence
//! number over the control socket, in order. Allocations are contiguous: a message that does not
//! fit between the write position and the end of the segment starts again at offset 0 (wasting
//! the tail until the ring drains past it).

use std::collections::VecDeque;

/// Offsets and lengths are rounded to this many bytes (cache line).
pub(crate) const ALIGN: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub seq: u64,
    pub offset: usize,
    /// Reserved length (rounded up to [`ALIGN`]).
    pub len: usize,
}

#[derive(Debug)]
pub(crate) struct Ring {
    capacity: usize,
    max_in_flight: usize,
    in_flight: VecDeque<Slot>,
}

pub(crate) fn round_up(len: usize) -> Option<usize> {
    len.checked_add(ALIGN - 1).map(|l| l / ALIGN * ALIGN)
}

impl Ring {
    pub fn new(capacity: usize, max_in_flight: usize) -> Self {
        Self {
            capacity,
            max_in_flight: max_in_flight.max(1),
            in_flight: VecDeque::new(),
        }
    }

    /// Whether a message of `len` bytes could ever fit.
    pub fn fits_ever(&self, len: usize) -> bool {
        round_up(len).is_some_and(|l| l <= self.capacity)
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Where a message of `len` bytes can go now, if anywhere.
    pub fn find(&self, len: usize) -> Option<usize> {
        let len = round_up(len)?;
        if len > self.capacity || self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let (Some(front), Some(back)) = (self.in_flight.front(), self.in_flight.back()) else {
            return Some(0);
        };
        let tail = front.offset;
        let head = back.offset + back.len;
        let wrapped = back.offset < front.offset;
        if wrapped {
            // Free space is [head, tail).
            (tail - head >= len).then_some(head)
        } else if self.capacity - head >= len {
            Some(head)
        } else {
            // Free space is [head, capacity) ∪ [0, tail); only the front part can hold it now.
            (tail >= len).then_some(0)
        }
    }

    /// Records a message placed at `offset` (from [`Ring::find`]).
    pub fn push(&mut self, seq: u64, offset: usize, len: usize) {
        let len = round_up(len).unwrap_or(usize::MAX);
        self.in_flight.push_back(Slot { seq, offset, len });
    }

    /// Frees the oldest message; `seq` must be its sequence number.
    pub fn release(&mut self, seq: u64) -> Result<Slot, Option<u64>> {
        match self.in_flight.front().copied() {
            Some(s) if s.seq == seq => {
                self.in_flight.pop_front();
                Ok(s)
            }
            other => Err(other.map(|s| s.seq)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_and_blocks_when_full() {
        let mut r = Ring::new(1024, 64);
        assert_eq!(r.find(1), Some(0));
        r.push(0, 0, 400); // [0, 448)
        assert_eq!(r.find(400), Some(448));
        r.push(1, 448, 400); // [448, 896)
                             // 128 bytes left at the end, nothing at the front: full for 400.
        assert_eq!(r.find(400), None);
        assert_eq!(r.find(100), Some(896));
        assert_eq!(r.release(1), Err(Some(0)));
        r.release(0).unwrap();
        // Front [0, 448) is free now: wraps.
        assert_eq!(r.find(400), Some(0));
        r.push(2, 0, 400);
        // Wrapped: free space is [448, 448) — none.
        assert_eq!(r.find(1), None);
        r.release(1).unwrap();
        // [0, 448) in flight, [448, 1024) free = 576 bytes.
        assert_eq!(r.find(577), None);
        assert_eq!(r.find(576), Some(448));
        r.release(2).unwrap();
        assert!(r.is_empty());
        assert_eq!(r.find(1024), Some(0));
        assert!(!r.fits_ever(1025));
    }

    #[test]
    fn in_flight_count_is_bounded() {
        let mut r = Ring::new(1 << 20, 2);
        r.push(0, 0, 1);
        r.push(1, 64, 1);
        assert_eq!(r.find(1), None);
        r.release(0).unwrap();
        assert_eq!(r.find(1), Some(128));
    }
}
