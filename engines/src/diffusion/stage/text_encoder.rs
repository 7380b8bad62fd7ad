//! The text-encoder stage engine: encodes a job's prompt (and, for classifier-free guidance, its
//! negative prompt) in one batch with every other job of the step, and hands the conditioning on.

use crate::diffusion::text::PromptEncoder;
use omnistage_stages::{
    Conditioning, EngineError, FinishReason, JobId, Payload, Prompt, StageEngine, StageEvent,
    StageInput, StepWork, Usage,
};
use std::collections::HashMap;
use std::sync::Arc;

struct EncodeJob {
    prompt: String,
    negative: Option<String>,
    prompt_tokens: usize,
}

/// Static batching: each step encodes every job it is given, whole.
pub struct TextEncoderEngine<E: PromptEncoder> {
    encoder: E,
    jobs: HashMap<JobId, EncodeJob>,
}

impl<E: PromptEncoder> TextEncoderEngine<E> {
    pub fn new(encoder: E) -> Self {
        Self {
            encoder,
            jobs: HashMap::new(),
        }
    }

    pub fn encoder(&self) -> &E {
        &self.encoder
    }
}

/// The text to encode: the completion prompt, or the last user message of a chat.
fn prompt_text(input: &StageInput) -> Result<String, EngineError> {
    if let Some(Payload::Text(t)) = input
        .upstream
        .iter()
        .find(|p| matches!(p, Payload::Text(_)))
    {
        return Ok(t.to_string());
    }
    match &input.request.prompt {
        Prompt::Completion(s) | Prompt::Speak(s) => Ok(s.clone()),
        Prompt::Chat(messages) => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.text())
            .ok_or_else(|| {
                EngineError::InvalidInput("the chat has no user message to draw from".into())
            }),
        Prompt::Tokens(_) => Err(EngineError::InvalidInput(
            "an image prompt must be text, not token ids".into(),
        )),
    }
}

impl<E: PromptEncoder> StageEngine for TextEncoderEngine<E> {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let prompt = prompt_text(&input)?;
        let image = input.request.image.as_ref();
        // The DiT decides whether to use classifier-free guidance from the same rule; encoding
        // the negative prompt for a model with distilled guidance is wasted but harmless.
        let negative = image
            .filter(|p| p.guidance_scale > 1.0)
            .map(|p| p.negative_prompt.clone().unwrap_or_default());
        let prompt_tokens = self
            .encoder
            .count_tokens(&prompt)
            .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        self.jobs.insert(
            job,
            EncodeJob {
                prompt,
                negative,
                prompt_tokens,
            },
        );
        Ok(0)
    }

    fn pending_input(&self, _job: JobId) -> usize {
        0
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        let ids: Vec<JobId> = work
            .iter()
            .map(|w| w.job)
            .filter(|id| self.jobs.contains_key(id))
            .collect();
        let mut texts: Vec<&str> = Vec::new();
        for id in &ids {
            let job = &self.jobs[id];
            texts.push(&job.prompt);
            if let Some(n) = &job.negative {
                texts.push(n);
            }
        }
        let encoded = match self.encoder.encode(&texts) {
            Ok(e) => e,
            Err(e) => return Err(EngineError::Compute(e.to_string())),
        };
        let mut encoded = encoded.into_iter();
        for id in ids {
            let Some(job) = self.jobs.remove(&id) else {
                continue;
            };
            let positive = encoded.next();
            let negative = if job.negative.is_some() {
                encoded.next()
            } else {
                None
            };
            let Some(positive) = positive else {
                emit(
                    id,
                    StageEvent::Failed(EngineError::Compute(
                        "encoder returned too few rows".into(),
                    )),
                );
                continue;
            };
            emit(
                id,
                StageEvent::Output(vec![Payload::Embeddings(Arc::new(Conditioning {
                    positive,
                    negative,
                }))]),
            );
            emit(
                id,
                StageEvent::Finished {
                    reason: FinishReason::Complete,
                    usage: Usage {
                        prompt_tokens: job.prompt_tokens,
                        completion_tokens: 0,
                    },
                },
            );
        }
        Ok(())
    }

    fn release(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        self.jobs
            .values()
            .map(|j| j.prompt.len() + j.negative.as_ref().map_or(0, String::len))
            .sum()
    }
}
