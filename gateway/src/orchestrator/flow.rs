//! One job's state on one streamed edge: pieces gathered toward the next chunk, and the credit
//! that holds the producer back while its consumer lags.
//!
//! Units are [`Payload::units`]: tokens, hidden rows, codec frames, samples. A chunk leaves once
//! at least `chunk` units have gathered (producers emit a unit or a few per step, so chunks are
//! `chunk` units in practice; payloads are never split). The consumer reports what it used with
//! `StageEvent::Consumed`; while `sent − consumed` is at least `chunk × buffer`, the producer is
//! held.

use omnistage_stages::deploy::StreamSpec;
use omnistage_stages::Payload;

/// A streamed edge of one job.
#[derive(Debug)]
pub(super) struct EdgeFlow {
    spec: StreamSpec,
    /// Pieces not yet sent, and their units.
    pending: Vec<Payload>,
    pending_units: usize,
    sent_units: usize,
    consumed_units: usize,
    /// The producer finished: nothing more will be gathered.
    pub closed: bool,
    /// The last chunk (or the close) went out.
    pub close_sent: bool,
    /// The producer is held back on this edge's credit.
    pub holding: bool,
    pub chunks_sent: usize,
}

impl EdgeFlow {
    pub fn new(spec: StreamSpec) -> Self {
        Self {
            spec,
            pending: Vec::new(),
            pending_units: 0,
            sent_units: 0,
            consumed_units: 0,
            closed: false,
            close_sent: false,
            holding: false,
            chunks_sent: 0,
        }
    }

    /// Gathers a piece of the producer's output.
    pub fn gather(&mut self, piece: Payload) {
        self.pending_units += piece.units();
        self.pending.push(piece);
    }

    /// The next chunk, when a whole one has gathered (or, once closed, whatever is left).
    pub fn take_chunk(&mut self) -> Option<Vec<Payload>> {
        let ready =
            self.pending_units >= self.spec.chunk || (self.closed && !self.pending.is_empty());
        if !ready {
            return None;
        }
        self.sent_units += self.pending_units;
        self.pending_units = 0;
        self.chunks_sent += 1;
        Some(std::mem::take(&mut self.pending))
    }

    /// The consumer used `units` of what was sent.
    pub fn consumed(&mut self, units: usize) {
        self.consumed_units = (self.consumed_units + units).min(self.sent_units);
    }

    /// Units sent and not yet used by the consumer.
    pub fn backlog(&self) -> usize {
        self.sent_units - self.consumed_units
    }

    /// Whether the consumer has as much buffered as the edge allows.
    pub fn over_budget(&self) -> bool {
        self.backlog() >= self.spec.chunk.saturating_mul(self.spec.buffer)
    }

    /// Whether anything was ever sent.
    pub fn sent_any(&self) -> bool {
        self.chunks_sent > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize) -> Payload {
        Payload::Tokens(vec![7; n].into())
    }

    #[test]
    fn chunks_leave_at_the_chunk_size_and_the_rest_on_close() {
        let mut f = EdgeFlow::new(StreamSpec {
            chunk: 3,
            buffer: 2,
        });
        f.gather(tokens(1));
        f.gather(tokens(1));
        assert!(f.take_chunk().is_none());
        f.gather(tokens(1));
        assert_eq!(f.take_chunk().map(|c| c.len()), Some(3));
        f.gather(tokens(2));
        assert!(f.take_chunk().is_none());
        f.closed = true;
        assert_eq!(f.take_chunk().map(|c| c.len()), Some(1));
        assert!(f.take_chunk().is_none());
        assert_eq!((f.chunks_sent, f.backlog()), (2, 5));
    }

    #[test]
    fn the_credit_holds_at_chunk_times_buffer_and_frees_on_consumption() {
        let mut f = EdgeFlow::new(StreamSpec {
            chunk: 2,
            buffer: 2,
        });
        for _ in 0..4 {
            f.gather(tokens(1));
            let _ = f.take_chunk();
        }
        assert!(f.over_budget());
        f.consumed(1);
        assert!(!f.over_budget());
        f.consumed(100);
        assert_eq!(f.backlog(), 0);
    }
}
