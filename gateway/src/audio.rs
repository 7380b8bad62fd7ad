//! Speech out: `POST /v1/audio/speech`, the `audio` options of chat completions, and the WAV and
//! PCM encodings of generated audio.
//!
//! Audio leaves as 16-bit little-endian mono PCM at the codec's sample rate: inside a WAV file
//! (written with `hound`), or raw (`pcm`/`pcm16`). A streamed WAV starts with a header whose
//! size fields say "unknown length" (0xFFFFFFFF), as streaming WAV writers do, followed by the
//! samples as the codec decodes them.

use crate::openai::BadRequest;
use crate::server::{parse_body, with_request_id, ApiError, AppState, NewJob};
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream;
use omnistage_stages::deploy::{DeployGraph, TalkerSettings, DEFAULT_VOICE};
use omnistage_stages::{AudioParams, Modality, Prompt, RouteRequest, SamplingParams};
use serde::Deserialize;
use std::convert::Infallible;
use std::io::Cursor;

/// Longest `input` `/v1/audio/speech` accepts, in characters (OpenAI's limit).
pub const MAX_SPEECH_INPUT_CHARS: usize = 4096;

/// How audio is encoded for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    Wav,
    /// Raw 16-bit little-endian mono samples.
    Pcm16,
}

impl AudioFormat {
    fn parse(name: &str, param: &str) -> Result<Self, BadRequest> {
        match name {
            "wav" => Ok(AudioFormat::Wav),
            "pcm" | "pcm16" => Ok(AudioFormat::Pcm16),
            other => Err(BadRequest::new(
                param,
                format!("unsupported audio format `{other}`; use wav or pcm16"),
            )),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Pcm16 => "audio/pcm",
        }
    }
}

/// The `audio` object of a chat completion request (OpenAI's shape).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioFields {
    pub voice: Option<String>,
    pub format: Option<String>,
}

/// The talker whose voices a deployment speaks with: the first stage with a `[stage.talker]`
/// table, if any.
pub fn talker(graph: &DeployGraph) -> Option<&TalkerSettings> {
    graph.stages.iter().find_map(|s| s.talker.as_ref())
}

/// Checks a requested voice against the deployment's; `None` means `default`.
pub fn resolve_voice(
    graph: &DeployGraph,
    voice: Option<&str>,
    param: &str,
) -> Result<String, BadRequest> {
    let voice = voice.unwrap_or(DEFAULT_VOICE);
    let talker = talker(graph);
    let known = match talker {
        Some(t) => t.voices.contains_key(voice),
        None => voice == DEFAULT_VOICE,
    };
    if known {
        return Ok(voice.to_string());
    }
    let names = talker.map_or_else(|| DEFAULT_VOICE.to_string(), |t| t.voice_names());
    Err(BadRequest::new(
        param,
        format!("unknown voice `{voice}`; this deployment has: {names}"),
    ))
}

