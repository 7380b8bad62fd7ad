//! The interface every audio codec decoder implements, and the canonical frame layout of codes.
//!
//! **Canonical frame layout.** A codec consumes codes one *frame* at a time. A frame is
//! `codes_per_frame` code values laid out level by level: all codes of codebook level 0 in time
//! order, then level 1, and so on. [`CodecInfo::levels`] names the level of each slot. SNAC at
//! 24 kHz (strides 4, 2, 1) has 7 slots `[0, 1, 1, 2, 2, 2, 2]`; Mimi with 8 codebooks has 8 slots
//! `[0, 1, …, 7]`. Talkers that write codes in another order (Orpheus: `[0, 1, 2, 2, 1, 2, 2]`)
//! reorder them into this layout before handing them on.
//!
//! **Streaming.** [`Codec::open`] starts one stream; [`Codec::step`] decodes whatever every given
//! stream can decode now (batched across streams where the model allows) and returns each
//! stream's new samples. Concatenating a stream's samples gives the one-shot [`Codec::decode`]
//! of all its frames, sample for sample (within float rounding), whatever the chunking.
//!
//! **Noise.** Codecs whose decoder injects noise (SNAC) draw it as a function of the stream's
//! seed and the absolute position, so streamed and one-shot decodes agree and a seeded request is
//! reproducible.

/// Why decoding failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The codes are unusable (wrong count, a code outside its codebook, pushed after the end).
    #[error("invalid codes: {0}")]
    InvalidCodes(String),
    /// The model failed while decoding.
    #[error("codec failure: {0}")]
    Compute(String),
    /// The checkpoint could not be loaded.
    #[error("codec checkpoint: {0}")]
    Load(String),
}

impl From<candle_core::Error> for CodecError {
    fn from(e: candle_core::Error) -> Self {
        CodecError::Compute(e.to_string())
    }
}

/// Static facts about a codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecInfo {
    /// Output sample rate in Hz (mono).
    pub sample_rate: u32,
    /// Code values per frame in the canonical layout.
    pub codes_per_frame: usize,
    /// Codebook level of each slot of a frame (`levels.len() == codes_per_frame`).
    pub levels: Vec<usize>,
    /// Entries per codebook; every code must be below it.
    pub codebook_size: usize,
    /// PCM samples one frame decodes to.
    pub samples_per_frame: usize,
}

/// One stream's decoding state (what a codec remembers between chunks of one request).
pub trait CodecStream: Send {
    /// Appends `frames` whole frames (`codes.len() == frames × codes_per_frame`, canonical
    /// layout). `last` closes the stream: everything left is decoded by the next steps.
    fn push(&mut self, codes: &[u32], last: bool) -> Result<(), CodecError>;
    /// Whether a [`Codec::step`] would produce samples now.
    fn has_work(&self) -> bool;
    /// Whether the stream is closed and every sample has been returned.
    fn is_done(&self) -> bool;
    /// Frames pushed so far.
    fn frames_pushed(&self) -> usize;
    /// Samples returned so far.
    fn samples_emitted(&self) -> usize;
}

/// A codec decoder: codes → PCM.
pub trait Codec: Send + Sync + 'static {
    type Stream: CodecStream;

    fn info(&self) -> &CodecInfo;

    /// Decodes a whole stream at once: `codes` is `frames × codes_per_frame` in the canonical
    /// layout; returns `frames × samples_per_frame` samples.
    fn decode(&self, codes: &[u32], seed: u64) -> Result<Vec<f32>, CodecError>;

    /// Starts a stream whose noise (if any) is drawn from `seed`.
    fn open(&self, seed: u64) -> Self::Stream;

    /// Decodes what each stream can decode now; returns each stream's new samples (possibly
    /// none), in order. Streams with nothing to do are left as they are.
    fn step(&self, streams: &mut [&mut Self::Stream]) -> Result<Vec<Vec<f32>>, CodecError>;
}

/// Checks that `codes` holds whole frames of valid codes; returns the frame count.
pub fn check_frames(info: &CodecInfo, codes: &[u32]) -> Result<usize, CodecError> {
    if codes.len() % info.codes_per_frame != 0 {
        return Err(CodecError::InvalidCodes(format!(
            "{} codes are not whole frames of {}",
            codes.len(),
            info.codes_per_frame
        )));
    }
    if let Some(bad) = codes.iter().find(|c| **c as usize >= info.codebook_size) {
        return Err(CodecError::InvalidCodes(format!(
            "code {bad} is outside the codebook of {} entries",
            info.codebook_size
        )));
    }
    Ok(codes.len() / info.codes_per_frame)
}
