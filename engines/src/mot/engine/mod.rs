//! The staged Mixture-of-Thoughts expert: a [`StageEngine`] that runs ONE expert of a MoT
//! checkpoint as its own stage (see the [module docs](super) for the math).
//!
//! A router stage picks the experts for a request; the orchestrator starts every selected
//! expert stage with the decision (`Payload::Route`) as upstream input. From it each stage
//! learns its role for the job:
//!
//! - **Peer** (selected, not first): runs the prompt, one stack per step, and after each stack
//!   emits `Payload::MotStates { stack, expert, states }` — its residual stream projected into
//!   the shared space ([`Interaction::project_out`]), one row per prompt token. After the last
//!   stack it finishes (`Stop`, zero usage: the primary counts the prompt). One stack per step
//!   lets the primary start stack `q` while the peer computes stack `q + 1`.
//! - **Primary** (first selected): runs stack `q` of its prompt only once every peer's states
//!   for stack `q` have been [`fed`](StageEngine::feed) (until then
//!   [`awaiting_input`](StageEngine::awaiting_input) is true), then the interaction layer,
//!   and keeps that stack's cross-attention keys/values over the peers
//!   ([`PeerKv`](super::PeerKv)). After the last stack it samples its first token; each later
//!   step decodes one token against the kept keys/values, so decode never waits on peers.
//!   Generated positions see every peer row; prompt position `t` sees peer rows `j <= t`.
//!   With no peers (K = 1) the interaction is the identity and the primary is the plain
//!   expert. Output is streamed exactly like the LLM engine's: each step's
//!   `StageEvent::Output` holds `Payload::Tokens` (the new id) and, when it completes text,
//!   `Payload::Text`.
//!
//! Fed states are acknowledged with `StageEvent::Consumed(rows)` in the first step after they
//! arrive (they are then held by the engine until their stack runs), so the job only reports
//! it awaits input once everything it took is acknowledged, as the trait asks.
//!
//! Each expert tokenizes the prompt with its own tokenizer and chat template; the primary
//! aligns peers of another token count with [`super::resample_tokens`].
//!
//! **Batching.** One [`StageEngine::step`] serves every job in its work list — peers and
//! primaries, prompt passes and decode steps of different requests — but each job's tensors
//! are computed on their own (a per-sequence KV cache, no cross-job tensor batching). A job's
//! stack runs whole in one step, whatever its token budget; a primary runs every stack whose
//! peer states are all there.
//!
//! f32 only; the reference it is checked against is [`super::MotModel::forward`] and
//! [`super::MotModel::forward_continued`].

mod job;
mod prompt;
mod run;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use omnistage_stages::{
    EngineError, EngineStats, FinishReason, JobId, Payload, RouteDecision, SamplingParams,
    StageEngine, StageEvent, StageInput, StepWork, Usage,
};

use self::job::{Job, PeerJob};
use self::run::compute;
use super::config::{stack_layers, MotConfig, INTERACTION_FILE, MOT_CONFIG_FILE};
use super::interaction::{Interaction, InteractionSpec};
use super::MotError;
use crate::llm::chat_template::ChatTemplate;
use crate::llm::config::LlmConfig;
use crate::llm::generation_config::GenerationConfig;
use crate::llm::model::LlmModel;
use crate::llm::tokenizer::TextTokenizer;

/// Stage-level settings of a MoT expert (from the deployment file).
#[derive(Debug, Clone, Default)]
pub struct MotExpertSettings {
    /// Longest prompt + generation accepted; `None` = the expert's `max_position_embeddings`.
    pub max_model_len: Option<usize>,
    /// The stage's default sampling (a client-facing request overrides it field by field).
    pub sampling: SamplingParams,
}

