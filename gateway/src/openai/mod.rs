//! OpenAI-compatible request and response shapes, and their translation into jobs.

use crate::media::{AudioFormat, MediaPart, MediaSource};
use omnistage_stages::{
    ChatMessage, ContentPart as StagePart, MessageContent as StageContent, Modality, Prompt,
    SamplingParams,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest `max_tokens` a request may ask for (the stage also caps it by the model's length).
pub const MAX_TOKENS_LIMIT: usize = 1 << 20;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// A request the gateway refuses, with what to tell the client.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub message: String,
    pub param: Option<String>,
}

impl BadRequest {
    pub fn new(param: &str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

/// Sampling fields shared by chat and text completions (OpenAI's plus vLLM-style extras).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    pub logprobs: Option<Value>,
    /// vLLM's extension: each choice (and each streamed chunk) also carries the generated
    /// `token_ids`.
    pub return_token_ids: Option<bool>,
}

impl SamplingFields {
    /// Checks ranges and builds the job's sampling parameters.
    pub fn to_params(&self) -> Result<SamplingParams, BadRequest> {
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(n) if n >= 1 && (n as usize) <= MAX_TOKENS_LIMIT => Some(n as usize),
            Some(n) => {
                return Err(BadRequest::new(
                    "max_tokens",
                    format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {n}"),
                ))
            }
        };
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) || t.is_nan() {
                return Err(BadRequest::new(
                    "temperature",
                    format!("temperature must be between 0 and 2, got {t}"),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(BadRequest::new(
                    "top_p",
                    format!("top_p must be in (0, 1], got {p}"),
                ));
            }
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => {
                return Err(BadRequest::new(
                    "top_k",
                    format!("top_k must be -1, 0 or positive, got {k}"),
                ))
            }
        };
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r <= 10.0) {
                return Err(BadRequest::new(
                    "repetition_penalty",
                    format!("repetition_penalty must be in (0, 10], got {r}"),
                ));
            }
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(BadRequest::new(
                    name,
                    format!("{name} is not supported; use repetition_penalty"),
                ));
            }
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(BadRequest::new(
                    "n",
                    format!("only n = 1 is supported, got {n}"),
                ));
            }
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_bool() != Some(false) && v.as_u64() != Some(0))
        {
            return Err(BadRequest::new("logprobs", "logprobs are not supported"));
        }
        let stop = self
            .stop
            .clone()
            .map(StopField::into_vec)
            .unwrap_or_default();
        if stop.len() > 16 {
            return Err(BadRequest::new(
                "stop",
                "at most 16 stop strings are allowed",
            ));
        }
        Ok(SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k,
            seed: self.seed,
            max_tokens,
            repetition_penalty: self.repetition_penalty,
            stop,
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Message content: a string or a list of content parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One content part as sent: `{"type": "text", "text"}`, `{"type": "image_url", "image_url":
/// {"url", "detail"}}` or `{"type": "input_audio", "input_audio": {"data", "format"}}`. The
/// fields stay loose JSON here so that a malformed part gets a 400 naming it, not a bare
/// "invalid JSON body".
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub text: Option<Value>,
    pub image_url: Option<Value>,
    pub input_audio: Option<Value>,
}

impl ContentPart {
    /// The part's text, or the image or clip it carries (not yet checked against the
    /// deployment, nor decoded). `at` names the part, e.g. `messages[1].content[2]`.
    fn parse(&self, at: &str) -> Result<Result<String, MediaSource>, BadRequest> {
        let kind = match &self.kind {
            Some(k) => k.as_str(),
            None => {
                return Err(BadRequest::new(
                    &format!("{at}.type"),
                    "a content part needs `type`",
                ))
            }
        };
        match kind {
            "text" => match &self.text {
                Some(Value::String(t)) => Ok(Ok(t.clone())),
                Some(_) => Err(BadRequest::new(
                    &format!("{at}.text"),
                    "`text` must be a string",
                )),
                None => Err(BadRequest::new(
                    &format!("{at}.text"),
                    "a text part needs `text`",
                )),
            },
            "image_url" => image_url_part(self.image_url.as_ref(), at).map(Err),
            "input_audio" => input_audio_part(self.input_audio.as_ref(), at).map(Err),
            other => Err(BadRequest::new(
                &format!("{at}.type"),
                format!(
                    "content part type `{other}` is not supported; use text, image_url or \
                     input_audio"
                ),
            )),
        }
    }
}

