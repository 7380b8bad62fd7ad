//! The vocabulary of omnistage.
//!
//! Owns: the stage-graph deployment schema (TOML) and its validation, the payload types that travel
//! on edges, the request/job types every stage sees, and the [`engine::StageEngine`] trait each
//! stage engine implements.
//!
//! Must not know: HTTP, threads or queues (that is `scheduler`), transports (`connectors`), or any
//! model code (`engines`).

pub mod deploy;
pub mod engine;
pub mod job;
pub mod media;
pub mod payload;
pub mod route;

pub use engine::{EngineError, EngineStats, StageEngine, StageEvent, StepWork};
pub use job::{
    AudioParams, ChatMessage, ContentPart, FinishReason, ImageParams, JobId, JobRequest,
    MessageContent, Modality, Prompt, RouteRequest, SamplingParams, StageInput, Usage,
};
pub use media::{MediaData, MediaDigest, MediaInput};
pub use payload::{
    CodecFrames, Conditioning, HiddenStates, Latents, MediaEmbedding, Payload, PayloadKind,
    PcmAudio, RgbImages, TextEmbedding,
};
pub use route::{MotStates, RouteDecision};
