//! `make-tiny`: seeded random-weight checkpoints in the real Hugging Face layouts, for tests,
//! benchmarks and the embedded default deployment.
//!
//! Every file is a pure function of its inputs: the same seed gives byte-identical files (the
//! BPE merges are learned deterministically from an embedded corpus, weights come from
//! `StdRng::seed_from_u64` per tensor, JSON keys are written sorted), and another seed gives
//! other weights.

mod bpe;
mod corpus;
mod flux;
mod image;
mod llm;
mod mimi;
mod mot;
mod router;
mod sd3;
mod snac;
mod talker;
mod thinker;
mod vae;
mod vision;
mod whisper;

pub use bpe::{BPE_VOCAB_SIZE, ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS};
pub use flux::{write_tiny_flux_transformer, TinyFluxSpec};
pub use image::{write_tiny_image_pipeline, TINY_SCHEDULER_SHIFT};
pub use llm::{write_tiny_llm, TinyFamily, TinyLlmSpec, TINY_CHAT_TEMPLATE};
pub use mimi::{write_tiny_mimi, TinyMimiLayout, TinyMimiSpec};
pub use mot::{
    tiny_mot_expert_specs, write_mot, write_mot_set, MotSetSpec, TINY_MOT_ALPHA, TINY_MOT_EXPERTS,
    TINY_MOT_HEADS, TINY_MOT_ROUTER_DIR, TINY_MOT_SHARED_DIM, TINY_MOT_STACKS,
};
pub use router::{
    write_tiny_router, TINY_ROUTER_HIDDEN, TINY_ROUTER_MAX_LENGTH, TINY_ROUTER_MLP_HIDDEN,
};
pub use sd3::{write_tiny_sd3_transformer, TinySd3Spec};
pub use snac::{write_tiny_snac, TinySnacSpec};
pub use talker::{
    write_tiny_talker, TinyTalker, TinyTalkerSpec, TINY_TALKER_AUDIO_END,
    TINY_TALKER_AUDIO_END_TOKEN, TINY_TALKER_AUDIO_START, TINY_TALKER_AUDIO_START_TOKEN,
    TINY_TALKER_CODEC_OFFSET,
};
pub use thinker::{
    write_tiny_thinker, TINY_AUDIO_TOKEN, TINY_AUDIO_TOKEN_ID, TINY_IMAGE_TOKEN,
    TINY_IMAGE_TOKEN_ID, TINY_OMNI_CHAT_TEMPLATE,
};
pub use vae::{write_tiny_vae, TinyVaeSpec};
pub use vision::{write_tiny_vision, TinyVisionSpec, TinyVisionTower};
pub use whisper::{write_tiny_whisper, TinyWhisperSpec};

use std::path::{Path, PathBuf};

/// Name of the tiny model set directory under the output folder.
pub const TINY_OMNI_DIR: &str = "tiny-omni";

/// Errors from writing tiny checkpoints. Each names the file or the bad setting.
#[derive(Debug, thiserror::Error)]
pub enum TinyError {
    /// Creating a directory or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Serializing a JSON file failed.
    #[error("{}: cannot serialize JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The serialization error.
        #[source]
        source: serde_json::Error,
    },
    /// Writing the safetensors file failed.
    #[error("{}: cannot write safetensors: {source}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The safetensors error.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// Building the tiny tokenizer failed.
    #[error("tiny tokenizer: {0}")]
    Tokenizer(String),
    /// The requested model shape is inconsistent.
    #[error("invalid tiny model spec: {0}")]
    InvalidSpec(String),
}

/// One checkpoint written by [`make_tiny`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyCheckpoint {
    /// The stage it is for (`"thinker"`).
    pub stage: String,
    /// The stage kind, as in the deployment file (`"llm"`).
    pub kind: String,
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Every file written into `dir`.
    pub files: Vec<PathBuf>,
}

