//! One SNAC decoding stream: the frames pushed so far and how far they have been decoded.
//!
//! SNAC's convolutions look both ways, so frame `f`'s samples are final only once frame
//! `f + right_frames` has arrived (or the stream is closed). Each step decodes one window,
//! `[emitted - left_frames, pushed)` clamped at the stream start, and keeps only the samples
//! of the frames that became final; the context frames around them are decoded again by the
//! next window, and nothing else is.

use super::config::ReceptiveField;
use crate::audio::codec::{check_frames, CodecError, CodecInfo, CodecStream};

/// A stream's state between [`super::SnacCodec`] steps.
#[derive(Debug, Clone)]
pub struct SnacStream {
    seed: u64,
    info: CodecInfo,
    field: ReceptiveField,
    /// Codes of frames `base..pushed`, canonical layout.
    codes: Vec<u32>,
    base: usize,
    pushed: usize,
    emitted: usize,
    closed: bool,
}

/// The frames one step decodes for a stream (absolute frame indices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    /// First frame decoded (left context included).
    pub start: usize,
    /// One past the last frame decoded (right context included).
    pub end: usize,
    /// First frame whose samples are kept.
    pub keep_from: usize,
    /// One past the last frame whose samples are kept.
    pub keep_to: usize,
}

impl Window {
    pub fn frames(&self) -> usize {
        self.end - self.start
    }
}

impl SnacStream {
    pub(super) fn new(seed: u64, info: CodecInfo, field: ReceptiveField) -> Self {
        Self {
            seed,
            info,
            field,
            codes: Vec::new(),
            base: 0,
            pushed: 0,
            emitted: 0,
            closed: false,
        }
    }

    /// The noise seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether `last` has been pushed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Frames whose samples have been returned.
    pub fn frames_emitted(&self) -> usize {
        self.emitted
    }

    /// Frames kept for context or not yet decoded (bounded by the receptive field plus what
    /// awaits decoding).
    pub fn frames_buffered(&self) -> usize {
        self.pushed - self.base
    }

    /// Frames whose samples are final now.
    fn ready(&self) -> usize {
        if self.closed {
            self.pushed
        } else {
            self.pushed.saturating_sub(self.field.right_frames)
        }
    }

    /// What the next step decodes, if anything.
    pub(super) fn window(&self) -> Option<Window> {
        let ready = self.ready();
        (ready > self.emitted).then(|| Window {
            start: self.emitted.saturating_sub(self.field.left_frames),
            // Not closed: `pushed - ready == right_frames`, exactly the context needed.
            end: self.pushed,
            keep_from: self.emitted,
            keep_to: ready,
        })
    }

    /// The codes of `window`'s frames.
    pub(super) fn window_codes(&self, window: &Window) -> &[u32] {
        let cpf = self.info.codes_per_frame;
        &self.codes[(window.start - self.base) * cpf..(window.end - self.base) * cpf]
    }

    /// Records that `window`'s kept frames were returned and drops codes no later window needs.
    pub(super) fn advance(&mut self, window: &Window) {
        self.emitted = window.keep_to;
        let keep_from = self.emitted.saturating_sub(self.field.left_frames);
        if keep_from > self.base {
            let cpf = self.info.codes_per_frame;
            self.codes.drain(..(keep_from - self.base) * cpf);
            self.base = keep_from;
        }
    }
}

impl CodecStream for SnacStream {
    fn push(&mut self, codes: &[u32], last: bool) -> Result<(), CodecError> {
        if self.closed {
            return Err(CodecError::InvalidCodes(format!(
                "{} codes pushed after the stream's last frame",
                codes.len()
            )));
        }
        let frames = check_frames(&self.info, codes)?;
        self.codes.extend_from_slice(codes);
        self.pushed += frames;
        self.closed = last;
        Ok(())
    }

    fn has_work(&self) -> bool {
        self.ready() > self.emitted
    }

    fn is_done(&self) -> bool {
        self.closed && self.emitted == self.pushed
    }

    fn frames_pushed(&self) -> usize {
        self.pushed
    }

    fn samples_emitted(&self) -> usize {
        self.emitted * self.info.samples_per_frame
    }
}