/// The audio settings of a request: its voice, and a seed for the talker's sampler and the
/// codec's noise (the request's sampling seed when given, so a seeded request sounds the same
/// every time; else a fresh random one).
pub fn audio_params(voice: String, seed: Option<u64>) -> AudioParams {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` is seeded from the OS per instance: a fresh random value without a
    // process-wide generator.
    let seed = seed.unwrap_or_else(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    AudioParams { voice, seed }
}

impl AudioFields {
    /// The chat request's voice and format, checked.
    pub fn resolve(
        fields: Option<&AudioFields>,
        graph: &DeployGraph,
    ) -> Result<(String, AudioFormat), BadRequest> {
        let voice = resolve_voice(
            graph,
            fields.and_then(|f| f.voice.as_deref()),
            "audio.voice",
        )?;
        let format = match fields.and_then(|f| f.format.as_deref()) {
            None => AudioFormat::Wav,
            Some(f) => AudioFormat::parse(f, "audio.format")?,
        };
        Ok((voice, format))
    }
}

/// Samples as 16-bit little-endian PCM (clamped to [-1, 1]).
pub fn pcm16_bytes(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|s| to_i16(*s).to_le_bytes())
        .collect()
}

fn to_i16(s: f32) -> i16 {
    let s = if s.is_finite() {
        s.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    (s * f32::from(i16::MAX)).round() as i16
}

fn wav_spec(sample_rate: u32) -> hound::WavSpec {
    hound::WavSpec {
        channels: 1,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    }
}

/// A whole WAV file of the samples.
pub fn wav_bytes(samples: &[f32], sample_rate: u32) -> Result<Vec<u8>, String> {
    let mut out = Cursor::new(Vec::new());
    let mut w =
        hound::WavWriter::new(&mut out, wav_spec(sample_rate)).map_err(|e| e.to_string())?;
    for s in samples {
        w.write_sample(to_i16(*s)).map_err(|e| e.to_string())?;
    }
    w.finalize().map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

/// The header of a streamed WAV: hound's header for no samples, with the RIFF and data sizes set
/// to "unknown" (0xFFFFFFFF).
pub fn wav_stream_header(sample_rate: u32) -> Result<Vec<u8>, String> {
    let mut header = wav_bytes(&[], sample_rate)?;
    let data_at = header
        .windows(4)
        .position(|w| w == b"data")
        .ok_or("hound wrote no data chunk")?;
    header[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    header[data_at + 4..data_at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    Ok(header)
}

/// `POST /v1/audio/speech` (OpenAI's shape; `stream` is our extension, as vLLM-Omni's).
#[derive(Debug, Deserialize)]
pub struct SpeechRequest {
    pub model: Option<String>,
    pub input: Option<String>,
    pub voice: Option<String>,
    pub response_format: Option<String>,
    pub speed: Option<f64>,
    #[serde(default)]
    pub stream: bool,
    pub seed: Option<u64>,
}

pub async fn speech(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = (|| {
        let req: SpeechRequest = parse_body(body)?;
        state.check_model(req.model.as_deref())?;
        let input = req.input.clone().unwrap_or_default();
        if input.trim().is_empty() {
            return Err(ApiError::bad(BadRequest::new(
                "input",
                "input must not be empty",
            )));
        }
        if input.chars().count() > MAX_SPEECH_INPUT_CHARS {
            return Err(ApiError::bad(BadRequest::new(
                "input",
                format!("input is longer than {MAX_SPEECH_INPUT_CHARS} characters"),
            )));
        }
        if req.speed.is_some_and(|s| s != 1.0) {
            return Err(ApiError::bad(BadRequest::new(
                "speed",
                "only speed 1.0 is supported",
            )));
        }
        let format = match req.response_format.as_deref() {
            None => AudioFormat::Wav,
            Some(f) => AudioFormat::parse(f, "response_format").map_err(ApiError::bad)?,
        };
        let orch = state.orchestrator()?;
        let voice =
            resolve_voice(&orch.graph, req.voice.as_deref(), "voice").map_err(ApiError::bad)?;
        let sampling = SamplingParams {
            seed: req.seed,
            ..SamplingParams::default()
        };
        let audio = audio_params(voice, req.seed);
        let job = state.start(NewJob {
            prompt: Prompt::Speak(input),
            sampling,
            outputs: vec![Modality::Audio],
            image: None,
            audio: Some(audio),
            media: Vec::new(),
            route: RouteRequest::default(),
        })?;
        Ok::<_, ApiError>((job, format, req.stream))
    })();
    let (mut job, format, streamed) = match prepared {
        Ok(p) => p,
        Err(e) => return state.fail(e),
    };
    let job_id = job.id.0;
    let mut response = if streamed {
        stream_speech(job, format)
    } else {
        collect_speech(&state, &mut job, format).await
    };
    with_request_id(&mut response, job_id);
    response
}

async fn collect_speech(
    state: &AppState,
    job: &mut crate::orchestrator::JobStream,
    format: AudioFormat,
) -> Response {
    use crate::orchestrator::JobEvent;
    let mut samples = Vec::new();
    let mut rate = 0;
    loop {
        match job.next().await {
            Some(JobEvent::Audio(pcm)) => {
                rate = pcm.sample_rate;
                samples.extend_from_slice(&pcm.samples);
            }
            Some(JobEvent::Text { .. } | JobEvent::Images(_)) => {}
            Some(JobEvent::Finished { .. }) => break,
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
    let bytes = match format {
        AudioFormat::Pcm16 => pcm16_bytes(&samples),
        AudioFormat::Wav => match wav_bytes(&samples, rate.max(1)) {
            Ok(b) => b,
            Err(e) => return state.fail(encoding_error(e)),
        },
    };
    ([(header::CONTENT_TYPE, format.content_type())], bytes).into_response()
}

pub(crate) fn encoding_error(message: String) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        format!("cannot encode the audio: {message}"),
        None,
    )
}

/// Streams audio bytes as the codec decodes them (a WAV header first for `wav`). A failure after
/// the first bytes ends the body early: the status line is already sent; the request's trace
/// records the outcome.
fn stream_speech(job: crate::orchestrator::JobStream, format: AudioFormat) -> Response {
    use crate::orchestrator::JobEvent;
    struct S {
        job: crate::orchestrator::JobStream,
        header_sent: bool,
        done: bool,
    }
    let s = S {
        job,
        header_sent: format == AudioFormat::Pcm16,
        done: false,
    };
    let body = stream::unfold(s, move |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            match s.job.next().await {
                Some(JobEvent::Audio(pcm)) => {
                    let mut bytes = Vec::new();
                    if !s.header_sent {
                        s.header_sent = true;
                        match wav_stream_header(pcm.sample_rate) {
                            Ok(h) => bytes = h,
                            Err(e) => {
                                tracing::error!("cannot write a WAV header: {e}");
                                return None;
                            }
                        }
                    }
                    bytes.extend(pcm16_bytes(&pcm.samples));
                    return Some((Ok::<_, Infallible>(Bytes::from(bytes)), s));
                }
                Some(JobEvent::Text { .. } | JobEvent::Images(_)) => continue,
                Some(JobEvent::Finished { .. }) | None => s.done = true,
                Some(JobEvent::Failed(err)) => {
                    tracing::warn!(error = %err, "streamed speech failed after its response started");
                    s.done = true;
                }
            }
        }
    });
    (
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_round_trips_through_hound_and_the_stream_header_says_unknown_length() {
        let samples = [0.0, 0.5, -0.5, 1.0, -1.0, 2.0];
        let wav = wav_bytes(&samples, 24_000).unwrap();
        let mut r = hound::WavReader::new(Cursor::new(wav)).unwrap();
        assert_eq!(r.spec().sample_rate, 24_000);
        let back: Vec<i16> = r.samples::<i16>().map(Result::unwrap).collect();
        assert_eq!(back, vec![0, 16384, -16384, 32767, -32767, 32767]);
        let header = wav_stream_header(24_000).unwrap();
        assert_eq!(&header[0..4], b"RIFF");
        assert_eq!(&header[4..8], &[0xFF; 4]);
        assert_eq!(&header[header.len() - 4..], &[0xFF; 4]);
        assert_eq!(pcm16_bytes(&[0.5]), 16384i16.to_le_bytes().to_vec());
    }

    #[test]
    fn formats_parse_and_unknown_ones_list_the_supported() {
        assert_eq!(AudioFormat::parse("wav", "f").unwrap(), AudioFormat::Wav);
        assert_eq!(AudioFormat::parse("pcm", "f").unwrap(), AudioFormat::Pcm16);
        let err = AudioFormat::parse("mp3", "response_format").unwrap_err();
        assert!(err.message.contains("wav or pcm16"), "{}", err.message);
    }
}
