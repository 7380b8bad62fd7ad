//! What a router stage decides for a request, and what Mixture-of-Thoughts experts exchange.
//!
//! A router stage (`kind = "router"`) scores or matches a request against the expert stages its
//! `[stage.router]` table names and selects some of them; the orchestrator then starts only
//! those. The first selected expert is the *primary*: its output is what the client receives.
//! In a Mixture-of-Thoughts group the other selected experts are *peers*: they run the prompt
//! pass only and send their projected hidden states ([`MotStates`]) to the primary after every
//! stack of layers.

use crate::payload::HiddenStates;

/// A router's decision for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteDecision {
    /// The selected expert stage ids, primary first, then by descending score. Never empty.
    pub selected: Vec<String>,
    /// The router's score for every expert it knows, in its `experts` order (empty for the rule
    /// form, which does not score).
    pub scores: Vec<(String, f32)>,
    /// How the decision was made: `"model"`, or the rule that matched (`"input:image"`,
    /// `"default"`, ...).
    pub reason: String,
}

impl RouteDecision {
    /// The primary expert's stage id.
    pub fn primary(&self) -> &str {
        self.selected.first().map_or("", String::as_str)
    }

    /// The selected experts other than the primary.
    pub fn peers(&self) -> &[String] {
        self.selected.get(1..).unwrap_or(&[])
    }

    /// Whether `stage` was selected.
    pub fn selects(&self, stage: &str) -> bool {
        self.selected.iter().any(|s| s == stage)
    }
}

/// One peer's contribution at one stack boundary of a Mixture-of-Thoughts prompt pass: its
/// residual stream after stack `stack`, normalised and projected into the shared latent space,
/// one row per token of the peer's own tokenization (`rows × shared_dim`).
#[derive(Debug, Clone, PartialEq)]
pub struct MotStates {
    /// The stack boundary (0-based) these states are from.
    pub stack: usize,
    /// The peer's expert index in the MoT checkpoint (`mot_config.json`'s `experts` order).
    pub expert: usize,
    pub states: HiddenStates,
}
