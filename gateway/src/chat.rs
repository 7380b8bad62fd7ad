//! `/v1/chat/completions` and `/v1/completions`: turning a job's events into OpenAI's answer
//! shapes — one JSON body, or server-sent event chunks — for text, images and audio.

use crate::audio::{encoding_error, pcm16_bytes, wav_bytes, AudioFields, AudioFormat};
use crate::openai::{
    BadRequest, ChatCompletionRequest, CompletionRequest, SamplingFields, StreamOptions, UsageBody,
};
use crate::orchestrator::{JobEvent, JobStream};
use crate::server::{parse_body, unix_now, with_request_id, ApiError, AppState, NewJob};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures::stream::{self, Stream, StreamExt};
use omnistage_stages::{FinishReason, Modality, Prompt, RgbImages, RouteRequest, Usage};
use serde_json::{json, Value};
use std::convert::Infallible;

/// Which OpenAI object a job answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Text,
}

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = async {
        let req: ChatCompletionRequest = parse_body(body)?;
        state.check_model(req.model.as_deref())?;
        let input = req.chat_messages().map_err(ApiError::bad)?;
        let outputs = req.output_modalities().map_err(ApiError::bad)?;
        let sampling = req.sampling.to_params().map_err(ApiError::bad)?;
        let route = RouteRequest {
            model: req.model.clone(),
            k: req.router_k,
        };
        if let Some(k) = req.router_k {
            let orch = state.orchestrator()?;
            if !orch.graph.has_router() {
                return Err(ApiError::bad(BadRequest::new(
                    "router_k",
                    "this deployment has no router stage to choose experts",
                )));
            }
            if k == 0 {
                return Err(ApiError::bad(BadRequest::new(
                    "router_k",
                    "router_k must be at least 1",
                )));
            }
        }
        let image = if outputs.contains(&Modality::Image) {
            let orch = state.orchestrator()?;
            match crate::images::image_settings(&orch.graph) {
                Some(settings) => Some(
                    req.image
                        .clone()
                        .unwrap_or_default()
                        .resolve(settings)
                        .map_err(ApiError::bad)?,
                ),
                None => None,
            }
        } else {
            None
        };
        let (audio, format) = if outputs.contains(&Modality::Audio) {
            let orch = state.orchestrator()?;
            let (voice, format) =
                AudioFields::resolve(req.audio.as_ref(), &orch.graph).map_err(ApiError::bad)?;
            let params = crate::audio::audio_params(voice, sampling.seed);
            (Some(params), Some(format))
        } else {
            (None, None)
        };
        // Last, as the costliest check: images and clips decoded (off the executor threads).
        let media = if input.media.is_empty() {
            Vec::new()
        } else {
            let orch = state.orchestrator()?;
            crate::media::resolve(input.media, &orch.graph)
                .await
                .map_err(ApiError::bad)?
        };
        let job = state.start(NewJob {
            prompt: Prompt::Chat(input.messages),
            sampling,
            outputs,
            image,
            audio,
            media,
            route,
        })?;
        let mut reply = ReplyOptions::new(req.stream, &req.stream_options, &req.sampling);
        reply.audio = format;
        Ok::<_, ApiError>((job, reply))
    }
    .await;
    match prepared {
        Ok((job, reply)) => respond(state, job, Flavor::Chat, reply).await,
        Err(e) => state.fail(e),
    }
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = (|| {
        let req: CompletionRequest = parse_body(body)?;
        state.check_model(req.model.as_deref())?;
        let prompt = req.prompt().map_err(ApiError::bad)?;
        let mut sampling = req.sampling.to_params().map_err(ApiError::bad)?;
        // OpenAI's default for legacy completions.
        sampling.max_tokens = sampling.max_tokens.or(Some(16));
        let job = state.start(NewJob {
            prompt,
            sampling,
            outputs: vec![Modality::Text],
            image: None,
            audio: None,
            media: Vec::new(),
            route: RouteRequest {
                model: req.model.clone(),
                k: None,
            },
        })?;
        Ok::<_, ApiError>((
            job,
            ReplyOptions::new(req.stream, &req.stream_options, &req.sampling),
        ))
    })();
    match prepared {
        Ok((job, reply)) => respond(state, job, Flavor::Text, reply).await,
        Err(e) => state.fail(e),
    }
}

