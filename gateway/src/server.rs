//! The HTTP API: OpenAI-compatible routes, health and metrics.

use crate::metrics::Metrics;
use crate::openai::{
    ApiErrorBody, BadRequest, ChatCompletionRequest, CompletionRequest, SamplingFields,
    StreamOptions, UsageBody,
};
use crate::orchestrator::{JobError, JobEvent, JobStream, Orchestrator};
use crate::runtime::RuntimeSlot;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use omnistage_stages::{
    FinishReason, ImageParams, JobRequest, Modality, Prompt, RgbImages, SamplingParams, Usage,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub model_name: String,
    pub runtime: Arc<RuntimeSlot>,
    pub metrics: Arc<Metrics>,
    pub request_timeout: Duration,
}

/// The gateway's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route(
            "/v1/images/generations",
            post(crate::images::images_generations),
        )
        .route("/v1/models", get(models))
        .route("/v1/requests/{id}/trace", get(request_trace))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// An error response in OpenAI's shape.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    body: ApiErrorBody,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        kind: &str,
        message: impl Into<String>,
        param: Option<String>,
    ) -> Self {
        Self {
            status,
            body: ApiErrorBody {
                message: message.into(),
                kind: kind.into(),
                param,
                code: None,
            },
        }
    }

    pub(crate) fn bad(b: BadRequest) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            b.message,
            b.param,
        )
    }

    pub(crate) fn from_job(err: &JobError) -> Self {
        let (status, kind) = match err {
            JobError::InvalidInput(_) | JobError::UnsupportedOutput(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            JobError::Overloaded { .. } => (StatusCode::TOO_MANY_REQUESTS, "server_overloaded"),
            JobError::StageFailed { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            JobError::DeadlineExceeded(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        };
        Self::new(status, kind, err.to_string(), None)
    }

    fn json(&self) -> Value {
        json!({ "error": self.body })
    }

    fn reason(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "bad_request",
            404 => "not_found",
            413 => "body_too_large",
            429 => "overloaded",
            503 => "unavailable",
            504 => "deadline",
            _ => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.json())).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        "no such route",
        None,
    )
}

pub(crate) fn parse_body<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        ApiError::new(
            status,
            "invalid_request_error",
            format!("could not read the request body: {r}"),
            None,
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("invalid JSON body: {e}"),
            None,
        )
    })
}

impl AppState {
    pub(crate) fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            None => Ok(()),
            Some(m) if m == self.model_name => Ok(()),
            Some(m) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found_error",
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    self.model_name
                ),
                Some("model".into()),
            )),
        }
    }

    pub(crate) fn orchestrator(&self) -> Result<Arc<Orchestrator>, ApiError> {
        self.runtime.orchestrator().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_unavailable",
                "the stages are still loading; see /health",
                None,
            )
        })
    }

    pub(crate) fn start(
        &self,
        prompt: Prompt,
        sampling: SamplingParams,
        outputs: Vec<Modality>,
        image: Option<ImageParams>,
    ) -> Result<JobStream, ApiError> {
        let orch = self.orchestrator()?;
        let request = JobRequest {
            id: orch.next_job_id(),
            prompt,
            sampling,
            outputs,
            deadline: Instant::now() + self.request_timeout,
            image,
            audio: None,
        };
        orch.submit(request).map_err(|e| ApiError::from_job(&e))
    }

    pub(crate) fn fail(&self, err: ApiError) -> Response {
        self.metrics.error(err.reason());
        err.into_response()
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which OpenAI object a job answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Text,
}

async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = (|| {
        let req: ChatCompletionRequest = parse_body(body)?;
        state.check_model(req.model.as_deref())?;
        let messages = req.chat_messages().map_err(ApiError::bad)?;
        let outputs = req.output_modalities().map_err(ApiError::bad)?;
        let sampling = req.sampling.to_params().map_err(ApiError::bad)?;
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
        let job = state.start(Prompt::Chat(messages), sampling, outputs, image)?;
        Ok::<_, ApiError>((
            job,
            ReplyOptions::new(req.stream, &req.stream_options, &req.sampling),
        ))
    })();
    match prepared {
        Ok((job, reply)) => respond(state, job, Flavor::Chat, reply).await,
        Err(e) => state.fail(e),
    }
}

async fn completions(
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
        let job = state.start(prompt, sampling, vec![Modality::Text], None)?;
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
}

impl ReplyOptions {
    fn new(stream: bool, options: &Option<StreamOptions>, fields: &SamplingFields) -> Self {
        Self {
            stream,
            include_usage: options.as_ref().is_some_and(|o| o.include_usage),
            token_ids: fields.return_token_ids == Some(true),
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
        collect(state, job, flavor, id, reply.token_ids).await
    };
    with_request_id(&mut response, job_id);
    response
}

/// Names the job in a response header, so clients can fetch its trace at
/// `GET /v1/requests/{id}/trace` once it is done.
pub(crate) fn with_request_id(response: &mut Response, job_id: u64) {
    if let Ok(v) = header::HeaderValue::from_str(&job_id.to_string()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
}

/// The response header carrying the job id.
pub const REQUEST_ID_HEADER: &str = "x-omnistage-request-id";

/// `GET /v1/requests/{id}/trace`: a finished job's per-stage breakdown (kept for the most recent
/// jobs only).
async fn request_trace(
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no trace for request `{id}`: unknown, still running, or evicted"),
            None,
        )
        .into_response()
    };
    let Ok(job) = id.parse::<u64>() else {
        return not_found();
    };
    let Some(orch) = state.runtime.orchestrator() else {
        return not_found();
    };
    match orch.traces.get(job) {
        Some(trace) => Json(trace).into_response(),
        None => not_found(),
    }
}

async fn collect(
    state: AppState,
    mut job: JobStream,
    flavor: Flavor,
    id: String,
    want_ids: bool,
) -> Response {
    let mut text = String::new();
    let mut ids = Vec::new();
    let mut images: Vec<RgbImages> = Vec::new();
    let model = state.model_name.clone();
    loop {
        match job.next().await {
            Some(JobEvent::Images(i)) => images.push(i),
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
                if want_ids {
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
                    let mut c = chunk(s.flavor, &s.id, &model, Some(&delta), s.first, None);
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

async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "omnistage"}],
    }))
}

async fn health(State(state): State<AppState>) -> Response {
    let (ready, stages) = state.runtime.health();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if ready { "ready" } else { "not_ready" }, "stages": stages})),
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Some(orch) = state.runtime.orchestrator() {
        for pool in orch.stages() {
            for (replica, stats) in pool.stats().iter().enumerate() {
                state
                    .metrics
                    .record_engine(pool.id(), replica, &stats.engine);
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
