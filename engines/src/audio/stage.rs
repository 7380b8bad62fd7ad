//! The codec stage engine: codec frames in (whole, or streamed chunk by chunk), PCM out as soon
//! as it is decoded. Generic over any [`Codec`]; every step decodes what each running job's
//! stream can decode, batched across jobs where the codec allows.

use super::codec::{Codec, CodecError, CodecStream};
use omnistage_stages::{
    EngineError, EngineStats, FinishReason, JobId, Payload, PcmAudio, StageEngine, StageEvent,
    StageInput, StepWork, Usage,
};
use std::collections::HashMap;

/// One job at the codec stage.
struct CodecJob<S> {
    stream: S,
    /// Frames taken in and not yet reported with `StageEvent::Consumed`.
    unreported: usize,
}

/// Drives a codec for a stage.
pub struct CodecEngine<C: Codec> {
    codec: C,
    jobs: HashMap<JobId, CodecJob<C::Stream>>,
    samples_total: u64,
}

fn invalid(e: CodecError) -> EngineError {
    match e {
        CodecError::InvalidCodes(m) => EngineError::InvalidInput(m),
        other => EngineError::Compute(other.to_string()),
    }
}

impl<C: Codec> CodecEngine<C> {
    pub fn new(codec: C) -> Self {
        Self {
            codec,
            jobs: HashMap::new(),
            samples_total: 0,
        }
    }

    pub fn codec(&self) -> &C {
        &self.codec
    }

    /// The codes of `payloads` as whole frames of this codec (an empty stream is fine).
    fn frames_of(&self, payloads: &[Payload]) -> Result<(Vec<u32>, usize), EngineError> {
        let width = self.codec.info().codes_per_frame;
        let mut codes = Vec::new();
        for p in payloads {
            match p {
                Payload::Codes(c) if c.frames == 0 => {}
                Payload::Codes(c) if c.codes_per_frame == width => {
                    codes.extend_from_slice(&c.codes)
                }
                Payload::Codes(c) => {
                    return Err(EngineError::InvalidInput(format!(
                        "frames of {} codes arrived; this codec takes frames of {width}",
                        c.codes_per_frame
                    )))
                }
                other => {
                    return Err(EngineError::InvalidInput(format!(
                        "a codec stage decodes codec frames, not {}",
                        other.kind()
                    )))
                }
            }
        }
        let frames = codes.len() / width;
        Ok((codes, frames))
    }

    fn sample_rate(&self) -> u32 {
        self.codec.info().sample_rate
    }
}

impl<C: Codec> StageEngine for CodecEngine<C> {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let (codes, frames) = self.frames_of(&input.upstream)?;
        // Seeded requests sound the same every time; others still get a stable seed per job.
        let seed = input.request.audio.as_ref().map_or(job.0, |a| a.seed);
        let mut stream = self.codec.open(seed);
        stream.push(&codes, !input.streaming).map_err(invalid)?;
        self.jobs.insert(
            job,
            CodecJob {
                stream,
                unreported: frames,
            },
        );
        Ok(0)
    }

    fn pending_input(&self, _job: JobId) -> usize {
        0
    }

    fn feed(&mut self, job: JobId, more: Vec<Payload>, last: bool) -> Result<(), EngineError> {
        let (codes, frames) = self.frames_of(&more)?;
        let j = self
            .jobs
            .get_mut(&job)
            .ok_or_else(|| EngineError::InvalidInput(format!("{job} is not at this stage")))?;
        j.stream.push(&codes, last).map_err(invalid)?;
        j.unreported += frames;
        Ok(())
    }

    fn awaiting_input(&self, job: JobId) -> bool {
        self.jobs
            .get(&job)
            .is_some_and(|j| j.unreported == 0 && !j.stream.has_work() && !j.stream.is_done())
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        let mut ids: Vec<JobId> = work
            .iter()
            .map(|w| w.job)
            .filter(|j| self.jobs.contains_key(j))
            .collect();
        ids.sort_unstable();
        for id in &ids {
            if let Some(j) = self.jobs.get_mut(id) {
                if j.unreported > 0 {
                    emit(*id, StageEvent::Consumed(std::mem::take(&mut j.unreported)));
                }
            }
        }
        // Disjoint mutable borrows of the streams with work, in job order.
        let mut streams: Vec<(JobId, &mut C::Stream)> = self
            .jobs
            .iter_mut()
            .filter(|(id, j)| ids.contains(id) && j.stream.has_work())
            .map(|(id, j)| (*id, &mut j.stream))
            .collect();
        if !streams.is_empty() {
            streams.sort_by_key(|(id, _)| *id);
            let (order, mut refs): (Vec<JobId>, Vec<&mut C::Stream>) = streams.into_iter().unzip();
            let samples = self
                .codec
                .step(&mut refs)
                .map_err(|e| EngineError::Compute(e.to_string()))?;
            let rate = self.sample_rate();
            for (id, pcm) in order.into_iter().zip(samples) {
                if pcm.is_empty() {
                    continue;
                }
                self.samples_total += pcm.len() as u64;
                emit(
                    id,
                    StageEvent::Output(vec![Payload::Pcm(PcmAudio {
                        samples: pcm.into(),
                        sample_rate: rate,
                    })]),
                );
            }
        }
        for id in ids {
            if self.jobs.get(&id).is_some_and(|j| j.stream.is_done()) {
                self.jobs.remove(&id);
                emit(
                    id,
                    StageEvent::Finished {
                        reason: FinishReason::Complete,
                        usage: Usage::default(),
                    },
                );
            }
        }
        Ok(())
    }

    fn release(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        0
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            audio_samples_total: self.samples_total,
            ..EngineStats::default()
        }
    }
}
