//! The HTTP API: OpenAI-compatible routes, health and metrics.

use crate::metrics::Metrics;
use crate::openai::{ApiErrorBody, BadRequest};
use crate::orchestrator::{JobError, JobStream, Orchestrator};
use crate::runtime::RuntimeSlot;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use omnistage_stages::{
    AudioParams, ImageParams, JobRequest, MediaInput, Modality, Prompt, RouteRequest,
    SamplingParams,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Largest chat request body: chats carry images and audio inline (base64 data: URIs, a third
/// larger than the media); each item is further held to the deployment's `[media]` limits.
pub const MAX_CHAT_BODY_BYTES: usize = 32 << 20;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    pub model_name: String,
    pub runtime: Arc<RuntimeSlot>,
    pub metrics: Arc<Metrics>,
    pub request_timeout: Duration,
}

/// What an endpoint asks of a new job (the server adds its id and deadline).
pub(crate) struct NewJob {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
    pub outputs: Vec<Modality>,
    pub image: Option<ImageParams>,
    pub audio: Option<AudioParams>,
    pub media: Vec<MediaInput>,
    pub route: RouteRequest,
}

/// The gateway's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(crate::chat::chat_completions).layer(DefaultBodyLimit::max(MAX_CHAT_BODY_BYTES)),
        )
        .route("/v1/completions", post(crate::chat::completions))
        .route("/v1/audio/speech", post(crate::audio::speech))
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
            JobError::Unavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
            }
            JobError::DeadlineExceeded(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        };
        Self::new(status, kind, err.to_string(), None)
    }

    pub(crate) fn json(&self) -> Value {
        json!({ "error": self.body })
    }

    pub(crate) fn reason(&self) -> &'static str {
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
            // A rule-form router routes on the model name: the names it knows are served too.
            Some(m)
                if self
                    .runtime
                    .orchestrator()
                    .is_some_and(|o| o.graph.routed_model_names().contains(&m)) =>
            {
                Ok(())
            }
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

    /// Submits a new job built from `job` with a fresh id and the server's deadline.
    pub(crate) fn start(&self, job: NewJob) -> Result<JobStream, ApiError> {
        let orch = self.orchestrator()?;
        let request = JobRequest {
            id: orch.next_job_id(),
            prompt: job.prompt,
            sampling: job.sampling,
            outputs: job.outputs,
            deadline: Instant::now() + self.request_timeout,
            image: job.image,
            audio: job.audio,
            media: job.media,
            route: job.route,
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
    state.metrics.response()
}