/// How a job's answer is shaped, beyond its flavor.
#[derive(Clone, Copy)]
struct ReplyOptions {
    /// Server-sent events instead of one JSON body.
    stream: bool,
    /// A final streamed chunk with the usage.
    include_usage: bool,
    /// Generated token ids in each choice (vLLM's `return_token_ids`).
    token_ids: bool,
    /// The audio output's encoding, when audio was asked for (streamed audio is always raw
    /// 16-bit PCM, as OpenAI streams it).
    audio: Option<AudioFormat>,
}

impl ReplyOptions {
    fn new(stream: bool, options: &Option<StreamOptions>, fields: &SamplingFields) -> Self {
        Self {
            stream,
            include_usage: options.as_ref().is_some_and(|o| o.include_usage),
            token_ids: fields.return_token_ids == Some(true),
            audio: None,
        }
    }
}

async fn respond(state: AppState, job: JobStream, flavor: Flavor, reply: ReplyOptions) -> Response {
    let job_id = job.id.0;
    let id = match flavor {
        Flavor::Chat => format!("chatcmpl-{job_id}"),
        Flavor::Text => format!("cmpl-{job_id}"),
    };
    let mut response = if reply.stream {
        let events = sse_events(state, job, flavor, id, reply);
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    } else {
        collect(state, job, flavor, id, reply).await
    };
    with_request_id(&mut response, job_id);
    response
}

async fn collect(
    state: AppState,
    mut job: JobStream,
    flavor: Flavor,
    id: String,
    reply: ReplyOptions,
) -> Response {
    let job_id = job.id.0;
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut images: Vec<RgbImages> = Vec::new();
    let mut samples: Vec<f32> = Vec::new();
    let mut sample_rate = 0;
    let model = state.model_name.clone();
    loop {
        match job.next().await {
            Some(JobEvent::Images(i)) => images.push(i),
            Some(JobEvent::Audio(pcm)) => {
                sample_rate = pcm.sample_rate;
                samples.extend_from_slice(&pcm.samples);
            }
            Some(JobEvent::Text { delta, token_ids }) => {
                state
                    .metrics
                    .generated_tokens
                    .with_label_values(&[&model])
                    .inc_by(token_ids.len() as u64);
                text.push_str(&delta);
                ids.extend(token_ids);
            }
            Some(JobEvent::Finished { reason, usage }) => {
                let mut body = final_body(&state, flavor, &id, text, reason, usage);
                if !images.is_empty() {
                    match content_with_images(&body["choices"][0]["message"]["content"], &images) {
                        Ok(content) => body["choices"][0]["message"]["content"] = content,
                        Err(e) => return state.fail(image_encoding_error(e)),
                    }
                }
                if let Some(format) = reply.audio {
                    let bytes = match format {
                        AudioFormat::Pcm16 => pcm16_bytes(&samples),
                        AudioFormat::Wav => match wav_bytes(&samples, sample_rate.max(1)) {
                            Ok(b) => b,
                            Err(e) => return state.fail(encoding_error(e)),
                        },
                    };
                    // OpenAI's shape: the text is the audio's transcript, `content` is null.
                    let message = &mut body["choices"][0]["message"];
                    let transcript = message["content"].take();
                    message["audio"] = json!({
                        "id": format!("audio_{job_id}"),
                        "data": base64::engine::general_purpose::STANDARD.encode(bytes),
                        "expires_at": unix_now() + 3600,
                        "transcript": if transcript.is_string() { transcript } else { json!("") },
                    });
                }
                if reply.token_ids {
                    body["choices"][0]["token_ids"] = json!(ids);
                }
                return Json(body).into_response();
            }
            Some(JobEvent::Failed(err)) => return state.fail(ApiError::from_job(&err)),
            None => {
                return state.fail(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the job ended without a result",
                    None,
                ))
            }
        }
    }
}

fn final_body(
    state: &AppState,
    flavor: Flavor,
    id: &str,
    text: String,
    reason: FinishReason,
    usage: Usage,
) -> Value {
    let choice = match flavor {
        Flavor::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": reason.as_str(),
        }),
        Flavor::Text => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason.as_str()})
        }
    };
    json!({
        "id": id,
        "object": if flavor == Flavor::Chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": state.model_name,
        "choices": [choice],
        "usage": UsageBody::from(usage),
    })
}

/// A chat message's content as parts: its text (if any), then each image as an `image_url`
/// part with a PNG data URL.
fn content_with_images(text: &Value, images: &[RgbImages]) -> Result<Value, String> {
    let mut parts = Vec::new();
    if let Some(t) = text.as_str().filter(|t| !t.is_empty()) {
        parts.push(json!({"type": "text", "text": t}));
    }
    for i in images {
        parts.extend(crate::images::image_parts(i)?);
    }
    Ok(Value::Array(parts))
}