/// `image_url`: `{"url", "detail"?}` (or the bare URL string some clients send).
fn image_url_part(field: Option<&Value>, at: &str) -> Result<MediaSource, BadRequest> {
    let url_param = format!("{at}.image_url.url");
    let missing = || {
        BadRequest::new(
            &url_param,
            "an image_url part needs `image_url.url`: a data: URI (data:image/png;base64,...) or \
             an http(s):// address",
        )
    };
    let url = match field {
        Some(Value::String(u)) => u,
        Some(Value::Object(o)) => {
            if let Some(d) = o.get("detail").filter(|d| !d.is_null()) {
                if !matches!(d.as_str(), Some("auto" | "low" | "high")) {
                    return Err(BadRequest::new(
                        &format!("{at}.image_url.detail"),
                        "`detail` must be auto, low or high",
                    ));
                }
            }
            match o.get("url") {
                Some(Value::String(u)) => u,
                _ => return Err(missing()),
            }
        }
        None => return Err(missing()),
        Some(_) => {
            return Err(BadRequest::new(
                &format!("{at}.image_url"),
                "`image_url` must be an object with `url`",
            ))
        }
    };
    if url.trim().is_empty() {
        return Err(missing());
    }
    Ok(MediaSource::ImageUrl(url.trim().to_string()))
}

/// `input_audio`: `{"data": base64, "format": "wav" | "mp3"}`.
fn input_audio_part(field: Option<&Value>, at: &str) -> Result<MediaSource, BadRequest> {
    let Some(Value::Object(o)) = field else {
        return Err(BadRequest::new(
            &format!("{at}.input_audio"),
            "an input_audio part needs `input_audio`: {\"data\": base64 audio, \"format\": \
             \"wav\" or \"mp3\"}",
        ));
    };
    let format_param = format!("{at}.input_audio.format");
    let format = match o.get("format") {
        Some(Value::String(f)) => {
            AudioFormat::parse(f).map_err(|m| BadRequest::new(&format_param, m))?
        }
        _ => {
            return Err(BadRequest::new(
                &format_param,
                "an input_audio part needs `input_audio.format`: wav or mp3",
            ))
        }
    };
    let data = match o.get("data") {
        Some(Value::String(d)) if !d.trim().is_empty() => d.clone(),
        _ => {
            return Err(BadRequest::new(
                &format!("{at}.input_audio.data"),
                "an input_audio part needs `input_audio.data`: the clip, base64-encoded",
            ))
        }
    };
    Ok(MediaSource::Audio { data, format })
}

/// A chat request's messages and the image and audio parts among them, in order of appearance
/// (each `ContentPart::Image`/`Audio` in `messages` stands for the next one of `media`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatInput {
    pub messages: Vec<ChatMessage>,
    pub media: Vec<MediaPart>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    pub content: Option<MessageContent>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<RequestMessage>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub modalities: Option<Vec<String>>,
    /// Image options when `modalities` includes `"image"` (our extension; the fields of
    /// `/v1/images/generations` other than `prompt`).
    pub image: Option<crate::images::ImageFields>,
    /// Voice and format when `modalities` includes `"audio"` (OpenAI's shape).
    pub audio: Option<crate::audio::AudioFields>,
    /// How many experts a router stage runs this request on (our extension; the router's `k`
    /// when absent).
    pub router_k: Option<usize>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

