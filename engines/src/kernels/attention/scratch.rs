//! Scratch buffers of a task: per-unit queries and running softmax state, one block's scores
//! and gathered keys and values, all in cache-line-aligned [`Buf`]s reused across calls.

/// Per-thread buffers, kept between calls.
#[derive(Default)]
pub(super) struct Scratch {
    /// Per (row tile, kv head) of the task, in that order: queries and running state.
    pub(super) units: Vec<Unit>,
    /// Scores, then probabilities, of one unit and key block: `[key][mq]`.
    pub(super) st: Buf,
    /// Rescale factors of the last softmax update: `[mq]`.
    pub(super) alpha: Buf,
    /// The key block's key rows, for the task's kv heads: `[key][heads][d]`, plus spare rows
    /// read (never used) by the last score tile.
    pub(super) keys: Buf,
    /// The key block's value rows: `[key][heads][d]`.
    pub(super) values: Buf,
}

/// The queries and running softmax state of one row tile and kv head.
#[derive(Default)]
pub(super) struct Unit {
    /// Scaled queries, transposed in panels: `[panel][d][panel lanes]`.
    pub(super) qt: Buf,
    /// Unnormalised outputs: `[mq][d]`.
    pub(super) acc: Buf,
    /// Running max and sum per query: `[mq]` each.
    pub(super) max: Buf,
    pub(super) sum: Buf,
}

/// A reusable f32 buffer that starts on a cache line, so vector loads never straddle two.
#[derive(Default)]
pub(super) struct Buf {
    data: Vec<f32>,
    start: usize,
    len: usize,
}

impl Buf {
    /// Floats per cache line.
    const LINE: usize = 16;

    /// Makes it `len` values, all `value`.
    pub(super) fn reset(&mut self, len: usize, value: f32) {
        self.data.clear();
        self.data.resize(len + Self::LINE - 1, value);
        // align_offset may decline (usize::MAX); then the buffer is merely unaligned.
        self.start = self.data.as_ptr().align_offset(64).min(Self::LINE - 1);
        self.len = len;
    }
}

impl std::ops::Deref for Buf {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.data[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.start..self.start + self.len]
    }
}
