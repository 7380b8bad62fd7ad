//! Text-to-image over HTTP: `POST /v1/images/generations` in OpenAI's shape, and the image
//! settings chat completions take when `modalities` includes `"image"`.
//!
//! Sizes, steps, `n` and guidance are resolved against the `[stage.image]` settings of the graph's
//! dit stage and refused with a 400 naming the allowed range before any stage runs.

use crate::openai::BadRequest;
use crate::orchestrator::{JobError, JobEvent};
use crate::server::{parse_body, unix_now, ApiError, AppState, NewJob};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use omnistage_engines::diffusion::png::encode_png;
use omnistage_stages::deploy::{DeployGraph, ImageSettings, StageKind, IMAGE_SIDE_MULTIPLE};
use omnistage_stages::{ImageParams, Modality, Prompt, RgbImages, RouteRequest, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};

/// Image options: OpenAI's (`n`, `size`, `response_format`) and ours (`steps`,
/// `guidance_scale`, `seed`, `negative_prompt`, `step_cache`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageFields {
    pub n: Option<i64>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    #[serde(alias = "num_inference_steps")]
    pub steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub seed: Option<i64>,
    pub negative_prompt: Option<String>,
    pub step_cache: Option<bool>,
}

/// `POST /v1/images/generations`.
#[derive(Debug, Clone, Deserialize)]
pub struct ImagesRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    #[serde(flatten)]
    pub fields: ImageFields,
}

impl ImagesRequest {
    pub fn prompt(&self) -> Result<String, BadRequest> {
        match &self.prompt {
            Some(p) if !p.trim().is_empty() => Ok(p.clone()),
            Some(_) => Err(BadRequest::new("prompt", "`prompt` must not be empty")),
            None => Err(BadRequest::new("prompt", "`prompt` is required")),
        }
    }
}

/// The `[stage.image]` settings of the dit stage that feeds the graph's image output.
pub fn image_settings(graph: &DeployGraph) -> Option<&ImageSettings> {
    let output = graph.output_stage(Modality::Image)?;
    let mut todo = vec![output.id.as_str()];
    let mut seen = Vec::new();
    while let Some(id) = todo.pop() {
        if seen.contains(&id) {
            continue;
        }
        seen.push(id);
        let stage = graph.stages.iter().find(|s| s.id == id)?;
        if stage.kind == StageKind::Dit {
            return Some(&stage.image);
        }
        todo.extend(
            graph
                .edges
                .iter()
                .filter(|e| e.to == id)
                .map(|e| e.from.as_str()),
        );
    }
    None
}

fn in_range(param: &str, v: i64, lo: usize, hi: usize) -> Result<usize, BadRequest> {
    if v < lo as i64 || v > hi as i64 {
        return Err(BadRequest::new(
            param,
            format!("`{param}` is {v}; allowed: {lo} to {hi}"),
        ));
    }
    Ok(v as usize)
}

/// `"WxH"` → (width, height) within the stage's limits.
fn parse_size(size: &str, s: &ImageSettings) -> Result<(usize, usize), BadRequest> {
    let rule = format!(
        "sizes are WIDTHxHEIGHT with each side a multiple of {IMAGE_SIDE_MULTIPLE} from {} to {}",
        s.min_size, s.max_size
    );
    let bad = || BadRequest::new("size", format!("`size` is {size:?}; {rule}"));
    let (w, h) = size.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: usize = w.trim().parse().map_err(|_| bad())?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    for v in [w, h] {
        if v < s.min_size || v > s.max_size || v % IMAGE_SIDE_MULTIPLE != 0 {
            return Err(bad());
        }
    }
    Ok((w, h))
}

impl ImageFields {
    /// Resolves the request's options against the stage's defaults and limits.
    pub fn resolve(&self, s: &ImageSettings) -> Result<ImageParams, BadRequest> {
        if let Some(f) = self.response_format.as_deref() {
            if f != "b64_json" {
                return Err(BadRequest::new(
                    "response_format",
                    format!("`response_format` {f:?} is not supported; use \"b64_json\""),
                ));
            }
        }
        let (width, height) = match &self.size {
            Some(size) if size != "auto" => parse_size(size, s)?,
            _ => (s.default_width, s.default_height),
        };
        let n = in_range("n", self.n.unwrap_or(1), 1, s.max_n)?;
        let steps = in_range(
            "steps",
            self.steps.unwrap_or(s.default_steps as i64),
            1,
            s.max_steps,
        )?;
        let guidance_scale = self.guidance_scale.unwrap_or(s.default_guidance_scale);
        if !(guidance_scale.is_finite() && (0.0..=100.0).contains(&guidance_scale)) {
            return Err(BadRequest::new(
                "guidance_scale",
                format!("`guidance_scale` is {guidance_scale}; allowed: 0 to 100"),
            ));
        }
        let seed = match self.seed {
            Some(v) if v < 0 => {
                return Err(BadRequest::new(
                    "seed",
                    "`seed` must be a non-negative integer",
                ))
            }
            Some(v) => v as u64,
            None => rand_seed(),
        };
        Ok(ImageParams {
            width,
            height,
            n,
            steps,
            guidance_scale,
            negative_prompt: self.negative_prompt.clone(),
            seed,
            step_cache: self.step_cache.unwrap_or(s.step_cache),
        })
    }
}