impl ChatCompletionRequest {
    /// The messages, roles checked (`developer` becomes `system`). A message without image or
    /// audio parts keeps its text as one string; one with them keeps its parts in order, media
    /// parts standing for the returned `media` items. Only the shape of media parts is checked
    /// here: [`crate::media::resolve`] checks them against the deployment and decodes them.
    pub fn chat_messages(&self) -> Result<ChatInput, BadRequest> {
        if self.messages.is_empty() {
            return Err(BadRequest::new("messages", "messages must not be empty"));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        let mut media = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool"
            ) {
                return Err(BadRequest::new(
                    &format!("messages[{i}].role"),
                    format!("unknown role `{}`", m.role),
                ));
            }
            let content = match &m.content {
                None => StageContent::Text(String::new()),
                Some(MessageContent::Text(t)) => StageContent::Text(t.clone()),
                Some(MessageContent::Parts(parts)) => {
                    let mut out = Vec::with_capacity(parts.len());
                    for (j, p) in parts.iter().enumerate() {
                        let at = format!("messages[{i}].content[{j}]");
                        match p.parse(&at)? {
                            Ok(text) => out.push(StagePart::Text { text }),
                            Err(source) => {
                                let part = MediaPart { at, source };
                                out.push(match part.modality() {
                                    Modality::Audio => StagePart::Audio,
                                    _ => StagePart::Image,
                                });
                                media.push(part);
                            }
                        }
                    }
                    if out.iter().all(|p| matches!(p, StagePart::Text { .. })) {
                        // Text only: one string, as chat templates that take strings expect.
                        StageContent::Text(StageContent::Parts(out).text())
                    } else {
                        StageContent::Parts(out)
                    }
                }
            };
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role.clone()
            };
            messages.push(ChatMessage { role, content });
        }
        Ok(ChatInput { messages, media })
    }

    pub fn output_modalities(&self) -> Result<Vec<Modality>, BadRequest> {
        parse_modalities(self.modalities.as_deref())
    }
}

/// Reads `modalities`; default text.
pub fn parse_modalities(list: Option<&[String]>) -> Result<Vec<Modality>, BadRequest> {
    let Some(list) = list else {
        return Ok(vec![Modality::Text]);
    };
    if list.is_empty() {
        return Err(BadRequest::new(
            "modalities",
            "modalities must not be empty",
        ));
    }
    let mut out = Vec::new();
    for m in list {
        let modality = match m.as_str() {
            "text" => Modality::Text,
            "image" => Modality::Image,
            "audio" => Modality::Audio,
            other => {
                return Err(BadRequest::new(
                    "modalities",
                    format!("unknown modality `{other}`; use text, image or audio"),
                ))
            }
        };
        if !out.contains(&modality) {
            out.push(modality);
        }
    }
    Ok(out)
}

/// `prompt` of `/v1/completions`: a string, a list of token ids, or a one-element list of
/// either.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptField,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

impl CompletionRequest {
    pub fn prompt(&self) -> Result<Prompt, BadRequest> {
        if self.echo == Some(true) {
            return Err(BadRequest::new("echo", "echo is not supported"));
        }
        let many = |n: usize| {
            BadRequest::new(
                "prompt",
                format!("exactly one prompt per request is supported, got {n}"),
            )
        };
        match &self.prompt {
            PromptField::One(s) => Ok(Prompt::Completion(s.clone())),
            PromptField::Many(v) if v.len() == 1 => Ok(Prompt::Completion(v[0].clone())),
            PromptField::Many(v) => Err(many(v.len())),
            PromptField::Tokens(ids) if ids.is_empty() => {
                Err(BadRequest::new("prompt", "the token list is empty"))
            }
            PromptField::Tokens(ids) => Ok(Prompt::Tokens(ids.clone())),
            PromptField::ManyTokens(v) if v.len() == 1 && !v[0].is_empty() => {
                Ok(Prompt::Tokens(v[0].clone()))
            }
            PromptField::ManyTokens(v) if v.len() == 1 => {
                Err(BadRequest::new("prompt", "the token list is empty"))
            }
            PromptField::ManyTokens(v) => Err(many(v.len())),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct UsageBody {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl From<omnistage_stages::Usage> for UsageBody {
    fn from(u: omnistage_stages::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

#[cfg(test)]
mod tests;