/// Why a MoT expert engine could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MotEngineError {
    /// The checkpoint (config, expert weights, interaction weights) could not be loaded.
    #[error(transparent)]
    Mot(#[from] MotError),
    /// `expert` is not one of `mot_config.json`'s experts.
    #[error("{path}: no expert named {expert:?}; the experts are {known}")]
    UnknownExpert {
        /// The `mot_config.json`.
        path: PathBuf,
        /// The name asked for.
        expert: String,
        /// The names it lists, comma-separated.
        known: String,
    },
    /// The expert's tokenizer, chat template or generation config could not be read.
    #[error("expert {expert:?} ({dir}): {message}")]
    Files {
        /// The expert's name.
        expert: String,
        /// Its checkpoint directory.
        dir: PathBuf,
        /// What failed.
        message: String,
    },
}

/// One expert of a MoT checkpoint, served as a stage: see the [module docs](self).
pub struct MotExpertEngine {
    /// This expert's index in `mot_config.json`.
    expert: usize,
    /// This stage's id, as routers name it in `RouteDecision::selected`.
    stage: String,
    num_experts: usize,
    shared_dim: usize,
    model: LlmModel,
    interaction: Interaction,
    /// Decoder layers of each stack of this expert.
    stacks: Vec<Range<usize>>,
    tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    defaults: SamplingParams,
    eos_ids: Vec<u32>,
    max_model_len: usize,
    jobs: HashMap<JobId, Job>,
    /// Stack boundaries primaries passed with peers, and microseconds they were blocked there
    /// waiting for the peers' states (see `EngineStats::mot_boundaries_total`).
    boundaries_total: u64,
    boundary_wait_us_total: u64,
}

