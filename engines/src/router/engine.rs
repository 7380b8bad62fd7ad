//! The router's [`StageEngine`]: admits a request (its `k`, and for the model form its prompt
//! tokens), then in one step decides for every job of the step and finishes it with one `route`
//! payload.

use std::collections::HashMap;
use std::sync::Arc;

use omnistage_stages::deploy::RouteRule;
use omnistage_stages::{
    EngineError, FinishReason, JobId, Payload, RouteDecision, StageEngine, StageEvent, StageInput,
    StepWork, Usage,
};

use super::{match_rules, prompt_text, resolve_k, top_k, RouterModel};

/// How the engine decides.
enum Decider {
    Model(Box<RouterModel>),
    Rules {
        rules: Vec<RouteRule>,
        default: String,
    },
}

/// A job waiting for its step.
enum Pending {
    /// Model form: the prompt's tokens and how many experts to select.
    Score { tokens: Vec<u32>, k: usize },
    /// Rule form: decided at admission (matching is free), emitted by the step.
    Decided(RouteDecision),
}

/// Runs a router stage.
pub struct RouterEngine {
    decider: Decider,
    /// The expert stage ids, in the model's score order.
    experts: Vec<String>,
    /// The stage's `k`.
    k: usize,
    jobs: HashMap<JobId, Pending>,
}

impl RouterEngine {
    /// A model-form router over `model`, whose outputs are the stages `experts` (same order and
    /// count), selecting `k` of them unless a request asks otherwise.
    pub fn with_model(model: RouterModel, experts: Vec<String>, k: usize) -> Result<Self, String> {
        if model.num_experts() != experts.len() {
            return Err(format!(
                "the router checkpoint scores {} experts ({}) but [stage.router] experts lists {} ({})",
                model.num_experts(),
                model.config().experts.join(", "),
                experts.len(),
                experts.join(", ")
            ));
        }
        resolve_k(None, k, experts.len()).map_err(|e| e.to_string())?;
        Ok(Self {
            decider: Decider::Model(Box::new(model)),
            experts,
            k,
            jobs: HashMap::new(),
        })
    }

    /// A rule-form router: the first rule that holds picks the expert, else `default`. Rules
    /// pick one expert, so `k` must be 1.
    pub fn with_rules(
        rules: Vec<RouteRule>,
        default: String,
        experts: Vec<String>,
        k: usize,
    ) -> Result<Self, String> {
        if k != 1 {
            return Err(format!(
                "a rule-form router selects one expert; k is {k} (set k = 1, or give the router a model to select several)"
            ));
        }
        if let Some(unknown) = rules
            .iter()
            .map(|r| r.expert.as_str())
            .chain([default.as_str()])
            .find(|e| !experts.iter().any(|x| x == e))
        {
            return Err(format!(
                "`{unknown}` is not one of the router's experts ({})",
                experts.join(", ")
            ));
        }
        Ok(Self {
            decider: Decider::Rules { rules, default },
            experts,
            k,
            jobs: HashMap::new(),
        })
    }

    /// The expert stage ids, in score order.
    pub fn experts(&self) -> &[String] {
        &self.experts
    }

    fn decide(&self, probs: &[f32], k: usize) -> Result<RouteDecision, EngineError> {
        if probs.len() != self.experts.len() || probs.iter().any(|p| !p.is_finite()) {
            return Err(EngineError::Compute(format!(
                "the router produced unusable scores {probs:?} for {} experts",
                self.experts.len()
            )));
        }
        Ok(RouteDecision {
            selected: top_k(probs, k)
                .into_iter()
                .map(|i| self.experts[i].clone())
                .collect(),
            scores: self
                .experts
                .iter()
                .cloned()
                .zip(probs.iter().copied())
                .collect(),
            reason: "model".into(),
        })
    }
}

fn finish(job: JobId, decision: RouteDecision, emit: &mut dyn FnMut(JobId, StageEvent)) {
    emit(
        job,
        StageEvent::Output(vec![Payload::Route(Arc::new(decision))]),
    );
    emit(
        job,
        StageEvent::Finished {
            reason: FinishReason::Stop,
            usage: Usage::default(),
        },
    );
}

impl StageEngine for RouterEngine {
    fn admit(&mut self, job: JobId, input: StageInput) -> Result<usize, EngineError> {
        let request = &input.request;
        let k = resolve_k(request.route.k, self.k, self.experts.len())?;
        let (pending, cost) = match &self.decider {
            Decider::Model(model) => {
                let text = prompt_text(&request.prompt)?;
                let tokens = model.tokenize(&text).map_err(|e| {
                    EngineError::InvalidInput(format!("cannot tokenize the prompt: {e}"))
                })?;
                if tokens.is_empty() {
                    return Err(EngineError::InvalidInput(
                        "the prompt has no text for the router to score".into(),
                    ));
                }
                let cost = tokens.len();
                (Pending::Score { tokens, k }, cost)
            }
            Decider::Rules { rules, default } => {
                if k != 1 {
                    return Err(EngineError::InvalidInput(format!(
                        "k = {k}: this router matches rules, which pick one expert"
                    )));
                }
                let m = match_rules(rules, default, request);
                let decision = RouteDecision {
                    selected: vec![m.expert],
                    scores: Vec::new(),
                    reason: m.reason,
                };
                (Pending::Decided(decision), 0)
            }
        };
        self.jobs.insert(job, pending);
        Ok(cost)
    }

    fn pending_input(&self, job: JobId) -> usize {
        match self.jobs.get(&job) {
            Some(Pending::Score { tokens, .. }) => tokens.len(),
            _ => 0,
        }
    }

    fn step(
        &mut self,
        work: &[StepWork],
        emit: &mut dyn FnMut(JobId, StageEvent),
    ) -> Result<(), EngineError> {
        // A prompt is encoded whole whatever its token budget: an encoder pass cannot be split.
        let mut scored: Vec<(JobId, Vec<u32>, usize)> = Vec::new();
        for w in work {
            match self.jobs.remove(&w.job) {
                Some(Pending::Decided(decision)) => finish(w.job, decision, emit),
                Some(Pending::Score { tokens, k }) => scored.push((w.job, tokens, k)),
                None => {}
            }
        }
        if scored.is_empty() {
            return Ok(());
        }
        let Decider::Model(model) = &self.decider else {
            return Err(EngineError::Compute(
                "a rule-form router holds prompts to score".into(),
            ));
        };
        let prompts: Vec<&[u32]> = scored.iter().map(|(_, t, _)| t.as_slice()).collect();
        let probs = match model.score(&prompts) {
            Ok(p) if p.len() == scored.len() => p,
            Ok(p) => {
                return Err(EngineError::Compute(format!(
                    "the router scored {} prompts for {}",
                    p.len(),
                    scored.len()
                )))
            }
            Err(e) => return Err(EngineError::Compute(e.to_string())),
        };
        for ((job, _, k), probs) in scored.into_iter().zip(probs) {
            match self.decide(&probs, k) {
                Ok(decision) => finish(job, decision, emit),
                Err(e) => emit(job, StageEvent::Failed(e)),
            }
        }
        Ok(())
    }

    fn release(&mut self, job: JobId) {
        self.jobs.remove(&job);
    }

    fn state_bytes(&self) -> usize {
        self.jobs
            .values()
            .map(|p| match p {
                Pending::Score { tokens, .. } => tokens.len() * std::mem::size_of::<u32>(),
                Pending::Decided(_) => 0,
            })
            .sum()
    }
}
