//! What a request asks of the stage graph, as every stage sees it.

use crate::media::MediaInput;
use crate::payload::Payload;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// Identifies one request across every stage it passes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job-{}", self.0)
    }
}

/// A final output modality a request can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Text,
    Image,
    Audio,
}

impl Modality {
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Text => "text",
            Modality::Image => "image",
            Modality::Audio => "audio",
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One chat turn, as OpenAI's API and chat templates see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: MessageContent,
}

impl ChatMessage {
    /// A turn of plain text.
    pub fn text(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: MessageContent::Text(content.to_string()),
        }
    }
}

/// A turn's content: plain text, or parts in order when the turn carries images or audio. A chat
/// template sees a string, or a list of `{"type": "text", "text": ...}`, `{"type": "image"}` and
/// `{"type": "audio"}` (Hugging Face processors' shape), and writes the model's placeholder for
/// each media part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl From<&str> for MessageContent {
    fn from(text: &str) -> Self {
        MessageContent::Text(text.to_string())
    }
}

impl From<String> for MessageContent {
    fn from(text: String) -> Self {
        MessageContent::Text(text)
    }
}

impl MessageContent {
    /// The text parts joined (media parts left out).
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text } => Some(text.as_str()),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// One part of a turn. Media parts stand for the request's `media` items in order of appearance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text { text: String },
    Image,
    Audio,
}

/// The request's input before any stage touched it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages, rendered with the stage model's chat template.
    Chat(Vec<ChatMessage>),
    /// Raw text, tokenized as is (`/v1/completions`).
    Completion(String),
    /// Token ids, used as is (`/v1/completions` with a list of integers as its prompt).
    Tokens(Vec<u32>),
    /// Text to be spoken verbatim (`/v1/audio/speech`): an LLM stage "generates" exactly its
    /// tokens (teacher-forced), so a talker conditioned on its hidden states speaks this text; a
    /// text-prompted talker speaks it directly.
    Speak(String),
}

/// Per-request sampling settings. `None` means "the stage's default from the TOML, else the
/// checkpoint's generation_config.json, else the built-in default".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub max_tokens: Option<usize>,
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens (benchmarks that need exact lengths).
    #[serde(default)]
    pub ignore_eos: bool,
}

impl SamplingParams {
    /// Fills every unset field from `defaults`; list fields are taken from `defaults` when empty.
    pub fn or(&self, defaults: &SamplingParams) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.or(defaults.temperature),
            top_p: self.top_p.or(defaults.top_p),
            top_k: self.top_k.or(defaults.top_k),
            seed: self.seed.or(defaults.seed),
            max_tokens: self.max_tokens.or(defaults.max_tokens),
            repetition_penalty: self.repetition_penalty.or(defaults.repetition_penalty),
            stop: if self.stop.is_empty() {
                defaults.stop.clone()
            } else {
                self.stop.clone()
            },
            stop_token_ids: if self.stop_token_ids.is_empty() {
                defaults.stop_token_ids.clone()
            } else {
                self.stop_token_ids.clone()
            },
            ignore_eos: self.ignore_eos || defaults.ignore_eos,
        }
    }
}

/// What a text-to-image request asks for, resolved against the stage's defaults and checked
/// against its limits by the gateway (the dit stage checks again).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageParams {
    pub width: usize,
    pub height: usize,
    /// Images to generate from the prompt.
    pub n: usize,
    pub steps: usize,
    /// Classifier-free guidance scale (distilled guidance for FLUX-dev); `<= 1` means no
    /// classifier-free guidance.
    pub guidance_scale: f64,
    /// Text to steer away from (the unconditional branch of classifier-free guidance).
    pub negative_prompt: Option<String>,
    /// Seed of the initial noise; image `i` uses noise stream `(seed, i)`.
    pub seed: u64,
    /// Reuse block-stack residuals between similar steps (TeaCache-style).
    pub step_cache: bool,
}

/// What a request with an audio output asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioParams {
    /// A voice the talker stage declares (`default` always exists).
    pub voice: String,
    /// Seed of the talker's sampler and the codec's noise: the same seed gives the same codes and
    /// samples, streamed or not.
    pub seed: u64,
}

/// Everything a request asks for; shared read-only (`Arc`) by every stage it visits.
#[derive(Debug, Clone)]
pub struct JobRequest {
    pub id: JobId,
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub outputs: Vec<Modality>,
    pub deadline: Instant,
    /// Image generation settings; `None` for requests without an image output.
    pub image: Option<ImageParams>,
    /// Audio settings; `None` for requests without an audio output.
    pub audio: Option<AudioParams>,
    /// Images and audio clips of the prompt, in order of appearance (media encoder stages
    /// encode them; an LLM splices their embeddings in place of placeholder tokens).
    pub media: Vec<MediaInput>,
    /// What a router stage reads besides the prompt.
    pub route: RouteRequest,
}

/// The request's say in routing: the client's `model` name (rule-form routers match it) and how
/// many experts to run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteRequest {
    /// The `model` field of the HTTP request, as the client wrote it.
    pub model: Option<String>,
    /// How many experts a router selects (`None`: the router's `k`).
    pub k: Option<usize>,
}

/// What a stage receives for one job: the request plus whatever its inbound edges delivered.
#[derive(Debug, Clone)]
pub struct StageInput {
    pub request: Arc<JobRequest>,
    pub upstream: Vec<Payload>,
    /// Whether this stage produces what the client receives; only such a stage applies the
    /// request's sampling settings (others use their stage defaults).
    pub client_facing: bool,
    /// Whether more input follows through [`StageEngine::feed`](crate::StageEngine::feed) (the
    /// job arrived on a streamed edge with its first chunk in `upstream`).
    pub streaming: bool,
}

impl StageInput {
    /// The request's sampling settings if this stage faces the client, else none.
    pub fn sampling(&self) -> SamplingParams {
        if self.client_facing {
            self.request.sampling.clone()
        } else {
            SamplingParams::default()
        }
    }
}

/// Why a stage stopped producing for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token, stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Single-shot stages (encoders, VAEs) that produced their whole output.
    Complete,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Complete => "stop",
        }
    }
}

/// Token accounting for one job at one stage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}