/// What [`make_tiny`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyManifest {
    /// `out/tiny-omni`.
    pub root: PathBuf,
    /// One entry per stage checkpoint, in a fixed order.
    pub checkpoints: Vec<TinyCheckpoint>,
}

impl TinyManifest {
    /// The checkpoint written for `stage`, if any.
    pub fn checkpoint(&self, stage: &str) -> Option<&TinyCheckpoint> {
        self.checkpoints.iter().find(|c| c.stage == stage)
    }

    /// Every file written, in order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.checkpoints
            .iter()
            .flat_map(|c| c.files.iter().map(PathBuf::as_path))
    }
}

/// Writes the tiny omni model set under `out/tiny-omni/`, one checkpoint per stage kind the
/// project supports: `thinker/`, a [`TinyLlmSpec::tiny_qwen3`] LLM; `talker/`, a tiny talker
/// conditioned on the thinker's hidden states, writing SNAC codes in the Orpheus frame layout;
/// `codec/`, a tiny SNAC decoder; `image/`, a diffusers text-to-image pipeline folder shared
/// by the `image-encoder`, `dit` and `vae` stages; `vision/` and `audio/`, a tiny CLIP vision
/// tower and a tiny Whisper encoder, each with a projector into the thinker's width (the thinker
/// has `<|IMAGE|>` and `<|AUDIO|>` placeholders for them).
///
/// Existing files are overwritten. Same `seed` ⇒ byte-identical files.
pub fn make_tiny(out: &Path, seed: u64) -> Result<TinyManifest, TinyError> {
    let root = out.join(TINY_OMNI_DIR);
    let thinker = root.join("thinker");
    let files = write_tiny_thinker(&thinker, &TinyLlmSpec::tiny_qwen3(), seed)?;
    let talker = root.join("talker");
    let thinker_hidden = TinyLlmSpec::tiny_qwen3().hidden_size;
    let talker_files =
        write_tiny_talker(&talker, &TinyTalkerSpec::tiny(thinker_hidden), seed)?.files;
    let codec = root.join("codec");
    let codec_files = write_tiny_snac(&codec, &TinySnacSpec::tiny(), seed)?;
    let image = root.join("image");
    let image_files = write_tiny_image_pipeline(&image, seed)?;
    let vision = root.join("vision");
    write_tiny_vision(&vision, &TinyVisionSpec::tiny(thinker_hidden), seed)?;
    let audio = root.join("audio");
    write_tiny_whisper(&audio, &TinyWhisperSpec::tiny(thinker_hidden), seed)?;
    let encoder_files = |dir: &Path| {
        [
            "config.json",
            "preprocessor_config.json",
            "model.safetensors",
        ]
        .map(|f| dir.join(f))
        .to_vec()
    };
    Ok(TinyManifest {
        root,
        checkpoints: vec![
            TinyCheckpoint {
                stage: "thinker".into(),
                kind: "llm".into(),
                dir: thinker,
                files,
            },
            TinyCheckpoint {
                stage: "talker".into(),
                kind: "llm".into(),
                dir: talker,
                files: talker_files,
            },
            TinyCheckpoint {
                stage: "codec".into(),
                kind: "codec".into(),
                dir: codec,
                files: codec_files,
            },
            TinyCheckpoint {
                stage: "image".into(),
                kind: "pipeline".into(),
                dir: image,
                files: image_files,
            },
            TinyCheckpoint {
                stage: "vision-encoder".into(),
                kind: "encoder".into(),
                files: encoder_files(&vision),
                dir: vision,
            },
            TinyCheckpoint {
                stage: "audio-encoder".into(),
                kind: "encoder".into(),
                files: encoder_files(&audio),
                dir: audio,
            },
        ],
    })
}

/// Writes `bytes` to `path`, naming the path on error.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TinyError> {
    std::fs::write(path, bytes).map_err(|source| TinyError::Io {
        path: path.to_path_buf(),
        source,
    })
}
