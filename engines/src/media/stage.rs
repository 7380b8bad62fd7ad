//! The media encoder stage engine: encodes the request's images (or audio clips) with any
//! [`MediaEncoder`], batching items of equal input shape across the jobs of a step, and reuses
//! embeddings of media it has seen (by content digest) from an [`EmbeddingCache`].
//!
//! A job's input is the request's media of the encoder's modality; its output is one
//! `media_embeddings` payload holding every such item's rows, tagged with the item's index in
//! the request, emitted when the last item is encoded.

use super::cache::EmbeddingCache;
use super::{MediaEncoder, PreparedMedia};
use omnistage_stages::{
    EngineError, EngineStats, FinishReason, HiddenStates, JobId, MediaDigest, MediaEmbedding,
    Payload, StageEngine, StageEvent, StageInput, StepWork, Usage,
};
use std::collections::HashMap;

/// One item of a job: encoded already (from the cache or a step), or waiting for a step.
enum Item {
    Done(HiddenStates),
    Pending(PreparedMedia),
}

/// Items of a step that share one input shape: (digest, job, slot in the job's items).
type ShapeGroup = (Vec<usize>, Vec<(MediaDigest, JobId, usize)>);

struct EncodeJob {
    /// (index in the request's media, digest, state).
    items: Vec<(usize, MediaDigest, Item)>,
}

impl EncodeJob {
    fn pending_rows(&self) -> usize {
        self.items
            .iter()
            .map(|(_, _, it)| match it {
                Item::Pending(p) => p.rows,
                Item::Done(_) => 0,
            })
            .sum()
    }
}

/// Runs a media encoder for a stage.
pub struct MediaEncoderEngine<E: MediaEncoder> {
    encoder: E,
    cache: EmbeddingCache,
    jobs: HashMap<JobId, EncodeJob>,
    encoded_total: u64,
}

impl<E: MediaEncoder> MediaEncoderEngine<E> {
    /// An engine over `encoder` keeping up to `cache_bytes` of embeddings for reuse.
    pub fn new(encoder: E, cache_bytes: usize) -> Self {
        Self {
            encoder,
            cache: EmbeddingCache::new(cache_bytes),
            jobs: HashMap::new(),
            encoded_total: 0,
        }
    }

    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    /// Emits the job's embeddings and finishes it when nothing is pending.
    fn finish_if_done(&mut self, job: JobId, emit: &mut dyn FnMut(JobId, StageEvent)) {
        let done = self
            .jobs
            .get(&job)
            .is_some_and(|j| j.items.iter().all(|(_, _, it)| matches!(it, Item::Done(_))));
        if !done {
            return;
        }
        let Some(state) = self.jobs.remove(&job) else {
            return;
        };
        let items: Vec<MediaEmbedding> = state
            .items
            .into_iter()
            .filter_map(|(media, _, it)| match it {
                Item::Done(rows) => Some(MediaEmbedding { media, rows }),
                Item::Pending(_) => None,
            })
            .collect();
        let rows = items.iter().map(|e| e.rows.rows).sum();
        emit(
            job,
            StageEvent::Output(vec![Payload::MediaEmbeddings(items.into())]),
        );
        emit(
            job,
            StageEvent::Finished {
                reason: FinishReason::Complete,
                usage: Usage {
                    prompt_tokens: 0,
                    completion_tokens: rows,
                },
            },
        );
    }
}

impl<E: MediaEncoder> StageEngine for MediaEncoderEngine<E> {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let modality = self.encoder.modality();
        let mut items = Vec::new();
        for (index, media) in input.request.media.iter().enumerate() {
            if media.modality() != modality {
                continue;
            }
            let item = match self.cache.get(&media.digest) {
                Some(rows) => Item::Done(rows),
                None => {
                    let prepared = self.encoder.prepare(&media.data).map_err(|e| match e {
                        EngineError::InvalidInput(m) => {
                            EngineError::InvalidInput(format!("{modality} #{}: {m}", index + 1))
                        }
                        other => other,
                    })?;
                    Item::Pending(prepared)
                }
            };
            items.push((index, media.digest, item));
        }
        if items.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "the request carries no {modality} for this encoder"
            )));
        }
        let state = EncodeJob { items };
        let cost = state.pending_rows();
        self.jobs.insert(job, state);
        Ok(cost)
    }

    fn pending_input(&self, job: JobId) -> usize {
        self.jobs.get(&job).map_or(0, EncodeJob::pending_rows)
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        // Every distinct pending item of the step (the same digest in two jobs is encoded once),
        // grouped by input shape: one forward per shape.
        let mut groups: Vec<ShapeGroup> = Vec::new();
        let mut seen: Vec<MediaDigest> = Vec::new();
        for w in work {
            let Some(state) = self.jobs.get(&w.job) else {
                continue;
            };
            for (slot, (_, digest, item)) in state.items.iter().enumerate() {
                let Item::Pending(p) = item else { continue };
                if seen.contains(digest) {
                    continue;
                }
                seen.push(*digest);
                let shape = p.input.dims().to_vec();
                match groups.iter_mut().find(|(s, _)| *s == shape) {
                    Some((_, members)) => members.push((*digest, w.job, slot)),
                    None => groups.push((shape, vec![(*digest, w.job, slot)])),
                }
            }
        }
        let mut failed: Vec<(JobId, EngineError)> = Vec::new();
        let mut encoded: HashMap<MediaDigest, HiddenStates> = HashMap::new();
        for (_, members) in &groups {
            let inputs: Vec<&PreparedMedia> = members
                .iter()
                .filter_map(|(_, job, slot)| match &self.jobs.get(job)?.items[*slot].2 {
                    Item::Pending(p) => Some(p),
                    Item::Done(_) => None,
                })
                .collect();
            let result = self.encoder.encode(&inputs).and_then(|out| {
                if out.len() == inputs.len() {
                    Ok(out)
                } else {
                    Err(EngineError::Compute(format!(
                        "the encoder returned {} embeddings for {} items",
                        out.len(),
                        inputs.len()
                    )))
                }
            });
            match result {
                Ok(out) => {
                    for ((digest, _, _), rows) in members.iter().zip(out) {
                        self.encoded_total += 1;
                        self.cache.insert(*digest, rows.clone());
                        encoded.insert(*digest, rows);
                    }
                }
                Err(e) => failed.extend(members.iter().map(|(_, job, _)| (*job, e.clone()))),
            }
        }
        for (job, err) in failed {
            if self.jobs.remove(&job).is_some() {
                emit(job, StageEvent::Failed(err));
            }
        }
        for w in work {
            let Some(state) = self.jobs.get_mut(&w.job) else {
                continue;
            };
            for (_, digest, item) in &mut state.items {
                if matches!(item, Item::Pending(_)) {
                    if let Some(rows) = encoded.get(digest) {
                        *item = Item::Done(rows.clone());
                    }
                }
            }
            self.finish_if_done(w.job, emit);
        }
        Ok(())
    }

    fn release(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        self.jobs
            .values()
            .flat_map(|j| &j.items)
            .map(|(_, _, it)| match it {
                Item::Done(rows) => rows.data.len() * 4,
                Item::Pending(p) => p.input.elem_count() * p.input.dtype().size_in_bytes(),
            })
            .sum()
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            state_bytes: self.state_bytes(),
            media_encoded_total: self.encoded_total,
            encoder_cache_queries_total: self.cache.queries(),
            encoder_cache_hits_total: self.cache.hits(),
            ..EngineStats::default()
        }
    }
}
