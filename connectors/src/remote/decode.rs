//! Control messages from untrusted bytes: every count is checked against what remains before
//! anything is allocated, and nothing panics.

use super::encode::*;
use super::{
    FromWorker, RefuseReason, RemoteError, ToWorker, WorkerStats, DIR_FROM_WORKER, DIR_TO_WORKER,
    HEADER_LEN, MAGIC, VERSION,
};
use crate::wire;
use omnistage_stages::{
    AudioParams, ChatMessage, ContentPart, EngineError, EngineStats, FinishReason, ImageParams,
    JobId, JobRequest, MediaData, MediaDigest, MediaInput, MessageContent, Modality, Payload,
    Prompt, RouteRequest, SamplingParams, StageEvent, StageInput, Usage,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Smallest encoded payload: its length prefix and the `wire` header.
const MIN_PAYLOAD: usize = 8 + wire::HEADER_LEN;
/// Smallest encoded media item: digest, length prefix, `wire` header.
const MIN_MEDIA: usize = 32 + MIN_PAYLOAD;
/// Smallest encoded chat message: empty role, content tag, empty text.
const MIN_MESSAGE: usize = 8 + 1 + 8;

/// Decodes one gateway → worker message; `buf` must hold exactly one.
pub fn decode_to_worker(buf: &[u8]) -> Result<ToWorker, RemoteError> {
    let (tag, mut r) = Reader::open(buf, DIR_TO_WORKER)?;
    let msg = match tag {
        TW_SUBMIT => ToWorker::Submit {
            job: r.job()?,
            input: r.stage_input()?,
        },
        TW_FEED => ToWorker::Feed {
            job: r.job()?,
            payloads: r.payloads()?,
            last: r.flag()?,
        },
        TW_CANCEL => ToWorker::Cancel { job: r.job()? },
        TW_HOLD => ToWorker::Hold {
            job: r.job()?,
            held: r.flag()?,
        },
        TW_STATS => ToWorker::StatsRequest,
        TW_SHUTDOWN => ToWorker::Shutdown,
        tag => return Err(unknown("message", tag)),
    };
    r.finish()?;
    Ok(msg)
}

/// Decodes one worker → gateway message; `buf` must hold exactly one.
pub fn decode_from_worker(buf: &[u8]) -> Result<FromWorker, RemoteError> {
    let (tag, mut r) = Reader::open(buf, DIR_FROM_WORKER)?;
    let msg = match tag {
        FW_EVENT => FromWorker::Event {
            job: r.job()?,
            event: r.event()?,
        },
        FW_STATS => FromWorker::Stats(r.stats()?),
        FW_READY => FromWorker::Ready {
            stage: r.string()?,
            replica: r.usize()?,
        },
        FW_REFUSED => FromWorker::Refused {
            job: r.job()?,
            reason: match r.u8()? {
                REFUSE_QUEUE_FULL => RefuseReason::QueueFull {
                    capacity: r.usize()?,
                },
                REFUSE_STOPPED => RefuseReason::Stopped,
                tag => return Err(unknown("refusal reason", tag)),
            },
        },
        tag => return Err(unknown("message", tag)),
    };
    r.finish()?;
    Ok(msg)
}

fn unknown(what: &'static str, tag: u8) -> RemoteError {
    RemoteError::UnknownTag { what, tag }
}

/// Bounds-checked cursor over untrusted bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Checks the header; returns the message tag and a reader over the body.
    fn open(buf: &'a [u8], direction: u8) -> Result<(u8, Self), RemoteError> {
        let mut r = Reader { buf, pos: 0 };
        let head = r.take(HEADER_LEN)?;
        if head[0..4] != MAGIC {
            return Err(RemoteError::BadMagic);
        }
        let version = u16::from_le_bytes([head[4], head[5]]);
        if version != VERSION {
            return Err(RemoteError::UnsupportedVersion(version));
        }
        if head[6] != direction {
            return Err(RemoteError::Direction {
                expected: direction,
                found: head[6],
            });
        }
        Ok((head[7], r))
    }

    fn finish(&self) -> Result<(), RemoteError> {
        let n = self.remaining();
        (n == 0).then_some(()).ok_or(RemoteError::TrailingBytes(n))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], RemoteError> {
        let available = self.remaining();
        if n > available {
            return Err(RemoteError::Truncated {
                needed: n as u64,
                available,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RemoteError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RemoteError> {
        Ok(self.take(1)?[0])
    }

    fn flag(&mut self) -> Result<bool, RemoteError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(RemoteError::BadFlag(other)),
        }
    }

    fn u32(&mut self) -> Result<u32, RemoteError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, RemoteError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn usize(&mut self) -> Result<usize, RemoteError> {
        usize::try_from(self.u64()?).map_err(|_| RemoteError::Overflow("value exceeds usize"))
    }

    fn f64(&mut self) -> Result<f64, RemoteError> {
        self.u64().map(f64::from_bits)
    }

    fn job(&mut self) -> Result<JobId, RemoteError> {
        Ok(JobId(self.u64()?))
    }

    /// A count of items that take at least `min` bytes each, which must fit in what is left.
    fn count(&mut self, min: usize) -> Result<usize, RemoteError> {
        let n = self.u64()?;
        let available = self.remaining();
        let bytes = n
            .checked_mul(min as u64)
            .ok_or(RemoteError::Overflow("count"))?;
        if bytes > available as u64 {
            return Err(RemoteError::Truncated {
                needed: bytes,
                available,
            });
        }
        usize::try_from(n).map_err(|_| RemoteError::Overflow("count"))
    }

    /// `count` items read by `f` (the count is checked against `min` bytes per item first).
    fn list<T>(
        &mut self,
        min: usize,
        mut f: impl FnMut(&mut Self) -> Result<T, RemoteError>,
    ) -> Result<Vec<T>, RemoteError> {
        let n = self.count(min)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(f(self)?);
        }
        Ok(out)
    }

    fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, RemoteError>,
    ) -> Result<Option<T>, RemoteError> {
        Ok(if self.flag()? { Some(f(self)?) } else { None })
    }

    fn string(&mut self) -> Result<String, RemoteError> {
        let n = self.count(1)?;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| RemoteError::InvalidUtf8)
    }

    fn payload(&mut self) -> Result<Payload, RemoteError> {
        let n = self.count(1)?;
        Ok(wire::decode(self.take(n)?)?)
    }

    fn payloads(&mut self) -> Result<Vec<Payload>, RemoteError> {
        self.list(MIN_PAYLOAD, Self::payload)
    }

    fn media(&mut self) -> Result<MediaInput, RemoteError> {
        let digest = MediaDigest(self.array()?);
        let data = match self.payload()? {
            Payload::Image(i) if i.n != 1 || i.width == 0 || i.height == 0 => {
                return Err(RemoteError::InvalidMedia(
                    "an image item holds one non-empty image",
                ))
            }
            Payload::Image(i) => MediaData::Image(i),
            Payload::Pcm(a) if a.samples.is_empty() || a.sample_rate == 0 => {
                return Err(RemoteError::InvalidMedia(
                    "an audio item needs samples and a sample rate",
                ))
            }
            Payload::Pcm(a) => MediaData::Audio(a),
            _ => {
                return Err(RemoteError::InvalidMedia(
                    "a media item is an image or pcm payload",
                ))
            }
        };
        Ok(MediaInput { data, digest })
    }

    fn stage_input(&mut self) -> Result<StageInput, RemoteError> {
        Ok(StageInput {
            request: Arc::new(self.request()?),
            upstream: self.payloads()?,
            client_facing: self.flag()?,
            streaming: self.flag()?,
        })
    }

    fn request(&mut self) -> Result<JobRequest, RemoteError> {
        let id = self.job()?;
        let prompt = self.prompt()?;
        let sampling = SamplingParams {
            temperature: self.opt(Self::f64)?,
            top_p: self.opt(Self::f64)?,
            top_k: self.opt(Self::usize)?,
            seed: self.opt(Self::u64)?,
            max_tokens: self.opt(Self::usize)?,
            repetition_penalty: self.opt(|r| r.u32().map(f32::from_bits))?,
            stop: self.list(8, Self::string)?,
            stop_token_ids: self.list(4, Self::u32)?,
            ignore_eos: self.flag()?,
        };
        let outputs = self.list(1, Self::modality)?;
        let left = Duration::from_millis(self.u64()?);
        let deadline = Instant::now()
            .checked_add(left)
            .ok_or(RemoteError::Overflow("deadline"))?;
        let image = self.opt(|r| {
            Ok(ImageParams {
                width: r.usize()?,
                height: r.usize()?,
                n: r.usize()?,
                steps: r.usize()?,
                guidance_scale: r.f64()?,
                negative_prompt: r.opt(Self::string)?,
                seed: r.u64()?,
                step_cache: r.flag()?,
            })
        })?;
        let audio = self.opt(|r| {
            Ok(AudioParams {
                voice: r.string()?,
                seed: r.u64()?,
            })
        })?;
        let media = self.list(MIN_MEDIA, Self::media)?;
        let route = RouteRequest {
            model: self.opt(Self::string)?,
            k: self.opt(Self::usize)?,
        };
        Ok(JobRequest {
            id,
            prompt,
            sampling,
            outputs,
            deadline,
            image,
            audio,
            media,
            route,
        })
    }

    fn modality(&mut self) -> Result<Modality, RemoteError> {
        match self.u8()? {
            MODALITY_TEXT => Ok(Modality::Text),
            MODALITY_IMAGE => Ok(Modality::Image),
            MODALITY_AUDIO => Ok(Modality::Audio),
            tag => Err(unknown("modality", tag)),
        }
    }

    fn prompt(&mut self) -> Result<Prompt, RemoteError> {
        Ok(match self.u8()? {
            PROMPT_CHAT => Prompt::Chat(self.list(MIN_MESSAGE, Self::message)?),
            PROMPT_COMPLETION => Prompt::Completion(self.string()?),
            PROMPT_TOKENS => Prompt::Tokens(self.list(4, Self::u32)?),
            PROMPT_SPEAK => Prompt::Speak(self.string()?),
            tag => return Err(unknown("prompt", tag)),
        })
    }

    fn message(&mut self) -> Result<ChatMessage, RemoteError> {
        let role = self.string()?;
        let content = match self.u8()? {
            CONTENT_TEXT => MessageContent::Text(self.string()?),
            CONTENT_PARTS => MessageContent::Parts(self.list(1, Self::part)?),
            tag => return Err(unknown("message content", tag)),
        };
        Ok(ChatMessage { role, content })
    }

    fn part(&mut self) -> Result<ContentPart, RemoteError> {
        Ok(match self.u8()? {
            PART_TEXT => ContentPart::Text {
                text: self.string()?,
            },
            PART_IMAGE => ContentPart::Image,
            PART_AUDIO => ContentPart::Audio,
            tag => return Err(unknown("content part", tag)),
        })
    }

    fn event(&mut self) -> Result<StageEvent, RemoteError> {
        Ok(match self.u8()? {
            EVENT_ADMITTED => StageEvent::Admitted,
            EVENT_OUTPUT => StageEvent::Output(self.payloads()?),
            EVENT_CONSUMED => StageEvent::Consumed(self.usize()?),
            EVENT_FINISHED => StageEvent::Finished {
                reason: match self.u8()? {
                    FINISH_STOP => FinishReason::Stop,
                    FINISH_LENGTH => FinishReason::Length,
                    FINISH_COMPLETE => FinishReason::Complete,
                    tag => return Err(unknown("finish reason", tag)),
                },
                usage: Usage {
                    prompt_tokens: self.usize()?,
                    completion_tokens: self.usize()?,
                },
            },
            EVENT_FAILED => StageEvent::Failed(match self.u8()? {
                ERROR_INVALID_INPUT => EngineError::InvalidInput(self.string()?),
                ERROR_COMPUTE => EngineError::Compute(self.string()?),
                ERROR_UNAVAILABLE => EngineError::Unavailable(self.string()?),
                tag => return Err(unknown("engine error", tag)),
            }),
            tag => return Err(unknown("stage event", tag)),
        })
    }

    fn stats(&mut self) -> Result<WorkerStats, RemoteError> {
        Ok(WorkerStats {
            waiting: self.usize()?,
            running: self.usize()?,
            state_bytes: self.usize()?,
            steps_total: self.u64()?,
            engine: EngineStats {
                state_bytes: self.usize()?,
                kv_blocks_used: self.usize()?,
                kv_blocks_total: self.usize()?,
                kv_blocks_cached: self.usize()?,
                preemptions_total: self.u64()?,
                prefix_query_tokens_total: self.u64()?,
                prefix_hit_tokens_total: self.u64()?,
                denoise_image_steps_total: self.u64()?,
                denoise_cached_image_steps_total: self.u64()?,
                denoise_forwards_total: self.u64()?,
                denoise_rows_total: self.u64()?,
                images_total: self.u64()?,
                audio_samples_total: self.u64()?,
                media_encoded_total: self.u64()?,
                encoder_cache_queries_total: self.u64()?,
                encoder_cache_hits_total: self.u64()?,
                mot_boundaries_total: self.u64()?,
                mot_boundary_wait_us_total: self.u64()?,
            },
        })
    }
}