impl MotExpertEngine {
    /// Loads expert `expert` of the MoT checkpoint folder `dir` (f32 on `device`) for the
    /// stage `stage` (its id in routers' decisions): `mot_config.json`, the expert's weights,
    /// tokenizer, chat template and generation config, and `interaction.safetensors` (the
    /// other experts' widths come from their `config.json`; their weights are not read).
    pub fn load(
        dir: &Path,
        expert: &str,
        stage: &str,
        device: &Device,
        settings: MotExpertSettings,
    ) -> Result<Self, MotEngineError> {
        let config_path = dir.join(MOT_CONFIG_FILE);
        let config = MotConfig::from_file(&config_path)?;
        let Some(index) = config.expert_index(expert) else {
            let known: Vec<String> = config
                .experts
                .iter()
                .map(|e| format!("{:?}", e.name))
                .collect();
            return Err(MotEngineError::UnknownExpert {
                path: config_path,
                expert: expert.to_string(),
                known: known.join(", "),
            });
        };
        let expert_dir = dir.join(&config.experts[index].path);
        let model =
            LlmModel::load(&expert_dir, DType::F32, device).map_err(|source| MotError::Expert {
                name: expert.to_string(),
                path: expert_dir.clone(),
                source: Box::new(source),
            })?;
        let layers = model.config().num_hidden_layers;
        if layers < config.num_stacks {
            return Err(MotError::Config {
                path: config_path,
                reason: format!(
                    "expert {index} ({expert:?}) has {layers} layers, fewer than num_stacks ({})",
                    config.num_stacks
                ),
            }
            .into());
        }
        let mut expert_dims = Vec::with_capacity(config.experts.len());
        for (i, e) in config.experts.iter().enumerate() {
            if i == index {
                expert_dims.push(model.config().hidden_size);
                continue;
            }
            let path = dir.join(&e.path);
            let cfg = LlmConfig::from_file(&path.join("config.json")).map_err(|source| {
                MotError::Expert {
                    name: e.name.clone(),
                    path: path.clone(),
                    source: Box::new(source),
                }
            })?;
            expert_dims.push(cfg.hidden_size);
        }
        let spec = InteractionSpec {
            shared_dim: config.shared_dim,
            num_heads: config.num_heads,
            num_stacks: config.num_stacks,
            alpha: config.alpha,
            layer_norm_eps: config.layer_norm_eps,
            expert_dims,
        };
        let interaction = Interaction::load(&dir.join(INTERACTION_FILE), spec, device)?;
        let files = |message: String| MotEngineError::Files {
            expert: expert.to_string(),
            dir: expert_dir.clone(),
            message,
        };
        let tokenizer = TextTokenizer::load(&expert_dir).map_err(|e| files(e.to_string()))?;
        let template = ChatTemplate::load(&expert_dir).map_err(|e| files(e.to_string()))?;
        let generation = GenerationConfig::load(&expert_dir).map_err(|e| files(e.to_string()))?;
        let mut eos_ids = generation.eos_token_ids.clone();
        if let Some(ids) = &model.config().eos_token_ids {
            eos_ids.extend(ids.iter().copied());
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let checkpoint = SamplingParams {
            temperature: generation.temperature,
            top_p: generation.top_p,
            top_k: generation.top_k,
            repetition_penalty: generation.repetition_penalty,
            max_tokens: generation.max_new_tokens,
            ..Default::default()
        };
        let model_limit = model.config().max_position_embeddings;
        let max_model_len = settings
            .max_model_len
            .map_or(model_limit, |l| l.min(model_limit));
        let stacks = (0..config.num_stacks)
            .map(|q| stack_layers(layers, config.num_stacks, q))
            .collect();
        Ok(Self {
            expert: index,
            stage: stage.to_string(),
            num_experts: config.experts.len(),
            shared_dim: config.shared_dim,
            model,
            interaction,
            stacks,
            tokenizer,
            template,
            defaults: settings.sampling.or(&checkpoint),
            eos_ids,
            max_model_len,
            jobs: HashMap::new(),
            boundaries_total: 0,
            boundary_wait_us_total: 0,
        })
    }

    /// This expert's index in `mot_config.json`.
    pub fn expert_index(&self) -> usize {
        self.expert
    }

    /// The stage id this engine answers to in routers' decisions.
    pub fn stage_id(&self) -> &str {
        &self.stage
    }

    /// This expert's decoder.
    pub fn model(&self) -> &LlmModel {
        &self.model
    }

    /// This expert's tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Longest prompt + completion a job may reach.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Number of jobs holding state.
    pub fn active_jobs(&self) -> usize {
        self.jobs.len()
    }

    /// The logits (`[vocab]` f32) a primary job sampled its newest token from: after its prompt
    /// pass those of the last prompt position, then those of each decode step. `None` for a
    /// peer, an unknown job, or a primary that has not finished its prompt pass. For checks
    /// and debugging; the job's state (and these logits) is dropped when it finishes.
    pub fn last_logits(&self, job: JobId) -> Option<Vec<f32>> {
        match self.jobs.get(&job)? {
            Job::Primary(p) => p.last_logits.as_ref()?.to_vec1::<f32>().ok(),
            Job::Peer(_) => None,
        }
    }

    fn num_stacks(&self) -> usize {
        self.stacks.len()
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }
}

/// The router's decision among the job's upstream payloads.
fn route(input: &StageInput) -> Option<&RouteDecision> {
    input.upstream.iter().find_map(|p| match p {
        Payload::Route(d) => Some(d.as_ref()),
        _ => None,
    })
}

impl StageEngine for MotExpertEngine {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let decision = route(&input).ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "stage `{}` is a Mixture-of-Thoughts expert: it needs a router's decision (a \
                 `route` payload) as input",
                self.stage
            ))
        })?;
        let primary = decision.primary() == self.stage;
        if !primary && !decision.peers().contains(&self.stage) {
            return Err(EngineError::InvalidInput(format!(
                "the router selected {:?}, not this stage `{}`",
                decision.selected, self.stage
            )));
        }
        let peers = decision.peers().len();
        if primary && peers >= self.num_experts {
            return Err(EngineError::InvalidInput(format!(
                "the router selected {peers} peers, but the checkpoint has only {} other experts",
                self.num_experts - 1
            )));
        }
        if !input.request.media.is_empty() {
            return Err(EngineError::InvalidInput(
                "a Mixture-of-Thoughts expert takes text only; this request has media".into(),
            ));
        }
        let tokens = self.prompt_tokens(&input)?;
        self.check_prompt(&tokens)?;
        let n = tokens.len();
        let state = if primary {
            let mut p = self.new_primary(&input, tokens, peers)?;
            // States that reached the stage while the job still queued came joined to its
            // input (and the close with them when `streaming` is off).
            for payload in &input.upstream {
                if let Payload::MotStates(m) = payload {
                    p.check(payload, self.expert, self.num_experts, self.shared_dim)?;
                    p.unreported += m.states.rows;
                    p.inbox[m.stack].push((m.expert, m.states.clone()));
                }
            }
            if !input.streaming {
                p.closed = true;
            }
            Job::Primary(Box::new(p))
        } else {
            Job::Peer(PeerJob {
                tokens,
                cache: self.model.new_cache(),
                hidden: None,
                next_stack: 0,
            })
        };
        self.jobs.insert(job, state);
        Ok(n)
    }

    fn pending_input(&self, job: JobId) -> usize {
        self.jobs
            .get(&job)
            .map_or(0, |j| j.pending(self.num_stacks()))
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        for w in work {
            let Some(mut state) = self.jobs.remove(&w.job) else {
                continue;
            };
            let mut events = Vec::new();
            let outcome = match &mut state {
                Job::Peer(p) => match self.peer_stack(p) {
                    Ok((payload, last)) => {
                        events.push(StageEvent::Output(vec![payload]));
                        Ok(last.then_some((FinishReason::Stop, Usage::default())))
                    }
                    Err(e) => Err(compute(e)),
                },
                Job::Primary(p) => self
                    .step_primary(p, &mut events)
                    .inspect(|_| {
                        self.boundaries_total += std::mem::take(&mut p.boundaries);
                        self.boundary_wait_us_total += std::mem::take(&mut p.blocked_us);
                    })
                    .map(|f| {
                        f.map(|reason| {
                            let usage = Usage {
                                prompt_tokens: p.prompt_len,
                                completion_tokens: p.tokens.len() - p.prompt_len,
                            };
                            (reason, usage)
                        })
                    }),
            };
            // A job that ended is already out of `jobs` (released) when its final event goes.
            match outcome {
                Ok(None) => {
                    self.jobs.insert(w.job, state);
                    for e in events {
                        emit(w.job, e);
                    }
                }
                Ok(Some((reason, usage))) => {
                    drop(state);
                    for e in events {
                        emit(w.job, e);
                    }
                    emit(w.job, StageEvent::Finished { reason, usage });
                }
                Err(e) => {
                    drop(state);
                    for ev in events {
                        emit(w.job, ev);
                    }
                    emit(w.job, StageEvent::Failed(e));
                }
            }
        }
        Ok(())
    }

    fn feed(&mut self, job: JobId, more: Vec<Payload>, last: bool) -> Result<(), EngineError> {
        let (own, experts, dim) = (self.expert, self.num_experts, self.shared_dim);
        let Some(state) = self.jobs.get_mut(&job) else {
            return Ok(()); // Ended or released meanwhile.
        };
        let Job::Primary(p) = state else {
            return Err(EngineError::InvalidInput(
                "a Mixture-of-Thoughts peer takes no streamed input".into(),
            ));
        };
        if p.closed && !more.is_empty() {
            return Err(EngineError::InvalidInput(
                "peer states arrived after their stream was closed".into(),
            ));
        }
        // Checked one by one against what has arrived so far (duplicates within one feed too);
        // a refused feed fails the job, so a partly taken feed is never used.
        for payload in more {
            p.check(&payload, own, experts, dim)?;
            if let Payload::MotStates(m) = payload {
                p.unreported += m.states.rows;
                p.inbox[m.stack].push((m.expert, m.states));
            }
        }
        if last {
            p.closed = true;
        }
        Ok(())
    }

    fn awaiting_input(&self, job: JobId) -> bool {
        match self.jobs.get(&job) {
            Some(Job::Primary(p)) => p.awaiting(self.num_stacks()),
            _ => false,
        }
    }

    fn release(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        self.jobs.values().map(Job::bytes).sum()
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            state_bytes: self.state_bytes(),
            mot_boundaries_total: self.boundaries_total,
            mot_boundary_wait_us_total: self.boundary_wait_us_total,
            ..EngineStats::default()
        }
    }
}