fn image_encoding_error(message: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("cannot encode the image: {message}"),
        None,
    )
}

/// One streamed chunk in OpenAI's shape.
fn chunk(
    flavor: Flavor,
    id: &str,
    model: &str,
    text: Option<&str>,
    first: bool,
    reason: Option<FinishReason>,
) -> Value {
    let reason = reason.map(FinishReason::as_str);
    let choice = match flavor {
        Flavor::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason})
        }
        Flavor::Text => {
            json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": reason})
        }
    };
    json!({
        "id": id,
        "object": if flavor == Flavor::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": unix_now(),
        "model": model,
        "choices": [choice],
    })
}

struct SseState {
    state: AppState,
    job: JobStream,
    flavor: Flavor,
    id: String,
    reply: ReplyOptions,
    first: bool,
    done: bool,
}

fn sse_events(
    state: AppState,
    job: JobStream,
    flavor: Flavor,
    id: String,
    reply: ReplyOptions,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let s = SseState {
        state,
        job,
        flavor,
        id,
        reply,
        first: true,
        done: false,
    };
    stream::unfold(s, |mut s| async move {
        if s.done {
            return None;
        }
        let model = s.state.model_name.clone();
        let data: Vec<Value> = match s.job.next().await {
            Some(JobEvent::Text { delta, token_ids }) => {
                let tokens = token_ids.len();
                s.state.metrics.generated_tokens.with_label_values(&[&model]).inc_by(tokens as u64);
                // One chunk per generated token, even when the token completes no character yet
                // (a multi-byte character split across tokens): clients see steady progress.
                if delta.is_empty() && tokens == 0 && !s.first {
                    vec![]
                } else {
                    let mut c = if s.reply.audio.is_some() {
                        // With audio, OpenAI streams the text as the audio's transcript.
                        let mut c = chunk(s.flavor, &s.id, &model, None, s.first, None);
                        c["choices"][0]["delta"]["audio"] =
                            json!({"id": audio_id(&s.id), "transcript": delta});
                        c
                    } else {
                        chunk(s.flavor, &s.id, &model, Some(&delta), s.first, None)
                    };
                    if s.reply.token_ids {
                        c["choices"][0]["token_ids"] = json!(token_ids);
                    }
                    s.first = false;
                    vec![c]
                }
            }
            Some(JobEvent::Images(images)) => match content_with_images(&Value::Null, &[images]) {
                Ok(parts) => {
                    let mut c = chunk(s.flavor, &s.id, &model, None, s.first, None);
                    c["choices"][0]["delta"]["content"] = parts;
                    s.first = false;
                    vec![c]
                }
                Err(e) => {
                    s.done = true;
                    let e = image_encoding_error(e);
                    s.state.metrics.error(e.reason());
                    vec![e.json()]
                }
            },
            Some(JobEvent::Audio(pcm)) => {
                let mut c = chunk(s.flavor, &s.id, &model, None, s.first, None);
                let data = base64::engine::general_purpose::STANDARD.encode(pcm16_bytes(&pcm.samples));
                c["choices"][0]["delta"]["audio"] = json!({
                    "id": audio_id(&s.id),
                    "data": data,
                    "expires_at": unix_now() + 3600,
                });
                s.first = false;
                vec![c]
            }
            Some(JobEvent::Finished { reason, usage }) => {
                s.done = true;
                let mut out = vec![chunk(s.flavor, &s.id, &model, None, s.first, Some(reason))];
                if s.reply.include_usage {
                    out.push(json!({
                        "id": s.id, "object": if s.flavor == Flavor::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": unix_now(), "model": model, "choices": [], "usage": UsageBody::from(usage),
                    }));
                }
                out
            }
            Some(JobEvent::Failed(err)) => {
                s.done = true;
                let e = ApiError::from_job(&err);
                s.state.metrics.error(e.reason());
                vec![e.json()]
            }
            None => {
                s.done = true;
                vec![]
            }
        };
        let mut events: Vec<Result<Event, Infallible>> =
            data.into_iter().map(|v| Ok(Event::default().data(v.to_string()))).collect();
        if s.done {
            events.push(Ok(Event::default().data("[DONE]")));
        }
        Some((stream::iter(events), s))
    })
    .flatten()
}

/// The audio object's id in a chat answer.
fn audio_id(completion_id: &str) -> String {
    format!("audio_{}", completion_id.trim_start_matches("chatcmpl-"))
}