/// A seed for requests that name none (from the OS-seeded thread RNG of std's hasher).
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish() >> 1
}

/// Each image as base64 PNG.
pub fn b64_pngs(images: &RgbImages) -> Result<Vec<String>, String> {
    (0..images.n)
        .map(|i| {
            encode_png(images, i)
                .map(|png| base64::engine::general_purpose::STANDARD.encode(png))
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Chat content parts (`image_url` with a PNG data URL) for each image.
pub fn image_parts(images: &RgbImages) -> Result<Vec<Value>, String> {
    Ok(b64_pngs(images)?
        .into_iter()
        .map(|b64| {
            json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}})
        })
        .collect())
}

/// `POST /v1/images/generations`: `{"created", "data": [{"b64_json"}], "usage"}`.
pub async fn images_generations(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = (|| {
        let req: ImagesRequest = parse_body(body)?;
        state.check_model(req.model.as_deref())?;
        let prompt = req.prompt().map_err(ApiError::bad)?;
        let orch = state.orchestrator()?;
        let settings = image_settings(&orch.graph)
            .ok_or_else(|| ApiError::from_job(&JobError::UnsupportedOutput(Modality::Image)))?;
        let params = req.fields.resolve(settings).map_err(ApiError::bad)?;
        state.start(NewJob {
            prompt: Prompt::Completion(prompt),
            sampling: SamplingParams::default(),
            outputs: vec![Modality::Image],
            image: Some(params),
            audio: None,
            media: Vec::new(),
            route: RouteRequest::default(),
        })
    })();
    let mut job = match prepared {
        Ok(job) => job,
        Err(e) => return state.fail(e),
    };
    let job_id = job.id.0;
    let mut response = images_response(&state, &mut job).await;
    crate::server::with_request_id(&mut response, job_id);
    response
}

async fn images_response(state: &AppState, job: &mut crate::orchestrator::JobStream) -> Response {
    let mut data = Vec::new();
    loop {
        match job.next().await {
            Some(JobEvent::Images(images)) => match b64_pngs(&images) {
                Ok(pngs) => data.extend(pngs.into_iter().map(|b| json!({"b64_json": b}))),
                Err(e) => {
                    return state.fail(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        format!("cannot encode the image: {e}"),
                        None,
                    ))
                }
            },
            Some(JobEvent::Text { .. } | JobEvent::Audio(_)) => {}
            Some(JobEvent::Finished { usage, .. }) => {
                return Json(json!({
                    "created": unix_now(),
                    "data": data,
                    "usage": {"input_tokens": usage.prompt_tokens, "output_tokens": 0,
                              "total_tokens": usage.prompt_tokens},
                }))
                .into_response();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ImageSettings {
        ImageSettings {
            min_size: 32,
            max_size: 128,
            default_width: 64,
            default_height: 64,
            max_n: 2,
            default_steps: 4,
            max_steps: 8,
            ..ImageSettings::default()
        }
    }

    fn fields(json: &str) -> ImageFields {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_and_explicit_values_resolve() {
        let p = fields("{}").resolve(&settings()).unwrap();
        assert_eq!((p.width, p.height, p.n, p.steps), (64, 64, 1, 4));
        let p = fields(r#"{"size": "128x32", "n": 2, "num_inference_steps": 8, "seed": 5}"#)
            .resolve(&settings())
            .unwrap();
        assert_eq!(
            (p.width, p.height, p.n, p.steps, p.seed),
            (128, 32, 2, 8, 5)
        );
    }

    #[test]
    fn out_of_range_values_say_the_allowed_range() {
        for (json, param, words) in [
            (
                r#"{"size": "40x64"}"#,
                "size",
                "multiple of 16 from 32 to 128",
            ),
            (r#"{"size": "256x64"}"#, "size", "from 32 to 128"),
            (r#"{"size": "big"}"#, "size", "WIDTHxHEIGHT"),
            (r#"{"n": 3}"#, "n", "1 to 2"),
            (r#"{"steps": 0}"#, "steps", "1 to 8"),
            (r#"{"guidance_scale": -1}"#, "guidance_scale", "0 to 100"),
            (
                r#"{"response_format": "url"}"#,
                "response_format",
                "b64_json",
            ),
            (r#"{"seed": -4}"#, "seed", "non-negative"),
        ] {
            let err = fields(json).resolve(&settings()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{json}");
            assert!(err.message.contains(words), "{json}: {}", err.message);
        }
    }
}
