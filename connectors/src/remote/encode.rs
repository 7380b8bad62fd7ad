//! Control messages to bytes, and the tags both directions share.

use super::{
    FromWorker, RefuseReason, RemoteError, ToWorker, WorkerStats, DIR_FROM_WORKER, DIR_TO_WORKER,
    MAGIC, VERSION,
};
use crate::wire;
use omnistage_stages::{
    ContentPart, EngineError, EngineStats, FinishReason, JobRequest, MediaData, MediaInput,
    MessageContent, Modality, Payload, Prompt, StageEvent, StageInput,
};
use std::time::Instant;

// Message tags, per direction.
pub(super) const TW_SUBMIT: u8 = 1;
pub(super) const TW_FEED: u8 = 2;
pub(super) const TW_CANCEL: u8 = 3;
pub(super) const TW_HOLD: u8 = 4;
pub(super) const TW_STATS: u8 = 5;
pub(super) const TW_SHUTDOWN: u8 = 6;
pub(super) const FW_EVENT: u8 = 1;
pub(super) const FW_STATS: u8 = 2;
pub(super) const FW_READY: u8 = 3;
pub(super) const FW_REFUSED: u8 = 4;

// Field enums.
pub(super) const PROMPT_CHAT: u8 = 1;
pub(super) const PROMPT_COMPLETION: u8 = 2;
pub(super) const PROMPT_TOKENS: u8 = 3;
pub(super) const PROMPT_SPEAK: u8 = 4;
pub(super) const CONTENT_TEXT: u8 = 1;
pub(super) const CONTENT_PARTS: u8 = 2;
pub(super) const PART_TEXT: u8 = 1;
pub(super) const PART_IMAGE: u8 = 2;
pub(super) const PART_AUDIO: u8 = 3;
pub(super) const MODALITY_TEXT: u8 = 1;
pub(super) const MODALITY_IMAGE: u8 = 2;
pub(super) const MODALITY_AUDIO: u8 = 3;
pub(super) const EVENT_ADMITTED: u8 = 1;
pub(super) const EVENT_OUTPUT: u8 = 2;
pub(super) const EVENT_CONSUMED: u8 = 3;
pub(super) const EVENT_FINISHED: u8 = 4;
pub(super) const EVENT_FAILED: u8 = 5;
pub(super) const FINISH_STOP: u8 = 1;
pub(super) const FINISH_LENGTH: u8 = 2;
pub(super) const FINISH_COMPLETE: u8 = 3;
pub(super) const ERROR_INVALID_INPUT: u8 = 1;
pub(super) const ERROR_COMPUTE: u8 = 2;
pub(super) const ERROR_UNAVAILABLE: u8 = 3;
pub(super) const REFUSE_QUEUE_FULL: u8 = 1;
pub(super) const REFUSE_STOPPED: u8 = 2;

/// Encodes a gateway → worker message. Fails only when a payload or media item is inconsistent
/// (its shape fields disagree with its data).
pub fn encode_to_worker(msg: &ToWorker) -> Result<Vec<u8>, RemoteError> {
    let tag = match msg {
        ToWorker::Submit { .. } => TW_SUBMIT,
        ToWorker::Feed { .. } => TW_FEED,
        ToWorker::Cancel { .. } => TW_CANCEL,
        ToWorker::Hold { .. } => TW_HOLD,
        ToWorker::StatsRequest => TW_STATS,
        ToWorker::Shutdown => TW_SHUTDOWN,
    };
    let mut w = Writer::new(DIR_TO_WORKER, tag);
    match msg {
        ToWorker::Submit { job, input } => {
            w.u64(job.0);
            w.stage_input(input)?;
        }
        ToWorker::Feed {
            job,
            payloads,
            last,
        } => {
            w.u64(job.0);
            w.payloads(payloads)?;
            w.flag(*last);
        }
        ToWorker::Cancel { job } => w.u64(job.0),
        ToWorker::Hold { job, held } => {
            w.u64(job.0);
            w.flag(*held);
        }
        ToWorker::StatsRequest | ToWorker::Shutdown => {}
    }
    Ok(w.buf)
}

/// Encodes a worker → gateway message. Fails only when an output payload is inconsistent.
pub fn encode_from_worker(msg: &FromWorker) -> Result<Vec<u8>, RemoteError> {
    let tag = match msg {
        FromWorker::Event { .. } => FW_EVENT,
        FromWorker::Stats(_) => FW_STATS,
        FromWorker::Ready { .. } => FW_READY,
        FromWorker::Refused { .. } => FW_REFUSED,
    };
    let mut w = Writer::new(DIR_FROM_WORKER, tag);
    match msg {
        FromWorker::Event { job, event } => {
            w.u64(job.0);
            w.event(event)?;
        }
        FromWorker::Stats(s) => w.stats(s),
        FromWorker::Ready { stage, replica } => {
            w.str(stage);
            w.usize(*replica);
        }
        FromWorker::Refused { job, reason } => {
            w.u64(job.0);
            match reason {
                RefuseReason::QueueFull { capacity } => {
                    w.u8(REFUSE_QUEUE_FULL);
                    w.usize(*capacity);
                }
                RefuseReason::Stopped => w.u8(REFUSE_STOPPED),
            }
        }
    }
    Ok(w.buf)
}

/// Appends fields to a growing buffer.
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn new(direction: u8, tag: u8) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&[direction, tag]);
        Self { buf }
    }

    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    fn flag(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }

    fn str(&mut self, s: &str) {
        self.usize(s.len());
        self.buf.extend_from_slice(s.as_bytes());
    }

    fn opt<T>(&mut self, v: Option<T>, mut f: impl FnMut(&mut Self, T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v);
            }
        }
    }

    /// A payload in the `wire` format, length-prefixed, written in place (no second copy).
    fn payload(&mut self, p: &Payload) -> Result<(), RemoteError> {
        let n = wire::encoded_len(p);
        self.usize(n);
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        let written = wire::encode_into(p, &mut self.buf[start..])?;
        debug_assert_eq!(written, n);
        Ok(())
    }

    fn payloads(&mut self, ps: &[Payload]) -> Result<(), RemoteError> {
        self.usize(ps.len());
        ps.iter().try_for_each(|p| self.payload(p))
    }

    fn media(&mut self, m: &MediaInput) -> Result<(), RemoteError> {
        // Refuse what the decoder would refuse, so a bad item fails at the sender.
        let payload = match &m.data {
            MediaData::Image(i) if i.n != 1 || i.width == 0 || i.height == 0 => {
                return Err(RemoteError::InvalidMedia(
                    "an image item holds one non-empty image",
                ))
            }
            MediaData::Image(i) => Payload::Image(i.clone()),
            MediaData::Audio(a) if a.samples.is_empty() || a.sample_rate == 0 => {
                return Err(RemoteError::InvalidMedia(
                    "an audio item needs samples and a sample rate",
                ))
            }
            MediaData::Audio(a) => Payload::Pcm(a.clone()),
        };
        self.buf.extend_from_slice(&m.digest.0);
        self.payload(&payload)
    }

    fn stage_input(&mut self, input: &StageInput) -> Result<(), RemoteError> {
        self.request(&input.request)?;
        self.payloads(&input.upstream)?;
        self.flag(input.client_facing);
        self.flag(input.streaming);
        Ok(())
    }

    fn request(&mut self, r: &JobRequest) -> Result<(), RemoteError> {
        self.u64(r.id.0);
        self.prompt(&r.prompt);
        let s = &r.sampling;
        self.opt(s.temperature, |w, v| w.u64(v.to_bits()));
        self.opt(s.top_p, |w, v| w.u64(v.to_bits()));
        self.opt(s.top_k, Self::usize);
        self.opt(s.seed, Self::u64);
        self.opt(s.max_tokens, Self::usize);
        self.opt(s.repetition_penalty, |w, v| w.u32(v.to_bits()));
        self.usize(s.stop.len());
        for stop in &s.stop {
            self.str(stop);
        }
        self.usize(s.stop_token_ids.len());
        for id in &s.stop_token_ids {
            self.u32(*id);
        }
        self.flag(s.ignore_eos);
        self.usize(r.outputs.len());
        for m in &r.outputs {
            self.u8(match m {
                Modality::Text => MODALITY_TEXT,
                Modality::Image => MODALITY_IMAGE,
                Modality::Audio => MODALITY_AUDIO,
            });
        }
        let left = r.deadline.saturating_duration_since(Instant::now());
        self.u64(u64::try_from(left.as_millis()).unwrap_or(u64::MAX));
        self.opt(r.image.as_ref(), |w, i| {
            for v in [i.width, i.height, i.n, i.steps] {
                w.usize(v);
            }
            w.u64(i.guidance_scale.to_bits());
            w.opt(i.negative_prompt.as_deref(), Self::str);
            w.u64(i.seed);
            w.flag(i.step_cache);
        });
        self.opt(r.audio.as_ref(), |w, a| {
            w.str(&a.voice);
            w.u64(a.seed);
        });
        self.usize(r.media.len());
        r.media.iter().try_for_each(|m| self.media(m))?;
        self.opt(r.route.model.as_deref(), Self::str);
        self.opt(r.route.k, Self::usize);
        Ok(())
    }

    fn prompt(&mut self, p: &Prompt) {
        match p {
            Prompt::Chat(messages) => {
                self.u8(PROMPT_CHAT);
                self.usize(messages.len());
                for m in messages {
                    self.str(&m.role);
                    match &m.content {
                        MessageContent::Text(t) => {
                            self.u8(CONTENT_TEXT);
                            self.str(t);
                        }
                        MessageContent::Parts(parts) => {
                            self.u8(CONTENT_PARTS);
                            self.usize(parts.len());
                            for part in parts {
                                match part {
                                    ContentPart::Text { text } => {
                                        self.u8(PART_TEXT);
                                        self.str(text);
                                    }
                                    ContentPart::Image => self.u8(PART_IMAGE),
                                    ContentPart::Audio => self.u8(PART_AUDIO),
                                }
                            }
                        }
                    }
                }
            }
            Prompt::Completion(t) => {
                self.u8(PROMPT_COMPLETION);
                self.str(t);
            }
            Prompt::Tokens(ids) => {
                self.u8(PROMPT_TOKENS);
                self.usize(ids.len());
                for id in ids {
                    self.u32(*id);
                }
            }
            Prompt::Speak(t) => {
                self.u8(PROMPT_SPEAK);
                self.str(t);
            }
        }
    }

    fn event(&mut self, e: &StageEvent) -> Result<(), RemoteError> {
        match e {
            StageEvent::Admitted => self.u8(EVENT_ADMITTED),
            StageEvent::Output(payloads) => {
                self.u8(EVENT_OUTPUT);
                self.payloads(payloads)?;
            }
            StageEvent::Consumed(n) => {
                self.u8(EVENT_CONSUMED);
                self.usize(*n);
            }
            StageEvent::Finished { reason, usage } => {
                self.u8(EVENT_FINISHED);
                self.u8(match reason {
                    FinishReason::Stop => FINISH_STOP,
                    FinishReason::Length => FINISH_LENGTH,
                    FinishReason::Complete => FINISH_COMPLETE,
                });
                self.usize(usage.prompt_tokens);
                self.usize(usage.completion_tokens);
            }
            StageEvent::Failed(err) => {
                self.u8(EVENT_FAILED);
                let (tag, msg) = match err {
                    EngineError::InvalidInput(m) => (ERROR_INVALID_INPUT, m),
                    EngineError::Compute(m) => (ERROR_COMPUTE, m),
                    EngineError::Unavailable(m) => (ERROR_UNAVAILABLE, m),
                };
                self.u8(tag);
                self.str(msg);
            }
        }
        Ok(())
    }

    fn stats(&mut self, s: &WorkerStats) {
        self.usize(s.waiting);
        self.usize(s.running);
        self.usize(s.state_bytes);
        self.u64(s.steps_total);
        let e: &EngineStats = &s.engine;
        for v in [
            e.state_bytes,
            e.kv_blocks_used,
            e.kv_blocks_total,
            e.kv_blocks_cached,
        ] {
            self.usize(v);
        }
        for v in [
            e.preemptions_total,
            e.prefix_query_tokens_total,
            e.prefix_hit_tokens_total,
            e.denoise_image_steps_total,
            e.denoise_cached_image_steps_total,
            e.denoise_forwards_total,
            e.denoise_rows_total,
            e.images_total,
            e.audio_samples_total,
            e.media_encoded_total,
            e.encoder_cache_queries_total,
            e.encoder_cache_hits_total,
            e.mot_boundaries_total,
            e.mot_boundary_wait_us_total,
        ] {
            self.u64(v);
        }
    }
}
